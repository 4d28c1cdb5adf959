//! The kernel modules the guest needs, taken from the Debian kernel package.
//!
//! Debian builds virtio, SCSI and ext4 as modules (`CONFIG_VIRTIO_BLK=m`, ...), and the
//! package carries no `modules.dep` (depmod makes it at install time, and nothing is
//! installed here). So the load order is worked out from each module's own `.modinfo`
//! strings: `depends=a,b` names the modules that must be loaded first. The initramfs
//! `/init` loads them with busybox `insmod` in that order.
//!
//! `softdep=` and aliases are not followed (the guest has no modprobe); where a module
//! needs one (ext4 and jbd2 ask for the `crc32c` crypto algorithm at mount time), the
//! provider is listed in [`GUEST_MODULES`] before it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::ImageError;

/// The modules the guest loads, by module name; their dependencies come along.
/// `virtio_console` gives a VM with free will its `org.walkabout.0` port.
pub(crate) const GUEST_MODULES: &[&str] =
    &["virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "virtio_net", "crc32c_generic", "ext4", "virtio_console"];

/// A module name as the kernel spells it (`crc32c-intel.ko` is module `crc32c_intel`).
fn module_name(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|ext| file_name.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// Every module file under `dir` (recursively), by module name.
fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>, ImageError> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        let entries = fs::read_dir(&d).map_err(|source| ImageError::Io { action: "list", path: d.clone(), source })?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
                found.insert(name, path);
            }
        }
    }
    Ok(found)
}

