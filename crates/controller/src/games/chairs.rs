//! Musical chairs: VMs circulate; each round the music stops, a random host in service
//! is drained and then taken out of the cluster, until the VMs no longer fit.

use super::{Games, TICK};
use std::time::Duration;
use tokio::time::Instant;
use walkabout_api::{ControllerClient, HostStatus, Maintenance, PlanStatus, Round, WalkOptions};

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
}
