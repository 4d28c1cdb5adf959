//! The Towers of Hanoi started and stopped from the web console, in a real headless
//! Chromium (Debian's, through chromedriver): three agents on a guests' bridge, a
//! controller set up for the game (the CA, the bridge, the hypervisor guest's address)
//! serving the console, one small guest of the cluster's own. A viewer's Play is refused
//! with the reason. The operator's Play starts the game on the pegs chosen on the page;
//! its first stage (the hypervisor guest booting on the first peg) shows on the page
//! while the controller lists the game's VMs there; Stop ends it: stopped, its VMs
//! deleted, nothing migrating, every VM of the cluster running. The whole game is
//! `tests/hanoi.rs` (ignored: minutes).

mod common;
#[path = "web/webdriver.rs"]
#[allow(dead_code)]
mod webdriver;

use common::bin;
use std::path::PathBuf;
use std::time::Duration;
use walkabout_api::{
    AgentClient, ClientOptions, ClusterVm, ClusterVmState, ConsoleLogin, ControllerClient, HanoiStage, VmSpec, WalkKind, WalkRecord,
    WalkStatus,
};
use walkabout_testbed::{Agent, AgentSpec, Controller, ControllerSpec, GuestNet, TestCa};
use walkabout_trust::Bundle;
use webdriver::Browser;

/// Never a hang; the whole test takes well under a minute.
const LIMIT: Duration = Duration::from_secs(60);

/// Where the screenshots go: `<target>/artifacts/web/`.
fn artifacts() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().map_or(tmp.clone(), PathBuf::from).join("artifacts").join("web")
}

/// A peg: an agent on the guests' bridge address, serving TLS as a host of the test CA.
fn peg(ca: &TestCa, name: &str, ip: &str) -> Agent {
    let id = ca.host(name, ip).expect("a host identity");
    let spec = AgentSpec::new(bin()).at(None, &format!("{ip}:0")).tls(&id, &ca.operator()).args(&["--capacity", "2G"]);
    Agent::start(AgentSpec { name: name.into(), ..spec }).expect("start a peg agent")
}