/// The `depends=` list of a module's `.modinfo` (NUL-separated `key=value` strings).
pub(crate) fn depends(ko: &[u8]) -> Vec<String> {
    ko.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|list| String::from_utf8_lossy(list).split(',').filter(|d| !d.is_empty()).map(|d| d.replace('-', "_")).collect())
        .unwrap_or_default()
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz` with the system's
/// tools (busybox `insmod` takes plain ELF only).
fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    let Some(tool) = tool else {
        return fs::read(path).map_err(|source| ImageError::Io { action: "read kernel module", path: path.to_owned(), source });
    };
    let command = format!("{tool} -dc {name}");
    let out = std::process::Command::new(tool)
        .args(["-dc"])
        .arg(path)
        .output()
        .map_err(|source| ImageError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// The modules `wanted` and everything they depend on, in load order (dependencies
/// first), read from the unpacked package's `lib/modules/<version>/` tree. A module the
/// tree does not hold but `modules.builtin` names is built in and skipped.
pub(crate) fn collect(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let files = index(&modules_dir.join("kernel"))?;
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let builtin: Vec<String> = builtin.lines().filter_map(|l| l.rsplit('/').next()).filter_map(module_name).collect();
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    // Depth-first, post-order; `visiting` catches a dependency cycle instead of looping.
    let mut visiting: Vec<String> = Vec::new();
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        builtin: &[String],
        order: &mut Vec<(String, Vec<u8>)>,
        visiting: &mut Vec<String>,
    ) -> Result<(), ImageError> {
        if order.iter().any(|(n, _)| n == name) || visiting.iter().any(|n| n == name) {
            return Ok(());
        }
        let Some(path) = files.get(name) else {
            if builtin.iter().any(|b| b == name) {
                return Ok(());
            }
            return Err(ImageError::MissingInPackage { package: "the kernel package".to_owned(), wanted: format!("kernel module {name}") });
        };
        let bytes = read_module(path)?;
        visiting.push(name.to_owned());
        for dep in depends(&bytes) {
            visit(&dep, files, builtin, order, visiting)?;
        }
        visiting.pop();
        order.push((name.to_owned(), bytes));
        Ok(())
    }
    for name in wanted {
        visit(name, &files, &builtin, &mut order, &mut visiting)?;
    }
    Ok(order)
}

/// Where the modules of kernel `version` are cached: `<name>.ko` files and `order`.
pub(crate) fn cache_path(cache_dir: &Path, version: &str) -> PathBuf {
    cache_dir.join("kernel").join(format!("modules-{version}"))
}

/// The cached modules of `version` in load order, if they are all there.
pub(crate) fn cached(cache_dir: &Path, version: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let dir = cache_path(cache_dir, version);
    let order = fs::read_to_string(dir.join("order")).ok()?;
    // A cache made when fewer modules were wanted is taken again from the package.
    if !covers(&order, GUEST_MODULES) {
        return None;
    }
    order.lines().filter(|l| !l.is_empty()).map(|n| Some((n.to_owned(), fs::read(dir.join(format!("{n}.ko"))).ok()?))).collect()
}

/// True when the load order `order` (one module a line) names every module of `wanted`.
fn covers(order: &str, wanted: &[&str]) -> bool {
    wanted.iter().all(|w| order.lines().any(|l| l == *w))
}

/// Caches `modules` (load order) for kernel `version`: written into a scratch directory,
/// then renamed into place whole.
pub(crate) fn store(cache_dir: &Path, version: &str, modules: &[(String, Vec<u8>)], scratch: &Path) -> Result<(), ImageError> {
    let tmp = scratch.join("modules");
    fs::create_dir_all(&tmp).map_err(|source| ImageError::Io { action: "create", path: tmp.clone(), source })?;
    for (name, bytes) in modules {
        let p = tmp.join(format!("{name}.ko"));
        fs::write(&p, bytes).map_err(|source| ImageError::Io { action: "write", path: p.clone(), source })?;
    }
    let order: String = modules.iter().map(|(n, _)| format!("{n}\n")).collect();
    let p = tmp.join("order");
    fs::write(&p, order).map_err(|source| ImageError::Io { action: "write", path: p.clone(), source })?;
    let dest = cache_path(cache_dir, version);
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&tmp, &dest).map_err(|source| ImageError::Io { action: "rename into place", path: dest, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_without_a_wanted_module_is_not_used() {
        assert!(covers("virtio\nvirtio_console\n", &["virtio_console"]));
        assert!(!covers("virtio\nvirtio_pci\n", &["virtio_pci", "virtio_console"]));
    }

    #[test]
    fn depends_are_read_from_modinfo_strings() {
        let ko = b"\x7fELF...\0license=GPL\0depends=virtio_ring,virtio-pci-legacy-dev\0intree=Y\0";
        assert_eq!(depends(ko), vec!["virtio_ring".to_owned(), "virtio_pci_legacy_dev".to_owned()]);
        assert_eq!(depends(b"\0depends=\0"), Vec::<String>::new());
        assert_eq!(depends(b"no modinfo here"), Vec::<String>::new());
    }

    #[test]
    fn module_names_use_underscores_and_drop_the_extension() {
        assert_eq!(module_name("crc32c-intel.ko").as_deref(), Some("crc32c_intel"));
        assert_eq!(module_name("ext4.ko.xz").as_deref(), Some("ext4"));
        assert_eq!(module_name("modules.order"), None);
    }

    #[test]
    fn dependencies_load_first_and_once_and_builtins_are_skipped() {
        let dir = std::env::temp_dir().join(format!("walkabout-modules-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let k = dir.join("kernel").join("drivers");
        fs::create_dir_all(&k).expect("mkdir");
        fs::write(k.join("a.ko"), b"\0depends=b,c\0").expect("a");
        fs::write(k.join("b.ko"), b"\0depends=c,builtin-one\0").expect("b");
        fs::write(k.join("c.ko"), b"\0depends=\0").expect("c");
        fs::write(dir.join("modules.builtin"), "kernel/lib/builtin-one.ko\n").expect("builtin");

        let order = collect(&dir, &["a", "c"]).expect("collect");
        let missing = collect(&dir, &["nope"]);

        assert_eq!(order.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["c", "b", "a"]);
        assert!(matches!(missing, Err(ImageError::MissingInPackage { .. })));
        let _ = fs::remove_dir_all(&dir);
    }
}
