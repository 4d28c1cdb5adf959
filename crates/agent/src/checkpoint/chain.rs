//! The primary's disk chains kept at most `keep` layers deep. Each checkpoint puts one
//! overlay on top of every disk of the running VM; without trimming, a VM checkpointed
//! every few seconds would run on a chain one layer deeper per checkpoint, forever.
//!
//! Once checkpoint `n` is on the replica, the running VM needs of each disk's chain only
//! the active overlay, the newest `keep - 1` layers (the replica holds `n`'s by name: the
//! next checkpoint's layer is backed by it) and the base. The layers between them are
//! merged into the base, live, by QEMU's `block-commit` of an intermediate node (never
//! the active one): explicit `top-node` (the highest layer to merge) and `base-node`,
//! the base's relative name written into the header of the layer above `top`, the job
//! waited for to `concluded` and dismissed. Only then, with the merged nodes gone from
//! QEMU's graph, are their files deleted, and the records describe the files as they now
//! are.
//!
//! ```text
//!  keep 2, before:  a<n> -> n -> n-1 -> ... -> 2 -> base (-> catalog image)
//!  block-commit     top-node = n-1's node, base-node = base's node, backing-file = base
//!  after:           a<n> -> n -> base
//! ```
//!
//! Why QEMU 10 died on the first try (branch `partition-chain-wip`): at the job's end
//! QEMU rewrites the backing name in the header of the layer above `top`, and to do so it
//! reopens that node read-write, which for a `file` node means opening its file again
//! *by the path it was opened with*. That path is the layer's active-overlay name
//! (`<vm>.a<m>.<disk>.qcow2`), unlinked once the next checkpoint hard-linked the file
//! under its checkpoint name; the open failed ("Could not open ...: No such file or
//! directory") and QEMU 10.0.2 then crashed (SIGSEGV) in that error path. So before a
//! commit, each node QEMU reopens (the layer above `top`, and the base) must be reachable
//! again by its QEMU path: if the path is gone, it is hard-linked back from the
//! checkpoint's name, but only after checking that QEMU holds that very file open (its
//! `/proc/<pid>/fd` entry, same device and inode); the link is removed after the job.
//! A chain QEMU runs that does not match the records is left alone, and so is every
//! layer from the first one (from the top) that is also another file's name: a
//! replica's or another VM's layer that a restore or a shared-storage hop linked into
//! the store is never written; the merge then stops above it.
//!
//! Why into the base and not `block-stream` into `n`: committing down moves one layer per
//! round; streaming up would copy everything written since the base every round, and
//! would reopen `n` in the same way. The base and the layer above `top` change (their
//! checksums are recorded again); older checkpoints have lost their memory files already
//! (see `protect.rs`), so nothing restorable is lost.

use crate::checkpoint::{describe, qmp_do};
use crate::error::AgentError;
use crate::vms::Agent;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use walkabout_api::{Checkpoint, CheckpointFile};
use walkabout_qemu::Qmp;

/// Longest a merge of layers may take.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(300);

/// One level of a disk's chain as QEMU runs it (from the active layer down).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Level {
    /// The file QEMU opened this layer from (its `file` child's path).
    path: PathBuf,
    /// The backing name this layer's header gives.
    backing: Option<String>,
    /// Its format node, when QEMU lists it.
    node: Option<String>,
}

/// The file a node's `filename` names: the path itself, or for QEMU's `json:{...}`
/// pseudo-names (a layer whose graph differs from its header) its `file.filename`.
fn own_path(filename: &str) -> Option<PathBuf> {
    match filename.strip_prefix("json:") {
        Some(j) => serde_json::from_str::<Value>(j).ok()?["file"]["filename"].as_str().map(PathBuf::from),
        None => Some(PathBuf::from(filename)),
    }
}

