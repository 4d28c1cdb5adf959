//! A VM's disks on this host: resolved, checked and created before QEMU starts, removed
//! with the VM when the agent made them.
//!
//! Each [`DiskSpec`] of a new VM is one of:
//! - `path`: an image the user brought. Its format is probed (`qemu-img info`) unless
//!   given, then pinned in the stored spec; the path is pinned in canonical form.
//! - `path = "image:<name>"`: a qcow2 overlay on the agent's catalog image `<name>`
//!   (today `guest`: the Walkabout root disk built by `walkabout image build`). The base
//!   stays read-only and is shared by every VM on it; the first such disk becomes the
//!   VM's root (`root=/dev/vdX` on its kernel command line).
//! - `size_bytes`: a new, empty qcow2.
//!
//! Images the agent makes live in its storage directory as `<vm>-disk<N>.qcow2`
//! ([`owned_path`]): that name is how `delete` tells them from brought images, which it
//! never removes.
//!
//! Every image is checked before QEMU starts: missing, not a file, unreadable (truncated
//! or garbage header), a missing backing file, locked by another process, corrupt
//! (`qemu-img check`), or already a disk of another VM of this agent. Any refusal names
//! the disk and the cause, starts nothing, and removes the images made for the VM so far.

use crate::error::AgentError;
use crate::vms::Agent;
use std::path::{Path, PathBuf};
use walkabout_api::{DiskBus, DiskFormat, DiskSpec, VmSpec};
use walkabout_qemu::img::{ImageError, QemuImg};

/// How a disk names an image of the agent's catalog (`image:guest`).
pub const CATALOG_PREFIX: &str = "image:";

/// The catalog's images, by name.
pub const CATALOG_GUEST: &str = "guest";

/// The image the agent makes for disk `index` of VM `vm` in `storage_dir`.
pub fn owned_path(storage_dir: &Path, vm: &str, index: usize) -> PathBuf {
    storage_dir.join(format!("{vm}-disk{index}.qcow2"))
}

/// The name of the guest's block device for disk `index` of `disks` (virtio-blk disks
/// are `vda, vdb, ...` and virtio-scsi ones `sda, sdb, ...`, each in order).
pub fn guest_device(disks: &[DiskSpec], index: usize) -> String {
    let bus = disks.get(index).map(|d| d.bus).unwrap_or_default();
    let before = disks.iter().take(index).filter(|d| d.bus == bus).count();
    let letter = char::from(b'a' + u8::try_from(before % 26).unwrap_or(0));
    match bus {
        DiskBus::VirtioBlk => format!("/dev/vd{letter}"),
        DiskBus::VirtioScsi => format!("/dev/sd{letter}"),
    }
}

/// Images made for a VM being created; removed when dropped unless [`Made::keep`] is
/// called (so every early return of a failed create cleans up).
#[derive(Debug, Default)]
pub(crate) struct Made(Vec<PathBuf>);

impl Made {
    /// The VM exists now: its images stay.
    pub(crate) fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for p in &self.0 {
            match std::fs::remove_file(p) {
                Ok(()) => tracing::info!(image = %p.display(), "removed the image made for a VM that was not created"),
                Err(e) => tracing::warn!(image = %p.display(), error = %e, "cannot remove an image made for a VM that was not created"),
            }
        }
    }
}

impl Agent {
    /// The directory new images go into (`--storage-dir`, else `<data dir>/images`).
    pub fn storage_dir(&self) -> PathBuf {
        let c = &self.inner.config;
        c.storage_dir.clone().unwrap_or_else(|| c.data_dir.join("images"))
    }

    pub(crate) fn qemu_img(&self) -> QemuImg {
        QemuImg::beside(&self.inner.config.qemu_binary)
    }

