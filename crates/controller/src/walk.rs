//! Walkabout mode: VMs wander on their own, each hop a real live migration to a host
//! chosen at random among those with room; and musical chairs: VMs circulate while,
//! round after round, a random host is drained and powered off, until the VMs no
//! longer fit. Both record every hop's downtime; the game reports its survivors.

use crate::cluster::{Cluster, ClusterVmState, HostStatus, Maintenance};
use crate::error::ControllerError;
use crate::events::Subject;
use crate::plans::PlanStatus;
use crate::{lock, now_ms};
use std::time::{Duration, Instant};

pub use walkabout_api::{Hop, Round, Survivor, WalkKind, WalkOptions, WalkRecord, WalkStatus};

/// A small xorshift generator: the walk needs variety, not cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock.
    pub fn new() -> Rng {
        Rng(now_ms() ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % (n.max(1) as u64)).unwrap_or(0)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

impl Cluster {
    /// All walks and games.
    pub fn walks(&self) -> Vec<WalkRecord> {
        lock(&self.inner.walks).values().cloned().collect()
    }

    /// One walk or game.
    pub fn walk(&self, id: &str) -> Result<WalkRecord, ControllerError> {
        lock(&self.inner.walks).get(id).cloned().ok_or_else(|| ControllerError::not_found("walk", id))
    }

    /// Stops a walk or game: no new hop starts; hops under way finish.
    pub fn stop_walk(&self, id: &str) -> Result<WalkRecord, ControllerError> {
        let mut walks = lock(&self.inner.walks);
        let w = walks.get_mut(id).ok_or_else(|| ControllerError::not_found("walk", id))?;
        if w.status == WalkStatus::Running {
            w.status = WalkStatus::Stopped;
        }
        Ok(w.clone())
    }

    fn update_walk(&self, id: &str, f: impl FnOnce(&mut WalkRecord)) -> Option<WalkRecord> {
        let mut walks = lock(&self.inner.walks);
        let w = walks.get_mut(id)?;
        f(w);
        Some(w.clone())
    }

    fn new_walk(&self, kind: WalkKind) -> Result<WalkRecord, ControllerError> {
        let id = format!("w{}", self.inner.store.next("walk")?);
        let w = WalkRecord {
            id: id.clone(),
            kind,
            status: WalkStatus::Running,
            started_ms: now_ms(),
            finished_ms: None,
            hops: vec![],
            rounds: vec![],
            survivors: vec![],
            result: None,
        };
        lock(&self.inner.walks).insert(id, w.clone());
        Ok(w)
    }

    /// Starts a walk: for `duration_ms`, VMs hop to random hosts with room. Returns at
    /// once; poll the walk.
    pub fn start_walk(&self, opts: WalkOptions) -> Result<WalkRecord, ControllerError> {
        let w = self.new_walk(WalkKind::Walk)?;
        self.inner.events.emit(
            Subject::Walk,
            &w.id,
            format!("walk {} starts for {} s", w.id, opts.duration_ms / 1000),
            serde_json::Value::Null,
        );
        let c = self.clone();
        let id = w.id.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_millis(opts.duration_ms);
            c.wander(&id, deadline, opts).await;
            c.end_walk(&id, format!("walked for {} s", opts.duration_ms / 1000));
        });
        Ok(w)
    }

    /// Starts musical chairs. Returns at once; poll the walk.
    pub fn start_musical_chairs(&self, opts: WalkOptions) -> Result<WalkRecord, ControllerError> {
        let w = self.new_walk(WalkKind::MusicalChairs)?;
        self.inner.events.emit(Subject::Walk, &w.id, format!("musical chairs {} starts", w.id), serde_json::Value::Null);
        let c = self.clone();
        let id = w.id.clone();
        tokio::spawn(async move {
            let result = c.musical_chairs(&id, opts).await;
            c.end_walk(&id, result);
        });
        Ok(w)
    }

    fn running(&self, id: &str) -> bool {
        !*self.inner.shutdown.borrow() && self.walk(id).map(|w| w.status == WalkStatus::Running).unwrap_or(false)
    }

    fn end_walk(&self, id: &str, result: String) {
        let survivors = self
            .vms()
            .into_iter()
            .filter(|v| v.is_active())
            .map(|v| Survivor {
                vm: v.name,
                host: v.host,
                heartbeats: v.guest.heartbeats,
                seq_breaks: v.guest.seq_breaks,
                corrupt_pages: v.guest.corrupt_pages,
            })
            .collect();
        if let Some(w) = self.update_walk(id, |w| {
            if w.status == WalkStatus::Running {
                w.status = WalkStatus::Finished;
            }
            w.finished_ms = Some(now_ms());
            w.survivors = survivors;
            w.result = Some(result.clone());
        }) {
            self.inner.events.emit(Subject::Walk, id, format!("{id} ended: {result}"), serde_json::to_value(&w).unwrap_or_default());
        }
    }

    /// Hops VMs about until `deadline` (or the walk is stopped), then waits for the hops
    /// under way.
    async fn wander(&self, id: &str, deadline: Instant, opts: WalkOptions) {
        let mut rng = Rng::new();
        let mut outstanding: Vec<String> = vec![];
        let mut rested: std::collections::BTreeMap<String, Instant> = Default::default();
        loop {
            let mut still = vec![];
            for mid in outstanding.drain(..) {
                match self.migration(&mid) {
                    Ok(m) if m.phase.is_final() => {
                        rested.insert(m.vm.clone(), Instant::now() + Duration::from_millis(opts.pause_ms));
                        let hop = Hop {
                            migration: m.id.clone(),
                            vm: m.vm.clone(),
                            from: m.from.clone(),
                            to: m.to.clone(),
                            result: m.phase,
                            downtime_ms: m.downtime_ms,
                            total_ms: m.total_ms,
                            reason: m.reason.clone(),
                        };
                        self.update_walk(id, |w| w.hops.push(hop));
                    }
                    Ok(_) => still.push(mid),
                    Err(_) => {}
                }
            }
            outstanding = still;
            let go_on = Instant::now() < deadline && self.running(id);
            if !go_on && outstanding.is_empty() {
                return;
            }
            if go_on && outstanding.len() < opts.parallel.max(1) as usize {
                if let Some((vm, to)) = self.pick_hop(&mut rng, &rested) {
                    match self.try_migrate(&vm, &to, None, "walkabout") {
                        Ok(Some(m)) => outstanding.push(m.id),
                        Ok(None) => {}
                        Err(e) => tracing::debug!(vm, to, error = %e, "hop not possible now"),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A random VM that is not moving, and a random other host in service with room.
    fn pick_hop(&self, rng: &mut Rng, rested: &std::collections::BTreeMap<String, Instant>) -> Option<(String, String)> {
        let view = self.view();
        let moving: Vec<String> = self.migrations().into_iter().filter(|m| !m.phase.is_final()).map(|m| m.vm).collect();
        let now = Instant::now();
        let vms: Vec<_> = view
            .vms
            .values()
            .filter(|v| v.state == ClusterVmState::Running && !moving.contains(&v.name) && !rested.get(&v.name).is_some_and(|t| *t > now))
            .filter(|v| v.host.as_deref().and_then(|h| view.hosts.get(h)).is_some_and(|h| h.status == HostStatus::Up))
            .collect();
        if vms.is_empty() {
            return None;
        }
        let vm = vms[rng.below(vms.len())];
        let hosts: Vec<_> = view
            .hosts
            .values()
            .filter(|h| h.accepts_vms() && Some(&h.name) != vm.host.as_ref() && view.free_mib(&h.name) >= vm.memory_mib)
            .collect();
        if hosts.is_empty() {
            return None;
        }
        Some((vm.name.clone(), hosts[rng.below(hosts.len())].name.clone()))
    }

    async fn musical_chairs(&self, id: &str, opts: WalkOptions) -> String {
        let mut rng = Rng::new();
        for round in 1u32.. {
            let deadline = Instant::now() + Duration::from_millis(opts.duration_ms);
            self.wander(id, deadline, opts).await;
            if !self.running(id) {
                return format!("stopped in round {round}");
            }
            let chairs: Vec<String> = self
                .hosts()
                .into_iter()
                .filter(|h| h.status == HostStatus::Up && h.maintenance == Maintenance::Active)
                .map(|h| h.name)
                .collect();
            if chairs.is_empty() {
                return format!("no host left in round {round}");
            }
            let host = chairs[rng.below(chairs.len())].clone();
            self.inner.events.emit(
                Subject::Walk,
                id,
                format!("round {round}: the music stops; {host} is drained and powered off"),
                serde_json::Value::Null,
            );
            let plan = match self.drain(&host) {
                Ok(p) => p,
                Err(e) => {
                    let result = format!("the VMs no longer fit without {host}: {e}");
                    self.update_walk(id, |w| w.rounds.push(Round { round, host: host.clone(), plan: None, result: result.clone() }));
                    return format!("game over in round {round}: {result}");
                }
            };
            let status = loop {
                match self.plan(&plan.id) {
                    Ok(p) if p.status.is_final() => break p,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(300)).await,
                    Err(e) => return format!("round {round}: plan {} vanished: {e}", plan.id),
                }
                if *self.inner.shutdown.borrow() {
                    return format!("controller stopped in round {round}");
                }
            };
            if status.status != PlanStatus::Completed {
                let result = format!("draining {host} failed: {}", status.reason.unwrap_or_default());
                self.update_walk(id, |w| {
                    w.rounds.push(Round { round, host: host.clone(), plan: Some(plan.id.clone()), result: result.clone() })
                });
                return format!("game over in round {round}: {result}");
            }
            let result = match self.remove_host(&host) {
                Ok(()) => format!("{host} drained and taken out of the cluster"),
                Err(e) => format!("{host} drained but not taken out: {e}"),
            };
            self.update_walk(id, |w| w.rounds.push(Round { round, host: host.clone(), plan: Some(plan.id.clone()), result }));
        }
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_stays_below_its_bound() {
        let mut r = Rng(12345);
        for n in 1..50 {
            assert!(r.below(n) < n);
        }
    }
}
