//! Checkpoints of running VMs: taking them, the agent's own store of them, restoring a
//! VM from one, and shipping them to a replica agent.
//!
//! A checkpoint freezes memory, device state and disks at one instant. The memory goes
//! into a `mapped-ram` file through QEMU's migration to `file:`; the disks by an external
//! snapshot: one QMP `transaction` of `blockdev-snapshot` puts a new qcow2 overlay on top
//! of every disk while the guest is paused, so the VM continues in the overlay and the
//! checkpoint owns the frozen layer. With [`CheckpointMethod::Live`] the guest runs while
//! its memory is copied and is paused only from the last pass (QEMU's
//! `pause-before-switchover`), through the disk snapshot, to the device state written;
//! [`CheckpointMethod::Background`] uses QEMU's `background-snapshot` (the guest runs on
//! while its memory is saved, its writes intercepted with userfaultfd write-protect);
//! [`CheckpointMethod::Paused`] pauses the guest for the whole write.
//!
//! Files live in `<data dir>/checkpoints/<vm>/`: `<vm>.<n>.mem` and, per disk,
//! `<vm>.<n>.<disk>.qcow2`, the layer checkpoint `n` froze, whose qcow2 header names its
//! backing by the previous layer's file name (relative), so the same names form the same
//! chain on a replica. The VM's active overlay is `<vm>.a<n>.<disk>.qcow2` until the next
//! checkpoint freezes it (it is hard-linked under the checkpoint's name first, so the
//! overlay above names its backing by that name). The first checkpoint's layer is the
//! disk's original image, hard-linked in ([`FileKind::Base`]). Checkpoint files are never
//! written again: a restore runs on a new overlay on top of them.
//!
//! A checkpoint that fails before its disk snapshot leaves the VM exactly as it was; one
//! that fails after it leaves the VM on its new overlay (a consistent chain) and records
//! nothing: the next checkpoint takes the layers no checkpoint owns with it.

pub mod chain;
pub mod files;
pub mod protect;
pub mod replica;

use crate::error::AgentError;
use crate::vms::{now_ms, Agent, Vm};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use walkabout_api::checkpoint::CHECKPOINT_VERSION;
use walkabout_api::{
    AgentClient, Checkpoint, CheckpointFile, CheckpointMethod, CheckpointRequest, ClientOptions, CommitCheckpoint, DiskFormat, Encoding,
    FileKind, FileUpload, GuestStatus, RestoreReply, RestoreRequest, VmState,
};
use walkabout_qemu::{Qmp, QmpError};

/// Longest a checkpoint's memory write may take before it is given up.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);

/// Migration bandwidth while writing a checkpoint to a local file (bytes/s).
const FILE_BANDWIDTH: u64 = 100 << 30;

fn ck_err(vm: &str) -> impl FnOnce(String) -> AgentError + '_ {
    move |reason| AgentError::Checkpoint { vm: vm.to_string(), reason }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::CheckpointIo { path: path.to_path_buf(), source }
}

/// A QMP command naming its failure.
async fn qmp_do(qmp: &Qmp, command: &str, args: Option<Value>) -> Result<Value, String> {
    qmp.execute_raw_timeout(command, args, Duration::from_secs(30)).await.map_err(|e| e.to_string())
}

/// The node name on top of each disk (`disk0` before the first checkpoint, the
/// checkpoint's overlay after), by the disk's device id `<disk>-dev`.
async fn top_nodes(qmp: &Qmp, disks: &[String]) -> Result<Vec<String>, String> {
    let blocks = qmp_do(qmp, "query-block", None).await?;
    let list = blocks.as_array().cloned().unwrap_or_default();
    disks
        .iter()
        .map(|d| {
            let dev = format!("{d}-dev");
            list.iter()
                .find(|b| b["qdev"].as_str().is_some_and(|q| q.split('/').any(|p| p == dev)))
                .and_then(|b| b["inserted"]["node-name"].as_str().map(String::from))
                .ok_or_else(|| format!("QEMU shows no block device {dev}"))
        })
        .collect()
}

/// The path of file `name` in `dir`, refusing anything that is not a plain file name.
pub(crate) fn file_in(dir: &Path, name: &str) -> Result<PathBuf, AgentError> {
    let plain =
        !name.is_empty() && name != "." && name != ".." && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !plain {
        return Err(AgentError::InvalidRequest { reason: format!("{name:?} is not a checkpoint file name") });
    }
    Ok(dir.join(name))
}

/// Describes one file of a checkpoint as it is on disk now.
pub(crate) fn describe(
    path: &Path,
    name: &str,
    kind: FileKind,
    disk: Option<String>,
    backing: Option<String>,
) -> Result<CheckpointFile, AgentError> {
    let (sha256, bytes) = files::sha256(path).map_err(io_err(path))?;
    let data_bytes = files::data_bytes(path).map_err(io_err(path))?;
    Ok(CheckpointFile { name: name.to_string(), kind, disk, backing, bytes, data_bytes, sha256 })
}

/// Re-hashes every file of `ck` in `dir`; the first mismatch or missing file, named.
pub(crate) fn verify(dir: &Path, ck: &Checkpoint) -> Result<(), String> {
    for f in &ck.files {
        let p = dir.join(&f.name);
        match files::sha256(&p) {
            Ok((sha, len)) if sha == f.sha256 && len == f.bytes => {}
            Ok((sha, len)) => {
                return Err(format!(
                    "file {} fails its checksum: sha256 {} over {len} bytes, the checkpoint says {} over {} bytes",
                    f.name, sha, f.sha256, f.bytes
                ))
            }
            Err(e) => return Err(format!("file {} cannot be read: {e}", f.name)),
        }
    }
    Ok(())
}

/// The backing file name a qcow2 header names (as written, not resolved).
async fn backing_name(qemu_img: &str, img: &Path) -> Option<String> {
    let out = tokio::process::Command::new(qemu_img)
        .args(["info", "--output=json", "-U"])
        .arg(img)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["backing-filename"].as_str().map(String::from)
}

/// Migration capabilities for a checkpoint by `method` (everything a checkpoint cannot
/// combine with switched off).
fn capabilities(method: CheckpointMethod, mapped_ram: bool) -> Value {
    let caps = [
        ("mapped-ram", mapped_ram),
        ("pause-before-switchover", method == CheckpointMethod::Live),
        ("background-snapshot", method == CheckpointMethod::Background),
        ("events", true),
        ("postcopy-ram", false),
        ("xbzrle", false),
        ("multifd", false),
        ("auto-converge", false),
        ("zero-copy-send", false),
    ];
    json!({"capabilities": caps.iter().map(|(c, s)| json!({"capability": c, "state": s})).collect::<Vec<_>>()})
}

