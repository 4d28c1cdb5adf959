//! The compiled planning problem: hosts and VMs by index, capacities, compatibility.
//!
//! Only VMs that are both running now and wanted at the end take part in migrations:
//! VMs absent from the target are shut down first, VMs absent from `current` start last.

/// A resource amount: memory and vCPUs. A host with no vCPU limit has `cpu == u64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Res {
    pub mem: u64,
    pub cpu: u64,
}

impl Res {
    pub fn add(self, o: Res) -> Res {
        Res { mem: self.mem + o.mem, cpu: self.cpu + o.cpu }
    }
    pub fn sub(self, o: Res) -> Res {
        Res { mem: self.mem - o.mem, cpu: self.cpu - o.cpu }
    }
    /// Whether `self + extra` fits in `cap`.
    pub fn fits_with(self, extra: Res, cap: Res) -> bool {
        self.mem + extra.mem <= cap.mem && self.cpu + extra.cpu <= cap.cpu
    }
}

/// One migration of the sequential plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Move {
    pub vm: u32,
    pub from: u32,
    pub to: u32,
}

/// Hosts, VMs, start and goal by index.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub host_names: Vec<String>,
    pub vm_names: Vec<String>,
    /// Usable capacity per host.
    pub cap: Vec<Res>,
    /// Demand per VM.
    pub req: Vec<Res>,
    /// Host of each VM before the first migration.
    pub start: Vec<u32>,
    /// Host of each VM at the end.
    pub goal: Vec<u32>,
    /// `compat[vm_class * host_classes + host_class]`.
    compat: Vec<bool>,
    host_classes: usize,
    vm_class: Vec<u32>,
    host_class: Vec<u32>,
    /// Migrations per host and wave.
    pub max_parallel: u32,
}

impl Problem {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host_names: Vec<String>,
        vm_names: Vec<String>,
        cap: Vec<Res>,
        req: Vec<Res>,
        start: Vec<u32>,
        goal: Vec<u32>,
        classes: (Vec<u32>, Vec<u32>, Vec<bool>, usize),
        max_parallel: u32,
    ) -> Problem {
        let (vm_class, host_class, compat, host_classes) = classes;
        Problem { host_names, vm_names, cap, req, start, goal, compat, host_classes, vm_class, host_class, max_parallel }
    }

    /// The sub-problem of `hosts` and `vms` (indices into this problem), with the given
    /// start and goal (indices into `hosts`); compatibility carries over.
    pub fn restrict(&self, hosts: &[usize], vms: &[usize], start: Vec<u32>, goal: Vec<u32>) -> Problem {
        Problem {
            host_names: hosts.iter().map(|&h| self.host_names[h].clone()).collect(),
            vm_names: vms.iter().map(|&v| self.vm_names[v].clone()).collect(),
            cap: hosts.iter().map(|&h| self.cap[h]).collect(),
            req: vms.iter().map(|&v| self.req[v]).collect(),
            start,
            goal,
            compat: self.compat.clone(),
            host_classes: self.host_classes,
            vm_class: vms.iter().map(|&v| self.vm_class[v]).collect(),
            host_class: hosts.iter().map(|&h| self.host_class[h]).collect(),
            max_parallel: self.max_parallel,
        }
    }

    pub fn n_hosts(&self) -> usize {
        self.cap.len()
    }

    pub fn n_vms(&self) -> usize {
        self.req.len()
    }

    /// Whether VM `v` may run on host `h`.
    #[inline]
    pub fn compatible(&self, v: usize, h: usize) -> bool {
        self.compat[self.vm_class[v] as usize * self.host_classes + self.host_class[h] as usize]
    }

    /// Load per host of a placement.
    pub fn loads(&self, pos: &[u32]) -> Vec<Res> {
        let mut load = vec![Res::default(); self.n_hosts()];
        for (v, &h) in pos.iter().enumerate() {
            load[h as usize] = load[h as usize].add(self.req[v]);
        }
        load
    }

    /// Misplaced VMs of a placement.
    pub fn misplaced(&self, pos: &[u32]) -> usize {
        pos.iter().zip(&self.goal).filter(|(a, b)| a != b).count()
    }

    /// Admissible lower bound on the migrations still needed from `pos`: one per
    /// misplaced VM plus one per deadlocked group of hosts (see [`crate::search`]).
    pub fn lower_bound(&self, pos: &[u32]) -> usize {
        let m = self.misplaced(pos);
        if m == 0 {
            return 0;
        }
        let load = self.loads(pos);
        m + crate::search::Sinks::new(self.n_hosts()).deadlocks(self, pos, &load) as usize
    }
}
