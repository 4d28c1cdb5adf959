//! Protection and failover: the controller's side of checkpoints and replicas.
//!
//! A protected VM's agent checkpoints it every `every_ms` and ships each checkpoint to
//! the replica host; the controller only decides *where* (the replica, never the VM's
//! own host), keeps that decision with the VM in its store, pushes it to whichever
//! agent runs the VM (again after every migration), and acts when a host dies.
//!
//! Why this order when a host goes down (a host is *down* after 4 s of failed polls):
//! ```text
//!  host h1 last answered at T (lost_ms)
//!  T + 4 s      h1 marked down; its VMs unreachable
//!               unprotected VM  -> Lost at once, by name (event, failover record)
//!               protected VM    -> failover record `fencing`
//!  T + fence    h1's agent, if it still runs but cannot hear the controller, has
//!               killed the VM's QEMU itself (its last controller request was <= T)
//!  T + fence + margin
//!               restore on the replica (or another host that holds a checkpoint;
//!               if the replica is up but full, it forwards its newest good
//!               checkpoint to the host with the most room, which restores it):
//!               the VM runs there; RPO = T - checkpoint instant, RTO = now - T;
//!               protected again toward a new replica (never its new host)
//!  h1 comes back: its stopped copy is not the VM (ignored in the view) and is deleted
//! ```
//! The restore waits for the fence time since the host's *last contact*, not since it
//! was marked down, so a partitioned host has stopped its copy before another starts
//! (the agent counts from the last request it received, which is no later than T).
//! A failover runs at most once per VM and loss: the VM is in `active` while it runs,
//! and afterwards it is no longer `unreachable` (it runs elsewhere, or is `lost`).

use crate::cluster::{ClusterView, ClusterVm, ClusterVmState, HostStatus, View};
use crate::error::ControllerError;
use crate::events::{Events, Subject};
use crate::execute::Executor;
use crate::store::{Store, FAILOVERS};
use crate::{lock, now_ms};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use walkabout_api::{Failover, FailoverResult, ProtectVm, Protection, RestoreReply, RestoreRequest};

/// Version of the stored [`Failover`] records.
pub const FAILOVER_VERSION: u32 = 1;
/// Default fence time (`walkabout controller --fence-time`), ms.
pub const DEFAULT_FENCE_MS: u64 = 10_000;
/// Default time between checkpoints of a protected VM, ms.
pub const DEFAULT_EVERY_MS: u64 = 30_000;
/// Default number of checkpoints a replica keeps.
pub const DEFAULT_KEEP: u32 = 3;
/// Shortest time between checkpoints accepted, ms.
pub const MIN_EVERY_MS: u64 = 1_000;
/// Added to the fence time before a restore: the agent's watchdog ticks and its kill.
pub const FENCE_MARGIN_MS: u64 = 1_000;
/// How often the failover part looks at the view.
const TICK: Duration = Duration::from_millis(250);

/// Protection and failover: what is pushed to agents, the failovers under way and done.
pub struct Failovers {
    view: Arc<ClusterView>,
    exec: Arc<Executor>,
    store: Arc<Store>,
    events: Arc<Events>,
    fence_ms: u64,
    stop: watch::Receiver<bool>,
    /// Every failover, by its number.
    records: Mutex<BTreeMap<u64, Failover>>,
    /// VMs whose failover runs now.
    active: Mutex<BTreeSet<String>>,
    /// What each protected VM's agent was last told: (host, protection).
    pushed: Mutex<BTreeMap<String, (String, Protection)>>,
    /// Per protected VM, the last shipped checkpoint announced (its id; empty before
    /// the first) and the instant the VM's checkpoint clock counts from: when that
    /// checkpoint was taken, or when the protection began.
    shipped: Mutex<BTreeMap<String, (String, u64)>>,
}

