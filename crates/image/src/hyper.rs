//! The hypervisor guest ("hyper"): a root disk on which a guest runs a Walkabout agent
//! with its own QEMU, so that VMs can live-migrate into it and out of it (nested VMs;
//! the Towers of Hanoi game).
//!
//! The VM boots the ordinary Walkabout kernel and initramfs with `root=/dev/vda` on this
//! disk (an overlay of it: the agent writes its database and its VMs' run directories on
//! it). The disk holds, besides busybox and the guest program:
//!
//! - this host's `qemu-system-x86_64` and `qemu-img` with every shared library `ldd`
//!   names, at the same paths, and the firmware they load for a q35 machine booted with
//!   `-kernel` (SeaBIOS, the linuxboot/PVH option ROMs, the virtio NIC's ROM), found in
//!   QEMU's data directories (`qemu-system-x86_64 -L help`);
//! - the `walkabout` binary given (its debug symbols stripped) and its libraries;
//! - the guest image's kernel and initramfs under `/boot`, so that a VM made from the
//!   Walkabout guest image on any host can run here too, and come back;
//! - an `/init` ([`HYPER_INIT`]) that starts `walkabout agent` on the guest's address
//!   (`walkabout.ip=`) once the guest program has configured it, with mutual TLS under
//!   the host identity found on the second disk (a "seed" disk, [`seed_disk`]: one per
//!   VM, made by whoever creates the VM), and then becomes the guest program, so the
//!   hypervisor guest's own heartbeat and memory are checked like any guest's.
//!
//! The nested agent runs TCG (`--accel tcg`): a VM moving between a host (TCG here) and
//! a nested agent must run on the same accelerator at both ends, since a KVM guest's
//! migration stream carries a `kvmclock` device a TCG QEMU refuses (see
//! docs/nesting.md). Its capacity is the guest's memory minus [`HYPER_RESERVE_MIB`].
//!
//! Cached as `hyper-<key>.qcow2` (read-only), `<key>` hashing the layout, `/init`, the
//! guest image, the walkabout binary and the QEMU binary.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{io_error, rootfs, GuestImage, ImageError, Scratch};

/// Memory a hypervisor guest keeps for its own kernel, agent and nested QEMUs'
/// translation caches (each nested QEMU runs TCG with a 128 MiB cache), MiB: the nested
/// agent's `--reserve`.
pub const HYPER_RESERVE_MIB: u64 = 320;

/// The port the nested agent listens on, at the guest's address.
pub const HYPER_AGENT_PORT: u16 = 7701;

/// Where the seed disk is mounted, and the identity file on it.
pub const SEED_IDENTITY: &str = "identity.pem";

/// What the hypervisor guest prints on its console once its agent answers, followed
/// by the agent's URL.
pub const HYPER_BANNER: &str = "walkabout-hyper: agent up at ";

/// Bumped when the layout changes in a way the key would not otherwise see.
const HYPER_LAYOUT: &str = "walkabout-hyper-v1";

/// Free room on the root file system for the agent's database and its VMs' run
/// directories (console logs, sockets), MiB.
const HYPER_FREE_MIB: u64 = 192;

/// The firmware a q35 machine booted with `-kernel` loads (and the virtio NIC's ROM).
const QEMU_DATA_FILES: &[&str] =
    &["bios-256k.bin", "linuxboot_dma.bin", "linuxboot.bin", "pvh.bin", "kvmvapic.bin", "multiboot_dma.bin", "efi-virtio.rom"];

