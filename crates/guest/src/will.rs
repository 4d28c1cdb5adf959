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
//!
//! It also plays Mr X in Scotland Yard whenever the controller asks: a line
//! `yard round=R at=HOST go=H1,H2 detectives=H3 board=A/B,...` gives its legal moves,
//! the detectives' hosts and the board; it answers `walk HOST` with [`yard_choice`] (the
//! move farthest from the nearest detective) and prints `WALKABOUT WILL yard: ...`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
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

/// Mr X's move in Scotland Yard for the controller's `prompt` (`yard round=R at=HOST
/// go=H1,H2 detectives=H3 board=A/B,...`): the host among `go` farthest from the nearest
/// detective on the board, then the one with the most ways on that no detective holds,
/// then the first. `None` if the line is not such a prompt or offers no move.
pub fn yard_choice(prompt: &str) -> Option<String> {
    let mut words = prompt.split_whitespace();
    if words.next() != Some("yard") {
        return None;
    }
    let fields: BTreeMap<&str, Vec<&str>> =
        words.filter_map(|w| w.split_once('=')).map(|(k, v)| (k, v.split(',').filter(|x| !x.is_empty()).collect())).collect();
    let list = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (a, b) in list("board").into_iter().filter_map(|l| l.split_once('/')) {
        next.entry(a).or_default().insert(b);
        next.entry(b).or_default().insert(a);
    }
    let detectives: BTreeSet<&str> = list("detectives").into_iter().collect();
    // Hops from the nearest detective to every host.
    let mut far: BTreeMap<&str, u32> = detectives.iter().map(|d| (*d, 0)).collect();
    let mut queue: VecDeque<&str> = detectives.iter().copied().collect();
    while let Some(h) = queue.pop_front() {
        let d = far[h];
        for n in next.get(h).into_iter().flatten() {
            if !far.contains_key(n) {
                far.insert(n, d + 1);
                queue.push_back(n);
            }
        }
    }
    let score = |h: &str| {
        let ways = next.get(h).map_or(0, |n| n.iter().filter(|x| !detectives.contains(*x)).count());
        (far.get(h).copied().unwrap_or(u32::MAX), ways)
    };
    let go = list("go");
    let best = go.iter().map(|h| score(h)).max()?;
    go.into_iter().find(|h| score(h) == best).map(str::to_string)
}

/// Serves the port at `device`: answers the controller's Scotland Yard prompts (see
/// [`yard_choice`]) for as long as the guest runs, and asks everything `plan` says (if
/// any), telling the console (`say`) each ask and each answer. Returns when every ask
/// is answered (the prompts are still served), or an error if the port cannot be opened.
pub fn run(plan: Option<&WillPlan>, device: &Path, say: Arc<dyn Fn(String) + Send + Sync>) -> std::io::Result<()> {
    let port = File::options().read(true).write(true).open(device)?;
    let mut reader = port.try_clone()?;
    let writer = Arc::new(Mutex::new(port));
    let (tx, rx) = mpsc::channel::<String>();
    let (prompt_writer, prompt_say) = (writer.clone(), say.clone());
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
                        if line.starts_with("yard ") && !line.starts_with("yard heard") {
                            let Some(to) = yard_choice(&line) else {
                                prompt_say(format!("WALKABOUT WILL yard: no move in `{line}`"));
                                continue;
                            };
                            prompt_say(format!("WALKABOUT WILL yard: asked `{line}`, I go to {to}"));
                            let mut w = prompt_writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            if let Err(e) = w.write_all(format!("walk {to}\n").as_bytes()) {
                                prompt_say(format!("WALKABOUT WILL yard: cannot answer ({e})"));
                            }
                        } else {
                            // Nobody waits for answers once the asks are done.
                            let _ = tx.send(line);
                        }
                    }
                }
            }
        }
    });
    let Some(plan) = plan else { return Ok(()) };
    for ask in &plan.asks {
        std::thread::sleep(Duration::from_secs(plan.every_s));
        loop {
            say(format!("WALKABOUT WILL ask: {ask}"));
            let written = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write_all(format!("{ask}\n").as_bytes());
            if let Err(e) = written {
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
    fn mr_x_runs_to_the_move_farthest_from_the_detectives() {
        // A ring h1..h6; Mr X on h1, the detective on h3: h6 is two hops from it, h2 one.
        let board = "board=h1/h2,h2/h3,h3/h4,h4/h5,h5/h6,h6/h1";
        assert_eq!(yard_choice(&format!("yard round=1 at=h1 go=h2,h6 detectives=h3 {board}")), Some("h6".to_string()));
    }

    #[test]
    fn among_moves_as_far_mr_x_takes_the_one_with_more_ways_on() {
        let board = "board=h1/h2,h1/h3,h3/h4,h3/h5,h2/h9,h4/h9,h5/h9";
        assert_eq!(yard_choice(&format!("yard at=h1 go=h2,h3 detectives=h9 {board}")), Some("h3".to_string()));
    }

    #[test]
    fn a_line_that_is_no_prompt_or_offers_no_move_gets_no_move() {
        assert_eq!(yard_choice("went to h2"), None);
        assert_eq!(yard_choice("yard round=2 at=h1 go= detectives=h2 board=h1/h2"), None);
    }

    #[test]
    fn lines_are_split_and_the_rest_kept() {
        let mut pending = b"went to h2\nrefused: h3 is dr".to_vec();
        assert_eq!(take_lines(&mut pending), vec!["went to h2".to_string()]);
        assert_eq!(pending, b"refused: h3 is dr".to_vec());
    }
}