impl Failovers {
    /// Loads the failovers `store` holds, resumes those that were waiting for their
    /// fence time, and starts watching the view; stops when `stop` turns true.
    pub fn open(
        view: Arc<ClusterView>,
        exec: Arc<Executor>,
        store: Arc<Store>,
        events: Arc<Events>,
        fence_ms: u64,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<Failovers>, ControllerError> {
        let detect = crate::agents::DOWN_AFTER.as_millis() as u64;
        if fence_ms <= detect {
            return Err(ControllerError::Invalid(format!(
                "fence time {fence_ms} ms must exceed the time to find a host down ({detect} ms)"
            )));
        }
        let mut records = BTreeMap::new();
        for f in store.list::<Failover>(&FAILOVERS)? {
            records.insert(number(&f.id), f);
        }
        let pending: Vec<Failover> = records.values().filter(|f| f.result == FailoverResult::Fencing).cloned().collect();
        let f = Arc::new(Failovers {
            view,
            exec,
            store,
            events,
            fence_ms,
            stop,
            records: Mutex::new(records),
            active: Mutex::default(),
            pushed: Mutex::default(),
            shipped: Mutex::default(),
        });
        for p in pending {
            lock(&f.active).insert(p.vm.clone());
            tokio::spawn(f.clone().fail_over(p));
        }
        let me = f.clone();
        tokio::spawn(async move { me.watch().await });
        Ok(f)
    }

    /// The fence time, ms.
    pub fn fence_ms(&self) -> u64 {
        self.fence_ms
    }

    /// Every failover, oldest first.
    pub fn list(&self) -> Vec<Failover> {
        lock(&self.records).values().cloned().collect()
    }

    /// Protects `vm`: checkpoints every `every_ms` (default 30 s) shipped to the replica
    /// (default: the up host in service with the most free memory, never the VM's own),
    /// `keep` deep (default 3), and self-fencing after the controller's fence time.
    /// Pushed to the VM's agent first, then stored with the VM.
    pub async fn protect(&self, vm: &str, req: &ProtectVm) -> Result<ClusterVm, ControllerError> {
        let v = self.view.vm(vm)?;
        let view = self.view.snapshot();
        let host = v.host.clone().ok_or_else(|| ControllerError::Conflict(format!("VM {vm} runs on no host")))?;
        let h = view.hosts.get(&host).ok_or_else(|| ControllerError::not_found("host", &host))?;
        if h.status != HostStatus::Up || !v.is_active() {
            return Err(ControllerError::Conflict(format!("cannot protect {vm}: it is {} on {host}, which is {:?}", v.state, h.status)));
        }
        let every_ms = req.every_ms.unwrap_or(DEFAULT_EVERY_MS);
        if every_ms < MIN_EVERY_MS {
            return Err(ControllerError::Invalid(format!("checkpoints of {vm} every {every_ms} ms: the least is {MIN_EVERY_MS} ms")));
        }
        let keep = req.keep.unwrap_or(DEFAULT_KEEP);
        if keep == 0 {
            return Err(ControllerError::Invalid(format!("a replica of {vm} must keep at least 1 checkpoint")));
        }
        let replica = match &req.replica {
            Some(r) if *r == host => {
                return Err(ControllerError::Invalid(format!(
                    "cannot protect {vm} toward {r}: {r} is the host {vm} runs on; a replica must be another host"
                )))
            }
            Some(r) => {
                let rh = view.hosts.get(r).ok_or_else(|| ControllerError::not_found("host", r))?;
                if rh.status != HostStatus::Up {
                    return Err(ControllerError::Conflict(format!("cannot protect {vm} toward {r}: {r} is {:?}", rh.status)));
                }
                r.clone()
            }
            None => choose_replica(&view, v.memory_mib, &[&host]).ok_or_else(|| {
                ControllerError::Conflict(format!("cannot protect {vm}: no host other than {host} is up and in service to be its replica"))
            })?,
        };
        let replica_url = view.hosts.get(&replica).map(|h| h.url.clone()).unwrap_or_default();
        let p = Protection { replica: replica.clone(), replica_url, every_ms, keep, fence_ms: self.fence_ms, clock_from_ms: None };
        // The VM's checkpoint clock starts now, unless an earlier protection left one.
        let now = now_ms();
        lock(&self.shipped).entry(vm.to_string()).or_insert_with(|| (String::new(), now));
        self.view.agents().set_protection(h.url.clone(), vm.to_string(), self.with_clock(vm, &p)).await?;
        lock(&self.pushed).insert(vm.to_string(), (host.clone(), p.clone()));
        let v = self.view.update_vm(vm, |v| v.protection = Some(p.clone()))?;
        let msg = format!(
            "VM {vm} on {host} is protected: a checkpoint every {} s to {replica}, {keep} kept; its agent stops it after {} s without the controller",
            every_ms as f64 / 1000.0,
            self.fence_ms as f64 / 1000.0
        );
        self.events.emit(Subject::Failover, vm, msg, serde_json::to_value(&v).unwrap_or_default());
        Ok(v)
    }

    /// Stops protecting `vm`: its agent (if it answers) stops checkpointing and fencing it.
    pub async fn unprotect(&self, vm: &str) -> Result<ClusterVm, ControllerError> {
        let v = self.view.vm(vm)?;
        if let Some(h) = v.host.as_deref().and_then(|h| self.view.host(h).ok()).filter(|h| h.status == HostStatus::Up) {
            match self.view.agents().clear_protection(h.url, vm.to_string()).await {
                Ok(_) => {}
                Err(e) if e.status() == Some(404) => {}
                Err(e) => return Err(e.into()),
            }
        }
        lock(&self.pushed).remove(vm);
        let v = self.view.update_vm(vm, |v| {
            v.protection = None;
            v.protection_status = None;
        })?;
        self.events.emit(Subject::Failover, vm, format!("VM {vm} is no longer protected"), serde_json::to_value(&v).unwrap_or_default());
        Ok(v)
    }

    async fn watch(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        loop {
            self.tick().await;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One look at the view: failovers to start, protection to push, checkpoints to
    /// announce, stale copies to delete.
    async fn tick(self: &Arc<Self>) {
        // Most ticks find nothing to do: look with the view held still, and copy it only
        // when there is work. (Copying a 20,000-VM view four times a second was 85% of
        // the controller's CPU in a 1,000-host simulation.)
        let work = self.view.read(|v| {
            !v.stale_copies.is_empty() || v.vms.values().any(|vm| vm.protection.is_some() || vm.state == ClusterVmState::Unreachable)
        });
        if !work {
            return;
        }
        let view = self.view.snapshot();
        self.start_failovers(&view);
        self.reconcile(&view).await;
        self.delete_stale_copies(&view).await;
    }

    /// Starts a failover for each VM of a down host not yet handled.
    fn start_failovers(self: &Arc<Self>, view: &View) {
        for v in view.vms.values().filter(|v| v.state == ClusterVmState::Unreachable) {
            let Some(host) = v.host.as_deref().and_then(|h| view.hosts.get(h)) else { continue };
            if host.status != HostStatus::Down || self.exec.in_flight_of(&v.name).is_some() {
                continue;
            }
            if !lock(&self.active).insert(v.name.clone()) {
                continue;
            }
            let lost_ms = host.last_seen_ms.unwrap_or(host.status_since_ms);
            let mut f = Failover {
                id: String::new(),
                vm: v.name.clone(),
                from: host.name.clone(),
                to: None,
                result: FailoverResult::Fencing,
                checkpoint: None,
                skipped: vec![],
                rpo_ms: None,
                rto_ms: None,
                lost_ms,
                finished_ms: None,
                reason: None,
            };
            match self.store.next("failover") {
                Ok(n) => f.id = format!("f{n}"),
                Err(e) => {
                    tracing::error!(vm = %v.name, error = %e, "cannot number a failover");
                    lock(&self.active).remove(&v.name);
                    continue;
                }
            }
            if v.protection.is_none() {
                let why = format!(
                    "its host {} is down ({}) and it was not protected",
                    host.name,
                    host.down_reason.as_deref().unwrap_or("silent")
                );
                self.lose(f, why);
                continue;
            }
            let msg = format!(
                "failover {} of VM {}: its host {} is down; restoring it from its replica once {} s have passed since the host's last contact (fencing)",
                f.id,
                f.vm,
                f.from,
                self.fence_ms / 1000
            );
            self.record(&f, msg);
            tokio::spawn(self.clone().fail_over(f));
        }
    }

    /// Stores and announces a failover.
    fn record(&self, f: &Failover, msg: String) {
        lock(&self.records).insert(number(&f.id), f.clone());
        if let Err(e) = self.store.put(&FAILOVERS, &f.id, f) {
            tracing::warn!(failover = %f.id, error = %e, "cannot store failover");
        }
        self.events.emit(Subject::Failover, &f.vm, msg, serde_json::to_value(f).unwrap_or_default());
    }

    /// Ends a failover with the VM lost, for `why`.
    fn lose(&self, mut f: Failover, why: String) {
        f.result = FailoverResult::Lost;
        f.finished_ms = Some(now_ms());
        f.reason = Some(why.clone());
        let _ = self.view.update_vm(&f.vm, |v| {
            v.state = ClusterVmState::Lost;
            v.reason = Some(why.clone());
        });
        let msg = format!("VM {} is lost: {why}", f.vm);
        self.record(&f, msg);
        lock(&self.active).remove(&f.vm);
    }

    /// One VM's failover: waits out the fence time, then restores it where a
    /// checkpoint is and there is room.
    async fn fail_over(self: Arc<Self>, mut f: Failover) {
        let due = f.lost_ms + self.fence_ms + FENCE_MARGIN_MS;
        let mut stop = self.stop.clone();
        while now_ms() < due {
            let left = Duration::from_millis(due - now_ms()).min(TICK);
            tokio::select! {
                _ = tokio::time::sleep(left) => {}
                _ = stop.changed() => return,
            }
        }
        let Ok(v) = self.view.vm(&f.vm) else {
            self.lose(f, "it was deleted during its failover".into());
            return;
        };
        if v.is_active() {
            // Its host came back within the fence time with the VM still running (or
            // another part placed it): there is nothing to bring back.
            let at = v.host.clone().unwrap_or_default();
            lock(&self.records).remove(&number(&f.id));
            let _ = self.store.delete(&FAILOVERS, &f.id);
            let msg = format!("failover {} of VM {} called off: it runs on {at} again", f.id, f.vm);
            self.events.emit(Subject::Failover, &f.vm, msg, serde_json::Value::Null);
            lock(&self.active).remove(&f.vm);
            return;
        }
        let Some(p) = v.protection.clone() else {
            self.lose(f, "its protection was removed during its failover".into());
            return;
        };
        let mut why = vec![];
        let mut restored: Option<(String, RestoreReply)> = None;
        // The replica is up but has no room (by the view, or its restore said so).
        let mut replica_full = self
            .view
            .read(|view| view.hosts.get(&p.replica).is_some_and(|h| h.status == HostStatus::Up && view.free_mib(&h.name) < v.memory_mib));
        let mut tried = vec![];
        for (host, url) in self.candidates(&f, &p, v.memory_mib, &mut why).await {
            match self.view.agents().restore_replica(url, f.vm.clone(), RestoreRequest::default()).await {
                Ok(r) => {
                    restored = Some((host, r));
                    break;
                }
                Err(e) => {
                    replica_full |= host == p.replica && e.kind() == Some(walkabout_api::ErrorKind::InsufficientMemory);
                    why.push(format!("restore on {host} failed: {e}"));
                    tried.push(host);
                }
            }
        }
        if restored.is_none() && replica_full {
            match self.forward(&f, &p, v.memory_mib, &tried).await {
                Ok((to, reply, note)) => {
                    why.insert(0, note);
                    restored = Some((to, reply));
                }
                Err(e) => why.push(e),
            }
        }
        let Some((to, reply)) = restored else {
            let reason = if why.is_empty() { "no host could take it".to_string() } else { why.join("; ") };
            self.lose(f, reason);
            return;
        };
        let now = now_ms();
        f.to = Some(to.clone());
        f.result = FailoverResult::Restored;
        f.checkpoint = Some(reply.checkpoint.id.clone());
        f.skipped.clone_from(&reply.skipped);
        f.rpo_ms = Some(f.lost_ms.saturating_sub(reply.checkpoint.taken_ms));
        f.rto_ms = Some(now.saturating_sub(f.lost_ms));
        f.finished_ms = Some(now);
        if !why.is_empty() {
            f.reason = Some(why.join("; "));
        }
        self.view.placed(&f.vm, &to);
        let _ = self.view.update_vm(&f.vm, |v| {
            v.host = Some(to.clone());
            v.state = ClusterVmState::Running;
            v.reason = Some(format!("restored from checkpoint {} after {} went down", reply.checkpoint.id, f.from));
        });
        let skipped = if f.skipped.is_empty() { String::new() } else { format!("; passed over: {}", f.skipped.join("; ")) };
        let reason = f.reason.as_deref().map(|r| format!("; {r}")).unwrap_or_default();
        let msg = format!(
            "failover {} of VM {}: runs on {to} from checkpoint {} (RPO {} ms, RTO {} ms){skipped}{reason}",
            f.id,
            f.vm,
            reply.checkpoint.id,
            f.rpo_ms.unwrap_or(0),
            f.rto_ms.unwrap_or(0)
        );
        self.record(&f, msg);
        self.reprotect(&f.vm, &to, &f.from, p).await;
        lock(&self.active).remove(&f.vm);
    }

    /// Where the VM of failover `f` can be restored, best first: its replica, if up
    /// with room; then other hosts with room that hold a checkpoint of it. Why each
    /// other host was passed over goes to `why`.
    async fn candidates(&self, f: &Failover, p: &Protection, mib: u64, why: &mut Vec<String>) -> Vec<(String, String)> {
        let view = self.view.snapshot();
        let mut out = vec![];
        match view.hosts.get(&p.replica) {
            None => why.push(format!("its replica host {} is no longer in the cluster", p.replica)),
            Some(h) if h.status != HostStatus::Up => why.push(format!("its replica host {} is {:?}", p.replica, h.status)),
            Some(h) if view.free_mib(&h.name) < mib => {
                why.push(format!("its replica host {} has {} MiB free, {mib} MiB needed", h.name, view.free_mib(&h.name)))
            }
            Some(h) => out.push((h.name.clone(), h.url.clone())),
        }
        let mut others: Vec<_> = view
            .hosts
            .values()
            .filter(|h| h.name != p.replica && h.name != f.from && h.accepts_vms() && view.free_mib(&h.name) >= mib)
            .collect();
        others.sort_by_key(|h| std::cmp::Reverse(view.free_mib(&h.name)));
        let mut holders = 0;
        for h in others {
            match self.view.agents().replica(h.url.clone(), f.vm.clone()).await {
                Ok(r) if !r.checkpoints.is_empty() => {
                    holders += 1;
                    out.push((h.name.clone(), h.url.clone()));
                }
                _ => {}
            }
        }
        if out.is_empty() && holders == 0 {
            why.push("no other host with room holds a checkpoint of it".into());
        }
        out
    }

    /// When the replica of failover `f`'s VM is up but has no room for it: has the
    /// replica forward its newest good checkpoint to the up host in service with the
    /// most free memory that fits the VM (not the replica, the lost host, nor one of
    /// `tried`), and restores it there. Returns that host, the restore's reply and a
    /// sentence saying what was forwarded where and why; or why it could not.
    async fn forward(&self, f: &Failover, p: &Protection, mib: u64, tried: &[String]) -> Result<(String, RestoreReply, String), String> {
        let view = self.view.snapshot();
        let replica_url = view.hosts.get(&p.replica).map(|h| h.url.clone()).unwrap_or_default();
        let exclude: Vec<&str> = [p.replica.as_str(), f.from.as_str()].into_iter().chain(tried.iter().map(String::as_str)).collect();
        let target =
            choose_replica(&view, mib, &exclude).filter(|h| view.free_mib(h) >= mib).and_then(|h| view.hosts.get(&h)).ok_or_else(|| {
                format!("its replica {} has no room and no other host has {mib} MiB free to forward its checkpoint to", p.replica)
            })?;
        let (to, to_url) = (target.name.clone(), target.url.clone());
        let req = walkabout_api::ForwardReplica { to_url: to_url.clone(), keep: p.keep };
        let ck = self
            .view
            .agents()
            .forward_replica(replica_url, f.vm.clone(), req)
            .await
            .map_err(|e| format!("forwarding its checkpoint from its replica {} to {to} failed: {e}", p.replica))?;
        let sent = ck.shipped_bytes.map(|b| format!(", {:.1} MiB sent", b as f64 / 1048576.0)).unwrap_or_default();
        let note = format!(
            "checkpoint {} was forwarded from its replica {} to {to}{sent}, because the replica has no room for it ({mib} MiB)",
            ck.id, p.replica
        );
        self.events.emit(
            Subject::Failover,
            &f.vm,
            format!("failover {} of VM {}: {note}", f.id, f.vm),
            serde_json::to_value(&ck).unwrap_or_default(),
        );
        let reply = self
            .view
            .agents()
            .restore_replica(to_url, f.vm.clone(), RestoreRequest::default())
            .await
            .map_err(|e| format!("{note}; the restore there failed: {e}"))?;
        Ok((to, reply, note))
    }

    /// Protects `vm`, now on `host`, toward a new replica (never `host`, nor the host it
    /// was lost with); unprotected, with an event, when no host can be its replica.
    async fn reprotect(&self, vm: &str, host: &str, lost: &str, mut p: Protection) {
        let view = self.view.snapshot();
        let mib = view.vms.get(vm).map_or(0, |v| v.memory_mib);
        let replica = if p.replica != host && view.hosts.get(&p.replica).is_some_and(|h| h.status == HostStatus::Up) {
            Some(p.replica.clone())
        } else {
            choose_replica(&view, mib, &[host, lost])
        };
        let Some(replica) = replica else {
            lock(&self.pushed).remove(vm);
            let v = self.view.update_vm(vm, |v| v.protection = None);
            let msg = format!("VM {vm} runs unprotected on {host}: no other host is up to be its replica");
            self.events.emit(Subject::Failover, vm, msg, serde_json::to_value(v.ok()).unwrap_or_default());
            return;
        };
        p.replica_url = view.hosts.get(&replica).map(|h| h.url.clone()).unwrap_or_default();
        p.replica = replica.clone();
        let _ = self.view.update_vm(vm, |v| v.protection = Some(p.clone()));
        self.push(vm, host, &p).await;
        self.events.emit(Subject::Failover, vm, format!("VM {vm} on {host} is protected again, toward {replica}"), serde_json::Value::Null);
    }

    /// `p` as an agent is told it: with the instant `vm`'s checkpoint clock counts from.
    fn with_clock(&self, vm: &str, p: &Protection) -> Protection {
        Protection { clock_from_ms: lock(&self.shipped).get(vm).map(|(_, from)| *from), ..p.clone() }
    }

    /// Tells `vm`'s agent on `host` its protection, remembering it once told. The
    /// agent is also told when the VM's newest checkpoint on its replica was taken, so
    /// its next one is due `every_ms` after that one, not after the VM arrived.
    async fn push(&self, vm: &str, host: &str, p: &Protection) {
        let Ok(h) = self.view.host(host) else { return };
        match self.view.agents().set_protection(h.url, vm.to_string(), self.with_clock(vm, p)).await {
            Ok(_) => {
                lock(&self.pushed).insert(vm.to_string(), (host.to_string(), p.clone()));
            }
            Err(e) => tracing::warn!(vm, host, error = %e, "cannot push protection"),
        }
    }

    /// Keeps each protected VM's agent told (after a migration, a controller restart),
    /// moves its replica off its own host or off a down host, and announces each
    /// checkpoint shipped.
    async fn reconcile(&self, view: &View) {
        for v in view.vms.values().filter(|v| v.protection.is_some() && v.is_active() && v.state != ClusterVmState::Migrating) {
            let (Some(host), Some(mut p)) = (v.host.clone(), v.protection.clone()) else { continue };
            if view.hosts.get(&host).is_none_or(|h| h.status != HostStatus::Up) || lock(&self.active).contains(&v.name) {
                continue;
            }
            let replica_ok = p.replica != host && view.hosts.get(&p.replica).is_some_and(|h| h.status == HostStatus::Up);
            if !replica_ok {
                if let Some(r) = choose_replica(view, v.memory_mib, &[&host]) {
                    let why =
                        if p.replica == host { format!("{} landed on its replica host", v.name) } else { format!("{} is down", p.replica) };
                    let msg = format!("VM {}'s replica moves from {} to {r}: {why}", v.name, p.replica);
                    p.replica_url = view.hosts.get(&r).map(|h| h.url.clone()).unwrap_or_default();
                    p.replica = r;
                    let _ = self.view.update_vm(&v.name, |x| x.protection = Some(p.clone()));
                    self.events.emit(Subject::Failover, &v.name, msg, serde_json::Value::Null);
                }
            }
            let told = lock(&self.pushed).get(&v.name).is_some_and(|(h, q)| *h == host && *q == p);
            if !told {
                self.push(&v.name, &host, &p).await;
            }
            if let Some(last) = v.protection_status.as_ref().and_then(|s| s.last.as_ref()) {
                let new = lock(&self.shipped).insert(v.name.clone(), (last.id.clone(), last.taken_ms)).is_none_or(|(id, _)| id != last.id);
                if new {
                    let bytes = last.shipped_bytes.map(|b| format!("{:.1} MiB shipped", b as f64 / 1048576.0)).unwrap_or_default();
                    let msg = format!(
                        "checkpoint {} of VM {} on {host} is on its replica {} ({bytes}; guest paused {} ms)",
                        last.id, v.name, p.replica, last.pause_ms
                    );
                    self.events.emit(Subject::Failover, &v.name, msg, serde_json::to_value(last).unwrap_or_default());
                }
            }
        }
    }

    /// Deletes, on a host that came back, the stopped copy of a VM that runs elsewhere
    /// since its failover.
    async fn delete_stale_copies(&self, view: &View) {
        for (host, vm) in self.view.take_stale_copies() {
            let Some(h) = view.hosts.get(&host) else { continue };
            let at = view.vms.get(&vm).and_then(|v| v.host.clone()).unwrap_or_default();
            match self.view.agents().delete_vm(h.url.clone(), vm.clone()).await {
                Ok(()) => {
                    let msg = format!("deleted the stopped copy of VM {vm} on {host}: the VM runs on {at} since its failover");
                    self.events.emit(Subject::Failover, &vm, msg, serde_json::Value::Null);
                }
                Err(e) => tracing::warn!(vm, host, error = %e, "cannot delete a stale copy"),
            }
        }
    }
}

/// The replica for a VM of `mib` MiB: the up host in service with the most free memory
/// (those with room for the VM first), not one of `exclude`.
pub fn choose_replica(view: &View, mib: u64, exclude: &[&str]) -> Option<String> {
    view.hosts
        .values()
        .filter(|h| h.accepts_vms() && !exclude.contains(&h.name.as_str()))
        .max_by_key(|h| {
            let free = view.free_mib(&h.name);
            (free >= mib, free, std::cmp::Reverse(h.name.clone()))
        })
        .map(|h| h.name.clone())
}

/// The number of a failover id (`f12` -> 12), for ordering.
fn number(id: &str) -> u64 {
    id.trim_start_matches('f').parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use crate::fake::{open_with, temp, url, Fake};
    use std::time::Duration;
    use walkabout_api::{ClusterVmState, FailoverResult, ProtectVm};

    fn config(dir: &std::path::Path) -> crate::ControllerConfig {
        crate::ControllerConfig { fence_ms: 5_000, ..crate::ControllerConfig::new(dir.to_path_buf()) }
    }

    /// Waits (30 s at most) until `f` holds.
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..300 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("never happened: {what}");
    }

    fn protect_to(replica: &str) -> ProtectVm {
        ProtectVm { replica: Some(replica.into()), every_ms: Some(5_000), keep: Some(2) }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_protected_vm_waits_out_the_fence_time_then_runs_on_its_replica_once() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024), ("h3", 768)], &[("a", 256, "h1")]);
        let dir = temp("failover-replica");
        let c = open_with(config(&dir), &fake, &["h1", "h2", "h3"]).await;
        let vm = c.protect("a", &protect_to("h2")).await.expect("protect");
        assert_eq!(vm.protection.as_ref().map(|p| (p.replica.as_str(), p.fence_ms)), Some(("h2", 5_000)));
        assert_eq!(fake.state().protections.get("a").map(|(u, _)| u.clone()), Some(url("h1")));
        let taken = crate::now_ms() - 6_000;
        fake.state().replicas.entry(url("h2")).or_default().insert("a".into(), taken);

