//! The web console in a real headless Chromium (Debian's, through chromedriver) against
//! a real cluster on loopback: two agents, a controller serving the console, two small
//! real guests. The page lists what the API lists; a VM card dragged onto another host
//! with real pointer input shows the `place` plan, and confirming it moves the VM (the
//! API says so) while its card shows the migration moving, then lands with the hop's
//! downtime; a drain started from the page empties the host; an impossible drain shows
//! each VM's reason. The console's URL carries a one-time login token: it logs the
//! browser in once (a second use is refused); the events table is filled at page load;
//! a viewer's session (`walkabout console-url --role viewer`) sees the cluster and its
//! drags, drains and game start show the 403 reason. The Games panel shows the Towers
//! of Hanoi's planned moves, starts Scotland Yard (a third host joins), shows Mr X's
//! first move completed and the player's legal moves, and stops the game: it ends
//! stopped with nothing migrating and every VM running. Screenshots are kept under
//! `target/artifacts/web/`.

mod common;
#[path = "web/webdriver.rs"]
mod webdriver;

use common::{AgentProc, ControllerProc};
use std::path::PathBuf;
use std::time::Duration;
use walkabout_api::{
    AddHost, ClusterMigration, ClusterVm, ClusterVmState, ConsoleLogin, HanoiPlan, Maintenance, Phase, PlanStatus, ScotlandGame, Side,
    WalkRecord, WalkStatus,
};
use webdriver::Browser;

/// WebDriver's Enter key.
const ENTER: char = '\u{E007}';

/// Long enough for TCG guests on two shared cores, and never a hang.
const LIMIT: Duration = Duration::from_secs(180);

/// Where the screenshots go: `<target>/artifacts/web/`.
fn artifacts() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().map_or(tmp.clone(), PathBuf::from).join("artifacts").join("web")
}

fn vms(ctl: &ControllerProc) -> Vec<ClusterVm> {
    ctl.call(|c| async move { c.vms().await }).expect("the controller's VMs")
}

fn migrations(ctl: &ControllerProc) -> Vec<ClusterMigration> {
    ctl.call(|c| async move { c.migrations().await }).expect("the controller's migrations")
}

/// The host column the page shows VM `vm`'s card in.
fn column_of(b: &Browser, vm: &str) -> Option<String> {
    let js = "const c = document.querySelector(`.vm[data-vm=\"${arguments[0]}\"]`); return c ? c.closest('[data-host]')?.dataset.host ?? null : null;";
    b.script(js, serde_json::json!([vm])).as_str().map(String::from)
}

