//! Running a migration through QEMU: the destination listens, the source sends, and the
//! [`Policy`] watches every sample and adapts.
//!
//! The switchover is gated: the source runs with QEMU's `pause-before-switchover`, so
//! when pre-copy is ready to finish (or post-copy to start) QEMU pauses the guest and
//! waits for us. We continue only if the destination answered its liveness probe within
//! [`GATE_FRESHNESS`]; otherwise the migration is cancelled and the guest resumes on its
//! source. The check is a read of the probe's last answer, not a round trip, because the
//! guest is paused while we decide. (The destination may be armed to run the guest as
//! soon as it has loaded it: it cannot load it before we pass the gate.) Before the gate
//! every failure leaves the VM on its source; after it, the source never resumes on its
//! own, so two copies never run.
//!
//! Post-copy that loses its stream (a link cut) is not the end: QEMU (>= 10) pauses it
//! (`postcopy-paused`), the guest waits at the destination for the pages still at the
//! source, and a new stream resumes it. A cut link may not break the TCP connection for
//! minutes, so when the destination stops answering and the stream stops moving during
//! post-copy, the source pauses
//! QEMU itself (`migrate-pause`); then, as soon as the destination answers again, it asks
//! the destination to listen anew ([`Peer::recover`]: `migrate-recover`) and resumes
//! sending (`migrate` with `resume`). Attempts repeat until the recovery budget runs out;
//! then the migration ends `failed` with where each piece of the VM is, and both hosts
//! keep theirs (it can only be completed, never undone).
//!
//! Order matters: capabilities that must match (`postcopy-ram`) are set on the
//! destination before it listens and on the source before `migrate`; QEMU refuses to
//! change capabilities once a migration runs, which is why the strategy is picked up
//! front and only parameters (and the post-copy switch) change on the way.

use crate::error::MigrateError;
use crate::phase::Phase;
use crate::policy::{Action, Compression, Policy, Strategy, Switch};
use crate::progress::{phase_of, Progress};
use crate::qmp::MigrationQmp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use walkabout_api::PostcopyPause;

/// How often QEMU's statistics are read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// A destination silent for longer than this is taken for gone while memory moves.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1500);
/// At the switchover gate the destination must have answered within this.
pub const GATE_FRESHNESS: Duration = Duration::from_millis(1000);

/// Failed `query-migrate`s in a row after the switchover before the run gives up
/// (every [`SAMPLE_INTERVAL`] at least, or QMP's own timeout).
const QUERY_ERRORS_PAST_GATE: u32 = 50;

/// How often a paused post-copy tries to re-establish its stream while the
/// destination answers.
pub const RECOVERY_RETRY_INTERVAL: Duration = Duration::from_millis(1000);

/// The destination, as the source's migration sees it.
pub trait Peer: Sync {
    /// Time since the destination (its agent and its QEMU) last answered a probe.
    fn since_alive(&self) -> Duration;

    /// How long the destination may stay silent while memory moves before it is taken
    /// for gone ([`PEER_TIMEOUT`] unless the migration asked for more: a nested agent).
    fn patience(&self) -> Duration {
        PEER_TIMEOUT
    }

    /// The destination answered that it no longer has the VM (why), if it did: a
    /// paused post-copy then has nothing to resume.
    fn lost(&self) -> Option<String> {
        None
    }

    /// Asks the destination to listen again for a paused post-copy's stream; the URI
    /// to resume sending to, or why not.
    fn recover(&self) -> impl std::future::Future<Output = Result<String, String>> + Send;
}

/// The stream settings both ends must share (and the source's own: XBZRLE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stream {
    /// `postcopy-ram`.
    pub postcopy_ready: bool,
    /// `postcopy-preempt` (only with `postcopy-ram`).
    pub postcopy_preempt: bool,
    /// multifd channels; below 2, no multifd.
    pub multifd_channels: u8,
    /// Compression.
    pub compression: Compression,
}

impl Stream {
    /// The settings a strategy asks for.
    pub fn of(s: &Strategy) -> Stream {
        Stream {
            postcopy_ready: s.postcopy_ready,
            postcopy_preempt: s.postcopy_ready && s.postcopy_preempt,
            multifd_channels: s.multifd_channels,
            compression: s.compression,
        }
    }

    fn multifd(&self) -> bool {
        self.multifd_channels >= 2
    }

