//! A one-member etcd on loopback, for `walkabout up --ha`, the HA tests and the store
//! benchmark: Debian's `etcd-server` (3.4; `scripts/setup-host.sh` installs it), its
//! data in a directory of ours, ready once its `/health` says so.

use crate::error::{Result, TestbedError};
use crate::process::{log_tail, Daemon};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The etcd program: `$WALKABOUT_ETCD`, else `etcd` on the PATH.
pub fn etcd_program() -> PathBuf {
    std::env::var_os("WALKABOUT_ETCD").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("etcd"))
}

/// A running etcd member on 127.0.0.1; killed (SIGKILL) on drop, its data left in place.
#[derive(Debug)]
pub struct Etcd {
    daemon: Daemon,
    client_port: u16,
    data_dir: PathBuf,
}

impl Etcd {
    /// Starts etcd with its data in `dir/etcd` on two free loopback ports (client, peer)
    /// that the system picks, so etcds started at once get different ports, and waits up
    /// to `limit` until it is healthy.
    pub fn start(dir: &Path, limit: Duration) -> Result<Etcd> {
        let pick = || {
            std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| TestbedError::io("picking a free loopback port for etcd", e))
        };
        let (client, peer) = (pick()?, pick()?);
        Etcd::start_on(dir, client, peer, limit)
    }

    /// Starts etcd with its client port `port` and its peer port `peer_port`.
    pub fn start_on(dir: &Path, port: u16, peer_port: u16, limit: Duration) -> Result<Etcd> {
        let data_dir = dir.join("etcd");
        std::fs::create_dir_all(dir).map_err(|e| TestbedError::io(format!("creating {}", dir.display()), e))?;
        let client = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(etcd_program());
        cmd.arg("--name")
            .arg("walkabout")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("walkabout={peer}")])
            .args(["--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]);
        let log = dir.join("etcd.log");
        let mut daemon = Daemon::spawn("etcd", cmd, &log).map_err(|e| match e {
            TestbedError::Io { what, source } if source.kind() == std::io::ErrorKind::NotFound => TestbedError::Io {
                what: format!("{what}: etcd is not installed (run scripts/setup-host.sh, or set WALKABOUT_ETCD)"),
                source,
            },
            other => other,
        })?;
        let start = Instant::now();
        loop {
            // Healthy, and still ours: an etcd that could not bind has exited, and the
            // health of another on that port is not its own.
            if healthy(port) && daemon.exited().is_none() {
                std::thread::sleep(Duration::from_millis(200));
                if daemon.exited().is_none() {
                    return Ok(Etcd { daemon, client_port: port, data_dir });
                }
            }
            let why = match daemon.exited() {
                Some(status) => format!("exited ({status})"),
                None if start.elapsed() > limit => format!("not healthy after {} s", limit.as_secs()),
                None => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            return Err(TestbedError::Command { command: format!("etcd on {client}"), stderr: format!("{why}; {}", log_tail(&log, 20)) });
        }
    }

    /// Its client address, `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The controller's `--store` for it: `etcd://127.0.0.1:PORT`.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Its pid.
    pub fn pid(&self) -> Option<i64> {
        self.daemon.pid()
    }

    /// Stops it (SIGTERM, then SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) {
        self.daemon.stop(grace);
    }
}

/// Whether etcd on `127.0.0.1:port` answers `/health` with `"health":"true"`.
pub fn healthy(port: u16) -> bool {
    let ask = || -> std::io::Result<String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    ask().is_ok_and(|r| r.replace(' ', "").contains("\"health\":\"true\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::TempDir;

    #[test]
    fn etcd_starts_healthy_and_stops() {
        let dir = TempDir::new("etcd").expect("temp dir");
        let mut etcd = Etcd::start(dir.path(), Duration::from_secs(30)).expect("etcd starts (is etcd-server installed?)");
        let port: u16 = etcd.endpoint().rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
        assert!(healthy(port));
        assert!(etcd.store_url().starts_with("etcd://127.0.0.1:"));
        etcd.stop(Duration::from_secs(5));
        assert!(!healthy(port));
    }
}
