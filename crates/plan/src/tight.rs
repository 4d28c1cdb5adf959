//! A seeded generator of tight planning cases (6-40 hosts, 88-97% memory fill), for the
//! tests and `bench/plan`: the cases where deadlocks are common and free room is scarce.
//!
//! Reachable cases get their target from random valid moves (each lands on a host with
//! room, the source keeping the VM until it lands), so a plan is known to exist. The
//! others are built to have none, in ways the planner must prove: a pair of large VMs
//! swapping places on the only two hosts with the CPU feature they need, a swap of two
//! VMs larger than the whole cluster's free memory, or a target host that lacks a
//! feature its VM needs. Pure and deterministic: the same seed gives the same case.

use crate::model::{Case, Host, Vm};

/// How a generated case was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TightKind {
    /// The target was reached by random valid moves: a plan exists.
    Reachable,
    /// Two VMs needing a feature only two hosts have, each larger than half of those
    /// hosts, swap places: neither can ever move.
    ExclusiveSwap,
    /// Two VMs, each larger than the free memory of the whole cluster, swap places.
    OversizeSwap,
    /// A VM's target host lacks a CPU feature it needs.
    Incompatible,
}

/// One generated case and how it was built.
#[derive(Debug, Clone)]
pub struct TightCase {
    /// The planner input.
    pub case: Case,
    /// Whether a plan exists by construction, and if not, why.
    pub kind: TightKind,
    /// Memory fill of the current placement, over all hosts.
    pub fill: f64,
}

/// A deterministic pseudo-random stream (SplitMix64), seeded: generated cases (here and
/// in the planner's benchmark) are the same on every run.
pub struct Rng(pub u64);

impl Rng {
    /// The next number of the stream.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

const FEATURE: &str = "sgx";

/// Builds case number `seed`: 6-40 hosts, 88-97% fill, VM sizes from 512 MiB to half a
/// host. About one case in five is built to be impossible.
pub fn tight_case(seed: u64) -> TightCase {
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x0074_6967_6874);
    let mut kind = match rng.below(16) {
        0 => TightKind::ExclusiveSwap,
        1 => TightKind::OversizeSwap,
        2 => TightKind::Incompatible,
        _ => TightKind::Reachable,
    };
    let hosts = if kind == TightKind::OversizeSwap { rng.range(6, 8) as usize } else { rng.range(6, 40) as usize };
    let fill_permille = if kind == TightKind::OversizeSwap { rng.range(955, 970) } else { rng.range(880, 970) };
    // Host sizes: 16, 32 or 64 GiB usable, 1 GiB reserved; the two featured hosts
    // alike; all 64 GiB for an oversize swap (so half a host exceeds all free memory).
    let mut caps: Vec<u64> = (0..hosts).map(|_| 16_384u64 << rng.below(3)).collect();
    caps[1] = caps[0];
    if kind == TightKind::OversizeSwap {
        caps.iter_mut().for_each(|c| *c = 65_536);
    }
    // The first two hosts offer the exclusive feature, and only they.
    let featured = |h: usize| h < 2;
    // The pair that will swap: (host, size, needs the feature).
    let pair = match kind {
        TightKind::ExclusiveSwap => Some((0usize, 1usize, caps[0] * 6 / 10, true)),
        TightKind::OversizeSwap => Some((2, 3, caps[2] / 2, false)),
        _ => None,
    };
    let mut sizes: Vec<u64> = Vec::new();
    let mut needs: Vec<bool> = Vec::new();
    let mut home: Vec<usize> = Vec::new();
    let mut frozen: Vec<usize> = Vec::new();
    let mut load = vec![0u64; hosts];
    for h in 0..hosts {
        let budget = caps[h] * fill_permille / 1000;
        if let Some((a, b, size, feature)) = pair {
            if h == a || h == b {
                frozen.push(sizes.len());
                sizes.push(size);
                needs.push(feature);
                home.push(h);
                load[h] += size;
            }
        }
        while budget - load[h] >= 512 {
            let room = budget - load[h];
            // Mostly small, some medium, a few large VMs.
            let size = match rng.below(10) {
                0..=5 => 512 * rng.range(1, 8),
                6..=8 => 1024 * rng.range(4, 16),
                _ => caps[h] / 4 + 512 * rng.below(caps[h] / 4 / 512 + 1),
            }
            .min(room);
            // A tail that a 512 MiB VM would not fill goes to the last one.
            let size = if room - size < 512 { room } else { size };
            sizes.push(size);
            needs.push(featured(h) && rng.below(4) == 0);
            home.push(h);
            load[h] += size;
        }
    }
    let mut target = home.clone();
    let mut tload = load.clone();
    let steps = sizes.len() * 6;
    for _ in 0..steps {
        // Favour large VMs and roomy hosts, so large VMs change places too.
        let (a, b, c) =
            (rng.below(sizes.len() as u64) as usize, rng.below(sizes.len() as u64) as usize, rng.below(sizes.len() as u64) as usize);
        let v = if sizes[a] >= sizes[b] { a } else { b };
        let v = if sizes[v] >= sizes[c] { v } else { c };
        let (x, y) = (rng.below(hosts as u64) as usize, rng.below(hosts as u64) as usize);
        let h = if caps[x] - tload[x] >= caps[y] - tload[y] { x } else { y };
        let compatible = !needs[v] || featured(h);
        if h != target[v] && compatible && !frozen.contains(&v) && tload[h] + sizes[v] <= caps[h] {
            tload[target[v]] -= sizes[v];
            tload[h] += sizes[v];
            target[v] = h;
        }
    }
    if let [x, y] = frozen[..] {
        // Equal sizes: swapping keeps the target within capacity.
        target.swap(x, y);
    }
    if kind == TightKind::Incompatible {
        // A featured VM whose target becomes a plain host with room.
        let moved = (0..sizes.len()).find_map(|v| {
            let h = (2..hosts).find(|&h| needs[v] && tload[h] + sizes[v] <= caps[h])?;
            Some((v, h))
        });
        if let Some((v, h)) = moved {
            tload[target[v]] -= sizes[v];
            tload[h] += sizes[v];
            target[v] = h;
        } else {
            kind = TightKind::Reachable;
        }
    }
    let mut case = Case::default();
    for (h, &cap) in caps.iter().enumerate() {
        case.hosts.push(Host {
            name: format!("h{h:02}"),
            memory_mib: cap + 1024,
            vcpus: None,
            arch: Some("x86_64".into()),
            guest_archs: None,
            cpu_features: if featured(h) { vec![FEATURE.into()] } else { Vec::new() },
            reserved_mib: 1024,
        });
    }
    for (v, &size) in sizes.iter().enumerate() {
        let name = format!("vm{v:03}");
        let cpu_features = if needs[v] { vec![FEATURE.into()] } else { Vec::new() };
        case.vms.push(Vm { name: name.clone(), memory_mib: size, vcpus: None, arch: Some("x86_64".into()), cpu_features });
        case.current.insert(name.clone(), case.hosts[home[v]].name.clone());
        case.target.insert(name, case.hosts[target[v]].name.clone());
    }
    #[allow(clippy::cast_precision_loss)]
    let fill = load.iter().sum::<u64>() as f64 / caps.iter().sum::<u64>() as f64;
    TightCase { case, kind, fill }
}
