//! The web console in a real headless Chromium (Debian's, through chromedriver) against
//! a real cluster on loopback: two agents, a controller serving the console, two small
//! real guests. The page lists what the API lists; Rebalance and Consolidate show their
//! dry runs (a plan, or why there is nothing to do) and change nothing; a VM card dragged
//! onto another host with real pointer input shows the `place` plan, and confirming it
//! moves the VM (the API says so) while its card shows the migration moving (phase,
//! pass, transfer rate, strategy and its reason, as the API has them), then lands with
//! the hop's downtime(s); a drain started from the page empties the host; the History
//! chart has a mark per completed migration with its duration and downtimes, and the
//! events table filters by VM and by host as one types (and says when nothing matches);
//! an impossible drain shows each VM's reason. The console's URL carries a one-time
//! login token: it logs the browser in once (a second use is refused); the events table
//! is filled at page load; a viewer's session (`walkabout console-url --role viewer`)
//! sees the cluster and its drags, drains and game start show the 403 reason. An
//! operator's session undrains a host from its button, starts a walk, stops it and
//! cancels its hop's migration from the card: cancelled, not retried, the VM still on
//! its source, nothing in flight. The Games panel shows the Towers
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
    Subject, WalkRecord, WalkStatus,
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

/// What the live migration figure on VM `vm`'s card shows, read in one script.
#[derive(Debug)]
struct Figure {
    migration: String,
    phase: String,
    pass: u64,
    /// The transfer rate it was given, bytes/s.
    rate: u64,
    /// Its head line: destination, phase, pass.
    head: String,
    /// Its rates, as shown.
    rates: String,
    /// The strategy's name, its reason as shown, and the whole reason (the tooltip).
    strategy: String,
    why: String,
    why_title: String,
}

fn live_figure(b: &Browser, vm: &str) -> Option<Figure> {
    let js = "const f = document.querySelector(`.vm[data-vm=\"${arguments[0]}\"] .progress:not([hidden])`); if (!f) return null; \
              const t = (css) => f.querySelector(css)?.innerText ?? ''; const why = f.querySelector('.strategy .why'); \
              return [f.dataset.migration ?? '', f.dataset.phase ?? '', f.dataset.pass ?? '0', f.dataset.rate ?? '0', t('.head'), t('.rates'), \
                      t('.strategy .tag'), why?.innerText ?? '', why?.getAttribute('title') ?? ''];";
    let v = b.script(js, serde_json::json!([vm]));
    let a: Vec<String> = v.as_array()?.iter().map(|x| x.as_str().unwrap_or_default().to_string()).collect();
    let [migration, phase, pass, rate, head, rates, strategy, why, why_title] = <[String; 9]>::try_from(a).ok()?;
    Some(Figure { migration, phase, pass: pass.parse().ok()?, rate: rate.parse().ok()?, head, rates, strategy, why, why_title })
}

/// Bytes/s from a rate as the page writes it (`12.0 MiB/s`).
fn read_rate(text: &str) -> Option<u64> {
    let (n, unit) = text.trim().strip_suffix("/s")?.split_once(' ')?;
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let n: f64 = n.parse().ok()?;
    // Whole bytes per second: the page's figure has at most four significant digits.
    Some((n * scale).round() as u64)
}

/// Whether `message` names `name` as a word of its own (as the events filter reads it).
fn names(message: &str, name: &str) -> bool {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    message.match_indices(name).any(|(i, _)| !word(message[..i].chars().next_back()) && !word(message[i + name.len()..].chars().next()))
}

