//! A fake cluster of agents for unit tests of the controller's logic: hosts with
//! capacity, VMs, migrations that finish after a few polls (or fail, for chosen VMs),
//! hosts that stop answering (or whose power is cut), replicas holding checkpoints and
//! restores from them. Memory is held on both ends while a migration runs,
//! and an overfilling migration is refused, as the real agent does.

use crate::agents::{AgentApi, BoxFut};
use crate::lock;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use walkabout_api::{
    Accel, AccelChoice, ClientError, CpuCatalog, ErrorBody, ErrorKind, HostInfo, MigrationRecord, MigrationRequest, Phase, QemuVersion,
    VmInfo, VmRecord, VmSpec, VmState,
};

#[derive(Default)]
pub(crate) struct State {
    /// Capacity by URL.
    pub capacity: BTreeMap<String, u64>,
    /// Hosts that do not answer.
    pub down: Vec<String>,
    /// VM -> (URL, MiB).
    pub vms: BTreeMap<String, (String, u64)>,
    /// Migrations by id: (record, from URL, polls left).
    pub migs: BTreeMap<String, (MigrationRecord, String, u32)>,
    /// VMs whose migrations fail.
    pub failing: Vec<String>,
    /// Every migration started: (VM, from URL, to URL).
    pub started: Vec<(String, String, String)>,
    /// Most migrations out of one host at once, by URL.
    pub max_out: BTreeMap<String, usize>,
    /// Polls a migration takes.
    pub polls: u32,
    /// CPU catalogs by URL; a host without one reports none.
    pub cpu: BTreeMap<String, CpuCatalog>,
    /// CPU model by VM (absent: the default).
    pub models: BTreeMap<String, String>,
    /// vCPUs by VM (absent: 1).
    pub vcpus: BTreeMap<String, u32>,
    /// CPUs each VM's QEMU uses (absent: none): its CPU time grows at this rate.
    pub cpu_rate: BTreeMap<String, f64>,
    /// CPU time each VM had used when its rate was last set, ms, and since when.
    pub cpu_base: BTreeMap<String, (f64, Option<tokio::time::Instant>)>,
    /// Protection pushed to agents: VM -> (URL, protection).
    pub protections: BTreeMap<String, (String, walkabout_api::Protection)>,
    /// Checkpoints each agent holds as a replica: URL -> VM -> the checkpoint's instant.
    pub replicas: BTreeMap<String, BTreeMap<String, u64>>,
    /// Every restore asked: (VM, URL, when, ms since the epoch).
    pub restores: Vec<(String, String, u64)>,
    /// Agents whose restores answer `insufficient_memory` whatever their room (their
    /// memory taken by something the controller does not see), by URL.
    pub restore_full: Vec<String>,
    /// Every checkpoint forwarded between replicas: (VM, from URL, to URL).
    pub forwards: Vec<(String, String, String)>,
    /// Dirty rate each VM's agent reports, bytes/s (absent: not measured).
    pub dirty_bps: BTreeMap<String, u64>,
    /// Whether telling an agent a VM's protection puts a checkpoint of it, taken then,
    /// on its replica at once (as the agent's first shipped checkpoint would).
    pub ship_on_protect: bool,
    /// What a restore of each VM reports it passed over (e.g. a corrupt checkpoint).
    pub passed_over: BTreeMap<String, Vec<String>>,
    /// Every power cut asked, by URL (the host then answers no more).
    pub power_cuts: Vec<String>,
    /// Requests each URL was sent, answered or not.
    pub asked: BTreeMap<String, u64>,
}

impl State {
    /// Sets `vm`'s CPU use from now on, keeping the CPU time it used so far.
    pub fn set_cpu(&mut self, vm: &str, cpus: f64) {
        let used = self.cpu_ms(vm);
        self.cpu_base.insert(vm.to_string(), (used, Some(tokio::time::Instant::now())));
        self.cpu_rate.insert(vm.to_string(), cpus);
    }

    fn cpu_ms(&self, vm: &str) -> f64 {
        let (base, since) = self.cpu_base.get(vm).copied().unwrap_or((0.0, None));
        let rate = self.cpu_rate.get(vm).copied().unwrap_or(0.0);
        base + since.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0 * rate)
    }
}

#[derive(Clone, Default)]
pub(crate) struct Fake(pub Arc<Mutex<State>>);

impl Fake {
    pub fn new(hosts: &[(&str, u64)], vms: &[(&str, u64, &str)]) -> Fake {
        let f = Fake::default();
        {
            let mut s = lock(&f.0);
            s.polls = 3;
            for (h, cap) in hosts {
                s.capacity.insert(url(h), *cap);
            }
            for (vm, mem, h) in vms {
                s.vms.insert(vm.to_string(), (url(h), *mem));
            }
        }
        f
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.0)
    }
}

