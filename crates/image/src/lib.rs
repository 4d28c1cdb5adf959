//! The guest image: a Debian kernel plus an initramfs of busybox and the guest program
//! (`crates/guest`), built by Walkabout itself and cached.
//!
//! - [`build`] returns a [`GuestImage`] (kernel and initrd paths), fetching and building
//!   what the cache lacks. The kernel comes from Debian's `linux-image-<ver>-amd64` and
//!   busybox from `busybox-static`, both fetched with `apt-get download` and unpacked with
//!   `dpkg -x` into a scratch directory, never installed. The guest program is compiled
//!   statically by this crate's build script and embedded in it, so building the image
//!   needs no separate cargo command.
//! - [`cmdline`] gives the kernel command line that starts a workload.
//! - [`check_kernel`] and [`check_initrd`] recognise user-supplied files before QEMU is
//!   started with them.
//!
//! Cache layout (one directory, [`default_cache_dir`] unless told otherwise):
//!
//! ```text
//! build.lock                       flock(2)ed for the whole of a build
//! kernel/VERSION                   e.g. "6.1.0-56-amd64", written last
//! kernel/vmlinuz-<VERSION>         the bzImage, as packaged
//! kernel/vmlinux-<VERSION>         the same kernel unpacked, booted through PVH (faster)
//! kernel/modules-<VERSION>/        the guest's kernel modules (virtio, SCSI disk, ext4 and
//!                                  their dependencies) as plain .ko, and their load `order`
//! busybox/busybox                  the static busybox
//! rootfs-<key>.qcow2               the root disk (ext4: busybox, guest program, /init),
//!                                  read-only; <key> hashes its contents
//! initrd-<key>.cpio                the initramfs; <key> hashes the guest program, /init,
//!                                  the kernel version and the module list
//! ```
//!
//! Every file is written under a temporary name and renamed into place, so a reader never
//! sees half a file, and two processes building at once are serialised by the lock (the
//! second one finds the first one's result). Once cached, a build runs no apt command at
//! all; delete the directory to fetch a newer kernel.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

mod cpio;
mod debian;
mod elf;
mod hyper;
mod lock;
mod modules;
mod rootfs;
mod vmlinux;

pub use hyper::{build_hyper, seed_disk, HyperImage, HYPER_AGENT_PORT, HYPER_BANNER, HYPER_INIT, HYPER_RESERVE_MIB, SEED_IDENTITY};
pub use rootfs::ROOT_BANNER;
pub use walkabout_guest::workload::{ParseWorkloadError, Workload};

use debian::{Apt, BUSYBOX_PACKAGE};

/// The guest program, compiled statically for x86_64 Linux by build.rs.
static GUEST_PROGRAM: &[u8] = include_bytes!(env!("WALKABOUT_GUEST_BINARY"));

/// The initramfs `/init`: mounts the kernel's file systems, loads the kernel modules
/// (virtio, SCSI disk, ext4; in dependency order) and becomes the guest program, or, with
/// `root=<device>` on the kernel command line, mounts that ext4 device and switches to it
/// (its `/init` then becomes the guest program). A root that cannot be mounted is
/// reported on the console and the guest runs from the initramfs instead.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || echo "WALKABOUT ERROR cannot load kernel module $m"
done
echo "walkabout-init: block devices: $(ls /sys/block | tr '
' ' ')"
root=
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root="${arg#root=}" ;; esac
done
if [ -n "$root" ]; then
    i=0
    while [ ! -b "$root" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    mkdir -p /newroot
    if mount -t ext4 "$root" /newroot; then
        if [ -x /newroot/init ]; then
            for fs in proc sys dev; do mount -o move /$fs /newroot/$fs; done
            exec switch_root /newroot /init
        fi
        umount /newroot
    fi
    echo "WALKABOUT ERROR cannot boot from root=$root (no such device, not ext4, or no /init on it); running from the initramfs"
fi
exec /bin/walkabout-guest
"#;

/// Bumped when the initramfs layout changes in a way the key would not otherwise see.
const INITRAMFS_LAYOUT: &str = "walkabout-initramfs-v2";

/// A guest image: what QEMU needs for `-kernel`, `-initrd` (and [`cmdline`] for
/// `-append`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestImage {
    /// The kernel: an uncompressed `vmlinux` with a PVH entry point, which boots in about
    /// half the time of the packaged bzImage under TCG, or the bzImage itself where it
    /// cannot be unpacked. Both pass [`check_kernel`]; QEMU's `-kernel` takes either.
    pub kernel: PathBuf,
    /// The initramfs (an uncompressed newc cpio archive).
    pub initrd: PathBuf,
    /// The kernel's release, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// The root disk: a read-only qcow2 holding an ext4 file system with busybox and the
    /// guest program, booted with this kernel and initrd and `root=/dev/vda` (VMs run on
    /// an overlay of it, never on it).
    pub rootfs: PathBuf,
}

