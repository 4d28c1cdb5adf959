//! Migration between two hosts with their own network stacks (namespaces joined by a
//! veth pair): through a rate-limited link, and across a link cut mid-migration.

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
