//! Checkpoints on real guests (256 MiB, TCG): a VM with two disks checkpointed twice,
//! shipped to another agent and restored there (its heartbeat continues from the
//! checkpoint's sequence, memory and disk verify); a corrupt checkpoint on a replica
//! passed over for the previous one, which the replica also forwards to a third agent
//! that restores it; a protected VM's replica never deeper than `keep`,
//! nor the running VM's own chain (its active overlay over `keep` layers once each
//! shipment's merge is done), the replica's newest checkpoint restoring afterwards.

mod common;

use common::AgentProc;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use walkabout_api::{
    Checkpoint, CheckpointMethod, CheckpointRequest, FileKind, ForwardReplica, Protection, RestoreReply, RestoreRequest, VmInfo,
};

const WORKLOAD: &str = "dirty:32:8,disk:8:8";

/// Longest a checkpoint, a shipment or a restore may take here.
const SLOW: Duration = Duration::from_secs(300);

/// A VM booting from the Walkabout root disk with a data disk, running the dirtying and
/// disk workloads, ready and healthy.
fn two_disk_vm(agent: &AgentProc, name: &str) -> VmInfo {
    agent.create(&["--name", name, "--memory", "256M", "--disk", "image:guest", "--disk", "size=16M", "--workload", WORKLOAD]);
    runs_clean(agent, name, 10)
}

/// Waits for `more` heartbeats than now; asserts no corrupt page or block and no break
/// in the heartbeat sequence beyond `breaks`.
fn runs_clean(agent: &AgentProc, vm: &str, more: u64) -> VmInfo {
    let now = agent.info(vm).guest.heartbeats;
    let v = agent.wait_heartbeats(vm, now + more);
    assert_eq!((v.guest.corrupt_pages, v.guest.corrupt_blocks), (0, 0), "{v:?}");
    assert!(v.guest.ready && !v.guest.kernel_trouble, "{v:?}");
    v
}

fn checkpoint(agent: &AgentProc, vm: &str, method: CheckpointMethod, ship_to: Option<&AgentProc>) -> Checkpoint {
    let req = CheckpointRequest { method: Some(method), ship_to: ship_to.map(|a| a.url.clone()) };
    // Shipping hundreds of MiB through debug builds on a busy machine: minutes, not seconds.
    agent.call(|c| async move { c.with_timeout(SLOW).checkpoint(vm, &req).await }).unwrap_or_else(|e| panic!("checkpoint of {vm}: {e}"))
}

/// The backing chain of `img` as `qemu-img info --backing-chain` sees it: file names.
fn chain(img: &Path) -> Vec<String> {
    let out = Command::new("qemu-img").args(["info", "--backing-chain", "--output=json", "-U"]).arg(img).output().expect("qemu-img");
    assert!(out.status.success(), "qemu-img info {}: {}", img.display(), String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array().expect("array").iter().filter_map(|l| l["filename"].as_str().map(String::from)).collect()
}

#[test]
fn a_two_disk_vm_checkpointed_twice_and_shipped_runs_on_from_the_second_on_another_agent() {
    let a = AgentProc::start(&[]);
    let b = AgentProc::start(&[]);
    two_disk_vm(&a, "ck");

    let first: Checkpoint = a.cli_as(&["vm", "checkpoint", "ck", "--method", "live"]);
    runs_clean(&a, "ck", 5);
    let second = checkpoint(&a, "ck", CheckpointMethod::Live, Some(&b));
    // The VM runs on, on its new overlays.
    runs_clean(&a, "ck", 5);
    a.cli(&["vm", "stop", "ck"]);

    assert!(second.n > first.n, "{first:?} {second:?}");
    assert_eq!(second.parent.as_deref(), Some(first.id.as_str()), "{second:?}");
    let bases: Vec<_> = first.files.iter().filter(|f| f.kind == FileKind::Base).collect();
    assert_eq!(bases.len(), 2, "the first checkpoint owns each disk's base: {first:?}");
    let layers: Vec<_> = second.files.iter().filter(|f| f.kind == FileKind::Layer).collect();
    assert_eq!(layers.len(), 2, "the second owns one layer per disk: {second:?}");
    assert!(layers.iter().all(|l| l.backing.as_deref().is_some_and(|b| b.starts_with("ck.") && b.ends_with(".qcow2"))), "{layers:?}");
    let shipped = second.shipped_bytes.expect("shipped");
    let sizes: u64 = first.files.iter().chain(&second.files).map(|f| f.bytes).sum();
    assert!(shipped > 0 && shipped < sizes, "only data travels: {shipped} bytes shipped of {sizes}");
    assert!(second.guest.last_seq.is_some(), "{second:?}");

    let held: Vec<Checkpoint> = b.cli_as(&["checkpoint", "list"]);
    assert_eq!(held.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), vec![second.id.as_str()], "{held:?}");
    let r: RestoreReply = b.cli_as(&["vm", "restore", &second.id]);
    assert_eq!((r.checkpoint.id.as_str(), r.vm.record.spec.name.as_str()), (second.id.as_str(), "ck"));
    let v = runs_clean(&b, "ck", 10);
    let at = second.guest.last_seq.expect("seq");
    assert!(v.guest.last_seq.is_some_and(|s| s > at + 5), "heartbeat continues after {at}: {:?}", v.guest);
    assert_eq!(v.guest.seq_breaks, second.guest.seq_breaks, "no break in the sequence: {:?}", v.guest);
    assert_eq!((v.guest.corrupt_pages, v.guest.corrupt_blocks), (0, 0), "{:?}", v.guest);
    b.cli(&["vm", "delete", "ck"]);
    a.cli(&["vm", "delete", "ck"]);
    // Deleting the VM leaves its checkpoints and nothing else: no active overlay, no
    // image the agent made for it (the first checkpoint has its own link of it).
    let left: Vec<String> = std::fs::read_dir(a.data.join("images"))
        .expect("images")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|f| !f.starts_with("ck-")), "{left:?}");
    let store: Vec<String> = std::fs::read_dir(a.data.join("checkpoints").join("ck"))
        .expect("store")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(store.iter().all(|f| !f.starts_with("ck.a")), "{store:?}");
    let kept = a.call(|c| async move { c.checkpoints().await }).expect("checkpoints");
    assert_eq!(kept.len(), 2, "{kept:?}");
}

