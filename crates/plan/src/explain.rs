//! Explanations: proofs that no plan exists, and the reason for each migration.

use crate::output::Blocked;
use crate::problem::{Move, Problem, Res};
use crate::search::Reach;

/// Proves VMs stuck without searching: a VM can ever move only if some other host can
/// ever have room for it, and a host's free room can never exceed its capacity minus
/// the VMs on it that can never move. Starting from "nothing can move", VMs are marked
/// movable until nothing changes; by induction over any sequence of migrations, the
/// first move of an unmarked VM would need room no host can have. A misplaced VM that
/// can never move, or whose target never has room for it, is blocked.
///
/// Memory is also bounded cluster-wide: migrations only move memory between hosts, so
/// no host ever has more free than all hosts together have now; a VM larger than that
/// can never move at all.
// Indices run over several parallel arrays at once; iterators would obscure that.
#[allow(clippy::needless_range_loop)]
pub(crate) fn pinned(p: &Problem) -> Vec<Blocked> {
    let n = p.n_vms();
    let mut movable = vec![false; n];
    let mut pinned_load = p.loads(&p.start);
    let total_free = total_free_mem(p);
    loop {
        let mut changed = false;
        for v in 0..n {
            if movable[v] {
                continue;
            }
            let s = p.start[v] as usize;
            let can = p.req[v].mem <= total_free
                && (0..p.n_hosts()).any(|h| h != s && p.compatible(v, h) && pinned_load[h].fits_with(p.req[v], p.cap[h]));
            if can {
                movable[v] = true;
                pinned_load[s] = pinned_load[s].sub(p.req[v]);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut blocked = Vec::new();
    for v in 0..n {
        let g = p.goal[v] as usize;
        if p.start[v] as usize == g {
            continue;
        }
        let mut most = p.cap[g].sub(pinned_load[g]);
        let cluster_bound = most.mem > total_free;
        most.mem = most.mem.min(total_free);
        if !movable[v] || !pinned_load[g].fits_with(p.req[v], p.cap[g]) || p.req[v].mem > total_free {
            let mut b = blocked_vm(p, v, most, "ever has");
            if cluster_bound && p.req[v].mem > total_free {
                b.why.push_str(" (all hosts together have no more free)");
            }
            blocked.push(b);
        }
    }
    blocked
}

/// Memory free over all hosts in the start placement: no host can ever have more free.
fn total_free_mem(p: &Problem) -> u64 {
    let cap: u64 = p.cap.iter().map(|c| c.mem).sum();
    let used: u64 = p.req.iter().map(|r| r.mem).sum();
    cap.saturating_sub(used)
}

/// Blocked VMs after an exhaustive search found no plan: those whose target never had
/// room for them in any reachable state, or else every misplaced VM.
pub(crate) fn unreachable(p: &Problem, reach: &[Reach], states: usize) -> Vec<Blocked> {
    let misplaced: Vec<usize> = (0..p.n_vms()).filter(|&v| p.start[v] != p.goal[v]).collect();
    let never: Vec<Blocked> = misplaced
        .iter()
        .filter(|&&v| !reach[v].at_goal)
        .map(|&v| {
            let g = p.goal[v] as usize;
            let most = Res { mem: reach[v].max_free_mem, cpu: p.cap[g].cpu };
            blocked_vm(p, v, most, "ever has")
        })
        .collect();
    if !never.is_empty() {
        return never;
    }
    misplaced
        .iter()
        .map(|&v| Blocked {
            vm: p.vm_names[v].clone(),
            needs: needs(p, v),
            why: format!(
                "{} can reach {} in some orders, but never together with the others \
                 ({states} reachable placements searched)",
                p.vm_names[v], p.host_names[p.goal[v] as usize]
            ),
        })
        .collect()
}

fn needs(p: &Problem, v: usize) -> String {
    format!("{} MiB on {}", p.req[v].mem, p.host_names[p.goal[v] as usize])
}

fn blocked_vm(p: &Problem, v: usize, most: Res, ever: &str) -> Blocked {
    let g = p.goal[v] as usize;
    let (vm, host) = (&p.vm_names[v], &p.host_names[g]);
    let why = if p.req[v].mem > most.mem {
        format!("{vm} needs {} MiB on {host}; the most {host} {ever} free is {}", p.req[v].mem, most.mem)
    } else if p.req[v].cpu > most.cpu {
        format!("{vm} needs {} vCPUs on {host}; the most {host} {ever} free is {}", p.req[v].cpu, most.cpu)
    } else {
        format!("{vm} can never leave {}: no other host ever has room for it", { &p.host_names[p.start[v] as usize] })
    };
    Blocked { vm: vm.clone(), needs: needs(p, v), why }
}

/// A short human reason for each migration of a sequential plan.
pub(crate) fn reasons(p: &Problem, moves: &[Move]) -> Vec<String> {
    let mut last = vec![usize::MAX; p.n_vms()];
    let mut count = vec![0u32; p.n_vms()];
    for (i, m) in moves.iter().enumerate() {
        last[m.vm as usize] = i;
        count[m.vm as usize] += 1;
    }
    let mut arrivals: Vec<Vec<usize>> = vec![Vec::new(); p.n_hosts()];
    for (i, m) in moves.iter().enumerate() {
        arrivals[m.to as usize].push(i);
    }
    let next_into = |h: usize, after: usize| -> Option<usize> {
        let list = &arrivals[h];
        let k = list.partition_point(|&j| j <= after);
        list.get(k).copied()
    };
    moves
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let v = m.vm as usize;
            if last[v] == i && m.to == p.goal[v] {
                return if count[v] > 1 { "to target, after a temporary stay".into() } else { "to target".into() };
            }
            let from = m.from as usize;
            let Some(j) = next_into(from, i) else {
                return format!("temporary: makes room on {}", p.host_names[from]);
            };
            let w = moves[j].vm as usize;
            let mut why = format!("temporary: frees {} MiB on {} for {}", p.req[v].mem, p.host_names[from], p.vm_names[w]);
            let mut chain = vec![format!("{}->{}", p.vm_names[w], p.host_names[from])];
            let (mut at, mut host) = (j, moves[j].from as usize);
            let mut closed = false;
            for _ in 0..6 {
                let Some(k) = next_into(host, at) else { break };
                let x = moves[k].vm as usize;
                chain.push(format!("{}->{}", p.vm_names[x], p.host_names[host]));
                if x == v {
                    closed = true;
                    break;
                }
                at = k;
                host = moves[k].from as usize;
            }
            if closed {
                why.push_str(&format!(" (cycle {})", chain.join(", ")));
            }
            why
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Case;
    use crate::validate::compile;

    #[test]
    fn two_full_hosts_swapping_are_proven_stuck_with_the_most_free_memory() {
        let p = compile(
            &Case::from_json(
                r#"{"hosts":[{"name":"h1","memory_mib":4096,"reserved_mib":256},
                             {"name":"h2","memory_mib":4096,"reserved_mib":256}],
                    "vms":[{"name":"vm1","memory_mib":3256},{"name":"vm2","memory_mib":3256}],
                    "current":{"vm1":"h1","vm2":"h2"},"target":{"vm1":"h2","vm2":"h1"}}"#,
            )
            .expect("parses"),
        )
        .expect("valid")
        .problem;
        let blocked = pinned(&p);
        assert_eq!(blocked[0].why, "vm1 needs 3256 MiB on h2; the most h2 ever has free is 584");
    }

    #[test]
    fn a_swap_of_vms_larger_than_all_free_memory_is_proven_stuck() {
        // Small VMs of 100 MiB fill the rest of three 4000 MiB hosts; each could leave,
        // so either host could in principle take a or b, but the three hosts together
        // have only 800 MiB free, so neither can ever move anywhere.
        let mut vms = vec![r#"{"name":"a","memory_mib":2000}"#.to_string(), r#"{"name":"b","memory_mib":2000}"#.to_string()];
        let mut current = vec![r#""a":"h1""#.to_string(), r#""b":"h2""#.to_string()];
        let mut target = vec![r#""a":"h2""#.to_string(), r#""b":"h1""#.to_string()];
        for (host, count) in [("h1", 17), ("h2", 17), ("h3", 38)] {
            for i in 0..count {
                vms.push(format!(r#"{{"name":"{host}s{i}","memory_mib":100}}"#));
                current.push(format!(r#""{host}s{i}":"{host}""#));
                target.push(format!(r#""{host}s{i}":"{host}""#));
            }
        }
        let json = format!(
            r#"{{"hosts":[{{"name":"h1","memory_mib":4000}},{{"name":"h2","memory_mib":4000}},{{"name":"h3","memory_mib":4000}}],
                "vms":[{}],"current":{{{}}},"target":{{{}}}}}"#,
            vms.join(","),
            current.join(","),
            target.join(",")
        );
        let p = compile(&Case::from_json(&json).expect("parses")).expect("valid").problem;
        let blocked = pinned(&p);
        assert_eq!(blocked.len(), 2);
        assert_eq!(blocked[0].why, "a needs 2000 MiB on h2; the most h2 ever has free is 800 (all hosts together have no more free)");
    }

    #[test]
    fn a_temporary_move_explains_the_cycle_it_breaks() {
        let p = compile(
            &Case::from_json(
                r#"{"hosts":[{"name":"h1","memory_mib":3000},{"name":"h2","memory_mib":3000},
                             {"name":"h3","memory_mib":3000}],
                    "vms":[{"name":"vm5","memory_mib":2048},{"name":"vm7","memory_mib":2048}],
                    "current":{"vm5":"h1","vm7":"h2"},"target":{"vm5":"h2","vm7":"h1"}}"#,
            )
            .expect("parses"),
        )
        .expect("valid")
        .problem;
        let moves = [Move { vm: 1, from: 1, to: 2 }, Move { vm: 0, from: 0, to: 1 }, Move { vm: 1, from: 2, to: 0 }];
        let why = reasons(&p, &moves);
        assert_eq!(why[0], "temporary: frees 2048 MiB on h2 for vm5 (cycle vm5->h2, vm7->h1)");
        assert_eq!(why[1], "to target");
        assert_eq!(why[2], "to target, after a temporary stay");
    }
}
