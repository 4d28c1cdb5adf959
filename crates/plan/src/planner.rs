//! The planner: from a case to an [`Outcome`].
//!
//! Order of work, and why:
//! 1. Check the input; a target host that cannot run its VM is a proven impossibility.
//! 2. The cheap proof ([`explain::pinned`]) catches VMs that can never move, or never
//!    fit their target, before any search, whatever the size.
//! 3. The fast planner runs (several orders when the case is small enough to afford
//!    it). If it needs no more migrations than the number of misplaced VMs it is
//!    optimal in count and in memory moved, and we stop.
//! 4. Otherwise, on small cases, the exact search runs with the fast plan's cost as its
//!    bound: it either finds something cheaper (then optimal), proves nothing is
//!    cheaper, proves no plan exists (when there was no bound), or runs out of budget
//!    and raises the lower bound.
//! 5. The sequential plan is packed into waves and every migration gets its reason.

use crate::error::InputError;
use crate::explain;
use crate::heuristic::{self, Order};
use crate::model::Case;
use crate::output::{Impossible, Migration, Outcome, Plan};
use crate::problem::{Move, Problem};
use crate::search::{self, Cost, Found};
use crate::validate::compile;
use crate::waves;

/// Knobs of the planner. The defaults suit interactive use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Cases with at most this many migrating VMs get the exact search.
    pub exact_max_vms: usize,
    /// States the exact search may create before it gives up.
    pub node_budget: usize,
    /// Cases with at most this many migrating VMs get several fast-planner orders.
    pub variants_max_vms: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { exact_max_vms: 64, node_budget: 300_000, variants_max_vms: 2_000 }
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
            reason: format!("{} VM(s) cannot run on their target host", blocked.len()),
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
    let orders: &[Order] =
        if p.n_vms() <= opts.variants_max_vms { &[Order::Fifo, Order::Largest, Order::Smallest] } else { &[Order::Fifo] };
    let mut best: Option<Vec<Move>> = None;
    for &order in orders {
        if let Some(moves) = heuristic::plan(p, order) {
            if best.as_ref().is_none_or(|b| cost(p, &moves) < cost(p, b)) {
                best = Some(moves);
            }
        }
        if best.as_ref().is_some_and(|b| b.len() == misplaced) {
            return finish(p, best.unwrap_or_default(), misplaced, true);
        }
    }
    let mut lower = p.lower_bound(&p.start);
    if let Some(moves) = best.as_ref().filter(|b| b.len() <= lower) {
        return finish(p, moves.clone(), lower, true);
    }
    let small = p.n_vms() <= opts.exact_max_vms && p.n_hosts() < usize::from(u16::MAX);
    if !small {
        return match best {
            Some(moves) => finish(p, moves, lower, false),
            None => unsolved(p, "the fast planner got stuck in a deadlock it could not break"),
        };
    }
    let bound = best.as_ref().map(|b| cost(p, b));
    match search::astar(p, bound, opts.node_budget) {
        Found::Optimal(moves) => {
            let n = moves.len();
            finish(p, moves, n, true)
        }
        Found::Exhausted { states, reach } => match best {
            Some(moves) => {
                let n = moves.len();
                finish(p, moves, n, true)
            }
            None => Outcome::Impossible(Impossible {
                reason: format!(
                    "no order of migrations reaches the target (all {states} reachable \
                     placements searched)"
                ),
                blocked: explain::unreachable(p, &reach, states),
                target: None,
            }),
        },
        Found::Budget { lower_bound } => {
            lower = lower.max(lower_bound as usize);
            match best {
                Some(moves) => finish(p, moves, lower, false),
                None => unsolved(p, "the fast planner got stuck and the exact search ran out of budget"),
            }
        }
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
