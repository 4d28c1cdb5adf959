//! The cluster with real agents and real guests: a controller drains a host in a safe
//! order within its limits, survives its own restart mid-plan, reports the VMs of an
//! agent killed mid-plan instead of hanging, refuses impossible drains up front; drains
//! beside a running walk empty their host; and `walkabout up` protects its guests, shows
//! each checkpoint shipped (after TLS hops too) and leaves nothing behind after Ctrl-C.

mod common;

use common::{assert_healthy, now_ms, AgentProc, ControllerProc};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};
use walkabout_api::{
    ErrorBody, ErrorKind, Host, HostStatus, Maintenance, Phase, PlanRecord, PlanStatus, Step, StepStatus, VmInfo, VmState,
};
use walkabout_testbed::UpSession;

/// Slow enough to interrupt a migration: a 256 MiB guest takes seconds at this cap.
const SLOW: &[&str] = &["--max-bandwidth", "24M"];

/// Three hosts where the drain of h1 (three 256 MiB guests) is tight: h2 (640 MiB)
/// has the most room, and sending all three there — the naive choice — would overfill
/// it (768 > 640); h3 takes at most two.
fn tight_cluster(workload: &str) -> (AgentProc, AgentProc, AgentProc) {
    let h1 = AgentProc::start(&["--capacity", "768M"]);
    let h2 = AgentProc::start(&["--capacity", "640M"]);
    let h3 = AgentProc::start(&["--capacity", "512M"]);
    for vm in ["a", "b", "c"] {
        h1.create(&["--name", vm, "--memory", "256M", "--workload", workload]);
    }
    (h1, h2, h3)
}

/// The plan's steps.
fn steps(plan: &PlanRecord) -> Vec<Step> {
    plan.steps.clone()
}

/// Asserts no two steps out of (or into) one host overlapped in time.
fn assert_one_at_a_time_per_host(plan: &PlanRecord) {
    let done: Vec<Step> = steps(plan).into_iter().filter(|s| s.status == StepStatus::Completed).collect();
    for (i, x) in done.iter().enumerate() {
        for y in &done[i + 1..] {
            let shared = x.from == y.from || x.to == y.to;
            let (xs, xe) = (x.started_ms.unwrap_or(0), x.finished_ms.unwrap_or(u64::MAX));
            let (ys, ye) = (y.started_ms.unwrap_or(0), y.finished_ms.unwrap_or(u64::MAX));
            assert!(!shared || xe <= ys || ye <= xs, "steps overlap on a host: {x:?} {y:?}");
        }
    }
}

/// Agent migrations of every VM, over all agents: (vm, phase).
fn agent_migrations(agents: &[&AgentProc]) -> Vec<(String, Phase)> {
    agents.iter().flat_map(|a| a.migrations()).map(|m| (m.vm, m.phase)).collect()
}

/// The agent among `agents` that runs `vm`.
fn home<'a>(agents: &[&'a AgentProc], vm: &str) -> &'a AgentProc {
    agents.iter().copied().find(|a| a.try_info(vm).is_some()).unwrap_or_else(|| panic!("no agent runs {vm}: lost"))
}

fn assert_still_healthy(a: &AgentProc, vm: &str) {
    let seen = a.info(vm).guest.heartbeats;
    let v = a.wait_heartbeats(vm, seen + 5);
    assert_eq!(v.record.state, VmState::Running, "{v:?}");
    assert_healthy(&v);
}

#[test]
fn a_drain_of_three_dirtying_guests_fits_a_tight_cluster_one_migration_per_host_at_a_time() {
    let (h1, h2, h3) = tight_cluster("dirty:64:32");
    let ctl = ControllerProc::start(&[&h1, &h2, &h3], &[]);
    ctl.wait_vms(3);
    assert!(3 * 256 > ctl.host("h2").capacity_mib, "the naive all-to-h2 order must overfill h2");

    let plan: PlanRecord = ctl.cli_as(&["host", "drain", "h1"]);

    assert_eq!(plan.status, PlanStatus::Completed, "{plan:?}");
    assert_eq!(plan.round, 0, "no retry or re-plan was needed: {plan:?}");
    assert_eq!(steps(&plan).len(), 3, "{plan:?}");
    assert!(steps(&plan).iter().all(|s| !s.why.is_empty()), "every migration has its reason: {plan:?}");
    assert_one_at_a_time_per_host(&plan);
    let stored = ctl.plan(&plan.id);
    assert_eq!((stored.status, &stored.steps), (plan.status, &plan.steps), "the controller's record is what the CLI printed");
    assert_eq!(ctl.host("h1").maintenance, Maintenance::Drained);
    assert!(h1.qemu_pids().is_empty(), "QEMU left on the drained host");
    let on_h2 = ["a", "b", "c"].iter().filter(|vm| h2.try_info(vm).is_some()).count();
    assert!(on_h2 <= 2, "h2 overfilled");
    for vm in ["a", "b", "c"] {
        assert_still_healthy(home(&[&h2, &h3], vm), vm);
    }
}