pub(crate) fn url(host: &str) -> String {
    format!("http://{host}")
}

fn used(s: &State, u: &str) -> u64 {
    let placed: u64 = s.vms.values().filter(|(h, _)| h == u).map(|(_, m)| m).sum();
    let incoming: u64 = s
        .migs
        .values()
        .filter(|(m, _, _)| !m.phase.is_final() && m.destination == u)
        .filter_map(|(m, _, _)| s.vms.get(&m.vm).map(|(_, mem)| *mem))
        .sum();
    placed + incoming
}

fn refused(status: u16, kind: ErrorKind, message: String) -> ClientError {
    ClientError::Api { status, body: ErrorBody::new(kind, message) }
}

fn vm_info(s: &State, name: &str, mem: u64) -> VmInfo {
    let spec = VmSpec { cpu_model: s.models.get(name).cloned(), vcpus: s.vcpus.get(name).copied().unwrap_or(1), ..VmSpec::new(name, mem) };
    running(spec)
}

/// A running VM of `spec`, as an agent would report it (no guest seen yet).
pub(crate) fn running(spec: VmSpec) -> VmInfo {
    VmInfo {
        record: VmRecord {
            version: 1,
            spec,
            state: VmState::Running,
            reason: None,
            accel: Accel::Tcg,
            pid: None,
            run_dir: "/fake".into(),
            created_at_ms: 0,
            guest_before: None,
            protection: None,
        },
        guest: Default::default(),
        protection: None,
    }
}

/// A checkpoint of `vm` taken at `taken_ms`.
fn checkpoint(vm: &str, mem: u64, taken_ms: u64) -> walkabout_api::Checkpoint {
    walkabout_api::Checkpoint {
        version: walkabout_api::checkpoint::CHECKPOINT_VERSION,
        id: format!("{vm}.1"),
        vm: vm.to_string(),
        n: 1,
        parent: None,
        taken_ms,
        host: "fake".into(),
        spec: VmSpec::new(vm, mem),
        method: walkabout_api::CheckpointMethod::Live,
        pause_ms: 1,
        total_ms: 1,
        guest: Default::default(),
        files: vec![],
        shipped_bytes: None,
        verified: true,
        problem: None,
    }
}

fn ready<T: Send + 'static>(v: T) -> BoxFut<T> {
    Box::pin(async move { v })
}

impl Fake {
    fn check(&self, u: &str) -> Result<(), ClientError> {
        *self.state().asked.entry(u.to_string()).or_default() += 1;
        if self.state().down.iter().any(|d| d == u) || !self.state().capacity.contains_key(u) {
            return Err(ClientError::Unreachable { url: u.into(), detail: "connection refused".into() });
        }
        Ok(())
    }
}

impl AgentApi for Fake {
    fn host(&self, u: String) -> BoxFut<Result<HostInfo, ClientError>> {
        let r = self.check(&u).map(|()| {
            let s = self.state();
            let cap = s.capacity[&u];
            let used = used(&s, &u);
            HostInfo {
                hostname: "fake".into(),
                cpu_model: "fake".into(),
                cpus: 2,
                memory_total_mib: cap,
                capacity_mib: cap,
                used_mib: used,
                free_mib: cap.saturating_sub(used),
                vms: 0,
                accel: AccelChoice { accel: Accel::Tcg, reason: "fake".into(), tcg_ms: None, kvm_ms: None },
                qemu: QemuVersion { major: 10, minor: 0, micro: 2, banner: "fake".into() },
                // Truncation intended: whole milliseconds.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                vm_cpu_ms: s.vms.iter().filter(|(_, (h, _))| *h == u).map(|(vm, _)| (vm.clone(), s.cpu_ms(vm) as u64)).collect(),
                vm_dirty_bps: s
                    .dirty_bps
                    .iter()
                    .filter(|(vm, _)| s.vms.get(*vm).is_some_and(|(h, _)| *h == u))
                    .map(|(v, b)| (v.clone(), *b))
                    .collect(),
                load_milli: None,
            }
        });
        ready(r)
    }

    fn vms(&self, u: String) -> BoxFut<Result<Vec<VmInfo>, ClientError>> {
        let r = self.check(&u).map(|()| {
            let s = self.state();
            s.vms.iter().filter(|(_, (h, _))| *h == u).map(|(name, (_, mem))| vm_info(&s, name, *mem)).collect()
        });
        ready(r)
    }