#[test]
fn a_corrupt_checkpoint_on_a_replica_is_passed_over_for_the_previous_one_with_the_reason() {
    let a = AgentProc::start(&[]);
    let b = AgentProc::start(&[]);
    two_disk_vm(&a, "cc");
    let cks: Vec<Checkpoint> = (0..3)
        .map(|_| {
            let ck = checkpoint(&a, "cc", CheckpointMethod::Live, Some(&b));
            runs_clean(&a, "cc", 3);
            ck
        })
        .collect();
    a.cli(&["vm", "delete", "cc"]);
    let dir = b.data.join("replicas").join("cc");
    // The newest: a byte flipped in its data disk's layer; the one before: its memory
    // file truncated.
    let layer = cks[2].files.iter().find(|f| f.kind == FileKind::Layer && f.disk.as_deref() == Some("disk1")).expect("disk1 layer");
    let mut bytes = std::fs::read(dir.join(&layer.name)).expect("read layer");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(dir.join(&layer.name), bytes).expect("write layer");
    let mem = cks[1].files.iter().find(|f| f.kind == FileKind::Memory).expect("memory");
    let f = std::fs::OpenOptions::new().write(true).open(dir.join(&mem.name)).expect("open mem");
    f.set_len(mem.bytes / 2).expect("truncate");

    let r = b.call(|c| async move { c.with_timeout(SLOW).restore_replica("cc", &RestoreRequest::default()).await }).expect("restore");

    assert_eq!(r.checkpoint.id, cks[0].id, "{r:?}");
    assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped);
    assert!(
        r.skipped[0].starts_with(&cks[2].id) && r.skipped[0].contains(&layer.name) && r.skipped[0].contains("checksum"),
        "{:?}",
        r.skipped
    );
    assert!(
        r.skipped[1].starts_with(&cks[1].id) && r.skipped[1].contains(&mem.name) && r.skipped[1].contains("checksum"),
        "{:?}",
        r.skipped
    );
    let v = runs_clean(&b, "cc", 10);
    assert!(v.guest.last_seq > cks[0].guest.last_seq, "{:?}", v.guest);
    b.cli(&["vm", "delete", "cc"]);

    // The replica forwards the checkpoint its restore chose (the corrupt ones passed over
    // again) to a third agent, which restores it: the same guest, verified there.
    let c = AgentProc::start(&[]);
    let req = ForwardReplica { to_url: c.url.clone(), keep: 2 };
    let fwd = b.call(|cl| async move { cl.with_timeout(SLOW).forward_replica("cc", &req).await }).expect("forward");
    assert_eq!(fwd.id, cks[0].id, "{fwd:?}");
    assert!(fwd.shipped_bytes.is_some_and(|n| n > 0), "{fwd:?}");
    let held = c.call(|cl| async move { cl.replica("cc").await }).expect("held");
    assert_eq!(held.checkpoints.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), [cks[0].id.as_str()], "{held:?}");
    let r = c
        .call(|cl| async move { cl.with_timeout(SLOW).restore_replica("cc", &RestoreRequest::default()).await })
        .expect("restore the forwarded checkpoint");
    assert_eq!((r.checkpoint.id.as_str(), r.skipped.len()), (cks[0].id.as_str(), 0), "{r:?}");
    let v = runs_clean(&c, "cc", 10);
    assert!(v.guest.last_seq > cks[0].guest.last_seq, "{:?}", v.guest);
    c.cli(&["vm", "delete", "cc"]);
}

