//! Storage on migrate: how a VM's disks reach the destination.
//!
//! - `shared`: both hosts open the same image path. Before anything starts, the source
//!   writes a marker file with a random token beside every image and the destination
//!   must read the same token back through its own path, and open the image's whole
//!   backing chain (`qemu-img info -U --backing-chain`); otherwise `shared` is refused
//!   (and `auto` falls back to `copy`). The incoming QEMU opens the image inactive and
//!   QEMU hands it over at the switchover.
//! - `copy`: the destination creates its own image (same format and virtual size, in
//!   its storage directory (`DATA_DIR/images`); for a qcow2 overlay whose backing file
//!   it already holds — same SHA-256 in its catalog — an overlay on its own copy, so
//!   only the top layer moves), exports it writable over NBD, and is not armed to run
//!   the guest on its own. The source adds an NBD client node and runs
//!   `blockdev-mirror` with `copy-mode: write-blocking`: once the job is READY every
//!   guest write completes on both hosts, so a write-heavy guest cannot outrun it.
//!
//! The order of a copy, and why:
//! 1. The mirror runs to READY before memory moves: the memory stream's switchover
//!    needs the disk in sync, and a READY write-blocking mirror stays in sync.
//! 2. The switchover gate passes only if no mirror reported an error or ended
//!    ([`MirrorHealth`] reads QEMU's job events, already queued when the gate looks,
//!    so an error just before the guest paused is seen).
//! 3. After completion the source cancels the READY jobs (a soft cancel completes
//!    without pivoting: the guest's disk stays the source image) and drops the NBD
//!    nodes; then the commit makes the destination stop its NBD server and only then
//!    run the guest, so nothing can write to the image under the running guest.
//! 4. Every failure or cancel before the switchover force-cancels the jobs, drops the
//!    NBD nodes (the source guest never stopped using its own image) and removes the
//!    destination's new images (at abort, or at the destination agent's next start if
//!    it was killed: files named `copy-*` that no VM owns are swept).

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use walkabout_api::migration::{BackingImage, IncomingDisk, IncomingRequest, MirrorSync, NbdExport, NbdTarget, StorageMarker};
use walkabout_api::{DiskFormat, DiskProgress, StorageMode, VmSpec};
use walkabout_migrate::MigrationQmp;
use walkabout_qemu::img::{ImageError, QemuImg};
use walkabout_qemu::{Event, QmpError};

/// Prefix of the images a copy creates in an agent's storage directory.
pub(crate) const COPY_PREFIX: &str = "copy-";
/// Prefix of the marker files that prove shared storage.
const MARKER_PREFIX: &str = ".walkabout-marker-";
/// The file in an incoming VM's run directory listing the images made for it.
const CREATED_LIST: &str = "storage-created.json";
/// How long a mirror job may take to stop after a cancel.
const JOB_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of storage on migrate, each naming the disk or file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// `shared` was asked but this host does not see the source's image.
    #[error("cannot use shared storage for {vm}: this host does not see {path} as the same file ({detail})")]
    NotShared {
        /// The VM.
        vm: String,
        /// The image.
        path: PathBuf,
        /// What the marker check found.
        detail: String,
    },
    /// A disk of the spec lacks its path or format.
    #[error("disk {index} of {vm} has no {what}")]
    Incomplete {
        /// The VM.
        vm: String,
        /// The disk's index.
        index: usize,
        /// `path` or `format`.
        what: &'static str,
    },
    /// A file could not be written, read or removed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `qemu-img` failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A QMP command failed.
    #[error("QEMU refused `{command}`: {source}")]
    Qmp {
        /// The command.
        command: &'static str,
        /// QEMU's error.
        source: QmpError,
    },
    /// A mirror job failed, ended early, or did not get ready.
    #[error("disk mirror {job}: {detail}")]
    Mirror {
        /// The job id.
        job: String,
        /// What happened.
        detail: String,
    },
}

