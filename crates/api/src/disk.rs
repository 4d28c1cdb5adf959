//! A VM's disks: what the user asks for ([`DiskSpec`]) and how a migration moves them
//! ([`StorageMode`]).
//!
//! At creation the agent resolves every disk to an image on its host (an image the user
//! brought, or a new qcow2 in its storage directory) and pins its format, so the spec
//! that travels with the VM names exactly what QEMU opens. A migration with
//! [`StorageMode::Copy`] rewrites `path` to the destination's own image.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use utoipa::ToSchema;

/// An image format QEMU's block layer opens (`qemu-img` does all image work).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// QEMU's copy-on-write format: sparse, backing files, snapshots.
    Qcow2,
    /// A plain byte-for-byte image.
    Raw,
}

impl DiskFormat {
    /// QEMU's driver name for the format.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qcow2" => Ok(DiskFormat::Qcow2),
            "raw" => Ok(DiskFormat::Raw),
            o => Err(format!("unknown disk format '{o}': expected qcow2 or raw")),
        }
    }
}

/// The virtual controller a disk hangs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// One virtio-blk PCI device per disk (`/dev/vdX` in the guest).
    #[default]
    VirtioBlk,
    /// A disk on the VM's virtio-scsi controller (`/dev/sdX` in the guest).
    VirtioScsi,
}

impl std::fmt::Display for DiskBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskBus::VirtioBlk => "virtio-blk",
            DiskBus::VirtioScsi => "virtio-scsi",
        })
    }
}

impl std::str::FromStr for DiskBus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "virtio-blk" | "virtio" => Ok(DiskBus::VirtioBlk),
            "virtio-scsi" | "scsi" => Ok(DiskBus::VirtioScsi),
            o => Err(format!("unknown disk bus '{o}': expected virtio-blk or virtio-scsi")),
        }
    }
}

/// One disk of a VM (`VmSpec::disks`; the first one is `/dev/vda` on virtio-blk).
///
/// Either `path` (bring your own image) or `size_bytes` (a new qcow2 in the agent's
/// storage directory). Once created, `path` and `format` are always set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskSpec {
    /// The image on the VM's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    /// Its format; probed with `qemu-img info` when not given, then pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Size of a new image, bytes (only without `path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// The controller it hangs off.
    #[serde(default)]
    pub bus: DiskBus,
}

impl DiskSpec {
    /// A disk on an existing image.
    pub fn image(path: impl Into<PathBuf>) -> DiskSpec {
        DiskSpec { path: Some(path.into()), format: None, size_bytes: None, bus: DiskBus::default() }
    }

    /// A new qcow2 of `size_bytes` in the agent's storage directory.
    pub fn new_qcow2(size_bytes: u64) -> DiskSpec {
        DiskSpec { path: None, format: Some(DiskFormat::Qcow2), size_bytes: Some(size_bytes), bus: DiskBus::default() }
    }

    /// QEMU node name of disk number `index` (its format node; the device is `<node>-dev`).
    pub fn node_name(index: usize) -> String {
        format!("disk{index}")
    }
}

/// How a migration moves a VM's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// `shared` when both hosts see the same image files, `copy` otherwise.
    #[default]
    Auto,
    /// Both hosts open the same image path (shared storage); QEMU hands the image over
    /// at switchover. The agents prove it is the same file before starting.
    Shared,
    /// No shared storage: the destination creates its own image and exports it over NBD;
    /// the source mirrors into it (`blockdev-mirror`, write-blocking) before memory moves.
    Copy,
}

spelled!(StorageMode, "unknown storage mode '{}': expected auto, shared or copy", { Auto => "auto", Shared => "shared", Copy => "copy" });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_through_serde_and_from_str() {
        for b in [DiskBus::VirtioBlk, DiskBus::VirtioScsi] {
            assert_eq!(serde_json::to_value(b).ok(), Some(serde_json::Value::String(b.to_string())));
            assert_eq!(b.to_string().parse::<DiskBus>(), Ok(b));
        }
        for m in [StorageMode::Auto, StorageMode::Shared, StorageMode::Copy] {
            assert_eq!(serde_json::to_value(m).ok(), Some(serde_json::Value::String(m.to_string())));
            assert_eq!(m.to_string().parse::<StorageMode>(), Ok(m));
        }
        assert!("vmdk".parse::<DiskFormat>().is_err());
    }
}