/// Errors while building or checking a guest image; each names the file or command.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Cannot {action} {path}: {source}
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done (e.g. `read kernel`).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Cannot run `{command}`: {source} (the guest image is built with apt-get and dpkg
    /// from a Debian system)
    #[error(
        "cannot run `{command}`: {source} (the guest image is built with apt-get and dpkg \
         from a Debian system; elsewhere pass your own kernel and initrd)"
    )]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not be started.
        source: io::Error,
    },
    /// `{command}` failed ({status}): {stderr}
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// What it wrote on stderr.
        stderr: String,
    },
    /// `apt-cache depends {meta}` names no linux-image-<version>-amd64 package
    #[error("`apt-cache depends {meta}` names no linux-image-<version>-amd64 package; it said: {output}")]
    NoKernelPackage {
        /// The meta-package asked about.
        meta: &'static str,
        /// What apt-cache printed.
        output: String,
    },
    /// Package {package} has no {wanted}
    #[error("package {package} has no {wanted}")]
    MissingInPackage {
        /// The Debian package.
        package: String,
        /// What was looked for in it.
        wanted: String,
    },
    /// Kernel {path} is not a Linux kernel (no bzImage header, nor an ELF vmlinux with a
    /// PVH entry point)
    #[error(
        "kernel {} is not a Linux kernel (no bzImage header, nor an ELF vmlinux with a PVH \
         entry point)",
        path.display()
    )]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// Initrd {path} is not an initramfs
    #[error(
        "initrd {} is not an initramfs (expected a newc cpio archive, or one compressed with \
         gzip, zstd, xz, lzma, bzip2, lzo or lz4)",
        path.display()
    )]
    NotAnInitrd {
        /// The file.
        path: PathBuf,
    },
}

pub(crate) fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { action, path, source }
}

/// The default cache directory: `$WALKABOUT_CACHE`, else `$XDG_CACHE_HOME/walkabout`,
/// else `~/.cache/walkabout` (else `walkabout-cache` in the temporary directory when
/// there is no home either).
pub fn default_cache_dir() -> PathBuf {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty("WALKABOUT_CACHE") {
        return dir;
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return dir.join("walkabout");
    }
    match non_empty("HOME") {
        Some(home) => home.join(".cache").join("walkabout"),
        None => std::env::temp_dir().join("walkabout-cache"),
    }
}

/// The default kernel command line for a guest running `workload`: serial console,
/// quiet boot, and a kernel panic ends the VM (with QEMU's `-no-reboot`) instead of
/// rebooting it.
pub fn cmdline(workload: &Workload) -> String {
    format!("console=ttyS0 quiet panic=-1 {}={workload}", walkabout_guest::cmdline::WORKLOAD_PARAM)
}

/// The guest program embedded in this crate (a static x86_64 Linux executable).
pub fn guest_program() -> &'static [u8] {
    GUEST_PROGRAM
}

/// Builds the guest image into `cache_dir`, or returns the cached one. Safe to call
/// from several processes at once (they are serialised on a lock file).
pub fn build(cache_dir: &Path) -> Result<GuestImage, ImageError> {
    fs::create_dir_all(cache_dir).map_err(io_error("create cache directory", cache_dir))?;
    let _lock = lock::Exclusive::acquire(&cache_dir.join("build.lock"))?;
    let mut apt = Apt::default();
    let (kernel, kernel_version) = ensure_kernel(cache_dir, &mut apt)?;
    let initrd = ensure_initrd(cache_dir, &mut apt, &kernel_version)?;
    let rootfs = rootfs::ensure(cache_dir, &ensure_busybox(cache_dir, &mut apt)?)?;
    Ok(GuestImage { kernel, initrd, kernel_version, rootfs })
}

