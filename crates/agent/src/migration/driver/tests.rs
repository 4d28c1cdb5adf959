//! The source-side driver against fakes: one behaviour each, the ownership rule first.

use super::super::fake::{Call, FakeAgent, FakePeer, FakeQemu};
use super::*;
use walkabout_api::{ErrorBody, ErrorKind, MigrationRequest, Mode};

/// Pre-copy that pauses at the gate, continues, and completes.
const CLEAN: &[&str] = &["active", "active", "pre-switchover", "device", "completed"];

fn record() -> MigrationRecord {
    let req = MigrationRequest::new("vm1", "http://127.0.0.1:7702", Mode::Precopy);
    MigrationRecord::pending("mig-1", &req, crate::vms::now_ms())
}

fn spec() -> VmSpec {
    serde_json::from_value(serde_json::json!({"name": "vm1", "memory_mib": 64})).unwrap_or_else(|e| panic!("spec: {e}"))
}

fn agent() -> FakeAgent {
    FakeAgent::new(record(), GuestStatus::default())
}

async fn drive(qemu: &FakeQemu, peer: &FakePeer, agent: &FakeAgent) -> Phase {
    drive_record(qemu, peer, agent, record()).await
}

async fn drive_record(qemu: &FakeQemu, peer: &FakePeer, agent: &FakeAgent, record: MigrationRecord) -> Phase {
    let driver = Driver {
        qmp: qemu.clone(),
        peer: peer.clone(),
        agent: agent.clone(),
        record,
        spec: spec(),
        was_running: true,
        tls: super::super::tls::StreamTls::Plain,
        dialer: super::super::relay::Dialer::default(),
    };
    driver.drive(agent.cancel_switch()).await
}

/// Pre-copy through the gate into post-copy, which runs for 4 s (40 samples) and completes.
fn postcopy_script() -> Vec<&'static str> {
    let mut script = vec!["active", "pre-switchover"];
    script.extend(["postcopy-active"; 40]);
    script.push("completed");
    script
}

/// A record whose paused post-copy may wait `budget_ms` for its stream.
fn record_with_recovery_budget(budget_ms: u64) -> MigrationRecord {
    let mut req = MigrationRequest::new("vm1", "http://127.0.0.1:7702", Mode::Postcopy);
    req.tuning.recovery_budget_ms = Some(budget_ms);
    MigrationRecord::pending("mig-1", &req, crate::vms::now_ms())
}

#[tokio::test]
async fn postcopy_whose_link_is_cut_pauses_recovers_on_a_new_stream_and_completes() {
    // Answers 3 probes (through the gate), then nothing for 2.5 s, then again.
    let (qemu, peer) = (FakeQemu::new(&postcopy_script()).stalling_in_postcopy(), FakePeer::outage(3, Some(Duration::from_millis(2500))));
    let agent = FakeAgent::new(record_with_recovery_budget(30_000), GuestStatus::default());

    let phase = drive_record(&qemu, &peer, &agent, record_with_recovery_budget(30_000)).await;

    assert_eq!(phase, Phase::Completed, "{:?}", agent.books().record.reason);
    assert!(qemu.got("migrate-pause") && peer.got(Call::Recover) && peer.got(Call::Commit));
    assert!(!peer.got(Call::Abort) && !qemu.got("migrate_cancel"));
    let books = agent.books();
    assert!(books.forgotten);
    let pauses = &books.record.postcopy_pauses;
    assert_eq!(pauses.len(), 1, "{pauses:?}");
    assert!(pauses[0].resumed_at_ms.is_some_and(|r| r >= pauses[0].paused_at_ms) && pauses[0].attempts >= 1, "{pauses:?}");
    let tos: Vec<&str> = books.record.switches.iter().map(|s| s.to.as_str()).collect();
    assert!(tos.contains(&"postcopy-paused") && tos.contains(&"postcopy-recovered"), "{tos:?}");
}