    /// Resolves, checks and creates the disks of a new VM, pinning each one's path and
    /// format in `spec` (and `root=` for a catalog root disk). Returns the images made,
    /// to be kept once the VM exists.
    pub(crate) async fn prepare_disks(&self, spec: &mut VmSpec) -> Result<Made, AgentError> {
        let mut made = Made::default();
        let vm = spec.name.clone();
        let mut root: Option<usize> = None;
        for i in 0..spec.disks.len() {
            let disk = spec.disks[i].clone();
            let bad = |cause: String| AgentError::InvalidSpec { vm: vm.clone(), reason: format!("disk {i}: {cause}") };
            let resolved = match (&disk.path, disk.size_bytes) {
                (Some(_), Some(_)) => return Err(bad("give either a path or a size, not both".into())),
                (None, None) => return Err(bad("give a path (an image) or a size (a new qcow2)".into())),
                (None, Some(0)) => return Err(bad("size 0: a new disk needs at least one byte".into())),
                (None, Some(size)) => {
                    let path = self.make_image(&vm, i, Some(size), None).await.map_err(|e| bad(e.to_string()))?;
                    made.0.push(path.clone());
                    DiskSpec { path: Some(path), format: Some(DiskFormat::Qcow2), size_bytes: None, bus: disk.bus }
                }
                (Some(p), None) => match p.to_str().and_then(|s| s.strip_prefix(CATALOG_PREFIX)) {
                    Some(name) => {
                        let base = self.catalog_image(name).map_err(bad)?;
                        let path = self.make_image(&vm, i, None, Some((&base, DiskFormat::Qcow2))).await.map_err(|e| bad(e.to_string()))?;
                        made.0.push(path.clone());
                        root.get_or_insert(i);
                        DiskSpec { path: Some(path), format: Some(DiskFormat::Qcow2), size_bytes: None, bus: disk.bus }
                    }
                    None => {
                        if !p.is_absolute() {
                            return Err(bad(format!("path {} must be absolute (a path on the agent's host)", p.display())));
                        }
                        let path = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                        // Another VM of this agent first: its QEMU's lock would only say
                        // "another process".
                        if let Some(owner) = self.owner_of(&path, &vm).await {
                            return Err(bad(format!("image {} is in use by VM `{owner}` of this agent", path.display())));
                        }
                        let chain = self.qemu_img().chain(&path, disk.format).await.map_err(|e| bad(e.to_string()))?;
                        let format = chain.first().map(|l| l.format).ok_or_else(|| bad("qemu-img reported no image".into()))?;
                        DiskSpec { path: Some(path), format: Some(format), size_bytes: None, bus: disk.bus }
                    }
                },
            };
            if let (Some(path), Some(format)) = (&resolved.path, resolved.format) {
                self.qemu_img().check(path, format).await.map_err(|e| bad(e.to_string()))?;
            }
            spec.disks[i] = resolved;
        }
        self.refuse_shared_disks(spec).await?;
        refuse_disk_workload_without_disk(spec, root)?;
        if let Some(i) = root {
            let has_root = spec.cmdline.as_deref().is_some_and(|c| c.split_whitespace().any(|w| w.starts_with("root=")));
            if !has_root {
                let arg = format!("root={}", guest_device(&spec.disks, i));
                spec.cmdline = Some(match spec.cmdline.take() {
                    Some(c) if !c.trim().is_empty() => format!("{c} {arg}"),
                    _ => arg,
                });
            }
        }
        Ok(made)
    }

    /// Refuses a spec naming one image twice, or an image that is a disk of another VM
    /// of this agent (whatever its state: a stopped VM keeps its disks).
    pub(crate) async fn refuse_shared_disks(&self, spec: &VmSpec) -> Result<(), AgentError> {
        let bad = |i: usize, cause: String| AgentError::InvalidSpec { vm: spec.name.clone(), reason: format!("disk {i}: {cause}") };
        for (i, d) in spec.disks.iter().enumerate() {
            let Some(p) = &d.path else { continue };
            if let Some(j) = spec.disks[..i].iter().position(|o| o.path.as_ref() == Some(p)) {
                return Err(bad(i, format!("image {} is already disk {j} of this VM", p.display())));
            }
        }
        for other in self.specs().await {
            if other.name == spec.name {
                continue;
            }
            for (i, d) in spec.disks.iter().enumerate() {
                let Some(p) = &d.path else { continue };
                if other.disks.iter().any(|o| o.path.as_ref() == Some(p)) {
                    return Err(bad(i, format!("image {} is in use by VM `{}` of this agent", p.display(), other.name)));
                }
            }
        }
        Ok(())
    }

    /// The VM of this agent (other than `vm`) that has `path` as a disk.
    async fn owner_of(&self, path: &Path, vm: &str) -> Option<String> {
        self.specs().await.into_iter().find(|o| o.name != vm && o.disks.iter().any(|d| d.path.as_deref() == Some(path))).map(|o| o.name)
    }

    /// The read-only base of catalog image `name`.
    pub(crate) fn catalog_image(&self, name: &str) -> Result<PathBuf, String> {
        if name != CATALOG_GUEST {
            return Err(format!("no catalog image '{name}' (the agent's catalog has: {CATALOG_GUEST})"));
        }
        let cache = self.inner.config.image_cache.clone().unwrap_or_else(walkabout_image::default_cache_dir);
        match walkabout_image::cached(&cache) {
            Ok(Some(image)) => Ok(image.rootfs),
            Ok(None) => Err(format!("the catalog image '{name}' is not built in {} (run `walkabout image build`)", cache.display())),
            Err(e) => Err(format!("the catalog image '{name}': {e}")),
        }
    }

