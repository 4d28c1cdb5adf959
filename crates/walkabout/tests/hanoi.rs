//! Towers of Hanoi with nested VMs, on real guests: three host agents (the pegs) on one
//! guests' bridge in the root namespace, a hypervisor guest (the hyper image: an agent
//! and QEMU inside) holding a plain guest on the first; `walkabout game hanoi` moves the
//! tower to the third, one live migration into or out of the nested agent at a time.
//!
//! Slow (nested TCG: the hypervisor guest boots, starts its agent, and the moves run
//! through QEMU inside a TCG guest): ignored by default; run it with
//! `cargo test -p walkabout --test hanoi -- --ignored`. The planner and the image's
//! contents are unit-tested (`walkabout-controller` `games::hanoi`, `walkabout-image`
//! `hyper`).

mod common;

use common::bin;
use walkabout_api::{HanoiRecord, Phase};
use walkabout_testbed::{Agent, AgentSpec, GuestNet, TempDir, TestCa};

/// A peg: an agent on the guests' bridge address, serving TLS as a host of the test CA.
fn peg(ca: &TestCa, name: &str, ip: &str) -> Agent {
    let id = ca.host(name, ip).expect("a host identity");
    let spec = AgentSpec::new(bin()).at(None, &format!("{ip}:0")).tls(&id, &ca.operator());
    Agent::start(AgentSpec { name: name.into(), ..spec }).expect("start a peg agent")
}

#[test]
#[ignore = "nested TCG: about 4-5 minutes on 2 shared cores (CI budget); run with --ignored"]
fn two_nested_levels_move_from_the_first_peg_to_the_last_every_move_verified() {
    common::guest_image();
    let ca = TestCa::shared().expect("the test CA");
    let id = std::process::id() % 1000;
    let net = GuestNet::new(&format!("wh{id}"), &format!("10.79.{}", id % 250), &[]).expect("guests' bridge (needs root)");
    let ip = format!("{}.254", net.subnet());
    let pegs: Vec<Agent> = (1..=3).map(|i| peg(ca, &format!("peg{i}"), &ip)).collect();
    let work = TempDir::new("hanoi").expect("work dir");
    let op = ca.operator();
    let ca_dir = ca.dir().display().to_string();
    let work_dir = work.path().display().to_string();
    let address = net.guest_address(20);
    let mut args = vec!["--identity", op.to_str().expect("utf8"), "--timeout", "120s", "game", "hanoi", "--levels", "2"];
    for p in &pegs {
        args.extend(["--peg", p.url.as_str()]);
    }
    args.extend(["--bridge", net.bridge(), "--address", &address, "--ca-dir", &ca_dir, "--work-dir", &work_dir, "--output", "json"]);

    let out = std::process::Command::new(bin()).args(&args).env("WALKABOUT_LOG", "warn").output().expect("run walkabout");
    let record: HanoiRecord = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("game hanoi: no record ({e}): {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    eprintln!("{}", serde_json::to_string_pretty(&record).unwrap_or_default());

    assert_eq!(record.setup.len(), 1, "{record:?}");
    assert_eq!(record.setup[0].result, Phase::Completed, "the tower was not built: {:?}", record.setup[0]);
    assert_eq!(record.moves.len(), 3, "{record:?}");
    for m in record.setup.iter().chain(&record.moves) {
        assert_eq!(m.result, Phase::Completed, "{m:?}");
        assert_eq!(m.reason, None, "{m:?}");
        assert_eq!(m.seq_breaks, 0, "the heartbeat broke: {m:?}");
        assert_eq!(m.corrupt_pages, 0, "{m:?}");
        assert!(m.heartbeats > 0 && m.downtime_ms.is_some(), "{m:?}");
    }
    let places: Vec<(&str, &str, &str)> = record.moves.iter().map(|m| (m.vm.as_str(), m.from.as_str(), m.to.as_str())).collect();
    assert_eq!(places, vec![("hanoi1", "hanoi0@peg1", "peg2"), ("hanoi0", "peg1", "peg3"), ("hanoi1", "peg2", "hanoi0@peg3")]);
    assert!(record.solved, "{record:?}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