#[tokio::test]
async fn postcopy_whose_link_never_returns_ends_at_its_budget_with_both_halves_kept() {
    let (qemu, peer) = (FakeQemu::new(&postcopy_script()).stalling_in_postcopy(), FakePeer::outage(3, None));
    let agent = FakeAgent::new(record_with_recovery_budget(1_500), GuestStatus::default());

    let phase = drive_record(&qemu, &peer, &agent, record_with_recovery_budget(1_500)).await;

    assert_eq!(phase, Phase::Failed);
    assert!(qemu.got("migrate-pause") && !qemu.got("cont") && !qemu.got("migrate_cancel"));
    assert!(!peer.got(Call::Abort) && !peer.got(Call::Commit), "the destination's half must be kept");
    let books = agent.books();
    assert_eq!(books.kept.as_ref().map(|k| k.0), Some(false), "the source's half must stay paused");
    assert!(!books.forgotten);
    let reason = books.record.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("destination http://127.0.0.1:7702") && reason.contains("the destination holds the VM's running state"),
        "{reason}"
    );
    assert!(reason.contains("the source holds the remaining"), "{reason}");
    assert_eq!(books.record.postcopy_pauses.last().map(|p| p.resumed_at_ms), Some(None));
}

#[tokio::test]
async fn cancel_of_a_postcopy_that_never_recovered_is_refused_with_the_reason() {
    let (qemu, peer) = (FakeQemu::new(&postcopy_script()).stalling_in_postcopy(), FakePeer::outage(3, None));
    let agent = FakeAgent::new(record_with_recovery_budget(1_500), GuestStatus::default());
    drive_record(&qemu, &peer, &agent, record_with_recovery_budget(1_500)).await;

    let answer = agent.cancel();

    assert!(
        matches!(&answer, Err(AgentError::NotCancellable { why, .. }) if why.contains("post-copy is paused") && why.contains("cannot be undone")),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_silent_destination_beside_a_flowing_postcopy_stream_is_not_paused() {
    // The destination agent is silent (restarting, say) but QEMU's stream still moves.
    let (qemu, peer) = (FakeQemu::new(&postcopy_script()), FakePeer::outage(3, None));
    let agent = FakeAgent::new(record_with_recovery_budget(1_500), GuestStatus::default());

    let phase = drive_record(&qemu, &peer, &agent, record_with_recovery_budget(1_500)).await;

    assert!(!qemu.got("migrate-pause"));
    assert!(agent.books().record.postcopy_pauses.is_empty());
    assert_eq!(phase, Phase::Failed, "the commit cannot reach a silent destination");
}

#[tokio::test]
async fn a_paused_postcopy_whose_destination_lost_the_vm_ends_at_once_saying_so() {
    let (qemu, peer) = (FakeQemu::new(&postcopy_script()).stalling_in_postcopy(), FakePeer::forgetting(Duration::from_millis(2500)));
    let agent = FakeAgent::new(record_with_recovery_budget(60_000), GuestStatus::default());
    let started = Instant::now();

    let phase = drive_record(&qemu, &peer, &agent, record_with_recovery_budget(60_000)).await;

    assert_eq!(phase, Phase::Failed);
    assert!(started.elapsed() < Duration::from_secs(20), "waited for the budget: {:?}", started.elapsed());
    assert!(!peer.got(Call::Recover) && !qemu.got("cont"));
    let reason = agent.books().record.reason.clone().unwrap_or_default();
    assert!(reason.contains("the destination no longer holds the VM") && reason.contains("not found"), "{reason}");
}

#[test]
fn cancel_while_postcopy_is_paused_is_refused_with_the_reason() {
    let (tx, _rx) = watch::channel(false);
    let mut rec = MigrationRecord { phase: Phase::Switchover, ..record() };
    rec.progress.qemu_status = "postcopy-paused".into();
    rec.progress.postcopy_paused_since_ms = Some(1_000);

    let answer = request_cancel(&rec, &tx);

    assert!(
        matches!(&answer, Err(AgentError::NotCancellable { why, .. }) if why.contains("post-copy is paused (since 1000 ms")),
        "{answer:?}"
    );
    assert!(!*tx.borrow());
}

#[tokio::test]
async fn destination_lost_before_the_gate_resumes_the_vm_on_the_source() {
    // Memory keeps moving for 4 s; the destination answers the prepare, then nothing.
    let mut script = vec!["active"; 40];
    script.extend(CLEAN[2..].iter());
    let (qemu, peer, agent) = (FakeQemu::new(&script), FakePeer::silent_from(Call::Probe), agent());

    let phase = drive(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Failed);
    assert!(qemu.got("migrate_cancel") && !qemu.got("migrate-continue"));
    assert!(qemu.state().running);
    let books = agent.books();
    assert_eq!(books.kept.as_ref().map(|k| k.0), Some(true));
    assert!(books.record.reason.as_deref().is_some_and(|r| r.contains("destination stopped answering")), "{:?}", books.record.reason);
}

#[tokio::test]
async fn destination_lost_before_the_gate_is_told_to_abort() {
    let mut script = vec!["active"; 40];
    script.extend(CLEAN[2..].iter());
    let (qemu, peer) = (FakeQemu::new(&script), FakePeer::silent_from(Call::Probe));

    drive(&qemu, &peer, &agent()).await;

    assert!(peer.got(Call::Abort));
}

#[tokio::test]
async fn a_destination_restarting_at_the_switchover_is_asked_again_and_the_migration_completes() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::restarting_at_commit(2), agent());

    let phase = drive(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Completed, "{:?}", agent.books().record.reason);
    assert_eq!(peer.state().calls.iter().filter(|c| **c == Call::Commit).count(), 3);
    assert!(agent.books().forgotten, "the source copy is let go once the destination confirms");
}