#[test]
fn a_protected_vms_replica_keeps_at_most_keep_checkpoints_and_layers() {
    let a = AgentProc::start(&[]);
    let b = AgentProc::start(&[]);
    two_disk_vm(&a, "pk");
    // No controller here: fencing off (0), or the agent would stop the VM after fence_ms.
    let p = Protection { replica: "b".into(), replica_url: b.url.clone(), every_ms: 2000, keep: 2, fence_ms: 0, clock_from_ms: None };
    let own = Protection { replica_url: a.url.clone(), ..p.clone() };
    let err = a.call(|c| async move { c.protect("pk", &own).await }).expect_err("toward itself");
    assert!(err.to_string().contains("this agent"), "{err}");
    let info = a.call(|c| async move { c.protect("pk", &p).await }).expect("protect");
    assert!(info.protection.is_some() && info.record.protection.is_some(), "{info:?}");

    let start = Instant::now();
    let mut most = 0;
    let mut deepest = 0;
    loop {
        let v = a.info("pk");
        let st = v.protection.clone().expect("status");
        if let Ok(r) = b.call(|c| async move { c.replica("pk").await }) {
            most = most.max(r.checkpoints.len());
            assert!(r.checkpoints.len() <= 2, "{r:?}");
        }
        // The running VM's chains: its active overlay over at most `keep` layers, one
        // more between a checkpoint and the merge that follows its shipment.
        let (depth, chains) = primary_depth(&a, "pk");
        deepest = deepest.max(depth);
        assert!(depth <= 2 + 2, "the running chain is {depth} deep: {chains:?}");
        if st.checkpoints >= 4 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(400), "protection is not progressing: {st:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let off = a.call(|c| async move { c.unprotect("pk").await }).expect("unprotect");
    assert!(off.record.protection.is_none());
    let r = b.call(|c| async move { c.replica("pk").await }).expect("replica");
    assert_eq!((most, r.checkpoints.len()), (2, 2), "{r:?}");
    let dir = b.data.join("replicas").join("pk");
    let newest = r.checkpoints.last().expect("newest");
    for d in &newest.spec.disks {
        let layer = d.path.as_ref().expect("layer");
        let files: Vec<String> = chain(&dir.join(layer)).into_iter().filter(|f| f.starts_with(&*dir.to_string_lossy())).collect();
        assert!(files.len() <= 2, "the replica's chain of {} is {} deep: {files:?}", layer.display(), files.len());
    }
    // Once the last round's merge is done, the active overlay over `keep` layers; the
    // guest, running all along on merged chains, verifies its memory and disk.
    let trimmed = Instant::now();
    let (depth, chains) = loop {
        let (depth, chains) = primary_depth(&a, "pk");
        if depth <= 2 + 1 || trimmed.elapsed() > Duration::from_secs(120) {
            break (depth, chains);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(depth, 2 + 1, "the running chain after 4 checkpoints: {chains:?}");
    eprintln!(
        "the primary's chains: {chains:?} (at most {deepest} deep mid-round), {:.1} s after protection stopped",
        trimmed.elapsed().as_secs_f64()
    );
    let v = runs_clean(&a, "pk", 5);
    // The replica's newest checkpoint still restores, and the guest goes on from it.
    a.cli(&["vm", "delete", "pk"]);
    let r = b.call(|c| async move { c.with_timeout(SLOW).restore_replica("pk", &RestoreRequest::default()).await }).expect("restore");
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    let back = runs_clean(&b, "pk", 5);
    assert!(back.guest.last_seq > r.checkpoint.guest.last_seq, "{:?} {:?}", back.guest, r.checkpoint.guest);
    assert_eq!(back.guest.seq_breaks, r.checkpoint.guest.seq_breaks, "{:?}", back.guest);
    assert!(v.guest.last_seq.is_some());
    b.cli(&["vm", "delete", "pk"]);
    eprintln!("trimmed chains checked and the replica restored: {:.1} s", trimmed.elapsed().as_secs_f64());
}

/// How deep the running VM `vm`'s disk chains are in its agent's checkpoint store (the
/// deepest disk's count of files there, its active overlay included), and each chain.
fn primary_depth(agent: &AgentProc, vm: &str) -> (usize, Vec<Vec<String>>) {
    let store = agent.data.join("checkpoints").join(vm);
    let store = store.to_string_lossy();
    let chains: Vec<Vec<String>> = agent
        .info(vm)
        .record
        .spec
        .disks
        .iter()
        .filter_map(|d| d.path.as_ref())
        .map(|p| chain(p).into_iter().filter(|f| f.starts_with(&*store)).collect())
        .collect();
    (chains.iter().map(Vec::len).max().unwrap_or(0), chains)
}
