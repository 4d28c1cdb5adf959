//! The lines the guest writes on its serial console, as types: the guest formats them
//! with [`Display`](std::fmt::Display), the host parses them with [`ConsoleLine::parse`].

use std::fmt;

use crate::workload::Workload;

/// Marker of the READY line.
pub const READY_MARKER: &str = "WALKABOUT READY";
/// Marker of an ERROR line.
pub const ERROR_MARKER: &str = "WALKABOUT ERROR";
/// Marker of a CORRUPT line.
pub const CORRUPT_MARKER: &str = "CORRUPT page=";
/// Marker of a CORRUPT line about a disk block.
pub const CORRUPT_BLOCK_MARKER: &str = "CORRUPT block=";

/// Interval between two heartbeats, in nanoseconds.
pub const HEARTBEAT_INTERVAL_NS: u64 = 100_000_000;

/// `WALKABOUT READY cpus=<n> workload=<workload> mem_mib=<MiB>`: printed once, when the
/// workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Online CPUs in the guest.
    pub cpus: usize,
    /// The workload that runs (idle after a workload error).
    pub workload: Workload,
    /// The guest's MemTotal, in MiB.
    pub mem_mib: u64,
}

/// `hb <seq> <monotonic_ns> <corrupt_pages> [<corrupt_blocks>]`: every 100 ms. The
/// fourth number is there only with a disk workload, so readers of the three-number
/// line keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sequence number: 0 for the first heartbeat, then +1 per heartbeat.
    pub seq: u64,
    /// The guest's CLOCK_MONOTONIC when it was printed, in nanoseconds.
    pub monotonic_ns: u64,
    /// Corrupt pages found since boot.
    pub corrupt_pages: u64,
    /// Corrupt disk blocks found since boot (with a disk workload).
    pub corrupt_blocks: Option<u64>,
}

/// A line of the guest's console protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsoleLine {
    /// The READY line.
    Ready(Ready),
    /// A heartbeat.
    Heartbeat(Heartbeat),
    /// `WALKABOUT ERROR <message>`: the workload was refused; the guest runs idle.
    Error(String),
    /// `rate <achieved MiB/s> requested=<MiB/s>`: the dirty writer's achieved rate over
    /// the last report interval.
    Rate {
        /// Achieved rate, MiB/s.
        achieved_mib_s: f64,
        /// Requested rate, MiB/s.
        requested_mib_s: u32,
    },
    /// `CORRUPT page=...` or `CORRUPT block=...`: a corrupt page or disk block (the whole
    /// line, from `CORRUPT`).
    Corrupt(String),
    /// `disk dev=<device> blocks=<n> adopted=<n>`: the disk workload read its area once
    /// and runs; `adopted` blocks were left intact by an earlier run on the same disk.
    Disk {
        /// The device it writes.
        device: String,
        /// Blocks of its area.
        blocks: u64,
        /// Intact blocks found from an earlier run.
        adopted: u64,
    },
}

impl fmt::Display for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{READY_MARKER} cpus={} workload={} mem_mib={}", self.cpus, self.workload, self.mem_mib)
    }
}

impl fmt::Display for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hb {} {} {}", self.seq, self.monotonic_ns, self.corrupt_pages)?;
        match self.corrupt_blocks {
            Some(blocks) => write!(f, " {blocks}"),
            None => Ok(()),
        }
    }
}

impl fmt::Display for ConsoleLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleLine::Ready(r) => r.fmt(f),
            ConsoleLine::Heartbeat(h) => h.fmt(f),
            ConsoleLine::Error(message) => write!(f, "{ERROR_MARKER} {message}"),
            ConsoleLine::Rate { achieved_mib_s, requested_mib_s } => {
                write!(f, "rate {achieved_mib_s:.1} requested={requested_mib_s}")
            }
            ConsoleLine::Corrupt(line) => f.write_str(line),
            ConsoleLine::Disk { device, blocks, adopted } => write!(f, "disk dev={device} blocks={blocks} adopted={adopted}"),
        }
    }
}

impl ConsoleLine {
    /// Parses one console line (without its newline). Kernel messages can share the
    /// serial console, so READY, ERROR and CORRUPT are found anywhere in the line;
    /// heartbeat and rate lines must be the whole line (surrounding whitespace and `\r`
    /// aside). Anything else is `None`.
    pub fn parse(line: &str) -> Option<ConsoleLine> {
        let line = line.trim();
        if let Some(at) = line.find(READY_MARKER) {
            return parse_ready(&line[at + READY_MARKER.len()..]).map(ConsoleLine::Ready);
        }
        if let Some(at) = line.find(ERROR_MARKER) {
            let message = line[at + ERROR_MARKER.len()..].trim();
            return Some(ConsoleLine::Error(message.to_owned()));
        }
        if let Some(at) = line.find(CORRUPT_MARKER).or_else(|| line.find(CORRUPT_BLOCK_MARKER)) {
            return Some(ConsoleLine::Corrupt(line[at..].to_owned()));
        }
        let mut words = line.split(' ');
        match words.next()? {
            "hb" => {
                let mut n = || words.next()?.parse::<u64>().ok();
                let (seq, monotonic_ns, corrupt_pages) = (n()?, n()?, n()?);
                let corrupt_blocks = match words.next() {
                    None => None,
                    Some(w) => Some(w.parse::<u64>().ok()?),
                };
                let hb = Heartbeat { seq, monotonic_ns, corrupt_pages, corrupt_blocks };
                words.next().is_none().then_some(ConsoleLine::Heartbeat(hb))
            }
            "disk" => {
                let mut field = |name: &str| words.next()?.strip_prefix(name)?.strip_prefix('=').map(str::to_owned);
                let device = field("dev")?;
                let blocks = field("blocks")?.parse().ok()?;
                let adopted = field("adopted")?.parse().ok()?;
                Some(ConsoleLine::Disk { device, blocks, adopted })
            }
            "rate" => {
                let achieved_mib_s = words.next()?.parse().ok()?;
                let requested_mib_s = words.next()?.strip_prefix("requested=")?.parse().ok()?;
                Some(ConsoleLine::Rate { achieved_mib_s, requested_mib_s })
            }
            _ => None,
        }
    }
}

