//! Processes: liveness, signals, QEMUs left under a data directory, and daemons that
//! announce themselves by writing a URL file.

use crate::error::{Result, TestbedError};
use crate::files::read_url;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// True while process `pid` exists and is not a zombie.
pub fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Sends `sig` to `pid`; false when the pid does not fit or the signal could not be sent.
pub fn signal(pid: i64, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a positive pid
    // names one process (never a group), and a stale pid only makes it fail.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// The state letter of each thread of `pid` (`/proc/PID/task/*/stat`: `R`, `S`, `T`...);
/// empty when the process is gone.
fn thread_states(pid: i64) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return vec![] };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| s.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()))
        .collect()
}

/// Whether every thread of `pid` is stopped (by a signal, `T`, or a tracer, `t`): no
/// code of it runs until it is continued.
pub fn stopped(pid: i64) -> bool {
    let states = thread_states(pid);
    !states.is_empty() && states.iter().all(|c| matches!(c, 'T' | 't'))
}

/// Stops `pid` (SIGSTOP) and waits up to `limit` until every thread of it has stopped;
/// true once they have. `kill(2)` only queues the signal: each thread stops when the
/// scheduler next runs it, so on a busy machine a "paused" server may still answer
/// requests for a while after the signal was sent.
pub fn pause(pid: i64, limit: Duration) -> bool {
    if !signal(pid, libc::SIGSTOP) {
        return false;
    }
    let start = Instant::now();
    while !stopped(pid) {
        if start.elapsed() > limit || !alive(pid) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Continues a process [`pause`] stopped (SIGCONT); false when the signal could not be
/// sent.
pub fn resume(pid: i64) -> bool {
    signal(pid, libc::SIGCONT)
}

/// `kill -9 pid`.
pub fn kill9(pid: i64) -> bool {
    signal(pid, libc::SIGKILL)
}

/// Waits until `pid` has exited, up to `limit`; true if it did.
pub fn wait_gone(pid: i64, limit: Duration) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Pids of live processes (other than this one) whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i64> {
    let me = i64::from(std::process::id());
    let Ok(procs) = std::fs::read_dir("/proc") else { return vec![] };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()))
        .filter(|pid| *pid != me && alive(*pid))
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)))
        .collect()
}

/// Pids of the live QEMUs an agent's data directory holds pid files for
/// (`DATA/vms/*/qemu.pid`).
pub fn qemu_pids(data_dir: &Path) -> Vec<i64> {
    let Ok(vms) = std::fs::read_dir(data_dir.join("vms")) else { return vec![] };
    vms.flatten()
        .filter_map(|vm| std::fs::read_to_string(vm.path().join("qemu.pid")).ok())
        .filter_map(|p| p.trim().parse().ok())
        .filter(|p| alive(*p))
        .collect()
}

