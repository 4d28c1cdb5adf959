//! Builds the guest image and boots it under QEMU (TCG), reading the guest's console
//! protocol from the serial log: the image is only good if a real kernel starts the
//! guest program with the workload from its command line.
//!
//! The image is built into the default cache (`WALKABOUT_CACHE` to redirect), so runs
//! after the first reuse its downloads; `fresh_cache_builds_once_for_two_concurrent_builders`
//! covers building from nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use walkabout_guest::protocol::{ConsoleLine, Heartbeat, Ready};
use walkabout_image::{build, cmdline, default_cache_dir, GuestImage, Workload};

const BOOT_TIMEOUT: Duration = Duration::from_secs(45);

fn image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| build(&default_cache_dir()).expect("guest image builds"))
}

/// A QEMU process booting the guest image, killed when dropped.
struct Vm {
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Vm {
    fn boot(name: &str, vcpus: u32, append: &str) -> Vm {
        Vm::boot_with(name, vcpus, append, &[])
    }

    /// Boots with `extra` QEMU arguments (disks, say).
    fn boot_with(name: &str, vcpus: u32, append: &str, extra: &[String]) -> Vm {
        let image = image();
        let log = std::env::temp_dir().join(format!("walkabout-boot-{name}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-machine", "pc", "-m", "256", "-smp", &vcpus.to_string()])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", append])
            .args(extra)
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 starts");
        Vm { child, log, started: Instant::now() }
    }

    fn console(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Waits until the console's protocol lines satisfy `done`, and returns them.
    fn wait_for(&mut self, done: impl Fn(&[ConsoleLine]) -> bool) -> Vec<ConsoleLine> {
        while self.started.elapsed() < BOOT_TIMEOUT {
            let lines: Vec<ConsoleLine> = self.console().lines().filter_map(ConsoleLine::parse).collect();
            if done(&lines) {
                return lines;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("QEMU exited ({status}); console:\n{}", self.console());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("guest did not get there within {BOOT_TIMEOUT:?}; console:\n{}", self.console());
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn heartbeats(lines: &[ConsoleLine]) -> Vec<Heartbeat> {
    lines
        .iter()
        .filter_map(|l| match l {
            ConsoleLine::Heartbeat(hb) => Some(*hb),
            _ => None,
        })
        .collect()
}

fn ready(lines: &[ConsoleLine]) -> Option<Ready> {
    lines.iter().find_map(|l| match l {
        ConsoleLine::Ready(r) => Some(*r),
        _ => None,
    })
}

#[test]
fn dirty_guest_reports_two_cpus_and_beats_without_corruption() {
    let workload = Workload::dirty(16, 32);
    let mut vm = Vm::boot("dirty", 2, &cmdline(&workload));

    let lines = vm.wait_for(|lines| heartbeats(lines).len() >= 20);

    let hbs = heartbeats(&lines);
    let boot_secs = vm.started.elapsed().as_secs_f64();
    eprintln!("20 heartbeats {boot_secs:.1} s after starting QEMU");
    assert_eq!(ready(&lines).map(|r| (r.cpus, r.workload)), Some((2, workload)));
    assert_eq!(hbs.iter().map(|hb| hb.seq).collect::<Vec<_>>(), (0..hbs.len() as u64).collect::<Vec<_>>());
    assert!(hbs.iter().all(|hb| hb.corrupt_pages == 0), "console:\n{}", vm.console());
    assert!(!lines.iter().any(|l| matches!(l, ConsoleLine::Corrupt(_))));
}

/// A raw scratch disk of `bytes`, removed when dropped.
struct ScratchDisk(PathBuf);

impl ScratchDisk {
    fn new(name: &str, bytes: u64) -> ScratchDisk {
        let path = std::env::temp_dir().join(format!("walkabout-boot-{name}-{}.raw", std::process::id()));
        let file = std::fs::File::create(&path).expect("create scratch disk");
        file.set_len(bytes).expect("size scratch disk");
        ScratchDisk(path)
    }

    /// QEMU arguments attaching it on virtio-blk.
    fn virtio_blk(&self) -> Vec<String> {
        vec![
            "-blockdev".into(),
            format!("driver=file,filename={},node-name=f0", self.0.display()),
            "-blockdev".into(),
            "driver=raw,file=f0,node-name=d0".into(),
            "-device".into(),
            "virtio-blk-pci,drive=d0".into(),
        ]
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn modules_load_and_a_virtio_disk_appears_as_vda() {
    let disk = ScratchDisk::new("vda", 16 << 20);
    let mut vm = Vm::boot_with("vda", 1, &cmdline(&Workload::IDLE), &disk.virtio_blk());

    let lines = vm.wait_for(|lines| heartbeats(lines).len() >= 3);

    let console = vm.console();
    let devices = console.lines().find(|l| l.contains("walkabout-init: block devices:")).unwrap_or_default();
    assert!(devices.split_whitespace().any(|d| d == "vda"), "console:\n{console}");
    assert!(!lines.iter().any(|l| matches!(l, ConsoleLine::Error(_))), "console:\n{console}");
}

#[test]
fn the_root_disk_boots_with_root_vda() {
    let image = image();
    let overlay = std::env::temp_dir().join(format!("walkabout-boot-root-{}.qcow2", std::process::id()));
    let _ = std::fs::remove_file(&overlay);
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&image.rootfs)
        .arg(&overlay)
        .status()
        .expect("qemu-img runs");
    assert!(created.success());
    let disk = ScratchDisk(overlay);
    let drive = vec![
        "-blockdev".into(),
        format!("driver=qcow2,file.driver=file,file.filename={},node-name=d0", disk.0.display()),
        "-device".into(),
        "virtio-blk-pci,drive=d0".into(),
    ];
    let mut vm = Vm::boot_with("root", 1, &format!("{} root=/dev/vda", cmdline(&Workload::IDLE)), &drive);

    let lines = vm.wait_for(|lines| heartbeats(lines).len() >= 3);

    let console = vm.console();
    assert!(console.contains(&format!("{}/dev/vda", walkabout_image::ROOT_BANNER)), "console:\n{console}");
    assert!(!lines.iter().any(|l| matches!(l, ConsoleLine::Error(_))), "console:\n{console}");
}

#[test]
fn bogus_workload_is_reported_and_the_guest_runs_idle() {
    let mut vm = Vm::boot("bogus", 1, "console=ttyS0 quiet panic=-1 walkabout.workload=bogus");

    let lines = vm.wait_for(|lines| heartbeats(lines).len() >= 5);

    assert!(matches!(lines.first(), Some(ConsoleLine::Error(e)) if e.starts_with("unknown workload 'bogus': expected idle, dirty:")));
    assert_eq!(ready(&lines).map(|r| (r.cpus, r.workload)), Some((1, Workload::IDLE)));
}

#[test]
fn second_build_reuses_the_cached_image() {
    let first = image().clone();

    let started = Instant::now();
    let second = build(&default_cache_dir()).expect("cached build");

    assert_eq!(second, first);
    assert!(started.elapsed() < Duration::from_secs(5), "cached build took {:?}", started.elapsed());
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("walkabout-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.contains("tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn fresh_cache_builds_once_for_two_concurrent_builders() {
    let dir = fresh_dir("fresh-cache");

    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| build(&dir));
        let b = s.spawn(|| build(&dir));
        (a.join().expect("builder a"), b.join().expect("builder b"))
    });

    let (a, b) = (a.expect("builder a builds"), b.expect("builder b builds"));
    assert_eq!(a, b);
    assert!(walkabout_image::check_kernel(&a.kernel).is_ok() && walkabout_image::check_initrd(&a.initrd).is_ok());
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn image_kernel_and_initrd_pass_the_checks_the_agent_makes() {
    let image = image();

    let kernel = walkabout_image::check_kernel(&image.kernel);
    let initrd = walkabout_image::check_initrd(&image.initrd);

    assert!(kernel.is_ok() && initrd.is_ok(), "{kernel:?} {initrd:?}");
}

#[test]
fn packaged_bzimage_is_kept_and_recognised() {
    let image = image();
    let bzimage = image.kernel.with_file_name(format!("vmlinuz-{}", image.kernel_version));

    assert!(walkabout_image::check_kernel(&bzimage).is_ok());
}
