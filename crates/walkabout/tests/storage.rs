//! Storage on migrate with real guests: a VM with a disk hops with `--storage shared`
//! (both agents see one directory) and `--storage copy` (the destination makes its own
//! image, the source mirrors into it over NBD), its disk bytes intact; `shared` is
//! refused where the destination does not see the file or its backing file; cancel and a killed
//! destination agent during the mirror leave the source untouched and no image at the
//! destination; an overlay whose base the destination holds copies only its top layer.
//!
//! Guests that write their disk run the guest's disk workload (self-verifying blocks,
//! re-read continuously: a lost or torn write is a corrupt block). Where the source must
//! stay untouched, the guest leaves its disk alone and the image is compared with a
//! pristine copy of it (`qemu-img compare`).

mod common;

use common::{assert_healthy, AgentProc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use walkabout_api::{MigrationRecord, Phase, StorageMode, VmInfo, VmSpec, VmState};
use walkabout_testbed::{wait_gone, NetPair};

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("wa-storage-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A qcow2 of `mib` MiB (on `backing` if given) with `(pattern, offset MiB, length MiB)`
/// written into it.
fn image(path: &Path, mib: u64, backing: Option<&Path>, writes: &[(u8, u64, u64)]) {
    let p = path.to_str().expect("utf-8 path");
    match backing {
        Some(b) => run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", b.to_str().expect("utf-8"), "-F", "qcow2", p]),
        None => run("qemu-img", &["create", "-q", "-f", "qcow2", p, &format!("{mib}M")]),
    };
    for (pattern, off, len) in writes {
        run("qemu-io", &["-f", "qcow2", "-c", &format!("write -P {pattern} {off}M {len}M"), p]);
    }
}

/// Whether two images hold the same guest-visible bytes (either may be in use).
fn same_content(a: &Path, b: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", a.to_str().unwrap_or_default(), b.to_str().unwrap_or_default()])
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))),
    }
}

/// Bytes of the image's own (top) layer that hold data (`qemu-img map`).
fn top_allocated(path: &Path) -> u64 {
    let map: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["map", "-U", "--output=json", path.to_str().expect("utf-8")])).expect("map JSON");
    map.as_array()
        .expect("extents")
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum()
}

/// Creates a VM with one disk (the typed API: the CLI's `--disk` is the disks work's).
fn create_with_disk(a: &AgentProc, name: &str, disk: &Path, workload: &str) -> VmInfo {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "name": name, "memory_mib": 256, "workload": workload,
        "disks": [{"path": disk, "format": "qcow2"}],
    }))
    .expect("spec");
    a.call(|c| async move { c.create_vm(&spec).await }).unwrap_or_else(|e| panic!("create {name}: {e}"))
}

fn disk_of(v: &VmInfo) -> PathBuf {
    v.record.spec.disks[0].path.clone().expect("disk path")
}

/// The images copies made in an agent's storage directory.
fn copies(agent: &AgentProc) -> Vec<PathBuf> {
    match std::fs::read_dir(agent.data.join("images")) {
        Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().contains("/copy-")).collect(),
        Err(_) => vec![],
    }
}

