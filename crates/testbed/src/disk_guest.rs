//! A guest with a data disk, for the end-to-end tests of disk copies (`--storage copy`
//! under TLS, through the relay): a scratch directory with a qcow2 whose tail is written
//! (the guest's disk workload owns its head), so a copy has that much to carry before
//! memory moves, which keeps the destination's listeners open long enough to try them;
//! and the spec of a VM dirtying memory and disk on it. Needs `qemu-img` and `qemu-io`.
//! Also: the TCP addresses a process (a destination's QEMU) listens on.

use crate::error::{Result, TestbedError};
use crate::files::TempDir;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use walkabout_api::{DiskFormat, DiskSpec, VmSpec};

/// The guest's memory, MiB.
const MEMORY_MIB: u64 = 256;
/// Its workload: 32 MiB of memory and the disk's first 32 MiB rewritten at 8 MiB/s.
const WORKLOAD: &str = "dirty:32:8,disk:32:8";

/// A scratch directory (removed on drop) holding one written qcow2 disk.
#[derive(Debug)]
pub struct DiskGuest {
    dir: TempDir,
    disk: PathBuf,
}

impl DiskGuest {
    /// A qcow2 of `size_mib` MiB in a new scratch directory (`tag` names it), written
    /// with a pattern from `written_from_mib` MiB to its end.
    pub fn new(tag: &str, size_mib: u64, written_from_mib: u64) -> Result<DiskGuest> {
        let dir = TempDir::new(tag)?;
        let disk = dir.path().join("disk.qcow2");
        let p = disk.to_string_lossy().into_owned();
        let write = format!("write -P 7 {written_from_mib}M {}M", size_mib.saturating_sub(written_from_mib));
        let size = format!("{size_mib}M");
        for (prog, args) in
            [("qemu-img", vec!["create", "-q", "-f", "qcow2", &p, &size]), ("qemu-io", vec!["-f", "qcow2", "-c", &write, &p])]
        {
            let command = format!("{prog} {}", args.join(" "));
            let out = Command::new(prog).args(&args).output().map_err(|e| TestbedError::io(format!("running {command}"), e))?;
            if !out.status.success() {
                return Err(TestbedError::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
            }
        }
        Ok(DiskGuest { dir, disk })
    }

    /// The disk image.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// VM `name` (256 MiB) on this disk, dirtying 32 MiB of memory and the disk's first
    /// 32 MiB, each at 8 MiB/s.
    pub fn spec(&self, name: &str) -> VmSpec {
        let mut spec = VmSpec::new(name, MEMORY_MIB);
        spec.workload = WORKLOAD.into();
        spec.disks =
            vec![DiskSpec { path: Some(self.disk.clone()), format: Some(DiskFormat::Qcow2), size_bytes: None, bus: Default::default() }];
        spec
    }
}

/// The IPv4 TCP addresses process `pid` listens on, as its own network namespace lists
/// them (`/proc/PID/net/tcp`, matched against the sockets in `/proc/PID/fd`).
pub fn listening(pid: i32) -> Vec<SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| l.to_string_lossy().strip_prefix("socket:[").map(|s| s.trim_end_matches(']').to_string()))
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            let (ip, port) = local.split_once(':')?;
            let ip = Ipv4Addr::from(u32::from_be(u32::from_str_radix(ip, 16).ok()?));
            let port = u16::from_str_radix(port, 16).ok()?;
            (*state == "0A" && inodes.iter().any(|i| i == inode)).then_some(SocketAddr::from((ip, port)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_seen_listening_where_it_listens() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        assert!(listening(std::process::id() as i32).contains(&addr), "{addr} not in {:?}", listening(std::process::id() as i32));
    }
}