/// `walkabout ARGS --controller URL --identity OPERATOR --output json`, parsed.
fn cli<T: serde::de::DeserializeOwned>(ctl: &Controller, args: &[&str]) -> T {
    let out = ctl.command(args).args(["--output", "json"]).output().expect("run walkabout");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("walkabout {args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// Calls the controller as the operator.
fn call<T, F, Fut>(ctl: &Controller, ca: &TestCa, f: F) -> T
where
    T: Send,
    F: FnOnce(ControllerClient) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T, walkabout_api::ClientError>>,
{
    let tls = walkabout_trust::tls::client_config(&Bundle::load(&ca.operator()).expect("the operator")).expect("its TLS");
    let c = ControllerClient::with_tls(&ctl.url, ClientOptions::default(), tls).expect("a controller client");
    common::block_on(None, move || f(c)).expect("the controller answers")
}

fn hanoi_game(ctl: &Controller, ca: &TestCa) -> Option<WalkRecord> {
    call(ctl, ca, |c| async move { c.walks().await }).into_iter().find(|w| w.kind == WalkKind::Hanoi)
}

fn vms(ctl: &Controller, ca: &TestCa) -> Vec<ClusterVm> {
    call(ctl, ca, |c| async move { c.vms().await })
}

#[test]
fn the_towers_of_hanoi_start_from_the_page_show_their_first_stage_and_stop() {
    common::guest_image();
    let ca = TestCa::shared().expect("the test CA");
    let n = std::process::id() % 1000;
    let net = GuestNet::new(&format!("wq{n}"), &format!("10.78.{}", n % 250), &[]).expect("guests' bridge (needs root)");
    let ip = format!("{}.254", net.subnet());
    let pegs: Vec<Agent> = (1..=3).map(|i| peg(ca, &format!("h{i}"), &ip)).collect();
    let address = net.guest_address(20);
    let refs: Vec<&Agent> = pegs.iter().collect();
    let spec = ControllerSpec::new(bin(), &refs).tls(ca.dir(), &ca.operator()).args(&[
        "--web-listen",
        "127.0.0.1:0",
        "--hanoi-bridge",
        net.bridge(),
        "--hanoi-address",
        &address,
    ]);
    let ctl = Controller::start(spec).expect("start the controller");
    // The cluster's own guest, on h2: the game must leave it alone.
    let a = VmSpec { workload: "idle".into(), ..VmSpec::new("a", 128) };
    let tls = walkabout_trust::tls::client_config(&Bundle::load(&ca.operator()).expect("the operator")).expect("its TLS");
    let h2 = AgentClient::with_tls(&pegs[1].url, ClientOptions::default(), tls).expect("a client of h2");
    common::block_on(None, || async { h2.create_vm(&a).await }).expect("a on h2");
    let login = ctl.web_url().expect("the controller wrote its console's URL to web.url");
    let b = Browser::start(&artifacts(), 1280, 1000);

    // A viewer's Play is refused with the reason; nothing starts.
    let viewer: ConsoleLogin = cli(&ctl, &["console-url", "--role", "viewer"]);
    b.goto(&viewer.url);
    b.wait_for("the Play button for the viewer", LIMIT, |b| b.find("#hanoi-play"));
    b.click("#hanoi-play");
    let refused =
        b.wait_for("the viewer's game refused", LIMIT, |b| b.text("#notice:not([hidden])").filter(|t| t.contains("POST /v1/games/hanoi")));
    assert!(refused.contains("(viewer) may only read"), "the viewer's game: {refused}");
    assert!(hanoi_game(&ctl, ca).is_none(), "a viewer started a game");

    // The operator plays on h1, h2, h3 (the pegs the page chose).
    b.goto(&login);
    b.wait_for("the Play button", LIMIT, |b| b.find("#hanoi-peg3 option[value=\"h3\"]:checked"));
    b.click("#hanoi-play");
    let id = b.wait_for("the game on the page", LIMIT, |b| b.attr("#hanoi-game[data-stage=\"booting\"]", "data-game"));
    let stage = b.text("#hanoi-stage").unwrap_or_default();
    assert!(stage.starts_with("booting: hanoi0") && stage.contains("start on h1"), "the first stage: {stage}");
    let pegs_shown: Vec<String> = (1..=3).filter_map(|i| b.attr(&format!("#hanoi-pegs .peg[data-peg=\"{i}\"]"), "data-peg-host")).collect();
    assert_eq!(pegs_shown, vec!["h1", "h2", "h3"]);
    assert!(b.find("#hanoi-pegs .peg[data-peg=\"1\"] .disc[data-vm=\"hanoi0\"]").is_some(), "hanoi0 is not drawn on peg 1");
    // The game's VMs boot on h1 (the hypervisor guest's image is built first, cached).
    let listed = b.wait_for("the game's VMs on h1", LIMIT, |_| {
        let vms = vms(&ctl, ca);
        let on_h1 = |n: &str| vms.iter().any(|v| v.name == n && v.host.as_deref() == Some("h1"));
        (on_h1("hanoi0") && on_h1("hanoi1")).then_some(vms)
    });
    assert_eq!(listed.len(), 3, "{listed:?}");
    b.script("document.getElementById('hanoi-game').scrollIntoView()", serde_json::json!([]));
    b.save("hanoi-1-booting.png", &b.screenshot());

    // Stop: the game ends stopped, its VMs deleted, nothing else touched.
    b.click("#hanoi-stop");
    b.wait_for("the game stopped on the page", LIMIT, |b| {
        b.find(&format!("#hanoi-game[data-game=\"{id}\"][data-status=\"stopped\"][data-stage=\"over\"]"))
    });
    let game = hanoi_game(&ctl, ca).expect("the game");
    let h = game.hanoi.clone().expect("its Hanoi record");
    assert_eq!((game.status, h.stage, h.moves.len()), (WalkStatus::Stopped, HanoiStage::Over, 0), "{game:?}");
    assert_eq!(game.result.as_deref(), Some("stopped after 0 move(s)"));
    let left = b.wait_for("only a left", LIMIT, |_| Some(vms(&ctl, ca)).filter(|v| v.len() == 1));
    assert_eq!((left[0].name.as_str(), left[0].host.as_deref(), left[0].state), ("a", Some("h2"), ClusterVmState::Running), "{left:?}");
    let migrating = call(&ctl, ca, |c| async move { c.migrations().await });
    assert!(migrating.iter().all(|m| m.phase.is_final()), "{migrating:?}");
    b.script("document.getElementById('hanoi-game').scrollIntoView()", serde_json::json!([]));
    b.save("hanoi-2-stopped.png", &b.screenshot());
    assert_eq!(b.script_errors(), Vec::<String>::new(), "the page's scripts failed");
}
