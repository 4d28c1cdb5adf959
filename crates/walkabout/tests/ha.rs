//! Several controllers over one etcd (Debian's etcd-server on loopback), real agents and
//! real guests: one controller leads; the others refuse to act and point at it; the
//! leader killed mid-plan is replaced within seconds, the new leader resumes the plan
//! from etcd, every migration runs exactly once and no plan is lost; and an agent
//! refuses a request that carries the deposed leader's epoch.

mod common;

use common::{assert_healthy, block_on, AgentProc, ControllerProc};
use std::time::{Duration, Instant};
use walkabout_api::{AgentClient, ClientError, ClientOptions, ErrorBody, ErrorKind, MigrationRequest, Mode, Phase, PlanRecord, PlanStatus};
use walkabout_store_etcd::{Etcd, EtcdConfig, Leader};
use walkabout_testbed::{Etcd as EtcdProcess, TempDir};

/// Slow enough to interrupt a migration: a 256 MiB guest takes seconds at this cap.
const SLOW: &str = "24M";

/// etcd, three agents (h1 holds `guests` 256 MiB guests, `a`, `b`...; h2 and h3 room for
/// two) and three controllers sharing that etcd.
struct Ha {
    agents: Vec<AgentProc>,
    controllers: Vec<ControllerProc>,
    etcd: Etcd,
    _etcd_process: EtcdProcess,
    _dir: TempDir,
}

impl Ha {
    fn start(guests: usize) -> Ha {
        common::guest_image();
        let dir = TempDir::new("ha").expect("temp dir");
        let etcd_process = EtcdProcess::start(dir.path(), Duration::from_secs(30)).expect("etcd starts (run scripts/setup-host.sh)");
        let store = etcd_process.store_url();
        let etcd = Etcd::connect(EtcdConfig::parse(&store).expect("store url")).expect("connect to etcd");
        let h1 = AgentProc::start(&["--capacity", "768M"]);
        let h2 = AgentProc::start(&["--capacity", "512M"]);
        let h3 = AgentProc::start(&["--capacity", "512M"]);
        for vm in ["a", "b"].into_iter().take(guests) {
            h1.create(&["--name", vm, "--memory", "256M", "--workload", "dirty:64:4"]);
        }
        let args = ["--store", store.as_str(), "--lease-ttl", "3", "--max-bandwidth", SLOW];
        let controllers = (0..3).map(|_| ControllerProc::start(&[&h1, &h2, &h3], &args)).collect();
        Ha { agents: vec![h1, h2, h3], controllers, etcd, _etcd_process: etcd_process, _dir: dir }
    }

    /// The leader as etcd says, once one has opened its cluster (answers 200).
    fn wait_leader(&self, limit: Duration) -> (usize, Leader) {
        self.wait_leader_after(0, limit)
    }

    /// The leader elected after `old` (a higher epoch), once it has opened its cluster.
    /// `old` is never taken for it: etcd names it until its lease lapses, and a leader
    /// just stopped or killed may still answer for a moment after the signal was sent.
    fn wait_new_leader(&self, old: &Leader, limit: Duration) -> (usize, Leader) {
        self.wait_leader_after(old.epoch, limit)
    }

