//! The cluster view: hosts (up or down, in maintenance or not, their capacity) and VMs
//! (where each runs, what its guest says), kept current by one watcher per host and
//! stored so a restarted controller starts from what it knew.

use crate::agents::{self, AgentApi, AgentVm, Liveness, Poll};
use crate::error::ControllerError;
use crate::events::{Events, Subject};
use crate::execute::{ExecLimits, Migration};
use crate::plans::PlanRecord;
use crate::store::{Store, HOSTS, MIGRATIONS, PLANS, VMS};
use crate::{lock, now_ms};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use walkabout_agent::GuestStatus;

/// Version of [`Host`]'s and [`Vm`]'s stored layout.
pub const VIEW_VERSION: u32 = 1;

/// Whether a host answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// Not polled yet.
    Unknown,
    /// Its agent answers.
    Up,
    /// Its agent stopped answering (see `down_reason`).
    Down,
}

/// What the operator wants of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Maintenance {
    /// In service: VMs may be placed here.
    Active,
    /// Being emptied: nothing is placed here.
    Draining,
    /// Emptied and out of service.
    Drained,
    /// Emptied and powered off (musical chairs): out of the game for good.
    Off,
}

impl Maintenance {
    /// True when VMs may be placed on the host.
    pub fn accepts_vms(self) -> bool {
        self == Maintenance::Active
    }
}

/// A host of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// Layout version.
    pub version: u32,
    /// Its name in the cluster (`h1`...).
    pub name: String,
    /// Its agent's URL.
    pub url: String,
    /// Whether it answers.
    pub status: HostStatus,
    /// Since when (ms since the epoch) it has had that status.
    pub status_since_ms: u64,
    /// Why it is down.
    #[serde(default)]
    pub down_reason: Option<String>,
    /// Maintenance mode.
    pub maintenance: Maintenance,
    /// When its agent last answered.
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    /// Its machine's host name.
    #[serde(default)]
    pub hostname: String,
    /// CPU model.
    #[serde(default)]
    pub cpu_model: String,
    /// CPUs.
    #[serde(default)]
    pub cpus: u32,
    /// Memory for VMs, MiB.
    #[serde(default)]
    pub capacity_mib: u64,
    /// Memory in use by VMs (incoming included), MiB.
    #[serde(default)]
    pub used_mib: u64,
    /// Free memory, MiB.
    #[serde(default)]
    pub free_mib: u64,
    /// Names of the VMs it runs.
    #[serde(default)]
    pub vms: Vec<String>,
    #[serde(skip)]
    liveness: Liveness,
}

impl Host {
    /// True when plans may send VMs here.
    pub fn accepts_vms(&self) -> bool {
        self.status == HostStatus::Up && self.maintenance.accepts_vms()
    }
}

/// A VM of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    /// Layout version.
    pub version: u32,
    /// Its name.
    pub name: String,
    /// The host it runs on (last known, if that host is down).
    pub host: Option<String>,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// In-guest workload.
    pub workload: String,
    /// Agent state (`running`, `migrating`...), or `missing` when no host lists it,
    /// `unreachable` when its host is down.
    pub state: String,
    /// Why, when the agent said.
    #[serde(default)]
    pub reason: Option<String>,
    /// What its guest reports (continuity carried across migrations by the agents).
    #[serde(default)]
    pub guest: GuestStatus,
    /// When an agent last listed it.
    #[serde(default)]
    pub seen_ms: u64,
}

impl Vm {
    /// True when it holds memory on its host.
    pub fn active(&self) -> bool {
        matches!(self.state.as_str(), "starting" | "running" | "paused" | "migrating")
    }
}

/// The cluster as the controller sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct View {
    /// Hosts by name.
    pub hosts: BTreeMap<String, Host>,
    /// VMs by name.
    pub vms: BTreeMap<String, Vm>,
}

