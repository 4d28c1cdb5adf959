//! Free will on real guests: a guest asks to move on its `org.walkabout.0` port and is
//! moved by the controller (and told where it went, on its console, at its new host);
//! a guest asking for a host out of service is refused, and told why.

mod common;

use common::{assert_healthy, AgentProc, ControllerProc};
use std::time::{Duration, Instant};
use walkabout_api::{Maintenance, WillAsk};

/// The text of VM `vm`'s console on `agent`.
fn console(agent: &AgentProc, vm: &str) -> String {
    agent.call(|c| async move { c.console(vm, 0).await }).map(|c| c.text).unwrap_or_default()
}

/// Waits until `vm`'s console on one of `agents` shows `n` answers; returns that agent's
/// index and the console.
fn wait_answers(agents: &[&AgentProc], vm: &str, n: usize, ctl: &ControllerProc) -> (usize, String) {
    let start = Instant::now();
    loop {
        for (i, a) in agents.iter().enumerate() {
            let text = console(a, vm);
            if text.matches("WALKABOUT WILL answer: ").count() >= n {
                return (i, text);
            }
        }
        assert!(start.elapsed() < Duration::from_secs(180), "{vm} got no {n} answer(s) in 180 s\n{}", ctl.log());
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_guest_asking_to_move_is_moved_and_told_where_and_a_refusal_says_why() {
    let (h1, h2, h3) =
        (AgentProc::start(&["--capacity", "768M"]), AgentProc::start(&["--capacity", "768M"]), AgentProc::start(&["--capacity", "768M"]));
    // First `walk least-loaded` (h2: as free as h3, and first by name; h3 is drained by
    // then anyway), then `walk h3`, out of service.
    let will = "walkabout.will=least-loaded,h3 walkabout.will_every=6";
    h1.create(&["--name", "x", "--memory", "256M", "--free-will", "--cmdline", will]);
    let ctl = ControllerProc::start(&[&h1, &h2, &h3], &[]);
    ctl.wait_vms(1);
    ctl.cli(&["host", "drain", "h3"]);
    assert_eq!(ctl.host("h3").maintenance, Maintenance::Drained);

    let (first_at, first) = wait_answers(&[&h1, &h2, &h3], "x", 1, &ctl);
    let (_, both) = wait_answers(&[&h2], "x", 2, &ctl);

    assert_eq!(first_at, 1, "the answer to the move is printed on the new host, h2:\n{first}");
    assert!(first.contains("WALKABOUT WILL answer: went to h2"), "{first}");
    assert!(both.contains("WALKABOUT WILL answer: refused: h3 is out of service"), "{both}");
    let seen = ctl.call(|c| async move { c.vm("x").await }).expect("x as the controller sees it");
    assert_eq!(seen.host.as_deref(), Some("h2"), "{seen:?}");
    let records = ctl.call(|c| async move { c.will_requests().await }).expect("the controller's free-will records");
    let asks: Vec<(WillAsk, String)> = records.iter().map(|r| (r.ask.clone(), r.answer.clone().unwrap_or_default())).collect();
    assert_eq!(
        asks,
        [
            (WillAsk::LeastLoaded, "went to h2".to_string()),
            (WillAsk::Host("h3".into()), "refused: h3 is out of service (maintenance)".to_string())
        ]
    );
    assert!(h1.try_info("x").is_none(), "x left h1");
    let x = h2.wait_heartbeats("x", h2.info("x").guest.heartbeats + 5);
    assert_healthy(&x);
}