/// The rows the events table shows: (seq, subject, name, sentence).
fn event_rows(b: &Browser) -> Vec<(u64, String, String, String)> {
    let js = "return [...document.querySelectorAll('#events tbody tr[data-seq]')].map((r) => [r.dataset.seq, r.dataset.subject, r.dataset.name, r.cells[3].innerText]);";
    let v = b.script(js, serde_json::json!([]));
    let s = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_string();
    v.as_array().into_iter().flatten().filter_map(|r| Some((s(&r[0]).parse().ok()?, s(&r[1]), s(&r[2]), s(&r[3])))).collect()
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

    // Rebalance and Consolidate from the top bar: each dry run shows its plan, or says
    // why there is nothing to do; closing it drops it, and nothing moved.
    let mut last = dry;
    for (button, goal) in [("#op-rebalance", "rebalance"), ("#op-consolidate", "consolidate")] {
        b.click(button);
        let id = b.wait_for(&format!("the {goal} dry run"), LIMIT, |b| {
            let id =
                b.attr("#plan-dialog[data-plan-status=\"proposed\"], #plan-dialog[data-plan-status=\"impossible\"]", "data-plan-id")?;
            (id != last && b.text("#plan-title")?.contains(goal)).then_some(id)
        });
        let p = ctl.plan(&id);
        let body = b.text("#plan-body").unwrap_or_default();
        if p.status == PlanStatus::Impossible {
            let why = p.reason.clone().unwrap_or_default();
            assert!(!why.is_empty() && body.contains(&why), "the impossible {goal} shows no reason: {body:?} for {p:?}");
        } else if p.steps.is_empty() {
            assert!(body.contains("Nothing to move"), "the empty {goal} plan shows no reason: {body:?}");
            assert!(b.find("#plan-confirm:not([hidden])").is_none(), "an empty {goal} plan offers to run");
        } else {
            for s in &p.steps {
                let row = b.text(&format!("#plan-dialog tr[data-vm=\"{}\"]", s.vm)).unwrap_or_default();
                assert!(row.contains(&format!("{} → {}", s.from, s.to)) && row.contains(&s.why), "{goal}'s step {s:?} shows {row:?}");
            }
        }
        b.save(&format!("2-{goal}.png"), &b.screenshot());
        b.click("#plan-close");
        if p.status == PlanStatus::Proposed {
            b.wait_for(&format!("the {goal} dry run dropped"), LIMIT, |_| (ctl.plan(&id).status == PlanStatus::Cancelled).then_some(()));
        }
        last = id;
    }
    let now: Vec<_> = vms(&ctl).into_iter().map(|v| (v.name, v.host)).collect();
    let was: Vec<_> = listed.iter().map(|v| (v.name.clone(), v.host.clone())).collect();
    assert_eq!(now, was, "a dry run moved a VM");
    assert!(migrations(&ctl).is_empty(), "a dry run started a migration: {:?}", migrations(&ctl));

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
    // What the figure says: the phase and pass, the transfer rate as people read it
    // (the rate it was given), and the strategy the source agent picked with its reason,
    // as the API reports them.
    let f = b.wait_for("a's figure with its pass, rate and strategy", LIMIT, |b| {
        live_figure(b, "a").filter(|f| f.pass >= 1 && f.rate > 0 && !f.strategy.is_empty())
    });
    assert!(["preparing", "running", "switchover"].contains(&f.phase.as_str()), "{f:?}");
    assert!(f.head.contains("→ h2") && f.head.contains(&format!("· {}", f.phase)) && f.head.contains(&format!("pass {}", f.pass)), "{f:?}");
    let shown_rate = f.rates.lines().nth(1).and_then(|l| l.split(" · ").next()).unwrap_or_default();
    let read = read_rate(shown_rate).unwrap_or_else(|| panic!("no transfer rate in the figure: {f:?}"));
    assert!(read.abs_diff(f.rate) * 20 <= f.rate, "the figure shows {shown_rate} for {} B/s", f.rate);
    let m = ctl.call(|c| {
        let id = f.migration.clone();
        async move { c.migration(&id).await }
    });
    let m = m.expect("the figure's migration in the API");
    let strategy = m.strategy.clone().expect("the API's strategy for a's migration");
    assert_eq!((m.vm.as_str(), m.to.as_str()), ("a", "h2"), "{m:?}");
    assert_eq!((f.strategy.as_str(), f.why_title.as_str()), (strategy.name.as_str(), strategy.reason.as_str()), "{f:?}");
    assert!(!f.why.is_empty() && strategy.reason.starts_with(f.why.trim_end_matches('…')), "the figure's reason {f:?} for {strategy:?}");
    assert!(m.progress.iteration >= f.pass, "the figure is ahead of the API: {f:?} {m:?}");
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
    // Any other downtime the API has for the hop (the observed one, with a probe) is
    // shown beside QEMU's, and none that it lacks; so are the strategy's switches.
    let observed = b.attr(".vm[data-vm=\"a\"] .downtime [data-kind=\"observed\"]", "data-ms");
    assert_eq!(observed, hop.observed_downtime_ms.map(|d| d.to_string()), "the observed downtime on a's card");
    let switched = b.text(".vm[data-vm=\"a\"] .switched").unwrap_or_default();
    for sw in &hop.switches {
        assert!(switched.contains(&sw.to), "a's card does not show the switch to {}: {switched:?}", sw.to);
    }
    assert_eq!(hop.switches.is_empty(), switched.is_empty(), "{switched:?} for {:?}", hop.switches);
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

    // History: the migrations chart has a mark for every migration the API lists as
    // completed, with its duration and its downtimes.
    let done: Vec<ClusterMigration> = migrations(&ctl).into_iter().filter(|m| m.phase == Phase::Completed).collect();
    assert!(done.len() >= 2, "a's two hops: {done:?}");
    for m in &done {
        let mark = format!("#chart g.mig.completed[data-migration=\"{}\"]", m.id);
        let total = m.total_ms.or_else(|| m.finished_ms.map(|f| f - m.started_ms)).map(|t| t.to_string());
        let qemu = m.downtime_ms.map(|d| d.to_string());
        let observed = m.observed_downtime_ms.map(|d| d.to_string());
        let what = format!("{}'s mark on the chart ({total:?} ms, downtime {qemu:?}, observed {observed:?})", m.id);
        b.wait_for(&what, LIMIT, |b| {
            let shown = (b.attr(&mark, "data-total-ms"), b.attr(&format!("{mark} circle.qemu"), "data-ms"));
            (shown == (total.clone(), qemu.clone()) && b.attr(&format!("{mark} circle.observed"), "data-ms") == observed).then_some(())
        });
    }
    assert_eq!(b.find_all("#chart g.mig.completed").len(), done.len(), "the chart shows completed migrations the API does not list");

    // The events table, filtered by typing a VM, then a host: only their events remain
    // (theirs, or naming them), the newest of them among them; a filter nothing
    // matches says so.
    let everything = event_rows(&b);
    let recent = ctl.call(|c| async move { c.recent_events(500).await }).expect("the recent events");
    for (filter, subject, name) in [("vm b", Subject::Vm, "b"), ("host h1", Subject::Host, "h1")] {
        let kind = serde_json::to_value(subject).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let about = |(_, s, n, msg): &(u64, String, String, String)| (*s == kind && n == name) || names(msg, name);
        assert!(everything.iter().any(|r| !about(r)), "every event is about {filter}: nothing to filter out");
        b.type_into("#event-filter", filter);
        let newest =
            recent.iter().rev().find(|e| e.subject == subject && e.name == name).unwrap_or_else(|| panic!("no event about {filter}"));
        b.wait_for(&format!("{filter}'s newest event, filtered"), LIMIT, |b| b.find(&format!("#events tr[data-seq=\"{}\"]", newest.seq)));
        let rows = event_rows(&b);
        let stray: Vec<_> = rows.iter().filter(|r| !about(r)).collect();
        assert!(stray.is_empty(), "the filter {filter:?} left events about something else: {stray:?}");
        assert!(rows.len() < everything.len() || everything.len() >= 100, "{filter:?} filtered nothing out");
        b.save(&format!("5-events-{name}.png"), &b.element_screenshot("#events").unwrap_or_default());
    }
    b.type_into("#event-filter", "no-such-vm");
    let none = b.wait_for("the filter's empty state", LIMIT, |b| b.text("#events tr.empty[data-empty=\"filtered\"]"));
    assert!(none.contains("no events") && none.contains("no-such-vm"), "{none:?}");
    assert!(event_rows(&b).is_empty());
    b.type_into("#event-filter", "");
    b.wait_for("every event again", LIMIT, |b| (event_rows(b).len() >= everything.len()).then_some(()));
    // Typing scrolled the table into view: back to the board, under the top bar.
    b.script("window.scrollTo(0, 0);", serde_json::json!([]));

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

    // An operator's session: h2's Undrain button puts it back in service.
    let operator: ConsoleLogin = ctl.cli_as(&["console-url"]);
    b.goto(&operator.url);
    b.wait_for("h2's undrain button", LIMIT, |b| b.find(".host[data-host=\"h2\"] button.undrain:not([hidden])"));
    b.click(".host[data-host=\"h2\"] button.undrain");
    let start = std::time::Instant::now();
    while ctl.host("h2").maintenance != Maintenance::Active {
        assert!(start.elapsed() < LIMIT, "h2 was not undrained: {:?}", ctl.host("h2"));
        std::thread::sleep(Duration::from_millis(200));
    }
    b.wait_for("h2 in service on the page", LIMIT, |b| b.find(".host[data-host=\"h2\"][data-maintenance=\"active\"]"));

    // A walk started from the page runs; its first hop (a or b to h2, the only host with
    // room) is under way when the page stops the walk and cancels the hop's migration
    // from the card: the migration ends cancelled, not retried, its VM running on h1;
    // the walk ends stopped with nothing in flight and every VM running.
    let before: Vec<String> = migrations(&ctl).into_iter().map(|m| m.id).collect();
    b.click("#op-walk");
    let walk = b.wait_for("the walk on the page", LIMIT, |b| b.attr("#activity li[data-walk]", "data-walk"));
    let w = ctl.call(|c| {
        let id = walk.clone();
        async move { c.walk(&id).await }
    });
    assert_eq!(w.expect("the page's walk in the API").status, WalkStatus::Running);
    let hopping = "return [...document.querySelectorAll('.vm .progress:not([hidden])[data-phase=\"running\"]')].filter((f) => Number(f.dataset.transferred) > 0).map((f) => [f.closest('.vm').dataset.vm, f.dataset.migration])[0] ?? null;";
    let (vm, mid) = b.wait_for("the walk's first hop under way", LIMIT, |b| {
        let v = b.script(hopping, serde_json::json!([]));
        Some((v[0].as_str()?.to_string(), v[1].as_str()?.to_string()))
    });
    b.click(&format!("#activity li[data-walk=\"{walk}\"] button"));
    b.click(&format!(".vm[data-vm=\"{vm}\"] .progress button.cancel"));
    let start = std::time::Instant::now();
    let ended = loop {
        let w = ctl.call(|c| {
            let id = walk.clone();
            async move { c.walk(&id).await }
        });
        let w = w.expect("the walk");
        if w.finished_ms.is_some() {
            break w;
        }
        assert!(start.elapsed() < LIMIT, "the walk did not end after its stop: {w:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ended.status, WalkStatus::Stopped, "{ended:?}");
    assert!(ended.result.as_deref().is_some_and(|r| r.starts_with("stopped after")), "{ended:?}");
    let walked: Vec<_> = ended.hops.iter().map(|h| (h.migration.as_str(), h.result)).collect();
    assert_eq!(walked, [(mid.as_str(), Phase::Cancelled)], "the walk's hops: {ended:?}");
    let all = migrations(&ctl);
    let cancelled = all.iter().find(|m| m.id == mid).expect("the hop's migration in the API");
    assert_eq!((cancelled.phase, cancelled.from.as_str(), cancelled.to.as_str()), (Phase::Cancelled, "h1", "h2"), "{cancelled:?}");
    let hops: Vec<_> = all.iter().filter(|m| !before.contains(&m.id)).map(|m| (m.vm.as_str(), m.phase)).collect();
    assert_eq!(hops, [(vm.as_str(), Phase::Cancelled)], "the walk's hops: one, cancelled and not retried");
    assert!(all.iter().all(|m| m.phase.is_final()), "a migration still runs after the walk: {all:?}");
    let start = std::time::Instant::now();
    loop {
        let now = vms(&ctl);
        if now.iter().all(|v| v.state == ClusterVmState::Running && v.host.as_deref() == Some("h1")) {
            break;
        }
        assert!(start.elapsed() < LIMIT, "not every VM runs on h1 after the cancel: {now:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let hop =
        b.wait_for("the cancelled hop on the card", LIMIT, |b| b.text(&format!(".vm[data-vm=\"{vm}\"] .hop[data-result=\"cancelled\"]")));
    assert!(hop.contains("h1 → h2"), "{hop:?}");
    let li = format!("#activity li[data-walk=\"{walk}\"]");
    b.wait_for("the walk stopped on the page", LIMIT, |b| {
        b.text(&li).filter(|t| t.contains("· stopped ·") && b.find(&format!("{li} button")).is_none())
    });
    b.save("8-walk-stopped-hop-cancelled.png", &b.screenshot());
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
