//! The way out of deadlocks the greedy rules cannot break: exact search on the stuck
//! part of the cluster (a large-neighbourhood step), then the greedy again.
//!
//! When the greedy planner gets stuck, the hosts around one waiting VM (its goal, its
//! host, and the goals of the misplaced VMs on those, following the waiting chain) plus
//! a few parking hosts (those with the most free memory) form a small sub-problem: the
//! VMs on those hosts, each to its goal if that host is in the set, else back where it
//! is. The exact search solves it (temporary moves onto the parking hosts included),
//! which places at least one more VM for good; the greedy then continues from there.
//! The neighbourhood grows (more parking hosts, then the VMs already in place allowed
//! to move too) until a step succeeds or the effort runs out.

use std::time::Instant;

use crate::heuristic::{self, Order};
use crate::problem::{Move, Problem};
use crate::search::{self, Found};

/// How much one repair may spend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Effort {
    /// States each exact sub-search may create.
    pub nodes: usize,
    /// Sub-searches over the whole run.
    pub searches: usize,
    /// Give up after this instant (a safety net; the counts above normally decide).
    pub deadline: Option<Instant>,
}

/// Sub-problems larger than this many VMs are not searched.
const MAX_SUB_VMS: usize = 48;

/// Plans with the greedy rules in `order`, repairing each deadlock they leave.
pub(crate) fn plan(p: &Problem, order: Order, effort: &Effort) -> Option<Vec<Move>> {
    let mut pos = p.start.clone();
    let mut moves = Vec::new();
    let mut searches = effort.searches;
    loop {
        match heuristic::plan_from(p, &pos, order) {
            Ok(m) => {
                moves.extend(m);
                return Some(moves);
            }
            Err(stuck) => {
                moves.extend(stuck.moves);
                pos = stuck.pos;
            }
        }
        let local = unstick(p, &pos, effort, &mut searches)?;
        for m in &local {
            pos[m.vm as usize] = m.to;
        }
        moves.extend(local);
    }
}

/// Finds moves from `pos` that place at least one more VM on its goal, by exact search
/// on a neighbourhood of the deadlock; `None` when every neighbourhood tried fails.
fn unstick(p: &Problem, pos: &[u32], effort: &Effort, searches: &mut usize) -> Option<Vec<Move>> {
    let n_hosts = p.n_hosts();
    let load = p.loads(pos);
    let mut on_host: Vec<Vec<usize>> = vec![Vec::new(); n_hosts];
    for (v, &h) in pos.iter().enumerate() {
        on_host[h as usize].push(v);
    }
    // Waiting VMs, least lacking first.
    let mut waiting: Vec<(u64, usize)> = (0..p.n_vms())
        .filter(|&v| pos[v] != p.goal[v])
        .map(|v| {
            let g = p.goal[v] as usize;
            ((load[g].mem + p.req[v].mem).saturating_sub(p.cap[g].mem), v)
        })
        .collect();
    waiting.sort_unstable();
    // Parking candidates: most free memory first.
    let mut roomy: Vec<usize> = (0..n_hosts).collect();
    roomy.sort_by_key(|&h| (u64::MAX - (p.cap[h].mem - load[h].mem), h));
    let mut tried: Vec<(Vec<usize>, Movable)> = Vec::new();
    let mut seen_goal = Vec::new();
    for &(_, w) in &waiting {
        if seen_goal.contains(&p.goal[w]) {
            continue;
        }
        seen_goal.push(p.goal[w]);
        if seen_goal.len() > 4 {
            break;
        }
        let core = chain(p, pos, &on_host, w, 4);
        for parking in [1usize, 2, 4, 8] {
            let mut hosts = core.clone();
            hosts.extend(roomy.iter().copied().filter(|h| !core.contains(h)).take(parking));
            hosts.sort_unstable();
            for movable in [Movable::Misplaced, Movable::AndParked, Movable::All] {
                if tried.iter().any(|(h, a)| *h == hosts && *a == movable) {
                    continue;
                }
                tried.push((hosts.clone(), movable));
                if *searches == 0 || effort.deadline.is_some_and(|d| Instant::now() >= d) {
                    return None;
                }
                match solve_sub(p, pos, &on_host, (&hosts, &core), movable, effort) {
                    Sub::Solved(moves) => return Some(moves),
                    Sub::TooBig => break,
                    Sub::Failed => *searches -= 1,
                }
            }
        }
    }
    None
}

