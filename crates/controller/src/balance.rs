//! Automatic balancing, like DRS: from the load the agents measure, decide which VMs to
//! move so no host runs much hotter than the others, and say why for each.
//!
//! Rules, and why:
//! - **Levels.** `manual` decides nothing; `recommend` offers moves (as proposed plans,
//!   each with its reason) and moves nothing; `automatic` runs them, within the
//!   executor's limits, each with its reason in the event log.
//! - **Threshold with hysteresis.** Balancing starts when the spread of CPU use (the
//!   hottest host's use minus the coolest's, as fractions of their CPUs) exceeds
//!   `threshold`, and stops only once it falls below `threshold - hysteresis`: a load
//!   hovering at the threshold does not switch balancing on and off.
//! - **Minimum gain per move.** A move must lower the spread measure (the sum over
//!   hosts of use squared) by at least `min_gain`, after the cost of moving the VM (its
//!   memory and dirty rate: what pre-copy must send) is taken off: nothing is moved for
//!   a marginal gain, and a busy-writing VM moves only for a large one.
//! - **Cheapest first.** Of the moves that pass, the one removing the most imbalance
//!   per GiB pre-copy must send (memory plus 10 s of dirtying) goes first: a small,
//!   quiet VM before a large or busy-writing one that would even the load as much.
//!   The dirty rate is what the agents report for each VM, or what its last migration
//!   measured.
//! - **No ping-pong.** A VM moved is not moved again for `cooldown_s`, and a move is
//!   only ever from a host hotter than the mean to one cooler than the mean, so the
//!   same VM cannot be sent back by the next round's noise.
//! - **The whole model.** A move must be one the planner would make: the destination
//!   runs the VM's CPU, has its memory and vCPUs, and keeps its groups (checked on the
//!   planner's case).
//!
//! [`Balancer::round`] is pure (the time is given), so the rules are tested over
//! simulated hours without a clock.

use std::collections::BTreeMap;

use walkabout_plan::Case;

pub use walkabout_api::{BalanceConfig, BalanceLevel, BalanceMove, BalanceStatus};

/// One host's load, as its agent measured it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLoad {
    /// The host.
    pub name: String,
    /// Its CPUs.
    pub cpus: f64,
}

/// One VM's load.
#[derive(Debug, Clone, PartialEq)]
pub struct VmLoad {
    /// The VM.
    pub name: String,
    /// Its host.
    pub host: String,
    /// CPUs its QEMU used recently (CPU time per second).
    pub cpu: f64,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// How fast it dirties memory, MiB/s.
    pub dirty_mib_s: f64,
}

/// The balancer's memory between rounds: whether it is balancing (hysteresis) and
/// when each VM last moved (cooldown).
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    active: bool,
    moved_s: BTreeMap<String, u64>,
}

/// The balancer inside the controller: its settings, its memory between rounds, and
/// the last round's moves.
#[derive(Debug, Default)]
pub struct BalanceState {
    inner: std::sync::Mutex<(BalanceConfig, Balancer, Vec<BalanceMove>)>,
}

impl BalanceState {
    /// A balancer with `config`.
    pub fn new(config: BalanceConfig) -> BalanceState {
        BalanceState { inner: std::sync::Mutex::new((config, Balancer::default(), vec![])) }
    }

    /// Its settings.
    pub fn config(&self) -> BalanceConfig {
        crate::lock(&self.inner).0
    }

    /// Changes its settings.
    pub fn set_config(&self, config: BalanceConfig) {
        crate::lock(&self.inner).0 = config;
    }

    /// The last round's moves.
    pub fn last(&self) -> Vec<BalanceMove> {
        crate::lock(&self.inner).2.clone()
    }

    /// Its settings, state and last moves.
    pub fn status(&self) -> BalanceStatus {
        let g = crate::lock(&self.inner);
        BalanceStatus { config: g.0, active: g.1.active(), last_moves: g.2.clone() }
    }

    /// One round of [`Balancer::round`], remembered.
    pub fn decide(&self, cfg: &BalanceConfig, case: &Case, hosts: &[HostLoad], vms: &[VmLoad], now_s: u64) -> Vec<BalanceMove> {
        let mut g = crate::lock(&self.inner);
        let moves = g.1.round(cfg, case, hosts, vms, now_s);
        g.2.clone_from(&moves);
        moves
    }
}

/// Runs a balancing round every `interval_s` until the controller stops.
pub fn spawn(c: crate::Cluster) {
    tokio::spawn(async move {
        loop {
            let wait = std::time::Duration::from_secs(c.balance_config().interval_s.max(1));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = c.stopped() => return,
            }
            c.balance_round();
        }
    });
}

