//! The VMs of this host: create, pause, resume, stop, delete, re-attach, and the watch
//! that notices a QEMU that exited on its own.
//!
//! Locking: the table (a std mutex, never held across an await) maps names to per-VM
//! async mutexes and holds the memory given to each active VM, so the capacity check and
//! the name reservation of `create` are one atomic step. Slow work (starting QEMU, QMP
//! calls) happens under the VM's own lock only, so one slow VM never blocks the others.

use crate::error::AgentError;
use crate::host::{self, HostInfo};
use crate::spec::{VmRecord, VmSpec, VmState, RECORD_VERSION};
use crate::store::Store;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use walkabout_qemu::{AccelChoice, AccelRequest, QemuConfig, QemuProcess, QemuVersion, Qmp};

/// How long a read of a VM waits for whatever holds it before it shows the VM's stored
/// record instead.
const READ_WAIT: Duration = Duration::from_millis(100);

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Directory for the database and the VMs' run directories.
    pub data_dir: PathBuf,
    /// QEMU binary.
    pub qemu_binary: String,
    /// Accelerator request (`auto` measures).
    pub accel: AccelRequest,
    /// Memory VMs may use, in MiB; default: physical memory minus `reserve_mib`.
    pub capacity_mib: Option<u64>,
    /// Memory kept for the host when the capacity is derived.
    pub reserve_mib: u64,
    /// Default kernel for VMs that name none; default: the Walkabout guest image.
    pub kernel: Option<PathBuf>,
    /// Default initramfs, with `kernel`.
    pub initrd: Option<PathBuf>,
    /// Cache directory of the guest image.
    pub image_cache: Option<PathBuf>,
    /// Where the agent makes VM images (`--disk size=...`, catalog overlays); default:
    /// `<data_dir>/images`.
    pub storage_dir: Option<PathBuf>,
    /// The most capable CPU model this host offers guests; VMs whose CPU model needs a
    /// feature outside it are refused (default: `max` under TCG, `host` under KVM).
    pub cpu_ceiling: Option<String>,
    /// How a VM migrated in is announced on its NICs' segments.
    pub announce: crate::nics::Announce,
    /// Directories VM specs may take kernels and initramfs from, besides the image
    /// catalog (see `crate::boot`).
    pub boot_dirs: Vec<PathBuf>,
    /// The address incoming migrations' QEMUs listen on (this host's address toward
    /// its peers); never taken from a request. Default: 127.0.0.1.
    pub migration_address: Option<String>,
    /// Whether `POST /v1/host/power-cut` may kill every QEMU and the agent (tests, games).
    pub allow_power_cut: bool,
    /// This host's identity under the cluster CA (`--identity`): its QEMUs' migration
    /// and NBD streams go over TLS with it. `None` (a cluster without a CA,
    /// `--insecure-loopback`): they are plain.
    pub identity: Option<walkabout_trust::Bundle>,
}

impl AgentConfig {
    /// A config with defaults for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> AgentConfig {
        AgentConfig {
            data_dir,
            qemu_binary: "qemu-system-x86_64".into(),
            accel: AccelRequest::Auto,
            capacity_mib: None,
            reserve_mib: 1024,
            kernel: None,
            initrd: None,
            image_cache: None,
            storage_dir: None,
            cpu_ceiling: None,
            announce: crate::nics::Announce::default(),
            boot_dirs: vec![],
            migration_address: None,
            allow_power_cut: false,
            identity: None,
        }
    }
}

