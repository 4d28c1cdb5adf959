//! Live migration between two agents with real guests: continuity over many hops,
//! finishing what plain pre-copy cannot, and every fault before switchover leaving the
//! VM running on its source with nothing left at the destination.

mod common;

use common::{assert_healthy, AgentProc};
use serde::Deserialize;
use std::time::Duration;
use walkabout_api::{Compression, MigrationRecord, Phase, VmState};
use walkabout_testbed::wait_gone;

/// A migration slow enough to interrupt: a guest dirtying far faster than a 40 MiB/s
/// cap, pre-copy only, with a long budget.
const SLOW: &[&str] = &["--mode", "precopy", "--max-bandwidth", "40M", "--budget-per-gib", "600s"];

/// `walkabout cpu baseline --output json` (the CLI's own summary of the hosts' CPUs).
#[derive(Debug, Deserialize)]
struct Baseline {
    /// The named model every host runs.
    model: String,
    /// Its features.
    model_features: u64,
    /// Features all hosts share.
    common_features: u64,
}

fn two_agents(dest_extra: &[&str]) -> (AgentProc, AgentProc) {
    (AgentProc::start(&[]), AgentProc::start(dest_extra))
}

#[test]
fn a_dirtying_guest_walks_back_and_forth_ten_times_without_losing_a_heartbeat() {
    let (a, b) = two_agents(&[]);
    a.create(&["--name", "walker", "--memory", "512M", "--workload", "dirty:128:32"]);
    a.wait_heartbeats("walker", 5);
    let mut hosts = [&a, &b];
    for hop in 0..20 {
        let (from, to) = (hosts[0], hosts[1]);
        let m = from.migrate("walker", to, &[]);
        assert_eq!(m.result, Phase::Completed, "hop {hop}: {m:?}");
        assert!(m.downtime_ms.is_some(), "hop {hop}: {m:?}");
        // Exactly one host has the VM, and no QEMU is left at the source.
        assert_eq!(from.try_info("walker"), None, "hop {hop}: source still lists the VM");
        assert!(from.qemu_pids().is_empty(), "hop {hop}: QEMU left at the source");
        assert_eq!(to.info("walker").record.state, VmState::Running, "hop {hop}");
        hosts.swap(0, 1);
    }
    let seen = hosts[0].info("walker").guest.heartbeats;
    let v = hosts[0].wait_heartbeats("walker", seen + 10);
    assert_healthy(&v);
}

#[test]
fn multifd_with_zstd_and_xbzrle_each_carry_a_dirtying_guest_ten_hops_without_a_corrupt_page() {
    let (a, b) = two_agents(&[]);
    a.create(&["--name", "packed", "--memory", "512M", "--workload", "dirty:64:32"]);
    a.wait_heartbeats("packed", 5);
    let mut hosts = [&a, &b];
    let ways: [(&[&str], u8, Compression); 2] = [
        (&["--multifd-channels", "2", "--compression", "zstd"], 2, Compression::Zstd),
        (&["--compression", "xbzrle"], 0, Compression::Xbzrle),
    ];
    for (args, channels, compression) in ways {
        for hop in 0..10 {
            let (from, to) = (hosts[0], hosts[1]);
            let m = from.migrate("packed", to, args);
            assert_eq!(m.result, Phase::Completed, "{compression} hop {hop}: {m:?}");
            let s = m.strategy.as_ref().unwrap_or_else(|| panic!("no strategy: {m:?}"));
            assert_eq!((s.multifd_channels, s.compression), (channels, compression), "{m:?}");
            assert!(s.stream_reason.contains("as asked"), "{m:?}");
            assert!(from.qemu_pids().is_empty(), "{compression} hop {hop}: QEMU left at the source");
            hosts.swap(0, 1);
        }
    }
    let seen = hosts[0].info("packed").guest.heartbeats;
    assert_healthy(&hosts[0].wait_heartbeats("packed", seen + 10));
}