/// `/init` of the hypervisor guest's root file system.
pub const HYPER_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin 2>/dev/null
export PATH=/bin:/usr/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "walkabout-init: root file system $(grep ' / ext4 ' /proc/mounts | cut -d' ' -f1)"
mkdir -p /seed /var/lib/walkabout /var/log
mount -t ext4 -o ro /dev/vdb /seed || echo "walkabout-hyper: no seed disk on /dev/vdb: the agent cannot start"
ip=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^walkabout\.ip=\([0-9.]*\)\/.*/\1/p')
(
    [ -n "$ip" ] || { echo "walkabout-hyper: no walkabout.ip= on the kernel command line: the agent cannot start"; exit 1; }
    while ! ip -4 addr show | grep -q "inet $ip/"; do sleep 1; done
    /bin/walkabout --identity /seed/identity.pem agent --listen "$ip:7701" --migration-address "$ip" \
        --data-dir /var/lib/walkabout/agent --accel tcg --kernel /boot/vmlinux --initrd /boot/initrd \
        --reserve 320M > /var/log/walkabout-agent.log 2>&1 &
    pid=$!
    while [ ! -s /var/lib/walkabout/agent/agent.url ] && kill -0 $pid 2>/dev/null; do sleep 1; done
    if [ -s /var/lib/walkabout/agent/agent.url ]; then
        echo "walkabout-hyper: agent up at $(cat /var/lib/walkabout/agent/agent.url)"
    fi
    wait $pid
    echo "walkabout-hyper: the agent exited ($?): $(tail -n 3 /var/log/walkabout-agent.log | tr '\n' ' ')"
) &
exec /bin/walkabout-guest
"#;

/// A hypervisor guest's root disk, with the guest image it carries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HyperImage {
    /// The root disk (qcow2, read-only: VMs run on an overlay of it).
    pub rootfs: PathBuf,
    /// The guest image whose kernel and initramfs boot it, and that it carries for the
    /// VMs nested in it.
    pub guest: GuestImage,
}

/// Builds (or returns the cached) hypervisor guest's root disk in `cache_dir`, holding
/// `walkabout` (the binary the nested agent runs) and the QEMU binary `qemu` (a name on
/// `PATH` or a path), with the guest image [`crate::build`] gives.
pub fn build_hyper(cache_dir: &Path, walkabout: &Path, qemu: &str) -> Result<HyperImage, ImageError> {
    let guest = crate::build(cache_dir)?;
    let _lock = crate::lock::Exclusive::acquire(&cache_dir.join("build.lock"))?;
    let qemu = which(qemu)?;
    let qemu_img = qemu.with_file_name("qemu-img");
    let dest = hyper_path(cache_dir, &guest, walkabout, &qemu)?;
    if dest.is_file() {
        return Ok(HyperImage { rootfs: dest, guest });
    }
    let scratch = Scratch::new(cache_dir, "hyper")?;
    let tree = scratch.0.join("root");
    for dir in ["bin", "usr/bin", "dev", "proc", "sys", "tmp", "run", "mnt", "boot", "seed", "var/lib/walkabout", "var/log", "etc"] {
        let d = tree.join(dir);
        fs::create_dir_all(&d).map_err(io_error("create", &d))?;
    }
    let busybox = fs::read(cache_dir.join("busybox").join("busybox")).map_err(io_error("read", &cache_dir.join("busybox")))?;
    put(&tree, "bin/busybox", &busybox, 0o755)?;
    put(&tree, "bin/walkabout-guest", crate::GUEST_PROGRAM, 0o755)?;
    put(&tree, "init", HYPER_INIT.as_bytes(), 0o755)?;
    put(&tree, "etc/hostname", b"walkabout-hyper\n", 0o644)?;
    copy_file(&guest.kernel, &tree.join("boot/vmlinux"))?;
    copy_file(&guest.initrd, &tree.join("boot/initrd"))?;
    let stripped = scratch.0.join("walkabout");
    strip(walkabout, &stripped)?;
    copy_file(&stripped, &tree.join("bin/walkabout"))?;
    copy_file(&qemu, &tree.join("usr/bin/qemu-system-x86_64"))?;
    if qemu_img.is_file() {
        copy_file(&qemu_img, &tree.join("usr/bin/qemu-img"))?;
    }
    let mut libs = BTreeSet::new();
    for bin in [walkabout, qemu.as_path(), qemu_img.as_path()].into_iter().filter(|b| b.is_file()) {
        libs.extend(shared_libraries(bin)?);
    }
    for lib in &libs {
        copy_file(lib, &under(&tree, lib))?;
    }
    for file in qemu_data_files(&qemu)? {
        copy_file(&file, &under(&tree, &file))?;
    }
    let used = du_mib(&tree)?;
    let size = format!("{}M", used + used / 5 + HYPER_FREE_MIB);
    let raw = scratch.0.join("root.raw");
    let qcow2 = scratch.0.join("root.qcow2");
    let (tree_s, raw_s, qcow2_s) = (tree.display().to_string(), raw.display().to_string(), qcow2.display().to_string());
    rootfs::run(
        &rootfs::sbin("mke2fs"),
        &["-q", "-F", "-t", "ext4", "-L", "walkabout-hyper", "-E", "root_owner=0:0", "-d", &tree_s, &raw_s, &size],
    )?;
    rootfs::run("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", &raw_s, &qcow2_s])?;
    read_only(&qcow2)?;
    fs::rename(&qcow2, &dest).map_err(io_error("rename into place", &dest))?;
    tracing::info!(rootfs = %dest.display(), size, "hypervisor guest root image built");
    Ok(HyperImage { rootfs: dest, guest })
}

