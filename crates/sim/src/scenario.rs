//! Scenarios: a simulated cluster built, the real controller opened on it, and a
//! sequence of operator actions and failures played in simulated time.
//!
//! Time: the whole run is one current-thread tokio runtime with its clock paused, so
//! time advances only when every task waits (tokio's auto-advance): the controller's
//! 500 ms polls, its plan and executor ticks and the migrations' ends follow simulated
//! time, and the run takes as long as the controller's own work does. Plan latency,
//! CPU and memory are real (the process's own, simulated agents included).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use walkabout_api::{CpuCatalog, ExecLimits, HostStatus, Maintenance};
use walkabout_controller::{Cluster, ControllerConfig};

use crate::agents::{SimAgents, SimHost, SimState, SimVm};
use crate::cost::CostModel;
use crate::rolling::{admit, HostLoad, RollingLimits};

/// Errors of a simulation run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The controller refused or failed.
    #[error("controller: {0}")]
    Controller(#[from] walkabout_controller::ControllerError),
    /// The runtime or the data directory.
    #[error("{what}: {cause}")]
    Setup {
        /// What was being set up.
        what: String,
        /// Why it failed.
        cause: String,
    },
    /// The cluster never became ready.
    #[error("after {0} simulated seconds not every host was up with its CPU catalog")]
    NotReady(u64),
}

/// What to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Drain every host in turn (maintenance), then put it back in service.
    Rolling,
    /// A rolling maintenance during which random hosts fail.
    Failures,
    /// A drain during which a whole rack fails at once.
    Rack,
    /// A day of load changes under automatic balancing ([`crate::day`]).
    Day,
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Scenario, String> {
        match s {
            "rolling" | "rolling-maintenance" => Ok(Scenario::Rolling),
            "failures" | "host-failures" => Ok(Scenario::Failures),
            "rack" | "rack-lost" => Ok(Scenario::Rack),
            "day" | "day-of-load" => Ok(Scenario::Day),
            _ => Err(format!("unknown scenario {s:?}: rolling, failures, rack or day")),
        }
    }
}

/// The simulated cluster and how hard to drive it.
#[derive(Debug, Clone, Serialize)]
pub struct SimConfig {
    /// The scenario.
    pub scenario: Scenario,
    /// Hosts.
    pub hosts: usize,
    /// VMs.
    pub vms: usize,
    /// Hosts per rack (racks alternate CPU generations).
    pub rack_size: usize,
    /// Memory per host for VMs, MiB.
    pub host_mib: u64,
    /// CPUs per host.
    pub host_cpus: u32,
    /// Hosts the rolling maintenance drains (default: all).
    pub drain_hosts: Option<usize>,
    /// How many hosts the rolling maintenance takes out at once ([`crate::rolling`]).
    pub rolling: RollingLimits,
    /// Simulated seconds of steady polling (nothing moving) measured before the
    /// scenario: the controller's CPU per agent poll.
    pub steady_s: u64,
    /// Hosts that fail in the `failures` scenario.
    pub failures: usize,
    /// Limits the controller runs migrations under.
    pub limits: ExecLimits,
    /// Seed of the cluster's layout and of the failures.
    pub seed: u64,
    /// How often the controller polls each agent, ms.
    pub poll_ms: u64,
    /// The migration cost model.
    pub cost: CostModel,
    /// Directory for the controller's database (a tmpfs is best).
    #[serde(skip)]
    pub data_dir: PathBuf,
}

impl SimConfig {
    /// A cluster of `hosts` hosts and `vms` VMs with the defaults: racks of 20, 256 GiB
    /// and 64 CPUs per host, two migrations out of and into a host at once and 64 in
    /// the cluster, each agent polled every 500 ms (the controller's default).
    pub fn new(scenario: Scenario, hosts: usize, vms: usize, cost: CostModel, data_dir: PathBuf) -> SimConfig {
        SimConfig {
            scenario,
            hosts,
            vms,
            rack_size: 20,
            host_mib: 256 * 1024,
            host_cpus: 64,
            drain_hosts: None,
            rolling: RollingLimits::default(),
            steady_s: 30,
            failures: 3,
            limits: ExecLimits {
                per_host_out: 2,
                per_host_in: 2,
                per_cluster: 64,
                planner_parallel_per_host: 2,
                max_attempts: 2,
                max_replans: 4,
                ..ExecLimits::default()
            },
            seed: 1,
            poll_ms: 500,
            cost,
            data_dir,
        }
    }
}

