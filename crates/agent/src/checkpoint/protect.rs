//! Protection: one task per protected VM that takes a live checkpoint every
//! `every_ms`, ships it to the replica agent and commits it there with `keep`.
//!
//! The protection is part of the VM's record, so a restarted agent starts the loop
//! again. A failed checkpoint or shipment is counted (never fatal: the VM runs on, on a
//! consistent chain) and retried at the next tick. After a shipment the memory files of
//! older local checkpoints are removed (the replica holds the newest; it is the next
//! delta's base) and the disk layers under the newest `keep - 1` merge into the base
//! (`chain.rs`), so the running VM's chains stay at most `keep` layers deep.

use crate::error::AgentError;
use crate::vms::{lock, now_ms, Agent};
use std::time::Duration;
use walkabout_api::{CheckpointMethod, FileKind, Protection, ProtectionStatus, VmInfo, VmState};

/// Shortest time between checkpoints.
const MIN_EVERY_MS: u64 = 500;

/// How long until a protection's first checkpoint on this host, at `now_ms`: `every_ms`
/// after the VM's checkpoint clock (its newest checkpoint on the replica, wherever it
/// was taken, or the protection's start), at once if that has passed, or a full
/// `every_ms` when no clock was given. A VM that moves more often than `every_ms` is
/// thus still checkpointed: on arrival, when one is overdue.
fn first_due(p: &Protection, now_ms: u64) -> Duration {
    let due_ms = match p.clock_from_ms {
        Some(taken) => taken.saturating_add(p.every_ms).saturating_sub(now_ms).min(p.every_ms),
        None => p.every_ms,
    };
    Duration::from_millis(due_ms)
}

