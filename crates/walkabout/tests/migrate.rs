//! Live migration between two agents with real guests: continuity over many hops,
//! finishing what plain pre-copy cannot, and every fault before switchover leaving the
//! VM running on its source with nothing left at the destination.

mod common;

use common::{assert_healthy, AgentProc};
use std::time::Duration;
use walkabout_testbed::wait_gone;

/// A migration slow enough to interrupt: a guest dirtying far faster than a 40 MiB/s
/// cap, pre-copy only, with a long budget.
const SLOW: &[&str] = &["--mode", "precopy", "--max-bandwidth", "40M", "--budget-per-gib", "600s"];

fn two_agents(dest_extra: &[&str]) -> (AgentProc, AgentProc) {
    (AgentProc::start(&[]), AgentProc::start(dest_extra))
}

#[test]
fn a_dirtying_guest_walks_back_and_forth_ten_times_without_losing_a_heartbeat() {
    let (a, b) = two_agents(&[]);
    a.cli(&["vm", "create", "--name", "walker", "--memory", "512M", "--workload", "dirty:128:32"]);
    a.wait_heartbeats("walker", 5);
    let mut hosts = [&a, &b];
    for hop in 0..20 {
        let (from, to) = (hosts[0], hosts[1]);
        let m = from.migrate("walker", to, &[]);
        assert_eq!(m["result"], "completed", "hop {hop}: {m}");
        assert!(m["downtime_ms"].as_u64().is_some(), "hop {hop}: {m}");
        // Exactly one host has the VM, and no QEMU is left at the source.
        let e = from.cli_fails(&["vm", "info", "walker"]);
        assert!(e.contains("no VM named"), "hop {hop}: source still lists the VM: {e}");
        assert!(from.qemu_pids().is_empty(), "hop {hop}: QEMU left at the source");
        assert_eq!(to.info("walker")["state"], "running");
        hosts.swap(0, 1);
    }
    let seen = hosts[0].info("walker")["guest"]["heartbeats"].as_u64().expect("hb");
    let v = hosts[0].wait_heartbeats("walker", seen + 10);
    assert_healthy(&v);
}

#[test]
fn auto_finishes_a_guest_dirtying_faster_than_the_link_and_records_why() {
    let (a, b) = two_agents(&[]);
    a.cli(&["vm", "create", "--name", "fast", "--memory", "512M", "--workload", "dirty:256:512"]);
    a.wait_heartbeats("fast", 20);
    let m = a.migrate("fast", &b, &["--max-bandwidth", "100M", "--mode", "auto"]);
    assert_eq!(m["result"], "completed", "{m}");
    let switches = m["switches"].as_array().expect("switches");
    let to_postcopy = switches.iter().find(|s| s["to"] == "postcopy").unwrap_or_else(|| panic!("no post-copy switch: {m}"));
    assert!(!to_postcopy["reason"].as_str().unwrap_or("").is_empty(), "{m}");
    let seen = b.info("fast")["guest"]["heartbeats"].as_u64().expect("hb");
    assert_healthy(&b.wait_heartbeats("fast", seen + 10));
}

#[test]
fn precopy_that_cannot_finish_gives_up_at_its_budget_and_the_vm_stays_home() {
    let (a, b) = two_agents(&[]);
    a.cli(&["vm", "create", "--name", "stuck", "--memory", "256M", "--workload", "dirty:128:512"]);
    a.wait_heartbeats("stuck", 10);
    let m = a.migrate("stuck", &b, &["--mode", "precopy", "--max-bandwidth", "40M", "--budget-per-gib", "16s"]);
    assert_eq!(m["result"], "failed", "{m}");
    assert!(m["reason"].as_str().unwrap_or("").contains("budget"), "{m}");
    assert!(b.qemu_pids().is_empty(), "destination QEMU left behind");
    let v = a.info("stuck");
    assert_eq!(v["state"], "running", "{v}");
    let seen = v["guest"]["heartbeats"].as_u64().expect("hb");
    assert_healthy(&a.wait_heartbeats("stuck", seen + 10));
}

#[test]
fn cancel_mid_migration_leaves_the_vm_on_its_source_and_is_idempotent() {
    let (a, b) = two_agents(&[]);
    a.cli(&["vm", "create", "--name", "c", "--memory", "256M", "--workload", "dirty:128:512"]);
    a.wait_heartbeats("c", 10);
    let id = a.start_migration("c", &b, SLOW);
    a.wait_transferred(&id, 32 << 20);
    let dest_pids = b.qemu_pids();
    assert_eq!(dest_pids.len(), 1, "destination QEMU should be receiving");
    a.cli(&["migration", "cancel", &id]);
    let m = a.wait_final(&id);
    assert_eq!(m["phase"], "cancelled", "{m}");
    // A second cancel is no error.
    assert_eq!(a.cli(&["migration", "cancel", &id])["phase"], "cancelled");
    assert!(wait_gone(dest_pids[0], Duration::from_secs(10)), "destination QEMU still runs after cancel");
    let v = a.info("c");
    assert_eq!(v["state"], "running", "{v}");
    let seen = v["guest"]["heartbeats"].as_u64().expect("hb");
    assert_healthy(&a.wait_heartbeats("c", seen + 10));
}

