//! A day of load changes: every VM's CPU use and dirty rate follow a daily curve (its
//! rack's tenants peak at their own hour), with noise and a few spikes (a batch job
//! that takes a whole host's VMs to their full vCPUs for a while), while the real
//! controller balances at level `automatic`. Reports the moves per hour, the imbalance
//! over time (the simulated truth, each simulated minute), every VM moved twice within
//! the cooldown (ping-pong) and the controller's CPU and memory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use walkabout_api::{BalanceConfig, BalanceLevel};
use walkabout_controller::{Cluster, ControllerConfig};

use crate::agents::{SimAgents, SimState};
use crate::cost::CostModel;
use crate::scenario::{build, cpu_and_rss, Rng, SimConfig, SimError, Spread};

/// How a day is played.
#[derive(Debug, Clone, Serialize)]
pub struct DayConfig {
    /// The cluster (hosts, VMs, racks, limits, seed, polls).
    pub cluster: SimConfig,
    /// Simulated hours.
    pub hours: u64,
    /// Spikes: a host's VMs all at their full vCPUs for `spike_minutes`.
    pub spikes: usize,
    /// How long a spike lasts, simulated minutes.
    pub spike_minutes: u64,
    /// Noise on each VM's load, each minute: a factor in `1 ± noise`.
    pub noise: f64,
    /// The balancer's settings (level `automatic` by default).
    pub balance: BalanceConfig,
}

impl DayConfig {
    /// A day on `hosts` hosts of 16 CPUs and `vms` VMs, balanced automatically with the
    /// controller's default threshold, hysteresis, minimum gain and cooldown.
    pub fn new(hosts: usize, vms: usize, cost: CostModel, data_dir: PathBuf) -> DayConfig {
        let mut cluster = SimConfig::new(crate::Scenario::Day, hosts, vms, cost, data_dir);
        cluster.host_cpus = 16;
        cluster.poll_ms = 5000;
        DayConfig {
            cluster,
            hours: 24,
            spikes: 6,
            spike_minutes: 45,
            noise: 0.1,
            balance: BalanceConfig { level: BalanceLevel::Automatic, ..BalanceConfig::default() },
        }
    }
}

/// A migration the day made.
#[derive(Debug, Clone, Serialize)]
pub struct Move {
    /// Simulated seconds since the day began.
    pub at_s: f64,
    /// The VM.
    pub vm: String,
    /// From host.
    pub from: String,
    /// To host.
    pub to: String,
}

/// A spike.
#[derive(Debug, Clone, Serialize)]
pub struct Spike {
    /// Simulated seconds since the day began.
    pub at_s: f64,
    /// The host whose VMs all ran at their full vCPUs.
    pub host: String,
}

/// One sample of the cluster's load (the simulated truth).
#[derive(Debug, Clone, Serialize)]
pub struct LoadSample {
    /// Simulated seconds since the day began.
    pub at_s: f64,
    /// Hottest host's CPU use less the coolest's, as fractions of their CPUs (what the
    /// balancer's threshold is about).
    pub spread: f64,
    /// Standard deviation of the hosts' CPU use.
    pub stddev: f64,
    /// Mean CPU use.
    pub mean: f64,
}

/// What the day did.
#[derive(Debug, Clone, Serialize)]
pub struct DayReport {
    /// How it was set up.
    pub config: DayConfig,
    /// Simulated seconds.
    pub simulated_s: f64,
    /// Real seconds (setup excluded).
    pub wall_s: f64,
    /// Real seconds building the cluster and registering its hosts.
    pub setup_wall_s: f64,
    /// Migrations started, completed, failed.
    pub migrations: BTreeMap<String, u64>,
    /// Moves started in each simulated hour.
    pub moves_per_hour: Vec<usize>,
    /// Every move.
    pub moves: Vec<Move>,
    /// VMs moved again within the cooldown after a move (ping-pong), with both moves.
    pub ping_pong: Vec<(Move, Move)>,
    /// VMs that moved more than once in the day.
    pub vms_moved_more_than_once: usize,
    /// The spikes.
    pub spikes: Vec<Spike>,
    /// Spread of CPU use (hottest - coolest host) over the day's samples.
    pub spread: Spread,
    /// The cluster's load each simulated minute.
    pub load: Vec<LoadSample>,
    /// The process's CPU time (controller and simulated agents), s.
    pub cpu_s: f64,
    /// The process's CPU time per simulated hour, s.
    pub cpu_s_per_simulated_h: f64,
    /// The process's peak resident memory, MiB.
    pub max_rss_mib: f64,
    /// Resident memory (MiB) at the end of each simulated hour.
    pub rss_mib_per_hour: Vec<f64>,
}

/// The daily curve: 0.3 at night, 1.0 at the peak (`phase_h` hours after midnight).
fn daily(t_s: f64, phase_h: f64) -> f64 {
    let x = (t_s / 3600.0 - phase_h) / 24.0 * std::f64::consts::TAU;
    0.3 + 0.7 * (1.0 + x.cos()) / 2.0
}