/// Makes a VM's seed disk at `path`: a small raw ext4 image holding `files` (name,
/// contents; e.g. [`SEED_IDENTITY`]), which the hypervisor guest mounts read-only on
/// `/seed` from its second disk.
pub fn seed_disk(path: &Path, files: &[(&str, &[u8])]) -> Result<(), ImageError> {
    let dir = path.with_extension("d");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
    let result = (|| {
        for (name, bytes) in files {
            put(&dir, name, bytes, 0o600)?;
        }
        let (dir_s, path_s) = (dir.display().to_string(), path.display().to_string());
        rootfs::run(
            &rootfs::sbin("mke2fs"),
            &["-q", "-F", "-t", "ext4", "-L", "walkabout-seed", "-E", "root_owner=0:0", "-d", &dir_s, &path_s, "4M"],
        )
    })();
    let _ = fs::remove_dir_all(&dir);
    result
}

/// Where the hyper image for these inputs lives in `cache_dir`. The walkabout binary is
/// hashed whole (it changes with every build); QEMU by its size and modification time.
fn hyper_path(cache_dir: &Path, guest: &GuestImage, walkabout: &Path, qemu: &Path) -> Result<PathBuf, ImageError> {
    let bin = fs::read(walkabout).map_err(io_error("read", walkabout))?;
    let meta = fs::metadata(qemu).map_err(io_error("read", qemu))?;
    let stamp = format!("{}:{}:{:?}", qemu.display(), meta.len(), meta.modified().ok());
    let boot = format!("{}:{}", guest.kernel.display(), guest.initrd.display());
    let key = crate::fnv1a64(&[HYPER_LAYOUT.as_bytes(), HYPER_INIT.as_bytes(), boot.as_bytes(), stamp.as_bytes(), &bin]);
    Ok(cache_dir.join(format!("hyper-{key:016x}.qcow2")))
}

/// `dir/rel` written with `bytes` and `mode`.
fn put(dir: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(rel);
    fs::write(&p, bytes).map_err(io_error("write", &p))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_error("set permissions of", &p))
}

/// `abs` (an absolute host path) inside `tree`.
fn under(tree: &Path, abs: &Path) -> PathBuf {
    tree.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// Copies `from` (symlinks followed) to `to`, making its directory and keeping its mode.
fn copy_file(from: &Path, to: &Path) -> Result<(), ImageError> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(io_error("create", parent))?;
    }
    fs::copy(from, to).map_err(io_error("copy", from))?;
    Ok(())
}

fn read_only(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o444)).map_err(io_error("set permissions of", path))
}