    /// The first leader of an epoch above `epoch` that answers 200.
    fn wait_leader_after(&self, epoch: u64, limit: Duration) -> (usize, Leader) {
        let start = Instant::now();
        loop {
            let leader = block_on(None, || self.etcd.leader()).expect("read the leader");
            if let Some(l) = leader.filter(|l| l.epoch > epoch) {
                if let Some(i) = self.controllers.iter().position(|c| c.url == l.url) {
                    if status_of(&self.controllers[i].url, "/v1/cluster").0 == 200 {
                        return (i, l);
                    }
                }
            }
            assert!(start.elapsed() < limit, "no controller leads after {} s", limit.as_secs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn agent_migrations(&self) -> Vec<(String, Phase)> {
        self.agents.iter().flat_map(|a| a.migrations()).map(|m| (m.vm, m.phase)).collect()
    }
}

/// `GET url+path` without following redirects: the status, the `Location` and the body.
fn status_of(url: &str, path: &str) -> (u16, Option<String>, String) {
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let target = format!("{url}{path}");
    block_on(None, || async move {
        match http.get(&target).timeout(Duration::from_secs(10)).send().await {
            Ok(r) => {
                let location = r.headers().get("location").and_then(|v| v.to_str().ok()).map(String::from);
                (r.status().as_u16(), location, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, None, e.to_string()),
        }
    })
}

#[test]
fn a_follower_refuses_to_act_and_names_the_leader() {
    let ha = Ha::start(0);
    let (leader, who) = ha.wait_leader(Duration::from_secs(60));
    let follower = &ha.controllers[(leader + 1) % 3];

    let (status, location, body) = status_of(&follower.url, "/v1/hosts");
    let hosts_via_follower = follower.hosts();

    assert_eq!(status, 307, "{body}");
    assert_eq!(location.as_deref(), Some(format!("{}/v1/hosts", who.url).as_str()));
    let err: ErrorBody = serde_json::from_str(&body).expect("an ErrorBody");
    assert_eq!(err.kind, ErrorKind::NotLeader);
    assert!(err.error.contains("follower") && err.error.contains(&who.url), "{}", err.error);
    assert_eq!(hosts_via_follower.len(), 3, "a client of a follower is redirected to the leader");
}

#[test]
fn the_leader_killed_mid_plan_is_replaced_within_seconds_and_its_plan_completes_with_every_migration_once() {
    let mut ha = Ha::start(2);
    let (first, old) = ha.wait_leader(Duration::from_secs(60));
    ha.controllers[first].wait_vms(2);
    let id = ha.controllers[first].json_as::<PlanRecord>(&["host", "drain", "h1", "--no-wait"]).id;
    ha.controllers[first].wait_running_step(&id);

    ha.controllers[first].kill();
    let killed = Instant::now();
    let (second, new) = ha.wait_new_leader(&old, Duration::from_secs(30));
    let failover = killed.elapsed();
    let plan = ha.controllers[second].wait_plan(&id, 240);

    eprintln!("failover: a new leader served {} ms after the leader was killed", failover.as_millis());
    assert_ne!(second, first);
    assert!(new.epoch > old.epoch, "epochs grow: {old:?} then {new:?}");
    assert!(failover < Duration::from_secs(15), "a new leader within seconds, not {} s", failover.as_secs());
    assert_eq!(plan.status, PlanStatus::Completed, "{plan:?}\n{}", ha.controllers[second].log());
    assert!(ha.controllers[second].log().contains("resumes after a controller restart"), "{}", ha.controllers[second].log());
    let plans = ha.controllers[second].call(|c| async move { c.plans().await }).expect("plans");
    assert_eq!(plans.iter().filter(|p| p.id == id).count(), 1, "the plan is kept: {plans:?}");
    let migs = ha.agent_migrations();
    assert_eq!(migs.len(), 2, "each VM migrated exactly once: {migs:?}");
    for vm in ["a", "b"] {
        assert_eq!(migs.iter().filter(|(v, p)| v == vm && *p == Phase::Completed).count(), 1, "{vm}: {migs:?}");
        let home = ha.agents[1..].iter().find(|a| a.try_info(vm).is_some()).unwrap_or_else(|| panic!("{vm} lost"));
        let seen = home.info(vm).guest.heartbeats;
        assert_healthy(&home.wait_heartbeats(vm, seen + 3));
    }
}

#[test]
fn an_agent_refuses_the_deposed_leaders_epoch_and_starts_nothing() {
    let mut ha = Ha::start(1);
    let (first, old) = ha.wait_leader(Duration::from_secs(60));
    ha.controllers[first].wait_vms(1);
    ha.controllers[first].kill();
    let (_, new) = ha.wait_new_leader(&old, Duration::from_secs(30));
    // The new leader polls every agent: each has now seen its epoch.
    std::thread::sleep(Duration::from_secs(2));
    let h1 = &ha.agents[0];
    let stale = AgentClient::new(&h1.url, ClientOptions::default()).expect("client").with_epoch(old.epoch);
    let req = MigrationRequest::new("a", ha.agents[1].url.clone(), Mode::Auto);

    let refused = block_on(None, || async move { stale.start_migration(&req).await }).expect_err("a stale epoch must be refused");
    let current = AgentClient::new(&h1.url, ClientOptions::default()).expect("client").with_epoch(new.epoch);
    let listed = block_on(None, || async move { current.migrations().await });

    match &refused {
        ClientError::Api { status, body } => {
            assert_eq!((*status, body.kind), (409, ErrorKind::StaleEpoch), "{refused}");
            assert!(
                body.error.contains(&format!("epoch {}", old.epoch)) && body.error.contains(&format!("epoch {}", new.epoch)),
                "{refused}"
            );
        }
        other => panic!("expected a 409 stale_epoch, got {other}"),
    }
    assert_eq!(listed.expect("the current leader's epoch is accepted").len(), 0, "nothing started on h1");
}

#[test]
fn a_leader_paused_past_its_lease_wakes_as_a_follower_and_the_new_leaders_plan_runs_each_migration_once() {
    let ha = Ha::start(2);
    let (first, old) = ha.wait_leader(Duration::from_secs(60));
    ha.controllers[first].wait_vms(2);
    let pid = ha.controllers[first].pid().expect("the leader runs");
    // Every thread stopped, not just the signal sent: until then the leader still serves.
    assert!(walkabout_testbed::pause(pid, Duration::from_secs(10)), "the leader (pid {pid}) did not stop");

    let (second, new) = ha.wait_new_leader(&old, Duration::from_secs(60));
    let id = ha.controllers[second].json_as::<PlanRecord>(&["host", "drain", "h1", "--no-wait"]).id;
    ha.controllers[second].wait_running_step(&id);
    assert!(walkabout_testbed::resume(pid));
    // Its very first answer on waking is a follower's: its lease ran out while it was
    // stopped, whether or not its keep-alive has run yet to notice.
    let (waking, _, _) = status_of(&ha.controllers[first].url, "/v1/hosts");
    let plan = ha.controllers[second].wait_plan(&id, 240);
    std::thread::sleep(Duration::from_secs(2));
    let (woken, location, _) = status_of(&ha.controllers[first].url, "/v1/hosts");

    assert_ne!(second, first);
    assert!(new.epoch > old.epoch);
    assert_eq!(plan.status, PlanStatus::Completed, "{plan:?}\n{}", ha.controllers[second].log());
    assert_eq!(waking, 307, "the old leader served as leader on waking, past its lease");
    assert_eq!((woken, location), (307, Some(format!("{}/v1/hosts", new.url))), "the old leader follows now");
    assert!(ha.controllers[first].log().contains("lost the leadership"), "{}", ha.controllers[first].log());
    let migs = ha.agent_migrations();
    assert_eq!(migs.len(), 2, "each VM migrated exactly once: {migs:?}");
    assert!(migs.iter().all(|(_, p)| *p == Phase::Completed), "{migs:?}");
}