#[test]
fn cancel_after_completion_is_refused_clearly_and_the_pinned_machine_type_travels() {
    let (a, b) = two_agents(&[]);
    let created = a.cli(&["vm", "create", "--name", "done", "--memory", "256M"]);
    let machine = created["spec"]["machine"].as_str().expect("machine pinned at creation").to_string();
    assert!(machine.starts_with("pc-q35-"), "not a versioned machine type: {machine}");
    let m = a.migrate("done", &b, &[]);
    assert_eq!(m["result"], "completed", "{m}");
    assert_eq!(b.info("done")["spec"]["machine"], machine.as_str());
    let e = a.cli_fails(&["migration", "cancel", m["id"].as_str().expect("id")]);
    assert!(e.contains("past its switchover"), "{e}");
}

#[test]
fn killing_the_destination_agent_mid_migration_leaves_the_vm_on_its_source() {
    let (a, mut b) = two_agents(&[]);
    a.cli(&["vm", "create", "--name", "k", "--memory", "256M", "--workload", "dirty:128:512"]);
    a.wait_heartbeats("k", 10);
    let id = a.start_migration("k", &b, SLOW);
    a.wait_transferred(&id, 32 << 20);
    let dest_pids = b.qemu_pids();
    assert_eq!(dest_pids.len(), 1);
    b.kill();
    let m = a.wait_final(&id);
    assert_eq!(m["phase"], "failed", "{m}");
    assert!(m["reason"].as_str().unwrap_or("").contains("destination stopped answering"), "{m}");
    assert!(wait_gone(dest_pids[0], Duration::from_secs(10)), "destination QEMU still runs");
    let v = a.info("k");
    assert_eq!(v["state"], "running", "{v}");
    let seen = v["guest"]["heartbeats"].as_u64().expect("hb");
    assert_healthy(&a.wait_heartbeats("k", seen + 10));
}

#[test]
fn a_destination_lacking_cpu_features_is_refused_before_any_memory_moves() {
    let (a, b) = two_agents(&["--cpu-ceiling", "qemu64"]);
    a.cli(&["vm", "create", "--name", "modern", "--memory", "256M", "--cpu-model", "max"]);
    let m = a.migrate("modern", &b, &[]);
    assert_eq!(m["result"], "failed", "{m}");
    let reason = m["reason"].as_str().unwrap_or("");
    assert!(reason.contains("cannot migrate modern") && reason.contains("lacks CPU features"), "{m}");
    assert_eq!(m["transferred_bytes"], 0, "memory moved before the CPU check: {m}");
    assert!(b.qemu_pids().is_empty(), "destination QEMU left behind");
    assert_eq!(a.info("modern")["state"], "running");
}

#[test]
fn a_source_agent_restart_mid_migration_ends_it_with_the_vm_running_at_home() {
    let (mut a, b) = two_agents(&[]);
    a.cli(&["vm", "create", "--name", "sr", "--memory", "256M", "--workload", "dirty:128:512"]);
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
    assert_eq!(m["phase"], "failed", "{m}");
    assert!(m["reason"].as_str().unwrap_or("").contains("restarted"), "{m}");
    let v = a.info("sr");
    assert_eq!(v["state"], "running", "{v}");
    let seen = v["guest"]["heartbeats"].as_u64().expect("hb");
    assert_healthy(&a.wait_heartbeats("sr", seen + 10));
    assert!(b.cli(&["vm", "list"]).as_array().is_some_and(Vec::is_empty), "destination still lists the VM");
}

#[test]
fn a_vm_on_the_cluster_cpu_baseline_moves_to_the_least_capable_host() {
    let (a, b) = two_agents(&["--cpu-ceiling", "Nehalem"]);
    let out = common::json(&["cpu", "baseline", "--agent", &a.url, "--agent", &b.url]);
    let model = out["model"].as_str().expect("a baseline model").to_string();
    assert!(out["model_features"].as_u64() <= out["common_features"].as_u64(), "{out}");
    a.cli(&["vm", "create", "--name", "evc", "--memory", "256M", "--cpu-model", &model]);
    let m = a.migrate("evc", &b, &[]);
    assert_eq!(m["result"], "completed", "baseline {model} could not move: {m}");
    assert_eq!(b.info("evc")["spec"]["cpu_model"], model.as_str());
}