fn parse_ready(fields: &str) -> Option<Ready> {
    let mut words = fields.split_whitespace();
    let mut field = |name: &str| words.next()?.strip_prefix(name)?.strip_prefix('=');
    Some(Ready { cpus: field("cpus")?.parse().ok()?, workload: field("workload")?.parse().ok()?, mem_mib: field("mem_mib")?.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips() {
        let ready = Ready { cpus: 2, workload: Workload::dirty(16, 32), mem_mib: 241 };
        let line = ready.to_string();
        assert_eq!(line, "WALKABOUT READY cpus=2 workload=dirty:16:32 mem_mib=241");
        assert_eq!(ConsoleLine::parse(&line), Some(ConsoleLine::Ready(ready)));
    }

    #[test]
    fn heartbeat_line_round_trips() {
        let hb = Heartbeat { seq: 41, monotonic_ns: 1_234_567_890, corrupt_pages: 0, corrupt_blocks: None };
        let line = hb.to_string();
        assert_eq!(line, "hb 41 1234567890 0");
        assert_eq!(ConsoleLine::parse(&line), Some(ConsoleLine::Heartbeat(hb)));
    }

    #[test]
    fn heartbeat_with_carriage_return_parses() {
        let parsed = ConsoleLine::parse("hb 1 2 3\r");
        assert_eq!(parsed, Some(ConsoleLine::Heartbeat(Heartbeat { seq: 1, monotonic_ns: 2, corrupt_pages: 3, corrupt_blocks: None })));
    }

    #[test]
    fn heartbeat_with_corrupt_blocks_round_trips() {
        let hb = Heartbeat { seq: 2, monotonic_ns: 9, corrupt_pages: 0, corrupt_blocks: Some(4) };
        assert_eq!(hb.to_string(), "hb 2 9 0 4");
        assert_eq!(ConsoleLine::parse("hb 2 9 0 4"), Some(ConsoleLine::Heartbeat(hb)));
        assert_eq!(ConsoleLine::parse("hb 2 9 0 4 5"), None);
    }

    #[test]
    fn disk_line_and_corrupt_block_round_trip() {
        let line = ConsoleLine::Disk { device: "/dev/vdb".into(), blocks: 4096, adopted: 12 };
        assert_eq!(line.to_string(), "disk dev=/dev/vdb blocks=4096 adopted=12");
        assert_eq!(ConsoleLine::parse(&line.to_string()), Some(line));
        assert!(matches!(ConsoleLine::parse("CORRUPT block=3 dev=/dev/vdb zeroed"), Some(ConsoleLine::Corrupt(_))));
    }

    #[test]
    fn truncated_heartbeat_is_not_a_heartbeat() {
        assert_eq!(ConsoleLine::parse("hb 1 2"), None);
    }

    #[test]
    fn ready_after_kernel_noise_parses() {
        let parsed = ConsoleLine::parse("[    1.2] random: crng WALKABOUT READY cpus=1 workload=idle mem_mib=9");
        assert_eq!(parsed, Some(ConsoleLine::Ready(Ready { cpus: 1, workload: Workload::IDLE, mem_mib: 9 })));
    }

    #[test]
    fn error_line_carries_its_message() {
        let line = ConsoleLine::Error("unknown workload 'x'".into());
        assert_eq!(ConsoleLine::parse(&line.to_string()), Some(line));
    }

    #[test]
    fn rate_line_round_trips() {
        let line = ConsoleLine::Rate { achieved_mib_s: 31.5, requested_mib_s: 32 };
        assert_eq!(line.to_string(), "rate 31.5 requested=32");
        assert_eq!(ConsoleLine::parse("rate 31.5 requested=32"), Some(line));
    }

    #[test]
    fn corrupt_line_is_recognised() {
        let parsed = ConsoleLine::parse("CORRUPT page=1 addr=0x10 expected_gen=2 found_index=1 found_gen=1 checksum_ok=true");
        assert!(matches!(parsed, Some(ConsoleLine::Corrupt(_))));
    }

    #[test]
    fn other_lines_are_ignored() {
        assert_eq!(ConsoleLine::parse("[    0.000000] Linux version 6.1.0"), None);
    }
}