#[tokio::test]
async fn destination_lost_after_the_gate_keeps_the_source_paused() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::silent_from(Call::Commit), agent());

    let phase = drive(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Failed);
    assert!(qemu.got("migrate-continue") && !qemu.got("cont"));
    assert!(!qemu.state().running);
    assert!(!peer.got(Call::Abort));
    let books = agent.books();
    assert_eq!(books.kept.as_ref().map(|k| k.0), Some(false));
    assert!(!books.forgotten);
    assert!(books.record.reason.as_deref().is_some_and(|r| r.contains("kept paused for recovery")), "{:?}", books.record.reason);
}

#[tokio::test]
async fn commit_refused_after_the_gate_keeps_the_source_paused() {
    let refused = ClientError::Api {
        status: 422,
        body: ErrorBody {
            error: "vm1 did not start here after switchover".into(),
            kind: ErrorKind::InvalidRequest,
            blocked: vec![],
            plan: None,
        },
    };
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::refusing_commit(refused), agent());

    let phase = drive(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Failed);
    assert!(!qemu.got("cont") && !qemu.state().running);
    assert!(agent.books().record.reason.as_deref().is_some_and(|r| r.contains("did not start here") && r.contains("kept paused")));
}

#[tokio::test]
async fn cancel_in_pending_cancels_before_any_memory_moves() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::default(), agent());
    assert!(agent.cancel().is_ok());

    let phase = drive(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Cancelled);
    assert!(!qemu.got("migrate") && qemu.state().running);
    assert!(peer.got(Call::Abort));
    assert_eq!(agent.books().kept.as_ref().map(|k| k.0), Some(true));
}

#[tokio::test]
async fn cancel_in_preparing_cancels_and_tears_the_destination_down() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::default(), agent().cancelling_at(Phase::Preparing));

    let phase = drive(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Cancelled);
    assert!(matches!(agent.books().cancel_answer, Some(Ok(_))));
    assert!(!qemu.got("migrate") && qemu.state().running);
    assert!(peer.got(Call::Prepare) && peer.got(Call::Abort));
}

#[tokio::test]
async fn cancel_in_running_cancels_the_migration_and_keeps_the_vm_running() {
    let (qemu, peer, agent) = (FakeQemu::new(&["active"; 30]), FakePeer::default(), agent().cancelling_at(Phase::Running));

    let phase = drive(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Cancelled);
    assert!(qemu.got("migrate") && qemu.got("migrate_cancel"));
    assert!(qemu.state().running && peer.got(Call::Abort));
    let books = agent.books();
    assert_eq!(books.kept.as_ref().map(|k| k.0), Some(true));
    assert_eq!(books.record.reason.as_deref(), Some(CANCELLED_BY_REQUEST));
}

#[tokio::test]
async fn cancel_while_paused_at_the_gate_resumes_the_guest_on_the_source() {
    let agent = agent();
    let canceller = agent.clone();
    let qemu = FakeQemu::new(CLEAN).at_pre_switchover(move || drop(canceller.cancel()));

    let phase = drive(&qemu, &FakePeer::default(), &agent).await;

    assert_eq!(phase, Phase::Cancelled);
    assert!(!qemu.got("migrate-continue"));
    assert!(qemu.got("cont") && qemu.state().running);
    assert_eq!(agent.books().kept.as_ref().map(|k| k.0), Some(true));
}

#[tokio::test]
async fn cancel_at_switchover_is_refused_and_the_migration_completes() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::default(), agent().cancelling_at(Phase::Switchover));

    let phase = drive(&qemu, &peer, &agent).await;

    assert!(matches!(agent.books().cancel_answer, Some(Err(AgentError::NotCancellable { phase: Phase::Switchover, .. }))));
    assert_eq!(phase, Phase::Completed);
    assert!(!qemu.got("migrate_cancel"));
}