#[test]
fn the_console_lists_the_cluster_moves_a_dragged_vm_and_drains_a_host() {
    // Two hosts of 512 MiB; a and b (256 MiB each) fill h1. The bandwidth cap makes a
    // migration's first pass last seconds, long enough to watch; post-copy after it
    // ends every migration well within its time budget on a busy machine.
    let h1 = AgentProc::start(&["--capacity", "512M"]);
    let h2 = AgentProc::start(&["--capacity", "512M"]);
    h1.create(&["--name", "a", "--memory", "256M", "--workload", "dirty:64:4"]);
    h1.create(&["--name", "b", "--memory", "256M", "--workload", "idle"]);
    let ctl = ControllerProc::start(&[&h1, &h2], &["--web-listen", "127.0.0.1:0", "--max-bandwidth", "12M", "--mode", "postcopy"]);
    ctl.wait_vms(2);
    let login = ctl.web_url().expect("the controller wrote its console's URL to web.url");
    let (web, _) = login.split_once("login?token=").expect("the console's URL carries a login token");
    let last_event = ctl.call(|c| async move { c.recent_events(1).await }).expect("the last event").pop().expect("an event");
    let b = Browser::start(&artifacts(), 1280, 900);

    // Without a session the console answers 401; the URL with the token logs in once.
    b.goto(web);
    let anonymous = b.text("body").unwrap_or_default();
    assert!(anonymous.contains("needs a console session"), "the console without a session: {anonymous}");
    b.goto(&login);
    b.wait_for("the console after the login", LIMIT, |b| b.find("#board"));
    // The events table starts with the cluster's history (read at page load).
    b.wait_for("the last event before the page opened", LIMIT, |b| b.find(&format!("#events tr[data-seq=\"{}\"]", last_event.seq)));
    b.goto(&login);
    let reused = b.text("body").unwrap_or_default();
    assert!(reused.contains("not valid") && reused.contains("already used"), "a second use of the token: {reused}");
    b.goto(web);

    // The page lists every host and every VM the API lists, each VM on its host.
    let hosts = ctl.hosts();
    let listed = vms(&ctl);
    assert_eq!((hosts.len(), listed.len()), (2, 2), "{hosts:?} {listed:?}");
    for h in &hosts {
        b.wait_for(&format!("host {}", h.name), LIMIT, |b| b.find(&format!(".host[data-host=\"{}\"]", h.name)));
    }
    for v in &listed {
        let host = v.host.clone().expect("a VM with a host");
        b.wait_for(&format!("VM {} on {host}", v.name), LIMIT, |b| (column_of(b, &v.name)? == host).then_some(()));
    }
    assert_eq!(b.find_all(".host[data-host]").len(), hosts.len(), "the page shows hosts the API does not list");
    assert_eq!(b.find_all(".vm[data-vm]").len(), listed.len(), "the page shows VMs the API does not list");
    b.wait_for("the guests' heartbeats", LIMIT, |b| b.find(".vm[data-vm=\"a\"] .beat:not([data-seq=\"\"])"));
    b.save("1-cluster.png", &b.screenshot());

    // The keyboard way: Enter on a's card selects it, Enter on h2's "Move a here"
    // shows the same dry run; closing the dialog drops it, and nothing moved.
    b.press(".vm[data-vm=\"a\"]", ENTER);
    b.wait_for("h2 offering to take a", LIMIT, |b| b.find(".host[data-host=\"h2\"] button.here:not([hidden])"));
    b.press(".host[data-host=\"h2\"] button.here", ENTER);
    b.wait_for("the keyboard's plan", LIMIT, |b| b.find("#plan-dialog[data-plan-status=\"proposed\"] tr[data-vm=\"a\"]"));
    let dry = b.attr("#plan-dialog", "data-plan-id").expect("the plan's id");
    b.click("#plan-close");
    b.wait_for("the dry run dropped", LIMIT, |_| (ctl.plan(&dry).status == PlanStatus::Cancelled).then_some(()));

    // Dragging a's card onto h2 shows the place plan: a, h1 -> h2, wave 1.
    b.drag(".vm[data-vm=\"a\"]", ".host[data-host=\"h2\"]");
    b.wait_for("the proposed plan", LIMIT, |b| b.find("#plan-dialog[data-plan-status=\"proposed\"]"));
    let step = b.text("#plan-dialog tr[data-vm=\"a\"]").expect("a step for a");
    assert!(step.contains("h1 → h2"), "the plan's step: {step}");
    b.save("2-plan.png", &b.screenshot());
    assert_eq!(vms(&ctl).iter().find(|v| v.name == "a").and_then(|v| v.host.clone()).as_deref(), Some("h1"), "a dry run moves nothing");

    // Confirming runs it; the card shows the migration moving (two pictures differ).
    b.click("#plan-confirm");
    b.wait_for("the plan running", LIMIT, |b| b.find("#plan-dialog:not([data-plan-status=\"proposed\"])"));
    b.click("#plan-close");
    // A picture of the live figure, with the bytes sent it showed just before and just
    // after: the second picture is taken once the figure has passed the first's state.
    let live = ".vm[data-vm=\"a\"] .progress:not([hidden])";
    let sent = |b: &Browser| b.attr(live, "data-transferred").and_then(|t| t.parse::<u64>().ok()).filter(|t| *t > 0);
    let picture = |b: &Browser| {
        let from = sent(b)?;
        let png = b.element_screenshot(live)?;
        Some((from, sent(b)?, png))
    };
    let (_, first, before) = b.wait_for("a's migration under way", LIMIT, picture);
    b.save("3-migrating-a.png", &before);
    let (_, _, after) = b.wait_for("a's migration moving on", LIMIT, |b| picture(b).filter(|(from, _, _)| *from > first));
    b.save("3-migrating-b.png", &after);
    b.save("3-migrating.png", &b.screenshot());
    assert_ne!(before, after, "the progress figure did not move");

    // The API says a runs on h2; its card lands there with the hop's downtime.
    let start = std::time::Instant::now();
    let hop = loop {
        let done = migrations(&ctl).into_iter().find(|m| m.vm == "a" && m.phase == Phase::Completed);
        let at = vms(&ctl).into_iter().find(|v| v.name == "a").and_then(|v| v.host);
        match done {
            Some(m) if at.as_deref() == Some("h2") => break m,
            _ => assert!(start.elapsed() < LIMIT, "a never reached h2: {:?}", migrations(&ctl)),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let downtime = hop.downtime_ms.expect("the hop's downtime").to_string();
    b.wait_for("a's card on h2", LIMIT, |b| (column_of(b, "a")? == "h2").then_some(()));
    let shown = b.wait_for("the hop's downtime on a's card", LIMIT, |b| {
        b.attr(".host[data-host=\"h2\"] .vm[data-vm=\"a\"] .downtime", "data-downtime-ms")
    });
    assert_eq!(shown, downtime, "the card shows the hop's downtime as the API reports it");
    let line = b.text(".vm[data-vm=\"a\"] .downtime").unwrap_or_default();
    assert!(line.contains("downtime") && line.contains("ms"), "{line}");
    b.save("4-landed.png", &b.screenshot());

    // A drain from the page (its plan shown first) empties h2.
    b.click(".host[data-host=\"h2\"] button.drain");
    b.wait_for("the drain's plan", LIMIT, |b| b.find("#plan-dialog[data-plan-status=\"proposed\"] tr[data-vm=\"a\"]"));
    b.click("#plan-confirm");
    let start = std::time::Instant::now();
    loop {
        let h = ctl.host("h2");
        if h.maintenance == Maintenance::Drained && h.vms.is_empty() {
            break;
        }
        assert!(start.elapsed() < LIMIT, "h2 was not drained: {h:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    b.wait_for("the drain's plan completed", LIMIT, |b| b.find("#plan-dialog[data-plan-status=\"completed\"]"));
    b.click("#plan-close");
    b.wait_for("h2 drained and empty", LIMIT, |b| {
        (b.find(".host[data-host=\"h2\"][data-maintenance=\"drained\"]").is_some()
            && b.find_all(".host[data-host=\"h2\"] .vm[data-vm]").is_empty())
        .then_some(())
    });
    b.wait_for("a back on h1", LIMIT, |b| (column_of(b, "a")? == "h1").then_some(()));
    b.save("5-drained.png", &b.screenshot());

    // Draining h1 too is impossible (h2 is out of service): the page says why, per VM,
    // and h1 is left as it was.
    b.click(".host[data-host=\"h1\"] button.drain");
    b.wait_for("the impossible drain", LIMIT, |b| b.find("#plan-dialog[data-plan-status=\"impossible\"]"));
    for vm in ["a", "b"] {
        let why = b.text(&format!("#plan-dialog .blocked li[data-vm=\"{vm}\"]")).unwrap_or_default();
        assert!(why.contains(vm) && why.contains("needs"), "no reason shown for {vm}: {why:?}");
    }
    assert!(b.find("#plan-confirm:not([hidden])").is_none(), "an impossible plan cannot be run");
    b.save("6-impossible.png", &b.screenshot());
    assert_eq!(ctl.host("h1").maintenance, Maintenance::Active);
    assert_eq!(ctl.host("h1").vms.len(), 2);

    // And no script of the page failed on the way.
    assert_eq!(b.script_errors(), Vec::<String>::new(), "the page's scripts failed");
    b.click("#plan-close");

    // A viewer's session sees the cluster; its drain and its drag are refused with the
    // reason, and nothing changes.
    let viewer: ConsoleLogin = ctl.cli_as(&["console-url", "--role", "viewer"]);
    b.goto(&viewer.url);
    b.wait_for("a's card for the viewer", LIMIT, |b| (column_of(b, "a")? == "h1").then_some(()));
    b.click(".host[data-host=\"h1\"] button.drain");
    let refused = b.wait_for("the viewer's drain refused", LIMIT, |b| b.text("#plan-dialog[data-plan-status=\"refused\"] p.error"));
    assert!(refused.contains("(viewer) may only read"), "the viewer's drain: {refused}");
    b.save("7-viewer-drain.png", &b.screenshot());
    b.click("#plan-close");
    b.drag(".vm[data-vm=\"b\"]", ".host[data-host=\"h2\"]");
    let refused = b.wait_for("the viewer's drag refused", LIMIT, |b| b.text("#plan-dialog[data-plan-status=\"refused\"] p.error"));
    assert!(refused.contains("(viewer) may only read") && refused.contains("POST /v1/plans"), "the viewer's drag: {refused}");
    b.save("8-viewer-drag.png", &b.screenshot());
    assert_eq!(ctl.host("h1").maintenance, Maintenance::Active);
    assert_eq!(ctl.host("h1").vms.len(), 2);

    // Protection from the page: the viewer's click is refused with the reason; an
    // operator's protects b toward h2 (back in service), and b's card shows the replica
    // and the checkpoints shipped to it as they come.
    b.click("#plan-close");
    b.click(".vm[data-vm=\"b\"] button.protect");
    let refused = b.wait_for("the viewer's protect refused", LIMIT, |b| b.text("#notice:not([hidden])"));
    assert!(refused.contains("(viewer) may only read"), "the viewer's protect: {refused}");
    assert!(vms(&ctl).iter().all(|v| v.protection.is_none()), "a viewer protected a VM");
    b.click("#notice");
    b.click("#sy-start");
    let refused = b.wait_for("the viewer's game refused", LIMIT, |b| {
        b.text("#notice:not([hidden])").filter(|t| t.contains("POST /v1/games/scotland-yard"))
    });
    assert!(refused.contains("(viewer) may only read"), "the viewer's game: {refused}");
    assert!(walks(&ctl).is_empty(), "a viewer started a game");
    ctl.cli(&["host", "undrain", "h2"]);
    let operator: ConsoleLogin = ctl.cli_as(&["console-url"]);
    b.goto(&operator.url);
    b.wait_for("b's protect button", LIMIT, |b| b.find(".vm[data-vm=\"b\"] button.protect"));
    b.click(".vm[data-vm=\"b\"] button.protect");
    let line = b.wait_for("b's first checkpoint shipped to its replica", LIMIT, |b| {
        b.text(".vm[data-vm=\"b\"] .replica").filter(|t| t.contains("checkpoint ") && !t.contains("no checkpoint"))
    });
    assert!(line.contains("replica h2"), "b's protection line: {line}");
    let p = vms(&ctl).into_iter().find(|v| v.name == "b").and_then(|v| v.protection).expect("b is protected");
    assert_eq!(p.replica, "h2");
    b.save("9-protected.png", &b.screenshot());
    assert_eq!(b.script_errors(), Vec::<String>::new(), "the page's scripts failed");

    // The games: b unprotected first (no checkpoints beside the game).
    ctl.call(|c| async move { c.unprotect_vm("b").await }).expect("b unprotected");
    scotland_yard_from_the_page(&b, &ctl);
}

fn walks(ctl: &ControllerProc) -> Vec<WalkRecord> {
    ctl.call(|c| async move { c.walks().await }).expect("the controller's walks")
}

/// The Games panel: the Towers of Hanoi's plan as the controller makes it; a game of
/// Scotland Yard started with clicks (Mr X a bot, the detective played from the page),
/// its board, Mr X's first move completed on the page and in the API, the player's
/// legal moves offered, and the game stopped: ended, nothing left migrating, every VM
/// running. A third host joins so that Mr X has somewhere to go.
fn scotland_yard_from_the_page(b: &Browser, ctl: &ControllerProc) {
    // The Hanoi button shows the planner's moves for 3 levels, as the API plans them.
    b.click("#hanoi-start");
    let plan: HanoiPlan = ctl.call(|c| async move { c.hanoi_plan(3).await }).expect("the Hanoi plan");
    b.wait_for("the Hanoi plan", LIMIT, |b| (b.find_all("#hanoi-steps li[data-step]").len() == plan.steps.len()).then_some(()));
    for s in &plan.steps {
        let line = b.text(&format!("#hanoi-steps li[data-step=\"{}\"]", s.number)).unwrap_or_default();
        assert!(line.contains(&s.vm) && line.contains(&s.from) && line.contains(&s.to), "step {}: {line} for {s:?}", s.number);
    }
    assert_eq!(plan.steps.len(), 7);

    // h3 joins; b goes there, so Mr X (a,
    // on h1) and the detective (b) start on hosts of their own.
    let h3 = AgentProc::start(&["--capacity", "512M"]);
    let url = h3.url.clone();
    ctl.call(|c| async move { c.add_host(&AddHost { url, name: Some("h3".into()) }).await }).expect("h3 added");
    b.wait_for("h3 on the page", LIMIT, |b| b.find(".host[data-host=\"h3\"]"));
    let mv = ctl.call(|c| async move { c.move_vm("b", "h3").await }).expect("b's move");
    assert_eq!(ctl.wait_plan(&mv.id, LIMIT.as_secs()).status, PlanStatus::Completed);

    // Start: Mr X a (the first VM), detective b played from the page.
    b.wait_for("b among the detectives", LIMIT, |b| b.find(".sy-detective[value=\"b\"]:checked"));
    let mr_x = b.script("return document.getElementById('sy-mrx').value;", serde_json::json!([]));
    assert_eq!(mr_x.as_str(), Some("a"), "Mr X is the first VM by default");
    b.click("#sy-players");
    b.click("#sy-start");
    let id = b.wait_for("the game on the page", LIMIT, |b| b.attr("#sy-game[data-status=\"running\"]", "data-game"));
    let game = ctl.call(|c| {
        let id = id.clone();
        async move { c.walk(&id).await }
    });
    let game = game.expect("the game in the API");
    let sy = game.scotland.as_ref().expect("a game of Scotland Yard");
    assert_eq!((sy.mr_x.as_str(), sy.detectives.clone(), sy.players.clone()), ("a", vec!["b".to_string()], vec!["b".to_string()]));
    for l in &sy.links {
        b.wait_for(&format!("the {} link {}-{}", l.kind, l.a, l.b), LIMIT, |b| {
            b.find(&format!("#sy-game line.link.{}[data-link=\"{}-{}\"]", l.kind, l.a, l.b))
        });
    }

    // Mr X's first move completes: on the page (its host hidden while the game runs) and
    // in the API.
    let row = "#sy-game tr.move[data-vm=\"a\"][data-round=\"1\"][data-result=\"completed\"]";
    let text = b.wait_for("Mr X's first move", LIMIT, |b| b.text(row));
    assert!(text.contains("hidden"), "Mr X's host shows while the game runs: {text}");
    let w = ctl.call(|c| {
        let id = id.clone();
        async move { c.walk(&id).await }
    });
    let first = w.expect("the game").scotland.expect("the game").moves.first().cloned().expect("a move");
    assert_eq!((first.vm.as_str(), first.result.as_str(), first.to.as_deref()), ("a", "completed", None), "{first:?}");

    // The player's detective is offered exactly its legal moves: every host linked to h3.
    let offered = || {
        let js = "return [...document.querySelectorAll('#sy-picker button.dest[data-detective=\"b\"]')].map((e) => e.dataset.to);";
        let mut v: Vec<String> =
            b.script(js, serde_json::json!([])).as_array().into_iter().flatten().filter_map(|x| x.as_str().map(String::from)).collect();
        v.sort();
        v
    };
    let mut legal: Vec<String> = sy
        .links
        .iter()
        .filter_map(|l| {
            if l.a == "h3" {
                Some(l.b.clone())
            } else if l.b == "h3" {
                Some(l.a.clone())
            } else {
                None
            }
        })
        .collect();
    legal.sort();
    b.wait_for("the player's moves", LIMIT, |_| (offered() == legal).then_some(()));
    b.script("document.getElementById('sy-game').scrollIntoView({ block: 'center' });", serde_json::json!([]));
    b.save("10-scotland-yard.png", &b.screenshot());

    // Stop: the game ends stopped, nothing migrates any more, every VM runs.
    b.click("#sy-stop");
    let start = std::time::Instant::now();
    let ended = loop {
        let w = ctl.call(|c| {
            let id = id.clone();
            async move { c.walk(&id).await }
        });
        let w = w.expect("the game");
        if w.finished_ms.is_some() {
            break w;
        }
        assert!(start.elapsed() < LIMIT, "the game did not end after its stop: {w:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ended.status, WalkStatus::Stopped, "{ended:?}");
    assert!(ended.result.as_deref().is_some_and(|r| r.contains("stopped")), "{ended:?}");
    let sy = ended.scotland.as_ref().expect("the game");
    assert_eq!(sy.winner, None);
    let all = migrations(ctl);
    assert!(all.iter().all(|m| m.phase.is_final()), "a migration still runs after the stop: {all:?}");
    for m in &sy.moves {
        let id = m.migration.as_deref().expect("a played move's migration (shown once the game is over)");
        let rec = all.iter().find(|x| x.id == id).expect("the move's migration in the API");
        assert_eq!((rec.vm.as_str(), rec.phase, Some(rec.to.as_str())), (m.vm.as_str(), Phase::Completed, m.to.as_deref()), "{m:?}");
    }
    let running = vms(ctl);
    assert!(running.iter().all(|v| v.state == ClusterVmState::Running), "{running:?}");
    // The page shows the end, Mr X's move revealed with its hop's downtime.
    b.wait_for("the stopped game", LIMIT, |b| b.find("#sy-game[data-status=\"stopped\"]"));
    assert!(b.find("#sy-stop").is_none(), "a stopped game offers Stop");
    let hop = ended.hops.iter().find(|h| Some(&h.migration) == first_migration(sy).as_ref()).expect("Mr X's hop");
    let shown = b.wait_for("Mr X's move revealed", LIMIT, |b| b.text(row).filter(|t| !t.contains("hidden")));
    assert!(shown.contains(&format!("{} → {}", hop.from, hop.to)), "{shown} for {hop:?}");
    let down = b.attr(&format!("{row} td.downtime"), "data-downtime-ms").unwrap_or_default();
    assert_eq!(down, hop.downtime_ms.map(|d| d.to_string()).unwrap_or_default());
    b.script("document.getElementById('sy-game').scrollIntoView({ block: 'center' });", serde_json::json!([]));
    b.save("10-scotland-yard-stopped.png", &b.screenshot());
    assert_eq!(b.script_errors(), Vec::<String>::new(), "the page's scripts failed");
}

/// Mr X's first move's migration.
fn first_migration(sy: &ScotlandGame) -> Option<String> {
    sy.moves.iter().find(|m| m.side == Side::MrX).and_then(|m| m.migration.clone())
}