    /// Makes `<storage>/<vm>-disk<index>.qcow2`: empty of `size`, or an overlay on `backing`.
    pub(crate) async fn make_image(
        &self,
        vm: &str,
        index: usize,
        size: Option<u64>,
        backing: Option<(&Path, DiskFormat)>,
    ) -> Result<PathBuf, ImageError> {
        let dir = self.storage_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| ImageError::Tool { command: format!("mkdir {}", dir.display()), detail: e.to_string() })?;
        let path = owned_path(&dir, vm, index);
        if path.exists() {
            return Err(ImageError::Tool {
                command: format!("qemu-img create {}", path.display()),
                detail: "the file already exists (left by an earlier VM of that name? remove it)".into(),
            });
        }
        self.qemu_img().create(&path, DiskFormat::Qcow2, size, backing).await?;
        Ok(path)
    }

    /// Removes the images the agent made for a deleted VM, at creation or by a storage
    /// copy (never brought ones).
    pub(crate) fn remove_owned_disks(&self, spec: &VmSpec) {
        let dir = self.storage_dir();
        for (i, d) in spec.disks.iter().enumerate() {
            let Some(p) = &d.path else { continue };
            // Its own: made at creation, or by a storage copy that brought the VM here.
            if *p != owned_path(&dir, &spec.name, i) && !crate::migration::storage::is_copy_image(&dir, p) {
                continue;
            }
            match std::fs::remove_file(p) {
                Ok(()) => tracing::info!(vm = %spec.name, image = %p.display(), "removed the VM's image"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(vm = %spec.name, image = %p.display(), error = %e, "cannot remove the VM's image"),
            }
        }
    }
}

/// Refuses a disk workload with no disk to write: every disk is the root (or there is
/// none) and `walkabout.disk=` names none. The workload overwrites its disk, so it never
/// falls back to the root.
fn refuse_disk_workload_without_disk(spec: &VmSpec, root: Option<usize>) -> Result<(), AgentError> {
    let Ok(workload) = spec.workload.parse::<walkabout_guest::workload::Workload>() else {
        return Ok(());
    };
    let named = spec.cmdline.as_deref().is_some_and(|c| c.split_whitespace().any(|w| w.starts_with("walkabout.disk=")));
    let scratch = spec.disks.iter().enumerate().any(|(i, _)| Some(i) != root);
    if workload.disk.is_some() && !named && !scratch {
        return Err(AgentError::InvalidSpec {
            vm: spec.name.clone(),
            reason: format!(
                "workload {} writes a disk, but the VM has no disk besides its root (add one: --disk size=1G; it is overwritten)",
                spec.workload
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(bus: DiskBus) -> DiskSpec {
        DiskSpec { bus, ..DiskSpec::image("/x") }
    }

    #[test]
    fn guest_devices_are_lettered_per_bus() {
        let disks = [disk(DiskBus::VirtioBlk), disk(DiskBus::VirtioScsi), disk(DiskBus::VirtioBlk)];
        let names: Vec<String> = (0..3).map(|i| guest_device(&disks, i)).collect();
        assert_eq!(names, ["/dev/vda", "/dev/sda", "/dev/vdb"]);
    }

    #[test]
    fn a_disk_workload_needs_a_disk_besides_the_root() {
        let mut spec = VmSpec::new("v", 256);
        spec.workload = "dirty:8:8,disk:8:8".into();
        spec.disks = vec![disk(DiskBus::VirtioBlk)];

        let only_root = refuse_disk_workload_without_disk(&spec, Some(0));
        let scratch = refuse_disk_workload_without_disk(&spec, None);

        assert!(only_root.is_err_and(|e| e.to_string().contains("no disk besides its root")));
        assert!(scratch.is_ok());
    }

    #[test]
    fn owned_images_are_named_after_the_vm_and_the_disk() {
        assert_eq!(owned_path(Path::new("/s"), "vm1", 2), Path::new("/s/vm1-disk2.qcow2"));
    }

    #[test]
    fn made_images_are_removed_unless_kept() {
        let d = std::env::temp_dir().join(format!("wa-made-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::write(&a, b"a").expect("a");
        std::fs::write(&b, b"b").expect("b");

        drop(Made(vec![a.clone()]));
        Made(vec![b.clone()]).keep();

        assert!(!a.exists() && b.exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
