//! A walk: VMs hop, one live migration at a time each, to a host chosen at random among
//! those in service with room, every hop asked of the controller as a move.

use super::{Games, TICK};
use crate::now_ms;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;
use walkabout_api::{ClusterSummary, ClusterVmState, ControllerClient, Hop, HostStatus, PlanRecord, WalkOptions};

/// A small xorshift generator: the walk needs variety, not cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock.
    pub fn new() -> Rng {
        Rng(now_ms() ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// Seeded with `seed` (the same seed, the same numbers).
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
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

/// A hop asked for and not yet over: its move plan and its VM.
struct Outstanding {
    plan: String,
    vm: String,
}

impl Games {
    /// Hops VMs about until `deadline` (or the walk is stopped), then waits for the hops
    /// under way.
    pub(super) async fn wander(&self, client: &ControllerClient, id: &str, deadline: Instant, opts: WalkOptions) {
        let mut rng = Rng::new();
        let mut outstanding: Vec<Outstanding> = vec![];
        let mut rested: BTreeMap<String, Instant> = BTreeMap::new();
        let mut stop = self.stop.clone();
        loop {
            let mut still = vec![];
            for o in outstanding.drain(..) {
                match client.plan(&o.plan).await {
                    Ok(p) if p.status.is_final() => {
                        rested.insert(o.vm.clone(), Instant::now() + Duration::from_millis(opts.pause_ms));
                        for hop in hops(client, &p).await {
                            self.update_walk(id, |w| w.hops.push(hop));
                        }
                    }
                    Ok(_) => still.push(o),
                    Err(e) if e.is_transport() => still.push(o),
                    Err(e) => tracing::warn!(walk = id, plan = %o.plan, error = %e, "lost track of a hop"),
                }
            }
            outstanding = still;
            let go_on = Instant::now() < deadline && self.running(id);
            if !go_on && outstanding.is_empty() {
                return;
            }
            if go_on && outstanding.len() < opts.parallel.max(1) as usize {
                if let Ok(cluster) = client.cluster().await {
                    let busy: Vec<&str> = outstanding.iter().map(|o| o.vm.as_str()).collect();
                    if let Some((vm, to)) = pick_hop(&cluster, &mut rng, &rested, &busy) {
                        match client.move_vm(&vm, &to).await {
                            Ok(p) => outstanding.push(Outstanding { plan: p.id, vm }),
                            // Refused (the VM moves already, the host filled up or went
                            // into maintenance): another hop, another time.
                            Err(e) => tracing::debug!(vm, to, error = %e, "hop not possible now"),
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// The hops of a finished move plan: each of its steps that ran a migration.
pub(super) async fn hops(client: &ControllerClient, p: &PlanRecord) -> Vec<Hop> {
    let mut out = vec![];
    for mid in p.steps.iter().filter_map(|s| s.migration.as_deref()) {
        match client.migration(mid).await {
            Ok(m) if m.phase.is_final() => out.push(Hop {
                migration: m.id,
                vm: m.vm,
                from: m.from,
                to: m.to,
                result: m.phase,
                downtime_ms: m.downtime_ms,
                observed_downtime_ms: m.observed_downtime_ms,
                probe_error: m.probe_error,
                total_ms: m.total_ms,
                reason: m.reason,
            }),
            Ok(_) => {}
            Err(e) => tracing::warn!(migration = mid, error = %e, "cannot read a hop's migration"),
        }
    }
    out
}

/// A random running VM that is neither moving nor resting, and a random other host that
/// is up, in service, and has room for it.
pub(crate) fn pick_hop(
    cluster: &ClusterSummary,
    rng: &mut Rng,
    rested: &BTreeMap<String, Instant>,
    busy: &[&str],
) -> Option<(String, String)> {
    let now = Instant::now();
    let up = |h: &str| cluster.hosts.iter().any(|x| x.name == h && x.status == HostStatus::Up);
    let vms: Vec<_> = cluster
        .vms
        .iter()
        .filter(|v| v.state == ClusterVmState::Running && !busy.contains(&v.name.as_str()))
        .filter(|v| rested.get(&v.name).is_none_or(|t| *t <= now))
        .filter(|v| v.host.as_deref().is_some_and(up))
        .collect();
    if vms.is_empty() {
        return None;
    }
    let vm = vms[rng.below(vms.len())];
    let room = |h: &walkabout_api::Host| {
        let placed: u64 = cluster.vms.iter().filter(|v| v.host.as_deref() == Some(&h.name) && v.is_active()).map(|v| v.memory_mib).sum();
        h.capacity_mib.saturating_sub(placed).min(h.free_mib)
    };
    let hosts: Vec<_> =
        cluster.hosts.iter().filter(|h| h.accepts_vms() && Some(&h.name) != vm.host.as_ref() && room(h) >= vm.memory_mib).collect();
    if hosts.is_empty() {
        return None;
    }
    Some((vm.name.clone(), hosts[rng.below(hosts.len())].name.clone()))
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