        fake.state().down.push(url("h1"));
        until("a failover is fencing", || c.failovers().iter().any(|f| f.result == FailoverResult::Fencing)).await;
        until("a is restored", || c.failovers().iter().any(|f| f.result == FailoverResult::Restored)).await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;

        let f = c.failovers();
        assert_eq!(f.len(), 1, "{f:?}");
        let restores = fake.state().restores.clone();
        assert_eq!(restores.len(), 1, "restored more than once: {restores:?}");
        assert_eq!(restores[0].1, url("h2"));
        assert!(restores[0].2 >= f[0].lost_ms + 5_000, "restored {} ms after the host's loss", restores[0].2 - f[0].lost_ms);
        assert_eq!((f[0].to.as_deref(), f[0].rpo_ms), (Some("h2"), Some(f[0].lost_ms - taken)));
        assert!(f[0].rto_ms.is_some_and(|r| r >= 5_000), "{f:?}");
        let a = c.vm("a").expect("a");
        assert_eq!((a.host.as_deref(), a.state), (Some("h2"), ClusterVmState::Running));
        let p = fake.state().protections.get("a").cloned().expect("protected again");
        assert_eq!((p.0.as_str(), p.1.replica.as_str()), (url("h2").as_str(), "h3"), "re-protected from h2 toward h3");
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_protected_vm_that_moves_keeps_its_checkpoint_clock_on_its_new_host() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024), ("h3", 1024)], &[("a", 256, "h1")]);
        let dir = temp("failover-clock");
        let c = open_with(config(&dir), &fake, &["h1", "h2", "h3"]).await;
        let before = crate::now_ms();
        c.protect("a", &protect_to("h3")).await.expect("protect");
        let told = |host: &str| fake.state().protections.get("a").filter(|(u, _)| *u == url(host)).map(|(_, p)| p.clock_from_ms);
        let started = told("h1").flatten().expect("h1 was told the clock");
        assert!(started >= before, "the clock starts with the protection");
        // The VM moves (a walk's hop) before its first checkpoint: h2 is told the same
        // clock, so the checkpoint is due every_ms after the protection began, not
        // after the move.
        fake.state().vms.insert("a".into(), (url("h2"), 256));
        until("h2 is told the protection", || told("h2").is_some()).await;
        assert_eq!(told("h2"), Some(Some(started)));
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_checkpoint_the_replica_passed_over_is_named_with_its_reason_in_the_failover_and_its_event() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024)], &[("a", 256, "h1")]);
        let dir = temp("failover-corrupt");
        let c = open_with(config(&dir), &fake, &["h1", "h2"]).await;
        c.protect("a", &protect_to("h2")).await.expect("protect");
        fake.state().replicas.entry(url("h2")).or_default().insert("a".into(), crate::now_ms());
        let why = "a.2: memory file a.2.mem: sha256 checksum mismatch (truncated?)";
        fake.state().passed_over.insert("a".into(), vec![why.into()]);

        fake.state().down.push(url("h1"));
        until("a is restored", || c.failovers().iter().any(|f| f.result == FailoverResult::Restored)).await;

        let f = c.failovers().remove(0);
        assert_eq!((f.checkpoint.as_deref(), f.skipped.as_slice()), (Some("a.1"), [why.to_string()].as_slice()), "{f:?}");
        let events = c.events().since(0);
        let said = events
            .iter()
            .find(|e| e.subject == walkabout_api::Subject::Failover && e.message.contains("runs on h2 from checkpoint a.1"))
            .expect("the restore's event");
        assert!(said.message.ends_with(&format!("; passed over: {why}")), "{}", said.message);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_replica_falls_back_to_another_host_holding_a_checkpoint() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 256), ("h3", 1024)], &[("a", 256, "h1")]);
        let dir = temp("failover-fallback");
        let c = open_with(config(&dir), &fake, &["h1", "h2", "h3"]).await;
        c.protect("a", &protect_to("h2")).await.expect("protect");
        fake.state().replicas.entry(url("h2")).or_default().insert("a".into(), crate::now_ms());
        fake.state().replicas.entry(url("h3")).or_default().insert("a".into(), crate::now_ms() - 10_000);
        fake.state().vms.insert("b".into(), (url("h2"), 256));

        fake.state().down.push(url("h1"));
        until("a failover ends", || c.failovers().iter().any(|f| f.finished_ms.is_some())).await;

        let f = c.failovers().remove(0);
        assert_eq!((f.result, f.to.as_deref()), (FailoverResult::Restored, Some("h3")), "{f:?}");
        assert!(f.reason.as_deref().is_some_and(|r| r.contains("replica host h2 has 0 MiB free")), "{f:?}");
        assert_eq!(c.vm("a").expect("a").host.as_deref(), Some("h3"));
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_replica_forwards_its_checkpoint_to_the_host_with_the_most_room_which_restores_it() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 256), ("h3", 512), ("h4", 1024)], &[("a", 256, "h1")]);
        let dir = temp("failover-forward");
        let c = open_with(config(&dir), &fake, &["h1", "h2", "h3", "h4"]).await;
        c.protect("a", &protect_to("h2")).await.expect("protect");
        let taken = crate::now_ms() - 6_000;
        // Only the replica holds a checkpoint of a, and another VM fills it.
        fake.state().replicas.entry(url("h2")).or_default().insert("a".into(), taken);
        fake.state().vms.insert("b".into(), (url("h2"), 256));

        fake.state().down.push(url("h1"));
        until("a failover ends", || c.failovers().iter().any(|f| f.finished_ms.is_some())).await;

        let f = c.failovers().remove(0);
        assert_eq!((f.result, f.to.as_deref()), (FailoverResult::Restored, Some("h4")), "{f:?}");
        assert_eq!(fake.state().forwards, [("a".to_string(), url("h2"), url("h4"))]);
        let restores = fake.state().restores.clone();
        assert_eq!(restores.iter().map(|r| r.1.clone()).collect::<Vec<_>>(), [url("h4")], "{restores:?}");
        assert_eq!((f.checkpoint.as_deref(), f.rpo_ms), (Some("a.1"), Some(f.lost_ms - taken)), "{f:?}");
        assert!(f.rto_ms.is_some_and(|r| r >= 5_000), "{f:?}");
        let reason = f.reason.clone().unwrap_or_default();
        assert!(reason.contains("checkpoint a.1 was forwarded from its replica h2 to h4"), "{reason}");
        assert!(reason.contains("replica host h2 has 0 MiB free, 256 MiB needed"), "{reason}");
        let events = c.events().since(0);
        let said = events
            .iter()
            .find(|e| e.subject == walkabout_api::Subject::Failover && e.message.contains("runs on h4 from checkpoint a.1"))
            .expect("the restore's event");
        assert!(said.message.contains("forwarded from its replica h2 to h4"), "{}", said.message);
        assert_eq!(c.vm("a").expect("a").host.as_deref(), Some("h4"));
        // Protected again from its new host, toward the replica it had.
        until("a is protected again", || fake.state().protections.get("a").is_some_and(|(u, _)| *u == url("h4"))).await;
        assert_eq!(fake.state().protections.get("a").map(|(_, p)| p.replica.clone()).as_deref(), Some("h2"));
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_whose_restore_finds_no_room_forwards_its_checkpoint() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024), ("h3", 1024)], &[("a", 256, "h1")]);
        let dir = temp("failover-forward-refused");
        let c = open_with(config(&dir), &fake, &["h1", "h2", "h3"]).await;
        c.protect("a", &protect_to("h2")).await.expect("protect");
        fake.state().replicas.entry(url("h2")).or_default().insert("a".into(), crate::now_ms());
        // The view gives h2 room, but its restore says there is none.
        fake.state().restore_full.push(url("h2"));

        fake.state().down.push(url("h1"));
        until("a failover ends", || c.failovers().iter().any(|f| f.finished_ms.is_some())).await;

        let f = c.failovers().remove(0);
        assert_eq!((f.result, f.to.as_deref()), (FailoverResult::Restored, Some("h3")), "{f:?}");
        assert_eq!(fake.state().forwards, [("a".to_string(), url("h2"), url("h3"))]);
        let reason = f.reason.clone().unwrap_or_default();
        assert!(reason.contains("forwarded from its replica h2 to h3") && reason.contains("restore on h2 failed"), "{reason}");
        assert!(f.rpo_ms.is_some() && f.rto_ms.is_some(), "{f:?}");
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_replica_with_nowhere_to_forward_to_loses_the_vm_saying_why() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 256), ("h3", 128)], &[("a", 256, "h1")]);
        let dir = temp("failover-forward-none");
        let c = open_with(config(&dir), &fake, &["h1", "h2", "h3"]).await;
        c.protect("a", &protect_to("h2")).await.expect("protect");
        fake.state().replicas.entry(url("h2")).or_default().insert("a".into(), crate::now_ms());
        fake.state().vms.insert("b".into(), (url("h2"), 256));

        fake.state().down.push(url("h1"));
        until("a failover ends", || c.failovers().iter().any(|f| f.finished_ms.is_some())).await;

        let f = c.failovers().remove(0);
        assert_eq!(f.result, FailoverResult::Lost, "{f:?}");
        assert!(fake.state().forwards.is_empty());
        let reason = f.reason.clone().unwrap_or_default();
        assert!(reason.contains("its replica h2 has no room and no other host has 256 MiB free to forward its checkpoint to"), "{reason}");
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removed_down_host_is_polled_no_more_and_its_lost_vm_is_forgotten_on_delete() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024)], &[("b", 256, "h1")]);
        let dir = temp("remove-down");
        let poll = Duration::from_millis(50);
        let c = open_with(crate::ControllerConfig { poll_interval: poll, ..config(&dir) }, &fake, &["h1", "h2"]).await;
        fake.state().down.push(url("h1"));
        until("b is lost", || c.vm("b").is_ok_and(|v| v.state == ClusterVmState::Lost)).await;

        c.remove_host("h1").expect("remove the down host");
        let seq = c.events().since(0).last().map_or(0, |e| e.seq);
        let asked = |fake: &Fake| fake.state().asked.get(&url("h1")).copied().unwrap_or(0);
        let before = asked(&fake);
        // Twenty poll intervals: a host still polled would be asked ten times or more.
        tokio::time::sleep(poll * 20).await;
        let after = asked(&fake);
        let about_h1: Vec<String> = c.events().since(seq).into_iter().filter(|e| e.name == "h1").map(|e| e.message).collect();
        let b = c.vm("b").expect("the lost VM keeps its record");
        let deleted = c.delete_vm("b").await;

        assert!(after - before <= 1, "h1 was asked {} times after its removal", after - before);
        assert!(c.hosts().iter().all(|h| h.name != "h1"), "{:?}", c.hosts());
        assert!(c.host("h1").is_err());
        assert_eq!(about_h1, Vec::<String>::new());
        assert!(b.reason.as_deref().is_some_and(|r| r.contains("not protected")), "{b:?}");
        assert!(deleted.is_ok(), "a lost VM of a removed host cannot be deleted: {deleted:?}");
        assert!(c.vm("b").is_err());
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_down_host_stays_while_its_vm_is_fenced_and_goes_once_it_is_restored() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024)], &[("a", 256, "h1")]);
        let dir = temp("remove-fencing");
        let c = open_with(config(&dir), &fake, &["h1", "h2"]).await;
        c.protect("a", &protect_to("h2")).await.expect("protect");
        fake.state().replicas.entry(url("h2")).or_default().insert("a".into(), crate::now_ms() - 6_000);
        fake.state().down.push(url("h1"));
        until("a failover is fencing", || c.failovers().iter().any(|f| f.result == FailoverResult::Fencing)).await;

        let refused = c.remove_host("h1").expect_err("a down host whose VM is not settled");
        until("a is restored", || c.failovers().iter().any(|f| f.result == FailoverResult::Restored)).await;
        let removed = c.remove_host("h1");

        let why = refused.to_string();
        assert!(why.contains("its VMs a are not settled") && why.contains("walkabout failover list"), "{why}");
        assert!(removed.is_ok(), "{removed:?}");
        assert_eq!(c.vm("a").expect("a").host.as_deref(), Some("h2"));
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_with_no_checkpoint_anywhere_is_lost_with_the_reason() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024)], &[("a", 256, "h1")]);
        let dir = temp("failover-nocp");
        let c = open_with(config(&dir), &fake, &["h1", "h2"]).await;
        c.protect("a", &ProtectVm { replica: None, every_ms: None, keep: None }).await.expect("protect");

        fake.state().down.push(url("h1"));
        until("a failover ends", || c.failovers().iter().any(|f| f.finished_ms.is_some())).await;

        let f = c.failovers().remove(0);
        assert_eq!(f.result, FailoverResult::Lost, "{f:?}");
        assert!(f.reason.as_deref().is_some_and(|r| r.contains("restore on h2 failed")), "{f:?}");
        assert_eq!(c.vm("a").expect("a").state, ClusterVmState::Lost);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unprotected_vm_of_a_down_host_is_reported_lost_by_name() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024)], &[("b", 256, "h1")]);
        let dir = temp("failover-lost");
        let c = open_with(config(&dir), &fake, &["h1", "h2"]).await;

        fake.state().down.push(url("h1"));
        until("b is lost", || c.vm("b").is_ok_and(|v| v.state == ClusterVmState::Lost)).await;

        let f = c.failovers();
        assert_eq!((f.len(), f[0].vm.as_str(), f[0].result), (1, "b", FailoverResult::Lost));
        assert!(f[0].reason.as_deref().is_some_and(|r| r.contains("not protected")), "{f:?}");
        // Read from the event log (a live subscription may lag past it on a busy machine).
        let said = |c: &crate::Cluster| {
            c.events().since(0).iter().any(|e| e.subject == walkabout_api::Subject::Failover && e.message.starts_with("VM b is lost"))
        };
        until("a failover event naming b", || said(&c)).await;
        assert!(fake.state().restores.is_empty());
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_on_the_vms_own_host_is_refused_naming_it() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024)], &[("a", 256, "h1")]);
        let dir = temp("failover-own");
        let c = open_with(config(&dir), &fake, &["h1", "h2"]).await;

        let e = c.protect("a", &protect_to("h1")).await.expect_err("own host");

        assert_eq!(e.http_status(), 422);
        assert!(e.to_string().contains("h1 is the host a runs on"), "{e}");
        assert!(c.vm("a").expect("a").protection.is_none());
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_that_lands_on_its_replica_gets_a_new_one() {
        let fake = Fake::new(&[("h1", 512), ("h2", 1024), ("h3", 1024)], &[("a", 256, "h1")]);
        let dir = temp("failover-landed");
        let c = open_with(config(&dir), &fake, &["h1", "h2", "h3"]).await;
        c.protect("a", &protect_to("h2")).await.expect("protect");

        fake.state().vms.insert("a".into(), (url("h2"), 256));
        c.view_part().placed("a", "h2");
        until("a is re-pushed on h2", || fake.state().protections.get("a").is_some_and(|(u, _)| *u == url("h2"))).await;

        let p = fake.state().protections.get("a").cloned().expect("pushed").1;
        assert_eq!(p.replica, "h3");
        assert_eq!(c.vm("a").expect("a").protection.map(|p| p.replica), Some("h3".into()));
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }
}