impl View {
    /// VMs placed on `host`, active ones only.
    pub fn vms_on<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Vm> + 'a {
        self.vms.values().filter(move |v| v.host.as_deref() == Some(host) && v.active())
    }

    /// Memory a host can still take: its capacity less its VMs, and less what the
    /// agent says is in use (which includes incoming VMs).
    pub fn free_mib(&self, host: &str) -> u64 {
        let Some(h) = self.hosts.get(host) else { return 0 };
        let placed: u64 = self.vms_on(host).map(|v| v.memory_mib).sum();
        h.capacity_mib.saturating_sub(placed).min(h.free_mib)
    }
}

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Directory of its database.
    pub data_dir: PathBuf,
    /// Execution limits.
    pub limits: ExecLimits,
    /// Migration mode asked of agents (`auto`).
    pub mode: String,
    /// Bandwidth cap per migration asked of agents, bytes/s (default: none).
    pub max_bandwidth_bps: Option<u64>,
}

impl ControllerConfig {
    /// Defaults with `data_dir`.
    pub fn new(data_dir: PathBuf) -> ControllerConfig {
        ControllerConfig { data_dir, limits: ExecLimits::default(), mode: "auto".into(), max_bandwidth_bps: None }
    }
}

/// The controller: the view, the store, the event log, running plans and migrations.
/// Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<Store>,
    pub(crate) api: Arc<dyn AgentApi>,
    pub(crate) config: ControllerConfig,
    pub(crate) view: Mutex<View>,
    pub(crate) events: Events,
    /// Migrations by id (all of them; final ones too).
    pub(crate) migrations: Mutex<BTreeMap<String, Migration>>,
    /// Plans by id.
    pub(crate) plans: Mutex<BTreeMap<String, PlanRecord>>,
    /// Cancel switches of the plans being executed.
    pub(crate) executing: Mutex<BTreeMap<String, watch::Sender<bool>>>,
    /// Walks and games.
    pub(crate) walks: Mutex<BTreeMap<String, crate::walk::WalkRecord>>,
    pub(crate) shutdown: watch::Sender<bool>,
}

