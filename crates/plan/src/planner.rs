//! The planner: from a case to an [`Outcome`].
//!
//! Order of work, and why:
//! 1. Check the input; a target host that cannot run its VM is a proven impossibility.
//! 2. The cheap proof ([`explain::pinned`]) catches VMs that can never move, or never
//!    fit their target (including VMs larger than all the cluster's free memory),
//!    before any search, whatever the size.
//! 3. The fast planner runs (several orders, and each also from the target back to the
//!    start, reversed, when the case is small enough to afford it). If it needs no more
//!    migrations than the number of misplaced VMs it is optimal in count and in memory
//!    moved, and we stop.
//! 4. Otherwise, on small cases, the exact search runs with the fast plan's cost as its
//!    bound: it either finds something cheaper (then optimal), proves nothing is
//!    cheaper, proves no plan exists (when there was no bound), or runs out of budget
//!    and raises the lower bound. Its budget is small when a plan is already known, so
//!    proving optimality never costs more than the plan is worth.
//! 5. If the fast planner got stuck and the exact search did not settle the case, the
//!    deadlocks are repaired by exact search on the stuck hosts ([`repair`]), forwards
//!    and then backwards. Only if that fails too is the case `unsolved`.
//! 6. The sequential plan is packed into waves and every migration gets its reason.

use std::time::{Duration, Instant};

use crate::error::InputError;
use crate::explain;
use crate::heuristic::{self, Order};
use crate::model::Case;
use crate::output::{Impossible, Migration, Outcome, Plan};
use crate::problem::{Move, Problem};
use crate::repair::{self, Effort};
use crate::search::{self, Cost, Found};
use crate::validate::compile;
use crate::waves;

/// Knobs of the planner. The defaults suit interactive use.
///
/// The exact searches are bounded by counts of states, so a result does not depend on
/// the machine; `time_limit` is only a safety net on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Cases with at most this many migrating VMs get the exact search.
    pub exact_max_vms: usize,
    /// States the exact search may create when no plan is known (it may then prove
    /// that none exists).
    pub node_budget: usize,
    /// States the exact search may create looking for a plan shorter than the fast one.
    pub improve_budget: usize,
    /// States each exact search on a stuck neighbourhood may create (see `repair`).
    pub repair_budget: usize,
    /// Cases with at most this many migrating VMs get several fast-planner orders.
    pub variants_max_vms: usize,
    /// Wall-clock cap on the exact searches of one call (monotonic clock; a safety net).
    pub time_limit: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            exact_max_vms: 64,
            node_budget: 300_000,
            improve_budget: 1_000,
            repair_budget: 20_000,
            variants_max_vms: 2_000,
            time_limit: Some(Duration::from_millis(500)),
        }
    }
}

/// Plans a case with the default [`Options`].
pub fn plan(case: &Case) -> Result<Outcome, InputError> {
    plan_with(case, &Options::default())
}

/// Plans a case: a safe ordered plan, a proof that none exists, or an honest "not found".
pub fn plan_with(case: &Case, opts: &Options) -> Result<Outcome, InputError> {
    let compiled = compile(case)?;
    if !compiled.incompatible.is_empty() {
        let blocked: Vec<_> = compiled
            .incompatible
            .iter()
            .map(|i| crate::output::Blocked { vm: i.vm.clone(), needs: i.needs.clone(), why: i.why.clone() })
            .collect();
        return Ok(Outcome::Impossible(Impossible {
            reason: format!("{} VM(s) cannot run on their target host (CPU, architecture or a group rule)", blocked.len()),
            blocked,
            target: None,
        }));
    }
    Ok(solve(&compiled.problem, opts))
}

fn cost(p: &Problem, moves: &[Move]) -> Cost {
    let mem = moves.iter().map(|m| p.req[m.vm as usize].mem).sum();
    (u32::try_from(moves.len()).unwrap_or(u32::MAX), mem)
}

