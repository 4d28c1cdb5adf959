//! Failover on real guests (256 MiB, TCG), through a real controller: a host killed
//! with `kill -9` (its agent and its QEMUs) during a walk brings its protected VM back on the replica
//! host from the last checkpoint (memory verifies, the heartbeat continues from
//! the checkpoint's sequence, RPO and RTO in the failover, its event and the VM's
//! metrics); an agent whose controller goes
//! silent stops its protected VM itself once the fence time has passed; a host cut off
//! the network (its namespace's link down, not killed) stops its VM before the
//! controller restores it elsewhere, so the two consoles' heartbeats never overlap;
//! then musical chairs, whose controller cuts a host's power: its VM comes back from
//! its replica, the game reports the failover's RPO and RTO and the survivors.

mod common;

use common::{AgentProc, ControllerProc};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use walkabout_api::{ClusterVm, Failover, FailoverResult, HostStatus, Phase, ProtectVm, VmState, WalkOptions, WalkRecord};
use walkabout_testbed::{BridgeNet, Controller, ControllerSpec, TestCa};

/// Waits (up to `secs`) until `f` gives a value.
fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn vm(ctl: &ControllerProc, name: &str) -> ClusterVm {
    ctl.call(|c| async move { c.vm(name).await }).unwrap_or_else(|e| panic!("VM {name}: {e}"))
}

fn failovers(ctl: &ControllerProc) -> Vec<Failover> {
    ctl.call(|c| async move { c.failovers().await }).unwrap_or_else(|e| panic!("failovers: {e}"))
}

/// Protects `name` toward `replica`, a checkpoint every 3 s, and waits for the second
/// one on the replica.
fn protect(ctl: &ControllerProc, name: &str, replica: &str) -> ClusterVm {
    start_protection(ctl, name, replica);
    wait_protected(ctl, name)
}

/// Protects `name` toward `replica`, a checkpoint every 3 s, without waiting.
fn start_protection(ctl: &ControllerProc, name: &str, replica: &str) {
    let req = ProtectVm { replica: Some(replica.into()), every_ms: Some(3_000), keep: Some(2) };
    ctl.call(|c| async move { c.protect_vm(name, &req).await }).unwrap_or_else(|e| panic!("protect {name}: {e}"));
}