impl Cluster {
    /// Opens the controller's database in `config.data_dir`, loads what it knew, starts
    /// watching its hosts, and resumes the migrations and plans a previous run left
    /// unfinished.
    pub async fn open(config: ControllerConfig, api: Arc<dyn AgentApi>) -> Result<Cluster, ControllerError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| ControllerError::Invalid(format!("cannot create data directory {}: {e}", config.data_dir.display())))?;
        let store = Arc::new(Store::open(&config.data_dir.join("controller.redb"))?);
        let mut view = View::default();
        for h in store.list::<Host>(&HOSTS)? {
            view.hosts.insert(h.name.clone(), Host { status: HostStatus::Unknown, ..h });
        }
        for v in store.list::<Vm>(&VMS)? {
            view.vms.insert(v.name.clone(), v);
        }
        let migrations: BTreeMap<String, Migration> =
            store.list::<Migration>(&MIGRATIONS)?.into_iter().map(|m| (m.id.clone(), m)).collect();
        let plans: BTreeMap<String, PlanRecord> = store.list::<PlanRecord>(&PLANS)?.into_iter().map(|p| (p.id.clone(), p)).collect();
        let (shutdown, _) = watch::channel(false);
        let cluster = Cluster {
            inner: Arc::new(Inner {
                events: Events::new(store.clone()),
                store,
                api,
                config,
                view: Mutex::new(view),
                migrations: Mutex::new(migrations),
                plans: Mutex::new(plans),
                executing: Mutex::new(BTreeMap::new()),
                walks: Mutex::new(BTreeMap::new()),
                shutdown,
            }),
        };
        let hosts: Vec<String> = lock(&cluster.inner.view).hosts.keys().cloned().collect();
        for h in hosts {
            cluster.watch_host(h);
        }
        cluster.resume().await;
        Ok(cluster)
    }

    /// Stops the watchers, plans and walks of this controller (agents and their VMs
    /// carry on; a restarted controller picks up where this one stopped).
    pub fn stop(&self) {
        let _ = self.inner.shutdown.send(true);
    }

    /// Resolves once [`Cluster::stop`] has been called.
    pub async fn stopped(&self) {
        let mut rx = self.stopping();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// A receiver that turns true when the controller stops.
    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// The event log.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    /// The execution limits.
    pub fn limits(&self) -> ExecLimits {
        self.inner.config.limits
    }

    /// A copy of the view.
    pub fn view(&self) -> View {
        lock(&self.inner.view).clone()
    }

    /// All hosts.
    pub fn hosts(&self) -> Vec<Host> {
        lock(&self.inner.view).hosts.values().cloned().collect()
    }

    /// One host.
    pub fn host(&self, name: &str) -> Result<Host, ControllerError> {
        lock(&self.inner.view).hosts.get(name).cloned().ok_or_else(|| ControllerError::not_found("host", name))
    }

    /// All VMs.
    pub fn vms(&self) -> Vec<Vm> {
        lock(&self.inner.view).vms.values().cloned().collect()
    }

    /// One VM.
    pub fn vm(&self, name: &str) -> Result<Vm, ControllerError> {
        lock(&self.inner.view).vms.get(name).cloned().ok_or_else(|| ControllerError::not_found("VM", name))
    }

    /// Registers the agent at `url` as a host named `name` (default `hN`), polls it once,
    /// and starts watching it. Registering a known URL again returns its host.
    pub async fn add_host(&self, url: &str, name: Option<&str>) -> Result<Host, ControllerError> {
        let url = url.trim_end_matches('/').to_string();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(ControllerError::Invalid(format!("agent URL {url:?} must start with http://")));
        }
        let host = {
            let mut view = lock(&self.inner.view);
            if let Some(h) = view.hosts.values().find(|h| h.url == url) {
                return Ok(h.clone());
            }
            let name = match name {
                Some(n) if view.hosts.contains_key(n) => {
                    return Err(ControllerError::Conflict(format!("a host named {n} already exists ({})", view.hosts[n].url)))
                }
                Some(n) => n.to_string(),
                None => (1..).map(|i| format!("h{i}")).find(|n| !view.hosts.contains_key(n)).unwrap_or_default(),
            };
            let h = Host {
                version: VIEW_VERSION,
                name: name.clone(),
                url: url.clone(),
                status: HostStatus::Unknown,
                status_since_ms: now_ms(),
                down_reason: None,
                maintenance: Maintenance::Active,
                last_seen_ms: None,
                hostname: String::new(),
                cpu_model: String::new(),
                cpus: 0,
                capacity_mib: 0,
                used_mib: 0,
                free_mib: 0,
                vms: vec![],
                liveness: Liveness::default(),
            };
            view.hosts.insert(name, h.clone());
            h
        };
        self.inner.store.put(&HOSTS, &host.name, &host)?;
        self.inner.events.emit(
            Subject::Host,
            &host.name,
            format!("host {} registered ({url})", host.name),
            serde_json::to_value(&host).unwrap_or_default(),
        );
        let polled = agents::poll(self.inner.api.as_ref(), &url).await;
        self.observe(&host.name, polled);
        self.watch_host(host.name.clone());
        self.host(&host.name)
    }

    fn watch_host(&self, name: String) {
        let cluster = self.clone();
        let mut stop = self.stopping();
        tokio::spawn(async move {
            loop {
                let url = match lock(&cluster.inner.view).hosts.get(&name) {
                    Some(h) => h.url.clone(),
                    None => return,
                };
                let polled = tokio::select! {
                    p = agents::poll(cluster.inner.api.as_ref(), &url) => p,
                    _ = stop.changed() => return,
                };
                cluster.observe(&name, polled);
                tokio::select! {
                    _ = tokio::time::sleep(agents::POLL_INTERVAL) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    /// Folds one poll of host `name` into the view: its status (down after
    /// [`agents::DOWN_AFTER`] of silence, with the reason), capacity and VMs.
    pub fn observe(&self, name: &str, polled: Poll) {
        let now = now_ms();
        let mut changed_hosts = vec![];
        let mut changed_vms: Vec<(Vm, String)> = vec![];
        {
            let mut guard = lock(&self.inner.view);
            let view = &mut *guard;
            let Some(h) = view.hosts.get_mut(name) else { return };
            match polled {
                Poll::Answered { host, vms } => {
                    h.liveness.ok(now);
                    h.last_seen_ms = Some(now);
                    let was = h.status;
                    let capacity_changed = (h.capacity_mib, h.used_mib, h.cpus) != (host.capacity_mib, host.used_mib, host.cpus);
                    h.hostname = host.hostname;
                    h.cpu_model = host.cpu_model;
                    h.cpus = host.cpus;
                    h.capacity_mib = host.capacity_mib;
                    h.used_mib = host.used_mib;
                    h.free_mib = host.free_mib;
                    if was != HostStatus::Up {
                        h.status = HostStatus::Up;
                        h.status_since_ms = now;
                        h.down_reason = None;
                        changed_hosts.push(format!("host {name} is up ({} MiB for VMs, {} free)", h.capacity_mib, h.free_mib));
                    } else if capacity_changed {
                        changed_hosts.push(String::new());
                    }
                    let owned: Vec<&AgentVm> = vms.iter().filter(|v| v.owned()).collect();
                    for v in &owned {
                        let entry = view.vms.entry(v.spec.name.clone()).or_insert_with(|| Vm {
                            version: VIEW_VERSION,
                            name: v.spec.name.clone(),
                            host: None,
                            memory_mib: v.spec.memory_mib,
                            vcpus: v.spec.vcpus,
                            workload: v.spec.workload.clone(),
                            state: String::new(),
                            reason: None,
                            guest: GuestStatus::default(),
                            seen_ms: now,
                        });
                        let moved = entry.host.as_deref() != Some(name);
                        let restated = entry.state != v.state;
                        entry.host = Some(name.to_string());
                        entry.state = v.state.clone();
                        entry.reason = v.reason.clone();
                        entry.guest = v.guest.clone();
                        entry.memory_mib = v.spec.memory_mib;
                        entry.seen_ms = now;
                        if moved {
                            changed_vms.push((entry.clone(), format!("VM {} runs on {name} ({})", entry.name, entry.state)));
                        } else if restated {
                            changed_vms.push((entry.clone(), format!("VM {} is {} on {name}", entry.name, entry.state)));
                        }
                    }
                    for vm in view.vms.values_mut() {
                        let listed = owned.iter().any(|v| v.spec.name == vm.name);
                        if vm.host.as_deref() == Some(name) && !listed && vm.state != "missing" {
                            vm.state = "missing".into();
                            changed_vms.push((vm.clone(), format!("VM {} is no longer listed by {name}", vm.name)));
                        }
                    }
                }
                Poll::Failed { reason } => {
                    if h.liveness.failed(now) && h.status != HostStatus::Down {
                        h.status = HostStatus::Down;
                        h.status_since_ms = now;
                        h.down_reason = Some(reason.clone());
                        changed_hosts.push(format!("host {name} is down: {reason}"));
                        for vm in view.vms.values_mut().filter(|v| v.host.as_deref() == Some(name)) {
                            vm.state = "unreachable".into();
                            changed_vms.push((vm.clone(), format!("VM {} is unreachable: its host {name} is down", vm.name)));
                        }
                    }
                }
            }
            let names: Vec<String> =
                view.vms.values().filter(|v| v.host.as_deref() == Some(name) && v.state != "missing").map(|v| v.name.clone()).collect();
            if let Some(h) = view.hosts.get_mut(name) {
                h.vms = names;
            }
        }
        if !changed_hosts.is_empty() {
            if let Ok(h) = self.host(name) {
                if let Err(e) = self.inner.store.put(&HOSTS, name, &h) {
                    tracing::warn!(host = name, error = %e, "cannot store host");
                }
                for msg in changed_hosts.into_iter().filter(|m| !m.is_empty()) {
                    self.inner.events.emit(Subject::Host, name, msg, serde_json::to_value(&h).unwrap_or_default());
                }
            }
        }
        for (vm, msg) in changed_vms {
            if let Err(e) = self.inner.store.put(&VMS, &vm.name, &vm) {
                tracing::warn!(vm = %vm.name, error = %e, "cannot store VM");
            }
            self.inner.events.emit(Subject::Vm, &vm.name, msg, serde_json::to_value(&vm).unwrap_or_default());
        }
    }

    /// Sets a host's maintenance mode.
    pub fn set_maintenance(&self, name: &str, m: Maintenance) -> Result<Host, ControllerError> {
        let h = {
            let mut view = lock(&self.inner.view);
            let h = view.hosts.get_mut(name).ok_or_else(|| ControllerError::not_found("host", name))?;
            if h.maintenance == m {
                return Ok(h.clone());
            }
            h.maintenance = m;
            h.clone()
        };
        self.inner.store.put(&HOSTS, name, &h)?;
        let what = match m {
            Maintenance::Active => "back in service",
            Maintenance::Draining => "draining",
            Maintenance::Drained => "drained",
            Maintenance::Off => "powered off",
        };
        self.inner.events.emit(Subject::Host, name, format!("host {name} is {what}"), serde_json::to_value(&h).unwrap_or_default());
        Ok(h)
    }

    /// Records that a migration moved `vm` to `host` (before the next poll says so).
    pub(crate) fn placed(&self, vm: &str, host: &str) {
        let v = {
            let mut view = lock(&self.inner.view);
            let Some(v) = view.vms.get_mut(vm) else { return };
            if v.host.as_deref() == Some(host) {
                return;
            }
            v.host = Some(host.to_string());
            v.state = "running".into();
            v.clone()
        };
        let _ = self.inner.store.put(&VMS, vm, &v);
        self.inner.events.emit(Subject::Vm, vm, format!("VM {vm} runs on {host}"), serde_json::to_value(&v).unwrap_or_default());
    }

    /// Creates a VM from an agent spec on `host`, or on the active host with the most
    /// free memory.
    pub async fn create_vm(&self, spec: serde_json::Value, host: Option<&str>) -> Result<Vm, ControllerError> {
        let name = spec["name"].as_str().ok_or_else(|| ControllerError::Invalid("the VM spec has no name".into()))?.to_string();
        let memory = spec["memory_mib"].as_u64().ok_or_else(|| ControllerError::Invalid(format!("VM {name}: memory_mib is missing")))?;
        let (host, url) = {
            let view = lock(&self.inner.view);
            if view.vms.get(&name).is_some_and(|v| v.state != "missing") {
                return Err(ControllerError::Conflict(format!("a VM named {name} already exists")));
            }
            let h = match host {
                Some(h) => view.hosts.get(h).ok_or_else(|| ControllerError::not_found("host", h))?,
                None => view
                    .hosts
                    .values()
                    .filter(|h| h.accepts_vms())
                    .max_by_key(|h| (view.free_mib(&h.name), std::cmp::Reverse(h.name.clone())))
                    .ok_or_else(|| ControllerError::Conflict("no host is up and in service".into()))?,
            };
            if !h.accepts_vms() {
                return Err(ControllerError::Conflict(format!("host {} takes no VMs: it is {:?}, {:?}", h.name, h.status, h.maintenance)));
            }
            if view.free_mib(&h.name) < memory {
                return Err(ControllerError::Conflict(format!(
                    "VM {name} needs {memory} MiB but host {} has {} MiB free",
                    h.name,
                    view.free_mib(&h.name)
                )));
            }
            (h.name.clone(), h.url.clone())
        };
        self.inner.api.create_vm(url.clone(), spec).await?;
        let polled = agents::poll(self.inner.api.as_ref(), &url).await;
        self.observe(&host, polled);
        self.vm(&name)
    }

    /// Deletes a VM on its host.
    pub async fn delete_vm(&self, name: &str) -> Result<(), ControllerError> {
        let vm = self.vm(name)?;
        if let Some(h) = vm.host.as_deref() {
            let url = self.host(h)?.url;
            match self.inner.api.delete_vm(url, name.to_string()).await {
                Ok(()) => {}
                Err(crate::agents::AgentCallError::Refused { status: 404, .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        lock(&self.inner.view).vms.remove(name);
        self.inner.store.delete(&VMS, name)?;
        self.inner.events.emit(Subject::Vm, name, format!("VM {name} deleted"), serde_json::Value::Null);
        Ok(())
    }
}
