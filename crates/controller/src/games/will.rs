//! Free will: guests ask to move, and are answered.
//!
//! A VM created with free will writes `walk any`, `walk least-loaded` or `walk HOST` on
//! its `org.walkabout.0` port; its agent queues the request (`GET /v1/will` on the
//! agent). Here the controller, as any client of its own API, polls the agents of the
//! hosts that are up, decides where each request can go ([`choose`]: a pure function of
//! the cluster), asks for the move (`POST /v1/vms/{vm}/move`: a `place` plan under the
//! controller's limits and safety), waits for it, and answers the guest through the
//! agent where it runs by then (`POST /v1/vms/{vm}/will/answer`): `went to h2`,
//! `refused: h3 is draining`, `refused: no host has room`. Each request and answer is
//! an event, and `GET /v1/will` lists them.

use super::{Games, Rng, TICK};
use crate::{lock, now_ms};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use walkabout_api::{
    AgentClient, ClientOptions, ClusterSummary, ClusterVmState, ControllerClient, HostStatus, Maintenance, PlanStatus, WillAnswer, WillAsk,
    WillRecord, WillRequest,
};

/// Requests remembered in `GET /v1/will`.
const KEEP: usize = 200;
/// How long a free-will move may take before the guest is told it failed.
const MOVE_TIMEOUT: Duration = Duration::from_secs(300);

/// Room for more VMs on `host`, MiB: its capacity less what is placed there, at most
/// what its agent says is free.
pub(crate) fn room(cluster: &ClusterSummary, host: &walkabout_api::Host) -> u64 {
    let placed: u64 = cluster.vms.iter().filter(|v| v.host.as_deref() == Some(&host.name) && v.is_active()).map(|v| v.memory_mib).sum();
    host.capacity_mib.saturating_sub(placed).min(host.free_mib)
}

/// Where `vm`'s request `ask` takes it in `cluster`, or why it cannot move (the refusal
/// the guest reads, after `refused: `).
pub fn choose(cluster: &ClusterSummary, vm: &str, ask: &WillAsk, rng: &mut Rng) -> Result<String, String> {
    let v = cluster.vms.iter().find(|v| v.name == vm).ok_or_else(|| format!("the controller does not know VM {vm}"))?;
    if v.state != ClusterVmState::Running {
        return Err(format!("{vm} is {} and cannot move now", v.state));
    }
    let here = v.host.clone().unwrap_or_default();
    let fits = |h: &walkabout_api::Host| room(cluster, h) >= v.memory_mib;
    match ask {
        WillAsk::Host(h) => {
            let host = cluster.hosts.iter().find(|x| &x.name == h).ok_or_else(|| format!("no host is named {h}"))?;
            if *h == here {
                Err(format!("{vm} is on {h} already"))
            } else if host.status != HostStatus::Up {
                Err(format!("{h} is down"))
            } else if host.maintenance == Maintenance::Draining {
                Err(format!("{h} is draining"))
            } else if !host.maintenance.accepts_vms() {
                Err(format!("{h} is out of service (maintenance)"))
            } else if !fits(host) {
                Err(format!("{h} has no room ({} MiB free, {vm} needs {})", room(cluster, host), v.memory_mib))
            } else {
                Ok(h.clone())
            }
        }
        WillAsk::Any | WillAsk::LeastLoaded => {
            let open: Vec<&walkabout_api::Host> = cluster.hosts.iter().filter(|h| h.accepts_vms() && h.name != here && fits(h)).collect();
            if open.is_empty() {
                return Err("no host has room".into());
            }
            let pick = match ask {
                WillAsk::Any => open[rng.below(open.len())],
                _ => open.iter().copied().max_by_key(|h| (room(cluster, h), std::cmp::Reverse(h.name.clone()))).unwrap_or(open[0]),
            };
            Ok(pick.name.clone())
        }
    }
}

impl Games {
    /// The free-will requests seen, and their answers.
    pub fn will_records(&self) -> Vec<WillRecord> {
        lock(&self.will).records.clone()
    }