/// The image in `cache_dir` if [`build`] already made it for this guest program, without
/// building or fetching anything.
pub fn cached(cache_dir: &Path) -> Result<Option<GuestImage>, ImageError> {
    let Some((kernel, kernel_version)) = cached_kernel(cache_dir)? else {
        return Ok(None);
    };
    let initrd = initrd_path(cache_dir, &kernel_version);
    if !initrd.is_file() {
        return Ok(None);
    }
    let Ok(busybox) = fs::read(cache_dir.join("busybox").join("busybox")) else {
        return Ok(None);
    };
    let rootfs = rootfs::path(cache_dir, &busybox);
    if !rootfs.is_file() {
        return Ok(None);
    }
    Ok(Some(GuestImage { kernel, initrd, kernel_version, rootfs }))
}

/// Checks that `path` is an x86 Linux kernel QEMU can boot with `-kernel`: a bzImage
/// (boot flag `0xAA55` at offset 0x1FE and the `HdrS` setup header magic at 0x202), or
/// an x86-64 ELF `vmlinux` with a Xen PVH entry note.
pub fn check_kernel(path: &Path) -> Result<(), ImageError> {
    let head = read_head(path, 0x206, "read kernel")?;
    let is_bzimage = head.len() == 0x206 && head[0x1FE..0x200] == [0x55, 0xAA] && &head[0x202..0x206] == b"HdrS";
    if is_bzimage || (head.starts_with(b"\x7fELF") && vmlinux::is_pvh_vmlinux(path)?) {
        Ok(())
    } else {
        Err(ImageError::NotAKernel { path: path.to_owned() })
    }
}

/// Checks that `path` looks like an initramfs the kernel can unpack: a newc cpio archive
/// (`070701`/`070702`) or a compressed one (gzip, zstd, xz, lzma, bzip2, lzo, lz4).
pub fn check_initrd(path: &Path) -> Result<(), ImageError> {
    const MAGICS: [&[u8]; 9] = [
        b"070701",
        b"070702",
        &[0x1F, 0x8B],
        &[0x28, 0xB5, 0x2F, 0xFD],
        &[0xFD, b'7', b'z', b'X', b'Z', 0x00],
        &[0x5D, 0x00, 0x00],
        b"BZh",
        &[0x89, b'L', b'Z', b'O'],
        &[0x02, 0x21, 0x4C, 0x18],
    ];
    let head = read_head(path, 6, "read initrd")?;
    if MAGICS.iter().any(|magic| head.starts_with(magic)) {
        Ok(())
    } else {
        Err(ImageError::NotAnInitrd { path: path.to_owned() })
    }
}

/// Up to `len` first bytes of `path`.
fn read_head(path: &Path, len: u64, action: &'static str) -> Result<Vec<u8>, ImageError> {
    let file = fs::File::open(path).map_err(io_error(action, path))?;
    let mut head = Vec::new();
    file.take(len).read_to_end(&mut head).map_err(io_error(action, path))?;
    Ok(head)
}

