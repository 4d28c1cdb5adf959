//! The guest's root disk: a qcow2 image holding an ext4 file system with busybox, the
//! guest program and an `/init` that starts it, booted with `root=/dev/vda`.
//!
//! Built without root privileges: `mke2fs -d DIR` fills the new file system from a
//! directory (e2fsprogs), into a raw file, then `qemu-img convert -O qcow2`. The kernel
//! cannot mount it by itself (ext4 and virtio-blk are modules), so the VM still boots the
//! Walkabout kernel and initramfs: the initramfs loads the modules, mounts `root=` and
//! switches to it (see `INIT_SCRIPT` in lib.rs).
//!
//! The cached image (`rootfs-<key>.qcow2`, read-only) is a catalog base: VMs never write
//! it, they run on a qcow2 overlay backed by it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{io_error, ImageError, Scratch};

/// `/init` of the root file system: mounts what the initramfs did not hand over, says
/// which device the root is, and becomes the guest program.
pub(crate) const ROOT_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin 2>/dev/null
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
echo "walkabout-init: root file system $(grep ' / ext4 ' /proc/mounts | cut -d' ' -f1)"
exec /bin/walkabout-guest
"#;

/// Size of the root file system (the guest program and busybox take a few MiB).
const ROOT_SIZE_MIB: u64 = 64;

/// Bumped when the root image's layout changes in a way the key would not otherwise see.
const ROOTFS_LAYOUT: &str = "walkabout-rootfs-v1";

/// The line the root `/init` prints, up to the device (`walkabout-init: root file system /dev/vda`).
pub const ROOT_BANNER: &str = "walkabout-init: root file system ";

/// Where the root image for this guest program and `busybox` lives in `cache_dir`.
pub(crate) fn path(cache_dir: &Path, busybox: &[u8]) -> PathBuf {
    let size = ROOT_SIZE_MIB.to_string();
    let key = crate::fnv1a64(&[ROOTFS_LAYOUT.as_bytes(), ROOT_INIT.as_bytes(), size.as_bytes(), busybox, crate::GUEST_PROGRAM]);
    cache_dir.join(format!("rootfs-{key:016x}.qcow2"))
}

/// A program from e2fsprogs, which Debian installs in /sbin (not on a user's `PATH`).
pub(crate) fn sbin(program: &str) -> String {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .map_or_else(|| program.to_owned(), |p| p.display().to_string())
}

/// Runs a command to completion, naming it and its stderr when it fails.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), ImageError> {
    let command = std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| ImageError::Spawn { command: command.clone(), source })?;
    if out.status.success() {
        return Ok(());
    }
    Err(ImageError::Command { command, status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
}

/// The root image in `cache_dir`, built (and made read-only) if missing.
pub(crate) fn ensure(cache_dir: &Path, busybox: &[u8]) -> Result<PathBuf, ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let dest = path(cache_dir, busybox);
    if dest.is_file() {
        return Ok(dest);
    }
    let scratch = Scratch::new(cache_dir, "rootfs")?;
    let tree = scratch.0.join("root");
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "mnt"] {
        let d = tree.join(dir);
        fs::create_dir_all(&d).map_err(io_error("create", &d))?;
    }
    let files: [(&str, &[u8]); 3] =
        [("bin/busybox", busybox), ("bin/walkabout-guest", crate::GUEST_PROGRAM), ("init", ROOT_INIT.as_bytes())];
    for (name, bytes) in files {
        let p = tree.join(name);
        fs::write(&p, bytes).map_err(io_error("write", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).map_err(io_error("set permissions of", &p))?;
    }
    let raw = scratch.0.join("root.raw");
    let qcow2 = scratch.0.join("root.qcow2");
    let (tree_s, raw_s, qcow2_s) = (tree.display().to_string(), raw.display().to_string(), qcow2.display().to_string());
    let size = format!("{ROOT_SIZE_MIB}M");
    // root_owner: the root directory belongs to root in the guest, whoever builds.
    run(&sbin("mke2fs"), &["-q", "-F", "-t", "ext4", "-L", "walkabout-root", "-E", "root_owner=0:0", "-d", &tree_s, &raw_s, &size])?;
    run("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", &raw_s, &qcow2_s])?;
    fs::set_permissions(&qcow2, fs::Permissions::from_mode(0o444)).map_err(io_error("set permissions of", &qcow2))?;
    fs::rename(&qcow2, &dest).map_err(io_error("rename into place", &dest))?;
    tracing::info!(rootfs = %dest.display(), "guest root image built");
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_image_key_depends_on_busybox() {
        let dir = Path::new("/cache");
        assert_ne!(path(dir, b"one busybox"), path(dir, b"another"));
        assert!(path(dir, b"x").to_string_lossy().ends_with(".qcow2"));
    }

    #[test]
    fn root_init_starts_the_guest_program_and_names_its_root() {
        assert!(ROOT_INIT.starts_with("#!/bin/busybox sh\n"));
        assert!(ROOT_INIT.contains(ROOT_BANNER.trim_end()));
        assert!(ROOT_INIT.trim_end().ends_with("exec /bin/walkabout-guest"));
    }
}
