//! The QEMU process of one VM: its command line, start, re-attach after an agent
//! restart, and stop.
//!
//! QEMU runs daemonized (`-daemonize -pidfile`) so it outlives the agent that started it:
//! an agent restart must not take its VMs down. Every file of the VM (QMP socket, serial
//! console log, pid file) lives in the VM's run directory, so a restarted agent finds
//! them again from its database.

use crate::{Accel, QemuError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest path a Unix socket address can hold (108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Everything needed to start the QEMU of one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QemuConfig {
    /// The QEMU binary (`qemu-system-x86_64` or a path).
    pub binary: String,
    /// The VM's name (shown in `ps` and QMP).
    pub name: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// QEMU CPU model (`qemu64`, `Skylake-Server`, `max`, ...).
    pub cpu_model: String,
    /// Machine type; a versioned one (`pc-q35-10.0`) so both ends of a migration build
    /// the same virtual hardware even when their QEMUs differ.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Accelerator.
    pub accel: Accel,
    /// Kernel image (bzImage).
    pub kernel: PathBuf,
    /// Initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Directory holding the VM's QMP socket, console log and pid file.
    pub run_dir: PathBuf,
    /// `-incoming` URI when this QEMU is a migration destination (e.g. `defer`).
    #[serde(default)]
    pub incoming: Option<String>,
    /// Start with vCPUs stopped (`-S`): a migration destination runs the guest only
    /// when told to, so two copies never run at once.
    #[serde(default)]
    pub start_paused: bool,
    /// Disks, attached with `-blockdev` (one node per image) in this order.
    #[serde(default)]
    pub disks: Vec<QemuDisk>,
    /// NICs: virtio-net on tap devices the agent created beforehand.
    #[serde(default)]
    pub nics: Vec<QemuNic>,
    /// Free will: a virtio-serial port named `org.walkabout.0` whose host end is the
    /// socket [`QemuConfig::will_path`] (QEMU listens; the agent connects). Derived from
    /// the VM's spec, so a migration's destination builds the same device.
    #[serde(default)]
    pub will_port: bool,
}

/// One disk as QEMU opens it: a `file` protocol node under a format node named
/// `node_name`, and a guest device `<node_name>-dev` on `bus`.
///
/// Node names are the same on every host, so a migration's storage copy and QEMU's
/// device state line up between source and destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuDisk {
    /// Format node name (`disk0`).
    pub node_name: String,
    /// The image file on this host.
    pub path: PathBuf,
    /// Its format.
    pub format: walkabout_api::DiskFormat,
    /// The controller the disk hangs off.
    pub bus: walkabout_api::DiskBus,
}

/// One NIC as QEMU opens it: netdev `id` on the existing tap `ifname`, and a
/// virtio-net device `<id>-dev` with a fixed MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuNic {
    /// Netdev id (`net0`).
    pub id: String,
    /// The host tap device (created and attached to its bridge by the agent).
    pub ifname: String,
    /// The guest-visible MAC.
    pub mac: String,
}

fn default_machine() -> String {
    "q35".into()
}

/// Resolves a machine-type alias (`q35`) to the versioned type it stands for on this
/// QEMU (`pc-q35-10.0`), from `-machine help`; a type that is no alias is returned as is.
pub fn resolve_machine(binary: &str, machine: &str) -> Result<String, QemuError> {
    let out = std::process::Command::new(binary)
        .args(["-machine", "help"])
        .output()
        .map_err(|e| QemuError::io(format!("running `{binary} -machine help`"), e))?;
    Ok(alias_target(&String::from_utf8_lossy(&out.stdout), machine).unwrap_or_else(|| machine.to_string()))
}

/// In `-machine help` output, the type `alias` stands for.
fn alias_target(help: &str, alias: &str) -> Option<String> {
    help.lines()
        .find(|l| l.split_whitespace().next() == Some(alias))
        .and_then(|l| l.split("(alias of ").nth(1))
        .and_then(|rest| rest.split(')').next())
        .map(str::to_string)
}