#[test]
fn cancel_after_the_switchover_is_refused_in_every_later_phase() {
    let (tx, _rx) = watch::channel(false);
    let refused = |phase| {
        let rec = MigrationRecord { phase, ..record() };
        matches!(request_cancel(&rec, &tx), Err(AgentError::NotCancellable { phase: p, .. }) if p == phase)
    };

    assert!(refused(Phase::Switchover) && refused(Phase::Completed) && refused(Phase::Failed));
}

#[tokio::test]
async fn completed_migration_forgets_the_vm_on_the_source() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::default(), agent());

    let phase = drive(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Completed);
    let books = agent.books();
    assert!(books.forgotten && books.kept.is_none());
    assert_eq!(books.phases, [Phase::Pending, Phase::Preparing, Phase::Running, Phase::Switchover, Phase::Completed]);
    assert!(books.illegal.is_empty(), "{:?}", books.illegal);
    assert!(!peer.got(Call::Abort));
}

#[tokio::test]
async fn completed_migration_commits_with_the_guest_status_of_the_source() {
    let guest = GuestStatus { ready: true, heartbeats: 7, last_seq: Some(7), partial_line: "HEARTBEAT seq=".into(), ..Default::default() };
    let (qemu, peer) = (FakeQemu::new(CLEAN), FakePeer::default());
    let agent = FakeAgent::new(record(), guest.clone());

    drive(&qemu, &peer, &agent).await;

    assert_eq!(peer.state().committed, Some(Some(guest)));
}

#[tokio::test]
async fn destination_refusing_to_prepare_fails_before_any_memory_moves() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::silent_from(Call::Prepare), agent());

    let phase = drive(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Failed);
    assert!(!qemu.got("migrate") && qemu.state().running);
    assert!(agent.books().record.reason.as_deref().is_some_and(|r| r.starts_with("cannot migrate vm1 to http://127.0.0.1:7702")));
}

#[tokio::test]
async fn recovery_before_the_gate_cancels_and_resumes_the_source() {
    let qemu = FakeQemu::new(&[]);
    qemu.state().status = "pre-switchover".into();
    qemu.state().running = false;
    let (peer, agent) = (FakePeer::default(), agent());
    let driver = Driver {
        qmp: qemu.clone(),
        peer: peer.clone(),
        agent: agent.clone(),
        record: record(),
        spec: spec(),
        was_running: true,
        tls: super::super::tls::StreamTls::Plain,
        dialer: super::super::relay::Dialer::default(),
    };

    let reason = driver.recover().await;

    assert_eq!(reason, "the source agent restarted mid-migration");
    assert!(qemu.got("migrate_cancel") && qemu.state().running);
    assert!(peer.got(Call::Abort));
}

#[tokio::test]
async fn recovery_after_the_gate_keeps_the_source_paused() {
    let qemu = FakeQemu::new(&[]);
    qemu.state().status = "device".into();
    qemu.state().running = false;
    let (peer, agent) = (FakePeer::default(), agent());
    let driver = Driver {
        qmp: qemu.clone(),
        peer: peer.clone(),
        agent: agent.clone(),
        record: record(),
        spec: spec(),
        was_running: true,
        tls: super::super::tls::StreamTls::Plain,
        dialer: super::super::relay::Dialer::default(),
    };

    let reason = driver.recover().await;

    assert!(reason.contains("kept paused for recovery"));
    assert!(!qemu.got("migrate_cancel") && !qemu.got("cont") && !qemu.state().running);
    assert!(!peer.got(Call::Abort));
    assert_eq!(agent.books().kept.as_ref().map(|k| k.0), Some(false));
}

// ---- storage: copy ----

fn copy_record() -> MigrationRecord {
    let req = MigrationRequest {
        storage: walkabout_api::StorageMode::Copy,
        ..MigrationRequest::new("vm1", "http://127.0.0.1:7702", Mode::Precopy)
    };
    MigrationRecord::pending("mig-1", &req, crate::vms::now_ms())
}

fn disk_spec() -> VmSpec {
    let spec = serde_json::json!({"name": "vm1", "memory_mib": 64, "disks": [{"path": "/nonexistent/vm1.qcow2", "format": "qcow2"}]});
    serde_json::from_value(spec).unwrap_or_else(|e| panic!("spec: {e}"))
}

async fn drive_copy(qemu: &FakeQemu, peer: &FakePeer, agent: &FakeAgent) -> Phase {
    drive_copy_with(qemu, peer, agent, super::super::tls::StreamTls::Plain).await
}