/// The capabilities a checkpoint set, switched back off (a later migration sets its own).
fn capabilities_off() -> Value {
    let caps = ["mapped-ram", "pause-before-switchover", "background-snapshot"];
    json!({"capabilities": caps.iter().map(|c| json!({"capability": c, "state": false})).collect::<Vec<_>>()})
}

/// A QMP event's timestamp, µs since the epoch.
fn event_us(ev: &walkabout_qemu::qmp::Event) -> Option<u64> {
    let s = ev.timestamp["seconds"].as_u64()?;
    let u = ev.timestamp["microseconds"].as_u64()?;
    Some(s * 1_000_000 + u)
}

/// Waits for the migration to reach `want` (or fail), over MIGRATION events with a
/// `query-migrate` poll as a backstop; notes STOP/RESUME timestamps on the way.
struct Watch {
    events: tokio::sync::broadcast::Receiver<walkabout_qemu::qmp::Event>,
    stop_us: Option<u64>,
    resume_us: Option<u64>,
    deadline: Instant,
}

impl Watch {
    fn new(qmp: &Qmp) -> Watch {
        Watch { events: qmp.events(), stop_us: None, resume_us: None, deadline: Instant::now() + CHECKPOINT_TIMEOUT }
    }

    fn drain(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            self.note(&ev);
        }
    }

    fn note(&mut self, ev: &walkabout_qemu::qmp::Event) {
        match ev.event.as_str() {
            "STOP" => self.stop_us = self.stop_us.or(event_us(ev)),
            "RESUME" => self.resume_us = event_us(ev),
            _ => {}
        }
    }

    /// Waits until `query-migrate` says one of `want`; `failed`/`cancelled` is an error
    /// with QEMU's reason.
    async fn until(&mut self, qmp: &Qmp, want: &[&str], done: impl Fn(&Value) -> bool) -> Result<Value, String> {
        loop {
            let st = qmp_do(qmp, "query-migrate", None).await?;
            let status = st["status"].as_str().unwrap_or("").to_string();
            if want.contains(&status.as_str()) || done(&st) {
                self.drain();
                return Ok(st);
            }
            if matches!(status.as_str(), "failed" | "cancelled") {
                let why = st["error-desc"].as_str().unwrap_or("no reason given");
                return Err(format!("QEMU's migration to the checkpoint file {status}: {why}"));
            }
            if Instant::now() > self.deadline {
                return Err(format!("the memory write did not finish within {} s (migration {status})", CHECKPOINT_TIMEOUT.as_secs()));
            }
            match tokio::time::timeout(Duration::from_millis(20), self.events.recv()).await {
                Ok(Ok(ev)) => self.note(&ev),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return Err("QEMU exited during the checkpoint".into()),
                _ => {}
            }
        }
    }
}

/// One disk of a checkpoint in progress.
struct DiskStep {
    /// Node name (`disk0`).
    disk: String,
    /// Its node on top now (frozen by the snapshot).
    top: String,
    /// The file on top now.
    top_path: PathBuf,
    /// Its format.
    top_format: DiskFormat,
    /// The checkpoint's name for the frozen layer (a hard link to `top_path`).
    frozen: PathBuf,
    /// The new overlay (the VM's active layer afterwards) and its node.
    overlay: PathBuf,
    overlay_node: String,
}

impl Agent {
    /// The `qemu-img` binary beside this agent's QEMU.
    pub(crate) fn qemu_img_bin(&self) -> String {
        walkabout_qemu::img::QemuImg::beside(&self.inner.config.qemu_binary).binary().to_string()
    }

    /// Where this agent keeps the checkpoints it takes of `vm`.
    pub(crate) fn checkpoint_dir(&self, vm: &str) -> PathBuf {
        self.inner.config.data_dir.join("checkpoints").join(vm)
    }

    /// Takes a checkpoint of a running VM; ships it to `req.ship_to` if asked.
    pub async fn checkpoint(&self, name: &str, req: CheckpointRequest) -> Result<Checkpoint, AgentError> {
        let mut ck = self.take_checkpoint(name, req.method.unwrap_or(CheckpointMethod::Live)).await?;
        if let Some(to) = req.ship_to {
            if self.is_own_url(&to) {
                return Err(AgentError::InvalidRequest { reason: format!("cannot ship checkpoint {} to this agent itself ({to})", ck.id) });
            }
            let shipped = self.ship(&ck, &to, 0).await?;
            ck.shipped_bytes = Some(shipped);
            self.inner.store.put_checkpoint(&ck)?;
        }
        Ok(ck)
    }

    /// Whether `url` names this agent (a replica must be another host).
    pub(crate) fn is_own_url(&self, url: &str) -> bool {
        let Some(own) = *crate::vms::lock(&self.inner.own_addr) else { return false };
        let Ok(u) = reqwest::Url::parse(url.trim()) else { return false };
        if u.port_or_known_default() != Some(own.port()) {
            return false;
        }
        let host = u.host_str().unwrap_or("").trim_matches(['[', ']']);
        let ip: Option<std::net::IpAddr> = if host == "localhost" { Some(std::net::Ipv4Addr::LOCALHOST.into()) } else { host.parse().ok() };
        match ip {
            Some(ip) => ip == own.ip() || own.ip().is_unspecified() || (ip.is_loopback() && own.ip().is_loopback()),
            None => false,
        }
    }