/// Waits (up to 120 s) until the second checkpoint of `name` is on its replica.
fn wait_protected(ctl: &ControllerProc, name: &str) -> ClusterVm {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = vm(ctl, name);
        if v.protection_status.as_ref().is_some_and(|s| s.checkpoints >= 2 && s.last.is_some()) {
            return v;
        }
        assert!(Instant::now() < deadline, "no two checkpoints of {name} shipped within 120 s: {v:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_host_killed_with_its_qemus_during_a_walk_brings_its_protected_vm_back_on_the_replica() {
    let (a, b, c) = (AgentProc::start(&[]), AgentProc::start(&[]), AgentProc::start(&[]));
    let ctl = ControllerProc::start(&[&a, &b, &c], &["--fence-time", "10s"]);
    // Two disks: the root disk it boots from and a data disk the guest writes and
    // verifies (8 MiB at 8 MiB/s).
    a.create(&["--name", "fa", "--memory", "256M", "--disk", "image:guest", "--disk", "size=16M", "--workload", "dirty:32:8,disk:8:8"]);
    a.wait_heartbeats("fa", 5);
    ctl.wait_vms(1);
    protect(&ctl, "fa", "h2");
    let mut hosts = [a, b, c];

    // A walk: fa hops (storage copied along), then rests 150 s. Its protection follows
    // it (the replica moved off its new host if it landed there); once a checkpoint of
    // its new run is on the replica, its host dies, walk still running.
    let opts = WalkOptions { duration_ms: 600_000, parallel: 1, pause_ms: 150_000, gentle: false };
    let walk = ctl.call(|x| async move { x.start_walk(&opts).await }).expect("start a walk");
    let id = walk.id.clone();
    let hop = wait_for("a completed hop of fa", 180, || {
        let id = id.clone();
        let w = ctl.call(|x| async move { x.walk(&id).await }).ok()?;
        w.hops.into_iter().find(|h| h.result == Phase::Completed)
    });
    let hopped_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let (from, replica) = wait_for("a checkpoint of fa's new run on its replica", 140, || {
        let v = vm(&ctl, "fa");
        if let Some(e) = v.protection_status.as_ref().and_then(|s| s.last_error.as_ref()) {
            eprintln!("fa after its hop to {}: {:?} on {:?}, last checkpoint error: {e}", hop.to, v.state, v.host);
        }
        let (host, p) = (v.host.clone()?, v.protection.clone()?);
        let shipped = v.protection_status.as_ref()?.last.as_ref()?.taken_ms > hopped_ms;
        (host == hop.to && p.replica != host && shipped).then_some((host, p.replica))
    });
    let index = |h: &str| h.strip_prefix('h').and_then(|n| n.parse::<usize>().ok()).map(|n| n - 1).expect("a host hN");
    let dead = &mut hosts[index(&from)];
    dead.0.kill();
    for pid in dead.qemu_pids() {
        walkabout_testbed::kill9(pid);
    }
    let f = wait_for("the failover of fa ends", 180, || {
        failovers(&ctl).into_iter().find(|f| f.vm == "fa" && f.result != FailoverResult::Fencing)
    });
    let id = walk.id.clone();
    ctl.call(|x| async move { x.stop_walk(&id).await }).expect("stop the walk");

    assert_eq!((f.result, f.from.as_str(), f.to.as_deref()), (FailoverResult::Restored, from.as_str(), Some(replica.as_str())), "{f:?}");
    let (rpo, rto) = (f.rpo_ms.expect("RPO"), f.rto_ms.expect("RTO"));
    assert!(rto >= 10_000, "restored before the fence time: {f:?}");
    eprintln!("failover of fa ({from} died after a hop of the walk): RPO {rpo} ms, RTO {rto} ms, checkpoint {:?}", f.checkpoint);
    // The RPO and RTO are the controller's event of the restore and its metrics for fa.
    let events = ctl.call(|x| async move { x.recent_events(1000).await }).expect("the controller's events");
    let said = events
        .iter()
        .filter(|e| e.subject == walkabout_api::Subject::Failover && e.name == "fa")
        .find(|e| serde_json::from_value::<Failover>(e.data.clone()).is_ok_and(|x| x.id == f.id && x.result == FailoverResult::Restored))
        .unwrap_or_else(|| panic!("no event of the restore of fa ({}) among the last 1000", f.id));
    assert!(said.message.contains(&format!("(RPO {rpo} ms, RTO {rto} ms)")), "{}", said.message);
    let metrics = ctl.call(|x| async move { x.metrics().await }).expect("the controller's metrics");
    assert!(metrics.contains(&format!("walkabout_cluster_failover_rpo_ms{{vm=\"fa\"}} {rpo}\n")), "{metrics}");
    assert!(metrics.contains(&format!("walkabout_cluster_failover_rto_ms{{vm=\"fa\"}} {rto}\n")), "{metrics}");
    let third = ["h1", "h2", "h3"].into_iter().find(|h| *h != from && *h != replica).expect("a third host");
    let (b, c) = (&hosts[index(&replica)], &hosts[index(third)]);
    let state = b.call(|x| async move { x.replica("fa").await }).expect("the replica's checkpoints");
    let cp = state.checkpoints.iter().find(|x| Some(&x.id) == f.checkpoint.as_ref()).expect("the checkpoint used").clone();
    assert!(cp.taken_ms > hopped_ms, "restored from a checkpoint older than the hop: {cp:?}");
    let seen = b.info("fa").guest.heartbeats;
    let v = b.wait_heartbeats("fa", seen + 5);
    assert_eq!((v.guest.corrupt_pages, v.guest.corrupt_blocks, v.guest.seq_breaks), (0, 0, 0), "{v:?}");
    // The data disk's writer goes on after the restore (a pass over its area written),
    // its reader counting no corrupt block.
    let console = b.data.join("vms/fa/console.log");
    wait_for("a disk pass of fa after its restore", 60, || {
        String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).contains("disk-pass").then_some(())
    });
    let v = b.info("fa");
    assert_eq!((v.guest.corrupt_pages, v.guest.corrupt_blocks, v.guest.seq_breaks), (0, 0, 0), "{v:?}");
    assert!(
        v.guest.last_seq > cp.guest.last_seq && cp.guest.last_seq.is_some(),
        "heartbeat did not resume from {:?}: {v:?}",
        cp.guest.last_seq
    );
    let now = vm(&ctl, "fa");
    assert_eq!(now.host.as_deref(), Some(replica.as_str()), "{now:?}");
    // Protected again toward the third host (neither the dead one nor its new one),
    // and a checkpoint of its new run shipped there.
    let again = wait_for("fa protected again toward the third host", 30, || vm(&ctl, "fa").protection.filter(|p| p.replica == third));
    assert_eq!(again.replica, third);
    let on_third = wait_for("a checkpoint of fa on the third host", 120, || {
        c.call(|x| async move { x.replica("fa").await }).ok().filter(|r| r.checkpoints.iter().any(|k| k.n > cp.n))
    });
    let newest = on_third.checkpoints.iter().map(|k| k.n).max();
    assert!(on_third.checkpoints.iter().filter(|k| k.n > cp.n).all(|k| k.taken_ms > f.lost_ms), "{on_third:?}");
    eprintln!("fa re-protected toward {third}: checkpoint {newest:?} there");
    assert_eq!(failovers(&ctl).iter().filter(|f| f.vm == "fa").count(), 1, "more than one failover of fa");
}

