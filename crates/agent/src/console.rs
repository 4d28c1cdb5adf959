//! What the guest says on its serial console, read back as a status: readiness, CPU
//! count, heartbeats, corrupt pages, and kernel trouble (oops, panic).
//!
//! The Walkabout guest prints `WALKABOUT READY cpus=N ...` once, then
//! `hb <seq> <monotonic_ns> <corrupt_pages>` every 100 ms; any guest works, it simply
//! never becomes `ready`.

use serde::{Deserialize, Serialize};

/// The guest's state as read from its console.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// The guest program printed READY.
    pub ready: bool,
    /// CPUs the guest reported online.
    pub cpus: Option<u32>,
    /// Heartbeat lines seen.
    pub heartbeats: u64,
    /// Sequence number of the last heartbeat.
    pub last_seq: Option<u64>,
    /// Heartbeats whose sequence did not follow the previous one (a gap or a restart).
    pub seq_breaks: u64,
    /// Corrupt pages the guest's checker has counted (from the last heartbeat).
    pub corrupt_pages: u64,
    /// The kernel printed an oops, a BUG or a panic.
    pub kernel_trouble: bool,
    /// Lines the guest program flagged (`WALKABOUT ERROR`, `CORRUPT`), at most 20.
    pub alerts: Vec<String>,
}

const MAX_ALERTS: usize = 20;

impl GuestStatus {
    /// Parses a whole console log.
    pub fn parse(log: &str) -> GuestStatus {
        GuestStatus::parse_after(GuestStatus::default(), log)
    }

    /// Parses a console log that continues `before` (the same guest's status on the host
    /// it migrated from), so heartbeat continuity is judged across hosts.
    ///
    /// Only complete lines count: the guest writes its console a byte at a time, so the
    /// log's last line may still be arriving (a `WALKABOUT READY` without its `cpus=`).
    pub fn parse_after(before: GuestStatus, log: &str) -> GuestStatus {
        let mut s = before;
        let complete = log.rfind('\n').map_or("", |end| &log[..end]);
        for line in complete.lines() {
            s.feed(line.trim_end_matches('\r'));
        }
        s
    }

    fn feed(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("hb ") {
            let mut f = rest.split_whitespace().map(str::parse::<u64>);
            if let (Some(Ok(seq)), Some(Ok(_ns)), Some(Ok(corrupt))) = (f.next(), f.next(), f.next()) {
                if let Some(prev) = self.last_seq {
                    if seq != prev + 1 {
                        self.seq_breaks += 1;
                    }
                }
                self.heartbeats += 1;
                self.last_seq = Some(seq);
                self.corrupt_pages = corrupt;
            }
        } else if let Some(rest) = line.strip_prefix("WALKABOUT READY") {
            self.ready = true;
            self.cpus = rest.split_whitespace().find_map(|kv| kv.strip_prefix("cpus=")).and_then(|v| v.parse().ok());
        } else if line.starts_with("WALKABOUT ERROR") || line.starts_with("CORRUPT") {
            if self.alerts.len() < MAX_ALERTS {
                self.alerts.push(line.to_string());
            }
        } else if is_kernel_trouble(line) {
            self.kernel_trouble = true;
            if self.alerts.len() < MAX_ALERTS {
                self.alerts.push(line.to_string());
            }
        }
    }
}

fn is_kernel_trouble(line: &str) -> bool {
    ["Oops:", "BUG:", "Kernel panic", "general protection fault", "Call Trace:"].iter().any(|m| line.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_continuous_heartbeats() {
        let s = GuestStatus::parse("boot\nWALKABOUT READY cpus=2 workload=idle\nhb 0 10 0\nhb 1 20 0\nhb 2 30 0\n");
        assert!(s.ready);
        assert_eq!(s.cpus, Some(2));
        assert_eq!((s.heartbeats, s.last_seq, s.seq_breaks, s.corrupt_pages), (3, Some(2), 0, 0));
    }

    #[test]
    fn a_line_still_arriving_is_not_read() {
        let s = GuestStatus::parse("hb 0 1 0\nWALKABOUT READY");
        assert!(!s.ready);
        let s = GuestStatus::parse("hb 0 1 0\nhb 1 2 1");
        assert_eq!((s.heartbeats, s.corrupt_pages), (1, 0));
    }

    #[test]
    fn gap_in_sequence_and_corruption_are_reported() {
        let s = GuestStatus::parse("WALKABOUT READY cpus=1\nhb 0 1 0\nhb 5 2 1\nCORRUPT page=3 addr=0x1000\n");
        assert_eq!(s.seq_breaks, 1);
        assert_eq!(s.corrupt_pages, 1);
        assert_eq!(s.alerts.len(), 1);
    }

    #[test]
    fn continuity_is_judged_across_a_migration() {
        let before = GuestStatus::parse("WALKABOUT READY cpus=1\nhb 0 1 0\nhb 1 2 0\n");
        let ok = GuestStatus::parse_after(before.clone(), "hb 2 3 0\nhb 3 4 0\n");
        assert_eq!((ok.ready, ok.heartbeats, ok.seq_breaks), (true, 4, 0));
        let gap = GuestStatus::parse_after(before, "hb 7 3 0\n");
        assert_eq!(gap.seq_breaks, 1);
    }

    #[test]
    fn kernel_oops_is_flagged() {
        let s = GuestStatus::parse("[   12.3] BUG: unable to handle page fault for address: 0000\n[   12.3] Oops: 0000 [#1] SMP\n");
        assert!(s.kernel_trouble);
    }
}