/// Kills (SIGKILL) every QEMU an agent's data directory holds a pid file for: the
/// backstop when an agent is gone and its daemonized QEMUs are not.
pub fn kill_qemus(data_dir: &Path) {
    for pid in qemu_pids(data_dir) {
        kill9(pid);
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How much of a log an error carries.
const LOG_TAIL_LINES: usize = 40;

/// The last `lines` lines of the file at `path` (empty when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A daemon we started (`walkabout agent`, `walkabout controller`): its process, its log
/// file (stderr, appended to across restarts) and the URL file it announces itself in.
/// Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Daemon {
    what: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` (stdout discarded, stderr appended to `log`) as the daemon `what`.
    pub fn spawn(what: &str, mut cmd: Command, log: &Path) -> Result<Daemon> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| TestbedError::io(format!("opening {}", log.display()), e))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| TestbedError::io(format!("starting {what} ({:?})", cmd.get_program()), e))?;
        Ok(Daemon { what: what.to_string(), child: Some(child), log: log.to_path_buf() })
    }

    /// Waits until the daemon has written a whole URL to `file` and returns it; fails
    /// with the tail of its log when it exits first or `limit` passes.
    pub fn wait_url(&mut self, file: &Path, limit: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(url) = read_url(file) {
                return Ok(url);
            }
            let why = match self.exited() {
                Some(status) => format!("exited ({status})"),
                None if start.elapsed() > limit => format!("nothing after {} s", limit.as_secs()),
                None => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            return Err(TestbedError::NoUrl {
                what: self.what.clone(),
                why,
                file: file.to_path_buf(),
                log_file: self.log.clone(),
                log: log_tail(&self.log, LOG_TAIL_LINES),
            });
        }
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Its pid, while we hold it.
    pub fn pid(&self) -> Option<i64> {
        self.child.as_ref().map(|c| i64::from(c.id()))
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it (SIGKILL) and reaps it, at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks it to stop (SIGTERM), waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGTERM);
            let start = Instant::now();
            while self.exited().is_none() && start.elapsed() < grace {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Finds `count` consecutive free TCP ports on 127.0.0.1 and returns the first, for
/// daemons that must be told their ports up front (`walkabout up`). Another process may
/// take them before they are used; callers that can, listen on port 0 instead.
pub fn free_ports(count: u16) -> Result<u16> {
    let start = 20_000 + (std::process::id() % 2_000) as u16 * 16;
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    (0..400u16)
        .map(|i| start.wrapping_add(i.wrapping_mul(count + 1)))
        .filter(|b| *b >= 1024 && b.checked_add(count).is_some())
        .find(|b| (0..count).all(|i| free(b + i)))
        .ok_or(TestbedError::NoFreePorts { count })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{write_atomic, TempDir};

    #[test]
    fn a_killed_child_is_not_alive() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = i64::from(child.id());
        assert!(alive(pid));
        assert!(kill9(pid));
        let _ = child.wait();
        assert!(!alive(pid));
    }

    #[test]
    fn a_paused_process_has_every_thread_stopped_until_it_is_resumed() {
        let child = Command::new("sleep").arg("30").spawn().expect("sleep");
        let mut child = KillOnDrop(child);
        let pid = i64::from(child.0.id());
        assert!(!stopped(pid));

        let paused = pause(pid, Duration::from_secs(10));
        let while_paused = stopped(pid);
        let resumed = resume(pid);
        let start = Instant::now();
        while stopped(pid) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let after = stopped(pid);
        let _ = child.0.kill();
        let _ = child.0.wait();

        assert!(paused && while_paused, "{:?}", thread_states(pid));
        assert!(resumed && !after);
        assert!(!pause(pid, Duration::from_secs(1)), "a process that is gone cannot be paused");
    }

    #[test]
    fn a_daemon_that_exits_early_is_reported_with_its_log() {
        let dir = TempDir::new("daemon").expect("temp dir");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo cannot listen on 1.2.3.4 >&2; exit 3"]);
        let mut d = Daemon::spawn("agent h9", cmd, &dir.path().join("agent.log")).expect("spawn");
        let e = d.wait_url(&dir.path().join("agent.url"), Duration::from_secs(10)).expect_err("it exited");
        let msg = e.to_string();
        assert!(
            msg.contains("agent h9 did not write its URL")
                && msg.contains("exited (exit status: 3)")
                && msg.contains("cannot listen on 1.2.3.4"),
            "{msg}"
        );
    }

    #[test]
    fn a_daemon_url_is_returned_once_written() {
        let dir = TempDir::new("daemonurl").expect("temp dir");
        let url_file = dir.path().join("x.url");
        write_atomic(&url_file, b"http://127.0.0.1:1234").expect("write");
        let mut d = Daemon::spawn("x", Command::new("true"), &dir.path().join("x.log")).expect("spawn");
        assert_eq!(d.wait_url(&url_file, Duration::from_secs(5)).expect("url"), "http://127.0.0.1:1234");
    }

    #[test]
    fn free_ports_are_bindable() {
        let base = free_ports(3).expect("ports");
        for p in base..base + 3 {
            assert!(std::net::TcpListener::bind(("127.0.0.1", p)).is_ok(), "port {p}");
        }
    }
}