    /// Parameters for this end (`source`: XBZRLE's cache is the sender's).
    fn params(&self, source: bool) -> Option<Value> {
        let mut p = serde_json::Map::new();
        if self.multifd() {
            p.insert("multifd-channels".into(), json!(self.multifd_channels));
            let c = if self.compression == Compression::Zstd { "zstd" } else { "none" };
            p.insert("multifd-compression".into(), json!(c));
        }
        if source && self.compression == Compression::Xbzrle {
            p.insert("xbzrle-cache-size".into(), json!(XBZRLE_CACHE_BYTES));
        }
        (!p.is_empty()).then_some(Value::Object(p))
    }
}

/// XBZRLE's cache of pages last sent: room for a 256 MiB working set.
pub const XBZRLE_CACHE_BYTES: u64 = 256 << 20;

/// The reason recorded for a cancel the operator asked for.
pub const CANCELLED_BY_REQUEST: &str = "cancelled by request";

/// How a migration ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// `Completed`, `Failed` or `Cancelled`.
    pub phase: Phase,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Wall time from `migrate` to the end, ms.
    pub total_ms: u64,
    /// Guest pause at switchover as QEMU measured it, ms (0 unless completed).
    pub downtime_ms: u64,
    /// Bytes sent.
    pub transferred_bytes: u64,
    /// Pre-copy passes.
    pub iterations: u64,
    /// The strategy picked at the start.
    pub strategy: Strategy,
    /// Every change of strategy, with its reason.
    pub switches: Vec<Switch>,
    /// The switchover had passed when it ended: the source copy must never resume.
    pub past_switchover: bool,
    /// Every interruption of post-copy, and its recovery.
    pub postcopy_pauses: Vec<PostcopyPause>,
}

/// Capabilities: `postcopy-ram`, `postcopy-preempt` and `multifd` must match on both
/// ends; `auto_converge` (source only, `None` on the destination), XBZRLE and the
/// switchover gate are the source's.
fn caps(stream: &Stream, auto_converge: Option<bool>) -> Value {
    let mut c = vec![
        json!({"capability": "events", "state": true}),
        json!({"capability": "postcopy-ram", "state": stream.postcopy_ready}),
        json!({"capability": "postcopy-preempt", "state": stream.postcopy_preempt}),
        json!({"capability": "multifd", "state": stream.multifd()}),
    ];
    if let Some(ac) = auto_converge {
        c.push(json!({"capability": "auto-converge", "state": ac}));
        c.push(json!({"capability": "pause-before-switchover", "state": true}));
        c.push(json!({"capability": "xbzrle", "state": stream.compression == Compression::Xbzrle}));
    }
    json!({ "capabilities": c })
}

/// Prepares a destination QEMU started with `-incoming defer`: sets the capabilities
/// and parameters the source's strategy needs and listens on `listen_host` (port chosen
/// by the kernel). Returns the URI the source must send to.
pub async fn listen_incoming(qmp: &impl MigrationQmp, stream: &Stream, listen_host: &str) -> Result<String, MigrateError> {
    qmp.execute("migrate-set-capabilities", Some(caps(stream, None))).await.map_err(MigrateError::destination)?;
    if let Some(p) = stream.params(false) {
        qmp.execute("migrate-set-parameters", Some(p)).await.map_err(MigrateError::destination)?;
    }
    qmp.execute("migrate-incoming", Some(json!({ "uri": format!("tcp:{listen_host}:0") }))).await.map_err(MigrateError::destination)?;
    let info = qmp.execute("query-migrate", None).await.map_err(MigrateError::destination)?;
    let addr =
        info["socket-address"].as_array().and_then(|a| a.first()).ok_or_else(|| MigrateError::NoIncomingAddress(info.to_string()))?;
    let port = addr["port"].as_str().map(String::from).or_else(|| addr["port"].as_u64().map(|p| p.to_string()));
    let port = port.ok_or_else(|| MigrateError::NoIncomingAddress(info.to_string()))?;
    Ok(format!("tcp:{listen_host}:{port}"))
}

/// True for the statuses of a post-copy not yet completed (active, paused, recovering).
pub fn is_postcopy(status: &str) -> bool {
    status.starts_with("postcopy-")
}