#[test]
fn a_controller_restarted_mid_plan_resumes_it_runs_no_migration_twice_and_loses_no_vm() {
    let (h1, h2, h3) = tight_cluster("dirty:64:4");
    let mut ctl = ControllerProc::start(&[&h1, &h2, &h3], SLOW);
    ctl.wait_vms(3);
    let id = ctl.json_as::<PlanRecord>(&["host", "drain", "h1", "--no-wait"]).id;
    ctl.wait_running_step(&id);

    ctl.kill();
    std::thread::sleep(Duration::from_secs(1));
    ctl.restart().expect("restart the controller");
    let plan = ctl.wait_plan(&id, 120);

    assert_eq!(plan.status, PlanStatus::Completed, "{plan:?}\n{}", ctl.log());
    assert!(ctl.log().contains("resumes after a controller restart"), "{}", ctl.log());
    let migs = agent_migrations(&[&h1, &h2, &h3]);
    assert_eq!(migs.len(), 3, "each VM migrated exactly once: {migs:?}");
    for vm in ["a", "b", "c"] {
        assert_eq!(migs.iter().filter(|(v, p)| v == vm && *p == Phase::Completed).count(), 1, "{vm}: {migs:?}");
        assert_still_healthy(home(&[&h2, &h3], vm), vm);
    }
}

#[test]
fn an_agent_killed_during_a_plan_is_marked_down_within_seconds_and_the_plan_reports_its_vms() {
    let (h1, mut h2, mut h3) = tight_cluster("dirty:64:4");
    let ctl = ControllerProc::start(&[&h1, &h2, &h3], SLOW);
    ctl.wait_vms(3);
    let id = ctl.json_as::<PlanRecord>(&["host", "drain", "h1", "--no-wait"]).id;
    let step = ctl.wait_running_step(&id);
    let victim = step.to.clone();

    let killed_at = now_ms();
    if victim == "h2" {
        h2.kill()
    } else {
        h3.kill()
    }
    let start = Instant::now();
    while ctl.host(&victim).status != HostStatus::Down {
        assert!(start.elapsed() < Duration::from_secs(10), "{victim} not marked down: {:?}", ctl.host(&victim));
        std::thread::sleep(Duration::from_millis(200));
    }
    let host = ctl.host(&victim);
    let plan = ctl.wait_plan(&id, 90);

    assert!(host.status_since_ms >= killed_at && host.status_since_ms - killed_at < 5_000, "{host:?}");
    assert!(!host.down_reason.as_deref().unwrap_or("").is_empty(), "{host:?}");
    assert_eq!(plan.status, PlanStatus::Failed, "{plan:?}");
    assert!(!plan.problems.is_empty(), "the plan names the VMs it could not move: {plan:?}");
    assert!(plan.problems.iter().all(|p| !p.vm.is_empty() && !p.reason.is_empty()), "{plan:?}");
    assert!(steps(&plan).iter().filter(|s| s.round != 0).all(|s| s.to != victim), "a re-plan picked the dead host: {plan:?}");
    let finished = plan.finished_ms.unwrap_or(u64::MAX);
    assert!(finished >= killed_at && finished - killed_at < 60_000, "the plan hung: {plan:?}");
    let dead_url = if victim == "h2" { h2.url.clone() } else { h3.url.clone() };
    let alive: Vec<&AgentProc> = [&h1, &h2, &h3].into_iter().filter(|a| a.url != dead_url).collect();
    for vm in ["a", "b", "c"] {
        if let Some(a) = alive.iter().find(|a| a.try_info(vm).is_some()) {
            assert_still_healthy(a, vm);
        }
    }
}