/// FNV-1a, 64 bits: a cache key, not a defence against anyone.
pub(crate) fn fnv1a64(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .flat_map(|part| part.iter())
        .fold(0xcbf2_9ce4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Where the initramfs for this guest program, /init and the modules of kernel
/// `kernel_version` lives in `cache_dir`.
fn initrd_path(cache_dir: &Path, kernel_version: &str) -> PathBuf {
    let wanted = modules::GUEST_MODULES.join(",");
    let key = fnv1a64(&[INITRAMFS_LAYOUT.as_bytes(), INIT_SCRIPT.as_bytes(), kernel_version.as_bytes(), wanted.as_bytes(), GUEST_PROGRAM]);
    cache_dir.join(format!("initrd-{key:016x}.cpio"))
}

/// The initramfs archive around `busybox` and the kernel `modules` (in load order).
fn initramfs(busybox: &[u8], modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut archive = cpio::Archive::new();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "lib", "lib/modules"] {
        archive.dir(dir);
    }
    for (name, bytes) in modules {
        archive.file(&format!("lib/modules/{name}.ko"), 0o644, bytes);
    }
    let order: String = modules.iter().map(|(n, _)| format!("{n}\n")).collect();
    archive.file("lib/modules/order", 0o644, order.as_bytes());
    // So the kernel can give /init a console before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1);
    archive.file("bin/busybox", 0o755, busybox);
    archive.symlink("bin/sh", "busybox");
    archive.file("bin/walkabout-guest", 0o755, GUEST_PROGRAM);
    archive.file("init", 0o755, INIT_SCRIPT.as_bytes());
    archive.finish()
}

/// A scratch directory inside the cache (same file system, so results can be renamed
/// out of it), removed when dropped.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(cache_dir: &Path, what: &str) -> Result<Scratch, ImageError> {
        let path = cache_dir.join(format!(".tmp-{what}-{}", std::process::id()));
        // A leftover from a crashed build of this pid: remove it.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(io_error("create scratch directory", &path))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove scratch directory");
        }
    }
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, bytes).map_err(io_error("write", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_error("set permissions of", &tmp))?;
    fs::rename(&tmp, path).map_err(io_error("rename into place", path))
}

/// The packaged bzImage in the cache and its version.
fn cached_bzimage(cache_dir: &Path) -> Result<Option<(PathBuf, String)>, ImageError> {
    let version_file = cache_dir.join("kernel").join("VERSION");
    let version = match fs::read_to_string(&version_file) {
        Ok(v) => v.trim().to_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", &version_file)(e)),
    };
    let bzimage = cache_dir.join("kernel").join(format!("vmlinuz-{version}"));
    Ok((!version.is_empty() && check_kernel(&bzimage).is_ok()).then_some((bzimage, version)))
}

/// Where the unpacked kernel of `version` lives in the cache.
fn vmlinux_path(cache_dir: &Path, version: &str) -> PathBuf {
    cache_dir.join("kernel").join(format!("vmlinux-{version}"))
}

/// The kernel to boot from the cache (the unpacked one if there is one) and its version.
fn cached_kernel(cache_dir: &Path) -> Result<Option<(PathBuf, String)>, ImageError> {
    let Some((bzimage, version)) = cached_bzimage(cache_dir)? else {
        return Ok(None);
    };
    let vmlinux = vmlinux_path(cache_dir, &version);
    if vmlinux.is_file() && vmlinux::is_pvh_vmlinux(&vmlinux)? {
        return Ok(Some((vmlinux, version)));
    }
    Ok(Some((bzimage, version)))
}

/// Fetches the kernel package and caches its bzImage.
fn fetch_bzimage(cache_dir: &Path, apt: &mut Apt) -> Result<(PathBuf, String), ImageError> {
    let package = apt.kernel_package()?;
    let scratch = Scratch::new(cache_dir, "kernel")?;
    let deb = apt.download(&package, &scratch.0)?;
    let unpacked = scratch.0.join("root");
    debian::unpack(&deb, &unpacked)?;
    let (vmlinuz, version) = debian::find_vmlinuz(&unpacked)?
        .ok_or_else(|| ImageError::MissingInPackage { package: package.clone(), wanted: "boot/vmlinuz-*".to_owned() })?;
    check_kernel(&vmlinuz)?;
    let dir = cache_dir.join("kernel");
    fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
    cache_modules(cache_dir, &unpacked, &version, &scratch.0)?;
    let bzimage = dir.join(format!("vmlinuz-{version}"));
    fs::rename(&vmlinuz, &bzimage).map_err(io_error("rename into place", &bzimage))?;
    write_atomically(&dir.join("VERSION"), format!("{version}\n").as_bytes(), 0o644)?;
    tracing::info!(kernel = %bzimage.display(), %version, "kernel cached");
    Ok((bzimage, version))
}

