//! A whole `walkabout up` session run as a child process (by the tests and the soak
//! benchmark): its ports chosen free, its stdout lines on a channel, stopped with Ctrl-C
//! (SIGINT), and anything it left behind killed on drop.

use crate::error::{Result, TestbedError};
use crate::files::session_root;
use crate::process::{free_ports, kill9, processes_mentioning, signal};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// A running `walkabout up`.
#[derive(Debug)]
pub struct UpSession {
    /// The controller's API URL.
    pub api_url: String,
    /// Where it keeps its agents' and controller's data.
    pub root: PathBuf,
    child: Child,
    lines: Receiver<String>,
}

impl UpSession {
    /// Starts `BIN up --listen 127.0.0.1:P --base-port P+1 --hosts HOSTS --web-listen
    /// 127.0.0.1:P+HOSTS+1 --insecure-loopback ARGS` on free ports (plain HTTP, so that
    /// its callers' clients need no identity); its stderr goes to `stderr_log`
    /// (discarded when `None`).
    pub fn start(bin: &Path, hosts: u16, args: &[&str], stderr_log: Option<&Path>) -> Result<UpSession> {
        let port = free_ports(hosts + 2)?;
        let stderr = match stderr_log {
            Some(p) => Stdio::from(std::fs::File::create(p).map_err(|e| TestbedError::io(format!("creating {}", p.display()), e))?),
            None => Stdio::null(),
        };
        let mut child = Command::new(bin)
            .args(["up", "--listen", &format!("127.0.0.1:{port}"), "--base-port", &(port + 1).to_string()])
            .args(["--hosts", &hosts.to_string(), "--insecure-loopback"])
            .args(["--web-listen", &format!("127.0.0.1:{}", port + hosts + 1)])
            .args(args)
            .env("WALKABOUT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| TestbedError::io(format!("starting {} up", bin.display()), e))?;
        let (tx, lines) = std::sync::mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(UpSession { api_url: format!("http://127.0.0.1:{port}"), root: session_root("up", child.id()), child, lines })
    }

    /// The next line it printed, waiting up to `timeout`; `None` on timeout or once its
    /// stdout has closed and every line was taken.
    pub fn line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Ctrl-C: asks it to stop the walk, delete the guests and stop everything.
    pub fn interrupt(&self) -> bool {
        signal(i64::from(self.child.id()), libc::SIGINT)
    }

    /// Waits up to `limit` for it to exit.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Live processes that mention its data root (its agents and their QEMUs while it
    /// runs; none after a clean exit).
    pub fn leftovers(&self) -> Vec<i64> {
        processes_mentioning(&self.root.to_string_lossy())
    }
}

impl Drop for UpSession {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.interrupt();
            if self.wait(Duration::from_secs(30)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for pid in self.leftovers() {
            kill9(pid);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