/// One disk's chain as QEMU runs it, from `query-block` (the levels) and
/// `query-named-block-nodes` (their format nodes, matched by file).
fn running_chain(blocks: &Value, nodes: &Value, disk: &str) -> Vec<Level> {
    let dev = format!("{disk}-dev");
    let Some(block) = blocks.as_array().and_then(|l| l.iter().find(|b| b["qdev"].as_str().is_some_and(|q| q.split('/').any(|p| p == dev))))
    else {
        return vec![];
    };
    let formats: Vec<(PathBuf, String)> = nodes
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|n| n["drv"].as_str().is_some_and(|d| d != "file" && d != "host_device"))
                .filter_map(|n| Some((own_path(n["file"].as_str()?)?, n["node-name"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let mut out = vec![];
    let mut image = &block["inserted"]["image"];
    while let Some(path) = image["filename"].as_str().and_then(own_path) {
        let mut owners = formats.iter().filter(|(p, _)| *p == path);
        let node = match (owners.next(), owners.next()) {
            (Some((_, n)), None) => Some(n.clone()),
            _ => None,
        };
        out.push(Level { path, backing: image["backing-filename"].as_str().map(String::from), node });
        image = &image["backing-image"];
    }
    out
}

/// The layer names of one disk's chain in the records, from `top` down to the lowest
/// one a record holds.
fn record_chain(top: &str, files: &BTreeMap<String, CheckpointFile>) -> Vec<String> {
    let mut chain = vec![top.to_string()];
    while let Some(below) = chain.last().and_then(|l| files.get(l)).and_then(|f| f.backing.clone()) {
        if !files.contains_key(&below) || chain.contains(&below) {
            break;
        }
        chain.push(below);
    }
    chain
}

/// What one disk's trim does, in levels of the running chain (0 = the active overlay).
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// The highest layer merged away (`top-node`).
    top: usize,
    /// The layer above it, whose header is rewritten (QEMU reopens it read-write).
    above: usize,
    /// The base merged into (`base-node`; QEMU reopens it read-write).
    base: usize,
    /// Its record name, written into `above`'s header.
    base_name: String,
    /// Record name of the layer at `above`.
    above_name: String,
    /// Record names of the layers merged away.
    merged: Vec<String>,
}

/// The trim of one disk whose records chain is `chain` (checkpoint `n`'s layer first,
/// the base last) and whose running chain is `running`, keeping `keep` layers (at least
/// 2: `n`'s and the base). `None` when nothing is to merge or the two chains disagree.
fn plan(chain: &[String], running: &[Level], keep: usize) -> Option<Plan> {
    let keep = keep.max(2);
    let m = chain.len().checked_sub(1)?;
    if chain.len() <= keep || running.len() <= chain.len() {
        return None;
    }
    // Level j's header names the layer of level j + 1, which is chain[j].
    if !chain.iter().enumerate().all(|(j, name)| running[j].backing.as_deref() == Some(name.as_str())) {
        return None;
    }
    Some(Plan {
        top: keep,
        above: keep - 1,
        base: m + 1,
        base_name: chain[m].clone(),
        above_name: chain[keep - 2].clone(),
        merged: chain[keep - 1..m].to_vec(),
    })
}

/// Makes QEMU's path of a node it will reopen lead to the layer again. Returns whether a
/// link was made (to remove after the job). Refuses unless the path is, or QEMU holds
/// open (process `pid`), the very file `record` is.
fn reachable(qemu_path: &Path, record: &Path, pid: i32) -> Result<bool, String> {
    let id = |m: std::fs::Metadata| (m.dev(), m.ino());
    let want = std::fs::metadata(record).map(id).map_err(|e| format!("layer {}: {e}", record.display()))?;
    if let Ok(m) = std::fs::metadata(qemu_path) {
        return if id(m) == want {
            Ok(false)
        } else {
            Err(format!("{} is not the file of layer {}", qemu_path.display(), record.display()))
        };
    }
    let deleted = format!("{} (deleted)", qemu_path.display());
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| format!("QEMU's open files (pid {pid}): {e}"))?;
    let held = fds.filter_map(Result::ok).any(|fd| {
        let named = std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == deleted.as_str());
        named && std::fs::metadata(fd.path()).is_ok_and(|m| id(m) == want)
    });
    if !held {
        return Err(format!("QEMU does not hold layer {} open as {}", record.display(), qemu_path.display()));
    }
    std::fs::hard_link(record, qemu_path).map_err(|e| format!("cannot link {} back as {}: {e}", record.display(), qemu_path.display()))?;
    Ok(true)
}

/// Whether layer file `path` belongs to this VM alone: its only name, or its second is
/// the image the agent made for the disk (`own`, the first checkpoint's base).
fn private(path: &Path, own: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(m) => m.nlink() == 1 || (m.nlink() == 2 && super::same_file(path, own)),
        Err(_) => false,
    }
}