/// Errors while starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// QEMU is missing, too old, or the accelerator is unusable.
    #[error(transparent)]
    Qemu(#[from] walkabout_qemu::QemuError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The guest image could not be built.
    #[error("cannot build the default guest image: {0}")]
    Image(String),
    /// The data directory is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

pub use walkabout_api::{ConsoleChunk, VmInfo};

pub(crate) struct Vm {
    pub(crate) record: VmRecord,
    pub(crate) process: Option<QemuProcess>,
    pub(crate) qmp: Option<Qmp>,
}

#[derive(Default)]
struct Table {
    vms: BTreeMap<String, Arc<tokio::sync::Mutex<Vm>>>,
    /// Memory given to each active VM.
    active_mib: BTreeMap<String, u64>,
}

pub(crate) struct Inner {
    pub(crate) config: AgentConfig,
    pub(crate) store: Store,
    pub(crate) accel: AccelChoice,
    qemu: QemuVersion,
    capacity_mib: u64,
    /// The versioned machine type new VMs are pinned to.
    default_machine: String,
    default_kernel: Option<PathBuf>,
    default_initrd: Option<PathBuf>,
    table: Mutex<Table>,
    /// Migrations this agent drives as their source.
    pub(crate) migrations: Mutex<BTreeMap<String, crate::migration::Migration>>,
    /// Incoming VMs: when their source last probed.
    pub(crate) leases: Mutex<BTreeMap<String, std::time::Instant>>,
    /// This host's CPU models, probed once on first request.
    cpu_catalog: tokio::sync::OnceCell<walkabout_qemu::cpu::CpuCatalog>,
    /// The address the API listens on (a VM is never protected toward it).
    pub(crate) own_addr: Mutex<Option<std::net::SocketAddr>>,
    /// Protected VMs: their loops and how their checkpoints are going.
    pub(crate) protections: Mutex<BTreeMap<String, crate::checkpoint::protect::Running>>,
    /// Serializes changes to the replicas this agent holds.
    pub(crate) replica_lock: tokio::sync::Mutex<()>,
    /// Free will: the VMs' request ports and their queued requests.
    pub(crate) will: crate::will::Will,
    /// Incoming VMs whose streams come through the tunnel route (`relay`).
    pub(crate) tunnels: crate::migration::relay::Tunnels,
    /// The changes callers made here, with who made them.
    pub(crate) audit: crate::audit::AuditLog,
}

/// The agent: owns the VMs of one host. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The table stays consistent across a panic elsewhere: every update is one statement.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The disks of a created VM as QEMU opens them. Every disk of a created VM has a path
/// and a format (pinned at creation); a stored spec missing them has its disk left out
/// rather than handed to QEMU half-described.
fn qemu_disks(spec: &VmSpec) -> Vec<walkabout_qemu::QemuDisk> {
    spec.disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            Some(walkabout_qemu::QemuDisk {
                node_name: walkabout_api::DiskSpec::node_name(i),
                path: d.path.clone()?,
                format: d.format?,
                bus: d.bus,
            })
        })
        .collect()
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Agent {
    /// Starts the agent: checks QEMU, picks the accelerator, opens the database, finds
    /// the default guest image and re-attaches to VMs that kept running.
    pub async fn start(config: AgentConfig) -> Result<Agent, StartError> {
        std::fs::create_dir_all(config.data_dir.join("vms"))
            .map_err(|source| StartError::DataDir { path: config.data_dir.clone(), source })?;
        let data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(|source| StartError::DataDir { path: config.data_dir.clone(), source })?;
        let config = AgentConfig { data_dir, ..config };
        let qemu = walkabout_qemu::version::check(&config.qemu_binary)?;
        let store = Store::open(&config.data_dir.join("agent.redb"))?;
        let accel = walkabout_qemu::accel::choose(&config.qemu_binary, config.accel, &config.data_dir.join("calibrate")).await?;
        tracing::info!(accel = %accel.accel, reason = %accel.reason, qemu = %qemu, "agent starting");
        let (default_kernel, default_initrd) = match &config.kernel {
            Some(k) => (Some(k.clone()), config.initrd.clone()),
            None => {
                let cache = config.image_cache.clone().unwrap_or_else(walkabout_image::default_cache_dir);
                let img = tokio::task::spawn_blocking(move || walkabout_image::build(&cache))
                    .await
                    .map_err(|e| StartError::Image(e.to_string()))?
                    .map_err(|e| StartError::Image(e.to_string()))?;
                (Some(img.kernel), Some(img.initrd))
            }
        };
        let default_machine = walkabout_qemu::process::resolve_machine(&config.qemu_binary, "q35")?;
        let total = host::meminfo_mib("MemTotal").unwrap_or(0);
        let capacity_mib = config.capacity_mib.unwrap_or(total.saturating_sub(config.reserve_mib));
        let agent = Agent {
            inner: Arc::new(Inner {
                config,
                store,
                accel,
                qemu,
                capacity_mib,
                default_machine,
                default_kernel,
                default_initrd,
                table: Mutex::default(),
                migrations: Mutex::default(),
                leases: Mutex::default(),
                cpu_catalog: tokio::sync::OnceCell::new(),
                own_addr: Mutex::new(None),
                protections: Mutex::default(),
                replica_lock: tokio::sync::Mutex::new(()),
                will: crate::will::Will::default(),
                tunnels: crate::migration::relay::Tunnels::default(),
                audit: crate::audit::AuditLog::default(),
            }),
        };
        agent.reattach().await?;
        agent.recover_migrations().await;
        agent.resume_protections();
        crate::will::spawn(&agent);
        Ok(agent)
    }

    /// The host's resources and setup.
    pub fn host_info(&self) -> HostInfo {
        let i = &self.inner;
        let t = lock(&i.table);
        let used: u64 = t.active_mib.values().sum();
        HostInfo {
            hostname: host::hostname(),
            cpu_model: host::cpu_model_name(),
            cpus: host::cpus(),
            memory_total_mib: host::meminfo_mib("MemTotal").unwrap_or(0),
            capacity_mib: i.capacity_mib,
            used_mib: used,
            free_mib: i.capacity_mib.saturating_sub(used),
            vms: t.active_mib.len() as u64,
            accel: i.accel.clone(),
            qemu: i.qemu.clone(),
            vm_cpu_ms: t
                .vms
                .iter()
                .filter_map(|(name, vm)| {
                    let pid = vm.try_lock().ok()?.record.pid?;
                    host::process_cpu_ms(pid).map(|ms| (name.clone(), ms))
                })
                .collect(),
            // Not measured outside a migration (which reports it in its record).
            vm_dirty_bps: Default::default(),
            load_milli: host::load_milli(),
        }
    }

    /// The most capable CPU model this host offers guests.
    pub(crate) fn cpu_ceiling(&self) -> String {
        self.inner.config.cpu_ceiling.clone().unwrap_or_else(|| match self.inner.accel.accel {
            walkabout_qemu::Accel::Kvm => "host".into(),
            walkabout_qemu::Accel::Tcg => "max".into(),
        })
    }

    /// This host's CPU models and what it offers guests (probed once, then cached).
    pub async fn cpu_catalog(&self) -> Result<walkabout_qemu::cpu::CpuCatalog, AgentError> {
        let i = &self.inner;
        let (ceiling, dir) = (self.cpu_ceiling(), i.config.data_dir.join("calibrate"));
        i.cpu_catalog
            .get_or_try_init(|| walkabout_qemu::cpu::catalog(&i.config.qemu_binary, i.accel.accel, &ceiling, &dir))
            .await
            .cloned()
            .map_err(|source| AgentError::Qemu { vm: "(CPU probe)".into(), source })
    }

    /// The names of this agent's VMs (fence.rs).
    pub(crate) fn names(&self) -> Vec<String> {
        lock(&self.inner.table).vms.keys().cloned().collect()
    }

    pub(crate) fn vm(&self, name: &str) -> Result<Arc<tokio::sync::Mutex<Vm>>, AgentError> {
        lock(&self.inner.table).vms.get(name).cloned().ok_or_else(|| AgentError::NotFound { vm: name.into() })
    }

    /// Every VM of this agent, by name.
    pub(crate) fn vm_handles(&self) -> Vec<(String, Arc<tokio::sync::Mutex<Vm>>)> {
        lock(&self.inner.table).vms.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
    }

    pub(crate) fn set_active(&self, name: &str, mib: Option<u64>) {
        let mut t = lock(&self.inner.table);
        match mib {
            Some(m) => t.active_mib.insert(name.to_string(), m),
            None => t.active_mib.remove(name),
        };
    }

    pub(crate) fn validate(&self, spec: &VmSpec) -> Result<(), AgentError> {
        let bad = |reason: String| AgentError::InvalidSpec { vm: spec.name.clone(), reason };
        if !valid_name(&spec.name) {
            return Err(bad(format!(
                "name {:?} must be 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit",
                spec.name
            )));
        }
        if spec.memory_mib < 64 {
            return Err(bad(format!("memory {} MiB is below the 64 MiB minimum", spec.memory_mib)));
        }
        if spec.vcpus == 0 || spec.vcpus > 255 {
            return Err(bad(format!("vcpus {} must be between 1 and 255", spec.vcpus)));
        }
        spec.workload.parse::<walkabout_guest::workload::Workload>().map_err(|e| bad(e.to_string()))?;
        crate::nics::validate(&spec.nics).map_err(bad)?;
        if !spec.nics.is_empty() {
            let others: Vec<VmSpec> = self.inner.store.list()?.into_iter().map(|r| r.spec).filter(|s| s.name != spec.name).collect();
            crate::nics::check_against(spec, &self.nic_salt(), &others).map_err(bad)?;
        }
        for (what, v) in [("machine type", spec.machine.as_deref()), ("CPU model", spec.cpu_model.as_deref())] {
            if let Some(v) = v.filter(|v| !crate::boot::plain_name(v)) {
                return Err(bad(format!("{what} {v:?} must be a name (letters, digits, '-', '_', '.'), not options")));
            }
        }
        let (kernel, initrd) = self.boot_files(spec);
        let kernel = kernel.ok_or_else(|| bad("no kernel given and the agent has no default".into()))?;
        let dirs = self.boot_dirs();
        let kernel = crate::boot::checked_file(&kernel, "kernel", &dirs).map_err(bad)?;
        walkabout_image::check_kernel(&kernel).map_err(|e| bad(e.to_string()))?;
        if let Some(i) = initrd {
            let i = crate::boot::checked_file(&i, "initrd", &dirs).map_err(bad)?;
            walkabout_image::check_initrd(&i).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    }

    /// Where kernels and initramfs may come from: the image catalog (the default
    /// kernel's and initramfs's directories) and the configured boot directories.
    fn boot_dirs(&self) -> Vec<PathBuf> {
        let catalog = [&self.inner.default_kernel, &self.inner.default_initrd];
        let parents = catalog.into_iter().flatten().filter_map(|p| p.parent().map(Path::to_path_buf));
        parents.chain(self.inner.config.boot_dirs.iter().cloned()).collect()
    }

    fn boot_files(&self, spec: &VmSpec) -> (Option<PathBuf>, Option<PathBuf>) {
        match &spec.kernel {
            Some(k) => (Some(k.clone()), spec.initrd.clone()),
            None => (self.inner.default_kernel.clone(), spec.initrd.clone().or(self.inner.default_initrd.clone())),
        }
    }

    pub(crate) fn qemu_config(&self, rec: &VmRecord) -> QemuConfig {
        let (kernel, initrd) = self.boot_files(&rec.spec);
        // The spec was validated at create; a stored spec that no longer parses runs idle.
        let workload = rec.spec.workload.parse().unwrap_or(walkabout_guest::workload::Workload::IDLE);
        let mut cmdline = walkabout_image::cmdline(&workload);
        if let Some(ip) = crate::nics::cmdline_param(&rec.spec) {
            cmdline.push(' ');
            cmdline.push_str(&ip);
        }
        if let Some(extra) = &rec.spec.cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        QemuConfig {
            binary: self.inner.config.qemu_binary.clone(),
            name: rec.spec.name.clone(),
            memory_mib: rec.spec.memory_mib,
            vcpus: rec.spec.vcpus,
            cpu_model: rec.spec.cpu_model().to_string(),
            machine: rec.spec.machine.clone().unwrap_or_else(|| self.inner.default_machine.clone()),
            accel: rec.accel,
            kernel: kernel.unwrap_or_default(),
            initrd,
            cmdline,
            run_dir: rec.run_dir.clone(),
            incoming: None,
            start_paused: false,
            disks: qemu_disks(&rec.spec),
            nics: crate::nics::qemu_nics(&self.nic_salt(), &rec.spec),
            will_port: rec.spec.free_will,
        }
    }

    /// What makes this agent's tap names its own: its data directory.
    pub(crate) fn nic_salt(&self) -> String {
        self.inner.config.data_dir.to_string_lossy().into_owned()
    }

    /// The MACs of this agent's VMs, as stored.
    fn macs_in_use(&self) -> Result<std::collections::BTreeSet<String>, AgentError> {
        let recs = self.inner.store.list()?;
        Ok(recs.iter().flat_map(|r| r.spec.nics.iter().filter_map(|n| n.mac.clone())).collect())
    }

    /// Creates and starts a VM. Returns once QEMU runs (the guest may still be booting).
    pub async fn create(&self, mut spec: VmSpec) -> Result<VmInfo, AgentError> {
        self.validate(&spec)?;
        if self.vm(&spec.name).is_ok() {
            return Err(AgentError::Duplicate { vm: spec.name });
        }
        // Images made here are removed again if the VM is not created.
        let made = self.prepare_disks(&mut spec).await?;
        spec.machine.get_or_insert_with(|| self.inner.default_machine.clone());
        let taken = self.macs_in_use()?;
        crate::nics::pin_macs(&mut spec, &self.nic_salt(), &taken)
            .map_err(|reason| AgentError::InvalidSpec { vm: spec.name.clone(), reason })?;
        let name = spec.name.clone();
        let vm = self.reserve(spec, VmState::Starting)?;
        let mut guard = vm.lock().await;
        // The record first: an agent killed while QEMU starts finds it (and the QEMU by
        // its run directory's pid file) when it comes back.
        if let Err(e) = self.inner.store.put(&guard.record) {
            self.unreserve(&name, &guard.record.run_dir);
            return Err(e.into());
        }
        if let Err(e) = self.boot(&mut guard, false).await {
            self.unreserve(&name, &guard.record.run_dir);
            return Err(e);
        }
        self.inner.store.put(&guard.record)?;
        made.keep();
        tracing::info!(vm = %name, pid = ?guard.record.pid, "VM started");
        Ok(self.info_of(&guard))
    }

    /// Reserves the name and the memory of a new VM in one step.
    pub(crate) fn reserve(&self, spec: VmSpec, state: VmState) -> Result<Arc<tokio::sync::Mutex<Vm>>, AgentError> {
        let name = spec.name.clone();
        let rec = VmRecord {
            version: RECORD_VERSION,
            run_dir: self.inner.config.data_dir.join("vms").join(&name),
            spec,
            state,
            reason: None,
            accel: self.inner.accel.accel,
            pid: None,
            created_at_ms: now_ms(),
            guest_before: None,
            protection: None,
        };
        let mut t = lock(&self.inner.table);
        if t.vms.contains_key(&name) {
            return Err(AgentError::Duplicate { vm: name });
        }
        let used: u64 = t.active_mib.values().sum();
        let free = self.inner.capacity_mib.saturating_sub(used);
        if rec.spec.memory_mib > free {
            return Err(AgentError::InsufficientMemory {
                vm: name,
                need_mib: rec.spec.memory_mib,
                free_mib: free,
                capacity_mib: self.inner.capacity_mib,
                used_mib: used,
            });
        }
        t.active_mib.insert(name.clone(), rec.spec.memory_mib);
        let vm = Arc::new(tokio::sync::Mutex::new(Vm { record: rec, process: None, qmp: None }));
        t.vms.insert(name, vm.clone());
        Ok(vm)
    }

    /// Forgets a VM entirely: table, memory, database and files.
    pub(crate) fn unreserve(&self, name: &str, run_dir: &Path) {
        {
            let mut t = lock(&self.inner.table);
            t.vms.remove(name);
            t.active_mib.remove(name);
        }
        crate::nics::delete_taps(&self.nic_salt(), name);
        if let Err(e) = self.inner.store.delete(name) {
            tracing::error!(vm = %name, error = %e, "cannot delete VM record");
        }
        let _ = std::fs::remove_dir_all(run_dir);
    }

    /// Starts QEMU for the VM and connects to it; on failure nothing is left running.
    /// An `incoming` VM waits, paused, for a migration instead of booting.
    pub(crate) async fn boot(&self, vm: &mut Vm, incoming: bool) -> Result<(), AgentError> {
        let name = vm.record.spec.name.clone();
        let mut cfg = self.qemu_config(&vm.record);
        if incoming {
            cfg.incoming = Some("defer".into());
            cfg.start_paused = true;
        }
        let _ = std::fs::remove_file(cfg.console_path());
        let salt = self.nic_salt();
        crate::nics::create_taps(&salt, &vm.record.spec)
            .map_err(|reason| AgentError::InvalidRequest { reason: format!("{name}: {reason}") })?;
        let process = match QemuProcess::spawn(&cfg).await {
            Ok(p) => p,
            Err(e) => {
                crate::nics::delete_taps(&salt, &name);
                return Err(AgentError::qemu(&name)(e));
            }
        };
        let qmp = match Qmp::connect(&process.qmp_path, walkabout_qemu::qmp::DEFAULT_TIMEOUT).await {
            Ok(q) => q,
            Err(e) => {
                process.kill(Duration::from_secs(2)).await;
                crate::nics::delete_taps(&salt, &name);
                return Err(AgentError::Qemu { vm: name, source: e.into() });
            }
        };
        vm.record.pid = Some(process.pid);
        vm.record.state = if incoming { VmState::Incoming } else { VmState::Running };
        vm.record.reason = None;
        self.watch(&name, qmp.clone(), process.clone());
        vm.process = Some(process);
        vm.qmp = Some(qmp);
        Ok(())
    }

    /// Watches a VM's QMP connection; when it closes without the agent asking, the VM is
    /// marked stopped with the reason QEMU gave.
    fn watch(&self, name: &str, qmp: Qmp, process: QemuProcess) {
        let agent = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let mut events = qmp.events();
            let mut shutdown_reason: Option<String> = None;
            loop {
                tokio::select! {
                    ev = events.recv() => {
                        if let Ok(ev) = ev {
                            if ev.event == "SHUTDOWN" {
                                shutdown_reason = ev.data.get("reason").and_then(|r| r.as_str()).map(String::from);
                            }
                        }
                    }
                    _ = qmp.closed() => break,
                }
            }
            process.wait_exit(Duration::from_secs(5)).await;
            let Ok(vm) = agent.vm(&name) else { return };
            let mut vm = vm.lock().await;
            // Only the QEMU this watch was started for; a stop by the agent has already
            // recorded its own reason.
            if vm.record.pid != Some(process.pid) || !vm.record.state.is_active() {
                return;
            }
            if vm.record.state == VmState::Incoming {
                // The migration into this host failed; the VM never ran here.
                tracing::info!(vm = %name, "incoming QEMU exited; forgetting the VM");
                let run_dir = vm.record.run_dir.clone();
                drop(vm);
                agent.unreserve(&name, &run_dir);
                return;
            }
            let why = match shutdown_reason.as_deref() {
                Some("guest-panic") => "the guest kernel panicked".to_string(),
                Some(r) => format!("QEMU shut down on its own ({r})"),
                None => "QEMU exited on its own".to_string(),
            };
            tracing::warn!(vm = %name, reason = %why, "VM stopped");
            crate::nics::delete_taps(&agent.nic_salt(), &name);
            vm.record.state = VmState::Stopped;
            vm.record.reason = Some(why);
            vm.record.pid = None;
            vm.process = None;
            vm.qmp = None;
            agent.set_active(&name, None);
            if let Err(e) = agent.inner.store.put(&vm.record) {
                tracing::error!(vm = %name, error = %e, "cannot record VM stop");
            }
        });
    }

    /// Finds the VMs of an earlier run of this agent and re-attaches to those whose QEMU
    /// still runs.
    async fn reattach(&self) -> Result<(), StartError> {
        for mut rec in self.inner.store.list()? {
            let name = rec.spec.name.clone();
            let mut vm = Vm { record: rec.clone(), process: None, qmp: None };
            if rec.state == VmState::Incoming {
                // A migration into this host was under way when the agent stopped. If the
                // guest already runs here, the migration completed (the source passed its
                // switchover gate and never resumes its copy): adopt it. Otherwise the
                // source has given up by now (it probes the destination) and the guest
                // never ran here: tear it down.
                let cfg = self.qemu_config(&rec);
                if let Some(p) = rec.pid.and_then(|pid| QemuProcess::attach(pid, &cfg.qmp_path(), &cfg.console_path())) {
                    let q = Qmp::connect(&p.qmp_path, walkabout_qemu::qmp::DEFAULT_TIMEOUT).await.ok();
                    let runs = match &q {
                        Some(q) => q.query_status().await.map(|s| s.running).unwrap_or(false),
                        None => false,
                    };
                    if let (true, Some(q)) = (runs, q) {
                        rec.state = VmState::Running;
                        rec.reason = Some("migrated in while this agent was down".into());
                        self.inner.store.put(&rec)?;
                        tracing::info!(vm = %name, "adopted a VM whose migration completed while the agent was down");
                        self.watch(&name, q.clone(), p.clone());
                        self.set_active(&name, Some(rec.spec.memory_mib));
                        let vm = Vm { record: rec, process: Some(p), qmp: Some(q) };
                        lock(&self.inner.table).vms.insert(name, Arc::new(tokio::sync::Mutex::new(vm)));
                        continue;
                    }
                    p.kill(Duration::from_secs(2)).await;
                }
                tracing::info!(vm = %name, "dropped an incoming VM left by an unfinished migration");
                crate::nics::delete_taps(&self.nic_salt(), &name);
                self.inner.store.delete(&name)?;
                let _ = std::fs::remove_dir_all(&rec.run_dir);
                continue;
            }
            if rec.state.is_active() {
                let cfg = self.qemu_config(&rec);
                let pid = rec.pid.or_else(|| crate::boot::pid_file(&rec.run_dir));
                let attached = match pid.and_then(|pid| QemuProcess::attach(pid, &cfg.qmp_path(), &cfg.console_path())) {
                    Some(p) => match Qmp::connect(&p.qmp_path, walkabout_qemu::qmp::DEFAULT_TIMEOUT).await {
                        Ok(q) => Some((p, q)),
                        Err(e) => {
                            tracing::warn!(vm = %name, error = %e, "QEMU runs but its QMP does not answer; stopping it");
                            p.kill(Duration::from_secs(2)).await;
                            None
                        }
                    },
                    None => None,
                };
                match attached {
                    Some((p, q)) => {
                        // A VM that was migrating is sorted out by `recover_migrations`.
                        if rec.state != VmState::Migrating {
                            rec.state = match q.query_status().await {
                                Ok(s) if s.running => VmState::Running,
                                Ok(_) => VmState::Paused,
                                Err(_) => rec.state,
                            };
                        }
                        // A record written before its QEMU started (an agent killed
                        // then) has no pid yet: the pid file's is the one watched.
                        rec.pid = Some(p.pid);
                        tracing::info!(vm = %name, pid = p.pid, state = ?rec.state, "re-attached to running VM");
                        self.watch(&name, q.clone(), p.clone());
                        vm.process = Some(p);
                        vm.qmp = Some(q);
                        self.set_active(&name, Some(rec.spec.memory_mib));
                    }
                    None => {
                        tracing::warn!(vm = %name, "VM's QEMU exited while the agent was down");
                        crate::nics::delete_taps(&self.nic_salt(), &name);
                        rec.state = VmState::Stopped;
                        rec.reason = Some("QEMU exited while the agent was down".into());
                        rec.pid = None;
                    }
                }
                self.inner.store.put(&rec)?;
                vm.record = rec;
            }
            lock(&self.inner.table).vms.insert(name, Arc::new(tokio::sync::Mutex::new(vm)));
        }
        let known: Vec<String> = lock(&self.inner.table).vms.keys().cloned().collect();
        crate::boot::stop_orphans(&self.inner.config.data_dir.join("vms"), &known);
        Ok(())
    }

    pub(crate) fn info_of(&self, vm: &Vm) -> VmInfo {
        self.info_of_record(&vm.record)
    }

    fn info_of_record(&self, record: &VmRecord) -> VmInfo {
        let log = std::fs::read(record.run_dir.join("console.log")).unwrap_or_default();
        let before = record.guest_before.clone().unwrap_or_default();
        let protection = record.protection.as_ref().map(|_| self.protection_status(&record.spec.name));
        VmInfo { record: record.clone(), guest: crate::console::parse_after(before, &String::from_utf8_lossy(&log)), protection }
    }

    /// What a read shows of VM `name`: its live state when nothing holds it within
    /// [`READ_WAIT`]; else its record as last stored (a checkpoint, a boot or a
    /// migration's hand-over may hold a VM for seconds, and the controller's liveness
    /// poll must not wait for them, or a busy host is taken for a dead one).
    async fn peek(&self, name: &str, vm: &tokio::sync::Mutex<Vm>) -> Result<VmInfo, AgentError> {
        if let Ok(g) = tokio::time::timeout(READ_WAIT, vm.lock()).await {
            return Ok(self.info_of(&g));
        }
        let stored = self.inner.store.list()?.into_iter().find(|r| r.spec.name == name);
        match stored {
            Some(r) => Ok(self.info_of_record(&r)),
            None => Ok(self.info_of(&*vm.lock().await)),
        }
    }

    /// One VM.
    pub async fn get(&self, name: &str) -> Result<VmInfo, AgentError> {
        let vm = self.vm(name)?;
        self.peek(name, &vm).await
    }

    /// All VMs, by name.
    pub async fn list(&self) -> Vec<VmInfo> {
        let vms: Vec<_> = lock(&self.inner.table).vms.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        let mut out = Vec::with_capacity(vms.len());
        for (name, vm) in vms {
            match self.peek(&name, &vm).await {
                Ok(info) => out.push(info),
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "cannot read the VM's stored record; waiting for the VM");
                    out.push(self.info_of(&*vm.lock().await));
                }
            }
        }
        out
    }

    /// Pauses a running VM's vCPUs.
    pub async fn pause(&self, name: &str) -> Result<VmInfo, AgentError> {
        self.transition(name, "pause", VmState::Running, VmState::Paused).await
    }

    /// Resumes a paused VM.
    pub async fn resume(&self, name: &str) -> Result<VmInfo, AgentError> {
        self.transition(name, "resume", VmState::Paused, VmState::Running).await
    }

    async fn transition(&self, name: &str, op: &'static str, from: VmState, to: VmState) -> Result<VmInfo, AgentError> {
        let vm = self.vm(name)?;
        let mut vm = vm.lock().await;
        if vm.record.state != from {
            return Err(AgentError::InvalidState { vm: name.into(), op, state: vm.record.state });
        }
        let qmp = vm.qmp.clone().ok_or(AgentError::InvalidState { vm: name.into(), op, state: vm.record.state })?;
        let r = if to == VmState::Paused { qmp.stop().await } else { qmp.cont().await };
        r.map_err(|e| AgentError::Qemu { vm: name.into(), source: e.into() })?;
        vm.record.state = to;
        self.inner.store.put(&vm.record)?;
        Ok(self.info_of(&vm))
    }

    /// Stops a VM: its QEMU exits; the record stays.
    pub async fn stop(&self, name: &str) -> Result<VmInfo, AgentError> {
        let vm = self.vm(name)?;
        let mut vm = vm.lock().await;
        if !vm.record.state.is_active() {
            return Err(AgentError::InvalidState { vm: name.into(), op: "stop", state: vm.record.state });
        }
        self.halt(&mut vm, "stopped by the user").await?;
        Ok(self.info_of(&vm))
    }

    /// Starts a stopped VM again from its record: the same disks (each checked again
    /// first, as at create), NICs (MACs kept) and memory, a fresh boot of the guest.
    /// Refused when the VM is not stopped, when its memory no longer fits the host, or
    /// when a disk is gone or broken; nothing starts then.
    pub async fn start_vm(&self, name: &str) -> Result<VmInfo, AgentError> {
        let vm = self.vm(name)?;
        let mut vm = vm.lock().await;
        if vm.record.state != VmState::Stopped {
            return Err(AgentError::InvalidState { vm: name.into(), op: "start", state: vm.record.state });
        }
        for (i, d) in vm.record.spec.disks.iter().enumerate() {
            let (Some(path), Some(format)) = (&d.path, d.format) else { continue };
            let bad = |e: walkabout_qemu::img::ImageError| AgentError::InvalidSpec { vm: name.into(), reason: format!("disk {i}: {e}") };
            self.qemu_img().chain(path, Some(format)).await.map_err(bad)?;
            self.qemu_img().check(path, format).await.map_err(bad)?;
        }
        self.claim_memory(name, vm.record.spec.memory_mib)?;
        // A new boot: the guest's counters start again (its disk workload re-reads
        // what it wrote before the stop).
        vm.record.guest_before = None;
        if let Err(e) = self.boot(&mut vm, false).await {
            self.set_active(name, None);
            vm.record.reason = Some(format!("start failed: {e}"));
            let _ = self.inner.store.put(&vm.record);
            return Err(e);
        }
        self.inner.store.put(&vm.record)?;
        tracing::info!(vm = %name, pid = ?vm.record.pid, "VM started again");
        Ok(self.info_of(&vm))
    }

    /// Counts `mib` of memory for VM `name` if the host still has it free.
    fn claim_memory(&self, name: &str, mib: u64) -> Result<(), AgentError> {
        let mut t = lock(&self.inner.table);
        let used: u64 = t.active_mib.iter().filter(|(n, _)| n.as_str() != name).map(|(_, m)| m).sum();
        let free = self.inner.capacity_mib.saturating_sub(used);
        if mib > free {
            return Err(AgentError::InsufficientMemory {
                vm: name.into(),
                need_mib: mib,
                free_mib: free,
                capacity_mib: self.inner.capacity_mib,
                used_mib: used,
            });
        }
        t.active_mib.insert(name.to_string(), mib);
        Ok(())
    }

    pub(crate) async fn halt(&self, vm: &mut Vm, reason: &str) -> Result<(), AgentError> {
        let name = vm.record.spec.name.clone();
        vm.record.state = VmState::Stopped;
        vm.record.reason = Some(reason.into());
        vm.record.pid = None;
        if let Some(q) = vm.qmp.take() {
            let _ = q.quit().await;
        }
        if let Some(p) = vm.process.take() {
            if !p.wait_exit(Duration::from_secs(5)).await {
                p.kill(Duration::from_secs(2)).await;
            }
        }
        crate::nics::delete_taps(&self.nic_salt(), &name);
        self.set_active(&name, None);
        self.inner.store.put(&vm.record)?;
        tracing::info!(vm = %name, reason, "VM stopped");
        Ok(())
    }

    /// Deletes a VM, stopping it first if it runs.
    pub async fn delete(&self, name: &str) -> Result<(), AgentError> {
        let vm = self.vm(name)?;
        let mut vm = vm.lock().await;
        if vm.record.state.is_active() {
            self.halt(&mut vm, "deleted").await?;
        }
        self.inner.store.delete(name)?;
        let _ = std::fs::remove_dir_all(&vm.record.run_dir);
        self.remove_owned_disks(&vm.record.spec);
        self.remove_checkpoint_leftovers(&vm.record.spec);
        lock(&self.inner.protections).remove(name);
        lock(&self.inner.table).vms.remove(name);
        Ok(())
    }

    /// The specs of every VM of this agent.
    pub(crate) async fn specs(&self) -> Vec<VmSpec> {
        let vms: Vec<_> = lock(&self.inner.table).vms.values().cloned().collect();
        let mut out = Vec::with_capacity(vms.len());
        for vm in vms {
            out.push(vm.lock().await.record.spec.clone());
        }
        out
    }

    /// Reads the VM's serial console from `offset`, at most `max` bytes.
    pub async fn console(&self, name: &str, offset: u64, max: u64) -> Result<ConsoleChunk, AgentError> {
        let vm = self.vm(name)?;
        let path = vm.lock().await.record.run_dir.join("console.log");
        Ok(read_chunk(&path, offset, max))
    }
}

fn read_chunk(path: &Path, offset: u64, max: u64) -> ConsoleChunk {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.take(max).read_to_end(&mut buf);
        }
    }
    let next = offset + u64::try_from(buf.len()).unwrap_or(0);
    ConsoleChunk { offset, next, text: String::from_utf8_lossy(&buf).into_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("vm-1.a_b"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(64)));
    }

    #[test]
    fn console_chunks_resume_at_next() {
        let p = std::env::temp_dir().join(format!("wa-console-{}", std::process::id()));
        std::fs::write(&p, "hello world").expect("write");
        let a = read_chunk(&p, 0, 5);
        let b = read_chunk(&p, a.next, 100);
        assert_eq!((a.text.as_str(), b.text.as_str(), b.next), ("hello", " world", 11));
        std::fs::remove_file(&p).ok();
    }
}