#[test]
fn an_agent_that_loses_its_controller_stops_its_protected_vm_after_the_fence_time() {
    let (a, b) = (AgentProc::start(&[]), AgentProc::start(&[]));
    let mut ctl = ControllerProc::start(&[&a, &b], &["--fence-time", "10s"]);
    a.create(&["--name", "fe", "--memory", "256M", "--workload", "dirty:16:4"]);
    a.wait_heartbeats("fe", 3);
    ctl.wait_vms(1);
    protect(&ctl, "fe", "h2");

    let silent = Instant::now();
    ctl.0.kill();
    let stopped = wait_for("fe fenced", 60, || Some(a.info("fe")).filter(|v| v.record.state == VmState::Stopped));

    let after = silent.elapsed();
    assert!(
        after >= Duration::from_millis(9_000),
        "stopped {after:?} after the controller went silent, before its 10 s fence time: {stopped:?}"
    );
    let reason = stopped.record.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("fenced: no word from the controller"), "{stopped:?}");
    assert!(stopped.protection.as_ref().is_some_and(|p| p.fenced_ms.is_some()), "{stopped:?}");
    assert!(a.qemu_pids().is_empty(), "the fenced VM's QEMU still runs");
}

/// Milliseconds since the epoch of a file time.
fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The sequence numbers of the heartbeat lines (`hb SEQ NS CORRUPT [BLOCKS]`) in a
/// console log.
fn heartbeats_in(console: &Path) -> Vec<u64> {
    let text = String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned();
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split(' ');
            (f.next() == Some("hb")).then(|| f.next()?.parse().ok()).flatten()
        })
        .collect()
}

/// When heartbeats were written to a VM's consoles, as seen from outside: the old
/// host's console's last write (its mtime: no heartbeat there is later), and for each
/// possible new host's console, the last instant at which it held no heartbeat yet (its
/// first heartbeat is later).
struct ConsoleWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Option<SystemTime>, Vec<Option<SystemTime>>)>,
}

impl ConsoleWatch {
    fn start(old: PathBuf, new: Vec<PathBuf>) -> ConsoleWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut old_last = None;
            let mut none_yet: Vec<Option<SystemTime>> = vec![None; new.len()];
            let mut seen = vec![false; new.len()];
            while !flag.load(Ordering::Relaxed) {
                if let Ok(m) = std::fs::metadata(&old).and_then(|m| m.modified()) {
                    old_last = Some(m);
                }
                for (i, p) in new.iter().enumerate() {
                    if seen[i] {
                        continue;
                    }
                    // Taken before the read: a heartbeat written before it would be seen.
                    let asked = SystemTime::now();
                    if heartbeats_in(p).is_empty() {
                        none_yet[i] = Some(asked);
                    } else {
                        seen[i] = true;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (old_last, none_yet)
        });
        ConsoleWatch { stop, thread }
    }

    fn finish(self) -> (Option<SystemTime>, Vec<Option<SystemTime>>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the console watch")
    }
}

/// Three hosts in network namespaces on one bridge (mutual TLS off loopback) and a
/// controller on this machine reaching them through it.
fn netns_cluster(net: &BridgeNet) -> (Vec<AgentProc>, ControllerProc) {
    let agents: Vec<AgentProc> =
        (1..=3).map(|n| AgentProc::start_at(net.namespace(n), &format!("{}:7701", net.addr(n)), &["--allow-power-cut"])).collect();
    let ca = TestCa::shared().expect("the shared test CA");
    let refs: Vec<&walkabout_testbed::Agent> = agents.iter().map(|a| &a.0).collect();
    let spec = ControllerSpec::new(common::bin(), &refs).tls(ca.dir(), &ca.operator()).args(&["--fence-time", "10s"]);
    let ctl = ControllerProc(Controller::start(spec).expect("a TLS controller"));
    (agents, ctl)
}