    /// Polls the agents for free-will requests and serves them, until the controller
    /// stops.
    pub(super) async fn free_will(self: Arc<Self>, client: ControllerClient) {
        let mut stop = self.stop.clone();
        let mut rng = Rng::new();
        loop {
            if *stop.borrow() {
                return;
            }
            if let Ok(cluster) = client.cluster().await {
                for h in cluster.hosts.iter().filter(|h| h.status == HostStatus::Up) {
                    let Ok(agent) = AgentClient::new(&h.url, ClientOptions::default()) else { continue };
                    let Ok(reqs) = agent.with_timeout(Duration::from_secs(2)).will_requests().await else { continue };
                    for req in reqs {
                        self.take(&client, &cluster, &h.name, req, &mut rng);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK * 2) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Starts serving `req` (read by `host`'s agent) unless it is served already, or its
    /// VM is still moving for an earlier request (the agent keeps it queued till then).
    fn take(self: &Arc<Self>, client: &ControllerClient, cluster: &ClusterSummary, host: &str, req: WillRequest, rng: &mut Rng) {
        let target = {
            let mut w = lock(&self.will);
            if w.claimed.contains(&req.vm) || w.seen.contains(&(host.to_string(), req.id)) || w.busy.contains(&req.vm) {
                return;
            }
            w.seen.insert((host.to_string(), req.id));
            w.busy.insert(req.vm.clone());
            w.records.push(WillRecord {
                vm: req.vm.clone(),
                id: req.id,
                ask: req.ask.clone(),
                from: host.to_string(),
                asked_ms: req.asked_ms,
                plan: None,
                answer: None,
                answered_ms: None,
            });
            let excess = w.records.len().saturating_sub(KEEP);
            w.records.drain(..excess);
            choose(cluster, &req.vm, &req.ask, rng)
        };
        self.events.emit(
            crate::events::Subject::Vm,
            &req.vm,
            format!("VM {} on {host} asks of its own will: {}", req.vm, req.ask),
            serde_json::to_value(&req).unwrap_or_default(),
        );
        let (g, client, host) = (self.clone(), client.clone(), host.to_string());
        tokio::spawn(async move {
            let answer = match target {
                Ok(to) => g.will_move(&client, &req, &to).await,
                Err(why) => format!("refused: {why}"),
            };
            g.answer(&client, &host, &req, answer).await;
            lock(&g.will).busy.remove(&req.vm);
        });
    }

    /// Moves the VM of `req` to `to` and says how it went.
    async fn will_move(&self, client: &ControllerClient, req: &WillRequest, to: &str) -> String {
        let plan = match client.move_vm(&req.vm, to).await {
            Ok(p) => p,
            Err(e) => return format!("refused: {e}"),
        };
        self.will_update(&req.vm, req.id, |r| r.plan = Some(plan.id.clone()));
        let deadline = tokio::time::Instant::now() + MOVE_TIMEOUT;
        loop {
            match client.plan(&plan.id).await {
                Ok(p) if p.status == PlanStatus::Completed => return format!("went to {to}"),
                Ok(p) if p.status.is_final() => {
                    return format!("refused: the move to {to} {}: {}", p.status, p.reason.unwrap_or_default());
                }
                Ok(_) => {}
                Err(e) if e.is_transport() => {}
                Err(e) => return format!("refused: the move to {to} was lost: {e}"),
            }
            if tokio::time::Instant::now() > deadline || *self.stop.borrow() {
                return format!("refused: the move to {to} did not end in time (plan {})", plan.id);
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Writes `answer` on the VM's port through the agent where it runs now.
    async fn answer(&self, client: &ControllerClient, asked_on: &str, req: &WillRequest, answer: String) {
        let now_on = match client.vm(&req.vm).await {
            Ok(v) => v.host.unwrap_or_else(|| asked_on.to_string()),
            Err(_) => asked_on.to_string(),
        };
        let url = client.host(&now_on).await.map(|h| h.url);
        let id = (now_on == asked_on).then_some(req.id);
        let body = WillAnswer { id, answer: answer.clone() };
        let sent = match url {
            Ok(url) => match AgentClient::new(&url, ClientOptions::default()) {
                Ok(a) => a.will_answer(&req.vm, &body).await.map(drop).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let msg = match &sent {
            Ok(()) => format!("VM {} is answered on {now_on}: {answer}", req.vm),
            Err(e) => format!("VM {} could not be answered on {now_on} ({e}): {answer}", req.vm),
        };
        self.will_update(&req.vm, req.id, |r| {
            r.answer = Some(answer.clone());
            r.answered_ms = Some(now_ms());
        });
        self.events.emit(crate::events::Subject::Vm, &req.vm, msg, serde_json::to_value(&body).unwrap_or_default());
    }

    /// Claims (or releases) `vm`'s free-will requests for a game that reads them itself
    /// (Mr X's moves in Scotland Yard): the free-will loop leaves a claimed VM's alone.
    pub(crate) fn claim_will(&self, vm: &str, claim: bool) {
        let mut w = lock(&self.will);
        if claim {
            w.claimed.insert(vm.to_string());
        } else {
            w.claimed.remove(vm);
        }
    }

    fn will_update(&self, vm: &str, id: u64, f: impl FnOnce(&mut WillRecord)) {
        if let Some(r) = lock(&self.will).records.iter_mut().rev().find(|r| r.vm == vm && r.id == id) {
            f(r);
        }
    }
}

/// The free-will state of the games: requests seen (by host and the agent's id), VMs
/// moving for one, and the records served.
#[derive(Default)]
pub(crate) struct WillState {
    seen: BTreeSet<(String, u64)>,
    busy: BTreeSet<String>,
    /// VMs whose requests a game reads itself.
    claimed: BTreeSet<String>,
    records: Vec<WillRecord>,
    /// The loop runs.
    pub(crate) started: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use walkabout_api::{ClusterVm, ExecLimits, Host};

    fn host(name: &str, capacity: u64) -> Host {
        serde_json::from_value(serde_json::json!({
            "version": 1, "name": name, "url": format!("http://{name}"), "status": "up", "status_since_ms": 0,
            "maintenance": "active", "hostname": name, "cpu_model": "qemu64", "cpus": 2, "capacity_mib": capacity,
            "used_mib": 0, "free_mib": capacity
        }))
        .expect("a host")
    }

    fn vm(name: &str, on: &str, mib: u64) -> ClusterVm {
        serde_json::from_value(serde_json::json!({
            "version": 1, "name": name, "host": on, "memory_mib": mib, "vcpus": 1, "workload": "idle", "state": "running"
        }))
        .expect("a VM")
    }

    fn cluster() -> ClusterSummary {
        let mut h3 = host("h3", 1024);
        h3.maintenance = Maintenance::Draining;
        ClusterSummary {
            hosts: vec![host("h1", 1024), host("h2", 1024), h3, host("h4", 300)],
            vms: vec![vm("a", "h1", 256), vm("b", "h2", 512), vm("c", "h4", 256)],
            running_plans: vec![],
            limits: ExecLimits::default(),
        }
    }

    #[test]
    fn a_draining_host_is_refused_by_name() {
        let r = choose(&cluster(), "a", &WillAsk::Host("h3".into()), &mut Rng::new());
        assert_eq!(r, Err("h3 is draining".to_string()));
    }

    #[test]
    fn a_full_host_is_refused_with_its_room() {
        let r = choose(&cluster(), "a", &WillAsk::Host("h4".into()), &mut Rng::new());
        assert_eq!(r, Err("h4 has no room (44 MiB free, a needs 256)".to_string()));
    }

    #[test]
    fn least_loaded_takes_the_host_with_most_room_in_service() {
        let r = choose(&cluster(), "c", &WillAsk::LeastLoaded, &mut Rng::new());
        assert_eq!(r, Ok("h1".to_string()));
    }

    #[test]
    fn any_never_picks_its_own_a_draining_or_a_full_host() {
        let mut rng = Rng::new();
        let picks: BTreeSet<String> = (0..50).filter_map(|_| choose(&cluster(), "a", &WillAsk::Any, &mut rng).ok()).collect();
        assert_eq!(picks, BTreeSet::from(["h2".to_string()]));
    }

    #[test]
    fn nowhere_to_go_is_said() {
        let mut c = cluster();
        c.hosts.retain(|h| h.name == "h1" || h.name == "h3");
        assert_eq!(choose(&c, "a", &WillAsk::Any, &mut Rng::new()), Err("no host has room".to_string()));
    }
}
