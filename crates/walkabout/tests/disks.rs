//! Disks on one host, on real guests (256 MiB, TCG): images the user brings and images the
//! agent makes, checked before QEMU starts; the guest's disk workload (self-verifying
//! blocks, O_DIRECT) finds no corrupt block and reads its blocks back on a new VM; two
//! buses; a guest that boots from the Walkabout root disk.

mod common;

use common::AgentProc;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use walkabout_api::{DiskBus, DiskFormat, VmInfo};
use walkabout_testbed::TempDir;

/// `qemu-img ARGS`, which must succeed.
fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The VM's serial console so far.
fn console(agent: &AgentProc, vm: &str) -> String {
    agent.call(|c| async move { c.console(vm, 0).await }).map(|c| c.text).unwrap_or_else(|e| panic!("console of {vm}: {e}"))
}

/// Waits until the console holds `needle`; returns the console.
fn wait_console(agent: &AgentProc, vm: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = console(agent, vm);
        if text.contains(needle) {
            return text;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{vm}'s console never said {needle:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `disk dev=... blocks=N adopted=M` line of the guest's disk workload.
fn disk_line(text: &str) -> Option<(String, u64, u64)> {
    let line = text.lines().find_map(|l| l.trim().strip_prefix("disk "))?;
    let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('='));
    Some((field("dev")?.to_owned(), field("blocks")?.parse().ok()?, field("adopted")?.parse().ok()?))
}

/// Waits for `n` more heartbeats than now and asserts the guest saw no corrupt block or page.
fn runs_clean(agent: &AgentProc, vm: &str, more: u64) -> VmInfo {
    let now = agent.info(vm).guest.heartbeats;
    let v = agent.wait_heartbeats(vm, now + more);
    assert_eq!((v.guest.corrupt_blocks, v.guest.corrupt_pages), (0, 0), "{v:?}\n{}", console(agent, vm));
    assert!(v.guest.is_healthy(), "{v:?}");
    v
}

/// Files in `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn a_qcow2_disk_with_the_disk_workload_has_no_corrupt_block_and_a_new_vm_reads_its_blocks_back() {
    let dir = TempDir::new("disk-own").expect("temp dir");
    let image = dir.path().join("data.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&image), "64M"]);
    let agent = AgentProc::start(&[]);
    let disk = path_str(&image);

    let first = agent.create(&["--name", "w1", "--memory", "256M", "--disk", disk, "--workload", "dirty:16:8,disk:16:16"]);
    let text = wait_console(&agent, "w1", "disk dev=");
    // Two whole passes: every block written, and flushed (fdatasync each second) since.
    wait_console(&agent, "w1", "disk-pass 2 dev=");
    runs_clean(&agent, "w1", 10);
    agent.cli(&["vm", "stop", "w1"]);
    agent.cli(&["vm", "delete", "w1"]);
    let kept = image.is_file();
    let second = agent.create(&["--name", "w2", "--memory", "256M", "--disk", disk, "--workload", "disk:16:16"]);
    let again = wait_console(&agent, "w2", "disk dev=");
    runs_clean(&agent, "w2", 20);

    assert_eq!(first.record.spec.disks[0].format, Some(DiskFormat::Qcow2), "format probed and pinned: {first:?}");
    assert_eq!(disk_line(&text), Some(("/dev/vda".into(), 4096, 0)), "{text}");
    assert!(kept, "deleting a VM removed the image it was given");
    assert_eq!(second.record.spec.disks[0].path.as_deref(), Some(image.as_path()));
    assert_eq!(disk_line(&again), Some(("/dev/vda".into(), 4096, 4096)), "every block read back intact:\n{again}");
    agent.cli(&["vm", "delete", "w2"]);
    qemu_img(&["check", "-q", path_str(&image)]);
}

#[test]
fn two_new_disks_on_virtio_blk_and_virtio_scsi_are_both_in_the_guest_the_workload_runs_on_scsi_and_they_go_with_the_vm() {
    let agent = AgentProc::start(&[]);
    let storage = agent.data.join("images");

    let vm = agent.create(&[
        "--name",
        "two",
        "--memory",
        "256M",
        "--disk",
        "size=16M",
        "--disk",
        "size=32M,bus=virtio-scsi",
        "--workload",
        "disk:8:8",
        "--cmdline",
        "walkabout.disk=/dev/sda",
    ]);
    let text = wait_console(&agent, "two", "disk dev=");
    runs_clean(&agent, "two", 20);
    let shown = agent.run(&["vm", "info", "two"]);
    let made = files_in(&storage);
    agent.cli(&["vm", "delete", "two"]);

    let devices = text.lines().find(|l| l.contains("walkabout-init: block devices:")).unwrap_or_default().to_owned();
    assert!(devices.split_whitespace().any(|d| d == "vda") && devices.split_whitespace().any(|d| d == "sda"), "{devices}");
    assert_eq!(disk_line(&text), Some(("/dev/sda".into(), 2048, 0)), "the disk workload runs on the virtio-scsi disk:\n{text}");
    let disks = &vm.record.spec.disks;
    assert_eq!(
        disks.iter().map(|d| (d.bus, d.format)).collect::<Vec<_>>(),
        [(DiskBus::VirtioBlk, Some(DiskFormat::Qcow2)), (DiskBus::VirtioScsi, Some(DiskFormat::Qcow2))]
    );
    let mut made = made;
    made.sort();
    assert_eq!(made, ["two-disk0.qcow2", "two-disk1.qcow2"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("two-disk1.qcow2 (qcow2, virtio-scsi)"), "{shown}");
    assert_eq!(files_in(&storage), Vec::<String>::new(), "delete leaves the agent's images behind");
}

/// A QEMU holding `image` open for writing (its lock), killed on drop.
struct Holder(Child);

impl Holder {
    fn open(image: &Path) -> Holder {
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "none", "-nodefaults", "-display", "none", "-S", "-blockdev"])
            .arg(format!("driver=qcow2,file.driver=file,file.filename={},node-name=held", image.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu starts");
        // Give it the time to open (and lock) the image.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let out = Command::new("qemu-img").args(["info", path_str(image)]).output().expect("qemu-img");
            if String::from_utf8_lossy(&out.stderr).contains("lock") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Zeroes the qcow2's first refcount block: every cluster in use then has refcount 0,
/// which `qemu-img info` does not look at and `qemu-img check` reports as corruption.
fn zero_first_refcount_block(image: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(image).expect("open qcow2");
    let mut word = [0u8; 8];
    f.read_exact_at(&mut word, 48).expect("header: refcount_table_offset");
    let table = u64::from_be_bytes(word);
    f.read_exact_at(&mut word, table).expect("refcount table entry 0");
    f.write_all_at(&[0u8; 4096], u64::from_be_bytes(word)).expect("zero the refcount block");
}

#[test]
fn bad_images_are_refused_with_the_cause_and_nothing_is_started() {
    let dir = TempDir::new("disk-bad").expect("temp dir");
    let at = |name: &str| -> PathBuf { dir.path().join(name) };
    let truncated = at("truncated.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&truncated), "64M"]);
    std::fs::OpenOptions::new().write(true).open(&truncated).and_then(|f| f.set_len(100)).expect("truncate");
    std::fs::write(at("garbage.qcow2"), b"QFI\xfb\x00\x00\x00\x09this is no qcow2 header at all").expect("garbage");
    let (base, top) = (at("base.qcow2"), at("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "64M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", path_str(&base), path_str(&top)]);
    std::fs::remove_file(&base).expect("rm base");
    let corrupt = at("corrupt.qcow2");
    std::fs::write(at("data.raw"), vec![0x5a; 1 << 20]).expect("data");
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", path_str(&at("data.raw")), path_str(&corrupt)]);
    zero_first_refcount_block(&corrupt);
    let (shared, locked) = (at("shared.qcow2"), at("locked.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&shared), "64M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&locked), "64M"]);
    let agent = AgentProc::start(&[]);
    agent.create(&["--name", "owner", "--memory", "256M", "--disk", path_str(&shared), "--no-wait"]);
    let _holder = Holder::open(&locked);
    let missing = at("missing.qcow2");
    let cases: [(&str, String, &str); 7] = [
        ("missing", path_str(&missing).to_owned(), "does not exist"),
        ("truncated", path_str(&truncated).to_owned(), "cannot be opened"),
        ("garbage", path_str(&at("garbage.qcow2")).to_owned(), "cannot be opened"),
        ("backing", path_str(&top).to_owned(), "its backing file"),
        ("corrupt", path_str(&corrupt).to_owned(), "is corrupt"),
        ("shared", path_str(&shared).to_owned(), "in use by VM `owner`"),
        ("locked", path_str(&locked).to_owned(), "in use by another process"),
    ];

    let refusals: Vec<(&str, String)> = cases
        .iter()
        .map(|(name, disk, _)| {
            let vm = format!("bad-{name}");
            // A new disk first: the agent makes it, and must remove it again.
            (*name, agent.cli_fails(&["vm", "create", "--name", &vm, "--memory", "256M", "--disk", "size=8M", "--disk", disk]))
        })
        .collect();

    for ((name, err), (_, disk, cause)) in refusals.iter().zip(&cases) {
        assert!(err.contains(&format!("invalid spec for VM `bad-{name}`: disk 1: ")) && err.contains(cause), "{name}: {err}");
        assert!(err.contains(disk.as_str()), "{name}: the error names the image: {err}");
    }
    let names: Vec<String> = agent.vms().into_iter().map(|v| v.record.spec.name).collect();
    assert_eq!(names, ["owner"], "a refused VM was left behind");
    assert_eq!(files_in(&agent.data.join("images")), Vec::<String>::new(), "an image made for a refused VM was left behind");
}

#[test]
fn a_guest_boots_from_an_overlay_on_the_root_disk_and_runs_the_disk_workload_on_its_second_disk() {
    let agent = AgentProc::start(&[]);
    let image = walkabout_image::cached(&walkabout_image::default_cache_dir()).expect("cache").expect("image built");
    let base_before = std::fs::read(&image.rootfs).expect("read base");

    let vm =
        agent.create(&["--name", "rooted", "--memory", "256M", "--disk", "image:guest", "--disk", "size=16M", "--workload", "disk:8:8"]);
    let text = wait_console(&agent, "rooted", "disk dev=");
    runs_clean(&agent, "rooted", 20);
    let overlay = vm.record.spec.disks[0].path.clone().expect("overlay path");
    agent.cli(&["vm", "delete", "rooted"]);

    assert!(text.contains(&format!("{}/dev/vda", walkabout_image::ROOT_BANNER)), "{text}");
    assert_eq!(disk_line(&text), Some(("/dev/vdb".into(), 2048, 0)), "{text}");
    assert_eq!(vm.record.spec.cmdline.as_deref(), Some("root=/dev/vda"));
    assert!(!overlay.exists(), "the overlay outlived its VM");
    assert_eq!(std::fs::read(&image.rootfs).expect("read base"), base_before, "the shared base changed");
}

#[test]
fn a_disk_workload_with_only_a_root_disk_is_refused_before_anything_starts() {
    let agent = AgentProc::start(&[]);

    let err = agent.cli_fails(&["vm", "create", "--name", "nodisk", "--memory", "256M", "--disk", "image:guest", "--workload", "disk:8:8"]);

    assert!(err.contains("invalid spec for VM `nodisk`") && err.contains("no disk besides its root"), "{err}");
    assert_eq!(agent.vms().len(), 0);
    assert_eq!(files_in(&agent.data.join("images")), Vec::<String>::new(), "the root overlay was left behind");
}

#[test]
fn a_stopped_vm_starts_again_from_its_record_and_its_guest_reads_its_blocks_back() {
    let agent = AgentProc::start(&[]);
    let args = ["--name", "again", "--memory", "256M", "--disk", "image:guest", "--disk", "size=16M", "--workload", "disk:8:16"];
    let first = agent.create(&args);
    wait_console(&agent, "again", "disk-pass 2 dev=");
    let refused = agent.cli_fails(&["vm", "start", "again"]);
    agent.cli(&["vm", "stop", "again"]);

    let started: VmInfo = agent.cli_as(&["vm", "start", "again"]);
    let text = wait_console(&agent, "again", "disk dev=");
    runs_clean(&agent, "again", 10);

    assert!(refused.contains("cannot start VM `again`: it is Running"), "{refused}");
    assert_eq!(started.record.state, walkabout_api::VmState::Running, "{started:?}");
    assert_eq!(started.record.spec, first.record.spec, "the VM started again from another spec");
    assert!(text.contains(&format!("{}/dev/vda", walkabout_image::ROOT_BANNER)), "booted from its root disk again:\n{text}");
    assert_eq!(disk_line(&text), Some(("/dev/vdb".into(), 2048, 2048)), "every block read back intact:\n{text}");
    agent.cli(&["vm", "delete", "again"]);
}