#[test]
fn auto_finishes_a_guest_dirtying_faster_than_the_link_and_records_why() {
    let (a, b) = two_agents(&[]);
    a.create(&["--name", "fast", "--memory", "512M", "--workload", "dirty:256:512"]);
    a.wait_heartbeats("fast", 20);
    let m = a.migrate("fast", &b, &["--max-bandwidth", "100M", "--mode", "auto"]);
    assert_eq!(m.result, Phase::Completed, "{m:?}");
    let to_postcopy = m.switches.iter().find(|s| s.to == "postcopy").unwrap_or_else(|| panic!("no post-copy switch: {m:?}"));
    assert!(!to_postcopy.reason.is_empty(), "{m:?}");
    // The agent's record says the same as the CLI's summary.
    let rec = a.migration(&m.id);
    assert_eq!((rec.phase, &rec.switches), (Phase::Completed, &m.switches), "{rec:?}");
    let seen = b.info("fast").guest.heartbeats;
    assert_healthy(&b.wait_heartbeats("fast", seen + 10));
}

#[test]
fn precopy_that_cannot_finish_gives_up_at_its_budget_and_the_vm_stays_home() {
    let (a, b) = two_agents(&[]);
    a.create(&["--name", "stuck", "--memory", "256M", "--workload", "dirty:128:512"]);
    a.wait_heartbeats("stuck", 10);
    let m = a.migrate("stuck", &b, &["--mode", "precopy", "--max-bandwidth", "40M", "--budget-per-gib", "16s"]);
    assert_eq!(m.result, Phase::Failed, "{m:?}");
    assert!(m.reason.as_deref().unwrap_or("").contains("budget"), "{m:?}");
    assert!(b.qemu_pids().is_empty(), "destination QEMU left behind");
    let v = a.info("stuck");
    assert_eq!(v.record.state, VmState::Running, "{v:?}");
    let seen = v.guest.heartbeats;
    assert_healthy(&a.wait_heartbeats("stuck", seen + 10));
}

#[test]
fn cancel_mid_migration_leaves_the_vm_on_its_source_and_is_idempotent() {
    let (a, b) = two_agents(&[]);
    a.create(&["--name", "c", "--memory", "256M", "--workload", "dirty:128:512"]);
    a.wait_heartbeats("c", 10);
    let id = a.start_migration("c", &b, SLOW);
    a.wait_transferred(&id, 32 << 20);
    let dest_pids = b.qemu_pids();
    assert_eq!(dest_pids.len(), 1, "destination QEMU should be receiving");
    let cancelling: MigrationRecord = a.cli_as(&["migration", "cancel", &id]);
    assert_eq!(cancelling.id, id, "{cancelling:?}");
    let m = a.wait_final(&id);
    assert_eq!(m.phase, Phase::Cancelled, "{m:?}");
    // A second cancel is no error.
    assert_eq!(a.cli_as::<MigrationRecord>(&["migration", "cancel", &id]).phase, Phase::Cancelled);
    assert!(wait_gone(dest_pids[0], Duration::from_secs(10)), "destination QEMU still runs after cancel");
    let v = a.info("c");
    assert_eq!(v.record.state, VmState::Running, "{v:?}");
    let seen = v.guest.heartbeats;
    assert_healthy(&a.wait_heartbeats("c", seen + 10));
}

#[test]
fn cancel_after_completion_is_refused_clearly_and_the_pinned_machine_type_travels() {
    let (a, b) = two_agents(&[]);
    let created = a.create(&["--name", "done", "--memory", "256M"]);
    let machine = created.record.spec.machine.clone().expect("machine pinned at creation");
    assert!(machine.starts_with("pc-q35-"), "not a versioned machine type: {machine}");
    let m = a.migrate("done", &b, &[]);
    assert_eq!(m.result, Phase::Completed, "{m:?}");
    assert_eq!(b.info("done").record.spec.machine.as_deref(), Some(machine.as_str()));
    let e = a.cli_fails(&["migration", "cancel", &m.id]);
    assert!(e.contains("past its switchover"), "{e}");
}

