//! `bench/plan_scale`: the planner on 10,000 hosts x 100,000 VMs with the whole model
//! (two CPU generations, vCPUs, 10,000 anti-affinity groups of three): a drain of one
//! host and a rebalance, each made into a target by the policies and planned, timed over
//! 3 runs (median). The peer in the same run is the same planner handed memory only,
//! as the controller did before: what the extra constraints cost. Prints one JSON
//! document.
//!
//! Run: `cargo run --release -p walkabout-bench --bin plan_scale [HOSTS VMS]`.

use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};
use walkabout_plan::policy::{plan_policy, Policy};
use walkabout_plan::tight::Rng;
use walkabout_plan::{Case, Group, GroupKind, Host, Options, Outcome, Vm};

fn cluster(hosts: usize, vms: usize, whole_model: bool) -> Case {
    let mut rng = Rng(7);
    let mut case = Case::default();
    let new: Vec<String> = ["sse2", "avx2", "avx512f"].iter().map(|s| s.to_string()).collect();
    let old: Vec<String> = ["sse2", "avx2"].iter().map(|s| s.to_string()).collect();
    for h in 0..hosts {
        case.hosts.push(Host {
            name: format!("h{h}"),
            memory_mib: 256 * 1024,
            vcpus: whole_model.then_some(512),
            arch: None,
            guest_archs: None,
            cpu_features: if !whole_model {
                vec![]
            } else if (h / 20).is_multiple_of(2) {
                new.clone()
            } else {
                old.clone()
            },
            reserved_mib: 0,
        });
    }
    let sizes = [1024u64, 2048, 2048, 4096, 4096, 8192];
    let mut used = vec![0u64; hosts];
    let mut group_hosts: std::collections::HashMap<usize, Vec<usize>> = std::collections::HashMap::new();
    for v in 0..vms {
        let mem = sizes[(rng.next_u64() % sizes.len() as u64) as usize];
        let skylake = rng.next_u64().is_multiple_of(4);
        let start = v % hosts;
        // The first three VMs of every ten form an anti-affinity group: keep them apart.
        let group = (v % 10 < 3).then_some(v / 10);
        let apart = |h: usize| group.is_none_or(|g| !group_hosts.get(&g).is_some_and(|l: &Vec<usize>| l.contains(&h)));
        let Some(h) = (0..hosts)
            .map(|k| (start + k) % hosts)
            .find(|&h| used[h] + mem <= 200 * 1024 && (!skylake || (h / 20).is_multiple_of(2)) && apart(h))
        else {
            continue;
        };
        if let Some(g) = group {
            group_hosts.entry(g).or_default().push(h);
        }
        used[h] += mem;
        let name = format!("vm{v}");
        case.vms.push(Vm {
            name: name.clone(),
            memory_mib: mem,
            vcpus: whole_model.then_some(1 + rng.next_u64() % 4),
            arch: None,
            cpu_features: if !whole_model {
                vec![]
            } else if skylake {
                new.clone()
            } else {
                old[..1].to_vec()
            },
        });
        case.current.insert(name, format!("h{h}"));
    }
    if whole_model {
        // Groups of three VMs on three different hosts (v, v+1, v+2 are round-robin).
        for g in 0..(vms / 10) {
            let members: Vec<String> = (0..3).map(|k| format!("vm{}", g * 10 + k)).filter(|n| case.current.contains_key(n)).collect();
            case.groups.push(Group { name: format!("g{g}"), kind: GroupKind::AntiAffinity, vms: members });
        }
    }
    case
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn measure(case: &Case, policy: &Policy) -> Result<Value> {
    let mut times = vec![];
    let mut last = None;
    for _ in 0..3 {
        let t = Instant::now();
        let out = plan_policy(case, policy, &Options::default())?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        last = Some(out);
    }
    let summary = match last {
        Some(Outcome::Ok(p)) => json!({"status": "ok", "migrations": p.count, "waves": p.waves, "optimal": p.optimal}),
        Some(Outcome::Impossible(i)) => json!({"status": "impossible", "blocked": i.blocked.len(), "reason": i.reason}),
        Some(Outcome::Unsolved(i)) => json!({"status": "unsolved", "blocked": i.blocked.len(), "reason": i.reason}),
        None => json!(null),
    };
    Ok(json!({"median_ms": median(times.clone()), "runs_ms": times, "outcome": summary}))
}

/// The planner at scale beside the same planner on memory only; one JSON document.
#[derive(clap::Parser)]
#[command(name = "plan_scale")]
struct Args {
    /// Hosts of the generated cluster.
    #[arg(default_value_t = 10_000)]
    hosts: usize,
    /// VMs of the generated cluster.
    #[arg(default_value_t = 100_000)]
    vms: usize,
}

fn main() -> Result<()> {
    let Args { hosts, vms } = <Args as clap::Parser>::parse();
    let mut out = serde_json::Map::new();
    for (label, whole) in [("whole_model", true), ("memory_only_peer", false)] {
        let t = Instant::now();
        let case = cluster(hosts, vms, whole);
        let build_ms = t.elapsed().as_secs_f64() * 1000.0;
        let drain = measure(&case, &Policy::Drain { hosts: vec!["h0".into()] })?;
        let balance = measure(&case, &Policy::Balance)?;
        out.insert(
            label.into(),
            json!({"hosts": case.hosts.len(), "vms": case.vms.len(), "groups": case.groups.len(), "build_ms": build_ms,
                   "drain_one_host": drain, "rebalance": balance}),
        );
    }
    let doc = json!({"bench": "plan_scale", "results": out,
        "note": "median of 3 runs per goal, release build; policy target + path plan; peer: the same planner handed memory only"});
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::Parser;

    #[test]
    fn hosts_and_vms_are_positional_with_the_old_defaults() {
        let d = Args::try_parse_from(["plan_scale"]).expect("defaults");
        let g = Args::try_parse_from(["plan_scale", "100", "1000"]).expect("both");
        assert_eq!((d.hosts, d.vms, g.hosts, g.vms), (10_000, 100_000, 100, 1000));
    }
}
