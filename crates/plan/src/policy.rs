//! Policies that turn a goal into a target placement, fed to the same planner:
//! drain hosts, consolidate onto the fewest hosts, balance memory use evenly.
//!
//! All three respect compatibility, capacity (memory and vCPUs) and the cluster's
//! groups: an affinity group's VMs are placed as one unit on one host, and no host gets
//! two VMs of the same anti-affinity group. Each keeps VMs where they are when it can,
//! so the plan that follows stays short. VMs not running now get a host too (they are
//! started after the last migration).

use std::collections::{BTreeMap, HashMap};

use crate::error::InputError;
use crate::model::{Case, GroupKind};
use crate::output::{Blocked, Impossible, Outcome};
use crate::planner::{plan_with, Options};

/// A goal for the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Move every VM off these hosts; leave the rest in place.
    Drain {
        /// Hosts to empty.
        hosts: Vec<String>,
    },
    /// Run everything on as few hosts as possible.
    Consolidate,
    /// Even out memory use (used / usable) across hosts.
    Balance,
}

/// A target placement and, for each VM the policy placed on a host other than its
/// current one, which constraints chose that host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// VM -> host.
    pub target: BTreeMap<String, String>,
    /// VM -> why that host (only for VMs that move or start).
    pub why: BTreeMap<String, String>,
}

/// Makes the target for `policy` and plans the way there. The outcome carries the
/// target; if no target satisfies the policy, an impossible outcome says which VMs
/// could not be placed, and which constraint refused each of them. Each migration to
/// its target says which constraint placed it there.
pub fn plan_policy(case: &Case, policy: &Policy, opts: &Options) -> Result<Outcome, InputError> {
    let placement = match placement_for(case, policy)? {
        Ok(p) => p,
        Err(blocked) => {
            let reason = match policy {
                Policy::Drain { hosts } => format!("cannot drain {}", hosts.join(", ")),
                Policy::Consolidate => "cannot place every VM on any set of hosts".into(),
                Policy::Balance => "cannot place every VM".into(),
            };
            return Ok(Outcome::Impossible(Impossible { reason, blocked, target: None }));
        }
    };
    let target = placement.target.clone();
    let mut with_target = case.clone();
    with_target.target = target.clone();
    let mut outcome = plan_with(&with_target, opts)?;
    match &mut outcome {
        Outcome::Ok(p) => {
            annotate(&mut p.migrations, &placement.why);
            p.target = Some(target);
        }
        Outcome::Impossible(i) | Outcome::Unsolved(i) => i.target = Some(target),
    }
    Ok(outcome)
}

/// Appends to each final migration of a VM the reason its target host was chosen.
pub fn annotate(migrations: &mut [crate::output::Migration], why: &BTreeMap<String, String>) {
    for m in migrations.iter_mut().filter(|m| m.why.starts_with("to target")) {
        if let Some(w) = why.get(&m.vm) {
            m.why = format!("{}: {w}", m.why);
        }
    }
}

/// The target placement `policy` asks for, or the VMs it cannot place.
pub fn target_for(case: &Case, policy: &Policy) -> Result<Result<BTreeMap<String, String>, Vec<Blocked>>, InputError> {
    Ok(placement_for(case, policy)?.map(|p| p.target))
}

/// The target placement `policy` asks for with the reason for each VM's host, or the
/// VMs it cannot place, each with the constraint that refused it on every host.
pub fn placement_for(case: &Case, policy: &Policy) -> Result<Result<Placement, Vec<Blocked>>, InputError> {
    let mut layout = Layout::new(case)?;
    let result = match policy {
        Policy::Drain { hosts } => {
            let mut banned = vec![false; case.hosts.len()];
            for name in hosts {
                let h = case.hosts.iter().position(|x| &x.name == name).ok_or_else(|| InputError::UnknownPolicyHost(name.clone()))?;
                banned[h] = true;
            }
            layout.keep_current(&banned);
            layout.place_rest(&banned, Fit::Worst)
        }
        Policy::Consolidate => consolidate(&mut layout),
        Policy::Balance => {
            let banned = vec![false; case.hosts.len()];
            layout.keep_current(&banned);
            let placed = layout.place_rest(&banned, Fit::Worst);
            if placed.is_ok() {
                layout.balance();
            }
            placed
        }
    };
    Ok(result.map(|()| Placement { target: layout.target(), why: layout.reasons() }))
}

