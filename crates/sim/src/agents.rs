//! Simulated agents: every host of the cluster as a few fields in one table, behind the
//! controller's own agent trait ([`AgentApi`]), so the real controller polls, plans and
//! migrates against them as it would against real agents.
//!
//! A migration holds the VM's memory on both hosts until it ends, is refused if it
//! would overfill its destination (as a real agent refuses), and ends after the time
//! the pre-copy cost model predicts, counted on tokio's clock (simulated time under
//! the simulator's paused runtime). A host that fails stops answering; migrations into
//! it fail, migrations out of it are lost with it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::time::Instant;
use walkabout_api::{
    Accel, AccelChoice, ClientError, CpuCatalog, ErrorBody, ErrorKind, HostInfo, MigrationRecord, MigrationRequest, Phase, QemuVersion,
    VmInfo, VmRecord, VmSpec, VmState,
};
use walkabout_controller::agents::{AgentApi, BoxFut};

use crate::cost::CostModel;

/// One simulated host.
#[derive(Debug, Clone)]
pub struct SimHost {
    /// Its agent's URL (`http://sim-hN`).
    pub url: String,
    /// Memory for VMs, MiB.
    pub capacity_mib: u64,
    /// CPUs.
    pub cpus: u32,
    /// Whether it has failed (stopped answering).
    pub failed: bool,
    /// Its VMs.
    pub vms: BTreeSet<String>,
    /// Its CPU catalog.
    pub catalog: Option<Arc<CpuCatalog>>,
}

/// One simulated VM.
#[derive(Debug, Clone)]
pub struct SimVm {
    /// Index of its host.
    pub host: usize,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// How fast its guest dirties memory, MiB/s (the cost of moving it).
    pub dirty_mib_s: f64,
    /// CPU model.
    pub cpu_model: Option<String>,
    /// CPUs its QEMU uses now (reported when the state's `loads` is on).
    pub cpu: f64,
    /// CPU time it had used when its load last changed, ms.
    pub cpu_ms: f64,
}

#[derive(Debug, Clone)]
struct SimMigration {
    rec: MigrationRecord,
    from: usize,
    to: usize,
    ends_at: Instant,
}

/// What happened, counted.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Polls answered (`/v1/host` and `/v1/vms` count one each).
    pub polls: u64,
    /// Migrations started.
    pub started: u64,
    /// Migrations completed.
    pub completed: u64,
    /// Migrations failed.
    pub failed: u64,
    /// Migrations refused at the start (the destination would overfill).
    pub refused: u64,
    /// Migrations refused because the destination cannot run the VM's CPU.
    pub refused_cpu: u64,
    /// Simulated time migrations took, ms (completed ones).
    pub migration_ms: Vec<u64>,
}

/// The table of every simulated host and VM.
#[derive(Debug, Default)]
pub struct SimState {
    /// Hosts, by index.
    pub hosts: Vec<SimHost>,
    /// Host index by URL.
    pub by_url: HashMap<String, usize>,
    /// VMs by name.
    pub vms: HashMap<String, SimVm>,
    migrations: HashMap<String, SimMigration>,
    /// Migrations not yet final: what a poll looks at (never all of them).
    active: BTreeSet<String>,
    /// Each source host's migrations, oldest first; final ones beyond
    /// [`FINISHED_KEPT`] per host are forgotten, as the list would otherwise grow with
    /// every migration the run makes.
    by_source: HashMap<usize, VecDeque<String>>,
    next_id: u64,
    /// What happened.
    pub counters: Counters,
    /// Whether the agents report each VM's CPU time and dirty rate (the day of load
    /// changes does; the maintenance scenarios need not pay for it).
    pub loads: bool,
    /// When the loads last changed.
    load_since: Option<Instant>,
    /// Every migration started, when loads are on: (when, VM, from, to).
    pub moves: Vec<(Instant, String, usize, usize)>,
}

/// Final migrations each simulated source agent still lists (a controller adopting a
/// migration after a restart looks only at recent ones).
const FINISHED_KEPT: usize = 16;

impl SimState {
    /// Memory given to VMs on host `h`, incoming ones included.
    pub fn used_mib(&self, h: usize) -> u64 {
        let placed: u64 = self.hosts[h].vms.iter().filter_map(|v| self.vms.get(v)).map(|v| v.memory_mib).sum();
        let incoming: u64 = self.running().filter(|m| m.to == h).filter_map(|m| self.vms.get(&m.rec.vm)).map(|v| v.memory_mib).sum();
        placed + incoming
    }