#[test]
fn killing_the_destination_agent_mid_migration_leaves_the_vm_on_its_source() {
    let (a, mut b) = two_agents(&[]);
    a.create(&["--name", "k", "--memory", "256M", "--workload", "dirty:128:512"]);
    a.wait_heartbeats("k", 10);
    let id = a.start_migration("k", &b, SLOW);
    a.wait_transferred(&id, 32 << 20);
    let dest_pids = b.qemu_pids();
    assert_eq!(dest_pids.len(), 1);
    b.kill();
    let m = a.wait_final(&id);
    assert_eq!(m.phase, Phase::Failed, "{m:?}");
    assert!(m.reason.as_deref().unwrap_or("").contains("destination stopped answering"), "{m:?}");
    assert!(wait_gone(dest_pids[0], Duration::from_secs(10)), "destination QEMU still runs");
    let v = a.info("k");
    assert_eq!(v.record.state, VmState::Running, "{v:?}");
    let seen = v.guest.heartbeats;
    assert_healthy(&a.wait_heartbeats("k", seen + 10));
}

#[test]
fn a_destination_lacking_cpu_features_is_refused_before_any_memory_moves() {
    let (a, b) = two_agents(&["--cpu-ceiling", "qemu64"]);
    a.create(&["--name", "modern", "--memory", "256M", "--cpu-model", "max"]);
    let m = a.migrate("modern", &b, &[]);
    assert_eq!(m.result, Phase::Failed, "{m:?}");
    let reason = m.reason.as_deref().unwrap_or("");
    assert!(reason.contains("cannot migrate modern") && reason.contains("lacks CPU features"), "{m:?}");
    assert_eq!(m.transferred_bytes, 0, "memory moved before the CPU check: {m:?}");
    assert!(b.qemu_pids().is_empty(), "destination QEMU left behind");
    assert_eq!(a.info("modern").record.state, VmState::Running);
}

#[test]
fn a_source_agent_restart_mid_migration_ends_it_with_the_vm_running_at_home() {
    let (mut a, b) = two_agents(&[]);
    a.create(&["--name", "sr", "--memory", "256M", "--workload", "dirty:128:512"]);
    a.wait_heartbeats("sr", 10);
    let id = a.start_migration("sr", &b, SLOW);
    a.wait_transferred(&id, 32 << 20);
    let dest = b.qemu_pids();
    assert_eq!(dest.len(), 1);
    a.kill();
    // Without its source's probes the destination's lease runs out.
    assert!(wait_gone(dest[0], Duration::from_secs(20)), "destination QEMU outlived its silent source");
    a.restart().expect("restart the agent");
    let m = a.migration(&id);
    assert_eq!(m.phase, Phase::Failed, "{m:?}");
    assert!(m.reason.as_deref().unwrap_or("").contains("restarted"), "{m:?}");
    let v = a.info("sr");
    assert_eq!(v.record.state, VmState::Running, "{v:?}");
    let seen = v.guest.heartbeats;
    assert_healthy(&a.wait_heartbeats("sr", seen + 10));
    assert_eq!(b.vms(), vec![], "destination still lists the VM");
}

#[test]
fn a_vm_on_the_cluster_cpu_baseline_moves_to_the_least_capable_host() {
    let (a, b) = two_agents(&["--cpu-ceiling", "Nehalem"]);
    let out: Baseline = common::json_as(&["cpu", "baseline", "--agent", &a.url, "--agent", &b.url]);
    let model = out.model.clone();
    assert!(!model.is_empty(), "{out:?}");
    assert!(out.model_features <= out.common_features, "{out:?}");
    a.create(&["--name", "evc", "--memory", "256M", "--cpu-model", &model]);
    let m = a.migrate("evc", &b, &[]);
    assert_eq!(m.result, Phase::Completed, "baseline {model} could not move: {m:?}");
    assert_eq!(b.info("evc").record.spec.cpu_model.as_deref(), Some(model.as_str()));
}