/// CPU use of each host as a fraction of its CPUs.
fn use_of(hosts: &[HostLoad], vms: &[VmLoad]) -> BTreeMap<String, f64> {
    let mut used: BTreeMap<String, f64> = hosts.iter().map(|h| (h.name.clone(), 0.0)).collect();
    for v in vms {
        if let Some(u) = used.get_mut(&v.host) {
            *u += v.cpu;
        }
    }
    hosts.iter().map(|h| (h.name.clone(), used[&h.name] / h.cpus.max(1e-9))).collect()
}

impl Balancer {
    /// Whether the last round found the cluster out of balance.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Records that `vm` moved at `now_s` (an operator's move counts too).
    pub fn moved(&mut self, vm: &str, now_s: u64) {
        self.moved_s.insert(vm.to_string(), now_s);
    }

    /// One round at `now_s`: the moves to make (at most `max_moves`), best first, each
    /// one the planner's `case` allows. The moves are recorded as made (cooldown); at
    /// level `manual` nothing is decided.
    pub fn round(&mut self, cfg: &BalanceConfig, case: &Case, hosts: &[HostLoad], vms: &[VmLoad], now_s: u64) -> Vec<BalanceMove> {
        if cfg.level == BalanceLevel::Manual || hosts.len() < 2 {
            return vec![];
        }
        let mut vms: Vec<VmLoad> = vms.to_vec();
        let mut out = vec![];
        for _ in 0..cfg.max_moves {
            let usage = use_of(hosts, &vms);
            let (max, min) = usage.values().fold((f64::MIN, f64::MAX), |(a, b), &u| (a.max(u), b.min(u)));
            let spread = max - min;
            if self.active && spread < cfg.threshold - cfg.hysteresis {
                self.active = false;
            } else if !self.active && spread > cfg.threshold {
                self.active = true;
            }
            if !self.active {
                break;
            }
            let mean = usage.values().sum::<f64>() / usage.len() as f64;
            let Some(best) = self.best_move(cfg, case, hosts, &vms, &usage, mean, now_s) else { break };
            if let Some(v) = vms.iter_mut().find(|v| v.name == best.vm) {
                v.host.clone_from(&best.to);
            }
            self.moved(&best.vm, now_s);
            out.push(best);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn best_move(
        &self,
        cfg: &BalanceConfig,
        case: &Case,
        hosts: &[HostLoad],
        vms: &[VmLoad],
        usage: &BTreeMap<String, f64>,
        mean: f64,
        now_s: u64,
    ) -> Option<BalanceMove> {
        let cpus: BTreeMap<&str, f64> = hosts.iter().map(|h| (h.name.as_str(), h.cpus.max(1e-9))).collect();
        // The best move and its score: imbalance removed per GiB sent.
        let mut best: Option<(BalanceMove, f64)> = None;
        for v in vms {
            let (Some(&ua), Some(&ca)) = (usage.get(&v.host), cpus.get(v.host.as_str())) else { continue };
            if ua <= mean || self.moved_s.get(&v.name).is_some_and(|t| now_s.saturating_sub(*t) < cfg.cooldown_s) {
                continue;
            }
            #[allow(clippy::cast_precision_loss)]
            let gib = (v.memory_mib as f64 + 10.0 * v.dirty_mib_s.max(0.0)) / 1024.0;
            let cost = cfg.cost_per_gib * gib;
            for h in hosts {
                let ub = usage[&h.name];
                if h.name == v.host || ub >= mean {
                    continue;
                }
                let cb = cpus[h.name.as_str()];
                let (na, nb) = (ua - v.cpu / ca, ub + v.cpu / cb);
                let removed = ua * ua + ub * ub - na * na - nb * nb;
                let gain = removed - cost;
                let score = removed / gib.max(1e-6);
                let better = |b: &(BalanceMove, f64)| score > b.1 || (score == b.1 && gain > b.0.gain);
                if gain < cfg.min_gain || best.as_ref().is_some_and(|b| !better(b)) || !allowed(case, &v.name, &h.name) {
                    continue;
                }
                let mv = BalanceMove {
                    vm: v.name.clone(),
                    from: v.host.clone(),
                    to: h.name.clone(),
                    gain,
                    reason: format!(
                        "balance: {} at {:.0}% CPU, {} at {:.0}% (cluster mean {:.0}%); {} uses {:.2} CPUs, so moving it leaves \
                         {:.0}% and {:.0}%; gain {gain:.3} after its move cost {cost:.3} ({} MiB, dirtying {:.0} MiB/s), at least {}",
                        v.host,
                        ua * 100.0,
                        h.name,
                        ub * 100.0,
                        mean * 100.0,
                        v.name,
                        v.cpu,
                        na * 100.0,
                        nb * 100.0,
                        v.memory_mib,
                        v.dirty_mib_s,
                        cfg.min_gain
                    ),
                };
                best = Some((mv, score));
            }
        }
        best.map(|(m, _)| m)
    }
}

/// Whether the planner's `case` lets `vm` run on `host` beside what is there now: its
/// CPU, its memory and vCPUs, and its groups.
fn allowed(case: &Case, vm: &str, host: &str) -> bool {
    let mut target = case.current.clone();
    if target.insert(vm.to_string(), host.to_string()).is_none() {
        return false;
    }
    let mut c = case.clone();
    c.target = target;
    matches!(walkabout_plan::plan(&c), Ok(walkabout_plan::Outcome::Ok(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use walkabout_plan::{Host, Vm};

    /// Four hosts of 8 CPUs, 32 GiB; twelve VMs of 2 GiB, three per host, each using
    /// `cpu` CPUs (by host, in order).
    fn cluster(cpu: [f64; 4]) -> (Case, Vec<HostLoad>, Vec<VmLoad>) {
        let mut case = Case::default();
        let mut hosts = vec![];
        let mut vms = vec![];
        for (h, load) in cpu.iter().enumerate() {
            let name = format!("h{}", h + 1);
            case.hosts.push(Host {
                name: name.clone(),
                memory_mib: 32768,
                vcpus: None,
                arch: None,
                guest_archs: None,
                cpu_features: vec![],
                reserved_mib: 0,
            });
            hosts.push(HostLoad { name: name.clone(), cpus: 8.0 });
            for k in 0..3 {
                let vm = format!("vm{}{}", h + 1, k);
                case.vms.push(Vm { name: vm.clone(), memory_mib: 2048, vcpus: None, arch: None, cpu_features: vec![] });
                case.current.insert(vm.clone(), name.clone());
                vms.push(VmLoad { name: vm, host: name.clone(), cpu: *load, memory_mib: 2048, dirty_mib_s: 0.0 });
            }
        }
        (case, hosts, vms)
    }

    fn level(l: BalanceLevel) -> BalanceConfig {
        BalanceConfig { level: l, ..BalanceConfig::default() }
    }

    /// Applies moves to the loads and the case, as executed migrations would.
    fn apply(case: &mut Case, vms: &mut [VmLoad], moves: &[BalanceMove]) {
        for m in moves {
            case.current.insert(m.vm.clone(), m.to.clone());
            if let Some(v) = vms.iter_mut().find(|v| v.name == m.vm) {
                v.host.clone_from(&m.to);
            }
        }
    }

    #[test]
    fn a_load_spike_on_one_host_moves_vms_off_it_with_their_reasons_in_automatic() {
        let (case, hosts, vms) = cluster([2.5, 0.3, 0.3, 0.3]);

        let moves = Balancer::default().round(&level(BalanceLevel::Automatic), &case, &hosts, &vms, 0);

        assert!(!moves.is_empty());
        assert!(moves.iter().all(|m| m.from == "h1"), "{moves:?}");
        assert!(moves[0].reason.starts_with("balance: h1 at 94% CPU"), "{}", moves[0].reason);
    }

    #[test]
    fn manual_decides_nothing_even_under_a_spike() {
        let (case, hosts, vms) = cluster([2.5, 0.3, 0.3, 0.3]);

        let moves = Balancer::default().round(&level(BalanceLevel::Manual), &case, &hosts, &vms, 0);

        assert!(moves.is_empty());
    }

    #[test]
    fn a_spread_below_the_threshold_moves_nothing() {
        let (case, hosts, vms) = cluster([1.0, 0.4, 0.4, 0.4]);

        let moves = Balancer::default().round(&level(BalanceLevel::Automatic), &case, &hosts, &vms, 0);

        assert!(moves.is_empty(), "spread 0.22 < 0.3: {moves:?}");
    }

    #[test]
    fn a_move_to_a_host_that_cannot_run_the_vms_cpu_is_never_chosen() {
        let (mut case, hosts, mut vms) = cluster([2.5, 0.3, 0.3, 0.3]);
        for h in &mut case.hosts {
            h.cpu_features = if h.name == "h1" || h.name == "h2" { vec!["avx512f".into()] } else { vec![] };
        }
        for v in case.vms.iter_mut().filter(|v| v.name.starts_with("vm1")) {
            v.cpu_features = vec!["avx512f".into()];
        }
        vms.iter_mut().filter(|v| v.host != "h1").for_each(|v| v.cpu = 0.0);

        let moves = Balancer::default().round(&level(BalanceLevel::Automatic), &case, &hosts, &vms, 0);

        assert!(!moves.is_empty());
        assert!(moves.iter().all(|m| m.to == "h2"), "{moves:?}");
    }

    #[test]
    fn a_steady_load_over_ten_simulated_minutes_moves_no_vm_twice_and_then_nothing() {
        let (mut case, hosts, mut vms) = cluster([2.5, 0.3, 0.3, 0.3]);
        let cfg = level(BalanceLevel::Automatic);
        let mut b = Balancer::default();
        let mut all: Vec<BalanceMove> = vec![];
        let mut last_round_with_moves = 0;
        for round in 0..(600 / 20) {
            let moves = b.round(&cfg, &case, &hosts, &vms, round * 20);
            if !moves.is_empty() {
                last_round_with_moves = round;
            }
            apply(&mut case, &mut vms, &moves);
            all.extend(moves);
        }
        let mut names: Vec<&str> = all.iter().map(|m| m.vm.as_str()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();

        assert!(!all.is_empty());
        assert_eq!(names.len(), before, "a VM moved twice: {all:?}");
        assert!(last_round_with_moves < 3, "still moving in round {last_round_with_moves}: {all:?}");
    }

    #[test]
    fn of_two_vms_that_would_even_the_load_alike_the_one_dirtying_less_moves_first() {
        let (case, hosts, mut vms) = cluster([2.5, 0.3, 0.3, 0.3]);
        for v in vms.iter_mut() {
            v.dirty_mib_s = match v.name.as_str() {
                "vm11" => 4.0,
                _ => 300.0,
            };
        }
        let cfg = BalanceConfig { max_moves: 1, ..level(BalanceLevel::Automatic) };

        let moves = Balancer::default().round(&cfg, &case, &hosts, &vms, 0);

        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(moves[0].vm, "vm11", "{moves:?}");
        assert!(moves[0].reason.contains("dirtying 4 MiB/s"), "{}", moves[0].reason);
    }

    #[test]
    fn of_two_vms_that_would_even_the_load_alike_the_smaller_moves_first() {
        let (mut case, hosts, mut vms) = cluster([2.5, 0.3, 0.3, 0.3]);
        // vm12 is the last of h1's VMs (looked at last) and the only small one.
        for v in case.vms.iter_mut().filter(|v| v.name.starts_with("vm1")) {
            v.memory_mib = if v.name == "vm12" { 1024 } else { 8192 };
        }
        for v in vms.iter_mut().filter(|v| v.name.starts_with("vm1")) {
            v.memory_mib = if v.name == "vm12" { 1024 } else { 8192 };
        }
        let cfg = BalanceConfig { max_moves: 1, ..level(BalanceLevel::Automatic) };

        let moves = Balancer::default().round(&cfg, &case, &hosts, &vms, 0);

        assert_eq!(moves.iter().map(|m| m.vm.as_str()).collect::<Vec<_>>(), ["vm12"]);
    }

    #[test]
    fn a_vm_removing_a_little_less_imbalance_for_far_less_to_send_goes_first() {
        let (case, hosts, mut vms) = cluster([2.5, 0.3, 0.3, 0.3]);
        // vm10 would even the load a little more but dirties 2 GiB/s: 20 GiB to send
        // against vm11's 2 GiB.
        for v in vms.iter_mut().filter(|v| v.host == "h1") {
            (v.cpu, v.dirty_mib_s) = match v.name.as_str() {
                "vm10" => (2.6, 2048.0),
                _ => (2.4, 0.0),
            };
        }
        let cfg = BalanceConfig { max_moves: 1, cost_per_gib: 0.0, ..level(BalanceLevel::Automatic) };

        let moves = Balancer::default().round(&cfg, &case, &hosts, &vms, 0);

        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_ne!(moves[0].vm, "vm10", "{moves:?}");
    }

    #[test]
    fn a_load_hovering_at_the_threshold_does_not_switch_balancing_on_and_off() {
        let (case, hosts, mut vms) = cluster([0.3, 0.3, 0.3, 0.3]);
        let cfg = BalanceConfig { cooldown_s: 0, min_gain: 10.0, ..level(BalanceLevel::Automatic) };
        let mut b = Balancer::default();
        let mut switches = 0;
        let mut was = b.active();
        // h1's VMs swing between 1.0 and 1.2 CPUs each: the spread between 0.26 and 0.34,
        // across the threshold (0.3) but never below threshold - hysteresis (0.2).
        for round in 0..30u64 {
            let cpu = if round % 2 == 0 { 1.0 } else { 1.2 };
            vms.iter_mut().filter(|v| v.host == "h1").for_each(|v| v.cpu = cpu);
            b.round(&cfg, &case, &hosts, &vms, round * 20);
            if b.active() != was {
                switches += 1;
                was = b.active();
            }
        }

        assert_eq!(switches, 1, "on once, and it stays on while the spread is above 0.2");
    }

    mod in_the_controller {
        use super::super::*;
        use crate::fake::{open_with, temp, Fake};
        use std::time::Duration;

        /// h1 runs three busy VMs (0.6 CPUs each of its 2); h2 and h3 idle ones.
        async fn spiked(level: BalanceLevel, tag: &str) -> (Fake, std::path::PathBuf, crate::Cluster) {
            let fake = Fake::new(
                &[("h1", 4096), ("h2", 4096), ("h3", 4096)],
                &[("a", 256, "h1"), ("b", 256, "h1"), ("c", 256, "h1"), ("d", 256, "h2"), ("e", 256, "h3")],
            );
            for vm in ["a", "b", "c"] {
                fake.state().set_cpu(vm, 0.6);
            }
            let dir = temp(&format!("balance-{tag}"));
            let mut config = crate::ControllerConfig::new(dir.clone());
            config.balance = BalanceConfig { level, interval_s: 1, ..BalanceConfig::default() };
            let c = open_with(config, &fake, &["h1", "h2", "h3"]).await;
            (fake, dir, c)
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_spike_in_automatic_moves_vms_off_the_hot_host_each_with_its_reason() {
            let (fake, dir, c) = spiked(BalanceLevel::Automatic, "automatic").await;

            for _ in 0..100 {
                if !fake.state().started.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }

            let started = fake.state().started.clone();
            assert!(!started.is_empty(), "nothing moved");
            assert!(started.iter().all(|(_, from, _)| from == "http://h1"), "{started:?}");
            let events = c.events().since(0);
            assert!(
                events.iter().any(|e| e.message.starts_with("balancer moves") && e.message.contains("balance: h1 at 90% CPU")),
                "{events:?}"
            );
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_spike_in_recommend_proposes_plans_with_reasons_and_moves_nothing() {
            let (fake, dir, c) = spiked(BalanceLevel::Recommend, "recommend").await;

            for _ in 0..100 {
                if !c.plans().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;

            assert!(!c.plans().is_empty(), "nothing recommended");
            assert!(c.plans().iter().all(|p| p.status == crate::plans::PlanStatus::Proposed), "{:?}", c.plans());
            assert!(fake.state().started.is_empty(), "{:?}", fake.state().started);
            assert!(c.balance_moves().iter().all(|m| m.reason.starts_with("balance: h1")), "{:?}", c.balance_moves());
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_dirty_rates_the_agents_report_make_the_quiet_vm_move_first() {
            let (fake, dir, c) = {
                let fake = Fake::new(
                    &[("h1", 4096), ("h2", 4096), ("h3", 4096)],
                    &[("a", 256, "h1"), ("b", 256, "h1"), ("c", 256, "h1"), ("d", 256, "h2"), ("e", 256, "h3")],
                );
                for vm in ["a", "b", "c"] {
                    fake.state().set_cpu(vm, 0.6);
                }
                // a and c write 512 MiB/s: b is the cheap one to move.
                fake.state().dirty_bps.insert("a".into(), 512 << 20);
                fake.state().dirty_bps.insert("c".into(), 512 << 20);
                let dir = temp("balance-dirty");
                let mut config = crate::ControllerConfig::new(dir.clone());
                config.balance = BalanceConfig { level: BalanceLevel::Automatic, interval_s: 1, max_moves: 1, ..BalanceConfig::default() };
                let c = open_with(config, &fake, &["h1", "h2", "h3"]).await;
                (fake, dir, c)
            };

            for _ in 0..100 {
                if !fake.state().started.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }

            let started = fake.state().started.clone();
            assert_eq!(started.first().map(|s| s.0.as_str()), Some("b"), "{started:?}");
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_spike_in_manual_does_nothing() {
            let (fake, dir, c) = spiked(BalanceLevel::Manual, "manual").await;

            tokio::time::sleep(Duration::from_secs(4)).await;

            assert!(c.plans().is_empty(), "{:?}", c.plans());
            assert!(fake.state().started.is_empty());
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}