/// The kernel to boot, fetched and unpacked as needed. Where the bzImage cannot be
/// unpacked, it is booted as it is (slower, but it works).
fn ensure_kernel(cache_dir: &Path, apt: &mut Apt) -> Result<(PathBuf, String), ImageError> {
    let (bzimage, version) = match cached_bzimage(cache_dir)? {
        Some(found) => found,
        None => fetch_bzimage(cache_dir, apt)?,
    };
    let vmlinux = vmlinux_path(cache_dir, &version);
    if vmlinux.is_file() && vmlinux::is_pvh_vmlinux(&vmlinux)? {
        return Ok((vmlinux, version));
    }
    let scratch = Scratch::new(cache_dir, "vmlinux")?;
    let unpacked = scratch.0.join("vmlinux");
    match vmlinux::extract(&bzimage, &unpacked, &scratch.0) {
        Ok(()) => {
            fs::rename(&unpacked, &vmlinux).map_err(io_error("rename into place", &vmlinux))?;
            Ok((vmlinux, version))
        }
        Err(why) => {
            tracing::warn!(
                bzimage = %bzimage.display(),
                "booting the bzImage (slower under TCG): cannot unpack its vmlinux: {why}"
            );
            Ok((bzimage, version))
        }
    }
}

/// Takes the guest's kernel modules from an unpacked kernel package into the cache.
fn cache_modules(cache_dir: &Path, unpacked: &Path, version: &str, scratch: &Path) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let tree = unpacked.join("lib").join("modules").join(version);
    let found = modules::collect(&tree, modules::GUEST_MODULES)?;
    modules::store(cache_dir, version, &found, scratch)?;
    tracing::info!(kernel = %version, modules = found.len(), "kernel modules cached");
    Ok(found)
}

/// The guest's kernel modules for kernel `version` (load order), from the cache or from
/// that kernel's package (fetched again when an older cache holds only the kernel).
fn ensure_modules(cache_dir: &Path, apt: &mut Apt, version: &str) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    if let Some(found) = modules::cached(cache_dir, version) {
        return Ok(found);
    }
    let package = format!("linux-image-{version}");
    let scratch = Scratch::new(cache_dir, "modules")?;
    let deb = apt.download(&package, &scratch.0)?;
    let unpacked = scratch.0.join("root");
    debian::unpack(&deb, &unpacked)?;
    cache_modules(cache_dir, &unpacked, version, &scratch.0)
}

fn ensure_busybox(cache_dir: &Path, apt: &mut Apt) -> Result<Vec<u8>, ImageError> {
    let path = cache_dir.join("busybox").join("busybox");
    if let Ok(bytes) = fs::read(&path) {
        if elf::is_static_elf64(&bytes) == Some(true) {
            return Ok(bytes);
        }
    }
    let scratch = Scratch::new(cache_dir, "busybox")?;
    let deb = apt.download(BUSYBOX_PACKAGE, &scratch.0)?;
    let unpacked = scratch.0.join("root");
    debian::unpack(&deb, &unpacked)?;
    let found = unpacked.join("bin").join("busybox");
    let bytes = fs::read(&found)
        .map_err(|_| ImageError::MissingInPackage { package: BUSYBOX_PACKAGE.to_owned(), wanted: "bin/busybox".to_owned() })?;
    if elf::is_static_elf64(&bytes) != Some(true) {
        return Err(ImageError::MissingInPackage {
            package: BUSYBOX_PACKAGE.to_owned(),
            wanted: "statically linked bin/busybox".to_owned(),
        });
    }
    let dir = cache_dir.join("busybox");
    fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
    write_atomically(&path, &bytes, 0o755)?;
    Ok(bytes)
}