    /// Sets every VM's load (CPUs, dirty rate MiB/s) from `now` on, as `f` says, keeping
    /// the CPU time each used so far.
    pub fn set_loads(&mut self, now: Instant, mut f: impl FnMut(&str, &SimVm) -> (f64, f64)) {
        let since = self.load_since.unwrap_or(now);
        let elapsed_ms = now.saturating_duration_since(since).as_secs_f64() * 1000.0;
        for (name, vm) in &mut self.vms {
            vm.cpu_ms += vm.cpu * elapsed_ms;
            let (cpu, dirty) = f(name, vm);
            vm.cpu = cpu;
            vm.dirty_mib_s = dirty;
        }
        self.load_since = Some(now);
    }

    /// CPU time `vm` has used by `now`, ms.
    fn cpu_ms_at(&self, vm: &SimVm, now: Instant) -> u64 {
        let since = self.load_since.unwrap_or(now);
        // Truncation intended: whole milliseconds.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = (vm.cpu_ms + vm.cpu * now.saturating_duration_since(since).as_secs_f64() * 1000.0) as u64;
        ms
    }

    /// The migrations not yet final.
    fn running(&self) -> impl Iterator<Item = &SimMigration> + '_ {
        self.active.iter().filter_map(|id| self.migrations.get(id))
    }

    /// Records a new migration out of host `from`.
    fn start(&mut self, id: String, m: SimMigration) {
        let from = m.from;
        self.active.insert(id.clone());
        self.migrations.insert(id.clone(), m);
        let list = self.by_source.entry(from).or_default();
        list.push_back(id);
        // Forget the oldest final ones beyond what an agent keeps listing.
        let finished = list.iter().filter(|id| !self.active.contains(*id)).count();
        if finished > FINISHED_KEPT {
            let mut drop = finished - FINISHED_KEPT;
            let active = &self.active;
            let migrations = &mut self.migrations;
            list.retain(|id| {
                if drop > 0 && !active.contains(id) {
                    drop -= 1;
                    migrations.remove(id);
                    false
                } else {
                    true
                }
            });
        }
    }

    /// Ends migration `id` if its time has come (or its destination failed).
    fn settle(&mut self, id: &str, now: Instant) {
        let Some(m) = self.migrations.get(id) else { return };
        if m.rec.phase.is_final() {
            return;
        }
        let (from, to, vm) = (m.from, m.to, m.rec.vm.clone());
        let dest_failed = self.hosts[to].failed;
        let done = now >= m.ends_at;
        if !dest_failed && !done {
            return;
        }
        let total = now.saturating_duration_since(self.migrations[id].ends_at);
        self.active.remove(id);
        let Some(m) = self.migrations.get_mut(id) else { return };
        if dest_failed {
            m.rec.phase = Phase::Failed;
            m.rec.reason = Some(format!("destination agent {} unreachable", m.rec.destination));
            self.counters.failed += 1;
        } else {
            m.rec.phase = Phase::Completed;
            let ms = m.rec.total_ms.unwrap_or(0);
            m.rec.downtime_ms = Some(20);
            m.rec.finished_at_ms = Some(m.rec.created_at_ms + ms + u64::try_from(total.as_millis()).unwrap_or(0));
            self.counters.completed += 1;
            self.counters.migration_ms.push(ms);
            self.hosts[from].vms.remove(&vm);
            self.hosts[to].vms.insert(vm.clone());
            if let Some(v) = self.vms.get_mut(&vm) {
                v.host = to;
            }
        }
    }
}

/// The simulated agents, shared by the controller (as its [`AgentApi`]) and the
/// scenario (which fails hosts and reads the counters).
#[derive(Clone)]
pub struct SimAgents {
    state: Arc<Mutex<SimState>>,
    cost: CostModel,
}

impl SimAgents {
    /// Agents over `state`, migrating at the pace of `cost`.
    pub fn new(state: SimState, cost: CostModel) -> SimAgents {
        SimAgents { state: Arc::new(Mutex::new(state)), cost }
    }

    /// The table, locked.
    pub fn state(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fails host `h`: it stops answering, and so do its VMs.
    pub fn fail(&self, h: usize) {
        if let Some(host) = self.state().hosts.get_mut(h) {
            host.failed = true;
        }
    }

    fn host_ix(&self, s: &SimState, url: &str) -> Result<usize, ClientError> {
        match s.by_url.get(url) {
            Some(&h) if !s.hosts[h].failed => Ok(h),
            _ => Err(ClientError::Unreachable { url: url.into(), detail: "connection refused (simulated host failed)".into() }),
        }
    }
}

fn ready<T: Send + 'static>(v: T) -> BoxFut<T> {
    Box::pin(std::future::ready(v))
}

