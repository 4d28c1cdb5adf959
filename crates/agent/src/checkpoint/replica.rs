//! The replica side: checkpoints of other hosts' VMs, received file by file (each
//! verified by its SHA-256 on arrival), committed by manifest, kept at most `keep` deep,
//! and restored from the newest one that still verifies.
//!
//! Files live in `<data dir>/replicas/<vm>/` under the names the primary gave them, so
//! the qcow2 layers' relative backing names form the same chains here. Trimming to
//! `keep` merges the oldest checkpoint's disk layer into the next one's
//! (`qemu-img commit`, then the merged file takes the next layer's name), so a disk's
//! chain here is never deeper than `keep` files.

use super::{describe, file_in, files, io_err, verify};
use crate::error::AgentError;
use crate::vms::Agent;
use std::path::{Path, PathBuf};
use std::time::Instant;
use walkabout_api::{
    AgentClient, Checkpoint, CheckpointFile, ClientOptions, CommitCheckpoint, Encoding, FileKind, FileUpload, ForwardReplica, ReplicaState,
    RestoreReply, RestoreRequest,
};

/// Largest file a replica accepts (memory images and disk layers).
pub const MAX_FILE: u64 = 256 << 30;

impl Agent {
    /// Where this agent keeps the replica of `vm`.
    pub(crate) fn replica_dir(&self, vm: &str) -> PathBuf {
        self.inner.config.data_dir.join("replicas").join(vm)
    }

    fn check_vm_name(vm: &str) -> Result<(), AgentError> {
        file_in(Path::new("/"), vm).map(|_| ())
    }

    /// What this agent holds of `vm`.
    pub fn replica(&self, vm: &str) -> Result<ReplicaState, AgentError> {
        self.inner.store.replica(vm)?.ok_or_else(|| AgentError::ReplicaNotFound { vm: vm.into() })
    }

    /// Every replica this agent holds.
    pub fn replicas(&self) -> Result<Vec<ReplicaState>, AgentError> {
        Ok(self.inner.store.list_replicas()?)
    }