#[test]
fn a_host_cut_off_the_network_stops_its_vm_before_it_runs_elsewhere_and_the_heartbeats_never_overlap() {
    let id = std::process::id() % 10_000;
    let net = BridgeNet::new(&format!("wafo{id}"), &format!("wafo{id}-h"), "10.248.7", 3).expect("network namespaces (needs root)");
    let (hosts, ctl) = netns_cluster(&net);
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    a.create(&["--name", "pa", "--memory", "256M", "--workload", "dirty:32:8"]);
    c.create(&["--name", "pb", "--memory", "256M", "--workload", "dirty:16:4"]);
    a.wait_heartbeats("pa", 5);
    c.wait_heartbeats("pb", 5);
    ctl.wait_vms(2);
    let up_since = ctl.hosts().iter().map(|h| h.status_since_ms).max().unwrap_or(0);
    start_protection(&ctl, "pa", "h2");
    start_protection(&ctl, "pb", "h2");
    wait_protected(&ctl, "pa");
    wait_protected(&ctl, "pb");

    // Two guests checkpointed every 3 s on three busy agents: none taken for down.
    let hosts_now = ctl.hosts();
    assert!(hosts_now.iter().all(|h| h.status == HostStatus::Up && h.status_since_ms <= up_since), "a host was down: {hosts_now:?}");
    assert!(failovers(&ctl).is_empty(), "a failover started while every agent lived: {:?}", failovers(&ctl));
    let old_console = a.data.join("vms/pa/console.log");
    let watch = ConsoleWatch::start(old_console.clone(), vec![b.data.join("vms/pa/console.log"), c.data.join("vms/pa/console.log")]);
    net.cut(1).expect("cut h1's link");
    let cut = Instant::now();

    // h1's agent, asked from inside its namespace, has stopped the VM by itself.
    let fenced = wait_for("pa fenced on h1", 60, || Some(a.info("pa")).filter(|v| v.record.state == VmState::Stopped));
    let fenced_ms = fenced.protection.as_ref().and_then(|p| p.fenced_ms).unwrap_or_else(|| panic!("no fenced_ms: {fenced:?}"));
    assert!(fenced.record.reason.as_deref().is_some_and(|r| r.starts_with("fenced: no word from the controller")), "{fenced:?}");
    assert!(a.qemu_pids().is_empty(), "the fenced VM's QEMU still runs on h1");
    assert!(cut.elapsed() >= Duration::from_secs(9), "fenced {:?} after the cut, before the 10 s fence time", cut.elapsed());
    let f = wait_for("the failover of pa ends", 120, || {
        failovers(&ctl).into_iter().find(|f| f.vm == "pa" && f.result != FailoverResult::Fencing)
    });
    assert_eq!((f.result, f.from.as_str(), f.to.as_deref()), (FailoverResult::Restored, "h1", Some("h2")), "{f:?}");
    let restored = b.wait_heartbeats("pa", b.info("pa").guest.heartbeats + 5);
    let (old_last, new_none_yet) = watch.finish();

    // The controller restored it only after the fence: h2's copy was created after it.
    assert!(fenced_ms < restored.record.created_at_ms, "fenced at {fenced_ms}, restored from {}", restored.record.created_at_ms);
    // The consoles: h1's last write is before h2's first heartbeat.
    let old_last = epoch_ms(old_last.expect("h1's console"));
    let new_first_after = epoch_ms(new_none_yet[0].expect("h2's console watched before its first heartbeat"));
    assert!(
        old_last < new_first_after,
        "heartbeats overlap: h1's console written at {old_last}, h2's first heartbeat after {new_first_after}"
    );
    assert!(new_none_yet[1].is_some() && heartbeats_in(&c.data.join("vms/pa/console.log")).is_empty(), "pa ran on h3 too");
    let old_seqs = heartbeats_in(&old_console);
    let cp = b.call(|x| async move { x.replica("pa").await }).expect("h2's replica of pa");
    let cp = cp.checkpoints.iter().find(|x| Some(&x.id) == f.checkpoint.as_ref()).expect("the checkpoint used").clone();
    assert_eq!((restored.guest.corrupt_pages, restored.guest.seq_breaks), (0, 0), "{restored:?}");
    assert!(restored.guest.last_seq > cp.guest.last_seq && cp.guest.last_seq.is_some(), "{restored:?} {cp:?}");
    eprintln!(
        "partition of h1: fenced {:.1} s after the cut; RPO {:?} ms, RTO {:?} ms; h1's console's last write {} ms before h2's first heartbeat \
         (h1 reached heartbeat {:?}, the checkpoint {:?})",
        fenced_ms.saturating_sub(now_ms_at(cut)) as f64 / 1000.0,
        f.rpo_ms,
        f.rto_ms,
        new_first_after - old_last,
        old_seqs.last(),
        cp.guest.last_seq
    );
    let others = failovers(&ctl);
    assert!(others.iter().all(|f| f.vm == "pa"), "a failover of a VM on a living host: {others:?}");

    // The link returns: h1's stopped copy is deleted, never started again.
    net.restore(1).expect("restore h1's link");
    wait_for("h1 up again", 30, || (ctl.host("h1").status == HostStatus::Up).then_some(()));
    wait_for("h1's stopped copy of pa deleted", 30, || a.try_info("pa").is_none().then_some(()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(a.try_info("pa").is_none() && a.qemu_pids().is_empty(), "pa is back on h1");
    let now = vm(&ctl, "pa");
    assert_eq!((now.host.as_deref(), now.state), (Some("h2"), walkabout_api::ClusterVmState::Running), "{now:?}");
    assert_eq!(failovers(&ctl).len(), 1, "{:?}", failovers(&ctl));

    // Musical chairs as the seed tells it, by the controller, on what is left: h1
    // (empty, no VM's replica) taken out first, so the music stops at h2 (pa, protected
    // toward h3) or h3 (pb, protected toward h2); the cut host's VM comes back on the
    // other, and with one host left the game is over.
    let since = Instant::now();
    wait_for("a checkpoint of pa's new run on h3", 120, || {
        let v = vm(&ctl, "pa");
        let shipped = v.protection_status.as_ref()?.last.as_ref()?.taken_ms > restored.record.created_at_ms;
        (v.protection.as_ref()?.replica == "h3" && shipped).then_some(())
    });
    ctl.call(|c| async move { c.remove_host("h1").await }).expect("take h1 out");
    let game = Instant::now();
    let w: WalkRecord = ctl.cli_as(&["game", "musical-chairs", "--round", "0s"]);
    eprintln!("musical chairs: {:.1} s, {:?}; rounds {:?}", game.elapsed().as_secs_f64(), w.result, w.rounds);
    let round = w.rounds.first().unwrap_or_else(|| panic!("no round played: {w:?}"));
    let (lost, other) = match round.host.as_str() {
        "h2" => ("pa", "h3"),
        "h3" => ("pb", "h2"),
        h => panic!("the music stopped at {h}: {w:?}"),
    };
    assert_eq!(w.rounds.len(), 1, "{w:?}");
    assert!(w.result.as_deref().is_some_and(|r| r.starts_with("one host left in round 2")), "{w:?}");
    let f = w.failovers.first().unwrap_or_else(|| panic!("no failover recorded: {w:?}"));
    assert_eq!((w.failovers.len(), f.vm.as_str(), f.result, f.to.as_deref()), (1, lost, FailoverResult::Restored, Some(other)), "{w:?}");
    let (rpo, rto) = (f.rpo_ms.expect("RPO"), f.rto_ms.expect("RTO"));
    assert!(rto >= 10_000, "restored before the fence time: {f:?}");
    assert!(round.result.contains(&format!("{lost} on {other} (RPO {rpo} ms, RTO {rto} ms)")), "{round:?}");
    let mut survivors: Vec<_> = w.survivors.iter().map(|s| (s.vm.as_str(), s.host.as_deref(), s.corrupt_pages, s.seq_breaks)).collect();
    survivors.sort();
    assert_eq!(survivors, vec![("pa", Some(other), 0, 0), ("pb", Some(other), 0, 0)], "{w:?}");
    eprintln!("musical chairs after the partition: {:.1} s", since.elapsed().as_secs_f64());
}

/// Milliseconds since the epoch at `t` (an instant of the past).
fn now_ms_at(t: Instant) -> u64 {
    epoch_ms(SystemTime::now() - t.elapsed())
}