impl QemuConfig {
    /// Path of the QMP socket.
    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    /// Path of the serial console log.
    pub fn console_path(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
    /// Path of the pid file.
    pub fn pid_path(&self) -> PathBuf {
        self.run_dir.join("qemu.pid")
    }
    /// Path of the free-will port's socket.
    pub fn will_path(&self) -> PathBuf {
        self.run_dir.join("will.sock")
    }

    /// The QEMU command line (without the binary).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-name".into(),
            self.name.clone(),
            "-machine".into(),
            self.machine.clone(),
            "-accel".into(),
            match self.accel {
                Accel::Kvm => "kvm".into(),
                // Bounded translation cache: many small guests share a host.
                Accel::Tcg => "tcg,tb-size=128".into(),
            },
            "-cpu".into(),
            self.cpu_model.clone(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            self.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-append".into(),
            self.cmdline.clone(),
            "-serial".into(),
            format!("file:{}", self.console_path().display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp_path().display()),
            "-pidfile".into(),
            self.pid_path().display().to_string(),
            "-daemonize".into(),
        ];
        if let Some(i) = &self.initrd {
            a.push("-initrd".into());
            a.push(i.display().to_string());
        }
        if self.start_paused {
            a.push("-S".into());
        }
        self.push_disks(&mut a);
        for n in &self.nics {
            // JSON syntax: no name or path reaches QEMU's comma-separated option parser.
            let netdev = serde_json::json!({"type": "tap", "id": n.id, "ifname": n.ifname, "script": "no", "downscript": "no"});
            let dev = serde_json::json!({"driver": "virtio-net-pci", "netdev": n.id, "id": format!("{}-dev", n.id), "mac": n.mac});
            a.extend(["-netdev".into(), netdev.to_string(), "-device".into(), dev.to_string()]);
        }
        if self.will_port {
            // `-chardev` takes no JSON: a comma in the path is doubled for its parser.
            let path = self.will_path().display().to_string().replace(',', ",,");
            let chardev = format!("socket,id=will0,path={path},server=on,wait=off");
            let bus = serde_json::json!({"driver": "virtio-serial-pci", "id": "vser0"});
            let port = serde_json::json!({"driver": "virtserialport", "bus": "vser0.0", "chardev": "will0", "name": "org.walkabout.0", "id": "will0-port"});
            a.extend(["-chardev".into(), chardev, "-device".into(), bus.to_string(), "-device".into(), port.to_string()]);
        }
        if let Some(inc) = &self.incoming {
            a.push("-incoming".into());
            a.push(inc.clone());
        }
        a
    }

    /// `-blockdev` nodes and their devices, in JSON syntax so that no path reaches
    /// QEMU's comma-separated option parser. One virtio-scsi controller serves every
    /// virtio-scsi disk.
    fn push_disks(&self, a: &mut Vec<String>) {
        use walkabout_api::DiskBus;
        if self.disks.iter().any(|d| d.bus == DiskBus::VirtioScsi) {
            a.extend(["-device".into(), serde_json::json!({"driver": "virtio-scsi-pci", "id": "scsi0"}).to_string()]);
        }
        for d in &self.disks {
            let node = serde_json::json!({
                "node-name": d.node_name,
                "driver": d.format.as_str(),
                "file": {"driver": "file", "filename": d.path, "node-name": format!("{}-file", d.node_name)},
            });
            let id = format!("{}-dev", d.node_name);
            let dev = match d.bus {
                DiskBus::VirtioBlk => serde_json::json!({"driver": "virtio-blk-pci", "drive": d.node_name, "id": id}),
                DiskBus::VirtioScsi => serde_json::json!({"driver": "scsi-hd", "bus": "scsi0.0", "drive": d.node_name, "id": id}),
            };
            a.extend(["-blockdev".into(), node.to_string(), "-device".into(), dev.to_string()]);
        }
    }
}

/// A running (daemonized) QEMU process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QemuProcess {
    /// Its process id.
    pub pid: i32,
    /// Its QMP socket.
    pub qmp_path: PathBuf,
    /// Its serial console log.
    pub console_path: PathBuf,
}