async fn drive_copy_with(qemu: &FakeQemu, peer: &FakePeer, agent: &FakeAgent, tls: super::super::tls::StreamTls) -> Phase {
    let driver = Driver {
        qmp: qemu.clone(),
        peer: peer.clone(),
        agent: agent.clone(),
        record: copy_record(),
        spec: disk_spec(),
        was_running: true,
        tls,
        dialer: super::super::relay::Dialer::default(),
    };
    driver.drive(agent.cancel_switch()).await
}

fn copy_agent() -> FakeAgent {
    FakeAgent::new(copy_record(), GuestStatus::default())
}

#[tokio::test]
async fn a_copy_mirrors_to_ready_before_memory_moves() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::copying(), copy_agent());

    let phase = drive_copy(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Completed);
    let (mirror, migrate) = (qemu.position("blockdev-mirror"), qemu.position("migrate"));
    assert!(mirror.is_some() && mirror < migrate, "{:?}", qemu.state().commands);
    let polls_before_migrate = qemu.state().commands[..migrate.unwrap_or(0)].iter().filter(|c| *c == "query-block-jobs").count();
    assert!(polls_before_migrate >= 3, "memory started after {polls_before_migrate} polls, before the job was READY");
    let books = agent.books();
    assert_eq!((books.record.storage, books.record.disk.transferred_bytes), (Some(walkabout_api::StorageMode::Copy), 64 << 20));
    // The dirty-rate sample ran beside the copy: started before the destination was
    // prepared, read once the mirror was READY, and its figure recorded.
    let (calc, read, prepared) = (qemu.position("calc-dirty-rate"), qemu.position("query-dirty-rate"), qemu.position("blockdev-add"));
    assert!(calc < prepared && mirror < read && read < migrate, "{:?}", qemu.state().commands);
    assert_eq!(books.record.dirty_rate_bps, Some(4 << 20));
    let t = books.record.timings;
    assert!(t.prepare_ms.is_some() && t.disk_ms.is_some() && t.memory_ms.is_some(), "{t:?}");
}

#[tokio::test]
async fn a_completed_copy_ends_the_mirror_without_force_before_the_commit() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::copying(), copy_agent());

    drive_copy(&qemu, &peer, &agent).await;

    let s = qemu.state();
    assert_eq!(s.job_cancels, [("mirror-disk0".to_string(), false)]);
    assert!(s.nodes.is_empty(), "the NBD node is removed: {:?}", s.nodes);
    assert!(peer.got(Call::Commit) && !peer.got(Call::Abort));
}

#[tokio::test]
async fn the_switchover_waits_for_the_mirror_and_a_broken_mirror_stops_it() {
    // The mirror reports an error while memory moves: the gate must not pass.
    let qemu = FakeQemu::new(&["active", "active", "active", "pre-switchover", "device", "completed"]);
    let q = qemu.clone();
    let qemu =
        qemu.at_pre_switchover(move || q.emit("BLOCK_JOB_ERROR", serde_json::json!({"device": "mirror-disk0", "operation": "write"})));
    let (peer, agent) = (FakePeer::copying(), copy_agent());

    let phase = drive_copy(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Failed);
    assert!(!qemu.got("migrate-continue") && qemu.state().running);
    assert!(peer.got(Call::Abort), "the destination removes its partial image");
    let books = agent.books();
    assert!(books.record.reason.as_deref().is_some_and(|r| r.contains("mirror-disk0 hit an I/O error")), "{:?}", books.record.reason);
}

#[tokio::test]
async fn cancel_during_the_mirror_leaves_the_source_untouched_and_the_destination_cleaned() {
    let qemu = FakeQemu::new(CLEAN);
    qemu.state().mirror_ready_after = None;
    let (peer, agent) = (FakePeer::copying(), copy_agent());
    let canceller = agent.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        drop(canceller.cancel());
    });

    let phase = drive_copy(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Cancelled);
    let s = qemu.state();
    assert!(!s.commands.iter().any(|c| c == "migrate"), "no memory moved");
    assert_eq!(s.job_cancels, [("mirror-disk0".to_string(), true)]);
    assert!(s.nodes.is_empty() && s.running);
    assert!(peer.got(Call::Abort));
}