#[test]
fn an_impossible_drain_is_refused_up_front_with_each_vm_and_why() {
    let h1 = AgentProc::start(&["--capacity", "768M"]);
    let h2 = AgentProc::start(&["--capacity", "256M"]);
    for vm in ["a", "b"] {
        h1.create(&["--name", vm, "--memory", "256M", "--workload", "idle"]);
    }
    let ctl = ControllerProc::start(&[&h1, &h2], &[]);
    ctl.wait_vms(2);

    let out = ctl.run(&["host", "drain", "h1", "--output", "json"]);

    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let refusal: ErrorBody =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not an ErrorBody ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(refusal.kind, ErrorKind::Impossible, "{refusal:?}");
    assert_eq!(refusal.blocked.len(), 1, "{refusal:?}");
    assert!(refusal.blocked[0].why.contains("256 MiB"), "{refusal:?}");
    assert!(refusal.error.contains("cannot drain h1"), "{refusal:?}");
    assert_eq!(ctl.host("h1").maintenance, Maintenance::Active);
    assert!(agent_migrations(&[&h1]).is_empty(), "nothing moved");
    let text = ctl.run(&["host", "drain", "h1"]);
    assert!(String::from_utf8_lossy(&text.stderr).contains("needs 256 MiB"), "{}", String::from_utf8_lossy(&text.stderr));
}

#[test]
fn walkabout_up_walks_disk_backed_guests_and_leaves_no_process_behind_after_ctrl_c() {
    common::guest_image();
    // Two disk-backed guests with a light workload (memory and data disk): with four,
    // on a machine loaded by other builds (load 14-23), a hop out of the host holding
    // two of them ran out of its pre-copy budget (sending 0-3 MiB/s) in 3 runs of 3.
    let args = ["--accel", "tcg", "--pause", "1s", "--guests", "2", "--workload", "dirty:16:4,disk:8:1"];
    let mut up = UpSession::start(common::bin().as_ref(), 3, &args, None).expect("start walkabout up");
    let mut seen = vec![];
    let start = Instant::now();
    // Two hops (each guest has moved over mutual TLS), then a checkpoint shipped after
    // them: a checkpoint of a VM whose last migration was a TLS one (QEMU refuses a
    // mapped-ram checkpoint while the migration's TLS parameters are still set).
    let shipped = |l: &String| l.starts_with("checkpoint ") && l.contains(" is on its replica ");
    let after_hops = |seen: &[String]| seen.iter().skip_while(|l| !l.starts_with("hop 2:")).any(shipped);
    while !after_hops(&seen) {
        assert!(start.elapsed() < Duration::from_secs(300), "no hops, or no checkpoint shipped after them, from walkabout up: {seen:#?}");
        seen.extend(up.line(Duration::from_secs(1)));
    }

    assert!(up.interrupt(), "could not send Ctrl-C to walkabout up");
    let status = up.wait(Duration::from_secs(60)).expect("walkabout up did not stop after Ctrl-C");
    while let Some(line) = up.line(Duration::from_millis(200)) {
        seen.push(line);
    }

    assert!(status.success(), "{status}: {seen:#?}");
    assert!(
        seen[0].starts_with("web console") && seen[0].contains("/login?token="),
        "the console's URL with a login token first: {seen:#?}"
    );
    assert_eq!(seen.iter().filter(|l| l.starts_with("booted g")).count(), 2, "{seen:#?}");
    assert!(seen.iter().any(|l| l.contains("/metrics")), "{seen:#?}");
    // `up` protects its guests and shows each checkpoint shipped to its replica.
    assert_eq!(seen.iter().filter(|l| l.starts_with("protected g") && l.contains("a checkpoint every")).count(), 2, "{seen:#?}");
    assert!(seen.iter().filter(|l| shipped(l)).all(|l| l.contains("shipped; guest paused")), "{seen:#?}");
    assert!(!seen.iter().any(|l| l.contains("checkpoint") && l.contains("failed")), "a checkpoint failed: {seen:#?}");
    // Disk-backed guests: each hop moved their disks (hosts on one machine share the
    // image files: `auto` is shared) and their data disks verified clean.
    assert!(seen.iter().any(|l| l.starts_with("booted g") && l.contains("root disk image:guest")), "{seen:#?}");
    // A hop may fail while a checkpoint is written and shipped on the same host (seen:
    // pre-copy at 3 MiB/s missed its budget): then the VM stays on its source. Every hop
    // that completed moved by shared storage with its guest whole.
    let hops: Vec<&String> = seen.iter().filter(|l| l.starts_with("hop ")).collect();
    assert!(hops.iter().filter(|l| l.contains("completed")).count() >= 2, "{seen:#?}");
    assert!(
        hops.iter().all(|l| (l.contains("completed")
            && l.contains("storage shared, disk 0 MiB")
            && l.contains("0 breaks, 0 corrupt pages, 0 corrupt blocks"))
            || (l.contains("failed") && l.contains("the VM stays on its source"))),
        "{seen:#?}"
    );
    assert_eq!(up.leftovers(), Vec::<i64>::new(), "processes left behind");
    assert!(!up.root.exists(), "data left behind");
}