/// The status a `MIGRATION` event announces, if it is one. At a post-copy destination
/// events are how its status is known: `query-migrate` waits on QEMU's main loop, which
/// a vCPU waiting for a page may hold.
pub fn migration_event_status(ev: &walkabout_qemu::Event) -> Option<&str> {
    (ev.event == "MIGRATION").then(|| ev.data["status"].as_str()).flatten()
}

/// At the destination, when its source went silent during post-copy: pauses post-copy
/// (out of band; QEMU would otherwise wait on the dead connection for minutes), so it
/// can be recovered on a new stream. QEMU refuses it unless post-copy runs.
pub async fn pause_incoming_postcopy(qmp: &impl MigrationQmp) -> Result<(), MigrateError> {
    qmp.execute_oob("migrate-pause", None).await.map(drop).map_err(MigrateError::destination)
}

/// At the destination: makes a paused post-copy listen again on `listen_host` (pausing
/// it first if it has not noticed its stream is gone), all out of band. Returns the URI
/// the source must resume sending to.
pub async fn recover_incoming(qmp: &impl MigrationQmp, listen_host: &str) -> Result<String, MigrateError> {
    if let Err(e) = pause_incoming_postcopy(qmp).await {
        tracing::debug!(error = %e, "migrate-pause before recovery (already paused?)");
    }
    // A port picked here: QEMU's listing of its listening addresses keeps the first
    // stream's beside the new one.
    let port = std::net::TcpListener::bind((listen_host, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| MigrateError::NoIncomingAddress(format!("no free port on {listen_host}: {e}")))?
        .port();
    let uri = format!("tcp:{listen_host}:{port}");
    // The pause takes effect asynchronously: QEMU refuses to recover until it has.
    let start = Instant::now();
    loop {
        match qmp.execute_oob("migrate-recover", Some(json!({ "uri": uri }))).await {
            Ok(_) => return Ok(uri),
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                tracing::debug!(error = %e, "migrate-recover not yet possible");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(MigrateError::NotPaused(e.to_string())),
        }
    }
}

/// A dirty-rate measurement under way in QEMU (`calc-dirty-rate` runs on its own
/// thread): started early, read when its figure is needed, so the wait overlaps other
/// work (a disk copy, before the memory stream that needs it).
#[derive(Debug, Clone, Copy)]
pub struct DirtySample {
    started: Instant,
    ms: u64,
}

impl DirtySample {
    /// Starts a page-sampling measurement over `ms` milliseconds; `None` if QEMU
    /// refused it.
    pub async fn start(qmp: &impl MigrationQmp, ms: u64) -> Option<DirtySample> {
        let args = json!({"calc-time": ms, "calc-time-unit": "millisecond", "mode": "page-sampling"});
        match qmp.execute("calc-dirty-rate", Some(args)).await {
            Ok(_) => Some(DirtySample { started: Instant::now(), ms }),
            Err(e) => {
                tracing::debug!(error = %e, "calc-dirty-rate unavailable");
                None
            }
        }
    }

    /// The measured rate, bytes/s, waiting for the window to end if it has not;
    /// `None` if QEMU gave no figure within 3 s of its end.
    pub async fn read(self, qmp: &impl MigrationQmp) -> Option<u64> {
        let window = Duration::from_millis(self.ms);
        tokio::time::sleep(window.saturating_sub(self.started.elapsed())).await;
        while self.started.elapsed() < window + Duration::from_millis(3000) {
            let v = qmp.execute("query-dirty-rate", None).await.ok()?;
            if v["status"] == "measured" {
                // QEMU reports MB/s (MiB/s).
                return v["dirty-rate"].as_u64().map(|r| r << 20);
            }
            tokio::time::sleep(Duration::from_millis(self.ms.clamp(10, 200))).await;
        }
        None
    }
}

/// Runs the migration from the source QEMU to `uri` until it completes, fails or is
/// cancelled (`cancel` set to true; honoured only before switchover). `report` sees
/// every sample and every switch.
pub async fn run(
    qmp: &impl MigrationQmp,
    uri: &str,
    mut policy: Policy,
    peer: &impl Peer,
    mut cancel: watch::Receiver<bool>,
    mut report: impl FnMut(&Progress, Option<&Switch>),
) -> Result<Outcome, MigrateError> {
    let strategy = policy.strategy().clone();
    let started = Instant::now();
    let src = MigrateError::source;
    let stream = Stream::of(&strategy);
    qmp.execute("migrate-set-capabilities", Some(caps(&stream, Some(strategy.auto_converge)))).await.map_err(src)?;
    let mut params = json!({
        "downtime-limit": strategy.downtime_ms,
        "max-bandwidth": strategy.bandwidth_bps,
    });
    if let Some(Value::Object(p)) = stream.params(true) {
        for (k, v) in p {
            params[k] = v;
        }
    }
    if strategy.auto_converge {
        params["cpu-throttle-initial"] = json!(20);
        params["cpu-throttle-increment"] = json!(10);
        params["cpu-throttle-tailslow"] = json!(true);
    }
    qmp.execute("migrate-set-parameters", Some(params)).await.map_err(src)?;
    // Subscribe before starting, so the pre-switchover pause is seen at once: the guest
    // is paused while it waits for us, and every millisecond here is downtime.
    let mut events = qmp.events();
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await.map_err(src)?;
    tracing::info!(uri, strategy = %strategy.name, reason = %strategy.reason, "migration started");

    let mut switches: Vec<Switch> = vec![];
    let mut cancel_reason: Option<String> = None;
    let mut give_up: Option<String> = None;
    let mut gate_passed = false;
    let mut recovery = Recovery::new(strategy.recovery_budget_ms);
    let mut query_errors = 0u32;
    let mut last = Progress::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_INTERVAL) => {}
            ev = events.recv() => {
                // Any MIGRATION event wakes the loop; other events are of no interest.
                if !matches!(&ev, Ok(e) if e.event == "MIGRATION") {
                    continue;
                }
            }
            changed = cancel.changed() => {
                // Past the gate a cancel could leave the guest running on both hosts:
                // the agent refuses it, and so does this loop.
                if changed.is_ok() && *cancel.borrow() && cancel_reason.is_none() && !gate_passed {
                    cancel_reason = Some(CANCELLED_BY_REQUEST.into());
                    request_cancel(qmp).await?;
                }
            }
        }
        let info = match qmp.execute("query-migrate", None).await {
            Ok(info) => info,
            // Past the gate an error must not read as "before the switchover" (which
            // would resume the source beside the destination): retry, then end failed
            // past the switchover, both copies kept.
            Err(e) if gate_passed && query_errors < QUERY_ERRORS_PAST_GATE => {
                query_errors += 1;
                tracing::warn!(error = %e, query_errors, "query-migrate after the switchover");
                continue;
            }
            Err(e) if gate_passed => {
                return Ok(Outcome {
                    phase: Phase::Failed,
                    reason: Some(format!("the source QEMU stopped answering after the switchover ({e}); both copies are kept")),
                    total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    downtime_ms: 0,
                    transferred_bytes: last.transferred_bytes,
                    iterations: last.iteration,
                    strategy,
                    switches,
                    past_switchover: true,
                    postcopy_pauses: recovery.pauses,
                });
            }
            Err(e) => return Err(src(e)),
        };
        query_errors = 0;
        let mut progress = crate::progress::from_query_after(&info, &last);
        last = progress.clone();
        let phase = phase_of(&progress.qemu_status);
        progress.phase = Some(phase);
        recovery.annotate(&mut progress);
        if phase.is_final() {
            recovery.resumed_if_paused(&progress.qemu_status);
            report(&progress, None);
            let reason = match phase {
                Phase::Completed => None,
                // A failure after our own cancel request is the cancel's doing.
                Phase::Failed if cancel_reason.is_some() || give_up.is_some() => give_up.clone().or(cancel_reason.clone()),
                Phase::Cancelled => Some(give_up.clone().or(cancel_reason.clone()).unwrap_or_else(|| "cancelled".into())),
                _ => Some(format!("QEMU reports the migration failed: {}", info["error-desc"].as_str().unwrap_or("no reason given"))),
            };
            // A give-up is a failure to finish, not a user's cancel.
            let phase = match (phase, &give_up, &cancel_reason) {
                (Phase::Cancelled, Some(_), _) => Phase::Failed,
                // Cancelled by us because the destination went away: a failure.
                (Phase::Cancelled, None, Some(r)) if r != CANCELLED_BY_REQUEST => Phase::Failed,
                (p, _, _) => p,
            };
            return Ok(Outcome {
                phase,
                reason,
                total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                downtime_ms: info["downtime"].as_u64().unwrap_or(0),
                transferred_bytes: progress.transferred_bytes,
                iterations: progress.iteration,
                strategy,
                switches,
                past_switchover: gate_passed,
                postcopy_pauses: recovery.pauses,
            });
        }
        if gate_passed {
            // Past the gate the migration is QEMU's to finish, unless post-copy loses
            // its stream: then it is ours to re-establish.
            progress.phase = Some(Phase::Switchover);
            let step = recovery.step(qmp, peer, &progress).await;
            recovery.annotate(&mut progress);
            match step {
                RecoveryStep::Nothing => report(&progress, None),
                RecoveryStep::Switched(sw) => {
                    report(&progress, Some(&sw));
                    switches.push(sw);
                }
                RecoveryStep::OutOfBudget(reason) => {
                    let sw = Switch { at_ms: progress.elapsed_ms, to: "postcopy-stuck".into(), reason: reason.clone() };
                    report(&progress, Some(&sw));
                    switches.push(sw);
                    return Ok(Outcome {
                        phase: Phase::Failed,
                        reason: Some(reason),
                        total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                        downtime_ms: 0,
                        transferred_bytes: progress.transferred_bytes,
                        iterations: progress.iteration,
                        strategy,
                        switches,
                        past_switchover: true,
                        postcopy_pauses: recovery.pauses,
                    });
                }
            }
            continue;
        }
        if progress.qemu_status == "pre-switchover" && !gate_passed && cancel_reason.is_none() && give_up.is_none() {
            // The guest is paused on the source; nothing has run on the destination.
            let silent = peer.since_alive();
            if *cancel.borrow() {
                // A cancel accepted before the gate wins, even if not yet seen above.
                cancel_reason = Some(CANCELLED_BY_REQUEST.into());
                request_cancel(qmp).await?;
                report(&progress, None);
            } else if silent <= GATE_FRESHNESS.max(peer.patience() * 2 / 3) {
                // Reported first: from the switchover on, the agent refuses cancels.
                progress.phase = Some(Phase::Switchover);
                report(&progress, None);
                qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"}))).await.map_err(src)?;
                gate_passed = true;
            } else {
                cancel_reason = Some(format!("the destination had not answered for {} ms at switchover", silent.as_millis()));
                request_cancel(qmp).await?;
                report(&progress, None);
            }
            continue;
        }
        if phase != Phase::Running || cancel_reason.is_some() || give_up.is_some() {
            report(&progress, None);
            continue;
        }
        let silent = peer.since_alive();
        if silent > peer.patience() {
            cancel_reason = Some(format!("the destination stopped answering ({} ms)", silent.as_millis()));
            request_cancel(qmp).await?;
            report(&progress, None);
            continue;
        }
        match policy.observe(&crate::progress::sample(&progress)) {
            Action::Continue => report(&progress, None),
            Action::SetDowntime { ms, reason } => {
                qmp.execute("migrate-set-parameters", Some(json!({"downtime-limit": ms}))).await.map_err(src)?;
                let sw = Switch { at_ms: progress.elapsed_ms, to: format!("downtime-limit {ms} ms"), reason };
                tracing::info!(reason = %sw.reason, "raising the downtime limit");
                report(&progress, Some(&sw));
                switches.push(sw);
            }
            Action::StartPostcopy { reason } => {
                qmp.execute("migrate-start-postcopy", None).await.map_err(src)?;
                let sw = Switch { at_ms: progress.elapsed_ms, to: "postcopy".into(), reason };
                tracing::info!(reason = %sw.reason, "switching to post-copy");
                report(&progress, Some(&sw));
                switches.push(sw);
            }
            Action::GiveUp { reason } => {
                tracing::warn!(%reason, "giving up");
                let sw = Switch { at_ms: progress.elapsed_ms, to: "cancel".into(), reason: reason.clone() };
                report(&progress, Some(&sw));
                switches.push(sw);
                give_up = Some(reason);
                request_cancel(qmp).await?;
            }
        }
    }
}