/// Tries k = 1, 2, ... hosts, preferring the fullest now (then the largest), so the
/// fewest VMs move: first keeping VMs that already run on the chosen hosts and packing
/// the rest best-fit, then repacking everything best-fit, largest first.
fn consolidate(layout: &mut Layout) -> Result<(), Vec<Blocked>> {
    let n = layout.cap_mem.len();
    let mut current_load = vec![0u64; n];
    for u in 0..layout.units.len() {
        if let Some(h) = layout.current[u] {
            current_load[h] += layout.unit_mem[u];
        }
    }
    let total: u64 = layout.unit_mem.iter().sum();
    let orders: [Vec<usize>; 2] = {
        let mut by_load: Vec<usize> = (0..n).collect();
        by_load.sort_by_key(|&h| (std::cmp::Reverse(current_load[h]), std::cmp::Reverse(layout.cap_mem[h]), h));
        let mut by_cap: Vec<usize> = (0..n).collect();
        by_cap.sort_by_key(|&h| (std::cmp::Reverse(layout.cap_mem[h]), std::cmp::Reverse(current_load[h]), h));
        [by_load, by_cap]
    };
    let base = layout.clone();
    let mut last_err = Vec::new();
    for k in 1..=n {
        for order in &orders {
            let cap: u64 = order[..k].iter().map(|&h| layout.cap_mem[h]).sum();
            if cap < total {
                continue;
            }
            let mut banned = vec![true; n];
            for &h in &order[..k] {
                banned[h] = false;
            }
            for keep in [true, false] {
                let mut l = base.clone();
                if keep {
                    l.keep_current(&banned);
                }
                match l.place_rest(&banned, Fit::Best) {
                    Ok(()) => {
                        *layout = l;
                        return Ok(());
                    }
                    Err(b) => last_err = b,
                }
            }
        }
    }
    Err(last_err)
}

/// The constraint that keeps a unit off a host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// The host cannot run its CPU model or architecture (the sentence says which).
    Cpu(String),
    /// Not enough free memory.
    Memory,
    /// Not enough free vCPUs.
    Vcpus,
    /// It holds a member of this anti-affinity group.
    Anti(String),
}

/// How to pick among hosts with room.
#[derive(Debug, Clone, Copy)]
enum Fit {
    /// The host left with the most room: spreads load, keeps room for cycles.
    Worst,
    /// The host left with the least room: packs.
    Best,
}

/// VMs grouped into units (an affinity group is one unit), and a host for each unit.
///
/// Compatibility is kept per class (hosts alike in architecture and CPU features, units
/// alike in what their members need), so 10,000 hosts x 100,000 VMs need a handful of
/// comparisons; the reason a host cannot run a unit is worked out only when asked.
#[derive(Debug, Clone)]
struct Layout<'a> {
    case: &'a Case,
    names: Vec<String>,
    host_names: Vec<String>,
    cap_mem: Vec<u64>,
    cap_cpu: Vec<u64>,
    /// Members of each unit (VM indices).
    units: Vec<Vec<usize>>,
    unit_mem: Vec<u64>,
    unit_cpu: Vec<u64>,
    /// Compatibility class of each unit and of each host.
    unit_class: Vec<u32>,
    host_class: Vec<u32>,
    host_classes: usize,
    /// `compat[unit_class * host_classes + host_class]`: every member can run there.
    compat: std::rc::Rc<Vec<bool>>,
    /// Anti-affinity group ids of each unit.
    anti: Vec<Vec<usize>>,
    /// Where each unit runs now, if all its members run on one host.
    current: Vec<Option<usize>>,
    at: Vec<Option<usize>>,
    load_mem: Vec<u64>,
    load_cpu: Vec<u64>,
    /// Per host, how many units of each anti-affinity group it holds.
    anti_count: Vec<HashMap<usize, u32>>,
    /// Why each unit is where it is (empty: kept where it runs).
    why: Vec<String>,
}

