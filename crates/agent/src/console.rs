//! What the guest says on its serial console, read back as a status: readiness, CPU
//! count, heartbeats, corrupt pages, and kernel trouble (oops, panic).
//!
//! The Walkabout guest prints `WALKABOUT READY cpus=N ...` once, then
//! `hb <seq> <monotonic_ns> <corrupt_pages> [<corrupt_blocks>]` every 100 ms (the fourth
//! number only with a disk workload); any guest works, it simply never becomes `ready`.

pub use walkabout_api::GuestStatus;

const MAX_ALERTS: usize = 20;
/// Longest unfinished line carried from one host's console to the next.
const MAX_PARTIAL: usize = 512;

/// Parses a whole console log.
pub fn parse(log: &str) -> GuestStatus {
    parse_after(GuestStatus::default(), log)
}

/// Parses a console log that continues `before` (the same guest's status on the host
/// it migrated from), so heartbeat continuity is judged across hosts.
///
/// Only complete lines count: the guest's serial port sends a byte at a time, so the
/// log's last line may still be arriving (a `WALKABOUT READY` without its `cpus=`). It is
/// kept in [`GuestStatus::partial_line`]; when the guest is stopped for a migration's
/// switchover half-way through a line, the rest of that line is the first thing on the
/// destination's console, and the destination continues it from `before`.
pub fn parse_after(before: GuestStatus, log: &str) -> GuestStatus {
    let mut s = before;
    let carried = std::mem::take(&mut s.partial_line);
    let text = if carried.is_empty() { std::borrow::Cow::Borrowed(log) } else { std::borrow::Cow::Owned(carried + log) };
    let (complete, partial) = match text.rfind('\n') {
        Some(end) => (&text[..end], &text[end + 1..]),
        None => ("", &text[..]),
    };
    for line in complete.lines() {
        feed(&mut s, line.trim_end_matches('\r'));
    }
    s.partial_line = partial.chars().take(MAX_PARTIAL).collect();
    s
}

fn feed(s: &mut GuestStatus, line: &str) {
    if let Some(rest) = line.strip_prefix("hb ") {
        let mut f = rest.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(seq)), Some(Ok(_ns)), Some(Ok(corrupt))) = (f.next(), f.next(), f.next()) {
            if let Some(prev) = s.last_seq {
                if prev.checked_add(1) != Some(seq) {
                    s.seq_breaks += 1;
                }
            }
            s.heartbeats += 1;
            s.last_seq = Some(seq);
            s.corrupt_pages = corrupt;
            if let Some(Ok(blocks)) = f.next() {
                s.corrupt_blocks = blocks;
            }
        }
    } else if let Some(rest) = line.strip_prefix("WALKABOUT READY") {
        s.ready = true;
        s.cpus = rest.split_whitespace().find_map(|kv| kv.strip_prefix("cpus=")).and_then(|v| v.parse().ok());
    } else if line.starts_with("WALKABOUT ERROR") || line.starts_with("CORRUPT") {
        if s.alerts.len() < MAX_ALERTS {
            s.alerts.push(line.to_string());
        }
    } else if is_kernel_trouble(line) {
        s.kernel_trouble = true;
        if s.alerts.len() < MAX_ALERTS {
            s.alerts.push(line.to_string());
        }
    }
}

fn is_kernel_trouble(line: &str) -> bool {
    ["Oops:", "BUG:", "Kernel panic", "general protection fault", "Call Trace:"].iter().any(|m| line.contains(m))
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_continuous_heartbeats() {
        let s = parse("boot\nWALKABOUT READY cpus=2 workload=idle\nhb 0 10 0\nhb 1 20 0\nhb 2 30 0\n");
        assert!(s.ready);
        assert_eq!(s.cpus, Some(2));
        assert_eq!((s.heartbeats, s.last_seq, s.seq_breaks, s.corrupt_pages), (3, Some(2), 0, 0));
    }

    #[test]
    fn a_line_still_arriving_is_not_read() {
        let s = parse("hb 0 1 0\nWALKABOUT READY");
        assert!(!s.ready);
        let s = parse("hb 0 1 0\nhb 1 2 1");
        assert_eq!((s.heartbeats, s.corrupt_pages), (1, 0));
    }

    #[test]
    fn gap_in_sequence_and_corruption_are_reported() {
        let s = parse("WALKABOUT READY cpus=1\nhb 0 1 0\nhb 5 2 1\nCORRUPT page=3 addr=0x1000\n");
        assert_eq!(s.seq_breaks, 1);
        assert_eq!(s.corrupt_pages, 1);
        assert_eq!(s.alerts.len(), 1);
    }

    #[test]
    fn corrupt_blocks_are_the_optional_fourth_number() {
        let with = parse("hb 0 1 0 0\nhb 1 2 0 3\nCORRUPT block=7 dev=/dev/vdb\n");
        let without = parse("hb 0 1 2\n");
        assert_eq!((with.heartbeats, with.corrupt_pages, with.corrupt_blocks, with.alerts.len()), (2, 0, 3, 1));
        assert_eq!((without.corrupt_pages, without.corrupt_blocks), (2, 0));
    }

    #[test]
    fn continuity_is_judged_across_a_migration() {
        let before = parse("WALKABOUT READY cpus=1\nhb 0 1 0\nhb 1 2 0\n");
        let ok = parse_after(before.clone(), "hb 2 3 0\nhb 3 4 0\n");
        assert_eq!((ok.ready, ok.heartbeats, ok.seq_breaks), (true, 4, 0));
        let gap = parse_after(before, "hb 7 3 0\n");
        assert_eq!(gap.seq_breaks, 1);
    }

    /// The cause of the heartbeat breaks seen in a 25-minute `walkabout up` (3 breaks in
    /// about 480 hops, all on the guest whose console was busiest): the guest's vCPUs
    /// stopped for the switchover while its serial port was half-way through a
    /// heartbeat line. The source's console ends with `hb 12`, the destination's begins
    /// with `3 1230 0`; read separately, heartbeat 123 was lost and 124 counted a break.
    #[test]
    fn a_heartbeat_split_by_the_switchover_is_one_heartbeat() {
        let source = parse("WALKABOUT READY cpus=1\nhb 121 1210 0\nhb 122 1220 0\nhb 12");
        assert_eq!(source.partial_line, "hb 12");
        let destination = parse_after(source, "3 1230 0\nhb 124 1240 0\n");
        assert_eq!((destination.heartbeats, destination.last_seq, destination.seq_breaks), (4, Some(124), 0));
        assert_eq!(destination.partial_line, "");
    }

    #[test]
    fn a_split_heartbeat_read_without_its_first_half_is_a_break() {
        let mut source = parse("hb 121 1210 0\nhb 122 1220 0\nhb 12");
        source.partial_line.clear(); // what the agents did before: only complete lines crossed
        let destination = parse_after(source, "3 1230 0\nhb 124 1240 0\n");
        assert_eq!(destination.seq_breaks, 1);
    }

    #[test]
    fn kernel_oops_is_flagged() {
        let s = parse("[   12.3] BUG: unable to handle page fault for address: 0000\n[   12.3] Oops: 0000 [#1] SMP\n");
        assert!(s.kernel_trouble);
    }
}