fn refused(status: u16, kind: ErrorKind, message: String) -> ClientError {
    ClientError::Api { status, body: ErrorBody::new(kind, message) }
}

fn vm_info(name: &str, vm: &SimVm, state: VmState) -> VmInfo {
    VmInfo {
        record: VmRecord {
            version: 1,
            spec: VmSpec { vcpus: vm.vcpus, cpu_model: vm.cpu_model.clone(), ..VmSpec::new(name, vm.memory_mib) },
            state,
            reason: None,
            accel: Accel::Kvm,
            pid: None,
            run_dir: "/sim".into(),
            created_at_ms: 0,
            guest_before: None,
            protection: None,
        },
        guest: Default::default(),
        protection: None,
    }
}

impl AgentApi for SimAgents {
    fn host(&self, url: String) -> BoxFut<Result<HostInfo, ClientError>> {
        let mut s = self.state();
        let r = self.host_ix(&s, &url).map(|h| {
            let used = s.used_mib(h);
            let host = &s.hosts[h];
            let (mut vm_cpu_ms, mut vm_dirty_bps) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
            if s.loads {
                let now = Instant::now();
                for name in &host.vms {
                    if let Some(vm) = s.vms.get(name) {
                        vm_cpu_ms.insert(name.clone(), s.cpu_ms_at(vm, now));
                        // Truncation intended: whole bytes per second.
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        vm_dirty_bps.insert(name.clone(), (vm.dirty_mib_s * 1_048_576.0) as u64);
                    }
                }
            }
            HostInfo {
                hostname: url.trim_start_matches("http://sim-").to_string(),
                cpu_model: "simulated".into(),
                cpus: host.cpus,
                memory_total_mib: host.capacity_mib,
                capacity_mib: host.capacity_mib,
                used_mib: used,
                free_mib: host.capacity_mib.saturating_sub(used),
                vms: host.vms.len() as u64,
                accel: AccelChoice { accel: Accel::Kvm, reason: "simulated".into(), tcg_ms: None, kvm_ms: None },
                qemu: QemuVersion { major: 10, minor: 0, micro: 2, banner: "simulated".into() },
                vm_cpu_ms,
                vm_dirty_bps,
                load_milli: None,
            }
        });
        s.counters.polls += 1;
        ready(r)
    }

    fn vms(&self, url: String) -> BoxFut<Result<Vec<VmInfo>, ClientError>> {
        let mut s = self.state();
        let r = self.host_ix(&s, &url).map(|h| {
            let migrating: BTreeSet<&str> = s.running().filter(|m| m.from == h).map(|m| m.rec.vm.as_str()).collect();
            s.hosts[h]
                .vms
                .iter()
                .filter_map(|name| {
                    let state = if migrating.contains(name.as_str()) { VmState::Migrating } else { VmState::Running };
                    s.vms.get(name).map(|vm| vm_info(name, vm, state))
                })
                .collect()
        });
        s.counters.polls += 1;
        ready(r)
    }

    fn create_vm(&self, url: String, spec: VmSpec) -> BoxFut<Result<VmInfo, ClientError>> {
        let mut s = self.state();
        let r = self.host_ix(&s, &url).map(|h| {
            let vm = SimVm {
                host: h,
                memory_mib: spec.memory_mib,
                vcpus: spec.vcpus,
                dirty_mib_s: 0.0,
                cpu_model: spec.cpu_model.clone(),
                cpu: 0.0,
                cpu_ms: 0.0,
            };
            let info = vm_info(&spec.name, &vm, VmState::Running);
            s.hosts[h].vms.insert(spec.name.clone());
            s.vms.insert(spec.name.clone(), vm);
            info
        });
        ready(r)
    }

    fn delete_vm(&self, url: String, name: String) -> BoxFut<Result<(), ClientError>> {
        let mut s = self.state();
        let r = self.host_ix(&s, &url).map(|h| {
            s.hosts[h].vms.remove(&name);
            s.vms.remove(&name);
        });
        ready(r)
    }