/// `program` resolved on `PATH` (or as given, when it names a path).
fn which(program: &str) -> Result<PathBuf, ImageError> {
    let not_found = || ImageError::Io {
        action: "find the QEMU binary",
        path: PathBuf::from(program),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "not on PATH"),
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if p.is_file() { fs::canonicalize(&p).map_err(io_error("resolve", &p)) } else { Err(not_found()) };
    }
    let path = std::env::var_os("PATH").ok_or_else(not_found)?;
    let found = std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file()).ok_or_else(not_found)?;
    fs::canonicalize(&found).map_err(io_error("resolve", &found))
}

/// The shared libraries (and the dynamic loader) `binary` needs, as `ldd` lists them.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let command = format!("ldd {}", binary.display());
    let out = Command::new("ldd").arg(binary).output().map_err(|source| ImageError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        // A static binary: "not a dynamic executable".
        return Ok(vec![]);
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// The absolute paths in `ldd` output (`libc.so.6 => /lib/.../libc.so.6 (0x...)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`); the vDSO has none.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let target = l.split("=>").nth(1).unwrap_or(l).trim();
            let path = target.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The firmware files of [`QEMU_DATA_FILES`] in QEMU's data directories (the first
/// directory holding each), symlinks kept as the path QEMU looks up.
fn qemu_data_files(qemu: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let command = format!("{} -L help", qemu.display());
    let out = Command::new(qemu).args(["-L", "help"]).output().map_err(|source| ImageError::Spawn { command: command.clone(), source })?;
    let dirs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout).lines().map(|l| PathBuf::from(l.trim())).filter(|d| d.is_dir()).collect();
    let mut found = vec![];
    for name in QEMU_DATA_FILES {
        match dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
            Some(p) => found.push(p),
            None => tracing::warn!(file = name, "QEMU data file not found; the hypervisor guest goes without it"),
        }
    }
    Ok(found)
}

/// Strips the debug sections of `from` into `to` (a debug build is mostly symbols);
/// copies it as it is where `strip` is missing or fails.
fn strip(from: &Path, to: &Path) -> Result<(), ImageError> {
    let ok = Command::new("strip").arg("--strip-debug").arg("-o").arg(to).arg(from).status().map(|s| s.success()).unwrap_or(false);
    if ok {
        return Ok(());
    }
    tracing::warn!(binary = %from.display(), "cannot strip; copying it whole");
    copy_file(from, to)
}

/// The size of the files under `dir`, MiB (rounded up).
fn du_mib(dir: &Path) -> Result<u64, ImageError> {
    let mut total = 0u64;
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).map_err(io_error("list", &d))?.filter_map(Result::ok) {
            let meta = entry.metadata().map_err(io_error("read", &entry.path()))?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total.div_ceil(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader_but_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(parse_ldd(text), vec![PathBuf::from("/lib/x86_64-linux-gnu/libm.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]);
    }

    #[test]
    fn the_hyper_init_starts_the_agent_on_the_guest_address_with_the_seed_identity_then_the_guest_program() {
        assert!(HYPER_INIT.starts_with("#!/bin/busybox sh\n"));
        assert!(HYPER_INIT.contains(crate::ROOT_BANNER.trim_end()));
        assert!(HYPER_INIT.contains(&format!("--identity /seed/{SEED_IDENTITY}")));
        assert!(HYPER_INIT.contains(&format!("--listen \"$ip:{HYPER_AGENT_PORT}\"")));
        assert!(HYPER_INIT.contains(&format!("--reserve {HYPER_RESERVE_MIB}M")));
        assert!(HYPER_INIT.contains("--accel tcg"));
        assert!(HYPER_INIT.contains(HYPER_BANNER.trim_end()));
        assert!(HYPER_INIT.trim_end().ends_with("exec /bin/walkabout-guest"));
    }

    #[test]
    fn a_host_path_lands_at_the_same_path_inside_the_tree() {
        assert_eq!(under(Path::new("/t"), Path::new("/usr/share/qemu/pvh.bin")), PathBuf::from("/t/usr/share/qemu/pvh.bin"));
    }
}