/// Each VM's own base load: CPUs at the peak (a fraction of its vCPUs), dirty rate at
/// the peak, and its tenants' peak hour (by rack: 9 h, 15 h, 21 h in turn).
struct Base {
    cpu: f64,
    dirty: f64,
    phase_h: f64,
    vcpus: f64,
}

fn bases(s: &SimState, cfg: &SimConfig, rng: &mut Rng) -> BTreeMap<String, Base> {
    s.vms
        .iter()
        .map(|(name, vm)| {
            let rack = vm.host / cfg.rack_size.max(1);
            #[allow(clippy::cast_precision_loss)]
            let frac = 0.2 + 0.6 * (rng.below(1000) as f64 / 1000.0);
            let phase_h = [9.0, 15.0, 21.0][rack % 3];
            let vcpus = f64::from(vm.vcpus);
            (name.clone(), Base { cpu: vcpus * frac, dirty: vm.dirty_mib_s, phase_h, vcpus })
        })
        .collect()
}

/// Runs a day on a paused current-thread runtime and reports.
pub fn run_day(cfg: DayConfig) -> Result<DayReport, SimError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| SimError::Setup { what: "tokio runtime".into(), cause: e.to_string() })?;
    rt.block_on(play_day(cfg))
}

async fn play_day(cfg: DayConfig) -> Result<DayReport, SimError> {
    let wall0 = std::time::Instant::now();
    let cl = &cfg.cluster;
    let _ = std::fs::remove_dir_all(&cl.data_dir);
    let mut state = build(cl);
    state.loads = true;
    let mut rng = Rng(cl.seed ^ 0xDA7);
    let base = bases(&state, cl, &mut rng);
    let agents = SimAgents::new(state, cl.cost);
    let mut config = ControllerConfig::new(cl.data_dir.clone());
    config.limits = cl.limits;
    config.poll_interval = Duration::from_millis(cl.poll_ms);
    // Balancing starts once the day does.
    config.balance = BalanceConfig { level: BalanceLevel::Manual, ..cfg.balance };
    let c = Cluster::open(config, Arc::new(agents.clone())).await?;
    for i in 1..=cl.hosts {
        c.add_host(&format!("http://sim-h{i}"), Some(&format!("h{i}"))).await?;
    }
    crate::scenario::wait_ready(&c).await?;
    let setup_wall_s = wall0.elapsed().as_secs_f64();
    let started0 = agents.state().counters.started;
    let (t0, w0) = (Instant::now(), std::time::Instant::now());
    // The spikes: random minutes, random hosts.
    let minutes = cfg.hours * 60;
    let mut spikes: Vec<(u64, usize)> =
        (0..cfg.spikes).map(|_| (rng.below(usize::try_from(minutes).unwrap_or(1)) as u64, rng.below(cl.hosts))).collect();
    spikes.sort_unstable();
    let mut spiked: Vec<Spike> = vec![];
    let mut load = vec![];
    let mut rss_per_hour = vec![];
    // The controller learns the loads over a few polls before it may act on them.
    apply_loads(&agents, &base, 0.0, &[], cfg.noise, &mut rng);
    tokio::time::sleep(Duration::from_millis(3 * cl.poll_ms)).await;
    c.set_balance_config(cfg.balance);
    for minute in 0..minutes {
        let at = t0.elapsed().as_secs_f64();
        let hot: Vec<usize> = spikes.iter().filter(|(m, _)| *m <= minute && minute < m + cfg.spike_minutes).map(|(_, h)| *h).collect();
        for (m, h) in spikes.iter().filter(|(m, _)| *m == minute) {
            let _ = m;
            spiked.push(Spike { at_s: at, host: format!("h{}", h + 1) });
        }
        apply_loads(&agents, &base, at, &hot, cfg.noise, &mut rng);
        load.push(sample(&agents.state(), at));
        tokio::time::sleep(Duration::from_secs(60)).await;
        if (minute + 1) % 60 == 0 {
            rss_per_hour.push(crate::scenario::rss_now_mib());
        }
    }
    let simulated_s = t0.elapsed().as_secs_f64();
    let wall_s = w0.elapsed().as_secs_f64();
    let (cpu_s, max_rss_mib) = cpu_and_rss();
    c.stop();
    let s = agents.state();
    let counters = s.counters.clone();
    let moves: Vec<Move> = s
        .moves
        .iter()
        .map(|(at, vm, from, to)| Move {
            at_s: at.saturating_duration_since(t0).as_secs_f64(),
            vm: vm.clone(),
            from: format!("h{}", from + 1),
            to: format!("h{}", to + 1),
        })
        .collect();
    drop(s);
    let mut moves_per_hour = vec![0usize; usize::try_from(cfg.hours).unwrap_or(0)];
    for m in &moves {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let h = (m.at_s / 3600.0) as usize;
        if let Some(n) = moves_per_hour.get_mut(h) {
            *n += 1;
        }
    }
    let (ping_pong, more_than_once) = ping_pong(&moves, cfg.balance.cooldown_s);
    let spreads: Vec<f64> = load.iter().map(|l| l.spread).collect();
    let _ = started0;
    let report = DayReport {
        simulated_s,
        wall_s,
        setup_wall_s,
        migrations: [
            ("started".to_string(), counters.started - started0),
            ("completed".to_string(), counters.completed),
            ("failed".to_string(), counters.failed),
            ("refused_memory".to_string(), counters.refused),
            ("refused_cpu".to_string(), counters.refused_cpu),
        ]
        .into(),
        moves_per_hour,
        ping_pong,
        vms_moved_more_than_once: more_than_once,
        spikes: spiked,
        spread: Spread::of(&spreads),
        load,
        cpu_s,
        cpu_s_per_simulated_h: cpu_s / (simulated_s / 3600.0).max(1e-9),
        max_rss_mib,
        rss_mib_per_hour: rss_per_hour,
        moves,
        config: cfg,
    };
    let _ = std::fs::remove_dir_all(&report.config.cluster.data_dir);
    Ok(report)
}