    fn create_vm(&self, u: String, spec: VmSpec) -> BoxFut<Result<VmInfo, ClientError>> {
        let mut s = self.state();
        s.vms.insert(spec.name.clone(), (u, spec.memory_mib));
        if let Some(m) = &spec.cpu_model {
            s.models.insert(spec.name.clone(), m.clone());
        }
        s.vcpus.insert(spec.name.clone(), spec.vcpus);
        ready(Ok(vm_info(&s, &spec.name, spec.memory_mib)))
    }

    fn cpu(&self, u: String) -> BoxFut<Result<CpuCatalog, ClientError>> {
        let r = self.check(&u).and_then(|()| {
            self.state().cpu.get(&u).cloned().ok_or(ClientError::Unreachable { url: u, detail: "no CPU catalog in this fake".into() })
        });
        ready(r)
    }

    fn delete_vm(&self, _u: String, name: String) -> BoxFut<Result<(), ClientError>> {
        self.state().vms.remove(&name);
        ready(Ok(()))
    }

    fn start_migration(&self, u: String, req: MigrationRequest) -> BoxFut<Result<MigrationRecord, ClientError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let mut s = self.state();
        let Some((at, mem)) = s.vms.get(&req.vm).cloned() else {
            return ready(Err(refused(404, ErrorKind::NotFound, format!("no VM named `{}`", req.vm))));
        };
        assert_eq!(at, u, "migration asked of a host that does not run {}", req.vm);
        let cap = s.capacity.get(&req.destination).copied().unwrap_or(0);
        if used(&s, &req.destination) + mem > cap {
            return ready(Err(refused(409, ErrorKind::InsufficientMemory, format!("{} would overfill {}", req.vm, req.destination))));
        }
        let id = format!("agent-mig-{}", s.migs.len() + 1);
        let rec = MigrationRecord { phase: Phase::Running, ..MigrationRecord::pending(id.clone(), &req, crate::now_ms()) };
        let polls = s.polls;
        s.migs.insert(id, (rec.clone(), u.clone(), polls));
        s.started.push((req.vm, u.clone(), req.destination));
        let out = s.migs.values().filter(|(m, from, _)| !m.phase.is_final() && *from == u).count();
        let e = s.max_out.entry(u).or_insert(0);
        *e = (*e).max(out);
        ready(Ok(rec))
    }

    fn migration(&self, u: String, id: String) -> BoxFut<Result<MigrationRecord, ClientError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let mut s = self.state();
        let failing = s.failing.clone();
        let down = s.down.clone();
        let Some((rec, _, left)) = s.migs.get_mut(&id) else {
            return ready(Err(refused(404, ErrorKind::MigrationNotFound, format!("no migration `{id}`"))));
        };
        if !rec.phase.is_final() {
            *left = left.saturating_sub(1);
            if down.contains(&rec.destination) {
                rec.phase = Phase::Failed;
                rec.reason = Some(format!("destination agent {} unreachable", rec.destination));
            } else if *left == 0 {
                if failing.contains(&rec.vm) {
                    rec.phase = Phase::Failed;
                    rec.reason = Some(format!("migration of {} failed: destination QEMU exited", rec.vm));
                } else {
                    rec.phase = Phase::Completed;
                    rec.downtime_ms = Some(42);
                    rec.total_ms = Some(1000);
                }
            }
        }
        let rec = rec.clone();
        if rec.phase == Phase::Completed {
            if let Some(v) = s.vms.get_mut(&rec.vm) {
                v.0 = rec.destination.clone();
            }
        }
        ready(Ok(rec))
    }

    fn migrations(&self, u: String) -> BoxFut<Result<Vec<MigrationRecord>, ClientError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let s = self.state();
        ready(Ok(s.migs.values().filter(|(_, from, _)| *from == u).map(|(m, _, _)| m.clone()).collect()))
    }

    fn set_protection(&self, u: String, vm: String, p: walkabout_api::Protection) -> BoxFut<Result<VmInfo, ClientError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let mut s = self.state();
        let Some((at, mem)) = s.vms.get(&vm).cloned().filter(|(at, _)| *at == u) else {
            return ready(Err(refused(404, ErrorKind::NotFound, format!("no VM named `{vm}` at {u}"))));
        };
        let _ = at;
        if s.ship_on_protect {
            s.replicas.entry(p.replica_url.clone()).or_default().insert(vm.clone(), crate::now_ms());
        }
        s.protections.insert(vm.clone(), (u, p));
        ready(Ok(vm_info(&s, &vm, mem)))
    }

    fn clear_protection(&self, u: String, vm: String) -> BoxFut<Result<VmInfo, ClientError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let mut s = self.state();
        s.protections.remove(&vm);
        let mem = s.vms.get(&vm).map_or(0, |(_, m)| *m);
        ready(Ok(vm_info(&s, &vm, mem)))
    }

    fn replica(&self, u: String, vm: String) -> BoxFut<Result<walkabout_api::ReplicaState, ClientError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let s = self.state();
        let Some(taken_ms) = s.replicas.get(&u).and_then(|r| r.get(&vm)).copied() else {
            return ready(Err(refused(404, ErrorKind::NotFound, format!("no replica of `{vm}` at {u}"))));
        };
        let mem = s.vms.get(&vm).map_or(256, |(_, m)| *m);
        let cp = checkpoint(&vm, mem, taken_ms);
        ready(Ok(walkabout_api::ReplicaState { vm, checkpoints: vec![cp], files: vec![] }))
    }

    fn restore_replica(
        &self,
        u: String,
        vm: String,
        _req: walkabout_api::RestoreRequest,
    ) -> BoxFut<Result<walkabout_api::RestoreReply, ClientError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let mut s = self.state();
        let Some(taken_ms) = s.replicas.get(&u).and_then(|r| r.get(&vm)).copied() else {
            return ready(Err(refused(404, ErrorKind::NotFound, format!("no replica of `{vm}` at {u}"))));
        };
        let mem = s.vms.get(&vm).map_or(256, |(_, m)| *m);
        let cap = s.capacity.get(&u).copied().unwrap_or(0);
        if used(&s, &u) + mem > cap || s.restore_full.contains(&u) {
            return ready(Err(refused(409, ErrorKind::InsufficientMemory, format!("{vm} would overfill {u}"))));
        }
        s.restores.push((vm.clone(), u.clone(), crate::now_ms()));
        s.vms.insert(vm.clone(), (u, mem));
        let reply = walkabout_api::RestoreReply {
            vm: vm_info(&s, &vm, mem),
            checkpoint: checkpoint(&vm, mem, taken_ms),
            skipped: s.passed_over.get(&vm).cloned().unwrap_or_default(),
            restore_ms: 5,
        };
        ready(Ok(reply))
    }

    fn forward_replica(
        &self,
        u: String,
        vm: String,
        req: walkabout_api::ForwardReplica,
    ) -> BoxFut<Result<walkabout_api::Checkpoint, ClientError>> {
        if let Err(e) = self.check(&u).and_then(|()| self.check(&req.to_url)) {
            return ready(Err(e));
        }
        let mut s = self.state();
        let Some(taken_ms) = s.replicas.get(&u).and_then(|r| r.get(&vm)).copied() else {
            return ready(Err(refused(404, ErrorKind::NotFound, format!("no replica of `{vm}` at {u}"))));
        };
        let mem = s.vms.get(&vm).map_or(256, |(_, m)| *m);
        s.replicas.entry(req.to_url.clone()).or_default().insert(vm.clone(), taken_ms);
        s.forwards.push((vm.clone(), u, req.to_url));
        ready(Ok(walkabout_api::Checkpoint { shipped_bytes: Some(mem << 20), ..checkpoint(&vm, mem, taken_ms) }))
    }

    fn power_cut(&self, u: String) -> BoxFut<Result<(), ClientError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let mut s = self.state();
        s.power_cuts.push(u.clone());
        s.down.push(u);
        ready(Ok(()))
    }

    fn cancel_migration(&self, _u: String, id: String) -> BoxFut<Result<(), ClientError>> {
        let mut s = self.state();
        if let Some((rec, _, _)) = s.migs.get_mut(&id) {
            if !rec.phase.is_final() {
                rec.phase = Phase::Cancelled;
                rec.reason = Some("cancelled".into());
            }
        }
        ready(Ok(()))
    }
}

/// A fresh directory for a test's controller database.
pub(crate) fn temp(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wa-ctl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A controller on `dir` over `fake`, with `hosts` registered under their names.
pub(crate) async fn open(dir: &std::path::Path, fake: &Fake, hosts: &[&str]) -> crate::Cluster {
    open_with(crate::ControllerConfig::new(dir.to_path_buf()), fake, hosts).await
}

/// [`open`] with a given configuration.
pub(crate) async fn open_with(config: crate::ControllerConfig, fake: &Fake, hosts: &[&str]) -> crate::Cluster {
    let c = crate::Cluster::open(config, Arc::new(fake.clone())).await.expect("open");
    for h in hosts {
        c.add_host(&url(h), Some(h)).await.expect("add host");
    }
    c
}

/// Waits (20 s at most) for plan `id` to end.
pub(crate) async fn wait_final(c: &crate::Cluster, id: &str) -> walkabout_api::PlanRecord {
    for _ in 0..200 {
        let p = c.plan(id).expect("plan");
        if p.status.is_final() {
            return p;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("plan {id} never ended: {:?}", c.plan(id));
}
