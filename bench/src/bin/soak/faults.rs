//! `soak --faults`: a controller and three agents, each in a network namespace of its
//! own and all speaking mutual TLS, with guests walking about (the controller's walk),
//! and a fault every `--fault-every` hops, in turn: an agent restarted, a host's link cut
//! for a few seconds during a migration, a migration cancelled, a migration's
//! destination agent killed (and started again). Throughout, every second, each guest
//! must run on exactly one host (two at once, or none for longer than a hop may take,
//! is reported); after each fault, how long until every guest ran again on exactly one
//! host. At the end: hops, the faults and their outcomes, and each guest's own counters
//! (heartbeat breaks, corrupt pages). Not a test: it reports.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use walkabout_api::{AgentClient, ClientOptions, ClusterMigration, ControllerClient, Phase, VmInfo, VmSpec, VmState, WalkOptions};
use walkabout_testbed::{Controller, ControllerSpec, LocalCluster, LocalOptions, TempDir};

/// Hosts of the cluster.
const HOSTS: usize = 3;
/// How long a cut link stays down.
const CUT: Duration = Duration::from_secs(5);
/// How long a killed destination agent stays dead.
const DEAD: Duration = Duration::from_secs(3);
/// How long a fault may wait for a migration in flight to aim at.
const AIM_WAIT: Duration = Duration::from_secs(60);
/// How long the guests may take to run again, each on one host, after a fault.
const RECOVERY_LIMIT: Duration = Duration::from_secs(300);
/// A guest seen on no host for longer than this is reported missing.
const MISSING_AFTER: Duration = Duration::from_secs(120);

/// What `soak --faults` does.
pub struct FaultArgs {
    /// Hops to walk.
    pub hops: usize,
    /// A fault every this many hops.
    pub every: usize,
    /// Guests walking.
    pub guests: usize,
    /// Each guest's memory (`256M`).
    pub memory: String,
    /// Each guest's workload.
    pub workload: String,
    /// Hops at once.
    pub parallel: u32,
    /// Rest of a guest between two hops, ms.
    pub pause_ms: u64,
    /// The longest the walk may take.
    pub limit: Duration,
}

/// The faults, in the order they are dealt.
#[derive(Clone, Copy, Debug)]
enum Fault {
    AgentRestart,
    LinkCut,
    Cancel,
    DestinationKilled,
}

impl Fault {
    const ALL: [Fault; 4] = [Fault::AgentRestart, Fault::LinkCut, Fault::Cancel, Fault::DestinationKilled];

    fn name(self) -> &'static str {
        match self {
            Fault::AgentRestart => "agent restart",
            Fault::LinkCut => "link cut",
            Fault::Cancel => "cancel",
            Fault::DestinationKilled => "destination killed",
        }
    }
}

/// Host `hN`'s index among the cluster's agents.
fn index_of(host: &str) -> Option<usize> {
    host.strip_prefix('h')?.parse::<usize>().ok()?.checked_sub(1).filter(|i| *i < HOSTS)
}

/// How long a guest may take to be ready after its creation (as `walkabout vm create`).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A memory size as `walkabout vm create --memory` takes it (`256M`, `1G`, `512MiB`, a
/// bare number of MiB), in MiB.
fn parse_mib(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("bad memory size {s:?} (e.g. 256M, 1G)"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => bail!("bad memory size {s:?} (e.g. 256M, 1G)"),
    };
    n.checked_mul(mult).with_context(|| format!("memory size {s:?} is too large"))
}

