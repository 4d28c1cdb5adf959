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
//! Order matters: capabilities that must match (`postcopy-ram`) are set on the
//! destination before it listens and on the source before `migrate`; QEMU refuses to
//! change capabilities once a migration runs, which is why the strategy is picked up
//! front and only parameters (and the post-copy switch) change on the way.

use crate::error::MigrateError;
use crate::phase::Phase;
use crate::policy::{Action, Policy, Strategy, Switch};
use crate::progress::{phase_of, Progress};
use crate::qmp::MigrationQmp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often QEMU's statistics are read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// A destination silent for longer than this is taken for gone while memory moves.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1500);
/// At the switchover gate the destination must have answered within this.
pub const GATE_FRESHNESS: Duration = Duration::from_millis(1000);

/// The destination, as the source's migration sees it.
pub trait Peer {
    /// Time since the destination (its agent and its QEMU) last answered a probe.
    fn since_alive(&self) -> Duration;
}

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
}

/// Capabilities: `postcopy-ram` must match on both ends; `auto_converge` (source only,
/// `None` on the destination) and the switchover gate are the source's.
fn caps(postcopy_ready: bool, auto_converge: Option<bool>) -> Value {
    let mut c = vec![json!({"capability": "events", "state": true}), json!({"capability": "postcopy-ram", "state": postcopy_ready})];
    if let Some(ac) = auto_converge {
        c.push(json!({"capability": "auto-converge", "state": ac}));
        c.push(json!({"capability": "pause-before-switchover", "state": true}));
    }
    json!({ "capabilities": c })
}

/// Prepares a destination QEMU started with `-incoming defer`: sets the capabilities
/// the source's strategy needs and listens on `listen_host` (port chosen by the kernel).
/// Returns the URI the source must send to.
pub async fn listen_incoming(qmp: &impl MigrationQmp, postcopy_ready: bool, listen_host: &str) -> Result<String, MigrateError> {
    qmp.execute("migrate-set-capabilities", Some(caps(postcopy_ready, None))).await.map_err(MigrateError::destination)?;
    qmp.execute("migrate-incoming", Some(json!({ "uri": format!("tcp:{listen_host}:0") }))).await.map_err(MigrateError::destination)?;
    let info = qmp.execute("query-migrate", None).await.map_err(MigrateError::destination)?;
    let addr =
        info["socket-address"].as_array().and_then(|a| a.first()).ok_or_else(|| MigrateError::NoIncomingAddress(info.to_string()))?;
    let port = addr["port"].as_str().map(String::from).or_else(|| addr["port"].as_u64().map(|p| p.to_string()));
    let port = port.ok_or_else(|| MigrateError::NoIncomingAddress(info.to_string()))?;
    Ok(format!("tcp:{listen_host}:{port}"))
}

/// Measures the guest's dirty rate over `ms` milliseconds (QEMU's page sampling),
/// in bytes/s; `None` if QEMU could not measure it.
pub async fn measure_dirty_rate(qmp: &impl MigrationQmp, ms: u64) -> Option<u64> {
    let args = json!({"calc-time": ms, "calc-time-unit": "millisecond", "mode": "page-sampling"});
    if let Err(e) = qmp.execute("calc-dirty-rate", Some(args)).await {
        tracing::debug!(error = %e, "calc-dirty-rate unavailable");
        return None;
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(ms + 3000) {
        tokio::time::sleep(Duration::from_millis(ms.min(200))).await;
        let v = qmp.execute("query-dirty-rate", None).await.ok()?;
        if v["status"] == "measured" {
            // QEMU reports MB/s (MiB/s).
            return v["dirty-rate"].as_u64().map(|r| r << 20);
        }
    }
    None
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
    qmp.execute("migrate-set-capabilities", Some(caps(strategy.postcopy_ready, Some(strategy.auto_converge)))).await.map_err(src)?;
    let mut params = json!({
        "downtime-limit": strategy.downtime_ms,
        "max-bandwidth": strategy.bandwidth_bps,
    });
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
        let info = qmp.execute("query-migrate", None).await.map_err(src)?;
        let mut progress = crate::progress::from_query_after(&info, &last);
        last = progress.clone();
        let phase = phase_of(&progress.qemu_status);
        progress.phase = Some(phase);
        if phase.is_final() {
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
            });
        }
        if gate_passed {
            // Past the gate the migration is QEMU's to finish; only its end matters.
            progress.phase = Some(Phase::Switchover);
            report(&progress, None);
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
            } else if silent <= GATE_FRESHNESS {
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
        if silent > PEER_TIMEOUT {
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