    /// Forgets a replica and removes its files.
    pub async fn delete_replica(&self, vm: &str) -> Result<(), AgentError> {
        let _g = self.inner.replica_lock.lock().await;
        self.replica(vm)?;
        let dir = self.replica_dir(vm);
        if let Some(user) = self.vm_backed_by(&dir).await {
            return Err(AgentError::InvalidRequest {
                reason: format!("the replica of {vm} holds the disk layers VM `{user}` of this agent runs on; delete that VM first"),
            });
        }
        self.inner.store.delete_replica(vm)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// A VM of this agent restored from files in `dir`, if any (its reason says so).
    async fn vm_backed_by(&self, dir: &Path) -> Option<String> {
        let prefix = self.storage_dir();
        for info in self.list().await {
            let Some(reason) = &info.record.reason else { continue };
            if !reason.starts_with("restored from checkpoint") {
                continue;
            }
            for d in info.record.spec.disks.iter().filter_map(|d| d.path.as_ref()) {
                if d.starts_with(&prefix) && chain_mentions(&self.qemu_img_bin(), d, dir).await {
                    return Some(info.record.spec.name.clone());
                }
            }
        }
        None
    }

    /// Receives one file of `vm` (the body as `upload.encoding` says), verifies its
    /// SHA-256 and adds it to the replica's files; a mismatch removes it (422).
    pub async fn receive_file(
        &self,
        vm: &str,
        name: &str,
        upload: FileUpload,
        body: impl futures_util::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin,
    ) -> Result<CheckpointFile, AgentError> {
        use futures_util::StreamExt;
        use std::io::Write;
        Self::check_vm_name(vm)?;
        let dir = self.replica_dir(vm);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let target = file_in(&dir, name)?;
        if name.ends_with(".part") || name.ends_with(".upload") {
            return Err(AgentError::InvalidRequest { reason: format!("{name:?} is not a checkpoint file name") });
        }
        let raw = dir.join(format!("{name}.upload"));
        let part = dir.join(format!("{name}.part"));
        let cleanup = || {
            let _ = std::fs::remove_file(&raw);
            let _ = std::fs::remove_file(&part);
        };
        // The body first, as it comes (bounded by the trust guard's limit for this route).
        let mut f = std::fs::File::create(&raw).map_err(io_err(&raw))?;
        let mut body = body;
        let mut got = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    cleanup();
                    return Err(AgentError::InvalidRequest { reason: format!("the body of file {name} of {vm} broke off: {e}") });
                }
            };
            got += chunk.len() as u64;
            if got > MAX_FILE {
                cleanup();
                return Err(AgentError::InvalidRequest { reason: format!("file {name} of {vm} is larger than {MAX_FILE} bytes") });
            }
            if let Err(e) = f.write_all(&chunk) {
                cleanup();
                return Err(io_err(&raw)(e));
            }
        }
        drop(f);
        let decoded = match upload.encoding {
            Encoding::Whole => std::fs::rename(&raw, &part).map_err(io_err(&part)),
            Encoding::Extents => files::heavy(|| decode(&dir, &raw, &part, upload.base.as_deref(), vm, name)),
        };
        if let Err(e) = decoded {
            cleanup();
            return Err(e);
        }
        let _ = std::fs::remove_file(&raw);
        let (sha, len) = match files::sha256(&part) {
            Ok(v) => v,
            Err(e) => {
                cleanup();
                return Err(io_err(&part)(e));
            }
        };
        if sha != upload.sha256 {
            cleanup();
            return Err(AgentError::FileMismatch {
                vm: vm.into(),
                file: name.into(),
                reason: format!("arrived with sha256 {sha} over {len} bytes, the sender says {}; removed", upload.sha256),
            });
        }
        std::fs::rename(&part, &target).map_err(io_err(&target))?;
        let kind = if name.ends_with(".mem") { FileKind::Memory } else { FileKind::Layer };
        let disk = (kind != FileKind::Memory).then(|| name.trim_end_matches(".qcow2").rsplit('.').next().unwrap_or("").to_string());
        // Hashed once above: described without reading it again.
        let data_bytes = files::data_bytes(&target).map_err(io_err(&target))?;
        let file = CheckpointFile { name: name.into(), kind, disk, backing: None, bytes: len, data_bytes, sha256: sha };
        let _g = self.inner.replica_lock.lock().await;
        let mut state = self.inner.store.replica(vm)?.unwrap_or_else(|| ReplicaState { vm: vm.into(), ..Default::default() });
        state.files.retain(|f| f.name != name);
        state.files.push(file.clone());
        self.inner.store.put_replica(&state)?;
        tracing::debug!(vm, file = name, bytes = got, "replica file received");
        Ok(file)
    }

    /// Commits a checkpoint whose files are all held and verified, then merges older
    /// ones away until at most `keep` remain (0: keep all).
    pub async fn commit_replica(&self, vm: &str, req: CommitCheckpoint) -> Result<ReplicaState, AgentError> {
        Self::check_vm_name(vm)?;
        let _g = self.inner.replica_lock.lock().await;
        let mut state = self.replica(vm)?;
        let mut ck = req.checkpoint;
        if ck.vm != vm {
            return Err(AgentError::InvalidRequest { reason: format!("checkpoint {} is of VM {}, not {vm}", ck.id, ck.vm) });
        }
        for f in &ck.files {
            match state.files.iter().find(|h| h.name == f.name) {
                Some(h) if h.sha256 == f.sha256 => {}
                Some(h) => {
                    return Err(AgentError::FileMismatch {
                        vm: vm.into(),
                        file: f.name.clone(),
                        reason: format!("held with sha256 {}, checkpoint {} says {}", h.sha256, ck.id, f.sha256),
                    })
                }
                None => {
                    return Err(AgentError::InvalidRequest {
                        reason: format!("checkpoint {} needs file {} which this replica lacks", ck.id, f.name),
                    })
                }
            }
        }
        // The manifest's descriptions (kind, disk, backing) are authoritative.
        for f in &ck.files {
            if let Some(h) = state.files.iter_mut().find(|h| h.name == f.name) {
                *h = f.clone();
            }
        }
        ck.verified = true;
        ck.problem = None;
        ck.shipped_bytes = None;
        state.checkpoints.retain(|c| c.id != ck.id);
        state.checkpoints.push(ck);
        state.checkpoints.sort_by_key(|c| c.n);
        let dir = self.replica_dir(vm);
        while req.keep > 0 && state.checkpoints.len() > req.keep as usize {
            self.merge_oldest(&dir, &mut state).await?;
        }
        self.inner.store.put_replica(&state)?;
        Ok(state)
    }

    /// Drops the oldest checkpoint: its memory file goes, its disk layers are merged
    /// into the next checkpoint's, which becomes the chain's base.
    async fn merge_oldest(&self, dir: &Path, state: &mut ReplicaState) -> Result<(), AgentError> {
        let old = state.checkpoints.remove(0);
        let Some(next) = state.checkpoints.first_mut() else { return Ok(()) };
        let vm = old.vm.clone();
        let fail = |reason: String| AgentError::Checkpoint { vm: vm.clone(), reason };
        let img = self.qemu_img_bin();
        for (i, d) in next.spec.disks.iter().enumerate() {
            let Some(top) = d.path.as_ref().map(|p| p.to_string_lossy().into_owned()) else { continue };
            let disk = walkabout_api::DiskSpec::node_name(i);
            let top_path = file_in(dir, &top)?;
            // Everything below `top` held here, bottom last.
            let mut below = vec![];
            let mut cur = top_path.clone();
            while let Some(b) = super::backing_name(&img, &cur).await.filter(|b| !b.contains('/')) {
                cur = file_in(dir, &b)?;
                below.push(cur.clone());
            }
            if below.is_empty() {
                continue;
            }
            // Commit top, then each layer, down into the bottom one.
            let mut layer = top_path.clone();
            for b in &below {
                let out = tokio::process::Command::new(&img)
                    .args(["commit", "-q", "-d"])
                    .arg(&layer)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await
                    .map_err(|e| fail(format!("running {img} commit: {e}")))?;
                if !out.status.success() {
                    return Err(fail(format!(
                        "merging {} into {}: {}",
                        layer.display(),
                        b.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                layer = b.clone();
            }
            let bottom = below.last().cloned().unwrap_or_else(|| top_path.clone());
            std::fs::rename(&bottom, &top_path).map_err(io_err(&top_path))?;
            for b in &below {
                let _ = std::fs::remove_file(b);
            }
            let merged = describe(&top_path, &top, FileKind::Base, Some(disk.clone()), None)?;
            let gone: Vec<String> = below.iter().filter_map(|b| b.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
            next.files.retain(|f| !gone.contains(&f.name) && f.name != top);
            next.files.push(merged.clone());
            state.files.retain(|f| !gone.contains(&f.name) && f.name != top);
            state.files.push(merged);
        }
        for f in old.files.iter().filter(|f| f.kind == FileKind::Memory) {
            let _ = std::fs::remove_file(dir.join(&f.name));
            state.files.retain(|h| h.name != f.name);
        }
        next.parent = None;
        tracing::info!(vm = %old.vm, dropped = %old.id, base = %next.id, "replica merged its oldest checkpoint away");
        Ok(())
    }

    /// The newest checkpoint of `vm` held here whose files, and the disk layers of the
    /// older checkpoints it stands on, verify now: that checkpoint with all those files
    /// (each once), and each newer one passed over with why. The caller holds the
    /// replica lock.
    fn newest_verified(&self, vm: &str, state: &ReplicaState) -> (Option<Checkpoint>, Vec<String>) {
        let dir = self.replica_dir(vm);
        let mut skipped = vec![];
        for (k, ck) in state.checkpoints.iter().enumerate().rev() {
            let mut files: Vec<CheckpointFile> = vec![];
            let older = state.checkpoints[..k].iter().flat_map(|c| c.files.iter().filter(|f| f.kind != FileKind::Memory));
            for f in older.chain(ck.files.iter()) {
                files.retain(|h| h.name != f.name);
                files.push(f.clone());
            }
            let chain = Checkpoint { files, ..ck.clone() };
            match verify(&dir, &chain) {
                Ok(()) => return (Some(chain), skipped),
                Err(why) => {
                    tracing::warn!(vm, checkpoint = %ck.id, reason = %why, "replica checkpoint skipped");
                    skipped.push(format!("{}: {why}", ck.id));
                }
            }
        }
        (None, skipped)
    }

    /// Sends `vm`'s newest checkpoint that verifies here (its files and the disk layers
    /// below them, as a restore here would use) to the agent at `req.to_url`, the way a
    /// primary ships one: only the files that agent lacks, each verified there on
    /// arrival, then committed there keeping `req.keep`. Returns the checkpoint as
    /// forwarded, `shipped_bytes` what was sent.
    pub async fn forward_replica(&self, vm: &str, req: ForwardReplica) -> Result<Checkpoint, AgentError> {
        Self::check_vm_name(vm)?;
        let to = req.to_url.trim().to_string();
        if self.is_own_url(&to) {
            return Err(AgentError::InvalidRequest { reason: format!("cannot forward the replica of {vm} to this agent itself ({to})") });
        }
        // Chosen and verified under the lock; sent without it (a file merged meanwhile
        // fails its checksum on arrival, so nothing wrong is committed there).
        let ck = {
            let _g = self.inner.replica_lock.lock().await;
            let state = self.replica(vm)?;
            let (ck, skipped) = files::heavy(|| self.newest_verified(vm, &state));
            ck.ok_or_else(|| AgentError::NoUsableCheckpoint {
                vm: vm.into(),
                why: if skipped.is_empty() { "it holds no committed checkpoint".into() } else { skipped.join("; ") },
            })?
        };
        let fail = |reason: String| AgentError::Ship { id: ck.id.clone(), to: to.clone(), reason };
        let opts =
            ClientOptions { connect_timeout: std::time::Duration::from_secs(5), request_timeout: std::time::Duration::from_secs(300) };
        let client = AgentClient::new(&to, opts).map_err(|e| fail(e.to_string()))?;
        let held = match client.replica(vm).await {
            Ok(r) => r,
            Err(e) if e.status() == Some(404) => ReplicaState { vm: vm.into(), ..Default::default() },
            Err(e) => return Err(fail(e.to_string())),
        };
        let dir = self.replica_dir(vm);
        let mut sent = 0u64;
        for f in &ck.files {
            if held.files.iter().any(|h| h.name == f.name && h.sha256 == f.sha256) {
                continue;
            }
            let path = file_in(&dir, &f.name)?;
            let body = files::encode_extents(&path).map_err(|e| fail(format!("reading {}: {e}", path.display())))?;
            sent += body.len() as u64;
            let upload = FileUpload { sha256: f.sha256.clone(), encoding: Encoding::Extents, base: None };
            client.put_replica_file(vm, &f.name, &upload, body).await.map_err(|e| fail(format!("file {}: {e}", f.name)))?;
        }
        client.commit_replica(vm, &CommitCheckpoint { checkpoint: ck.clone(), keep: req.keep }).await.map_err(|e| fail(e.to_string()))?;
        tracing::info!(vm, id = %ck.id, to = %to, bytes = sent, "replica checkpoint forwarded");
        Ok(Checkpoint { shipped_bytes: Some(sent), ..ck })
    }

    /// Restores `vm` from the newest checkpoint whose files (and the layers below them)
    /// still verify; each newer one passed over is listed with why.
    pub async fn restore_replica(&self, vm: &str, req: RestoreRequest) -> Result<RestoreReply, AgentError> {
        let started = Instant::now();
        let _g = self.inner.replica_lock.lock().await;
        let state = self.replica(vm)?;
        let dir = self.replica_dir(vm);
        let mut skipped = vec![];
        for (k, ck) in state.checkpoints.iter().enumerate().rev() {
            // Its own files and every disk layer of the older checkpoints it stands on.
            let chain = Checkpoint {
                files: state.checkpoints[..k]
                    .iter()
                    .flat_map(|c| c.files.iter().filter(|f| f.kind != FileKind::Memory).cloned())
                    .chain(ck.files.iter().cloned())
                    .collect(),
                ..ck.clone()
            };
            if let Err(why) = verify(&dir, &chain) {
                tracing::warn!(vm, checkpoint = %ck.id, reason = %why, "replica checkpoint skipped");
                skipped.push(format!("{}: {why}", ck.id));
                continue;
            }
            match self.restore_from(ck, &dir, req.name.clone()).await {
                Ok(info) => {
                    let restore_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    return Ok(RestoreReply { vm: info, checkpoint: ck.clone(), skipped, restore_ms });
                }
                Err(e @ (AgentError::Duplicate { .. } | AgentError::InsufficientMemory { .. } | AgentError::InvalidSpec { .. })) => {
                    return Err(e)
                }
                Err(e) => skipped.push(format!("{}: {e}", ck.id)),
            }
        }
        Err(AgentError::NoUsableCheckpoint {
            vm: vm.into(),
            why: if skipped.is_empty() { "it holds no committed checkpoint".into() } else { skipped.join("; ") },
        })
    }
}

/// Decodes an extents body (`raw`) into `part`, starting from a copy of `base` for a delta.
fn decode(dir: &Path, raw: &Path, part: &Path, base: Option<&str>, vm: &str, name: &str) -> Result<(), AgentError> {
    match base {
        Some(b) => {
            let b = file_in(dir, b)?;
            if !b.exists() {
                return Err(AgentError::InvalidRequest {
                    reason: format!("file {name} of {vm} is a delta against {}, which this replica lacks", b.display()),
                });
            }
            files::copy_sparse(&b, part).map_err(io_err(part))?;
        }
        None => {
            std::fs::File::create(part).map_err(io_err(part))?;
        }
    }
    let out = std::fs::OpenOptions::new().write(true).open(part).map_err(io_err(part))?;
    let mut body = std::io::BufReader::new(std::fs::File::open(raw).map_err(io_err(raw))?);
    files::apply_frames(&out, &mut body).map_err(|e| AgentError::FileMismatch {
        vm: vm.into(),
        file: name.into(),
        reason: format!("its body does not decode: {e}"),
    })?;
    Ok(())
}

/// Whether the backing chain of `img` has a file in `dir`.
async fn chain_mentions(qemu_img: &str, img: &Path, dir: &Path) -> bool {
    let out = tokio::process::Command::new(qemu_img)
        .args(["info", "--backing-chain", "--output=json", "-U"])
        .arg(img)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let Ok(out) = out else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains(&*dir.to_string_lossy())
}
