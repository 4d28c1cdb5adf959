//! Musical chairs: VMs circulate; each round the music stops and a random host in
//! service goes. As the seed tells it (the default), its power is cut (its agent and
//! every QEMU killed at once): its protected VMs come back from their replicas, the
//! others are down and out; the game ends when the VMs no longer fit or one host is
//! left, reporting the survivors and each failover's RPO and RTO. The gentle game
//! (`gentle: true`) drains the host first and then takes it out of the cluster, until
//! the VMs no longer fit.

use super::{Games, TICK};
use std::time::Duration;
use tokio::time::Instant;
use walkabout_api::{
    AgentClient, ClientOptions, ControllerClient, FailoverResult, Host, HostStatus, Maintenance, PlanStatus, Round, WalkOptions,
};

/// Longest wait for the failovers of a host whose power was cut.
const FAILOVER_WAIT: Duration = Duration::from_secs(180);

impl Games {
    /// Plays until the game is over, stopped, or the controller stops; returns how it
    /// ended.
    pub(super) async fn musical_chairs(&self, client: &ControllerClient, id: &str, opts: WalkOptions) -> String {
        let mut rng = super::Rng::new();
        for round in 1u32.. {
            let deadline = Instant::now() + Duration::from_millis(opts.duration_ms);
            self.wander(client, id, deadline, opts).await;
            if !self.running(id) {
                return format!("stopped in round {round}");
            }
            let hosts = match client.hosts().await {
                Ok(h) => h,
                Err(e) => return format!("round {round}: cannot list the hosts: {e}"),
            };
            let chairs: Vec<String> =
                hosts.into_iter().filter(|h| h.status == HostStatus::Up && h.maintenance == Maintenance::Active).map(|h| h.name).collect();
            if chairs.is_empty() {
                return format!("no host left in round {round}");
            }
            let host = chairs[rng.below(chairs.len())].clone();
            if !opts.gentle {
                if chairs.len() < 2 {
                    return format!("one host left in round {round}: {host}");
                }
                match self.power_cut(client, id, round, &host).await {
                    Ok(None) => continue,
                    Ok(Some(over)) => return format!("game over in round {round}: {over}"),
                    Err(e) => return format!("round {round}: {e}"),
                }
            }
            self.announce(id, format!("round {round}: the music stops; {host} is drained and taken away"));
            let plan = match client.drain(&host).await {
                Ok(p) => p,
                Err(e) => {
                    let result = format!("the VMs no longer fit without {host}: {e}");
                    self.update_walk(id, |w| w.rounds.push(Round { round, host: host.clone(), plan: None, result: result.clone() }));
                    return format!("game over in round {round}: {result}");
                }
            };
            let ended = loop {
                match client.plan(&plan.id).await {
                    Ok(p) if p.status.is_final() => break p,
                    Ok(_) => {}
                    Err(e) if e.is_transport() => {}
                    Err(e) => return format!("round {round}: plan {} vanished: {e}", plan.id),
                }
                if *self.stop.borrow() {
                    return format!("controller stopped in round {round}");
                }
                tokio::time::sleep(TICK).await;
            };
            if ended.status != PlanStatus::Completed {
                let result = format!("draining {host} failed: {}", ended.reason.unwrap_or_default());
                self.update_walk(id, |w| {
                    w.rounds.push(Round { round, host: host.clone(), plan: Some(plan.id.clone()), result: result.clone() })
                });
                return format!("game over in round {round}: {result}");
            }
            let result = match client.remove_host(&host).await {
                Ok(()) => format!("{host} drained and taken out of the cluster"),
                Err(e) => format!("{host} drained but not taken out: {e}"),
            };
            self.update_walk(id, |w| w.rounds.push(Round { round, host: host.clone(), plan: Some(plan.id.clone()), result }));
        }
        String::new()
    }

    /// One round of the seed's game: cuts `host`'s power, waits until every VM it ran
    /// is restored elsewhere or lost, records the failovers, and takes the host out of
    /// the cluster. `Ok(Some(why))` when the game is over (a protected VM found no
    /// room).
    async fn power_cut(&self, client: &ControllerClient, id: &str, round: u32, host: &str) -> Result<Option<String>, String> {
        let h: Host = client.host(host).await.map_err(|e| format!("cannot read host {host}: {e}"))?;
        let on_host: Vec<String> = client
            .vms()
            .await
            .map_err(|e| format!("cannot list the VMs: {e}"))?
            .into_iter()
            .filter(|v| v.host.as_deref() == Some(host) && v.is_active())
            .map(|v| v.name)
            .collect();
        let known: usize = client.failovers().await.map(|f| f.len()).unwrap_or(0);
        self.announce(id, format!("round {round}: the music stops; the power of {host} is cut ({} VM(s) there)", on_host.len()));
        let agent = AgentClient::new(&h.url, ClientOptions::default()).map_err(|e| format!("agent of {host}: {e}"))?;
        match agent.power_cut().await {
            Ok(()) => {}
            // The agent may die before its answer leaves.
            Err(e) if e.is_transport() => {}
            Err(e) => return Err(format!("cannot cut the power of {host}: {e}")),
        }
        let deadline = Instant::now() + FAILOVER_WAIT;
        let done = loop {
            let all = client.failovers().await.unwrap_or_default();
            let mine: Vec<_> = all.into_iter().skip(known).filter(|f| f.from == host).collect();
            let finished = mine.iter().filter(|f| f.result != FailoverResult::Fencing).count();
            if finished >= on_host.len() && mine.iter().all(|f| f.result != FailoverResult::Fencing) {
                break mine;
            }
            if Instant::now() > deadline || *self.stop.borrow() {
                return Err(format!("the failovers of {host}'s VMs did not end within {} s", FAILOVER_WAIT.as_secs()));
            }
            tokio::time::sleep(TICK).await;
        };
        let restored = done.iter().filter(|f| f.result == FailoverResult::Restored).count();
        let short_of_room: Vec<String> = done
            .iter()
            .filter(|f| f.result == FailoverResult::Lost && f.reason.as_deref().is_some_and(|r| r.contains("MiB free")))
            .map(|f| f.vm.clone())
            .collect();
        let mut result = format!("{host} lost its power: {restored} of {} VM(s) restored elsewhere", done.len());
        for f in &done {
            result.push_str(&match (f.result, &f.to) {
                (FailoverResult::Restored, Some(to)) => {
                    format!("; {} on {to} (RPO {} ms, RTO {} ms)", f.vm, f.rpo_ms.unwrap_or(0), f.rto_ms.unwrap_or(0))
                }
                _ => format!("; {} lost: {}", f.vm, f.reason.as_deref().unwrap_or("?")),
            });
        }
        if let Err(e) = client.remove_host(host).await {
            result.push_str(&format!("; not taken out of the cluster: {e}"));
        }
        self.update_walk(id, |w| {
            w.failovers.extend(done.iter().cloned());
            w.rounds.push(Round { round, host: host.to_string(), plan: None, result: result.clone() });
        });
        self.announce(id, format!("round {round}: {result}"));
        if !short_of_room.is_empty() {
            return Ok(Some(format!("the VMs no longer fit without {host}: {} found no room", short_of_room.join(", "))));
        }
        Ok(None)
    }
}
