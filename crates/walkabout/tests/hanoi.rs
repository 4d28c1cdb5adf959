//! Towers of Hanoi with nested VMs, on real guests: three host agents (the pegs) on one
//! guests' bridge in the root namespace and a controller set up for the game (the CA,
//! the bridge, the hypervisor guest's address); `walkabout game hanoi`, a client of the
//! controller's `POST /v1/games/hanoi`, has it build the tower on the first peg (a
//! hypervisor guest with an agent and QEMU inside, holding a plain guest) and move it to
//! the third, one live migration into or out of the nested agent at a time.
//!
//! Slow (nested TCG: the hypervisor guest boots, starts its agent, and the moves run
//! through QEMU inside a TCG guest): ignored by default; run it with
//! `cargo test -p walkabout --test hanoi -- --ignored`. The planner, the game's
//! sequence and its stop are unit-tested with fakes (`walkabout-controller`
//! `games::hanoi`, `games::hanoi_play`); starting and stopping it from the console is
//! `tests/web_hanoi.rs`.

mod common;

use common::bin;
use walkabout_api::{HanoiStage, Phase, WalkRecord, WalkStatus};
use walkabout_testbed::{Agent, AgentSpec, Controller, ControllerSpec, GuestNet, TestCa};

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
    let address = net.guest_address(20);
    let refs: Vec<&Agent> = pegs.iter().collect();
    let spec = ControllerSpec::new(bin(), &refs).tls(ca.dir(), &ca.operator()).args(&[
        "--hanoi-bridge",
        net.bridge(),
        "--hanoi-address",
        &address,
    ]);
    let spec = ControllerSpec { agents: pegs.iter().map(|p| format!("{}={}", p.name, p.url)).collect(), ..spec };
    let ctl = Controller::start(spec).expect("start the controller");

    let out = ctl
        .command(&["game", "hanoi", "--levels", "2", "--peg", "peg1", "--peg", "peg2", "--peg", "peg3", "--output", "json"])
        .output()
        .expect("run walkabout");
    let game: WalkRecord = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("game hanoi: no record ({e}): {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    eprintln!("{}", serde_json::to_string_pretty(&game).unwrap_or_default());

    let record = game.hanoi.clone().expect("the game's Hanoi record");
    assert_eq!((game.status, record.stage), (WalkStatus::Finished, HanoiStage::Over), "{game:?}");
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
    assert_eq!(record.tower, vec![vec![], vec![], vec!["hanoi0".to_string(), "hanoi1".to_string()]]);
    assert!(record.solved, "{record:?}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
