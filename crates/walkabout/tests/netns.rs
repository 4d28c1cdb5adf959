//! Migration between two hosts with their own network stacks (namespaces joined by a
//! veth pair): through a rate-limited link, across a link cut mid-migration, and across
//! a link cut during post-copy (restored, and never restored).

mod common;

use common::{assert_healthy, AgentProc};
use std::time::Duration;
use walkabout_api::{Phase, VmState};
use walkabout_testbed::{wait_gone, NetPair};

fn hosts(net: &NetPair) -> (AgentProc, AgentProc) {
    let a = AgentProc::start_at(Some(&net.a), &format!("{}:7701", net.addr_a), &[]);
    let b = AgentProc::start_at(Some(&net.b), &format!("{}:7701", net.addr_b), &[]);
    (a, b)
}

#[test]
fn migration_completes_over_a_rate_limited_link_with_nothing_lost() {
    let net = NetPair::new(1).expect("network namespaces (needs root)");
    net.limit_a("400mbit").expect("tc tbf");
    let (a, b) = hosts(&net);
    a.create(&["--name", "n1", "--memory", "256M", "--workload", "dirty:32:8"]);
    a.wait_heartbeats("n1", 10);
    let m = a.migrate("n1", &b, &[]);
    assert_eq!(m.result, Phase::Completed, "{m:?}");
    // The stream really crossed the limited link: no faster than 400 Mbit/s (+20%).
    let bytes = m.transferred_bytes as f64;
    let secs = m.total_ms.expect("ms") as f64 / 1000.0;
    assert!(bytes > 0.0, "{m:?}");
    assert!(bytes / secs <= 400e6 / 8.0 * 1.2, "{} MB/s is faster than the link: {m:?}", bytes / secs / 1e6);
    let seen = b.info("n1").guest.heartbeats;
    assert_healthy(&b.wait_heartbeats("n1", seen + 10));
}

#[test]
fn a_link_cut_mid_migration_leaves_the_vm_on_its_source_and_nothing_at_the_destination() {
    let net = NetPair::new(2).expect("network namespaces (needs root)");
    let (a, b) = hosts(&net);
    a.create(&["--name", "n2", "--memory", "256M", "--workload", "dirty:128:512"]);
    a.wait_heartbeats("n2", 10);
    let id = a.start_migration("n2", &b, &["--mode", "precopy", "--max-bandwidth", "40M", "--budget-per-gib", "600s"]);
    a.wait_transferred(&id, 32 << 20);
    let dest = b.qemu_pids();
    assert_eq!(dest.len(), 1, "destination QEMU should be receiving");
    net.cut().expect("cut the link");
    let m = a.wait_final(&id);
    assert_eq!(m.phase, Phase::Failed, "{m:?}");
    assert!(m.reason.as_deref().unwrap_or("").contains("destination stopped answering"), "{m:?}");
    // The destination's lease runs out and it tears its QEMU down by itself.
    assert!(wait_gone(dest[0], Duration::from_secs(20)), "destination QEMU still runs after the cut");
    let v = a.info("n2");
    assert_eq!(v.record.state, VmState::Running, "{v:?}");
    let seen = v.guest.heartbeats;
    assert_healthy(&a.wait_heartbeats("n2", seen + 10));
}

/// A guest rewriting 256 MiB at 512 MiB/s, forced into post-copy after its first pass
/// over a 200 Mbit/s link (so post-copy lasts long enough to cut it), with `extra`.
fn start_postcopy(net: &NetPair, a: &AgentProc, b: &AgentProc, vm: &str, extra: &[&str]) -> String {
    net.limit_a("200mbit").expect("tc tbf");
    a.create(&["--name", vm, "--memory", "512M", "--workload", "dirty:256:512"]);
    a.wait_heartbeats(vm, 10);
    let mut args = vec!["--mode", "postcopy"];
    args.extend_from_slice(extra);
    a.start_migration(vm, b, &args)
}

#[test]
fn a_link_cut_for_5s_during_postcopy_pauses_it_and_the_migration_recovers_and_completes() {
    let net = NetPair::new(3).expect("network namespaces (needs root)");
    let (a, b) = hosts(&net);
    let id = start_postcopy(&net, &a, &b, "pc", &["--recovery-budget", "60s"]);
    a.wait_postcopy(&id, 32 << 20);
    net.cut().expect("cut the link");
    // The source notices and pauses post-copy; the paused state is visible while cut.
    let start = std::time::Instant::now();
    let paused = loop {
        let m = a.migration(&id);
        if m.progress.postcopy_paused_since_ms.is_some() {
            break m;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "post-copy not reported paused within 5 s of the cut: {m:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(paused.progress.qemu_status, "postcopy-paused", "{paused:?}");
    let refused = a.cli_fails(&["migration", "cancel", &id]);
    assert!(refused.contains("post-copy is paused"), "{refused}");
    std::thread::sleep(Duration::from_secs(5).saturating_sub(start.elapsed()));
    net.restore().expect("restore the link");
    let m = a.wait_final(&id);
    assert_eq!(m.phase, Phase::Completed, "{m:?}");
    assert_eq!(m.postcopy_pauses.len(), 1, "{m:?}");
    assert!(m.postcopy_pauses[0].resumed_at_ms.is_some(), "{m:?}");
    let shown = String::from_utf8_lossy(&a.run(&["migration", "show", &id]).stdout).into_owned();
    assert!(shown.contains("postcopy-paused at") && shown.contains("recovered after"), "{shown}");
    assert_eq!(b.info("pc").record.state, VmState::Running);
    assert!(a.qemu_pids().is_empty(), "QEMU left at the source");
    let seen = b.info("pc").guest.heartbeats;
    assert_healthy(&b.wait_heartbeats("pc", seen + 10));
}

#[test]
fn a_link_never_restored_during_postcopy_ends_at_the_budget_naming_where_the_vm_is() {
    let net = NetPair::new(4).expect("network namespaces (needs root)");
    let (a, b) = hosts(&net);
    let id = start_postcopy(&net, &a, &b, "lost", &["--recovery-budget", "10s"]);
    a.wait_postcopy(&id, 32 << 20);
    net.cut().expect("cut the link");
    let m = a.wait_final(&id);
    assert_eq!(m.phase, Phase::Failed, "{m:?}");
    let reason = m.reason.clone().unwrap_or_default();
    assert!(reason.contains("the destination holds the VM's running state") && reason.contains("the source holds the remaining"), "{m:?}");
    assert!(reason.contains(&net.addr_b), "the reason must name the destination: {reason}");
    assert_eq!(m.postcopy_pauses.last().map(|p| p.resumed_at_ms), Some(None), "{m:?}");
    // Both halves are kept: the source's QEMU (the rest of memory) and the destination's.
    assert_eq!(a.qemu_pids().len(), 1, "the source's half is gone");
    assert_eq!(b.qemu_pids().len(), 1, "the destination's half is gone");
    assert_eq!(a.info("lost").record.state, VmState::Paused);
    let refused = a.cli_fails(&["migration", "cancel", &id]);
    assert!(refused.contains("post-copy is paused") && refused.contains("cannot be undone"), "{refused}");
}
