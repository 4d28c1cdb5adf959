//! Free will: the guest asks to move.
//!
//! A VM created with free will has a virtio-serial port named `org.walkabout.0`. A guest
//! writes one request a line on it (`walk any`, `walk least-loaded`, `walk HOST`); the
//! controller moves it (or not) and its agent writes one answer a line back (`went to h2`,
//! `refused: h3 is draining`). This guest asks on its own when the kernel command line
//! says so:
//!
//! ```text
//! walkabout.will=any,least-loaded,h3   the asks, in order (`any`, `least-loaded` or a host)
//! walkabout.will_every=5               seconds before each ask (default 5)
//! ```
//!
//! and prints `WALKABOUT WILL ask: walk any`, then `WALKABOUT WILL answer: went to h2`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// The port's name.
pub const PORT_NAME: &str = "org.walkabout.0";
/// The parameter listing the asks.
pub const WILL_PARAM: &str = "walkabout.will";
/// The parameter giving the seconds before each ask.
pub const WILL_EVERY_PARAM: &str = "walkabout.will_every";
/// How long the guest waits for an answer before it asks again.
pub const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// What the guest asks, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillPlan {
    /// The request lines, in order (`walk any`, ...).
    pub asks: Vec<String>,
    /// Seconds before each ask.
    pub every_s: u64,
}

fn param<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().filter_map(|w| w.strip_prefix(name)?.strip_prefix('=')).next_back()
}

/// The guest's asks from its kernel command line, if it has any.
pub fn plan_from_cmdline(cmdline: &str) -> Option<WillPlan> {
    let asks: Vec<String> = param(cmdline, WILL_PARAM)?.split(',').filter(|a| !a.is_empty()).map(|a| format!("walk {a}")).collect();
    let every_s = param(cmdline, WILL_EVERY_PARAM).and_then(|s| s.parse().ok()).unwrap_or(5);
    (!asks.is_empty()).then_some(WillPlan { asks, every_s })
}

/// The device of the port named [`PORT_NAME`], found through `sys` (`/sys` in a guest:
/// there is no udev to make `/dev/virtio-ports/org.walkabout.0`).
pub fn find_port(sys: &Path) -> Option<PathBuf> {
    let dir = std::fs::read_dir(sys.join("class/virtio-ports")).ok()?;
    dir.filter_map(Result::ok)
        .find(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME))
        .map(|e| Path::new("/dev").join(e.file_name()))
}

/// Splits the bytes read so far into whole lines, keeping the rest in `pending`.
pub fn take_lines(pending: &mut Vec<u8>) -> Vec<String> {
    let mut out = vec![];
    while let Some(i) = pending.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = pending.drain(..=i).collect();
        out.push(String::from_utf8_lossy(&line).trim().to_string());
    }
    out
}

/// Asks everything `plan` says on the port at `device`, telling the console (`say`)
/// each ask and each answer. Returns when every ask is answered, or an error if the port
/// cannot be opened.
pub fn run(plan: &WillPlan, device: &Path, say: &(dyn Fn(String) + Sync)) -> std::io::Result<()> {
    let port = File::options().read(true).write(true).open(device)?;
    let mut reader = port.try_clone()?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut pending = vec![];
        let mut buf = [0u8; 512];
        loop {
            match reader.read(&mut buf) {
                // No host end connected (its agent reconnects after a migration).
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(200)),
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    for line in take_lines(&mut pending) {
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let mut writer = port;
    for ask in &plan.asks {
        std::thread::sleep(Duration::from_secs(plan.every_s));
        loop {
            say(format!("WALKABOUT WILL ask: {ask}"));
            if let Err(e) = writer.write_all(format!("{ask}\n").as_bytes()) {
                say(format!("WALKABOUT WILL cannot ask ({e}); again in a second"));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            match rx.recv_timeout(ANSWER_WAIT) {
                Ok(answer) => {
                    say(format!("WALKABOUT WILL answer: {answer}"));
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_come_from_the_command_line_in_order() {
        let plan = plan_from_cmdline("console=ttyS0 walkabout.will=any,least-loaded,h3 walkabout.will_every=2\n");
        assert_eq!(plan, Some(WillPlan { asks: vec!["walk any".into(), "walk least-loaded".into(), "walk h3".into()], every_s: 2 }));
    }

    #[test]
    fn no_parameter_no_asks() {
        assert_eq!(plan_from_cmdline("console=ttyS0 walkabout.willing=any"), None);
    }

    #[test]
    fn lines_are_split_and_the_rest_kept() {
        let mut pending = b"went to h2\nrefused: h3 is dr".to_vec();
        assert_eq!(take_lines(&mut pending), vec!["went to h2".to_string()]);
        assert_eq!(pending, b"refused: h3 is dr".to_vec());
    }
}