async fn qmp_do(qmp: &impl MigrationQmp, command: &'static str, args: Value) -> Result<Value, StorageError> {
    qmp.execute(command, Some(args)).await.map_err(|source| StorageError::Qmp { command, source })
}

fn random_hex() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok();
    if !ok {
        // Not secret, only unique: the clock and the pid will do.
        let n = crate::vms::now_ms() ^ (u64::from(std::process::id()) << 40);
        b[..8].copy_from_slice(&n.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---- the source side ----

/// What the source tells the destination about its disks, and the markers it wrote.
pub(crate) struct Offer {
    /// The disks, in spec order.
    pub disks: Vec<IncomingDisk>,
    /// The marker, when `shared` may be chosen.
    pub marker: Option<StorageMarker>,
    written: Vec<PathBuf>,
}

impl Offer {
    /// Removes the marker files (the destination has read them by now).
    pub fn remove_markers(&self) {
        for p in &self.written {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Describes the VM's disks from its running QEMU (size, backing file) and, unless
/// `copy` is forced, writes the shared-storage marker beside every image.
pub(crate) async fn offer(qmp: &impl MigrationQmp, spec: &VmSpec, mode: StorageMode) -> Result<Offer, StorageError> {
    let nodes = qmp.execute("query-named-block-nodes", Some(json!({"flat": true}))).await;
    let nodes = nodes.map_err(|source| StorageError::Qmp { command: "query-named-block-nodes", source })?;
    let mut disks = vec![];
    for (i, d) in spec.disks.iter().enumerate() {
        let path = d.path.clone().ok_or(StorageError::Incomplete { vm: spec.name.clone(), index: i, what: "path" })?;
        let format = d.format.ok_or(StorageError::Incomplete { vm: spec.name.clone(), index: i, what: "format" })?;
        let node_name = walkabout_api::DiskSpec::node_name(i);
        let top = top_node(qmp, &node_name).await;
        let node = nodes.as_array().and_then(|a| a.iter().find(|n| n["node-name"] == top.as_str())).cloned().unwrap_or_default();
        let virtual_size = node["image"]["virtual-size"].as_u64().unwrap_or(0);
        let backing_file = node["image"]["full-backing-filename"].as_str().or(node["backing_file"].as_str()).map(PathBuf::from);
        let backing_format = node["image"]["backing-filename-format"].as_str().and_then(|f| f.parse::<DiskFormat>().ok());
        let backing = match (backing_file, mode) {
            (Some(b), StorageMode::Copy | StorageMode::Auto) => {
                let sha256 = content_hash(&b).await?;
                Some(BackingImage { sha256, format: backing_format.unwrap_or(DiskFormat::Qcow2) })
            }
            _ => None,
        };
        disks.push(IncomingDisk { node_name, path, format, virtual_size, backing });
    }
    let mut written = vec![];
    let marker = if mode != StorageMode::Copy && !disks.is_empty() {
        let token = random_hex();
        let m = StorageMarker { file_name: format!("{MARKER_PREFIX}{}-{}", spec.name, &token[..8]), token };
        for d in &disks {
            let p = d.path.parent().unwrap_or(Path::new("/")).join(&m.file_name);
            if let Err(source) = std::fs::write(&p, &m.token) {
                if mode == StorageMode::Shared {
                    for w in &written {
                        let _ = std::fs::remove_file(w);
                    }
                    return Err(StorageError::Io { what: "writing the shared-storage marker", path: p, source });
                }
                // `auto` on a read-only directory: the destination will find no marker.
                continue;
            }
            written.push(p);
        }
        Some(m)
    } else {
        None
    };
    Ok(Offer { disks, marker, written })
}

/// The mirror jobs of one copy, on the source's QEMU.
pub(crate) struct Mirrors {
    /// (job id, NBD client node) per disk.
    jobs: Vec<(String, String)>,
}

/// The node QEMU's device for disk `node` (`diskN`) writes to now: `diskN` itself, or the
/// overlay a checkpoint put on top of it (`diskN-cK`). A mirror and the offer's sizes
/// must start from it: the layers below it are frozen and miss the guest's new writes.
pub(crate) async fn top_node(qmp: &impl MigrationQmp, node: &str) -> String {
    let dev = format!("{node}-dev");
    let blocks = qmp.execute("query-block", None).await.unwrap_or_default();
    blocks
        .as_array()
        .and_then(|list| {
            list.iter()
                .find(|b| b["qdev"].as_str().is_some_and(|q| q.split('/').any(|p| p == dev)))
                .and_then(|b| b["inserted"]["node-name"].as_str().map(String::from))
        })
        .unwrap_or_else(|| node.to_string())
}

fn job_id(node: &str) -> String {
    format!("mirror-{node}")
}

fn nbd_node(node: &str) -> String {
    format!("nbd-{node}")
}

impl Mirrors {
    /// Connects to the destination's exports (over TLS with the credentials the
    /// source armed, checking the destination's certificate against the host name in
    /// `tls`, when given) and starts one active mirror per disk. On failure
    /// whatever was started is undone.
    pub async fn start(qmp: &impl MigrationQmp, nbd: &NbdTarget, tls: Option<&str>) -> Result<Mirrors, StorageError> {
        let mut m = Mirrors { jobs: vec![] };
        for e in &nbd.exports {
            let r = Self::start_one(qmp, nbd, e, tls).await;
            match r {
                Ok(()) => m.jobs.push((job_id(&e.node_name), nbd_node(&e.node_name))),
                Err(err) => {
                    // The node may exist without its job.
                    let _ = qmp.execute("blockdev-del", Some(json!({"node-name": nbd_node(&e.node_name)}))).await;
                    m.abandon(qmp).await;
                    return Err(err);
                }
            }
        }
        Ok(m)
    }

    async fn start_one(qmp: &impl MigrationQmp, nbd: &NbdTarget, e: &NbdExport, tls: Option<&str>) -> Result<(), StorageError> {
        let server = json!({"type": "inet", "host": nbd.host, "port": nbd.port.to_string()});
        let node = json!({"driver": "nbd", "node-name": nbd_node(&e.node_name), "server": server, "export": e.export});
        let tls_args = super::tls::nbd_client_args(tls.is_some(), tls.unwrap_or_default());
        qmp_do(qmp, "blockdev-add", super::tls::merge(node, tls_args)).await?;
        let device = top_node(qmp, &e.node_name).await;
        let args = json!({
            "job-id": job_id(&e.node_name), "device": device, "target": nbd_node(&e.node_name),
            "sync": e.sync.as_str(), "copy-mode": "write-blocking", "auto-dismiss": true,
        });
        qmp_do(qmp, "blockdev-mirror", args).await.map(drop)
    }

    /// The jobs' counters summed, and whether every job is READY; an error if a job
    /// is gone or failing.
    pub async fn poll(&self, qmp: &impl MigrationQmp) -> Result<(DiskProgress, bool), StorageError> {
        let jobs = qmp_do(qmp, "query-block-jobs", json!({})).await?;
        let mut p = DiskProgress::default();
        let mut ready = true;
        for (id, _) in &self.jobs {
            let j = jobs.as_array().and_then(|a| a.iter().find(|j| j["device"] == id.as_str()));
            let Some(j) = j else {
                return Err(StorageError::Mirror { job: id.clone(), detail: "the job ended before the switchover".into() });
            };
            if j["io-status"].as_str().is_some_and(|s| s != "ok") || j["status"] == "aborting" {
                let detail = format!("I/O status {} ({})", j["io-status"], j["error"].as_str().unwrap_or("no detail"));
                return Err(StorageError::Mirror { job: id.clone(), detail });
            }
            let (offset, len) = (j["offset"].as_u64().unwrap_or(0), j["len"].as_u64().unwrap_or(0));
            // QEMU's counters, summed: saturating, as a reply is outside input.
            p.transferred_bytes = p.transferred_bytes.saturating_add(offset);
            p.total_bytes = p.total_bytes.saturating_add(len);
            p.remaining_bytes = p.remaining_bytes.saturating_add(len.saturating_sub(offset));
            ready &= j["ready"].as_bool().unwrap_or(false);
        }
        Ok((p, ready))
    }

    /// Waits until no job of ours is left (up to [`JOB_STOP_TIMEOUT`]).
    async fn wait_gone(&self, qmp: &impl MigrationQmp) {
        let start = Instant::now();
        while start.elapsed() < JOB_STOP_TIMEOUT {
            let Ok(jobs) = qmp.execute("query-block-jobs", None).await else { return };
            let ours = jobs.as_array().is_some_and(|a| a.iter().any(|j| self.jobs.iter().any(|(id, _)| j["device"] == id.as_str())));
            if !ours {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(jobs = ?self.jobs, "mirror jobs did not stop in time");
    }

    async fn drop_nodes(&self, qmp: &impl MigrationQmp) {
        for (_, node) in &self.jobs {
            if let Err(e) = qmp.execute("blockdev-del", Some(json!({"node-name": node}))).await {
                tracing::warn!(%node, error = %e, "cannot remove the NBD client node");
            }
        }
    }

    /// Before the switchover: stops the copy, dropping what was copied; the guest
    /// keeps its own image, untouched.
    pub async fn abandon(&self, qmp: &impl MigrationQmp) {
        for (id, _) in &self.jobs {
            let _ = qmp.execute("block-job-cancel", Some(json!({"device": id, "force": true}))).await;
        }
        self.wait_gone(qmp).await;
        self.drop_nodes(qmp).await;
    }

    /// After the switchover: ends the READY jobs without pivoting (the destination's
    /// copy is complete) and drops the NBD nodes.
    pub async fn finish(&self, qmp: &impl MigrationQmp) {
        for (id, _) in &self.jobs {
            if let Err(e) = qmp.execute("block-job-cancel", Some(json!({"device": id}))).await {
                tracing::warn!(job = %id, error = %e, "cannot end the mirror job");
            }
        }
        self.wait_gone(qmp).await;
        self.drop_nodes(qmp).await;
    }

    /// The job ids.
    pub fn ids(&self) -> BTreeSet<String> {
        self.jobs.iter().map(|(id, _)| id.clone()).collect()
    }
}

/// After a restart of the source agent: stops any mirror of this VM's disks left in
/// its QEMU (`finish` past the switchover, `abandon` before it).
pub(crate) async fn settle_leftover_mirrors(qmp: &impl MigrationQmp, disks: usize, past_switchover: bool) {
    let m = Mirrors { jobs: (0..disks).map(walkabout_api::DiskSpec::node_name).map(|n| (job_id(&n), nbd_node(&n))).collect() };
    if m.jobs.is_empty() {
        return;
    }
    if past_switchover {
        m.finish(qmp).await;
    } else {
        m.abandon(qmp).await;
    }
}

/// Watches QEMU's events for a mirror of ours failing or ending: read at the
/// switchover gate, where a round trip to QEMU is not possible (the gate only reads).
pub(crate) struct MirrorHealth {
    jobs: BTreeSet<String>,
    events: Mutex<broadcast::Receiver<Event>>,
    failed: Mutex<Option<String>>,
}

impl MirrorHealth {
    /// Watches `jobs`' events from now on.
    pub fn new(jobs: BTreeSet<String>, events: broadcast::Receiver<Event>) -> MirrorHealth {
        MirrorHealth { jobs, events: Mutex::new(events), failed: Mutex::new(None) }
    }

    /// Why a mirror is no longer in sync, if one is not (every queued event read).
    pub fn failure(&self) -> Option<String> {
        let mut failed = crate::vms::lock(&self.failed);
        let mut rx = crate::vms::lock(&self.events);
        loop {
            match rx.try_recv() {
                Ok(ev) => {
                    let job = ev.data["device"].as_str().or(ev.data["id"].as_str()).unwrap_or("");
                    if !self.jobs.contains(job) || failed.is_some() {
                        continue;
                    }
                    *failed = match ev.event.as_str() {
                        "BLOCK_JOB_ERROR" => Some(format!("disk mirror {job} hit an I/O error ({})", ev.data["operation"])),
                        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => Some(format!(
                            "disk mirror {job} ended before the switchover{}",
                            ev.data["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default()
                        )),
                        _ => None,
                    };
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        failed.clone()
    }
}

// ---- the destination side ----

/// How this host takes the disks of an incoming VM.
pub(crate) struct Plan {
    /// `shared` or `copy`; `None` without disks.
    pub mode: Option<StorageMode>,
    /// The spec as this host runs it (a copy's disks point at the new images).
    pub spec: VmSpec,
    /// What the source must mirror into each new image.
    pub syncs: Vec<MirrorSync>,
    /// The images created here, to remove if the migration does not complete.
    pub created: Vec<PathBuf>,
}

impl Plan {
    /// Removes the images made for this migration.
    pub fn remove_created(&self) {
        remove_files(&self.created);
    }

    /// Writes the list of images made for this migration in the VM's run directory,
    /// where an abort finds it.
    pub fn remember(&self, run_dir: &Path) {
        if self.created.is_empty() {
            return;
        }
        let _ = std::fs::create_dir_all(run_dir);
        if let Ok(text) = serde_json::to_string(&self.created) {
            let _ = std::fs::write(run_dir.join(CREATED_LIST), text);
        }
    }
}

fn remove_files(paths: &[PathBuf]) {
    for p in paths {
        match std::fs::remove_file(p) {
            Ok(()) => tracing::info!(path = %p.display(), "removed the image of an unfinished copy"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot remove the image of an unfinished copy"),
        }
    }
}

/// Removes the images an incoming VM's copy made (listed in its run directory).
pub(crate) fn remove_created(run_dir: &Path) {
    let list = std::fs::read(run_dir.join(CREATED_LIST)).ok().and_then(|b| serde_json::from_slice::<Vec<PathBuf>>(&b).ok());
    remove_files(&list.unwrap_or_default());
}

/// Forgets the list once the VM runs here: its images are its own now.
pub(crate) fn keep_created(run_dir: &Path) {
    let _ = std::fs::remove_file(run_dir.join(CREATED_LIST));
}

/// Whether this host reads the source's marker through the same image path.
fn sees_marker(disk: &IncomingDisk, marker: &StorageMarker) -> Result<(), String> {
    let p = disk.path.parent().unwrap_or(Path::new("/")).join(&marker.file_name);
    match std::fs::read_to_string(&p) {
        Ok(t) if t == marker.token => {}
        Ok(_) => return Err(format!("the marker {} holds another token", p.display())),
        Err(e) => return Err(format!("the marker {} cannot be read here: {e}", p.display())),
    }
    match std::fs::metadata(&disk.path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err("it is not a regular file here".into()),
        Err(e) => Err(format!("it cannot be opened here: {e}")),
    }
}

/// Decides shared or copy for an incoming VM and, for a copy, creates its images in
/// `storage_dir` (an overlay on a local base with the same content when there is one).
/// `bases` are catalog images outside the storage directory (the guest root disk).
pub(crate) async fn plan(req: &IncomingRequest, storage_dir: &Path, bases: &[PathBuf], img: &QemuImg) -> Result<Plan, StorageError> {
    let vm = req.spec.name.clone();
    let mut plan = Plan { mode: None, spec: req.spec.clone(), syncs: vec![], created: vec![] };
    if req.disks.is_empty() {
        return Ok(plan);
    }
    let mut seen = match &req.marker {
        Some(m) => req.disks.iter().try_for_each(|d| sees_marker(d, m).map_err(|e| (d.path.clone(), e))),
        None => Err((req.disks[0].path.clone(), "the source wrote no marker".into())),
    };
    // The same file is not enough: QEMU opens its backing chain here too.
    if seen.is_ok() && req.storage != StorageMode::Copy {
        for d in &req.disks {
            if let Err(e) = img.chain_in_use(&d.path, Some(d.format)).await {
                seen = Err((d.path.clone(), format!("its backing chain cannot be opened here: {e}")));
                break;
            }
        }
    }
    let mode = match (req.storage, seen) {
        (StorageMode::Copy, _) => StorageMode::Copy,
        (_, Ok(())) => StorageMode::Shared,
        (StorageMode::Shared, Err((path, detail))) => return Err(StorageError::NotShared { vm, path, detail }),
        (StorageMode::Auto, Err(_)) => StorageMode::Copy,
    };
    plan.mode = Some(mode);
    if mode == StorageMode::Shared {
        return Ok(plan);
    }
    std::fs::create_dir_all(storage_dir).map_err(|source| StorageError::Io { what: "creating", path: storage_dir.into(), source })?;
    let nonce = &random_hex()[..8];
    for (i, d) in req.disks.iter().enumerate() {
        let target = storage_dir.join(format!("{COPY_PREFIX}{vm}-{}-{nonce}.{}", d.node_name, d.format));
        let base = match &d.backing {
            Some(b) if d.format == DiskFormat::Qcow2 => catalog_find(storage_dir, bases, &b.sha256).await.map(|p| (p, b.format)),
            _ => None,
        };
        let made = img.create(&target, d.format, Some(d.virtual_size), base.as_ref().map(|(p, f)| (p.as_path(), *f))).await;
        if let Err(e) = made {
            plan.remove_created();
            return Err(e.into());
        }
        plan.created.push(target.clone());
        plan.syncs.push(if base.is_some() { MirrorSync::Top } else { MirrorSync::Full });
        if let Some(disk) = plan.spec.disks.get_mut(i) {
            disk.path = Some(target);
            disk.format = Some(d.format);
        }
    }
    Ok(plan)
}

/// Serves the new images over NBD on `host` for the source's mirrors: one writable
/// export per disk, named after its node. With `tls`, the server takes TLS clients
/// alone, and of those only the one the armed authorization admits.
pub(crate) async fn export(qmp: &impl MigrationQmp, host: &str, plan: &Plan, tls: bool) -> Result<NbdTarget, StorageError> {
    let mut last = None;
    let mut port = 0;
    // The kernel picks a free port; QEMU then binds it (another process may win the
    // race in between: try again).
    for _ in 0..5 {
        port = std::net::TcpListener::bind((host, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0);
        let addr = json!({"type": "inet", "data": {"host": host, "port": port.to_string()}});
        match qmp_do(qmp, "nbd-server-start", super::tls::merge(json!({ "addr": addr }), super::tls::nbd_server_args(tls))).await {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        return Err(e);
    }
    let mut exports = vec![];
    for (i, sync) in plan.syncs.iter().enumerate() {
        let node = walkabout_api::DiskSpec::node_name(i);
        let args = json!({"type": "nbd", "id": format!("{node}-export"), "node-name": node, "name": node, "writable": true});
        if let Err(e) = qmp_do(qmp, "block-export-add", args).await {
            let _ = qmp.execute("nbd-server-stop", None).await;
            return Err(e);
        }
        exports.push(NbdExport { node_name: node.clone(), export: node, sync: *sync });
    }
    Ok(NbdTarget { host: host.into(), port, exports })
}

/// At the hand-over of a copied VM: once the incoming stream is complete, stops the
/// NBD server (so nothing writes to the images any more) and runs the guest. Does
/// nothing to a guest that runs already or a stream still loading.
pub(crate) async fn release_and_run(qmp: &impl MigrationQmp) -> Result<bool, QmpError> {
    if qmp.query_status().await?.running {
        return Ok(true);
    }
    let status = qmp.execute("query-migrate", None).await?;
    if status["status"] != "completed" {
        return Ok(false);
    }
    if let Err(e) = qmp.execute("nbd-server-stop", None).await {
        tracing::debug!(error = %e, "nbd-server-stop (no server)");
    }
    qmp.cont().await?;
    Ok(true)
}

/// At the agent's start: removes the images of copies that never completed (`copy-*`
/// files in the storage directory that no VM of this agent uses).
pub(crate) fn sweep(storage_dir: &Path, in_use: &BTreeSet<PathBuf>) {
    let Ok(dir) = std::fs::read_dir(storage_dir) else { return };
    let orphans: Vec<PathBuf> = dir
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(COPY_PREFIX)))
        .filter(|p| !in_use.contains(p))
        .collect();
    remove_files(&orphans);
}

/// Whether `path` is an image a copy made in `storage_dir` (the agent's own, removed
/// when its VM leaves by copy again).
pub(crate) fn is_copy_image(storage_dir: &Path, path: &Path) -> bool {
    path.parent() == Some(storage_dir) && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(COPY_PREFIX))
}

// ---- the image catalog: content hashes of the images in the storage directory ----

type HashKey = (PathBuf, u64, std::time::SystemTime);

fn hash_cache() -> &'static Mutex<BTreeMap<HashKey, String>> {
    static CACHE: std::sync::OnceLock<Mutex<BTreeMap<HashKey, String>>> = std::sync::OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// SHA-256 of a file's bytes (`sha256sum`), cached by path, size and mtime.
pub(crate) async fn content_hash(path: &Path) -> Result<String, StorageError> {
    let meta = std::fs::metadata(path).map_err(|source| StorageError::Io { what: "reading", path: path.into(), source })?;
    let key = (path.to_path_buf(), meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
    if let Some(h) = crate::vms::lock(hash_cache()).get(&key) {
        return Ok(h.clone());
    }
    let out = tokio::process::Command::new("sha256sum").arg(path).stdin(std::process::Stdio::null()).output().await;
    let out = out.map_err(|source| StorageError::Io { what: "hashing (sha256sum)", path: path.into(), source })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text.split_whitespace().next().filter(|h| h.len() == 64 && out.status.success()).map(String::from);
    let hash = hash.ok_or_else(|| StorageError::Io {
        what: "hashing (sha256sum)",
        path: path.into(),
        source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    })?;
    crate::vms::lock(hash_cache()).insert(key, hash.clone());
    Ok(hash)
}

/// A base image in the catalog (the catalog's bases, and the regular files of the
/// storage directory, copies and markers aside) with this content.
async fn catalog_find(storage_dir: &Path, bases: &[PathBuf], sha256: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir(storage_dir).into_iter().flatten();
    let candidates: Vec<PathBuf> = bases
        .iter()
        .cloned()
        .chain(dir.filter_map(|e| e.ok().map(|e| e.path())))
        .filter(|p| p.is_file())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with(COPY_PREFIX) && !n.starts_with('.')))
        .collect();
    for p in candidates {
        if content_hash(&p).await.ok().as_deref() == Some(sha256) {
            return Some(p);
        }
    }
    None
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("walkabout-storage-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }

    fn request(disk: &Path, storage: StorageMode, marker: Option<StorageMarker>) -> IncomingRequest {
        let spec: VmSpec =
            serde_json::from_value(json!({"name": "vm1", "memory_mib": 64, "disks": [{"path": disk, "format": "qcow2"}]})).expect("spec");
        let disks = vec![IncomingDisk {
            node_name: "disk0".into(),
            path: disk.into(),
            format: DiskFormat::Qcow2,
            virtual_size: 8 << 20,
            backing: None,
        }];
        IncomingRequest {
            spec,
            postcopy_ready: false,
            cpu_features: vec![],
            listen_host: "127.0.0.1".into(),
            postcopy_preempt: false,
            multifd_channels: 0,
            compression: walkabout_api::Compression::None,
            storage,
            disks,
            marker,
            lease_ms: None,
            relay: false,
        }
    }

    #[tokio::test]
    async fn shared_is_refused_when_the_marker_is_not_seen_and_auto_copies() {
        let d = scratch("refuse");
        let disk = d.join("a.qcow2");
        std::fs::write(&disk, b"x").expect("disk");
        let marker = StorageMarker { file_name: ".walkabout-marker-t".into(), token: "abc".into() };
        let img = QemuImg::default();

        let shared = plan(&request(&disk, StorageMode::Shared, Some(marker.clone())), &d.join("storage"), &[], &img).await;
        let auto = plan(&request(&disk, StorageMode::Auto, Some(marker)), &d.join("storage"), &[], &img).await.expect("auto");

        assert!(matches!(&shared, Err(StorageError::NotShared { detail, .. }) if detail.contains("cannot be read")), "{:?}", shared.err());
        assert_eq!((auto.mode, auto.syncs.as_slice()), (Some(StorageMode::Copy), &[MirrorSync::Full][..]));
        let target = auto.spec.disks[0].path.clone().expect("target");
        assert!(target.exists() && is_copy_image(&d.join("storage"), &target));
        auto.remove_created();
        assert!(!target.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn a_marker_read_back_means_shared_and_the_spec_is_kept() {
        let d = scratch("shared");
        let disk = d.join("a.qcow2");
        QemuImg::default().create(&disk, DiskFormat::Qcow2, Some(8 << 20), None).await.expect("disk");
        let marker = StorageMarker { file_name: ".walkabout-marker-t".into(), token: "abc".into() };
        std::fs::write(d.join(&marker.file_name), "abc").expect("marker");

        let p = plan(&request(&disk, StorageMode::Auto, Some(marker)), &d.join("storage"), &[], &QemuImg::default()).await.expect("plan");

        assert_eq!(p.mode, Some(StorageMode::Shared));
        assert_eq!(p.spec.disks[0].path.as_deref(), Some(disk.as_path()));
        assert!(p.created.is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn shared_is_refused_when_the_backing_file_is_missing_here() {
        let d = scratch("backing");
        let img = QemuImg::default();
        let (base, disk) = (d.join("base.qcow2"), d.join("top.qcow2"));
        img.create(&base, DiskFormat::Qcow2, Some(8 << 20), None).await.expect("base");
        img.create(&disk, DiskFormat::Qcow2, Some(8 << 20), Some((&base, DiskFormat::Qcow2))).await.expect("top");
        std::fs::remove_file(&base).expect("rm base");
        let marker = StorageMarker { file_name: ".walkabout-marker-t".into(), token: "abc".into() };
        std::fs::write(d.join(&marker.file_name), "abc").expect("marker");

        let shared = plan(&request(&disk, StorageMode::Shared, Some(marker)), &d.join("storage"), &[], &img).await;

        let _ = std::fs::remove_dir_all(&d);
        assert!(
            matches!(&shared, Err(StorageError::NotShared { detail, .. }) if detail.contains("backing chain") && detail.contains("base.qcow2")),
            "{:?}",
            shared.err()
        );
    }

    #[tokio::test]
    async fn an_overlay_whose_base_is_here_is_rebuilt_on_it_and_copies_the_top() {
        let d = scratch("overlay");
        let storage = d.join("storage");
        std::fs::create_dir_all(&storage).expect("dir");
        let img = QemuImg::default();
        let base = storage.join("base.qcow2");
        img.create(&base, DiskFormat::Qcow2, Some(8 << 20), None).await.expect("base");
        let mut req = request(&d.join("top.qcow2"), StorageMode::Copy, None);
        req.disks[0].backing = Some(BackingImage { sha256: content_hash(&base).await.expect("hash"), format: DiskFormat::Qcow2 });

        let p = plan(&req, &storage, &[], &img).await.expect("plan");

        assert_eq!(p.syncs, [MirrorSync::Top]);
        let chain = img.chain(p.spec.disks[0].path.as_deref().expect("path"), None).await.expect("chain");
        assert_eq!(chain.get(1).map(|l| l.path.clone()), Some(base.clone()));
        sweep(&storage, &BTreeSet::new());
        assert!(!p.created[0].exists() && base.exists(), "the sweep removes copies only");
        let _ = std::fs::remove_dir_all(&d);
    }
}