/// What a VM needs of a host's CPU: architecture and sorted features.
type Needs = (Option<String>, Vec<String>);

/// What makes hosts alike for compatibility: guest architectures, own architecture,
/// sorted CPU features.
type HostKey = (Option<Vec<String>>, Option<String>, Vec<String>);

impl<'a> Layout<'a> {
    fn new(case: &'a Case) -> Result<Layout<'a>, InputError> {
        crate::validate::check_amounts(case)?;
        let vm_ix: HashMap<&str, usize> = case.vms.iter().enumerate().map(|(i, v)| (v.name.as_str(), i)).collect();
        let host_ix: HashMap<&str, usize> = case.hosts.iter().enumerate().map(|(i, h)| (h.name.as_str(), i)).collect();
        // Union-find over affinity groups.
        let mut parent: Vec<usize> = (0..case.vms.len()).collect();
        fn root(p: &mut [usize], mut x: usize) -> usize {
            while p[x] != x {
                p[x] = p[p[x]];
                x = p[x];
            }
            x
        }
        let member = |g: &crate::model::Group, v: &String| {
            vm_ix
                .get(v.as_str())
                .copied()
                .ok_or_else(|| InputError::BadGroup { group: g.name.clone(), cause: format!("unknown VM \"{v}\"") })
        };
        let mut anti_of_vm: Vec<Vec<usize>> = vec![Vec::new(); case.vms.len()];
        for (gi, g) in case.groups.iter().enumerate() {
            let members = g.vms.iter().map(|v| member(g, v)).collect::<Result<Vec<_>, _>>()?;
            match g.kind {
                GroupKind::Affinity => {
                    for w in members.windows(2) {
                        let (a, b) = (root(&mut parent, w[0]), root(&mut parent, w[1]));
                        parent[a] = b;
                    }
                }
                GroupKind::AntiAffinity => {
                    for m in members {
                        anti_of_vm[m].push(gi);
                    }
                }
            }
        }
        let mut unit_of_root: HashMap<usize, usize> = HashMap::new();
        let mut units: Vec<Vec<usize>> = Vec::new();
        for v in 0..case.vms.len() {
            let r = root(&mut parent, v);
            let u = *unit_of_root.entry(r).or_insert_with(|| {
                units.push(Vec::new());
                units.len() - 1
            });
            units[u].push(v);
        }
        // Compatibility classes.
        let mut host_keys: HashMap<HostKey, u32> = HashMap::new();
        let mut host_rep: Vec<usize> = Vec::new();
        let host_class: Vec<u32> = case
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let mut feats = h.cpu_features.clone();
                feats.sort();
                let next = u32::try_from(host_keys.len()).unwrap_or(u32::MAX);
                *host_keys.entry((h.guest_archs.clone(), h.arch.clone(), feats)).or_insert_with(|| {
                    host_rep.push(i);
                    next
                })
            })
            .collect();
        let mut unit_keys: HashMap<Vec<Needs>, u32> = HashMap::new();
        let mut unit_rep: Vec<usize> = Vec::new();
        let unit_class: Vec<u32> = units
            .iter()
            .enumerate()
            .map(|(u, members)| {
                let mut key: Vec<Needs> = members
                    .iter()
                    .map(|&v| {
                        let mut f = case.vms[v].cpu_features.clone();
                        f.sort();
                        (case.vms[v].arch.clone(), f)
                    })
                    .collect();
                key.sort();
                key.dedup();
                let next = u32::try_from(unit_keys.len()).unwrap_or(u32::MAX);
                *unit_keys.entry(key).or_insert_with(|| {
                    unit_rep.push(u);
                    next
                })
            })
            .collect();
        let mut compat = Vec::with_capacity(unit_rep.len() * host_rep.len());
        for &u in &unit_rep {
            for &h in &host_rep {
                compat.push(units[u].iter().all(|&v| case.hosts[h].can_run(&case.vms[v])));
            }
        }
        let mut layout = Layout {
            case,
            names: case.vms.iter().map(|v| v.name.clone()).collect(),
            host_names: case.hosts.iter().map(|h| h.name.clone()).collect(),
            cap_mem: case.hosts.iter().map(crate::model::Host::usable_mib).collect(),
            cap_cpu: case.hosts.iter().map(|h| h.vcpus.unwrap_or(u64::MAX / 4)).collect(),
            unit_mem: Vec::new(),
            unit_cpu: Vec::new(),
            unit_class,
            host_class,
            host_classes: host_rep.len(),
            compat: std::rc::Rc::new(compat),
            anti: Vec::new(),
            current: Vec::new(),
            at: vec![None; units.len()],
            load_mem: vec![0; case.hosts.len()],
            load_cpu: vec![0; case.hosts.len()],
            anti_count: vec![HashMap::new(); case.hosts.len()],
            why: vec![String::new(); units.len()],
            units: Vec::new(),
        };
        for members in &units {
            layout.unit_mem.push(members.iter().map(|&v| case.vms[v].memory_mib).sum());
            layout.unit_cpu.push(members.iter().map(|&v| case.vms[v].vcpus.unwrap_or(0)).sum());
            let mut anti: Vec<usize> = members.iter().flat_map(|&v| anti_of_vm[v].iter().copied()).collect();
            anti.sort_unstable();
            anti.dedup();
            layout.anti.push(anti);
            let hosts: Vec<Option<usize>> =
                members.iter().map(|&v| case.current.get(&case.vms[v].name).and_then(|h| host_ix.get(h.as_str()).copied())).collect();
            let same = hosts.first().copied().flatten().filter(|h| hosts.iter().all(|x| *x == Some(*h)));
            layout.current.push(same);
        }
        layout.units = units;
        Ok(layout)
    }

    /// Whether every member of unit `u` can run on host `h` (CPU and architecture).
    fn compatible(&self, u: usize, h: usize) -> bool {
        self.compat[self.unit_class[u] as usize * self.host_classes + self.host_class[h] as usize]
    }

    /// The first constraint that keeps unit `u` off host `h` now, or `None` if it fits.
    fn refusal(&self, u: usize, h: usize) -> Option<Refusal> {
        if !self.compatible(u, h) {
            let host = &self.case.hosts[h];
            let why = self.units[u].iter().find_map(|&v| host.incompatibility(&self.case.vms[v])).unwrap_or_default();
            return Some(Refusal::Cpu(why));
        }
        if self.load_mem[h] + self.unit_mem[u] > self.cap_mem[h] {
            return Some(Refusal::Memory);
        }
        if self.load_cpu[h] + self.unit_cpu[u] > self.cap_cpu[h] {
            return Some(Refusal::Vcpus);
        }
        self.anti[u]
            .iter()
            .find(|g| self.anti_count[h].get(g).copied().unwrap_or(0) > 0)
            .map(|&g| Refusal::Anti(self.case.groups[g].name.clone()))
    }

    fn can_place(&self, u: usize, h: usize) -> bool {
        self.compatible(u, h)
            && self.load_mem[h] + self.unit_mem[u] <= self.cap_mem[h]
            && self.load_cpu[h] + self.unit_cpu[u] <= self.cap_cpu[h]
            && self.anti[u].iter().all(|g| self.anti_count[h].get(g).copied().unwrap_or(0) == 0)
    }

    fn place(&mut self, u: usize, h: usize) {
        self.at[u] = Some(h);
        self.load_mem[h] += self.unit_mem[u];
        self.load_cpu[h] += self.unit_cpu[u];
        for &g in &self.anti[u] {
            *self.anti_count[h].entry(g).or_default() += 1;
        }
    }

    fn unplace(&mut self, u: usize) {
        if let Some(h) = self.at[u].take() {
            self.load_mem[h] -= self.unit_mem[u];
            self.load_cpu[h] -= self.unit_cpu[u];
            for &g in &self.anti[u] {
                if let Some(c) = self.anti_count[h].get_mut(&g) {
                    *c -= 1;
                }
            }
        }
    }

    /// Keeps units where they run, unless banned there or breaking a group.
    fn keep_current(&mut self, banned: &[bool]) {
        for u in 0..self.units.len() {
            if let Some(h) = self.current[u] {
                if !banned[h] && self.can_place(u, h) {
                    self.place(u, h);
                }
            }
        }
    }

    /// Places the units without a host, largest first, each with the reason for its host.
    fn place_rest(&mut self, banned: &[bool], fit: Fit) -> Result<(), Vec<Blocked>> {
        let mut rest: Vec<usize> = (0..self.units.len()).filter(|&u| self.at[u].is_none()).collect();
        rest.sort_by_key(|&u| (std::cmp::Reverse(self.unit_mem[u]), u));
        let mut blocked = Vec::new();
        for u in rest {
            let room = |s: &Layout, h: usize| s.cap_mem[h] - s.load_mem[h] - s.unit_mem[u];
            let fitting: Vec<usize> = (0..self.cap_mem.len()).filter(|&h| !banned[h] && self.can_place(u, h)).collect();
            let choice = fitting.iter().copied().min_by_key(|&h| match fit {
                Fit::Worst => (u64::MAX - room(self, h), h),
                Fit::Best => (room(self, h), h),
            });
            match choice {
                Some(h) => {
                    let how = match fit {
                        Fit::Worst => "the most free memory",
                        Fit::Best => "the least memory left over (packing)",
                    };
                    let mut why = format!("{} has {how} of the {} host(s) that can take it", self.host_names[h], fitting.len());
                    let refused = self.refusals(u, banned);
                    if !refused.is_empty() {
                        why.push_str(&format!("; ruled out: {refused}"));
                    }
                    self.why[u] = why;
                    self.place(u, h);
                }
                None => blocked.push(self.blocked(u, banned)),
            }
        }
        if blocked.is_empty() {
            Ok(())
        } else {
            Err(blocked)
        }
    }

    /// Which constraint keeps unit `u` off each allowed host, summed up by constraint
    /// with a few hosts named: "h2, h5 lack CPU features avx512f; 3 hosts lack memory".
    fn refusals(&self, u: usize, banned: &[bool]) -> String {
        let mut cpu: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        let (mut mem, mut vcpus): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        let mut anti: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for h in (0..self.cap_mem.len()).filter(|&h| !banned[h]) {
            let name = self.host_names[h].as_str();
            match self.refusal(u, h) {
                None => {}
                Some(Refusal::Cpu(why)) => {
                    // "h2 lacks CPU features x" -> "lack CPU features x" for the group.
                    let what = why.strip_prefix(name).map(str::trim).unwrap_or(&why);
                    cpu.entry(what.replacen("lacks", "lack", 1).replacen("does not", "do not", 1)).or_default().push(name);
                }
                Some(Refusal::Memory) => mem.push(name),
                Some(Refusal::Vcpus) => vcpus.push(name),
                Some(Refusal::Anti(g)) => anti.entry(g).or_default().push(name),
            }
        }
        let hosts = |list: &[&str]| match list.len() {
            0 => String::new(),
            1..=3 => list.join(", "),
            n => format!("{} and {} more hosts", list[..2].join(", "), n - 2),
        };
        let mut parts: Vec<String> = cpu.iter().map(|(what, list)| format!("{} {what}", hosts(list))).collect();
        if !mem.is_empty() {
            parts.push(format!("{} lack free memory ({} MiB needed)", hosts(&mem), self.unit_mem[u]));
        }
        if !vcpus.is_empty() {
            parts.push(format!("{} lack free vCPUs ({} needed)", hosts(&vcpus), self.unit_cpu[u]));
        }
        for (g, list) in &anti {
            parts.push(format!("{} already hold a member of anti-affinity group {g}", hosts(list)));
        }
        parts.join("; ")
    }

    fn blocked(&self, u: usize, banned: &[bool]) -> Blocked {
        let names: Vec<&str> = self.units[u].iter().map(|&v| self.names[v].as_str()).collect();
        let allowed = (0..self.cap_mem.len()).filter(|&h| !banned[h]).count();
        let what = if names.len() > 1 { format!("{} (affinity: one host for all)", names.join(", ")) } else { names.join(", ") };
        let why = if allowed == 0 {
            format!("no host is allowed to take {what}")
        } else {
            format!("no host can take {what}: {}", self.refusals(u, banned))
        };
        Blocked { vm: names.join("+"), needs: format!("{} MiB and {} vCPUs on one host", self.unit_mem[u], self.unit_cpu[u]), why }
    }

    /// Moves units from fuller to emptier hosts while that lowers the sum over hosts
    /// of used^2 / usable, which is least when every host is equally full.
    fn balance(&mut self) {
        let hosts = self.cap_mem.len();
        let score = |l: u64, c: u64| {
            if c == 0 {
                0.0
            } else {
                (l as f64) * (l as f64) / (c as f64)
            }
        };
        let util = |s: &Layout, h: usize| s.load_mem[h] as f64 / s.cap_mem[h].max(1) as f64;
        let mut on: Vec<Vec<usize>> = vec![Vec::new(); hosts];
        for u in 0..self.units.len() {
            if let Some(h) = self.at[u] {
                on[h].push(u);
            }
        }
        for _ in 0..2 * self.units.len() + 4 {
            // Sources: the 8 fullest hosts; destinations: the 8 emptiest.
            let mut by_util: Vec<usize> = (0..hosts).collect();
            by_util.sort_by(|&a, &b| util(self, b).total_cmp(&util(self, a)));
            let full: Vec<usize> = by_util.iter().copied().take(8).collect();
            let empty: Vec<usize> = by_util.iter().rev().copied().take(8).collect();
            let mut best: Option<(f64, usize, usize)> = None;
            for &a in &full {
                for &u in &on[a] {
                    let m = self.unit_mem[u];
                    for &b in &empty {
                        if b == a || !self.compatible(u, b) {
                            continue;
                        }
                        let (la, lb) = (self.load_mem[a], self.load_mem[b]);
                        let delta = score(la - m, self.cap_mem[a]) + score(lb + m, self.cap_mem[b])
                            - score(la, self.cap_mem[a])
                            - score(lb, self.cap_mem[b]);
                        if delta < -1.0 && best.is_none_or(|(d, _, _)| delta < d) {
                            self.unplace(u);
                            let ok = self.can_place(u, b);
                            self.place(u, a);
                            if ok {
                                best = Some((delta, u, b));
                            }
                        }
                    }
                }
            }
            let Some((_, u, b)) = best else { break };
            let Some(a) = self.at[u] else { break };
            let (ua, ub) = (util(self, a) * 100.0, util(self, b) * 100.0);
            self.why[u] = format!(
                "balances memory: {} was {ua:.0}% full, {} {ub:.0}%; {} runs its CPU and has room",
                self.host_names[a], self.host_names[b], self.host_names[b]
            );
            self.unplace(u);
            self.place(u, b);
            on[a].retain(|&x| x != u);
            on[b].push(u);
        }
    }

    /// Why each VM placed away from where it runs is where it is.
    fn reasons(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (u, members) in self.units.iter().enumerate() {
            if self.why[u].is_empty() || self.at[u].is_none() {
                continue;
            }
            let affinity = if members.len() > 1 {
                let names: Vec<&str> = members.iter().map(|&v| self.names[v].as_str()).collect();
                format!(" (affinity: with {})", names.join(", "))
            } else {
                String::new()
            };
            for &v in members {
                out.insert(self.names[v].clone(), format!("{}{affinity}", self.why[u]));
            }
        }
        out
    }

    fn target(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (u, members) in self.units.iter().enumerate() {
            if let Some(h) = self.at[u] {
                for &v in members {
                    out.insert(self.names[v].clone(), self.host_names[h].clone());
                }
            }
        }
        out
    }
}