/// A scratch directory for the controller's database: on tmpfs (`/dev/shm`) when there
/// is one, as its every write syncs and a disk would make the simulation wait on it.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let base = std::path::Path::new("/dev/shm");
    let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
    base.join(format!("walkabout-sim-{tag}-{}", std::process::id()))
}

/// Median, 95th and 99th percentiles and maximum of a sample.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    /// Values.
    pub count: usize,
    /// Median.
    pub median: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`.
    pub fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if v.is_empty() {
                0.0
            } else {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
                let i = ((v.len() - 1) as f64 * q).round() as usize;
                v[i]
            }
        };
        Spread { count: v.len(), median: at(0.5), p95: at(0.95), p99: at(0.99), max: v.last().copied().unwrap_or(0.0) }
    }
}

/// One host's maintenance.
#[derive(Debug, Clone, Serialize)]
pub struct DrainResult {
    /// The host.
    pub host: String,
    /// Simulated seconds from the scenario's start to the drain's request.
    pub started_s: f64,
    /// `drained` or `drain_failed`, or `refused` (no plan) or `timeout`.
    pub outcome: String,
    /// Simulated seconds from the request to the host's end.
    pub time_s: f64,
    /// Migrations its plan ran.
    pub migrations: usize,
    /// Real milliseconds the controller took to plan it.
    pub plan_ms: f64,
    /// Why it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A host failure and what the controller made of it.
#[derive(Debug, Clone, Serialize)]
pub struct FailureResult {
    /// The host.
    pub host: String,
    /// VMs it ran when it failed.
    pub vms: usize,
    /// Simulated seconds until the controller marked it down.
    pub detected_s: Option<f64>,
}

/// The controller's cost of polling, measured over a steady stretch before the
/// scenario (every host polled, nothing moving).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PollCost {
    /// Simulated seconds measured.
    pub simulated_s: f64,
    /// Real seconds they took.
    pub wall_s: f64,
    /// Agent polls answered (a host's `/v1/host` and `/v1/vms` count one poll).
    pub polls: u64,
    /// CPU time of the process over the stretch, s (simulated agents included).
    pub cpu_s: f64,
    /// CPU time per poll, microseconds.
    pub cpu_us_per_poll: f64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// How the run was set up.
    pub config: SimConfig,
    /// Simulated seconds the scenario took (setup excluded).
    pub simulated_s: f64,
    /// Real seconds the scenario took (setup excluded).
    pub wall_s: f64,
    /// Real seconds building the cluster and registering its hosts.
    pub setup_wall_s: f64,
    /// Migrations started, completed, failed, refused by the agents.
    pub migrations: BTreeMap<String, u64>,
    /// Simulated seconds per migration (completed ones).
    pub migration_s: Spread,
    /// Each drain.
    pub drains: Vec<DrainResult>,
    /// Simulated seconds to drain a host (drained ones).
    pub time_to_drain_s: Spread,
    /// Real milliseconds to plan a drain.
    pub plan_latency_ms: Spread,
    /// Host failures.
    pub failures: Vec<FailureResult>,
    /// VMs the controller sees unreachable at the end (their hosts failed and their fate
    /// is not settled yet: a protected VM waits out its fence time before its failover).
    pub unreachable_vms: usize,
    /// VMs the controller reported lost at the end (unprotected, their host down).
    pub lost_vms: usize,
    /// The process's CPU time (controller and simulated agents), s.
    pub cpu_s: f64,
    /// The process's peak resident memory, MiB.
    pub max_rss_mib: f64,
    /// Agent polls answered, per simulated second.
    pub polls_per_simulated_s: f64,
    /// Agent polls answered, per real second: what this controller kept up with.
    pub polls_per_wall_s: f64,
    /// (simulated s, migrations completed) every simulated minute.
    pub series: Vec<(f64, u64)>,
    /// (simulated s, hosts in maintenance) every simulated minute.
    pub out_series: Vec<(f64, usize)>,
    /// Most hosts in maintenance at once.
    pub hosts_out_max: usize,
    /// Hosts in maintenance on average over the scenario (sampled every simulated second).
    pub hosts_out_mean: f64,
    /// The highest memory fill of any simulated host (VMs and incoming migrations over
    /// its capacity), sampled every simulated minute: above 1.0 would be an overflow.
    pub peak_host_fill: f64,
    /// The controller's CPU per agent poll, before the scenario.
    pub poll_cost: PollCost,
}

/// SplitMix64: a seeded stream, so a scenario replays exactly.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap_or(0)
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Two CPU generations: even racks run AVX-512, odd racks do not.
fn catalogs() -> (Arc<CpuCatalog>, Arc<CpuCatalog>) {
    let models: BTreeMap<String, BTreeSet<String>> = [
        ("qemu64".to_string(), set(&["sse2", "lm"])),
        ("Haswell".to_string(), set(&["sse2", "lm", "avx2"])),
        ("Skylake-Server".to_string(), set(&["sse2", "lm", "avx2", "avx512f"])),
    ]
    .into();
    let new =
        CpuCatalog { ceiling: "host".into(), ceiling_features: set(&["sse2", "lm", "avx2", "avx512f", "vaes"]), models: models.clone() };
    let old = CpuCatalog { ceiling: "host".into(), ceiling_features: set(&["sse2", "lm", "avx2"]), models };
    (Arc::new(new), Arc::new(old))
}

/// The simulated cluster: hosts in racks, VMs spread over them (each VM on a host that
/// runs its CPU model), sizes and dirty rates from a seeded mix.
pub fn build(cfg: &SimConfig) -> SimState {
    let (new, old) = catalogs();
    let mut s = SimState::default();
    for i in 0..cfg.hosts {
        let url = format!("http://sim-h{}", i + 1);
        let rack = i / cfg.rack_size.max(1);
        let catalog = if rack.is_multiple_of(2) { new.clone() } else { old.clone() };
        s.by_url.insert(url.clone(), i);
        s.hosts.push(SimHost {
            url,
            capacity_mib: cfg.host_mib,
            cpus: cfg.host_cpus,
            failed: false,
            vms: BTreeSet::new(),
            catalog: Some(catalog),
        });
    }
    let mut rng = Rng(cfg.seed);
    let sizes = [1024u64, 2048, 2048, 4096, 4096, 8192];
    let dirty = [0.0, 0.0, 8.0, 32.0, 64.0];
    let mut used = vec![0u64; cfg.hosts];
    for v in 0..cfg.vms {
        let mem = sizes[rng.below(sizes.len())];
        let skylake = rng.below(4) == 0;
        // Round-robin from a seeded start, skipping hosts that are full or cannot run it.
        let start = v % cfg.hosts.max(1);
        let host = (0..cfg.hosts).map(|k| (start + k) % cfg.hosts).find(|&h| {
            let rack = h / cfg.rack_size.max(1);
            used[h] + mem <= cfg.host_mib * 8 / 10 && (!skylake || rack.is_multiple_of(2))
        });
        let Some(h) = host else { continue };
        used[h] += mem;
        let name = format!("vm{}", v + 1);
        s.hosts[h].vms.insert(name.clone());
        let model = if skylake { "Skylake-Server" } else { "Haswell" };
        s.vms.insert(
            name,
            SimVm {
                host: h,
                memory_mib: mem,
                vcpus: [1, 2, 4][rng.below(3)],
                dirty_mib_s: dirty[rng.below(dirty.len())],
                cpu_model: Some(model.into()),
                cpu: 0.0,
                cpu_ms: 0.0,
            },
        );
    }
    s
}

/// The process's resident memory now, MiB.
pub(crate) fn rss_now_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The process's CPU time (s) and peak resident memory (MiB).
pub(crate) fn cpu_and_rss() -> (f64, f64) {
    // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else.
    let cpu = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) == 0 {
            let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            t(ru.ru_utime) + t(ru.ru_stime)
        } else {
            0.0
        }
    };
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0);
    (cpu, rss)
}

/// Runs `cfg`'s scenario on a paused current-thread runtime and reports.
pub fn run(cfg: SimConfig) -> Result<Report, SimError> {
    if cfg.scenario == Scenario::Day {
        return Err(SimError::Setup { what: "scenario day".into(), cause: "a day is played by walkabout_sim::run_day".into() });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| SimError::Setup { what: "tokio runtime".into(), cause: e.to_string() })?;
    rt.block_on(play(cfg))
}

async fn play(cfg: SimConfig) -> Result<Report, SimError> {
    let wall0 = std::time::Instant::now();
    let _ = std::fs::remove_dir_all(&cfg.data_dir);
    let agents = SimAgents::new(build(&cfg), cfg.cost);
    let mut config = ControllerConfig::new(cfg.data_dir.clone());
    config.limits = cfg.limits;
    config.poll_interval = Duration::from_millis(cfg.poll_ms);
    let c = Cluster::open(config, Arc::new(agents.clone())).await?;
    let names: Vec<String> = (1..=cfg.hosts).map(|i| format!("h{i}")).collect();
    for n in &names {
        c.add_host(&format!("http://sim-{n}"), Some(n)).await?;
    }
    wait_ready(&c).await?;
    let setup_wall_s = wall0.elapsed().as_secs_f64();
    let poll_cost = steady(&agents, cfg.steady_s).await;
    let polls0 = agents.state().counters.polls;
    let (t0, w0) = (Instant::now(), std::time::Instant::now());
    let mut run = Run {
        c: &c,
        agents: &agents,
        t0,
        w0,
        series: vec![],
        out_series: vec![],
        out_samples: (0, 0, 0),
        peak_fill: 0.0,
        drains: vec![],
        failures: vec![],
        fail_at: BTreeMap::new(),
        fail_marks: vec![],
    };
    let mut rng = Rng(cfg.seed ^ 0xFA11);
    match cfg.scenario {
        Scenario::Rolling => {
            let waiting: Vec<String> = names.iter().take(cfg.drain_hosts.unwrap_or(cfg.hosts)).cloned().collect();
            run.rolling(waiting, &cfg).await;
        }
        Scenario::Failures => {
            let k = cfg.drain_hosts.unwrap_or(cfg.hosts);
            // Failures strike during the maintenance, at random drains, never the drained host.
            for _ in 0..cfg.failures {
                let at = rng.below(k.max(1));
                let mut victim = rng.below(cfg.hosts);
                while victim == at {
                    victim = rng.below(cfg.hosts);
                }
                run.fail_at.entry(at).or_default().push(victim);
            }
            for (i, n) in names.iter().take(k).enumerate() {
                if let Some(victims) = run.fail_at.remove(&i) {
                    for v in victims {
                        run.fail(v);
                    }
                }
                if run.c.host(n).map(|h| h.status == HostStatus::Up).unwrap_or(false) {
                    run.maintain(n).await;
                }
            }
        }
        Scenario::Day => {}
        Scenario::Rack => {
            // Drain a host of rack 0 and lose rack 1 while its plan runs.
            let first = names[0].clone();
            let drain = {
                let c = c.clone();
                async move {
                    let t = std::time::Instant::now();
                    let r = c.drain(&first);
                    (r, t.elapsed().as_secs_f64() * 1000.0)
                }
            }
            .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rack: Vec<usize> = (cfg.rack_size..(2 * cfg.rack_size).min(cfg.hosts)).collect();
            for h in rack {
                run.fail(h);
            }
            run.finish_drain(&names[0], drain.0, drain.1, run.t0).await;
        }
    }
    run.await_detection().await;
    let simulated_s = t0.elapsed().as_secs_f64();
    let wall_s = w0.elapsed().as_secs_f64();
    let (cpu_s, max_rss_mib) = cpu_and_rss();
    let s = agents.state();
    let counters = s.counters.clone();
    drop(s);
    let unreachable_vms = c.vms().iter().filter(|v| v.state == walkabout_api::ClusterVmState::Unreachable).count();
    let lost_vms = c.vms().iter().filter(|v| v.state == walkabout_api::ClusterVmState::Lost).count();
    c.stop();
    let polls = (counters.polls - polls0) as f64 / 2.0;
    let drained: Vec<f64> = run.drains.iter().filter(|d| d.outcome == "drained").map(|d| d.time_s).collect();
    let plan_ms: Vec<f64> = run.drains.iter().map(|d| d.plan_ms).collect();
    let report = Report {
        simulated_s,
        wall_s,
        setup_wall_s,
        migrations: [
            ("started".to_string(), counters.started),
            ("completed".to_string(), counters.completed),
            ("failed".to_string(), counters.failed),
            ("refused_memory".to_string(), counters.refused),
            ("refused_cpu".to_string(), counters.refused_cpu),
        ]
        .into(),
        migration_s: Spread::of(&counters.migration_ms.iter().map(|&m| m as f64 / 1000.0).collect::<Vec<_>>()),
        time_to_drain_s: Spread::of(&drained),
        plan_latency_ms: Spread::of(&plan_ms),
        drains: run.drains,
        failures: run.failures,
        unreachable_vms,
        lost_vms,
        cpu_s,
        max_rss_mib,
        polls_per_simulated_s: polls / simulated_s.max(1e-9),
        polls_per_wall_s: polls / wall_s.max(1e-9),
        series: run.series,
        out_series: run.out_series,
        hosts_out_max: run.out_samples.2,
        #[allow(clippy::cast_precision_loss)]
        hosts_out_mean: run.out_samples.1 as f64 / run.out_samples.0.max(1) as f64,
        peak_host_fill: run.peak_fill,
        poll_cost,
        config: cfg,
    };
    let _ = std::fs::remove_dir_all(&report.config.data_dir);
    Ok(report)
}

struct Run<'a> {
    c: &'a Cluster,
    agents: &'a SimAgents,
    t0: Instant,
    /// When it started, in real time (for progress lines).
    w0: std::time::Instant,
    series: Vec<(f64, u64)>,
    out_series: Vec<(f64, usize)>,
    /// Seconds sampled, their sum of hosts out, the most out at once.
    out_samples: (u64, u64, usize),
    peak_fill: f64,
    drains: Vec<DrainResult>,
    failures: Vec<FailureResult>,
    fail_at: BTreeMap<usize, Vec<usize>>,
    /// Failed hosts and when (controller ms) they failed.
    fail_marks: Vec<(usize, u64)>,
}

impl Run<'_> {
    fn fail(&mut self, h: usize) {
        let vms = self.agents.state().hosts.get(h).map_or(0, |x| x.vms.len());
        self.agents.fail(h);
        self.failures.push(FailureResult { host: format!("h{}", h + 1), vms, detected_s: None });
        self.fail_marks.push((h, walkabout_controller::now_ms()));
    }

    fn sample(&mut self) {
        let at = self.t0.elapsed().as_secs_f64();
        if self.series.last().is_none_or(|(t, _)| at - t >= 60.0) {
            let s = self.agents.state();
            self.series.push((at, s.counters.completed));
            #[allow(clippy::cast_precision_loss)]
            let fill = (0..s.hosts.len()).map(|h| s.used_mib(h) as f64 / s.hosts[h].capacity_mib.max(1) as f64).fold(0.0f64, f64::max);
            drop(s);
            self.peak_fill = self.peak_fill.max(fill);
        }
    }

    /// Notes how many hosts are in maintenance now (`out`), every simulated second.
    fn sample_out(&mut self, out: usize) {
        let at = self.t0.elapsed().as_secs_f64();
        self.out_samples.0 += 1;
        self.out_samples.1 += out as u64;
        self.out_samples.2 = self.out_samples.2.max(out);
        if self.out_series.last().is_none_or(|(t, _)| at - t >= 60.0) {
            self.out_series.push((at, out));
        }
    }

    /// The hosts as [`admit`] sees them: racks from the host's number, memory as its
    /// agent last reported, and the hosts the drains under way are moving VMs into.
    fn loads(&self, rack_size: usize, plans: &[String]) -> Vec<HostLoad> {
        let mut receiving = std::collections::BTreeSet::new();
        for id in plans {
            if let Ok(p) = self.c.plan(id) {
                receiving.extend(p.steps.iter().filter(|s| !s.status.is_final()).map(|s| s.to.clone()));
            }
        }
        self.c
            .hosts()
            .into_iter()
            .map(|h| {
                let n: usize = h.name.trim_start_matches('h').parse().unwrap_or(1);
                HostLoad {
                    rack: n.saturating_sub(1) / rack_size.max(1),
                    capacity_mib: h.capacity_mib,
                    used_mib: h.used_mib,
                    up: h.status == HostStatus::Up,
                    out: h.maintenance != Maintenance::Active,
                    receiving: receiving.contains(&h.name),
                    name: h.name,
                }
            })
            .collect()
    }

    /// The rolling maintenance of `waiting`, in order: as many hosts out at once as
    /// `cfg.rolling` allows ([`admit`]), each drained by the controller's drain plan,
    /// put back in service once drained (or once its drain failed), the next admitted
    /// as room frees up.
    async fn rolling(&mut self, mut waiting: Vec<String>, cfg: &SimConfig) {
        // Host -> (its drain plan, when requested, real ms to plan it).
        let mut active: BTreeMap<String, (String, Instant, f64)> = BTreeMap::new();
        let mut last_try: Option<Instant> = None;
        while !waiting.is_empty() || !active.is_empty() {
            let mut ended = false;
            for (host, (plan, t, plan_ms)) in active.clone() {
                let (outcome, reason) = match self.c.host(&host).map(|h| (h.maintenance, h.maintenance_reason)) {
                    Ok((Maintenance::Drained, _)) => ("drained", None),
                    Ok((Maintenance::DrainFailed, why)) => ("drain_failed", why),
                    Ok(_) if t.elapsed() > Duration::from_secs(6 * 3600) => ("timeout", None),
                    Ok(_) => continue,
                    Err(e) => ("refused", Some(e.to_string())),
                };
                let migrations = self.c.plan(&plan).map_or(0, |p| p.steps.iter().filter(|s| s.migration.is_some()).count());
                self.drains.push(DrainResult {
                    host: host.clone(),
                    started_s: t.duration_since(self.t0).as_secs_f64(),
                    outcome: outcome.into(),
                    time_s: t.elapsed().as_secs_f64(),
                    migrations,
                    plan_ms,
                    reason,
                });
                let _ = self.c.undrain(&host).await;
                active.remove(&host);
                ended = true;
                // A long run says how far it got (every 5% of the hosts).
                let (done, all) = (self.drains.len(), self.drains.len() + waiting.len() + active.len());
                if done % (all / 20).max(1) == 0 {
                    tracing::info!(
                        done,
                        of = all,
                        simulated_s = self.t0.elapsed().as_secs(),
                        real_s = self.w0.elapsed().as_secs(),
                        "rolling maintenance: hosts done"
                    );
                }
            }
            // Admit when a drain ended, else every 10 simulated seconds (reading every
            // host is not free at 1,000 of them).
            let due = ended || last_try.is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
            if !waiting.is_empty() && active.len() < cfg.rolling.max_hosts && due {
                last_try = Some(Instant::now());
                let plans: Vec<String> = active.values().map(|(p, _, _)| p.clone()).collect();
                let loads = self.loads(cfg.rack_size, &plans);
                let admitted = admit(&loads, &waiting, &cfg.rolling);
                if admitted.is_empty() && active.is_empty() {
                    // Nothing runs and nothing may start: nothing will change.
                    for host in waiting.drain(..) {
                        self.drains.push(DrainResult {
                            host,
                            started_s: self.t0.elapsed().as_secs_f64(),
                            outcome: "not_admitted".into(),
                            time_s: 0.0,
                            migrations: 0,
                            plan_ms: 0.0,
                            reason: Some("the rolling limits admit no host (capacity or racks)".into()),
                        });
                    }
                }
                for host in admitted {
                    waiting.retain(|w| w != &host);
                    let t = Instant::now();
                    let real = std::time::Instant::now();
                    let r = self.c.drain(&host);
                    let plan_ms = real.elapsed().as_secs_f64() * 1000.0;
                    match r {
                        Ok(p) => {
                            active.insert(host, (p.id, t, plan_ms));
                        }
                        Err(e) => self.drains.push(DrainResult {
                            host,
                            started_s: t.duration_since(self.t0).as_secs_f64(),
                            outcome: "refused".into(),
                            time_s: 0.0,
                            migrations: 0,
                            plan_ms,
                            reason: Some(e.to_string()),
                        }),
                    }
                }
            }
            self.sample_out(active.len());
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.sample();
            self.detect();
        }
    }

    /// Drains `host`, waits for its end, puts it back in service.
    async fn maintain(&mut self, host: &str) {
        let t = Instant::now();
        let real = std::time::Instant::now();
        let r = self.c.drain(host);
        let plan_ms = real.elapsed().as_secs_f64() * 1000.0;
        self.finish_drain(host, r, plan_ms, t).await;
        let _ = self.c.undrain(host).await;
    }

    async fn finish_drain(
        &mut self,
        host: &str,
        r: Result<walkabout_api::PlanRecord, walkabout_controller::ControllerError>,
        plan_ms: f64,
        t: Instant,
    ) {
        let plan = match r {
            Ok(p) => p,
            Err(e) => {
                self.drains.push(DrainResult {
                    host: host.into(),
                    started_s: t.duration_since(self.t0).as_secs_f64(),
                    outcome: "refused".into(),
                    time_s: 0.0,
                    migrations: 0,
                    plan_ms,
                    reason: Some(e.to_string()),
                });
                return;
            }
        };
        let (outcome, reason) = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.sample();
            self.detect();
            match self.c.host(host).map(|h| (h.maintenance, h.maintenance_reason)) {
                Ok((Maintenance::Drained, _)) => break ("drained", None),
                Ok((Maintenance::DrainFailed, why)) => break ("drain_failed", why),
                Ok(_) if t.elapsed() > Duration::from_secs(6 * 3600) => break ("timeout", None),
                Ok(_) => {}
                Err(e) => break ("refused", Some(e.to_string())),
            }
        };
        let migrations = self.c.plan(&plan.id).map_or(0, |p| p.steps.iter().filter(|s| s.migration.is_some()).count());
        self.drains.push(DrainResult {
            host: host.into(),
            started_s: t.duration_since(self.t0).as_secs_f64(),
            outcome: outcome.into(),
            time_s: t.elapsed().as_secs_f64(),
            migrations,
            plan_ms,
            reason,
        });
    }

    /// Notes when the controller marked each failed host down.
    fn detect(&mut self) {
        for (h, at) in &self.fail_marks {
            let name = format!("h{}", h + 1);
            let Some(f) = self.failures.iter_mut().find(|f| f.host == name && f.detected_s.is_none()) else { continue };
            if let Ok(x) = self.c.host(&name).map_err(drop).and_then(|x| if x.status == HostStatus::Down { Ok(x) } else { Err(()) }) {
                f.detected_s = Some(x.status_since_ms.saturating_sub(*at) as f64 / 1000.0);
            }
        }
    }

    /// Waits (30 simulated seconds at most) until every failed host is marked down.
    async fn await_detection(&mut self) {
        for _ in 0..30 {
            self.detect();
            if self.failures.iter().all(|f| f.detected_s.is_some()) {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Lets the controller poll every agent for `secs` simulated seconds with nothing
/// moving, and measures what that cost.
async fn steady(agents: &SimAgents, secs: u64) -> PollCost {
    let polls0 = agents.state().counters.polls;
    let (cpu0, _) = cpu_and_rss();
    let wall0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let wall_s = wall0.elapsed().as_secs_f64();
    let (cpu1, _) = cpu_and_rss();
    let polls = (agents.state().counters.polls - polls0) / 2;
    #[allow(clippy::cast_precision_loss)]
    let cpu_us_per_poll = (cpu1 - cpu0) * 1e6 / polls.max(1) as f64;
    #[allow(clippy::cast_precision_loss)]
    PollCost { simulated_s: secs as f64, wall_s, polls, cpu_s: cpu1 - cpu0, cpu_us_per_poll }
}

/// Waits until every host of `c` is up with its CPU catalog (two minutes at most).
pub(crate) async fn wait_ready(c: &Cluster) -> Result<(), SimError> {
    let mut waited = 0;
    while !c.hosts().iter().all(|h| h.status == HostStatus::Up && h.cpu_ceiling.is_some()) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        waited += 1;
        if waited > 120 {
            return Err(SimError::NotReady(waited));
        }
    }
    Ok(())
}
