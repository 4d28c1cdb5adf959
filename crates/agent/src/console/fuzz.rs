//! Property tests of the console parser (issue 11, "inputs fuzzed"): the guest's serial
//! console is outside input, so any text must parse without a panic into a status whose
//! counts are consistent; generated heartbeat streams with known gaps must count exactly;
//! and a log split anywhere (as across a migration's switchover) must read as the whole.

use super::*;
use proptest::prelude::*;

/// A heartbeat sequence number, biased toward the edges of `u64`.
fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..1_000, 1 => Just(u64::MAX), 1 => Just(u64::MAX - 1), 1 => any::<u64>()]
}

/// One step of a generated stream: the next heartbeat (in order, or jumping to `seq`),
/// or a line that is not a heartbeat.
#[derive(Debug, Clone)]
enum Step {
    Next,
    Jump(u64),
    Noise(String),
    Malformed(String),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => Just(Step::Next),
        2 => seq().prop_map(Step::Jump),
        2 => "[a-zA-Z0-9 :=\\[\\].-]{0,40}".prop_filter("not a heartbeat or guest line", |l| {
            !l.starts_with("hb ") && !l.starts_with("WALKABOUT") && !l.starts_with("CORRUPT") && !is_kernel_trouble(l)
        }).prop_map(Step::Noise),
        // Heartbeat-looking lines that are not heartbeats: too few or non-numeric fields.
        1 => prop_oneof![
            Just("hb".to_string()),
            Just("hb ".to_string()),
            "hb [0-9]{1,5}".prop_map(|s| s),
            "hb [0-9]{1,5} [0-9]{1,5}".prop_map(|s| s),
            "hb -[0-9]{1,3} 1 0".prop_map(|s| s),
            "hb [0-9]{1,3} x 0".prop_map(|s| s),
            Just("hb 18446744073709551616 1 0".to_string()),
        ].prop_map(Step::Malformed),
    ]
}

/// A stream: the first heartbeat's number, then the steps; and the counts it must give.
#[derive(Debug, Clone)]
struct Stream {
    text: String,
    heartbeats: u64,
    last_seq: Option<u64>,
    seq_breaks: u64,
    corrupt_pages: u64,
}

fn stream() -> impl Strategy<Value = Stream> {
    (seq(), proptest::collection::vec((step(), 0u64..3), 0..60)).prop_map(|(first, steps)| {
        let mut s = Stream { text: String::new(), heartbeats: 0, last_seq: None, seq_breaks: 0, corrupt_pages: 0 };
        let mut next = first;
        for (i, (step, corrupt)) in steps.into_iter().enumerate() {
            let seq = match step {
                Step::Next => next,
                Step::Jump(n) => n,
                Step::Noise(l) | Step::Malformed(l) => {
                    s.text.push_str(&l);
                    s.text.push('\n');
                    continue;
                }
            };
            if let Some(prev) = s.last_seq {
                if prev.checked_add(1) != Some(seq) {
                    s.seq_breaks += 1;
                }
            }
            s.heartbeats += 1;
            s.last_seq = Some(seq);
            s.corrupt_pages = corrupt;
            s.text.push_str(&format!("hb {seq} {} {corrupt}\n", i * 100_000_000));
            next = seq.wrapping_add(1);
        }
        s
    })
}

/// Console text: lines of printable text, guest lines and heartbeats, with CR, CRLF and
/// a last line that may lack its newline.
fn console_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        "[ -~]{0,60}",
        "hb [0-9]{1,4} [0-9]{1,6} [0-9]{1,2}( [0-9])?",
        "WALKABOUT READY( cpus=[0-9]{1,3})?( workload=idle)?",
        "CORRUPT page=[0-9]{1,3}",
        "WALKABOUT ERROR [a-z ]{0,20}",
        "\\[ *[0-9.]{1,8}\\] (Oops|BUG|Kernel panic)[: a-z]{0,20}",
        "\\PC{0,30}",
    ];
    (proptest::collection::vec((line, prop_oneof!["\n", "\r\n"]), 0..40), "[ -~]{0,20}")
        .prop_map(|(lines, tail)| lines.into_iter().map(|(l, end)| l + &end).collect::<String>() + &tail)
}

/// What every status must satisfy, whatever the console said.
fn consistent(s: &GuestStatus) -> Result<(), TestCaseError> {
    prop_assert!(s.seq_breaks <= s.heartbeats.saturating_sub(1), "{} breaks in {} heartbeats", s.seq_breaks, s.heartbeats);
    prop_assert_eq!(s.last_seq.is_some(), s.heartbeats > 0);
    prop_assert!(s.alerts.len() <= MAX_ALERTS);
    prop_assert!(s.partial_line.chars().count() <= MAX_PARTIAL);
    prop_assert!(!s.partial_line.contains('\n'));
    prop_assert!(s.ready || s.cpus.is_none());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_text_gives_a_consistent_status(text in "\\PC*|[\\x00-\\x7f]{0,300}") {
        consistent(&parse(&text))?;
    }

    #[test]
    fn any_console_log_gives_a_consistent_status(text in console_text()) {
        consistent(&parse(&text))?;
    }

    #[test]
    fn generated_heartbeats_are_counted_exactly(s in stream()) {
        let got = parse(&s.text);
        prop_assert_eq!(
            (got.heartbeats, got.last_seq, got.seq_breaks, got.corrupt_pages),
            (s.heartbeats, s.last_seq, s.seq_breaks, s.corrupt_pages),
            "{}", s.text
        );
        prop_assert_eq!(got.partial_line, "");
    }

    /// The same stream continued on another host (the destination's console starts
    /// where the source's left off) counts as one stream.
    #[test]
    fn a_stream_split_across_hosts_counts_as_one(s in stream(), at in any::<prop::sample::Index>()) {
        let cut = at.index(s.text.len() + 1);
        prop_assume!(s.text.is_char_boundary(cut));
        let (source, destination) = s.text.split_at(cut);
        let got = parse_after(parse(source), destination);
        prop_assert_eq!(got, parse(&s.text));
    }

    /// A log cut at any character (a line half-sent when the vCPUs stopped) and read in
    /// two parts, the second continuing the first, reads as the whole log.
    #[test]
    fn a_log_split_anywhere_reads_as_the_whole(text in console_text(), at in any::<prop::sample::Index>(), at2 in any::<prop::sample::Index>()) {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let cut = |i: prop::sample::Index| chars.get(i.index(chars.len() + 1)).map_or(text.len(), |(b, _)| *b);
        let (mut a, mut b) = (cut(at), cut(at2));
        if a > b {
            std::mem::swap(&mut a, &mut b);
        }
        let whole = parse(&text);
        let two = parse_after(parse(&text[..a]), &text[a..]);
        let three = parse_after(parse_after(parse(&text[..a]), &text[a..b]), &text[b..]);
        prop_assert_eq!(&two, &whole);
        prop_assert_eq!(&three, &whole);
    }
}

/// The minimal input the stream property found: a heartbeat numbered `u64::MAX` followed
/// by any other overflowed `prev + 1` (a panic in debug builds, a wrap in release).
#[test]
fn a_heartbeat_after_the_largest_sequence_number_is_a_break_not_a_panic() {
    let s = parse("hb 18446744073709551615 1 0\nhb 0 2 0\n");
    assert_eq!((s.heartbeats, s.last_seq, s.seq_breaks), (2, Some(0), 1));
}