async fn request_cancel(qmp: &impl MigrationQmp) -> Result<(), MigrateError> {
    match qmp.execute("migrate_cancel", None).await {
        Ok(_) => Ok(()),
        Err(e) => Err(MigrateError::source(e)),
    }
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// What one look at a post-copy's stream led to.
enum RecoveryStep {
    /// Nothing to report beyond the sample.
    Nothing,
    /// Paused, or resumed: a switch to record.
    Switched(Switch),
    /// Paused longer than the budget: the migration ends here, both hosts keeping theirs.
    OutOfBudget(String),
}

/// The source's side of post-copy recovery: notices a lost stream (QEMU's
/// `postcopy-paused`, or a destination silent for [`PEER_TIMEOUT`] while post-copy
/// runs, which it then pauses), re-establishes it when the destination answers again,
/// and keeps the record of every pause.
struct Recovery {
    budget: Duration,
    pauses: Vec<PostcopyPause>,
    /// The current pause: when it began (for the budget) and the last attempt.
    paused: Option<(Instant, Option<Instant>)>,
    /// `migrate-pause` sent for the current silence.
    pause_requested: bool,
    attempts: u32,
    /// Bytes sent at the last sample that saw them grow, and when.
    moved: (u64, Instant),
}

impl Recovery {
    fn new(budget_ms: u64) -> Recovery {
        Recovery {
            budget: Duration::from_millis(budget_ms),
            pauses: vec![],
            paused: None,
            pause_requested: false,
            attempts: 0,
            moved: (0, Instant::now()),
        }
    }

    /// Writes the pause (since when) and the attempts into a progress report.
    fn annotate(&self, p: &mut Progress) {
        p.postcopy_paused_since_ms = self.paused.and(self.pauses.last().map(|x| x.paused_at_ms));
        p.recovery_attempts = self.attempts;
    }

    /// QEMU went on (post-copy running again, or completed) after a pause: the pause
    /// ends. Returns the switch to record.
    fn resumed_if_paused(&mut self, status: &str) -> Option<Switch> {
        if !matches!(status, "postcopy-active" | "completed") {
            return None;
        }
        self.pause_requested = false;
        let (since, _) = self.paused.take()?;
        let pause = self.pauses.last_mut()?;
        pause.resumed_at_ms = Some(now_ms());
        Some(Switch {
            at_ms: 0,
            to: "postcopy-recovered".into(),
            reason: format!(
                "post-copy's stream re-established after {} ms paused, at attempt {}",
                since.elapsed().as_millis(),
                pause.attempts
            ),
        })
    }

    async fn step(&mut self, qmp: &impl MigrationQmp, peer: &impl Peer, p: &Progress) -> RecoveryStep {
        let status = p.qemu_status.as_str();
        if let Some(mut sw) = self.resumed_if_paused(status) {
            sw.at_ms = p.elapsed_ms;
            tracing::info!(reason = %sw.reason, "post-copy recovered");
            return RecoveryStep::Switched(sw);
        }
        let silent = peer.since_alive();
        if p.transferred_bytes > self.moved.0 {
            self.moved = (p.transferred_bytes, Instant::now());
        }
        // Lost is a destination silent *and* a stream that stopped moving: a silent
        // agent beside a flowing stream (restarting, say) is no reason to pause.
        let stalled = self.moved.1.elapsed() > PEER_TIMEOUT;
        if matches!(status, "postcopy-active" | "postcopy-recover" | "postcopy-recover-setup")
            && silent > PEER_TIMEOUT
            && stalled
            && !self.pause_requested
        {
            // The link may be gone without TCP knowing for minutes: end this stream now,
            // so a new one can be made when the destination is back.
            tracing::warn!(silent_ms = silent.as_millis() as u64, status, "destination silent during post-copy: pausing it");
            self.pause_requested = true;
            if let Err(e) = qmp.execute_oob("migrate-pause", None).await {
                tracing::warn!(error = %e, "migrate-pause");
            }
            return RecoveryStep::Nothing;
        }
        if status != "postcopy-paused" {
            return RecoveryStep::Nothing;
        }
        let Some((since, last_attempt)) = self.paused else {
            let cause = if self.pause_requested {
                format!(
                    "the destination stopped answering ({} ms) during post-copy; its stream was ended to be re-established",
                    silent.as_millis()
                )
            } else {
                "QEMU lost post-copy's stream".to_string()
            };
            self.paused = Some((Instant::now(), None));
            self.pauses.push(PostcopyPause {
                paused_at_ms: now_ms(),
                resumed_at_ms: None,
                attempts: 0,
                cause: cause.clone(),
                last_error: None,
            });
            tracing::warn!(%cause, "post-copy paused");
            let reason = format!(
                "{cause}; the guest waits at the destination for the pages still here; re-establishing within {} ms",
                self.budget.as_millis()
            );
            return RecoveryStep::Switched(Switch { at_ms: p.elapsed_ms, to: "postcopy-paused".into(), reason });
        };
        if let Some(why) = peer.lost() {
            return RecoveryStep::OutOfBudget(format!(
                "post-copy paused and the destination no longer holds the VM ({why}): whatever the guest did there since the switch is lost; \
                 the source keeps its copy paused (memory as of the switch, device state sent), nothing to resume"
            ));
        }
        if since.elapsed() > self.budget {
            let pause = self.pauses.last().cloned().unwrap_or_default();
            return RecoveryStep::OutOfBudget(format!(
                "post-copy paused since {} ms after the epoch and its stream not re-established within the {} ms budget ({} attempts{}): \
                 the destination holds the VM's running state (vCPUs and devices, paused waiting for pages) and the {} MiB of memory already sent; \
                 the source holds the remaining {} MiB, kept paused; neither is torn down, and it cannot be undone: restore the link and recover, or lose the VM",
                pause.paused_at_ms,
                self.budget.as_millis(),
                pause.attempts,
                pause.last_error.map(|e| format!(", last: {e}")).unwrap_or_default(),
                p.transferred_bytes >> 20,
                p.remaining_bytes >> 20,
            ));
        }
        let due = last_attempt.is_none_or(|t| t.elapsed() >= RECOVERY_RETRY_INTERVAL);
        if !due || silent > GATE_FRESHNESS {
            return RecoveryStep::Nothing;
        }
        self.paused = Some((since, Some(Instant::now())));
        self.attempts += 1;
        let result = match peer.recover().await {
            Ok(uri) => qmp
                .execute("migrate", Some(json!({ "uri": uri, "resume": true })))
                .await
                .map(drop)
                .map_err(|e| format!("resuming to {uri}: {e}")),
            Err(e) => Err(format!("the destination could not listen again: {e}")),
        };
        if let Some(pause) = self.pauses.last_mut() {
            pause.attempts += 1;
            if let Err(e) = &result {
                tracing::warn!(error = %e, attempt = pause.attempts, "post-copy recovery attempt failed");
                pause.last_error = Some(e.clone());
            } else {
                tracing::info!(attempt = pause.attempts, "post-copy resuming on a new stream");
            }
        }
        RecoveryStep::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(v: &Value, name: &str) -> Option<bool> {
        v["capabilities"].as_array()?.iter().find(|c| c["capability"] == name).and_then(|c| c["state"].as_bool())
    }

    #[test]
    fn zstd_on_two_channels_sets_multifd_on_both_ends_and_its_compression() {
        let s = Stream { multifd_channels: 2, compression: Compression::Zstd, ..Stream::default() };

        let (dest, source) = (caps(&s, None), caps(&s, Some(false)));

        assert_eq!((cap(&dest, "multifd"), cap(&source, "multifd"), cap(&source, "xbzrle")), (Some(true), Some(true), Some(false)));
        assert_eq!(s.params(false), Some(json!({"multifd-channels": 2, "multifd-compression": "zstd"})));
    }

    #[test]
    fn xbzrle_is_the_sources_alone_with_its_cache() {
        let s = Stream { postcopy_ready: true, compression: Compression::Xbzrle, ..Stream::default() };

        assert_eq!(cap(&caps(&s, None), "xbzrle"), None);
        assert_eq!(cap(&caps(&s, Some(false)), "xbzrle"), Some(true));
        assert_eq!(s.params(false), None);
        assert_eq!(s.params(true), Some(json!({"xbzrle-cache-size": XBZRLE_CACHE_BYTES})));
    }

    #[test]
    fn preempt_is_never_asked_without_postcopy() {
        let strategy = crate::Policy::new(crate::Mode::Precopy, crate::Limits::default(), 1 << 30, None).strategy().clone();
        let s = Stream::of(&Strategy { postcopy_preempt: true, ..strategy });

        assert!(!s.postcopy_preempt && cap(&caps(&s, None), "postcopy-preempt") == Some(false));
    }
}