    /// Takes a checkpoint of VM `name` by `method` and records it.
    pub(crate) async fn take_checkpoint(&self, name: &str, method: CheckpointMethod) -> Result<Checkpoint, AgentError> {
        let vm = self.vm(name)?;
        let mut vm = vm.lock().await;
        if vm.record.state != VmState::Running {
            return Err(AgentError::InvalidState { vm: name.into(), op: "checkpoint", state: vm.record.state });
        }
        let qmp = vm.qmp.clone().ok_or(AgentError::InvalidState { vm: name.into(), op: "checkpoint", state: vm.record.state })?;
        let dir = self.checkpoint_dir(name);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // A VM that came with shared storage runs on a chain in the store of the host it
        // came from: its layers are linked in here, and its numbering continues theirs.
        let img = walkabout_qemu::img::QemuImg::beside(&self.inner.config.qemu_binary);
        for (i, d) in vm.record.spec.disks.iter().enumerate() {
            if let (Some(path), Some(format)) = (&d.path, d.format) {
                let disk = walkabout_api::DiskSpec::node_name(i);
                let last = link_backing_chain(&img, &disk, path, format, &dir, name).await.map_err(ck_err(name))?;
                if let Some(last) = last {
                    self.inner.store.raise_checkpoint(name, last)?;
                }
            }
        }
        let n = self.inner.store.next_checkpoint(name)?;
        let started = Instant::now();
        let disks: Vec<String> = (0..vm.record.spec.disks.len()).map(walkabout_api::DiskSpec::node_name).collect();
        let tops = top_nodes(&qmp, &disks).await.map_err(ck_err(name))?;
        let mut steps = vec![];
        for (i, (disk, top)) in disks.iter().zip(tops).enumerate() {
            let d = &vm.record.spec.disks[i];
            let (Some(path), Some(format)) = (d.path.clone(), d.format) else {
                return Err(ck_err(name)(format!("disk {disk} has no pinned image")));
            };
            steps.push(DiskStep {
                disk: disk.clone(),
                top,
                top_path: path,
                top_format: format,
                frozen: dir.join(format!("{name}.{n}.{disk}.qcow2")),
                overlay: dir.join(format!("{name}.a{n}.{disk}.qcow2")),
                overlay_node: format!("{disk}-c{n}"),
            });
        }
        let mem = dir.join(format!("{name}.{n}.mem"));
        match self.freeze(&mut vm, &qmp, method, n, &steps, &mem).await {
            Ok((pause_ms, taken_ms, guest)) => {
                // Recorded after the pause (a database write syncs to disk).
                self.adopt_overlays(&mut vm, &steps);
                let total_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let ck = self.record_checkpoint(&mut vm, method, n, &steps, &mem, pause_ms, total_ms, taken_ms, guest).await?;
                tracing::info!(vm = %name, id = %ck.id, ?method, pause_ms, total_ms, "checkpoint taken");
                Ok(ck)
            }
            Err((snapshotted, reason)) => {
                let _ = std::fs::remove_file(&mem);
                if snapshotted {
                    // The VM runs on its new overlays now: keep them (and the names their
                    // headers give their backing); the next checkpoint takes them along.
                    self.adopt_overlays(&mut vm, &steps);
                } else {
                    for s in &steps {
                        let _ = qmp_do(&qmp, "blockdev-del", Some(json!({"node-name": s.overlay_node}))).await;
                        let _ = std::fs::remove_file(&s.overlay);
                        if s.frozen != s.top_path {
                            let _ = std::fs::remove_file(&s.frozen);
                        }
                    }
                }
                tracing::warn!(vm = %name, n, reason = %reason, "checkpoint failed; the VM runs on");
                Err(ck_err(name)(reason))
            }
        }
    }