fn ensure_initrd(cache_dir: &Path, apt: &mut Apt, kernel_version: &str) -> Result<PathBuf, ImageError> {
    let path = initrd_path(cache_dir, kernel_version);
    if check_initrd(&path).is_ok() {
        return Ok(path);
    }
    let busybox = ensure_busybox(cache_dir, apt)?;
    let modules = ensure_modules(cache_dir, apt, kernel_version)?;
    write_atomically(&path, &initramfs(&busybox, &modules), 0o644)?;
    tracing::info!(initrd = %path.display(), "initramfs built");
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory for one test, removed when dropped.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("walkabout-image-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, bytes).expect("write test file");
        path
    }

    fn fake_bzimage() -> Vec<u8> {
        let mut bytes = vec![0u8; 0x400];
        bytes[0x1FE..0x200].copy_from_slice(&[0x55, 0xAA]);
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        bytes
    }

    #[test]
    fn bzimage_header_is_recognised() {
        let dir = temp_dir("bz");
        let path = file_with(&dir, "vmlinuz", &fake_bzimage());
        assert!(check_kernel(&path).is_ok());
    }

    #[test]
    fn text_file_is_not_a_kernel() {
        let dir = temp_dir("notkernel");
        let path = file_with(&dir, "notes.txt", b"hello, I am not a kernel");
        let err = check_kernel(&path).expect_err("must be refused");
        assert_eq!(
            err.to_string(),
            format!(
                "kernel {} is not a Linux kernel (no bzImage header, nor an ELF vmlinux with a \
                 PVH entry point)",
                path.display()
            )
        );
    }

    #[test]
    fn elf_without_pvh_entry_is_not_a_kernel() {
        let dir = temp_dir("elfnotkernel");
        let path = file_with(&dir, "walkabout-guest", guest_program());
        assert!(matches!(check_kernel(&path), Err(ImageError::NotAKernel { .. })));
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let err = check_kernel(Path::new("/nonexistent/vmlinuz")).expect_err("must be refused");
        assert!(err.to_string().starts_with("cannot read kernel /nonexistent/vmlinuz: "), "{err}");
    }

    #[test]
    fn cpio_and_compressed_initrds_are_recognised() {
        let dir = temp_dir("initrds");
        let cpio = file_with(&dir, "a.cpio", &cpio::Archive::new().finish());
        let gz = file_with(&dir, "b.gz", &[0x1F, 0x8B, 8, 0, 0, 0]);
        let zst = file_with(&dir, "c.zst", &[0x28, 0xB5, 0x2F, 0xFD, 0, 0]);
        assert!(check_initrd(&cpio).is_ok() && check_initrd(&gz).is_ok() && check_initrd(&zst).is_ok());
    }

    #[test]
    fn kernel_is_not_an_initrd() {
        let dir = temp_dir("notinitrd");
        let path = file_with(&dir, "vmlinuz", &fake_bzimage());
        assert!(matches!(check_initrd(&path), Err(ImageError::NotAnInitrd { .. })));
    }

    #[test]
    fn guest_program_is_statically_linked() {
        assert_eq!(elf::is_static_elf64(guest_program()), Some(true));
    }

    #[test]
    fn cmdline_names_the_workload_and_the_serial_console() {
        let line = cmdline(&Workload::dirty(16, 32));
        assert_eq!(line, "console=ttyS0 quiet panic=-1 walkabout.workload=dirty:16:32");
    }

    #[test]
    fn cmdline_workload_is_what_the_guest_reads() {
        let workload = Workload::dirty(64, 8);
        let read = walkabout_guest::cmdline::workload_from_cmdline(&cmdline(&workload));
        assert_eq!(read, Ok(workload));
    }

    #[test]
    fn initramfs_is_a_cpio_archive_holding_the_guest_program() {
        let archive = initramfs(b"busybox bytes", &[("virtio".to_owned(), b"\x7fELF module".to_vec())]);
        let holds = |needle: &[u8]| archive.windows(needle.len()).any(|w| w == needle);
        assert!(archive.starts_with(b"070701"));
        assert!(holds(b"bin/walkabout-guest\0") && holds(b"init\0") && holds(b"dev/console\0"));
        assert!(holds(b"lib/modules/virtio.ko\0") && holds(b"lib/modules/order\0") && holds(b"virtio\n"));
        assert!(holds(GUEST_PROGRAM));
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"ab", b"d"]));
    }

    #[test]
    fn nothing_is_cached_in_an_empty_directory() {
        let dir = temp_dir("empty");
        assert_eq!(cached(&dir).ok(), Some(None));
    }

    #[test]
    fn default_cache_dir_ends_in_walkabout() {
        // Whatever the environment, the directory is Walkabout's own.
        let dir = default_cache_dir();
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        assert!(name.contains("walkabout") || std::env::var_os("WALKABOUT_CACHE").is_some(), "{dir:?}");
    }
}