/// The hosts along the waiting chain from `w`: its goal, its host, then the goals of
/// misplaced VMs on hosts already taken, up to `max` hosts.
fn chain(p: &Problem, pos: &[u32], on_host: &[Vec<usize>], w: usize, max: usize) -> Vec<usize> {
    let mut hosts = vec![p.goal[w] as usize, pos[w] as usize];
    let mut i = 0;
    while i < hosts.len() && hosts.len() < max {
        for &v in &on_host[hosts[i]] {
            let g = p.goal[v] as usize;
            if pos[v] != p.goal[v] && !hosts.contains(&g) && hosts.len() < max {
                hosts.push(g);
            }
        }
        i += 1;
    }
    hosts
}

enum Sub {
    Solved(Vec<Move>),
    TooBig,
    Failed,
}

/// Which VMs of a neighbourhood the sub-search may move; the others stay put (their
/// memory just lowers their host's capacity), which keeps the search small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Movable {
    /// Only the misplaced VMs.
    Misplaced,
    /// The misplaced VMs and every VM on a parking host (to gather free room there).
    AndParked,
    /// Every VM of the neighbourhood.
    All,
}

/// Exact search (weighted, to dive) on the VMs of `hosts` that `movable` allows, each
/// to its goal if that host is in the set, else back where it is.
fn solve_sub(
    p: &Problem,
    pos: &[u32],
    on_host: &[Vec<usize>],
    (hosts, core): (&[usize], &[usize]),
    movable: Movable,
    effort: &Effort,
) -> Sub {
    let index = |h: u32| hosts.iter().position(|&x| x == h as usize);
    let mut vms = Vec::new();
    let mut fixed = vec![crate::problem::Res::default(); hosts.len()];
    for (i, &h) in hosts.iter().enumerate() {
        for &v in &on_host[h] {
            let moves = match movable {
                Movable::Misplaced => pos[v] != p.goal[v],
                Movable::AndParked => pos[v] != p.goal[v] || !core.contains(&h),
                Movable::All => true,
            };
            if moves {
                vms.push(v);
            } else {
                fixed[i] = fixed[i].add(p.req[v]);
            }
        }
    }
    if vms.len() > MAX_SUB_VMS {
        return Sub::TooBig;
    }
    let as_u32 = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
    let start: Vec<u32> = vms.iter().map(|&v| index(pos[v]).map_or(0, as_u32)).collect();
    let goal: Vec<u32> = vms.iter().zip(&start).map(|(&v, &s)| index(p.goal[v]).map_or(s, as_u32)).collect();
    if start == goal {
        return Sub::Failed;
    }
    let mut sub = p.restrict(hosts, &vms, start, goal);
    for (c, f) in sub.cap.iter_mut().zip(&fixed) {
        *c = c.sub(*f);
    }
    match search::astar(&sub, None, effort.nodes, effort.deadline, 3) {
        Found::Optimal(moves) => Sub::Solved(
            moves
                .into_iter()
                .map(|m| Move { vm: as_u32(vms[m.vm as usize]), from: as_u32(hosts[m.from as usize]), to: as_u32(hosts[m.to as usize]) })
                .collect(),
        ),
        Found::Exhausted { .. } | Found::Budget { .. } => Sub::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tight::tight_case;
    use crate::validate::compile;

    /// Replays `moves` from the start: every destination has room, the end is the goal.
    fn replay(p: &Problem, moves: &[Move]) -> Result<(), String> {
        let mut pos = p.start.clone();
        let mut load = p.loads(&pos);
        for (i, m) in moves.iter().enumerate() {
            let (v, to) = (m.vm as usize, m.to as usize);
            if pos[v] != m.from || !p.compatible(v, to) || !load[to].fits_with(p.req[v], p.cap[to]) {
                return Err(format!("step {i} ({} to {}) is not possible", p.vm_names[v], p.host_names[to]));
            }
            load[m.from as usize] = load[m.from as usize].sub(p.req[v]);
            load[to] = load[to].add(p.req[v]);
            pos[v] = m.to;
        }
        if pos == p.goal {
            Ok(())
        } else {
            Err("the plan does not end on the target".into())
        }
    }

    #[test]
    fn a_deadlock_the_greedy_rules_cannot_break_is_repaired() {
        // Generated case 183 (13 hosts, 80 VMs, 93% full): every greedy order gets stuck,
        // forwards and backwards.
        let p = compile(&tight_case(183).case).expect("valid case").problem;
        let mut back = p.clone();
        std::mem::swap(&mut back.start, &mut back.goal);
        for order in [Order::Fifo, Order::Largest, Order::Smallest] {
            assert!(heuristic::plan_from(&p, &p.start, order).is_err(), "{order:?} forwards");
            assert!(heuristic::plan_from(&back, &back.start, order).is_err(), "{order:?} backwards");
        }
        let effort = Effort { nodes: 20_000, searches: 64, deadline: None };
        let moves = plan(&p, Order::Fifo, &effort).expect("repaired");
        replay(&p, &moves).expect("a valid plan");
    }
}