#[tokio::test]
async fn destination_lost_during_the_mirror_fails_and_abandons_the_copy() {
    let qemu = FakeQemu::new(CLEAN);
    qemu.state().mirror_ready_after = None;
    let (peer, agent) = (FakePeer::copying(), copy_agent());
    peer.state().silent_from = Some(Call::Probe);

    let phase = drive_copy(&qemu, &peer, &agent).await;

    assert_eq!(phase, Phase::Failed);
    let s = qemu.state();
    assert!(!s.commands.iter().any(|c| c == "migrate") && s.running && s.nodes.is_empty());
    assert_eq!(s.job_cancels, [("mirror-disk0".to_string(), true)]);
    let books = agent.books();
    assert!(books.record.reason.as_deref().is_some_and(|r| r.contains("stopped answering")), "{:?}", books.record.reason);
}

#[tokio::test]
async fn the_source_offers_its_disks_and_asks_for_the_mode_given() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::copying(), copy_agent());

    drive_copy(&qemu, &peer, &agent).await;

    let req = peer.state().prepared.clone().unwrap_or_else(|| panic!("no prepare"));
    assert_eq!(req.storage, walkabout_api::StorageMode::Copy);
    assert_eq!((req.disks.len(), req.disks[0].virtual_size, req.marker.is_none()), (1, 64 << 20, true));
}

#[tokio::test]
async fn post_copy_is_refused_for_a_vm_whose_disks_may_be_copied() {
    let req = MigrationRequest {
        storage: walkabout_api::StorageMode::Copy,
        ..MigrationRequest::new("vm1", "http://127.0.0.1:7702", Mode::Postcopy)
    };
    let record = MigrationRecord::pending("mig-1", &req, crate::vms::now_ms());
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::copying(), FakeAgent::new(record.clone(), GuestStatus::default()));
    let driver = Driver {
        qmp: qemu.clone(),
        peer: peer.clone(),
        agent: agent.clone(),
        record,
        spec: disk_spec(),
        was_running: true,
        tls: super::super::tls::StreamTls::Plain,
        dialer: super::super::relay::Dialer::default(),
    };

    let phase = driver.drive(agent.cancel_switch()).await;

    assert_eq!(phase, Phase::Failed);
    assert!(!peer.got(Call::Prepare) && qemu.state().running);
    assert!(agent.books().record.reason.as_deref().is_some_and(|r| r.contains("post-copy needs --storage shared")));
}

// ---- QEMU's streams under the cluster CA ----

#[tokio::test]
async fn under_the_ca_the_source_arms_tls_for_the_disks_and_the_memory_before_either_moves() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::copying(), copy_agent());
    peer.state().tls = true;

    let phase = drive_copy_with(&qemu, &peer, &agent, super::super::tls::StreamTls::Tls("/creds".into())).await;

    assert_eq!(phase, Phase::Completed);
    let s = qemu.state();
    let at = |cmd: &str, key: &str| s.args.iter().position(|(c, a)| c == cmd && !a[key].is_null());
    let (creds, params) = (at("object-add", "qom-type"), at("migrate-set-parameters", "tls-creds"));
    let (nbd, migrate) = (at("blockdev-add", "driver"), s.commands.iter().position(|c| c == "migrate"));
    assert!(creds < params && params < nbd && nbd < migrate, "{:?}", s.commands);
    let arg = |i: Option<usize>| i.map(|i| s.args[i].1.clone()).unwrap_or_default();
    assert_eq!((arg(creds)["endpoint"].as_str(), arg(creds)["dir"].as_str()), (Some("client"), Some("/creds")));
    assert_eq!(arg(params)["tls-hostname"], "127.0.0.1");
    assert_eq!((arg(nbd)["tls-creds"].as_str(), arg(nbd)["tls-hostname"].as_str()), (Some("wa-tls-out"), Some("127.0.0.1")));
    assert!(agent.books().record.tls, "the record says plain");
}

#[tokio::test]
async fn a_source_under_the_ca_never_sends_to_a_destination_expecting_plain_streams() {
    let (qemu, peer, agent) = (FakeQemu::new(CLEAN), FakePeer::copying(), copy_agent());

    let phase = drive_copy_with(&qemu, &peer, &agent, super::super::tls::StreamTls::Tls("/creds".into())).await;

    assert_eq!(phase, Phase::Failed);
    assert!(!qemu.got("blockdev-add") && !qemu.got("migrate"), "{:?}", qemu.state().commands);
    assert!(peer.got(Call::Abort));
    let books = agent.books();
    assert!(books.record.reason.as_deref().is_some_and(|r| r.contains("plain text")), "{:?}", books.record.reason);
    assert!(!books.record.tls);
}