    fn start_migration(&self, url: String, req: MigrationRequest) -> BoxFut<Result<MigrationRecord, ClientError>> {
        let mut s = self.state();
        let from = match self.host_ix(&s, &url) {
            Ok(h) => h,
            Err(e) => return ready(Err(e)),
        };
        let Some(vm) = s.vms.get(&req.vm).filter(|v| v.host == from).cloned() else {
            return ready(Err(refused(404, ErrorKind::NotFound, format!("no VM named `{}` on {url}", req.vm))));
        };
        let to = match s.by_url.get(req.destination.trim_end_matches('/')) {
            Some(&h) if !s.hosts[h].failed => h,
            _ => return ready(Err(refused(502, ErrorKind::Agent, format!("destination agent {} unreachable", req.destination)))),
        };
        // The destination checks the CPU before any memory moves, as a real agent does.
        let model = vm.cpu_model.as_deref().unwrap_or(walkabout_api::vm::DEFAULT_CPU_MODEL);
        let missing: Vec<String> = match (&s.hosts[from].catalog, &s.hosts[to].catalog) {
            (Some(src), Some(dst)) => {
                src.features_of(model).map(|n| n.difference(&dst.ceiling_features).cloned().collect()).unwrap_or_default()
            }
            _ => vec![],
        };
        if !missing.is_empty() {
            s.counters.refused_cpu += 1;
            let msg = format!("cannot migrate {} to {}: it lacks CPU features {}", req.vm, req.destination, missing.join(", "));
            return ready(Err(refused(409, ErrorKind::CpuIncompatible, msg)));
        }
        if s.used_mib(to) + vm.memory_mib > s.hosts[to].capacity_mib {
            s.counters.refused += 1;
            return ready(Err(refused(409, ErrorKind::InsufficientMemory, format!("{} would overfill {}", req.vm, req.destination))));
        }
        s.next_id += 1;
        let id = format!("sim-mig-{}", s.next_id);
        let ms = self.cost.migration_ms(vm.memory_mib, vm.dirty_mib_s);
        let now = Instant::now();
        let mut rec =
            MigrationRecord { phase: Phase::Running, ..MigrationRecord::pending(id.clone(), &req, walkabout_controller::now_ms()) };
        rec.total_ms = Some(ms);
        rec.dirty_rate_bps = Some((vm.dirty_mib_s * 1_048_576.0) as u64);
        if s.loads {
            s.moves.push((now, req.vm.clone(), from, to));
        }
        s.start(id, SimMigration { rec: rec.clone(), from, to, ends_at: now + std::time::Duration::from_millis(ms) });
        s.counters.started += 1;
        ready(Ok(rec))
    }

    fn migration(&self, url: String, id: String) -> BoxFut<Result<MigrationRecord, ClientError>> {
        let mut s = self.state();
        if let Err(e) = self.host_ix(&s, &url) {
            return ready(Err(e));
        }
        s.settle(&id, Instant::now());
        let r = match s.migrations.get(&id) {
            Some(m) => Ok(m.rec.clone()),
            None => Err(refused(404, ErrorKind::MigrationNotFound, format!("no migration `{id}`"))),
        };
        ready(r)
    }

    fn migrations(&self, url: String) -> BoxFut<Result<Vec<MigrationRecord>, ClientError>> {
        let mut s = self.state();
        let h = match self.host_ix(&s, &url) {
            Ok(h) => h,
            Err(e) => return ready(Err(e)),
        };
        let ids: Vec<String> = s.by_source.get(&h).map(|l| l.iter().cloned().collect()).unwrap_or_default();
        let now = Instant::now();
        for id in &ids {
            s.settle(id, now);
        }
        ready(Ok(ids.iter().filter_map(|id| s.migrations.get(id)).map(|m| m.rec.clone()).collect()))
    }

    fn cancel_migration(&self, url: String, id: String) -> BoxFut<Result<(), ClientError>> {
        let mut s = self.state();
        if let Err(e) = self.host_ix(&s, &url) {
            return ready(Err(e));
        }
        let s = &mut *s;
        if let Some(m) = s.migrations.get_mut(&id) {
            if !m.rec.phase.is_final() {
                m.rec.phase = Phase::Cancelled;
                m.rec.reason = Some("cancelled".into());
                s.active.remove(&id);
            }
        }
        ready(Ok(()))
    }

    fn cpu(&self, url: String) -> BoxFut<Result<CpuCatalog, ClientError>> {
        let s = self.state();
        let r = self.host_ix(&s, &url).and_then(|h| {
            s.hosts[h].catalog.as_deref().cloned().ok_or(ClientError::Unreachable { url, detail: "no CPU catalog simulated".into() })
        });
        ready(r)
    }
}