/// `walkabout up` with four 256 MiB guests on three hosts of 1 GiB, walking; returns
/// once the walk has made its first hop, with the controller's URL and each host's agent
/// URL (as `up` printed them). The guests are diskless and unprotected: these tests are
/// about the controller's plans, kernel-and-initramfs guests boot fastest, and
/// checkpoints beside the drains made an agent too slow to answer on two busy cores.
fn up_walking() -> (UpSession, String, BTreeMap<String, String>) {
    common::guest_image();
    let args = [
        "--accel",
        "tcg",
        "--memory",
        "256M",
        "--capacity",
        "1G",
        "--workload",
        "dirty:16:4",
        "--pause",
        "1s",
        "--diskless",
        "--unprotected",
    ];
    let up = UpSession::start(common::bin().as_ref(), 3, &args, None).expect("start walkabout up");
    let start = Instant::now();
    let mut seen = vec![];
    while !seen.iter().any(|l: &String| l.starts_with("hop 1:")) {
        assert!(start.elapsed() < Duration::from_secs(240), "no hop from walkabout up: {seen:#?}");
        seen.extend(up.line(Duration::from_secs(1)));
    }
    // "  host h1 at http://127.0.0.1:P (metrics http://127.0.0.1:P/metrics)"
    let agents = seen
        .iter()
        .filter_map(|l| l.trim_start().strip_prefix("host ")?.split_once(" at "))
        .filter_map(|(name, rest)| Some((name.to_string(), rest.split_whitespace().next()?.to_string())))
        .collect();
    let url = up.api_url.clone();
    (up, url, agents)
}