/// Every VM's load now: its base on the daily curve, with noise, at full vCPUs on a
/// spiking host.
fn apply_loads(agents: &SimAgents, base: &BTreeMap<String, Base>, at: f64, hot: &[usize], noise: f64, rng: &mut Rng) {
    let mut s = agents.state();
    let now = Instant::now();
    s.set_loads(now, |name, vm| {
        let Some(b) = base.get(name) else { return (0.0, vm.dirty_mib_s) };
        if hot.contains(&vm.host) {
            return (b.vcpus, b.dirty * 2.0);
        }
        #[allow(clippy::cast_precision_loss)]
        let jitter = 1.0 + noise * (rng.below(2001) as f64 / 1000.0 - 1.0);
        let f = daily(at, b.phase_h) * jitter;
        ((b.cpu * f).min(b.vcpus), b.dirty * f)
    });
}

/// The spread, standard deviation and mean of the hosts' CPU use, from the truth.
fn sample(s: &SimState, at: f64) -> LoadSample {
    let mut used = vec![0.0f64; s.hosts.len()];
    for vm in s.vms.values() {
        used[vm.host] += vm.cpu;
    }
    let uses: Vec<f64> = s.hosts.iter().zip(&used).filter(|(h, _)| !h.failed).map(|(h, u)| u / f64::from(h.cpus.max(1))).collect();
    #[allow(clippy::cast_precision_loss)]
    let n = uses.len().max(1) as f64;
    let mean = uses.iter().sum::<f64>() / n;
    let var = uses.iter().map(|u| (u - mean) * (u - mean)).sum::<f64>() / n;
    let (max, min) = uses.iter().fold((f64::MIN, f64::MAX), |(a, b), &u| (a.max(u), b.min(u)));
    LoadSample { at_s: at, spread: if uses.is_empty() { 0.0 } else { max - min }, stddev: var.sqrt(), mean }
}

/// Pairs of moves of one VM less than `cooldown_s` apart, and how many VMs moved more
/// than once.
fn ping_pong(moves: &[Move], cooldown_s: u64) -> (Vec<(Move, Move)>, usize) {
    let mut by_vm: BTreeMap<&str, Vec<&Move>> = BTreeMap::new();
    for m in moves {
        by_vm.entry(m.vm.as_str()).or_default().push(m);
    }
    let mut pairs = vec![];
    #[allow(clippy::cast_precision_loss)]
    let cooldown = cooldown_s as f64;
    for list in by_vm.values() {
        for w in list.windows(2) {
            if w[1].at_s - w[0].at_s < cooldown {
                pairs.push((w[0].clone(), w[1].clone()));
            }
        }
    }
    (pairs, by_vm.values().filter(|l| l.len() > 1).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daily_curve_peaks_at_its_phase_and_rests_at_night() {
        assert!((daily(9.0 * 3600.0, 9.0) - 1.0).abs() < 1e-9);
        assert!((daily(21.0 * 3600.0, 9.0) - 0.3).abs() < 1e-9);
    }

    #[test]
    fn a_vm_moved_twice_within_the_cooldown_is_ping_pong_and_after_it_is_not() {
        let m = |at_s: f64, from: &str, to: &str| Move { at_s, vm: "a".into(), from: from.into(), to: to.into() };
        let (pp, twice) = ping_pong(&[m(0.0, "h1", "h2"), m(100.0, "h2", "h1")], 1800);
        assert_eq!((pp.len(), twice), (1, 1));
        let (pp, twice) = ping_pong(&[m(0.0, "h1", "h2"), m(2000.0, "h2", "h1")], 1800);
        assert_eq!((pp.len(), twice), (0, 1));
    }
}