/// A protected VM's loop and its status.
pub(crate) struct Running {
    /// Tells the loop to end after its current round (a checkpoint is never cut short:
    /// that could leave the guest paused).
    stop: tokio::sync::watch::Sender<bool>,
    pub(crate) status: ProtectionStatus,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Agent {
    /// Protects VM `name`: checkpoints every `p.every_ms` shipped to `p.replica_url`.
    pub async fn protect(&self, name: &str, p: Protection) -> Result<VmInfo, AgentError> {
        if p.every_ms < MIN_EVERY_MS {
            return Err(AgentError::InvalidRequest { reason: format!("every_ms {} is below the {MIN_EVERY_MS} ms minimum", p.every_ms) });
        }
        if p.keep == 0 {
            return Err(AgentError::InvalidRequest { reason: "keep must be at least 1".into() });
        }
        if self.is_own_url(&p.replica_url) {
            return Err(AgentError::InvalidRequest {
                reason: format!("cannot protect {name} toward {}: that is this agent; a replica must be another host", p.replica_url),
            });
        }
        walkabout_api::AgentClient::new(&p.replica_url, walkabout_api::ClientOptions::default())
            .map_err(|e| AgentError::InvalidRequest { reason: e.to_string() })?;
        let vm = self.vm(name)?;
        let mut vm = vm.lock().await;
        if !vm.record.state.is_owned() || !vm.record.state.is_active() {
            return Err(AgentError::InvalidState { vm: name.into(), op: "protect", state: vm.record.state });
        }
        vm.record.protection = Some(p.clone());
        self.inner.store.put(&vm.record)?;
        self.start_protection(name, p);
        tracing::info!(vm = %name, "protection started");
        Ok(self.info_of(&vm))
    }

    /// Stops protecting VM `name` (its replica keeps what it has).
    pub async fn unprotect(&self, name: &str) -> Result<VmInfo, AgentError> {
        let vm = self.vm(name)?;
        let mut vm = vm.lock().await;
        vm.record.protection = None;
        self.inner.store.put(&vm.record)?;
        lock(&self.inner.protections).remove(name);
        tracing::info!(vm = %name, "protection stopped");
        Ok(self.info_of(&vm))
    }

    /// How VM `name`'s protection is going.
    pub(crate) fn protection_status(&self, name: &str) -> ProtectionStatus {
        lock(&self.inner.protections).get(name).map(|r| r.status.clone()).unwrap_or_default()
    }

    /// Notes that VM `name` was stopped because this agent lost the controller (shown
    /// in its [`ProtectionStatus::fenced_ms`]).
    pub fn note_fenced(&self, name: &str, at_ms: u64) {
        if let Some(r) = lock(&self.inner.protections).get_mut(name) {
            r.status.fenced_ms = Some(at_ms);
        }
    }

    /// Starts the loops of the protected VMs found at start.
    pub(crate) fn resume_protections(&self) {
        let recs = match self.inner.store.list() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read VM records to resume protections");
                return;
            }
        };
        for r in recs {
            if let (Some(p), true) = (r.protection, r.state.is_active() && r.state.is_owned()) {
                tracing::info!(vm = %r.spec.name, "protection resumed");
                self.start_protection(&r.spec.name, p);
            }
        }
    }

    fn start_protection(&self, name: &str, p: Protection) {
        let agent = self.clone();
        let vm = name.to_string();
        let mut map = lock(&self.inner.protections);
        let status = map.remove(name).map(|r| r.status.clone()).unwrap_or_default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move { agent.protection_loop(&vm, p, stopped).await });
        map.insert(name.to_string(), Running { stop, status });
    }

    async fn protection_loop(&self, name: &str, p: Protection, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let every = Duration::from_millis(p.every_ms);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first_due(&p, now_ms()), every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => break,
            }
            if *stopped.borrow() {
                break;
            }
            let state = match self.vm(name) {
                Ok(vm) => vm.lock().await.record.state,
                Err(_) => break,
            };
            match state {
                VmState::Running => {}
                VmState::Stopped => break,
                _ => continue,
            }
            let r = self.protect_once(name, &p).await;
            if *stopped.borrow() {
                break;
            }
            let mut map = lock(&self.inner.protections);
            let Some(run) = map.get_mut(name) else { break };
            match r {
                Ok(ck) => {
                    run.status.checkpoints += 1;
                    run.status.failures = 0;
                    run.status.last_error = None;
                    run.status.last = Some(ck);
                }
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "protection checkpoint failed");
                    run.status.failures += 1;
                    run.status.last_error = Some(e.to_string());
                }
            }
        }
        tracing::info!(vm = %name, "protection loop ended");
    }

    /// One round: checkpoint, ship, commit, then drop older local memory files.
    async fn protect_once(&self, name: &str, p: &Protection) -> Result<walkabout_api::Checkpoint, AgentError> {
        let mut ck = self.take_checkpoint(name, CheckpointMethod::Live).await?;
        let sent = self.ship(&ck, &p.replica_url, p.keep).await?;
        ck.shipped_bytes = Some(sent);
        self.inner.store.put_checkpoint(&ck)?;
        let dir = self.checkpoint_dir(name);
        for mut old in self.local_checkpoints(name)?.into_iter().filter(|c| c.n < ck.n && c.problem.is_none()) {
            for f in old.files.iter().filter(|f| f.kind == FileKind::Memory) {
                let _ = std::fs::remove_file(dir.join(&f.name));
            }
            old.verified = false;
            old.problem = Some(format!("memory file removed after {} was shipped (its disk layers stay under the VM)", ck.id));
            self.inner.store.put_checkpoint(&old)?;
        }
        tracing::info!(vm = %name, id = %ck.id, bytes = sent, pause_ms = ck.pause_ms, at = now_ms(), "protected: checkpoint shipped");
        // The replica holds this checkpoint's layers by name: the older ones under them
        // merge into the base here, so the running chain stays `keep` layers deep.
        if let Err(e) = self.trim_chain(name, &ck, p.keep).await {
            tracing::warn!(vm = %name, id = %ck.id, error = %e, "cannot trim the disk chain; it grows until the next round");
        }
        Ok(ck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every(ms: u64, clock_from_ms: Option<u64>) -> Protection {
        Protection { replica: "h2".into(), replica_url: "https://h2".into(), every_ms: ms, keep: 2, fence_ms: 0, clock_from_ms }
    }

    #[test]
    fn the_first_checkpoint_on_a_new_host_keeps_the_vms_own_clock() {
        // Never checkpointed: a full period after the protection starts.
        assert_eq!(first_due(&every(12_000, None), 100_000), Duration::from_millis(12_000));
        // The last one 5 s ago (on another host): the next in 7 s, not 12.
        assert_eq!(first_due(&every(12_000, Some(95_000)), 100_000), Duration::from_millis(7_000));
        // Overdue (the VM kept moving): at once.
        assert_eq!(first_due(&every(12_000, Some(60_000)), 100_000), Duration::ZERO);
        // A clock ahead of this host's never delays it past one period.
        assert_eq!(first_due(&every(12_000, Some(200_000)), 100_000), Duration::from_millis(12_000));
    }
}