/// Runs `block-commit` as job `job`, waits for it to conclude and dismisses it; QEMU's
/// error if it failed.
async fn commit(qmp: &Qmp, job: &str, args: Value) -> Result<(), String> {
    qmp_do(qmp, "block-commit", Some(args)).await?;
    let deadline = Instant::now() + COMMIT_TIMEOUT;
    loop {
        let jobs = qmp_do(qmp, "query-jobs", None).await?;
        let me = jobs.as_array().and_then(|l| l.iter().find(|j| j["id"].as_str() == Some(job)).cloned());
        match me {
            Some(j) if j["status"].as_str() == Some("concluded") => {
                qmp_do(qmp, "job-dismiss", Some(json!({"id": job}))).await?;
                return match j["error"].as_str() {
                    Some(e) => Err(format!("QEMU's merge {job} failed: {e}")),
                    None => Ok(()),
                };
            }
            Some(_) => {}
            None => return Err(format!("QEMU's merge {job} vanished before it concluded")),
        }
        if Instant::now() > deadline {
            let _ = qmp_do(qmp, "job-cancel", Some(json!({"id": job}))).await;
            return Err(format!("QEMU's merge {job} did not end within {} s (cancelled)", COMMIT_TIMEOUT.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One disk's trim carried out: links made reachable, the commit, the links removed,
/// and the running chain checked to no longer hold the merged layers.
async fn trim_disk(qmp: &Qmp, device: &str, dir: &Path, running: &[Level], p: &Plan, pid: i32, job: &str) -> Result<(), String> {
    let (Some(top), Some(base)) = (running[p.top].node.clone(), running[p.base].node.clone()) else {
        return Err(format!("{job}: QEMU lists no single node for the layers to merge"));
    };
    let mut linked = vec![];
    let mut made = Ok(());
    for (level, name) in [(p.above, &p.above_name), (p.base, &p.base_name)] {
        match reachable(&running[level].path, &dir.join(name), pid) {
            Ok(true) => linked.push(running[level].path.clone()),
            Ok(false) => {}
            Err(e) => {
                made = Err(e);
                break;
            }
        }
    }
    let r = match made {
        Ok(()) => {
            let args = json!({"job-id": job, "device": device, "top-node": top, "base-node": base,
                "backing-file": p.base_name, "auto-dismiss": false});
            commit(qmp, job, args).await
        }
        Err(e) => Err(e),
    };
    for l in &linked {
        let _ = std::fs::remove_file(l);
    }
    r
}

impl Agent {
    /// Merges, on the running VM `name`, the disk layers older than the newest `keep - 1`
    /// under checkpoint `ck`'s (shipped) into the base, deletes their files once QEMU's
    /// graph no longer holds them and records the checkpoints as they now are. Returns
    /// the number of layer files merged away. A disk whose running chain does not match
    /// the records is left as it is.
    pub(crate) async fn trim_chain(&self, name: &str, ck: &Checkpoint, keep: u32) -> Result<usize, AgentError> {
        let fail = |reason: String| AgentError::Checkpoint { vm: name.to_string(), reason };
        let vm = self.vm(name)?;
        let vm = vm.lock().await;
        let (Some(qmp), Some(pid)) = (vm.qmp.clone().filter(|_| vm.record.state.is_active()), vm.record.pid) else {
            return Ok(0);
        };
        let dir = self.checkpoint_dir(name);
        let storage = self.storage_dir();
        let files: BTreeMap<String, CheckpointFile> =
            self.local_checkpoints(name)?.iter().flat_map(|c| c.files.iter().map(|f| (f.name.clone(), f.clone()))).collect();
        let disks: Vec<String> = (0..vm.record.spec.disks.len()).map(walkabout_api::DiskSpec::node_name).collect();
        let (mut removed, mut rebased, mut bases) = (BTreeSet::new(), BTreeMap::new(), BTreeSet::new());
        for (i, disk) in disks.iter().enumerate() {
            let Some(layer) = ck.spec.disks.get(i).and_then(|d| d.path.as_ref()).map(|p| p.to_string_lossy().into_owned()) else {
                continue;
            };
            // Merged into, or rewritten, only layers of this VM alone: below the first one
            // that is also another file's name (a replica's or another VM's layer a
            // restore or a shared-storage hop linked in), nothing is touched.
            let own = crate::disks::owned_path(&storage, name, i);
            let mut chain = record_chain(&layer, &files);
            chain.truncate(chain.iter().position(|l| !private(&dir.join(l), &own)).unwrap_or(chain.len()));
            let blocks = qmp_do(&qmp, "query-block", None).await.map_err(fail)?;
            let nodes = qmp_do(&qmp, "query-named-block-nodes", Some(json!({"flat": true}))).await.map_err(fail)?;
            let running = running_chain(&blocks, &nodes, disk);
            let Some(p) = plan(&chain, &running, keep as usize) else {
                if chain.len() > (keep as usize).max(2) {
                    tracing::warn!(vm = name, disk, ?chain, ?running, "the running chain does not match the checkpoints; not merged");
                }
                continue;
            };
            let Some(device) = running[0].node.clone() else { continue };
            let job = format!("trim-{disk}-{}", ck.n);
            trim_disk(&qmp, &device, &dir, &running, &p, pid, &job).await.map_err(fail)?;
            // Deleted only once QEMU's chain no longer names them.
            let blocks = qmp_do(&qmp, "query-block", None).await.map_err(fail)?;
            let after = running_chain(&blocks, &nodes, disk);
            let still: Vec<&String> = p.merged.iter().filter(|m| after.iter().any(|l| l.backing.as_deref() == Some(m.as_str()))).collect();
            if !still.is_empty() {
                return Err(fail(format!("disk {disk}: QEMU's chain still names {still:?} after the merge")));
            }
            for merged in &p.merged {
                let _ = std::fs::remove_file(dir.join(merged));
                removed.insert(merged.clone());
            }
            rebased.insert(p.above_name.clone(), p.base_name.clone());
            bases.insert(p.base_name.clone());
            tracing::info!(
                vm = name,
                disk,
                merged = p.merged.len(),
                depth = after.len(),
                "disk chain trimmed: {} now on {}",
                p.above_name,
                p.base_name
            );
        }
        drop(vm);
        if removed.is_empty() {
            return Ok(0);
        }
        for mut c in self.local_checkpoints(name)? {
            let before = c.files.clone();
            c.files.retain(|f| !removed.contains(&f.name));
            for f in c.files.iter_mut().filter(|f| rebased.contains_key(&f.name) || bases.contains(&f.name)) {
                let backing = rebased.get(&f.name).cloned().or_else(|| f.backing.clone());
                *f = describe(&dir.join(&f.name), &f.name, f.kind, f.disk.clone(), backing)?;
            }
            if !c.files.iter().any(|f| dir.join(&f.name).exists()) {
                self.inner.store.delete_checkpoint(&c.id)?;
            } else if c.files != before {
                self.inner.store.put_checkpoint(&c)?;
            }
        }
        Ok(removed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walkabout_api::FileKind;

    fn file(name: &str, backing: Option<&str>) -> (String, CheckpointFile) {
        let kind = if backing.is_some() { FileKind::Layer } else { FileKind::Base };
        let f = CheckpointFile {
            name: name.into(),
            kind,
            disk: Some("disk0".into()),
            backing: backing.map(String::from),
            bytes: 0,
            data_bytes: 0,
            sha256: String::new(),
        };
        (name.into(), f)
    }

    fn level(path: &str, backing: Option<&str>) -> Level {
        Level { path: path.into(), backing: backing.map(String::from), node: Some(format!("n-{path}")) }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_records_chain_runs_from_the_layer_down_to_the_base() {
        let files: BTreeMap<_, _> = [file("v.4.d", Some("v.3.d")), file("v.3.d", Some("v.1.d")), file("v.1.d", None)].into();

        assert_eq!(record_chain("v.4.d", &files), vec!["v.4.d", "v.3.d", "v.1.d"]);
    }

    #[test]
    fn a_chain_stops_at_a_layer_no_record_holds() {
        let files: BTreeMap<_, _> = [file("v.4.d", Some("v.3.d"))].into();

        assert_eq!(record_chain("v.4.d", &files), vec!["v.4.d"]);
    }

    #[test]
    fn qemus_chain_is_read_from_the_device_down_through_json_pseudo_names() {
        let mid = r#"json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/s/v.1.d"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "/s/v.a3.d"}}"#;
        let blocks = json!([{"qdev": "/machine/peripheral/disk0-dev/virtio-backend", "inserted": {"node-name": "disk0-c4",
            "image": {"filename": "/s/v.a4.d", "backing-filename": "v.4.d",
                "backing-image": {"filename": mid, "backing-filename": "v.1.d", "backing-image": {"filename": "/s/v.1.d"}}}}}]);
        let nodes = json!([{"node-name": "disk0-c3-file", "drv": "file", "file": "/s/v.a3.d"},
            {"node-name": "disk0-c3", "drv": "qcow2", "file": mid},
            {"node-name": "disk0-c4", "drv": "qcow2", "file": "/s/v.a4.d"},
            {"node-name": "disk0", "drv": "qcow2", "file": "/s/v.1.d"}]);

        let chain = running_chain(&blocks, &nodes, "disk0");

        assert_eq!(
            chain,
            vec![
                Level { path: "/s/v.a4.d".into(), backing: Some("v.4.d".into()), node: Some("disk0-c4".into()) },
                Level { path: "/s/v.a3.d".into(), backing: Some("v.1.d".into()), node: Some("disk0-c3".into()) },
                Level { path: "/s/v.1.d".into(), backing: None, node: Some("disk0".into()) },
            ]
        );
        assert!(running_chain(&blocks, &nodes, "disk1").is_empty());
    }

    /// Four checkpoints (layers 5, 4, 3 over base 1; 2 was merged already) under the
    /// running overlay, and the running chain that matches it.
    fn four_checkpoints() -> (Vec<String>, [Level; 5]) {
        let chain = names(&["v.5.d", "v.4.d", "v.3.d", "v.1.d"]);
        let running = [
            level("a5", Some("v.5.d")),
            level("a4", Some("v.4.d")),
            level("a3", Some("v.3.d")),
            level("a2", Some("v.1.d")),
            level("b", None),
        ];
        (chain, running)
    }

    #[test]
    fn keep_two_merges_every_layer_between_the_newest_and_the_base() {
        let (chain, running) = four_checkpoints();

        let p = plan(&chain, &running, 2).expect("a plan");

        assert_eq!(
            p,
            Plan { top: 2, above: 1, base: 4, base_name: "v.1.d".into(), above_name: "v.5.d".into(), merged: names(&["v.4.d", "v.3.d"]) }
        );
    }

    #[test]
    fn keep_three_leaves_the_two_newest_layers() {
        let (chain, running) = four_checkpoints();

        let p = plan(&chain, &running, 3).expect("a plan");

        assert_eq!((p.top, p.above, p.base, p.above_name.as_str(), p.merged), (3, 2, 4, "v.4.d", names(&["v.3.d"])));
    }

    #[test]
    fn a_chain_within_keep_or_unlike_the_records_is_not_merged() {
        let chain = names(&["v.5.d", "v.4.d", "v.1.d"]);
        let running = [level("a5", Some("v.5.d")), level("a4", Some("v.4.d")), level("a3", Some("v.1.d")), level("b", None)];
        let other = [level("a5", Some("v.5.d")), level("a4", Some("v.9.d")), level("a3", Some("v.1.d")), level("b", None)];

        assert_eq!(plan(&chain, &running, 3), None);
        assert_eq!(plan(&chain, &other, 2), None);
        assert!(plan(&chain, &running, 2).is_some());
    }

    #[test]
    fn a_layer_linked_from_elsewhere_is_not_the_vms_own() {
        let dir = std::env::temp_dir().join(format!("wa-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let (alone, base, image, shared, replica) =
            (dir.join("v.3.d"), dir.join("v.1.d"), dir.join("v-disk0.qcow2"), dir.join("w.2.d"), dir.join("r-w.2.d"));
        for f in [&alone, &image, &replica] {
            std::fs::write(f, b"x").expect("write");
        }
        std::fs::hard_link(&image, &base).expect("link");
        std::fs::hard_link(&replica, &shared).expect("link");

        let seen = [private(&alone, &image), private(&base, &image), private(&shared, &image), private(&dir.join("gone"), &image)];

        assert_eq!(seen, [true, true, false, false]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_path_qemu_lost_is_linked_back_only_to_the_file_qemu_holds() {
        let dir = std::env::temp_dir().join(format!("wa-chain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let (layer, active, other) = (dir.join("v.2.d"), dir.join("v.a1.d"), dir.join("v.3.d"));
        std::fs::write(&active, b"layer").expect("write");
        std::fs::hard_link(&active, &layer).expect("link");
        std::fs::write(&other, b"other").expect("write");
        // This process plays QEMU: it holds the file open by its old name, then unlinked.
        let held = std::fs::File::open(&active).expect("open");
        std::fs::remove_file(&active).expect("unlink");
        let me = i32::try_from(std::process::id()).expect("pid");

        let refused = reachable(&active, &other, me);
        let linked = reachable(&active, &layer, me);
        let again = reachable(&active, &layer, me);

        assert!(refused.is_err(), "{refused:?}");
        assert_eq!((linked, again), (Ok(true), Ok(false)));
        assert_eq!(std::fs::read(&active).expect("read"), b"layer");
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