/// `walkabout ARGS --controller URL --output json` read as `T`, whatever its exit
/// status, and that status.
fn ctl_json<T: DeserializeOwned>(url: &str, args: &[&str]) -> (T, Option<i32>) {
    let out = Command::new(common::bin())
        .args(args)
        .args(["--controller", url, "--output", "json"])
        .env("WALKABOUT_LOG", "warn")
        .output()
        .expect("run walkabout");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("walkabout {args:?}: bad JSON ({e}): {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (v, out.status.code())
}

/// Every host, as the controller's CLI lists them.
fn hosts(url: &str) -> Vec<Host> {
    ctl_json::<Vec<Host>>(url, &["host", "list"]).0
}

/// The host running the most VMs, as the controller sees it.
fn fullest(url: &str) -> Host {
    hosts(url).into_iter().max_by_key(|h| h.vms.len()).expect("hosts")
}

/// The VMs the agent of host `name` runs (asked of the agent itself).
fn agent_vms(agents: &BTreeMap<String, String>, name: &str) -> Vec<String> {
    let url = agents.get(name).unwrap_or_else(|| panic!("no agent URL for {name} in {agents:?}"));
    let out = Command::new(common::bin())
        .args(["vm", "list", "--agent", url, "--output", "json"])
        .env("WALKABOUT_LOG", "warn")
        .output()
        .expect("run walkabout");
    assert!(out.status.success(), "vm list on {name}: {}", String::from_utf8_lossy(&out.stderr));
    let vms: Vec<VmInfo> = serde_json::from_slice(&out.stdout).expect("VM list");
    vms.into_iter().map(|v| v.record.spec.name).collect()
}

/// Drains `host` through the CLI and checks it ends drained and stays empty while the
/// walk goes on.
fn assert_drains_and_stays_empty(url: &str, agents: &BTreeMap<String, String>, host: &str) -> PlanRecord {
    let (plan, code) = ctl_json::<PlanRecord>(url, &["host", "drain", host]);

    assert_eq!(code, Some(0), "{plan:?}");
    assert_eq!(plan.status, PlanStatus::Completed, "{plan:?}");
    let h = hosts(url).into_iter().find(|x| x.name == host).expect("host");
    let events = || common::last_events(url, 80);
    assert_eq!(h.maintenance, Maintenance::Drained, "{h:?}\n{plan:#?}\n{}", events());
    assert!(h.vms.is_empty(), "{h:?}\n{plan:#?}\n{}", events());
    assert_eq!(agent_vms(agents, host), Vec::<String>::new(), "{host}'s agent still runs VMs");
    // The walk goes on; nothing lands on the drained host afterwards.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(agent_vms(agents, host), Vec::<String>::new(), "a VM landed on {host} after its drain");
    plan
}

/// One `up` session (booting four guests costs more than each check): a drain of the
/// fullest host completes beside the walk and nothing lands there afterwards; once it is
/// back in service, a drain started while a migration into the host is in flight takes
/// that VM out too.
#[test]
fn with_a_walk_running_drains_empty_their_host_even_of_a_vm_migrating_into_it() {
    let (_up, url, agents) = up_walking();
    let host = fullest(&url);
    assert!(host.vms.len() >= 2, "{host:?}");

    let plan = assert_drains_and_stays_empty(&url, &agents, &host.name);

    // No step ran into the walk's own migration of its VM. (A step may fail for the
    // load, e.g. a destination agent too slow to answer at switchover; the plan then
    // retries it and completes, as asserted above.)
    let fought = |s: &Step| s.status == StepStatus::Failed && s.reason.as_deref().unwrap_or("").contains("already being migrated");
    assert!(!steps(&plan).iter().any(fought), "a step fought the walk: {plan:?}");
    let (back, code) = ctl_json::<Host>(&url, &["host", "undrain", &host.name]);
    assert_eq!((code, back.maintenance), (Some(0), Maintenance::Active), "{back:?}");

    // The fullest host and a VM elsewhere (the walk spreads them again after the drain).
    let start = Instant::now();
    let (name, mover) = loop {
        let name = fullest(&url).name;
        if let Some(vm) = hosts(&url).into_iter().filter(|h| h.name != name).find_map(|h| h.vms.first().cloned()) {
            break (name, vm);
        }
        assert!(start.elapsed() < Duration::from_secs(60), "every VM stays on {name}: {:?}", hosts(&url));
        std::thread::sleep(Duration::from_millis(500));
    };
    // Move it in; a walk hop of it may be under way, so try until the controller takes it.
    let start = Instant::now();
    let moving = loop {
        let (p, code) = ctl_json::<serde_json::Value>(&url, &["vm", "move", &mover, "--to", &name, "--no-wait"]);
        if code == Some(0) {
            break serde_json::from_value::<PlanRecord>(p).expect("a plan");
        }
        assert!(start.elapsed() < Duration::from_secs(30), "cannot move {mover} to {name}: {p}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let id = moving.id;
    let start = Instant::now();
    loop {
        let (p, _) = ctl_json::<PlanRecord>(&url, &["cluster", "plan-show", &id]);
        if steps(&p).iter().any(|s| s.status == StepStatus::Running) {
            break;
        }
        assert_eq!(p.status, PlanStatus::Running, "the move ended before its migration ran: {p:?}");
        assert!(start.elapsed() < Duration::from_secs(30), "the move's migration never started: {p:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let plan = assert_drains_and_stays_empty(&url, &agents, &name);

    // The move in flight either landed and the drain took the VM out again, or it failed
    // (on a loaded machine its pre-copy may miss its budget) and the VM never reached
    // the drained host: either way nothing of it is left there (asserted above).
    let (moved, _) = ctl_json::<PlanRecord>(&url, &["cluster", "plan-show", &id]);
    match moved.status {
        PlanStatus::Completed => assert!(
            steps(&plan).iter().any(|s| s.vm == mover && s.status == StepStatus::Completed),
            "the move in flight landed and the drain did not take {mover} out: {plan:?}"
        ),
        PlanStatus::Failed => assert!(
            steps(&moved).iter().all(|s| s.status != StepStatus::Completed),
            "a failed move reports a completed migration: {moved:?}"
        ),
        other => panic!("the move in flight neither landed nor failed ({other}): {moved:?}"),
    }
}