impl QemuProcess {
    /// Starts QEMU for `cfg` and returns once it has daemonized (its QMP socket exists).
    ///
    /// Errors carry what QEMU printed, e.g. a kernel it could not load.
    pub async fn spawn(cfg: &QemuConfig) -> Result<QemuProcess, QemuError> {
        let qmp_path = cfg.qmp_path();
        let len = qmp_path.as_os_str().len();
        if len > SUN_PATH_MAX {
            return Err(QemuError::SocketPathTooLong { path: qmp_path, len });
        }
        std::fs::create_dir_all(&cfg.run_dir).map_err(|e| QemuError::io(format!("creating {}", cfg.run_dir.display()), e))?;
        for p in [cfg.qmp_path(), cfg.pid_path()] {
            let _ = std::fs::remove_file(p);
        }
        tracing::debug!(vm = %cfg.name, args = ?cfg.args(), "starting QEMU");
        let out =
            tokio::process::Command::new(&cfg.binary).args(cfg.args()).stdin(std::process::Stdio::null()).kill_on_drop(false).output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .map_err(|_| QemuError::StartFailed { vm: cfg.name.clone(), stderr: "QEMU did not daemonize within 60 s".into() })?
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    QemuError::Missing { binary: cfg.binary.clone() }
                } else {
                    QemuError::io(format!("running {}", cfg.binary), e)
                }
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(QemuError::StartFailed {
                vm: cfg.name.clone(),
                stderr: if stderr.is_empty() { format!("QEMU exited with {}", out.status) } else { stderr },
            });
        }
        let pid = read_pid(&cfg.pid_path())?;
        Ok(QemuProcess { pid, qmp_path, console_path: cfg.console_path() })
    }

    /// Re-attaches to a QEMU that an earlier agent started, if it still runs.
    ///
    /// The pid alone is not trusted (pids are reused): the process must still be a QEMU
    /// serving this QMP socket.
    pub fn attach(pid: i32, qmp_path: &Path, console_path: &Path) -> Option<QemuProcess> {
        let p = QemuProcess { pid, qmp_path: qmp_path.to_path_buf(), console_path: console_path.to_path_buf() };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let needle = qmp_path.display().to_string();
        let matches = cmdline.split(|b| *b == 0).any(|arg| String::from_utf8_lossy(arg).contains(&needle));
        (matches && p.is_alive()).then_some(p)
    }

    /// True while the process exists and is not a zombie.
    pub fn is_alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            // Field 3, after the parenthesised command name, is the state.
            Ok(stat) => stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Waits until the process has exited, up to `timeout`. True if it exited.
    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.is_alive() {
            if start.elapsed() > timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        if self.pid <= 1 {
            return;
        }
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; the pid was
        // checked above not to be 0, -1 or init, so this cannot signal a process group.
        unsafe {
            libc::kill(self.pid, signal);
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL if it is still there after `grace`.
    pub async fn kill(&self, grace: Duration) {
        if !self.is_alive() {
            return;
        }
        self.signal(libc::SIGTERM);
        if !self.wait_exit(grace).await {
            self.signal(libc::SIGKILL);
            self.wait_exit(Duration::from_secs(5)).await;
        }
    }
}

fn read_pid(path: &Path) -> Result<i32, QemuError> {
    let text = std::fs::read_to_string(path).map_err(|e| QemuError::io(format!("reading {}", path.display()), e))?;
    text.trim().parse().map_err(|_| {
        QemuError::io(
            format!("reading {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a pid: {text:?}")),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> QemuConfig {
        QemuConfig {
            binary: "qemu-system-x86_64".into(),
            name: "vm1".into(),
            memory_mib: 512,
            vcpus: 2,
            cpu_model: "qemu64".into(),
            machine: "pc-q35-10.0".into(),
            accel: Accel::Tcg,
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            cmdline: "console=ttyS0".into(),
            run_dir: "/run/wa/vm1".into(),
            incoming: Some("defer".into()),
            start_paused: true,
            disks: vec![],
            nics: vec![],
            will_port: false,
        }
    }

    #[test]
    fn free_will_port_is_a_named_virtserialport_on_a_socket_in_the_run_dir() {
        let mut c = cfg();
        c.run_dir = "/run/wa/a,b".into();
        c.will_port = true;
        let a = c.args();
        let chardev = a.windows(2).find(|w| w[0] == "-chardev").map(|w| w[1].clone());
        assert_eq!(chardev.as_deref(), Some("socket,id=will0,path=/run/wa/a,,b/will.sock,server=on,wait=off"));
        let devs: Vec<serde_json::Value> =
            a.windows(2).filter(|w| w[0] == "-device").filter_map(|w| serde_json::from_str(&w[1]).ok()).collect();
        assert_eq!(devs[0]["driver"], "virtio-serial-pci");
        assert_eq!((devs[1]["name"].as_str(), devs[1]["chardev"].as_str()), (Some("org.walkabout.0"), Some("will0")));
        assert!(!cfg().args().iter().any(|x| x == "-chardev"), "no port without free will");
    }

    #[test]
    fn disks_and_nics_are_json_nodes_with_stable_names() {
        use walkabout_api::{DiskBus, DiskFormat};
        let mut c = cfg();
        c.disks = vec![
            QemuDisk { node_name: "disk0".into(), path: "/img/a,b.qcow2".into(), format: DiskFormat::Qcow2, bus: DiskBus::VirtioBlk },
            QemuDisk { node_name: "disk1".into(), path: "/img/c.raw".into(), format: DiskFormat::Raw, bus: DiskBus::VirtioScsi },
        ];
        c.nics = vec![QemuNic { id: "net0".into(), ifname: "wk0".into(), mac: "52:54:00:00:00:01".into() }];
        let a = c.args();
        let after = |flag: &str| -> Vec<serde_json::Value> {
            a.windows(2).filter(|w| w[0] == flag).filter_map(|w| serde_json::from_str(&w[1]).ok()).collect()
        };
        let nodes = after("-blockdev");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0]["file"]["filename"], "/img/a,b.qcow2", "a comma in a path stays in the path");
        assert_eq!((nodes[0]["driver"].as_str(), nodes[1]["driver"].as_str()), (Some("qcow2"), Some("raw")));
        let devs: Vec<String> = after("-device").iter().map(|d| d["driver"].as_str().unwrap_or("").to_string()).collect();
        assert_eq!(devs, ["virtio-scsi-pci", "virtio-blk-pci", "scsi-hd", "virtio-net-pci"]);
        let net = after("-netdev");
        assert_eq!((net[0]["ifname"].as_str(), net[0]["script"].as_str()), (Some("wk0"), Some("no")));
    }

    #[test]
    fn command_line_names_every_file_in_the_run_dir() {
        let a = cfg().args().join(" ");
        assert!(a.contains("-qmp unix:/run/wa/vm1/qmp.sock,server=on,wait=off"), "{a}");
        assert!(a.contains("-serial file:/run/wa/vm1/console.log"), "{a}");
        assert!(a.contains("-pidfile /run/wa/vm1/qemu.pid -daemonize"), "{a}");
        assert!(a.contains("-m 512M -smp 2"), "{a}");
        assert!(a.contains("-machine pc-q35-10.0"), "{a}");
        assert!(a.contains("-S -incoming defer"), "{a}");
    }

    #[test]
    fn machine_aliases_resolve_to_their_versioned_type() {
        let help = "Supported machines are:\nq35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\npc-q35-10.0          Standard PC (Q35 + ICH9, 2009)\n";
        assert_eq!(alias_target(help, "q35").as_deref(), Some("pc-q35-10.0"));
        assert_eq!(alias_target(help, "pc-q35-10.0"), None);
    }

    #[tokio::test]
    async fn socket_path_too_long_is_refused_before_starting() {
        let mut c = cfg();
        c.run_dir = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let err = QemuProcess::spawn(&c).await.expect_err("too long");
        assert!(matches!(err, QemuError::SocketPathTooLong { .. }), "{err}");
    }

    #[test]
    fn attach_refuses_a_pid_that_is_not_our_qemu() {
        let me = std::process::id() as i32;
        assert!(QemuProcess::attach(me, Path::new("/nonexistent/qmp.sock"), Path::new("/x")).is_none());
    }
}