    /// What a deleted VM leaves of its checkpoints that no checkpoint owns: its active
    /// overlays in the store, the links a restore made to layers held elsewhere (a
    /// file with other links: its data stays there) that no checkpoint took, and the images the agent made for it that its first checkpoint hard-linked in
    /// (the checkpoint keeps its own link).
    pub(crate) fn remove_checkpoint_leftovers(&self, spec: &walkabout_api::VmSpec) {
        let dir = self.checkpoint_dir(&spec.name);
        if !dir.exists() {
            return;
        }
        for d in spec.disks.iter().filter_map(|d| d.path.as_ref()) {
            let active = d.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            if d.parent() == Some(dir.as_path()) && active.starts_with(&format!("{}.a", spec.name)) {
                let _ = std::fs::remove_file(d);
            }
        }
        if let Ok(owned) = self.local_checkpoints(&spec.name) {
            let owned: std::collections::BTreeSet<String> = owned.iter().flat_map(|c| c.files.iter().map(|f| f.name.clone())).collect();
            let files = std::fs::read_dir(&dir).map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()));
            for f in files.into_iter().flatten().filter(|f| f.ends_with(".qcow2") && !owned.contains(f)) {
                use std::os::unix::fs::MetadataExt;
                if std::fs::metadata(dir.join(&f)).is_ok_and(|m| m.nlink() > 1) {
                    let _ = std::fs::remove_file(dir.join(f));
                }
            }
        }
        let storage = self.storage_dir();
        for i in 0..spec.disks.len() {
            let made = crate::disks::owned_path(&storage, &spec.name, i);
            let linked = std::fs::read_dir(&dir).map(|rd| rd.filter_map(Result::ok).any(|e| same_file(&e.path(), &made))).unwrap_or(false);
            if linked {
                let _ = std::fs::remove_file(&made);
            }
        }
    }

    /// Points the VM's spec at its new overlays (after a disk snapshot).
    fn adopt_overlays(&self, vm: &mut Vm, steps: &[DiskStep]) {
        for (i, s) in steps.iter().enumerate() {
            if let Some(d) = vm.record.spec.disks.get_mut(i) {
                d.path = Some(s.overlay.clone());
                d.format = Some(DiskFormat::Qcow2);
            }
        }
        if let Err(e) = self.inner.store.put(&vm.record) {
            tracing::error!(vm = %vm.record.spec.name, error = %e, "cannot record the VM's new overlays");
        }
    }

    /// The QEMU side of a checkpoint: overlays made and added, memory written, disks
    /// snapshotted at the pause, the guest resumed. Returns the pause (ms), the instant
    /// (ms since epoch) and the guest's status at it; on failure, whether the disks were
    /// already snapshotted, and why. The guest runs again in every case.
    async fn freeze(
        &self,
        vm: &mut Vm,
        qmp: &Qmp,
        method: CheckpointMethod,
        n: u64,
        steps: &[DiskStep],
        mem: &Path,
    ) -> Result<(u64, u64, GuestStatus), (bool, String)> {
        let img = walkabout_qemu::img::QemuImg::beside(&self.inner.config.qemu_binary);
        for s in steps {
            if s.frozen != s.top_path {
                std::fs::hard_link(&s.top_path, &s.frozen).map_err(|e| {
                    (
                        false,
                        format!(
                            "cannot link disk {} image {} into the checkpoint store as {} (they must share a file system): {e}",
                            s.disk,
                            s.top_path.display(),
                            s.frozen.display()
                        ),
                    )
                })?;
            }
            let rel = PathBuf::from(s.frozen.file_name().unwrap_or_default());
            // Created in the store's directory: the relative backing name resolves there.
            let made = img.create(&s.overlay, DiskFormat::Qcow2, None, Some((&s.frozen, s.top_format))).await;
            made.map_err(|e| (false, format!("cannot create overlay for disk {}: {e}", s.disk)))?;
            rebase_name(img.binary(), &s.overlay, &rel, s.top_format).await.map_err(|e| (false, e))?;
            let add = json!({"driver": "qcow2", "node-name": s.overlay_node,
                "file": {"driver": "file", "filename": s.overlay, "node-name": format!("{}-file", s.overlay_node)}, "backing": null});
            qmp_do(qmp, "blockdev-add", Some(add)).await.map_err(|e| (false, format!("cannot open overlay for disk {}: {e}", s.disk)))?;
        }
        let params = qmp_do(qmp, "query-migrate-parameters", None).await.map_err(|e| (false, e))?;
        let old_bw = params["max-bandwidth"].as_u64();
        // A migration over TLS leaves its credentials set; QEMU refuses TLS with a
        // mapped-ram file ("Cannot use TLS with mapped-ram"), and a file needs none. The
        // next migration sets its own again.
        let no_tls = json!({"tls-creds": "", "tls-hostname": "", "tls-authz": ""});
        qmp_do(qmp, "migrate-set-parameters", Some(no_tls)).await.map_err(|e| (false, format!("cannot clear the TLS parameters: {e}")))?;
        let mapped_ram = true;
        qmp_do(qmp, "migrate-set-capabilities", Some(capabilities(method, mapped_ram)))
            .await
            .map_err(|e| (false, format!("QEMU refuses the {method} checkpoint's capabilities: {e}")))?;
        let _ = qmp_do(qmp, "migrate-set-parameters", Some(json!({"max-bandwidth": FILE_BANDWIDTH}))).await;
        let r = self.write_memory(vm, qmp, method, n, steps, mem).await;
        let _ = qmp_do(qmp, "migrate-set-capabilities", Some(capabilities_off())).await;
        if let Some(bw) = old_bw {
            let _ = qmp_do(qmp, "migrate-set-parameters", Some(json!({"max-bandwidth": bw}))).await;
        }
        // Whatever happened, the guest runs again (a migration to a file leaves it stopped).
        if !qmp.query_status().await.map(|s| s.running).unwrap_or(true) {
            if let Err(e) = qmp.cont().await {
                tracing::error!(vm = %vm.record.spec.name, error = %e, "cannot resume the guest after its checkpoint");
            }
        }
        r
    }

    async fn write_memory(
        &self,
        vm: &mut Vm,
        qmp: &Qmp,
        method: CheckpointMethod,
        n: u64,
        steps: &[DiskStep],
        mem: &Path,
    ) -> Result<(u64, u64, GuestStatus), (bool, String)> {
        let name = vm.record.spec.name.clone();
        let migrate = json!({"channels": [{"channel-type": "main", "addr": {"transport": "file", "filename": mem, "offset": 0}}]});
        let snapshot = json!({"actions": steps.iter().map(|s| json!({"type": "blockdev-snapshot",
            "data": {"node": s.top, "overlay": s.overlay_node}})).collect::<Vec<_>>()});
        let mut w = Watch::new(qmp);
        let paused_at;
        let pause_start;
        // The console's length at the pause: the guest's status there is parsed later,
        // outside the pause.
        let console_len;
        let fail = |snap: bool| move |e: String| (snap, e);
        match method {
            CheckpointMethod::Live => {
                qmp_do(qmp, "migrate", Some(migrate)).await.map_err(fail(false))?;
                w.until(qmp, &["pre-switchover"], |_| false).await.map_err(fail(false))?;
                pause_start = Instant::now();
                paused_at = now_ms();
                console_len = console_len_of(vm);
                let r = qmp_do(qmp, "transaction", Some(snapshot)).await;
                if let Err(e) = r {
                    let _ = qmp_do(qmp, "migrate_cancel", None).await;
                    let _ = w.until(qmp, &["cancelled", "failed", "completed"], |_| false).await;
                    return Err((false, format!("the disk snapshot failed: {e}")));
                }
                qmp_do(qmp, "migrate-continue", Some(json!({"state": "pre-switchover"}))).await.map_err(fail(true))?;
                w.until(qmp, &["completed"], |_| false).await.map_err(fail(true))?;
            }
            CheckpointMethod::Paused | CheckpointMethod::Background => {
                qmp.stop().await.map_err(|e| (false, e.to_string()))?;
                pause_start = Instant::now();
                paused_at = now_ms();
                console_len = console_len_of(vm);
                qmp_do(qmp, "transaction", Some(snapshot)).await.map_err(|e| (false, format!("the disk snapshot failed: {e}")))?;
                qmp_do(qmp, "migrate", Some(migrate)).await.map_err(|e| (true, format!("QEMU refuses the {method} memory write: {e}")))?;
                if method == CheckpointMethod::Background {
                    // Resume once QEMU saves pages: by then the device state is written
                    // and guest RAM write-protected, so the guest's writes are intercepted.
                    let saving = |st: &Value| st["ram"]["normal"].as_u64().unwrap_or(0) + st["ram"]["duplicate"].as_u64().unwrap_or(0) > 0;
                    w.until(qmp, &["completed"], saving).await.map_err(fail(true))?;
                    qmp.cont().await.map_err(|e| (true, e.to_string()))?;
                }
                w.until(qmp, &["completed"], |_| false).await.map_err(fail(true))?;
            }
        }
        let resumed = qmp.query_status().await.map(|s| s.running).unwrap_or(false);
        if !resumed {
            qmp.cont().await.map_err(|e| (true, format!("cannot resume the guest: {e}")))?;
        }
        let pause_wall = u64::try_from(pause_start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let guest = guest_at(vm, console_len);
        tokio::time::sleep(Duration::from_millis(5)).await;
        w.drain();
        // QEMU's own timestamps of the vCPUs stopping and resuming, when it sent both.
        let pause_ms = match (w.stop_us, w.resume_us) {
            (Some(s), Some(r)) if r >= s => (r - s) / 1000,
            _ => pause_wall,
        };
        tracing::debug!(vm = %name, n, pause_ms, "checkpoint memory written");
        Ok((pause_ms, paused_at, guest))
    }

    /// Describes and stores a checkpoint whose files are written.
    #[allow(clippy::too_many_arguments)]
    async fn record_checkpoint(
        &self,
        vm: &mut Vm,
        method: CheckpointMethod,
        n: u64,
        steps: &[DiskStep],
        mem: &Path,
        pause_ms: u64,
        total_ms: u64,
        taken_ms: u64,
        guest: GuestStatus,
    ) -> Result<Checkpoint, AgentError> {
        let name = vm.record.spec.name.clone();
        let dir = self.checkpoint_dir(&name);
        let owned: std::collections::BTreeSet<String> =
            self.local_checkpoints(&name)?.iter().flat_map(|c| c.files.iter().map(|f| f.name.clone())).collect();
        let mem_name = format!("{name}.{n}.mem");
        let mut out = vec![describe(mem, &mem_name, FileKind::Memory, None, None)?];
        let mut spec = vm.record.spec.clone();
        for (i, s) in steps.iter().enumerate() {
            // The frozen layer and every layer below it that no checkpoint owns yet (left
            // by a checkpoint that failed after its snapshot), down to the base.
            let mut layer = s.frozen.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            if let Some(d) = spec.disks.get_mut(i) {
                d.path = Some(PathBuf::from(&layer));
                d.format = Some(s.top_format);
            }
            let mut first = true;
            loop {
                if owned.contains(&layer) || (!first && out.iter().any(|f| f.name == layer)) {
                    break;
                }
                let path = dir.join(&layer);
                let below = backing_name(&self.qemu_img_bin(), &path).await.filter(|b| !b.contains('/'));
                let kind = if below.is_some() { FileKind::Layer } else { FileKind::Base };
                out.push(describe(&path, &layer, kind, Some(s.disk.clone()), below.clone())?);
                first = false;
                match below {
                    Some(b) => layer = b,
                    None => break,
                }
            }
        }
        // The active overlays that checkpoint `n - 1` and earlier left under `a` names
        // are linked under their checkpoint names now; drop the old names.
        for s in steps {
            if s.top_path.parent() == Some(dir.as_path()) && s.top_path != s.frozen {
                let _ = std::fs::remove_file(&s.top_path);
            }
        }
        let parent = self.local_checkpoints(&name)?.into_iter().map(|c| c.id).next_back();
        let ck = Checkpoint {
            version: CHECKPOINT_VERSION,
            id: format!("{name}.{n}"),
            vm: name.clone(),
            n,
            parent,
            taken_ms,
            host: crate::host::hostname(),
            spec,
            method,
            pause_ms,
            total_ms,
            guest,
            files: out,
            shipped_bytes: None,
            verified: true,
            problem: None,
        };
        self.inner.store.put_checkpoint(&ck)?;
        Ok(ck)
    }

    /// The checkpoints taken here of `vm`, oldest first.
    pub(crate) fn local_checkpoints(&self, vm: &str) -> Result<Vec<Checkpoint>, AgentError> {
        let mut v: Vec<Checkpoint> = self.inner.store.list_checkpoints()?.into_iter().filter(|c| c.vm == vm).collect();
        v.sort_by_key(|c| c.n);
        Ok(v)
    }

    /// Every checkpoint this agent holds: taken here, and committed here as a replica.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, AgentError> {
        let mut v = self.inner.store.list_checkpoints()?;
        for r in self.inner.store.list_replicas()? {
            v.extend(r.checkpoints.into_iter().filter(|c| !v.iter().any(|l| l.id == c.id)).collect::<Vec<_>>());
        }
        v.sort_by(|a, b| (a.vm.as_str(), a.n).cmp(&(b.vm.as_str(), b.n)));
        Ok(v)
    }

    /// One checkpoint this agent holds, and the directory of its files.
    pub(crate) fn find_checkpoint(&self, id: &str) -> Result<(Checkpoint, PathBuf), AgentError> {
        if let Some(c) = self.inner.store.list_checkpoints()?.into_iter().find(|c| c.id == id) {
            let dir = self.checkpoint_dir(&c.vm);
            return Ok((c, dir));
        }
        for r in self.inner.store.list_replicas()? {
            if let Some(c) = r.checkpoints.iter().find(|c| c.id == id) {
                return Ok((c.clone(), self.replica_dir(&r.vm)));
            }
        }
        Err(AgentError::CheckpointNotFound { id: id.into() })
    }

    /// One checkpoint.
    pub fn get_checkpoint(&self, id: &str) -> Result<Checkpoint, AgentError> {
        self.find_checkpoint(id).map(|(c, _)| c)
    }

    /// Forgets a checkpoint taken here, and its memory file. Its disk layers stay while
    /// a later checkpoint or the VM's active overlay is backed by them.
    pub fn delete_checkpoint(&self, id: &str) -> Result<(), AgentError> {
        let Some(c) = self.inner.store.list_checkpoints()?.into_iter().find(|c| c.id == id) else {
            return Err(AgentError::CheckpointNotFound { id: id.into() });
        };
        let dir = self.checkpoint_dir(&c.vm);
        let later = self.local_checkpoints(&c.vm)?.into_iter().any(|o| o.n > c.n);
        let vm_gone = self.vm(&c.vm).is_err();
        for f in &c.files {
            if f.kind == FileKind::Memory || (!later && vm_gone) {
                let _ = std::fs::remove_file(dir.join(&f.name));
            }
        }
        self.inner.store.delete_checkpoint(id)?;
        Ok(())
    }

    /// Starts a VM from a checkpoint this agent holds.
    pub async fn restore_checkpoint(&self, id: &str, req: RestoreRequest) -> Result<RestoreReply, AgentError> {
        let started = Instant::now();
        let (ck, dir) = self.find_checkpoint(id)?;
        verify(&dir, &ck).map_err(|reason| AgentError::FileMismatch { vm: ck.vm.clone(), file: ck.id.clone(), reason })?;
        let vm = self.restore_from(&ck, &dir, req.name).await?;
        Ok(RestoreReply {
            vm,
            checkpoint: ck,
            skipped: vec![],
            restore_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Starts VM `name` (default: the checkpoint's) from checkpoint `ck` whose files are
    /// in `dir`: its disks on new overlays over the checkpoint's layers, its memory and
    /// devices from the memory file, its guest status continuing the checkpoint's.
    /// Nothing is left running or reserved if it fails.
    pub(crate) async fn restore_from(
        &self,
        ck: &Checkpoint,
        dir: &Path,
        name: Option<String>,
    ) -> Result<walkabout_api::VmInfo, AgentError> {
        let name = name.unwrap_or_else(|| ck.vm.clone());
        let mut spec = ck.spec.clone();
        spec.name = name.clone();
        let store = self.checkpoint_dir(&name);
        std::fs::create_dir_all(&store).map_err(io_err(&store))?;
        let mut made: Vec<PathBuf> = vec![];
        let img = walkabout_qemu::img::QemuImg::beside(&self.inner.config.qemu_binary);
        let cleanup = |made: &[PathBuf]| {
            for p in made {
                let _ = std::fs::remove_file(p);
            }
        };
        if self.vm(&name).is_ok() {
            return Err(AgentError::Duplicate { vm: name });
        }
        for (i, d) in spec.disks.iter_mut().enumerate() {
            let layer = d.path.clone().ok_or_else(|| ck_err(&ck.vm)(format!("disk {i} of the checkpoint names no layer")))?;
            let layer = layer.to_string_lossy().into_owned();
            file_in(dir, &layer)?;
            let format = d.format.unwrap_or(DiskFormat::Qcow2);
            let overlay = format!("{name}.a{}.{}.qcow2", ck.n, walkabout_api::DiskSpec::node_name(i));
            match stage_restored_disk(&img, dir, &layer, format, &store, &overlay).await {
                Ok(m) => made.extend(m),
                Err(e) => {
                    cleanup(&made);
                    return Err(ck_err(&ck.vm)(format!("cannot make the restored disk {i}'s overlay: {e}")));
                }
            }
            d.path = Some(store.join(&overlay));
            d.format = Some(DiskFormat::Qcow2);
        }
        let r = self.start_restored(spec, ck, dir).await;
        if r.is_err() {
            cleanup(&made);
        }
        r
    }

    async fn start_restored(&self, spec: walkabout_api::VmSpec, ck: &Checkpoint, dir: &Path) -> Result<walkabout_api::VmInfo, AgentError> {
        let name = spec.name.clone();
        self.validate(&spec)?;
        let mem = file_in(dir, &format!("{}.{}.mem", ck.vm, ck.n))?;
        let mem = ck.files.iter().find(|f| f.kind == FileKind::Memory).map(|f| dir.join(&f.name)).unwrap_or(mem);
        let vm = self.reserve(spec, VmState::Incoming)?;
        let mut guard = vm.lock().await;
        guard.record.guest_before = Some(GuestStatus { partial_line: ck.guest.partial_line.clone(), ..ck.guest.clone() });
        let run_dir = guard.record.run_dir.clone();
        if let Err(e) = self.inner.store.put(&guard.record) {
            self.unreserve(&name, &run_dir);
            return Err(e.into());
        }
        if let Err(e) = self.boot(&mut guard, true).await {
            self.unreserve(&name, &run_dir);
            return Err(e);
        }
        let Some(qmp) = guard.qmp.clone() else {
            self.unreserve(&name, &run_dir);
            return Err(ck_err(&name)("QEMU started without QMP".into()));
        };
        match incoming_from_file(&qmp, &mem, ck.method).await {
            Ok(()) => {}
            Err(reason) => {
                if let Some(p) = guard.process.take() {
                    let _ = qmp.quit().await;
                    if !p.wait_exit(Duration::from_secs(5)).await {
                        p.kill(Duration::from_secs(2)).await;
                    }
                }
                guard.record.state = VmState::Stopped;
                drop(guard);
                crate::nics::delete_taps(&self.nic_salt(), &name);
                self.unreserve(&name, &run_dir);
                return Err(ck_err(&name)(format!("restoring checkpoint {}: {reason}", ck.id)));
            }
        }
        guard.record.state = VmState::Running;
        guard.record.reason = Some(format!("restored from checkpoint {}", ck.id));
        self.inner.store.put(&guard.record)?;
        // This VM's own checkpoints continue the numbering of the one it came from.
        self.inner.store.raise_checkpoint(&name, ck.n)?;
        tracing::info!(vm = %name, checkpoint = %ck.id, "VM restored from a checkpoint");
        Ok(self.info_of(&guard))
    }

    /// Sends `ck`'s files that the replica at `to` lacks, then commits it there with
    /// `keep` (0: the replica keeps everything). Returns the bytes sent.
    pub(crate) async fn ship(&self, ck: &Checkpoint, to: &str, keep: u32) -> Result<u64, AgentError> {
        let fail = |reason: String| AgentError::Ship { id: ck.id.clone(), to: to.to_string(), reason };
        let opts = ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(300) };
        let client = AgentClient::new(to, opts).map_err(|e| fail(e.to_string()))?;
        let held = match client.replica(&ck.vm).await {
            Ok(r) => r,
            Err(e) if e.status() == Some(404) => walkabout_api::ReplicaState { vm: ck.vm.clone(), ..Default::default() },
            Err(e) => return Err(fail(e.to_string())),
        };
        let dir = self.checkpoint_dir(&ck.vm);
        let needed = needed_files(ck, &self.local_checkpoints(&ck.vm)?, &held);
        let mut sent = 0u64;
        for f in &needed {
            if held.files.iter().any(|h| h.name == f.name && h.sha256 == f.sha256) {
                continue;
            }
            let path = dir.join(&f.name);
            let (body, upload) =
                encode_for(&path, f, &held, &dir, &ck.vm, self).map_err(|e| fail(format!("reading {}: {e}", path.display())))?;
            sent += body.len() as u64;
            client.put_replica_file(&ck.vm, &f.name, &upload, body).await.map_err(|e| fail(format!("file {}: {e}", f.name)))?;
        }
        let manifest = Checkpoint { files: needed, ..ck.clone() };
        client.commit_replica(&ck.vm, &CommitCheckpoint { checkpoint: manifest, keep }).await.map_err(|e| fail(e.to_string()))?;
        tracing::info!(vm = %ck.vm, id = %ck.id, to, bytes = sent, "checkpoint shipped");
        Ok(sent)
    }
}

/// The files a replica holding `held` needs for `ck`: its memory file, and per disk its
/// layer and every layer below it down to the first one the replica holds by name (a
/// replica that merged older layers holds the merged file under the newer name).
fn needed_files(ck: &Checkpoint, local: &[Checkpoint], held: &walkabout_api::ReplicaState) -> Vec<CheckpointFile> {
    let known: std::collections::BTreeMap<&str, &CheckpointFile> =
        local.iter().chain(std::iter::once(ck)).flat_map(|c| c.files.iter().map(|f| (f.name.as_str(), f))).collect();
    let holds = |name: &str| held.files.iter().any(|h| h.name == name);
    let mut out: Vec<CheckpointFile> = ck.files.iter().filter(|f| f.kind == FileKind::Memory).cloned().collect();
    for d in &ck.spec.disks {
        let mut name = d.path.as_ref().map(|p| p.to_string_lossy().into_owned());
        while let Some(n) = name.take() {
            if holds(&n) || out.iter().any(|f| f.name == n) {
                break;
            }
            let Some(f) = known.get(n.as_str()) else { break };
            out.push((*f).clone());
            name = f.backing.clone();
        }
    }
    out
}

/// The smallest encoding of `f` for a replica holding `held`: its extents, or for a
/// memory file a delta against the newest memory file the replica holds (and this
/// agent still has, byte-identical).
fn encode_for(
    path: &Path,
    f: &CheckpointFile,
    held: &walkabout_api::ReplicaState,
    dir: &Path,
    vm: &str,
    agent: &Agent,
) -> std::io::Result<(Vec<u8>, FileUpload)> {
    let extents = files::encode_extents(path)?;
    let mut best = (extents, FileUpload { sha256: f.sha256.clone(), encoding: Encoding::Extents, base: None });
    if f.kind == FileKind::Memory {
        let ours: Vec<CheckpointFile> = agent.local_checkpoints(vm).unwrap_or_default().into_iter().flat_map(|c| c.files).collect();
        let base = held
            .files
            .iter()
            .filter(|h| h.kind == FileKind::Memory && h.name != f.name)
            .filter(|h| ours.iter().any(|o| o.name == h.name && o.sha256 == h.sha256) && dir.join(&h.name).exists())
            .max_by_key(|h| h.name.trim_end_matches(".mem").rsplit('.').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0));
        if let Some(b) = base {
            let hashes = files::chunk_hashes(&dir.join(&b.name))?;
            let delta = files::encode_delta(path, &hashes)?;
            if delta.len() < best.0.len() {
                best = (delta, FileUpload { sha256: f.sha256.clone(), encoding: Encoding::Extents, base: Some(b.name.clone()) });
            }
        }
    }
    Ok(best)
}

/// Puts a restored disk's chain into the VM's own checkpoint store `store`, as if its
/// checkpoints had been taken there: checkpoint layer `layer` of `dir` and the layers
/// under it that `dir` holds (named relative to it) are hard-linked in under the same
/// names (unless there already, as the same file), and the new overlay `overlay` (the
/// active one, `<vm>.a<n>.<disk>.qcow2`) is created over the layer, its header naming it
/// by that relative name. So the restored VM's chain names no path of the host that made
/// it, and its next checkpoint ships layers that resolve on any host. Returns the files
/// it made (the links and the overlay); on an error it leaves none.
async fn stage_restored_disk(
    img: &walkabout_qemu::img::QemuImg,
    dir: &Path,
    layer: &str,
    format: DiskFormat,
    store: &Path,
    overlay: &str,
) -> Result<Vec<PathBuf>, String> {
    let mut made: Vec<PathBuf> = vec![];
    let r = stage_into(img, dir, layer, format, store, overlay, &mut made).await;
    if r.is_err() {
        for p in &made {
            let _ = std::fs::remove_file(p);
        }
    }
    r.map(|()| made)
}

async fn stage_into(
    img: &walkabout_qemu::img::QemuImg,
    dir: &Path,
    layer: &str,
    format: DiskFormat,
    store: &Path,
    overlay: &str,
    made: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let top = store.join(overlay);
    if top.exists() {
        return Err(format!("image {} exists already", top.display()));
    }
    if dir != store {
        let chain =
            img.chain_in_use(&dir.join(layer), Some(format)).await.map_err(|e| format!("cannot read the chain of layer {layer}: {e}"))?;
        for l in chain.iter().filter(|l| l.path.parent() == Some(dir)) {
            let Some(file) = l.path.file_name() else { continue };
            let there = store.join(file);
            if there.exists() && same_file(&there, &l.path) {
                continue;
            }
            replace_stale(&there, &chain)?;
            std::fs::hard_link(&l.path, &there).map_err(|e| {
                format!("cannot link layer {} into the store as {} (they must share a file system): {e}", l.path.display(), there.display())
            })?;
            made.push(there);
        }
    }
    img.create(&top, DiskFormat::Qcow2, None, Some((&store.join(layer), format))).await.map_err(|e| e.to_string())?;
    made.push(top.clone());
    rebase_name(img.binary(), &top, Path::new(layer), format).await
}

/// Clears the way for a layer of `chain` to be linked into a checkpoint store as
/// `there`. A file of that name already there, not a layer of `chain`, is a layer of
/// the VM's earlier stay on this host: a checkpoint store outlives the stay, and a
/// failover or a hop back brings a chain whose layers carry the same names (seen: the
/// failover of a VM to a host it had walked through was refused, and the VM lost). No
/// QEMU runs from it (the VM runs from the chain brought, or not at all), and the chain
/// brought is the VM's present, so the old file is removed.
fn replace_stale(there: &Path, chain: &[walkabout_qemu::img::ImageInfo]) -> Result<(), String> {
    if !there.exists() {
        return Ok(());
    }
    if chain.iter().any(|l| same_file(there, &l.path)) {
        return Err(format!("{} is a layer of the chain being linked under another name", there.display()));
    }
    tracing::warn!(file = %there.display(), "replacing a layer left in the checkpoint store by the VM's earlier stay on this host");
    std::fs::remove_file(there).map_err(|e| format!("cannot remove {}, left by the VM's earlier stay: {e}", there.display()))
}

/// Makes the layers under a disk's top image `top` resolvable from the checkpoint store
/// `store` when the top lives elsewhere (the VM came with shared storage from a host
/// whose store held its chain): each backing layer in the top's own directory (named
/// relative to it) is hard-linked into the store under the same name, unless it is there
/// already. Returns the highest checkpoint number of `vm` those layers' names carry
/// (`VM.N.disk` and `VM.aN.disk`), which this host's numbering must continue.
async fn link_backing_chain(
    img: &walkabout_qemu::img::QemuImg,
    disk: &str,
    top: &Path,
    format: DiskFormat,
    store: &Path,
    vm: &str,
) -> Result<Option<u64>, String> {
    let Some(top_dir) = top.parent() else { return Ok(None) };
    if top_dir == store {
        return Ok(None);
    }
    let chain = img
        .chain_in_use(top, Some(format))
        .await
        .map_err(|e| format!("cannot read the backing chain of disk {disk} ({}): {e}", top.display()))?;
    let mut last = None;
    for (i, layer) in chain.iter().enumerate().filter(|(_, l)| l.path.parent() == Some(top_dir)) {
        let Some(name) = layer.path.file_name() else { continue };
        last = last.max(checkpoint_number(&name.to_string_lossy(), vm));
        if i == 0 {
            continue;
        }
        let there = store.join(name);
        if there.exists() && same_file(&there, &layer.path) {
            continue;
        }
        replace_stale(&there, &chain).map_err(|e| format!("disk {disk}: {e}"))?;
        std::fs::hard_link(&layer.path, &there).map_err(|e| {
            format!(
                "cannot link disk {disk} layer {} into the checkpoint store as {} (they must share a file system): {e}",
                layer.path.display(),
                there.display()
            )
        })?;
    }
    Ok(last)
}

/// The checkpoint number in a layer's file name: `VM.N.DISK.qcow2` (a frozen layer) or
/// `VM.aN.DISK.qcow2` (the overlay active after checkpoint N).
fn checkpoint_number(file: &str, vm: &str) -> Option<u64> {
    let rest = file.strip_prefix(vm)?.strip_prefix('.')?;
    let n = rest.split('.').next()?;
    n.strip_prefix('a').unwrap_or(n).parse().ok()
}

/// Whether two paths are one file (hard links of one inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The length of a VM's console log now.
fn console_len_of(vm: &Vm) -> u64 {
    std::fs::metadata(vm.record.run_dir.join("console.log")).map(|m| m.len()).unwrap_or(0)
}

/// The guest's status as its console said it up to byte `len`.
fn guest_at(vm: &Vm, len: u64) -> GuestStatus {
    let log = std::fs::read(vm.record.run_dir.join("console.log")).unwrap_or_default();
    let end = usize::try_from(len).unwrap_or(usize::MAX).min(log.len());
    let before = vm.record.guest_before.clone().unwrap_or_default();
    crate::console::parse_after(before, &String::from_utf8_lossy(&log[..end]))
}

/// Rewrites the backing file name in `overlay`'s header to `name` (relative to the
/// overlay's directory), without touching data (`qemu-img rebase -u`).
pub(crate) async fn rebase_name(qemu_img: &str, overlay: &Path, name: &Path, format: DiskFormat) -> Result<(), String> {
    let out = tokio::process::Command::new(qemu_img)
        .args(["rebase", "-u", "-F", format.as_str(), "-b"])
        .arg(name)
        .arg(overlay)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running qemu-img rebase: {e}"))?;
    if !out.status.success() {
        return Err(format!("qemu-img rebase -u of {}: {}", overlay.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Loads a checkpoint's memory file into an incoming QEMU and starts the guest.
async fn incoming_from_file(qmp: &Qmp, mem: &Path, _method: CheckpointMethod) -> Result<(), String> {
    let caps = json!({"capabilities": [{"capability": "mapped-ram", "state": true}, {"capability": "events", "state": true}]});
    qmp_do(qmp, "migrate-set-capabilities", Some(caps)).await?;
    let addr = json!({"channels": [{"channel-type": "main", "addr": {"transport": "file", "filename": mem, "offset": 0}}]});
    qmp_do(qmp, "migrate-incoming", Some(addr)).await?;
    let deadline = Instant::now() + CHECKPOINT_TIMEOUT;
    loop {
        let st = qmp_do(qmp, "query-migrate", None).await?;
        match st["status"].as_str().unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => {
                let why = st["error-desc"].as_str().unwrap_or("no reason given");
                return Err(format!("QEMU could not load the memory file {}: {why}", mem.display()));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("loading {} took over {} s", mem.display(), CHECKPOINT_TIMEOUT.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The load is done when the run state leaves `inmigrate`.
    for _ in 0..500 {
        match qmp.query_status().await {
            Ok(s) if s.status != "inmigrate" => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => return Err(e.to_string()),
        }
    }
    // mapped-ram is for files only: left on, it makes QEMU refuse the TLS parameters of
    // this VM's next migration.
    let off = json!({"capabilities": [{"capability": "mapped-ram", "state": false}]});
    qmp_do(qmp, "migrate-set-capabilities", Some(off)).await?;
    qmp.cont().await.map_err(|e: QmpError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `qemu-img create` of `name` in `dir`, backed by `backing` (a name in `dir`).
    fn qcow2(dir: &Path, name: &str, backing: Option<&str>) {
        let mut c = std::process::Command::new("qemu-img");
        c.current_dir(dir).args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = backing {
            c.args(["-F", "qcow2", "-b", b]);
        }
        let out = c.args([name, "16M"]).output().expect("qemu-img");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[tokio::test]
    async fn a_restored_disks_chain_names_only_files_of_its_store_and_moves_whole() {
        let root = std::env::temp_dir().join(format!("wa-restore-stage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (replica, store, moved) = (root.join("replicas/vm"), root.join("checkpoints/re"), root.join("elsewhere"));
        for d in [&replica, &store] {
            std::fs::create_dir_all(d).expect("dir");
        }
        qcow2(&replica, "vm.1.disk0.qcow2", None);
        qcow2(&replica, "vm.4.disk0.qcow2", Some("vm.1.disk0.qcow2"));
        let img = walkabout_qemu::img::QemuImg::default();

        let made = stage_restored_disk(&img, &replica, "vm.4.disk0.qcow2", DiskFormat::Qcow2, &store, "re.a4.disk0.qcow2").await;

        let made = made.expect("staged");
        assert_eq!(made.len(), 3, "{made:?}");
        assert!(same_file(&store.join("vm.4.disk0.qcow2"), &replica.join("vm.4.disk0.qcow2")));
        assert!(same_file(&store.join("vm.1.disk0.qcow2"), &replica.join("vm.1.disk0.qcow2")));
        // The store moved to another place (another host) keeps a whole chain.
        std::fs::rename(&store, &moved).expect("move the store");
        std::fs::remove_dir_all(root.join("replicas")).expect("the replica gone");
        let chain = img.chain_in_use(&moved.join("re.a4.disk0.qcow2"), Some(DiskFormat::Qcow2)).await.expect("the chain there");
        let names: Vec<_> = chain.iter().map(|l| l.path.clone()).collect();
        assert_eq!(names, ["re.a4.disk0.qcow2", "vm.4.disk0.qcow2", "vm.1.disk0.qcow2"].map(|n| moved.join(n)), "{chain:?}");
        let again = stage_restored_disk(&img, &moved, "vm.4.disk0.qcow2", DiskFormat::Qcow2, &moved, "re.a4.disk0.qcow2").await;
        assert!(again.is_err_and(|e| e.contains("exists already")));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test]
    async fn a_layer_left_in_the_store_by_an_earlier_stay_is_replaced_by_the_replicas() {
        let root = std::env::temp_dir().join(format!("wa-restore-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (replica, store) = (root.join("replicas/fa"), root.join("checkpoints/fa"));
        for d in [&replica, &store] {
            std::fs::create_dir_all(d).expect("dir");
        }
        qcow2(&replica, "fa.1.disk0.qcow2", None);
        qcow2(&replica, "fa.3.disk0.qcow2", Some("fa.1.disk0.qcow2"));
        // The VM's own checkpoint 3 from when it ran here: another file of that name.
        qcow2(&store, "fa.3.disk0.qcow2", None);
        let img = walkabout_qemu::img::QemuImg::default();

        let made = stage_restored_disk(&img, &replica, "fa.3.disk0.qcow2", DiskFormat::Qcow2, &store, "fa.a3.disk0.qcow2").await;

        made.expect("staged over the stale layer");
        assert!(same_file(&store.join("fa.3.disk0.qcow2"), &replica.join("fa.3.disk0.qcow2")));
        let chain = img.chain_in_use(&store.join("fa.a3.disk0.qcow2"), Some(DiskFormat::Qcow2)).await.expect("the chain");
        assert_eq!(chain.len(), 3, "{chain:?}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_layers_checkpoint_number_is_read_from_its_name() {
        assert_eq!(checkpoint_number("fa.3.disk0.qcow2", "fa"), Some(3));
        assert_eq!(checkpoint_number("fa.a12.disk1.qcow2", "fa"), Some(12));
        assert_eq!(checkpoint_number("fab.3.disk0.qcow2", "fa"), None);
        assert_eq!(checkpoint_number("guest.qcow2", "fa"), None);
        assert_eq!(checkpoint_number("fa.disk0.qcow2", "fa"), None);
    }

    #[test]
    fn file_names_are_plain() {
        let d = Path::new("/x");
        assert_eq!(file_in(d, "vm.1.mem").expect("plain"), Path::new("/x/vm.1.mem"));
        for bad in ["", "..", "a/b", "../x", "a b"] {
            assert!(file_in(d, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn live_capabilities_pause_before_switchover_and_reset_switches_them_off() {
        let c = capabilities(CheckpointMethod::Live, true);
        let on = |v: &Value, cap: &str| {
            v["capabilities"].as_array().and_then(|a| a.iter().find(|c| c["capability"] == cap)).map(|c| c["state"] == true)
        };
        assert_eq!(
            (on(&c, "mapped-ram"), on(&c, "pause-before-switchover"), on(&c, "background-snapshot")),
            (Some(true), Some(true), Some(false))
        );
        let b = capabilities(CheckpointMethod::Background, true);
        assert_eq!((on(&b, "pause-before-switchover"), on(&b, "background-snapshot")), (Some(false), Some(true)));
        assert_eq!(on(&capabilities_off(), "mapped-ram"), Some(false));
    }
}