/// Creates `spec` through `client` and waits for its guest to be ready, as `walkabout vm
/// create` does: an error if the VM stops or its kernel fails while booting, or after
/// [`READY_TIMEOUT`].
async fn create_ready(client: &AgentClient, spec: &VmSpec) -> Result<VmInfo> {
    client.create_vm(spec).await?;
    let start = Instant::now();
    loop {
        let vm = client.vm(&spec.name).await?;
        if vm.guest.ready {
            return Ok(vm);
        }
        if vm.record.state == VmState::Stopped {
            bail!("VM {} stopped before its guest was ready: {}", spec.name, vm.record.reason.as_deref().unwrap_or("no reason"));
        }
        if let Some(alert) = vm.guest.alerts.first().filter(|_| vm.guest.kernel_trouble) {
            bail!("VM {}'s kernel failed while booting: {alert}", spec.name);
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!("VM {} runs but its guest was not ready after {} s", spec.name, READY_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which hosts run each guest now (state running or migrating out), by asking every
/// agent; an agent that does not answer counts as running nothing.
struct Census {
    runs_on: BTreeMap<String, Vec<String>>,
    infos: BTreeMap<String, VmInfo>,
}

fn census(rt: &tokio::runtime::Runtime, agents: &[(String, AgentClient)], guests: &[String]) -> Census {
    let mut c = Census { runs_on: guests.iter().map(|g| (g.clone(), vec![])).collect(), infos: BTreeMap::new() };
    for (host, client) in agents {
        let Ok(vms) = rt.block_on(client.vms()) else { continue };
        // A source past its switchover gate holds a paused copy only (QEMU stopped the
        // guest there), until the destination's commit answer lets it go: the guest runs
        // at the destination alone. Counted as running it read as "on two hosts" in that
        // window (28 samples of the 2026-12-02 run, none at a fault).
        let handed_over: Vec<String> = rt
            .block_on(client.migrations())
            .map(|ms| ms.into_iter().filter(|m| m.phase == Phase::Switchover).map(|m| m.vm).collect())
            .unwrap_or_default();
        for v in vms {
            let runs = match v.record.state {
                VmState::Running => true,
                VmState::Migrating => !handed_over.contains(&v.record.spec.name),
                _ => false,
            };
            if runs {
                c.runs_on.entry(v.record.spec.name.clone()).or_default().push(host.clone());
                c.infos.insert(v.record.spec.name.clone(), v);
            }
        }
    }
    c
}

impl Census {
    fn each_once(&self) -> bool {
        self.runs_on.values().all(|h| h.len() == 1)
    }
}

/// Runs the fault soak with `bin`; returns the JSON report.
pub fn run(bin: &Path, env: Value, a: &FaultArgs) -> Result<Value> {
    if a.every == 0 || a.guests == 0 {
        bail!("--fault-every and --guests must be at least 1");
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let scratch = TempDir::new("soak-faults")?;
    let opts = LocalOptions {
        bin: bin.to_path_buf(),
        hosts: HOSTS,
        base_port: 0,
        accel: "tcg".into(),
        capacity: None,
        netns: true,
        root: scratch.path().join("cluster"),
        tls: true,
    };
    let mut cluster = LocalCluster::start(&opts).context("starting three agents in namespaces")?;
    let operator = cluster.operator.clone().context("the cluster has no operator identity")?;
    let ca_dir = cluster.ca.as_ref().map(|c| c.dir().to_path_buf()).context("the cluster has no CA")?;
    let bundle = walkabout_trust::Bundle::load(&operator).context("loading the operator identity")?;
    walkabout_api::client::set_process_tls(walkabout_trust::tls::client_config(&bundle).context("TLS client configuration")?);
    let refs: Vec<&walkabout_testbed::Agent> = cluster.agents.iter().collect();
    let ctl_proc = Controller::start(ControllerSpec::new(bin, &refs).tls(&ca_dir, &operator)).context("starting the controller")?;
    let ctl = ControllerClient::new(&ctl_proc.url, ClientOptions::default())?;
    let agents: Vec<(String, AgentClient)> = cluster
        .agents
        .iter()
        .enumerate()
        .map(|(i, ag)| Ok((format!("h{}", i + 1), AgentClient::new(&ag.url, ClientOptions::default())?)))
        .collect::<Result<_>>()?;

    // The guests, spread over the hosts, booted.
    let guests: Vec<String> = (1..=a.guests).map(|g| format!("g{g}")).collect();
    let boot = Instant::now();
    let memory_mib = parse_mib(&a.memory)?;
    for (i, g) in guests.iter().enumerate() {
        let mut spec = VmSpec::new(g.clone(), memory_mib);
        spec.workload.clone_from(&a.workload);
        rt.block_on(create_ready(&agents[i % HOSTS].1, &spec)).with_context(|| format!("creating {g}"))?;
    }
    loop {
        let c = census(&rt, &agents, &guests);
        if c.each_once() && c.infos.values().all(|v| v.guest.ready) {
            break;
        }
        if boot.elapsed() > Duration::from_secs(600) {
            bail!("the guests did not boot within 600 s: {:?}", c.runs_on);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let boot_s = boot.elapsed().as_secs();
    eprintln!("soak --faults: {} guests booted in {boot_s} s; walking {} hops, a fault every {}", a.guests, a.hops, a.every);

    let walk_opts = WalkOptions { duration_ms: a.limit.as_millis() as u64, parallel: a.parallel, pause_ms: a.pause_ms, gentle: false };
    let walk = rt.block_on(ctl.start_walk(&walk_opts)).context("starting the walk")?;
    let started = Instant::now();
    let mut faults: Vec<Value> = vec![];
    let mut next_fault = a.every;
    let mut watched = Watched::default();
    let mut missing_since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut hops_seen = 0usize;
    let mut last_report = Instant::now();
    while hops_seen < a.hops && started.elapsed() < a.limit {
        std::thread::sleep(Duration::from_secs(1));
        let w = match rt.block_on(ctl.walk(&walk.id)) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("soak --faults: reading the walk: {e}");
                continue;
            }
        };
        hops_seen = w.hops.len();
        if w.status.is_final() {
            eprintln!("soak --faults: the walk ended early: {:?}", w.result);
            break;
        }
        watch(&rt, &agents, &guests, started, &mut missing_since, &mut watched);
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            let failed = w.hops.iter().filter(|h| h.result != Phase::Completed).count();
            eprintln!(
                "soak --faults: {} s, {hops_seen} hops ({failed} not completed), {} faults",
                started.elapsed().as_secs(),
                faults.len()
            );
        }
        if hops_seen >= next_fault {
            next_fault += a.every;
            let fault = Fault::ALL[faults.len() % Fault::ALL.len()];
            let mut rec = deal(&rt, &ctl, &mut cluster, fault, faults.len(), hops_seen);
            let t = Instant::now();
            let recovered = loop {
                let c = census(&rt, &agents, &guests);
                if c.each_once() {
                    break Some(t.elapsed());
                }
                if t.elapsed() > RECOVERY_LIMIT {
                    watched
                        .violations
                        .push(json!({"at_s": started.elapsed().as_secs(), "after_fault": faults.len() + 1, "runs_on": c.runs_on}));
                    break None;
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            rec["every_guest_on_one_host_after_ms"] = json!(recovered.map(|d| d.as_millis() as u64));
            eprintln!("soak --faults: fault {}: {rec}", faults.len() + 1);
            faults.push(rec);
        }
    }
    let walked_s = started.elapsed().as_secs();

    // Stop the walk; hops under way finish.
    let _ = rt.block_on(ctl.stop_walk(&walk.id));
    let stop = Instant::now();
    let w = loop {
        let w = rt.block_on(ctl.walk(&walk.id)).context("reading the walk")?;
        if (w.status.is_final() && w.finished_ms.is_some()) || stop.elapsed() > Duration::from_secs(300) {
            break w;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let end = census(&rt, &agents, &guests);
    let per_guest: Vec<Value> = guests
        .iter()
        .map(|g| {
            let hosts = end.runs_on.get(g).cloned().unwrap_or_default();
            match end.infos.get(g) {
                Some(v) => json!({
                    "vm": g, "runs_on": hosts, "heartbeats": v.guest.heartbeats, "last_seq": v.guest.last_seq,
                    "seq_breaks": v.guest.seq_breaks, "corrupt_pages": v.guest.corrupt_pages,
                    "kernel_trouble": v.guest.kernel_trouble, "alerts": v.guest.alerts,
                }),
                None => json!({"vm": g, "runs_on": hosts, "error": "no agent runs it"}),
            }
        })
        .collect();
    let by_result = |p: Phase| w.hops.iter().filter(|h| h.result == p).count();
    let downtimes: Vec<f64> =
        w.hops.iter().filter(|h| h.result == Phase::Completed).filter_map(|h| h.downtime_ms).map(|d| d as f64).collect();
    let summary =
        |xs: &[f64]| walkabout_bench::stats(xs).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})).unwrap_or(Value::Null);
    let corrupt: u64 = end.infos.values().map(|v| v.guest.corrupt_pages).sum();
    let alive = end.each_once();
    let doc = json!({
        "bench": "soak --faults",
        "environment": env,
        "settings": {
            "what": "a controller and 3 agents, each in a network namespace behind one bridge, all mutual TLS; guests created on the agents and walked by the controller's walk; a fault every N hops in turn (agent restart; link of a migration's destination cut for 5 s; cancel of a migration in flight; a migration's destination agent killed with SIGKILL and started again 3 s later); every second each guest must run on exactly one host",
            "hosts": HOSTS, "guests": a.guests, "memory": a.memory, "workload": a.workload,
            "parallel": a.parallel, "pause_ms": a.pause_ms, "hops_wanted": a.hops, "fault_every": a.every,
        },
        "boot_s": boot_s,
        "walked_s": walked_s,
        "hops": w.hops.len(),
        "completed": by_result(Phase::Completed),
        "failed": by_result(Phase::Failed),
        "cancelled": by_result(Phase::Cancelled),
        "not_completed": w.hops.iter().filter(|h| h.result != Phase::Completed).map(|h| json!({"vm": h.vm, "from": h.from, "to": h.to, "result": h.result, "reason": h.reason})).collect::<Vec<_>>(),
        "downtime_ms": summary(&downtimes),
        "faults": faults,
        "violations": watched.violations,
        "two_host_reads_not_confirmed": watched.transient,
        "every_vm_alive_once": alive,
        "corrupt_pages": corrupt,
        "guests": per_guest,
    });
    // The guests go, then the controller, the agents, namespaces and data.
    for g in &guests {
        if let Some(host) = end.runs_on.get(g).and_then(|h| h.first()).and_then(|h| index_of(h)) {
            let _ = rt.block_on(agents[host].1.delete_vm(g));
        }
    }
    drop(ctl_proc);
    cluster.shutdown();
    Ok(doc)
}

/// What the watch saw: guests on two hosts at once or on none for longer than
/// [`MISSING_AFTER`] (violations), and reads that saw a guest on two hosts where the
/// read right after saw it on one.
#[derive(Default)]
struct Watched {
    violations: Vec<Value>,
    transient: Vec<Value>,
}

/// Notes a guest running on two hosts at once, or on none for longer than
/// [`MISSING_AFTER`]. The census asks the agents one after the other, so a switchover
/// (tens of ms) between two of its reads shows the guest on both: a guest seen on two
/// hosts is asked about again at once, and only a second read that agrees is a
/// violation; the first alone is kept as a transient read.
fn watch(
    rt: &tokio::runtime::Runtime,
    agents: &[(String, AgentClient)],
    guests: &[String],
    started: Instant,
    missing_since: &mut BTreeMap<String, Instant>,
    w: &mut Watched,
) {
    let c = census(rt, agents, guests);
    let twice = c.runs_on.values().any(|h| h.len() > 1).then(|| census(rt, agents, guests));
    for (g, hosts) in &c.runs_on {
        if hosts.len() > 1 {
            let again = twice.as_ref().and_then(|t| t.runs_on.get(g)).cloned().unwrap_or_default();
            let seen =
                json!({"at_s": started.elapsed().as_secs(), "vm": g, "runs_on": hosts, "then": again, "what": "on two hosts at once"});
            if again.len() > 1 {
                w.violations.push(seen);
            } else {
                w.transient.push(seen);
            }
        }
        if hosts.is_empty() {
            let since = *missing_since.entry(g.clone()).or_insert_with(Instant::now);
            if since.elapsed() > MISSING_AFTER {
                w.violations
                    .push(json!({"at_s": started.elapsed().as_secs(), "vm": g, "what": "on no host", "for_s": since.elapsed().as_secs()}));
                missing_since.insert(g.clone(), Instant::now());
            }
        } else {
            missing_since.remove(g);
        }
    }
}

/// A migration under way, waited for up to [`AIM_WAIT`].
fn in_flight(rt: &tokio::runtime::Runtime, ctl: &ControllerClient, cancellable: bool) -> Option<ClusterMigration> {
    let t = Instant::now();
    while t.elapsed() < AIM_WAIT {
        if let Ok(ms) = rt.block_on(ctl.migrations()) {
            let m =
                ms.into_iter()
                    .find(|m| if cancellable { m.phase == Phase::Running } else { !m.phase.is_final() && m.phase != Phase::Pending });
            if m.is_some() {
                return m;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The final phase of controller migration `id`.
fn outcome(rt: &tokio::runtime::Runtime, ctl: &ControllerClient, id: &str) -> Value {
    let t = Instant::now();
    while t.elapsed() < RECOVERY_LIMIT {
        if let Ok(m) = rt.block_on(ctl.migration(id)) {
            if m.phase.is_final() {
                return json!({"phase": m.phase, "reason": m.reason});
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    json!({"phase": "not final after 300 s"})
}

/// Deals fault number `n` (0-based) of kind `fault` at hop `hop`; returns its record.
fn deal(rt: &tokio::runtime::Runtime, ctl: &ControllerClient, cluster: &mut LocalCluster, fault: Fault, n: usize, hop: usize) -> Value {
    let mut rec = json!({"n": n + 1, "at_hop": hop, "fault": fault.name()});
    match fault {
        Fault::AgentRestart => {
            let i = (n / Fault::ALL.len()) % HOSTS;
            rec["host"] = json!(format!("h{}", i + 1));
            rec["ok"] = json!(cluster.agents[i].restart().map_err(|e| e.to_string()).err().unwrap_or_default().is_empty());
        }
        Fault::LinkCut | Fault::DestinationKilled | Fault::Cancel => {
            let Some(m) = in_flight(rt, ctl, matches!(fault, Fault::Cancel)) else {
                rec["skipped"] = json!("no migration in flight within 60 s");
                return rec;
            };
            rec["migration"] = json!(m.id);
            rec["vm"] = json!(m.vm);
            rec["phase_at_fault"] = json!(m.phase);
            rec["host"] = json!(m.to);
            let Some(i) = index_of(&m.to) else {
                rec["skipped"] = json!(format!("unknown host {}", m.to));
                return rec;
            };
            let dealt = match fault {
                Fault::LinkCut => cluster.cut(i + 1).map_err(|e| e.to_string()).and_then(|_| {
                    std::thread::sleep(CUT);
                    cluster.restore(i + 1).map_err(|e| e.to_string())
                }),
                Fault::DestinationKilled => {
                    cluster.agents[i].kill();
                    std::thread::sleep(DEAD);
                    cluster.agents[i].restart().map_err(|e| e.to_string())
                }
                _ => rt.block_on(ctl.cancel_migration(&m.id)).map(drop).map_err(|e| e.to_string()),
            };
            if let Err(e) = dealt {
                rec["error"] = json!(e);
            }
            rec["outcome"] = outcome(rt, ctl, &m.id);
        }
    }
    rec
}

#[cfg(test)]
mod tests {
    use super::parse_mib;

    #[test]
    fn memory_sizes_read_as_the_cli_reads_them() {
        assert_eq!(
            (parse_mib("256M").ok(), parse_mib("1G").ok(), parse_mib("512MiB").ok(), parse_mib("384").ok()),
            (Some(256), Some(1024), Some(512), Some(384))
        );
        assert!(parse_mib("12X").is_err());
    }
}
