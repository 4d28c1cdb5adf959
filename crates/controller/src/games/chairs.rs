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
use walkabout_api::{ControllerClient, FailoverResult, Host, HostStatus, Maintenance, PlanStatus, Round, WalkOptions};

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
        match self.agents.power_cut(h.url.clone()).await {
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

#[cfg(test)]
mod tests {
    use crate::fake::{open_with, temp, url, wait_final, Fake};
    use std::collections::BTreeSet;
    use std::time::Duration;
    use walkabout_api::{FailoverResult, Phase, ProtectVm, WalkOptions, WalkRecord};

    /// Serves `c`'s API on a free port, where its games reach it.
    async fn serve(c: &crate::Cluster) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
        c.games().serve_at(&format!("http://{}", listener.local_addr().expect("address"))).expect("url");
        let app = crate::api::router(c.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    /// Waits (90 s at most) for game `id` to end.
    async fn ended(c: &crate::Cluster, id: &str) -> WalkRecord {
        for _ in 0..900 {
            let w = c.games().walk(id).expect("the game");
            if w.finished_ms.is_some() {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("game {id} never ended: {:#?}", c.games().walk(id));
    }

    /// When the migration of `hop` started, ms since the epoch.
    fn started(c: &crate::Cluster, hop: &walkabout_api::Hop) -> u64 {
        c.migration(&hop.migration).expect("a hop's migration").started_ms
    }

    /// The seed's game on three hosts in service (1152 MiB each) and a drained standby
    /// host h4 (768 MiB), no chair and no hop's target, that is every protected VM's
    /// replica. On each host in service a protected 512 MiB VM (p1..p3) and an
    /// unprotected 384 MiB one (u1..u3), neither of which fits anywhere else, so only
    /// the protected 128 MiB walkers w1 and w2 circulate. The first cut host's p comes
    /// back on h4 (with its walkers, if any), its u is lost by name; h4 then lacks room
    /// for another p, so the second cut ends the game: the VMs no longer fit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_seeds_game_cuts_a_host_a_round_restores_its_protected_vms_and_ends_when_they_no_longer_fit() {
        let vms = [
            ("p1", 512, "h1"),
            ("p2", 512, "h2"),
            ("p3", 512, "h3"),
            ("u1", 384, "h1"),
            ("u2", 384, "h2"),
            ("u3", 384, "h3"),
            ("w1", 128, "h1"),
            ("w2", 128, "h2"),
        ];
        let fake = Fake::new(&[("h1", 1152), ("h2", 1152), ("h3", 1152), ("h4", 768)], &vms);
        fake.state().ship_on_protect = true;
        let dir = temp("chairs-power-cut");
        let config = crate::ControllerConfig { fence_ms: 5_000, ..crate::ControllerConfig::new(dir.clone()) };
        let c = open_with(config, &fake, &["h1", "h2", "h3", "h4"]).await;
        let standby = c.drain("h4").expect("drain h4");
        assert_eq!(wait_final(&c, &standby.id).await.status, walkabout_api::PlanStatus::Completed);
        for vm in ["p1", "p2", "p3", "w1", "w2"] {
            let req = ProtectVm { replica: Some("h4".into()), every_ms: Some(5_000), keep: Some(2) };
            c.protect(vm, &req).await.unwrap_or_else(|e| panic!("protect {vm}: {e}"));
        }
        serve(&c).await;

        let game =
            c.games().start_musical_chairs(WalkOptions { duration_ms: 2_000, parallel: 1, pause_ms: 0, gentle: false }).expect("a game");
        let w = ended(&c, &game.id).await;

        assert_eq!(w.rounds.len(), 2, "{w:#?}");
        let (first, second) = (w.rounds[0].host.clone(), w.rounds[1].host.clone());
        let survivor = ["h1", "h2", "h3"].into_iter().find(|h| *h != first && *h != second).expect("a host never cut");
        let n = |h: &str| h.trim_start_matches('h').to_string();
        assert_eq!(fake.state().power_cuts, vec![url(&first), url(&second)], "{w:#?}");
        // Round 1: every protected VM of the first cut host runs on h4, with its RPO and
        // RTO in the failover and in the round's result; its unprotected VM is lost by name.
        let cut1: Vec<_> = w.failovers.iter().filter(|f| f.from == first).collect();
        let names1: BTreeSet<&str> = cut1.iter().map(|f| f.vm.as_str()).collect();
        assert!(names1.contains(format!("p{}", n(&first)).as_str()) && names1.contains(format!("u{}", n(&first)).as_str()), "{cut1:#?}");
        for f in &cut1 {
            if f.vm.starts_with('u') {
                assert_eq!(f.result, FailoverResult::Lost, "{f:?}");
                assert!(w.rounds[0].result.contains(&format!("{} lost: its host {first} is down", f.vm)), "{:?}", w.rounds[0]);
                assert!(f.reason.as_deref().is_some_and(|r| r.contains("not protected")), "{f:?}");
                continue;
            }
            let (rpo, rto) = (f.rpo_ms.expect("an RPO"), f.rto_ms.expect("an RTO"));
            assert_eq!((f.result, f.to.as_deref()), (FailoverResult::Restored, Some("h4")), "{f:?}");
            assert!(rto >= 5_000, "restored within the fence time: {f:?}");
            assert!(w.rounds[0].result.contains(&format!("{} on h4 (RPO {rpo} ms, RTO {rto} ms)", f.vm)), "{:?}", w.rounds[0]);
        }
        // Round 2: h4 has no room left for the second cut host's p: the game is over.
        let p2 = format!("p{}", n(&second));
        let lost = w.failovers.iter().find(|f| f.vm == p2).expect("the failover of the second cut host's p");
        assert_eq!((lost.from.as_str(), lost.result), (second.as_str(), FailoverResult::Lost), "{lost:?}");
        assert!(lost.reason.as_deref().is_some_and(|r| r.contains("its replica host h4 has")), "{lost:?}");
        let result = w.result.clone().unwrap_or_default();
        assert!(result.starts_with(&format!("game over in round 2: the VMs no longer fit without {second}: ")), "{result}");
        assert!(result.contains(&p2), "{result}");
        // The survivors: the first cut host's p on h4, and the host never cut's p and u.
        let alive: BTreeSet<(String, Option<String>)> = w.survivors.iter().map(|s| (s.vm.clone(), s.host.clone())).collect();
        for (vm, host) in
            [(format!("p{}", n(&first)), "h4"), (format!("p{}", n(survivor)), survivor), (format!("u{}", n(survivor)), survivor)]
        {
            assert!(alive.contains(&(vm.clone(), Some(host.to_string()))), "{vm} on {host} not among the survivors: {alive:?}");
        }
        assert!(!alive.iter().any(|(vm, _)| *vm == p2 || (vm.starts_with('u') && !vm.ends_with(&n(survivor)))), "{alive:?}");
        // The VMs circulated before the first cut and between the two, each hop with its
        // downtime.
        let cut1_ms = cut1.iter().map(|f| f.lost_ms).min().expect("a loss");
        let cut2_ms = lost.lost_ms;
        assert!(w.hops.iter().all(|h| h.result == Phase::Completed && h.downtime_ms == Some(42)), "{:#?}", w.hops);
        assert!(w.hops.iter().any(|h| started(&c, h) < cut1_ms), "no hop before the first cut: {:#?}", w.hops);
        let between = cut1.iter().filter_map(|f| f.finished_ms).max().expect("round 1 ended");
        assert!(w.hops.iter().any(|h| (between..cut2_ms).contains(&started(&c, h))), "no hop between the cuts: {:#?}", w.hops);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The gentle game: five 256 MiB VMs on three 1024 MiB hosts. The first round's host
    /// is drained and taken out; the five no longer fit on one host, so the second
    /// round's drain is refused and the game ends there, every VM surviving and no power
    /// cut.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gentle_game_drains_a_host_a_round_and_ends_when_the_vms_no_longer_fit() {
        let vms = [("a", 256, "h1"), ("b", 256, "h1"), ("c", 256, "h2"), ("d", 256, "h2"), ("e", 256, "h3")];
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024), ("h3", 1024)], &vms);
        let dir = temp("chairs-gentle");
        let c = open_with(crate::ControllerConfig::new(dir.clone()), &fake, &["h1", "h2", "h3"]).await;
        serve(&c).await;

        let game =
            c.games().start_musical_chairs(WalkOptions { duration_ms: 1_500, parallel: 1, pause_ms: 0, gentle: true }).expect("a game");
        let w = ended(&c, &game.id).await;

        assert_eq!(w.rounds.len(), 2, "{w:#?}");
        let (first, second) = (&w.rounds[0], &w.rounds[1]);
        assert_eq!(first.result, format!("{} drained and taken out of the cluster", first.host), "{first:?}");
        let drain = c.plan(first.plan.as_deref().expect("the first round's drain")).expect("its plan");
        assert_eq!(drain.status, walkabout_api::PlanStatus::Completed);
        assert!(!c.hosts().iter().any(|h| h.name == first.host), "{} still in the cluster", first.host);
        assert_eq!(second.plan, None, "{second:?}");
        assert!(second.result.starts_with(&format!("the VMs no longer fit without {}", second.host)), "{second:?}");
        let result = w.result.clone().unwrap_or_default();
        assert!(result.starts_with("game over in round 2: the VMs no longer fit"), "{result}");
        let alive: BTreeSet<&str> = w.survivors.iter().map(|s| s.vm.as_str()).collect();
        assert_eq!(alive, BTreeSet::from(["a", "b", "c", "d", "e"]));
        assert!(fake.state().power_cuts.is_empty() && c.failovers().is_empty(), "a power was cut");
        assert!(w.hops.iter().all(|h| h.result == Phase::Completed && h.downtime_ms == Some(42)), "{:#?}", w.hops);
        let drained = drain.finished_ms.expect("the drain ended");
        assert!(w.hops.iter().any(|h| started(&c, h) >= drained), "no hop after the first round: {:#?}", w.hops);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }
}