/// Waits until migration `id` has copied `bytes` of disk.
fn wait_disk_copied(a: &AgentProc, id: &str, bytes: u64) -> MigrationRecord {
    let start = Instant::now();
    loop {
        let m = a.migration(id);
        if m.disk.transferred_bytes >= bytes {
            return m;
        }
        assert!(!m.phase.is_final(), "migration ended early: {m:?}");
        assert!(start.elapsed() < Duration::from_secs(120), "the disk copy is not moving: {m:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts the guest's disk workload found the disk (`disk dev=... blocks=...`, printed
/// after its first read of the whole area: slow under TCG on a loaded machine).
fn writes_its_disk(agent: &AgentProc, vm: &str) {
    let start = Instant::now();
    loop {
        let text = agent.call(|c| async move { c.console(vm, 0).await }).map(|c| c.text).unwrap_or_default();
        if text.lines().any(|l| l.trim().starts_with("disk dev=/dev/vda")) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "{vm}'s disk workload never started:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for `more` heartbeats and asserts the guest found no corrupt page or block
/// (its disk workload re-reads and verifies every block it wrote) and never broke.
fn runs_clean(agent: &AgentProc, vm: &str, more: u64) -> VmInfo {
    let seen = agent.info(vm).guest.heartbeats;
    let v = agent.wait_heartbeats(vm, seen + more);
    assert_eq!((v.guest.corrupt_blocks, v.guest.corrupt_pages), (0, 0), "{v:?}");
    assert_healthy(&v);
    assert!(v.guest.is_healthy(), "{v:?}");
    v
}

#[test]
fn a_vm_writing_its_disk_hops_shared_then_by_copy_without_a_corrupt_block() {
    let shared = Scratch::new("hops");
    let disk = shared.0.join("disk.qcow2");
    image(&disk, 128, None, &[]);
    let (a, b) = (AgentProc::start(&[]), AgentProc::start(&[]));
    create_with_disk(&a, "d1", &disk, "dirty:64:16,disk:32:8");
    writes_its_disk(&a, "d1");
    runs_clean(&a, "d1", 10);

    let mut hosts = [&a, &b];
    for hop in 0..4 {
        let (from, to) = (hosts[0], hosts[1]);
        let m = from.migrate("d1", to, &["--storage", "shared"]);
        assert_eq!((m.result, m.storage), (Phase::Completed, Some(StorageMode::Shared)), "shared hop {hop}: {m:?}");
        assert_eq!(m.disk_transferred_bytes, 0, "shared hop {hop} copied disk bytes: {m:?}");
        assert_eq!(disk_of(&to.info("d1")), disk, "shared hop {hop}: the image moved");
        runs_clean(to, "d1", 5);
        hosts.swap(0, 1);
    }
    let markers: Vec<_> = std::fs::read_dir(&shared.0)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".walkabout-marker"))
        .collect();
    assert!(markers.is_empty(), "markers left behind: {markers:?}");

    for hop in 0..4 {
        let (from, to) = (hosts[0], hosts[1]);
        let m = from.migrate("d1", to, &["--storage", "copy"]);
        assert_eq!((m.result, m.storage), (Phase::Completed, Some(StorageMode::Copy)), "copy hop {hop}: {m:?}");
        assert!(m.disk_transferred_bytes >= 32 << 20, "copy hop {hop}: {m:?}");
        let here = disk_of(&to.info("d1"));
        assert!(here.starts_with(to.data.join("images")), "copy hop {hop}: the VM runs on {here:?}");
        assert!(copies(from).is_empty(), "copy hop {hop}: the source kept {:?}", copies(from));
        runs_clean(to, "d1", 5);
        hosts.swap(0, 1);
    }
    runs_clean(hosts[0], "d1", 20);
}

/// An agent on loopback that does not see directory `hidden` (its own mount namespace
/// lays an empty tmpfs over it), as a host without the source's storage would not.
fn agent_blind_to(hidden: &Path, scratch: &Scratch) -> AgentProc {
    common::guest_image();
    let wrapper = scratch.0.join("walkabout-blind");
    let script = format!(
        "#!/bin/sh\nexec unshare -m --propagation private sh -c 'mount -t tmpfs none \"$0\" && exec \"$@\"' {} {} \"$@\"\n",
        hidden.display(),
        common::bin()
    );
    std::fs::write(&wrapper, script).expect("wrapper");
    run("chmod", &["+x", wrapper.to_str().expect("utf-8")]);
    let spec = walkabout_testbed::AgentSpec::new(&wrapper).at(None, "127.0.0.1:0");
    AgentProc(walkabout_testbed::Agent::start(spec).expect("start the blind agent"))
}

#[test]
fn shared_is_refused_when_the_destination_does_not_see_the_file_and_auto_copies() {
    let dir = Scratch::new("refuse");
    let images = dir.0.join("images");
    std::fs::create_dir_all(&images).expect("images dir");
    let disk = images.join("own.qcow2");
    image(&disk, 32, None, &[(0x11, 0, 4)]);
    let pristine = dir.0.join("pristine.qcow2");
    std::fs::copy(&disk, &pristine).expect("pristine copy");
    let (a, b) = (AgentProc::start(&[]), agent_blind_to(&images, &dir));
    create_with_disk(&a, "d2", &disk, "idle");
    a.wait_heartbeats("d2", 3);

    let m = a.migrate("d2", &b, &["--storage", "shared"]);

    assert_eq!(m.result, Phase::Failed, "{m:?}");
    assert!(m.reason.as_deref().unwrap_or("").contains("does not see"), "{m:?}");
    assert_eq!(a.info("d2").record.state, VmState::Running);
    assert!(b.try_info("d2").is_none() && b.qemu_pids().is_empty() && copies(&b).is_empty());
    let m = a.migrate("d2", &b, &[]);
    assert_eq!((m.result, m.storage), (Phase::Completed, Some(StorageMode::Copy)), "{m:?}");
    same_content(&pristine, &disk_of(&b.info("d2"))).unwrap_or_else(|e| panic!("copied disk differs: {e}"));
}

#[test]
fn shared_is_refused_when_the_destination_lacks_the_backing_file_and_auto_copies() {
    let dir = Scratch::new("backing");
    let (bases, tops) = (dir.0.join("bases"), dir.0.join("tops"));
    std::fs::create_dir_all(&bases).and_then(|()| std::fs::create_dir_all(&tops)).expect("dirs");
    let base = bases.join("base.qcow2");
    image(&base, 32, None, &[(0x21, 0, 4)]);
    let top = tops.join("top.qcow2");
    image(&top, 32, Some(&base), &[(0x22, 8, 2)]);
    let pristine = dir.0.join("pristine.qcow2");
    run("qemu-img", &["convert", "-q", "-O", "qcow2", top.to_str().expect("utf-8"), pristine.to_str().expect("utf-8")]);
    let (a, b) = (AgentProc::start(&[]), agent_blind_to(&bases, &dir));
    create_with_disk(&a, "d4", &top, "idle");
    a.wait_heartbeats("d4", 3);

    let m = a.migrate("d4", &b, &["--storage", "shared"]);

    assert_eq!(m.result, Phase::Failed, "{m:?}");
    let why = m.reason.as_deref().unwrap_or("");
    // Refused up front by the storage check (not by a destination QEMU failing to open
    // the image), naming the missing file.
    assert!(why.contains("cannot use shared storage") && why.contains("backing chain"), "{m:?}");
    assert!(why.contains(&base.display().to_string()), "the refusal names the missing backing file: {m:?}");
    assert_eq!(a.info("d4").record.state, VmState::Running);
    assert!(b.try_info("d4").is_none() && b.qemu_pids().is_empty() && copies(&b).is_empty());
    let m = a.migrate("d4", &b, &[]);
    assert_eq!((m.result, m.storage), (Phase::Completed, Some(StorageMode::Copy)), "{m:?}");
    same_content(&pristine, &disk_of(&b.info("d4"))).unwrap_or_else(|e| panic!("copied disk differs: {e}"));
}

#[test]
fn an_overlay_whose_base_is_at_the_destination_copies_only_its_top_layer() {
    let dir = Scratch::new("overlay");
    let (a, b) = (AgentProc::start(&[]), AgentProc::start(&[]));
    let base = dir.0.join("base.qcow2");
    image(&base, 256, None, &[(0x33, 0, 96)]);
    std::fs::create_dir_all(b.data.join("images")).expect("storage dir");
    std::fs::copy(&base, b.data.join("images").join("base.qcow2")).expect("base at the destination");
    let top = dir.0.join("top.qcow2");
    image(&top, 256, Some(&base), &[(0x44, 8, 12), (0x55, 200, 4)]);
    let allocated = top_allocated(&top);
    create_with_disk(&a, "d3", &top, "idle");
    a.wait_heartbeats("d3", 3);

    let m = a.migrate("d3", &b, &["--storage", "copy"]);

    assert_eq!(m.result, Phase::Completed, "{m:?}");
    let sent = m.disk_transferred_bytes as f64;
    assert!((sent - allocated as f64).abs() <= allocated as f64 * 0.10, "sent {sent} bytes for a top layer of {allocated}: {m:?}");
    let there = disk_of(&b.info("d3"));
    let chain = run("qemu-img", &["info", "-U", "--output=json", there.to_str().expect("utf-8")]);
    assert!(chain.contains(&b.data.join("images").join("base.qcow2").display().to_string()), "not rebuilt on the local base: {chain}");
    same_content(&top, &there).unwrap_or_else(|e| panic!("the overlay's content differs: {e}"));
}

fn hosts(net: &NetPair) -> (AgentProc, AgentProc) {
    let a = AgentProc::start_at(Some(&net.a), &format!("{}:7701", net.addr_a), &[]);
    let b = AgentProc::start_at(Some(&net.b), &format!("{}:7701", net.addr_b), &[]);
    (a, b)
}

/// A VM with a 256 MiB disk full of data, on `a`, and a pristine copy of its image.
fn full_disk_vm(a: &AgentProc, dir: &Scratch, name: &str) -> (PathBuf, PathBuf) {
    let disk = dir.0.join(format!("{name}.qcow2"));
    image(&disk, 256, None, &[(0x66, 0, 256)]);
    let pristine = dir.0.join(format!("{name}-pristine.qcow2"));
    std::fs::copy(&disk, &pristine).expect("pristine copy");
    create_with_disk(a, name, &disk, "dirty:32:8");
    a.wait_heartbeats(name, 5);
    (disk, pristine)
}

#[test]
fn a_full_disk_copies_over_a_rate_limited_link() {
    let net = NetPair::new(11).expect("network namespaces (needs root)");
    net.limit_a("800mbit").expect("tc tbf");
    let dir = Scratch::new("tbf");
    let (a, b) = hosts(&net);
    let (_, pristine) = full_disk_vm(&a, &dir, "t1");

    let m = a.migrate("t1", &b, &["--storage", "copy"]);

    assert_eq!((m.result, m.storage), (Phase::Completed, Some(StorageMode::Copy)), "{m:?}");
    assert!(m.disk_transferred_bytes >= 256 << 20, "{m:?}");
    // The disk crossed the limited link: no faster than 800 Mbit/s (+20%).
    let secs = m.total_ms.expect("ms") as f64 / 1000.0;
    assert!(m.disk_transferred_bytes as f64 / secs <= 100e6 * 1.2, "faster than the link: {m:?}");
    same_content(&pristine, &disk_of(&b.info("t1"))).unwrap_or_else(|e| panic!("copied disk differs: {e}"));
    let seen = b.info("t1").guest.heartbeats;
    assert_healthy(&b.wait_heartbeats("t1", seen + 10));
}

#[test]
fn a_write_heavy_disk_copies_over_a_100_mib_s_link() {
    let net = NetPair::new(14).expect("network namespaces (needs root)");
    net.limit_a("839mbit").expect("tc tbf");
    let dir = Scratch::new("heavy");
    let (a, b) = hosts(&net);
    let disk = dir.0.join("heavy.qcow2");
    image(&disk, 512, None, &[(0x77, 256, 256)]);
    create_with_disk(&a, "h1", &disk, "dirty:32:8,disk:256:64");
    writes_its_disk(&a, "h1");
    runs_clean(&a, "h1", 20);

    let m = a.migrate("h1", &b, &["--storage", "copy"]);

    assert_eq!((m.result, m.storage), (Phase::Completed, Some(StorageMode::Copy)), "{m:?}");
    assert!(m.disk_transferred_bytes >= 512 << 20, "{m:?}");
    runs_clean(&b, "h1", 20);
}

#[test]
fn cancel_during_the_mirror_leaves_the_source_untouched_and_no_image_at_the_destination() {
    let net = NetPair::new(12).expect("network namespaces (needs root)");
    net.limit_a("100mbit").expect("tc tbf");
    let dir = Scratch::new("cancel");
    let (a, b) = hosts(&net);
    let (disk, pristine) = full_disk_vm(&a, &dir, "c1");
    let id = a.start_migration("c1", &b, &["--storage", "copy"]);
    wait_disk_copied(&a, &id, 16 << 20);
    let dest = b.qemu_pids();
    assert_eq!((dest.len(), copies(&b).len()), (1, 1), "the destination should be receiving");

    let _: MigrationRecord = a.cli_as(&["migration", "cancel", &id]);

    let m = a.wait_final(&id);
    assert_eq!(m.phase, Phase::Cancelled, "{m:?}");
    assert!(m.progress.transferred_bytes == 0, "memory moved before the disks were in sync: {m:?}");
    assert!(wait_gone(dest[0], Duration::from_secs(10)), "destination QEMU still runs");
    assert!(copies(&b).is_empty(), "partial image left at the destination: {:?}", copies(&b));
    let v = a.info("c1");
    assert_eq!((v.record.state, disk_of(&v)), (VmState::Running, disk.clone()));
    same_content(&pristine, &disk).unwrap_or_else(|e| panic!("the source's disk changed: {e}"));
    let seen = v.guest.heartbeats;
    assert_healthy(&a.wait_heartbeats("c1", seen + 10));
}

#[test]
fn destination_agent_killed_during_the_mirror_leaves_the_source_running_and_no_image_there() {
    let net = NetPair::new(13).expect("network namespaces (needs root)");
    net.limit_a("100mbit").expect("tc tbf");
    let dir = Scratch::new("kill");
    let (a, mut b) = hosts(&net);
    let (disk, pristine) = full_disk_vm(&a, &dir, "k1");
    let id = a.start_migration("k1", &b, &["--storage", "copy"]);
    wait_disk_copied(&a, &id, 16 << 20);

    b.kill();

    let m = a.wait_final(&id);
    assert_eq!(m.phase, Phase::Failed, "{m:?}");
    // Whichever the source notices first: the silent agent, or its NBD export gone.
    let reason = m.reason.as_deref().unwrap_or("");
    assert!(reason.contains("stopped answering") || reason.contains("disk mirror"), "{m:?}");
    let v = a.info("k1");
    assert_eq!((v.record.state, disk_of(&v)), (VmState::Running, disk.clone()));
    same_content(&pristine, &disk).unwrap_or_else(|e| panic!("the source's disk changed: {e}"));
    // The destination agent, back, drops the half-received VM and its image.
    b.restart().expect("restart the destination agent");
    assert!(b.try_info("k1").is_none(), "the destination kept the VM");
    let pids = b.qemu_pids();
    assert!(pids.iter().all(|p| wait_gone(*p, Duration::from_secs(10))), "destination QEMU still runs");
    assert!(copies(&b).is_empty(), "partial image left at the destination: {:?}", copies(&b));
    let seen = v.guest.heartbeats;
    assert_healthy(&a.wait_heartbeats("k1", seen + 10));
}