fn solve(p: &Problem, opts: &Options) -> Outcome {
    let misplaced = p.misplaced(&p.start);
    if misplaced == 0 {
        return finish(p, Vec::new(), 0, true);
    }
    let blocked = explain::pinned(p);
    if !blocked.is_empty() {
        return Outcome::Impossible(Impossible {
            reason: format!("no order of migrations reaches the target: {} VM(s) can never get there", blocked.len()),
            blocked,
            target: None,
        });
    }
    let variants = p.n_vms() <= opts.variants_max_vms;
    let orders: &[Order] = if variants { &[Order::Fifo, Order::Largest, Order::Smallest] } else { &[Order::Fifo] };
    // Moves are reversible: a plan from the target back to the start, reversed, is a
    // plan, and the greedy rules meet other deadlocks going that way.
    let backwards = || {
        let mut back = p.clone();
        std::mem::swap(&mut back.start, &mut back.goal);
        back
    };
    let mut back: Option<Problem> = None;
    let reverse = |moves: Vec<Move>| -> Vec<Move> { moves.iter().rev().map(|m| Move { vm: m.vm, from: m.to, to: m.from }).collect() };
    let mut best: Option<Vec<Move>> = None;
    let offer = |best: &mut Option<Vec<Move>>, moves: Vec<Move>| {
        if best.as_ref().is_none_or(|b| cost(p, &moves) < cost(p, b)) {
            *best = Some(moves);
        }
        best.as_ref().is_some_and(|b| b.len() == misplaced)
    };
    for &order in orders {
        if let Ok(moves) = heuristic::plan_from(p, &p.start, order) {
            if offer(&mut best, moves) {
                return finish(p, best.unwrap_or_default(), misplaced, true);
            }
        }
    }
    for &order in orders {
        if variants {
            let back = back.get_or_insert_with(backwards);
            if let Ok(moves) = heuristic::plan_from(back, &back.start, order) {
                if offer(&mut best, reverse(moves)) {
                    return finish(p, best.unwrap_or_default(), misplaced, true);
                }
            }
        }
    }
    let deadline = opts.time_limit.map(|d| Instant::now() + d);
    let mut lower = p.lower_bound(&p.start);
    if let Some(moves) = best.as_ref().filter(|b| b.len() <= lower) {
        return finish(p, moves.clone(), lower, true);
    }
    let small = p.n_vms() <= opts.exact_max_vms && p.n_hosts() < usize::from(u16::MAX);
    if small {
        let bound = best.as_ref().map(|b| cost(p, b));
        let budget = if best.is_some() { opts.improve_budget } else { opts.node_budget };
        match search::astar(p, bound, budget, deadline, 1) {
            Found::Optimal(moves) => {
                let n = moves.len();
                return finish(p, moves, n, true);
            }
            Found::Exhausted { states, reach } => match best {
                Some(moves) => {
                    let n = moves.len();
                    return finish(p, moves, n, true);
                }
                None => {
                    return Outcome::Impossible(Impossible {
                        reason: format!(
                            "no order of migrations reaches the target (all {states} reachable \
                             placements searched)"
                        ),
                        blocked: explain::unreachable(p, &reach, states),
                        target: None,
                    })
                }
            },
            Found::Budget { lower_bound } => lower = lower.max(lower_bound as usize),
        }
    }
    if best.is_none() {
        // The greedy rules got stuck everywhere: repair their deadlocks by exact search
        // on the stuck hosts, forwards, then backwards.
        let effort = Effort { nodes: opts.repair_budget, searches: 64, deadline };
        best = orders.iter().find_map(|&order| repair::plan(p, order, &effort));
        if best.is_none() {
            let back = back.get_or_insert_with(backwards);
            best = repair::plan(back, Order::Fifo, &effort).map(reverse);
        }
    }
    match best {
        Some(moves) => finish(p, moves, lower, false),
        None => unsolved(p, "the fast planner, the exact search and the exact search on its deadlocks got stuck"),
    }
}

fn unsolved(p: &Problem, why: &str) -> Outcome {
    let blocked = (0..p.n_vms())
        .filter(|&v| p.start[v] != p.goal[v])
        .map(|v| crate::output::Blocked {
            vm: p.vm_names[v].clone(),
            needs: format!("{} MiB on {}", p.req[v].mem, p.host_names[p.goal[v] as usize]),
            why: "not placed by the plan found so far".into(),
        })
        .collect();
    Outcome::Unsolved(Impossible { reason: format!("no plan found ({why}); this is not a proof that none exists"), blocked, target: None })
}

fn finish(p: &Problem, moves: Vec<Move>, lower_bound: usize, optimal: bool) -> Outcome {
    let (waves, n_waves) = waves::pack(p, &moves);
    let why = explain::reasons(p, &moves);
    let moved_mib = moves.iter().map(|m| p.req[m.vm as usize].mem).sum();
    let migrations = moves
        .iter()
        .zip(waves)
        .zip(why)
        .map(|((m, w), why)| Migration {
            vm: p.vm_names[m.vm as usize].clone(),
            from: p.host_names[m.from as usize].clone(),
            to: p.host_names[m.to as usize].clone(),
            wave: w + 1,
            why,
        })
        .collect();
    Outcome::Ok(Plan {
        migrations,
        count: moves.len(),
        moved_mib,
        waves: n_waves,
        lower_bound: lower_bound.min(moves.len()),
        optimal: optimal || lower_bound >= moves.len(),
        target: None,
    })
}
