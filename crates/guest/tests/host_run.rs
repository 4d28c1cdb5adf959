//! Runs the guest program on the host (`--workload`/`--seconds` instead of a kernel
//! command line) and reads its console protocol, as a test of a guest would.

use std::process::{Command, Output};

use walkabout_guest::protocol::{ConsoleLine, Heartbeat, Ready};
use walkabout_guest::workload::Workload;

fn run_guest(args: &[&str]) -> (Output, Vec<ConsoleLine>) {
    let output = Command::new(env!("CARGO_BIN_EXE_walkabout-guest")).args(args).output().expect("walkabout-guest runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines = stdout.lines().filter_map(ConsoleLine::parse).collect();
    (output, lines)
}

fn heartbeats(lines: &[ConsoleLine]) -> Vec<Heartbeat> {
    lines
        .iter()
        .filter_map(|l| match l {
            ConsoleLine::Heartbeat(hb) => Some(*hb),
            _ => None,
        })
        .collect()
}

#[test]
fn dirty_workload_prints_ready_then_heartbeats_without_corruption() {
    let (output, lines) = run_guest(&["--workload", "dirty:8:16", "--seconds", "2"]);

    let hbs = heartbeats(&lines);
    let seqs: Vec<u64> = hbs.iter().map(|hb| hb.seq).collect();
    assert!(output.status.success(), "exit status {:?}", output.status);
    assert!(matches!(lines.first(), Some(ConsoleLine::Ready(Ready { workload: Workload::Dirty { mib: 8, rate_mib_s: 16 }, .. }))));
    assert!(hbs.len() >= 15, "only {} heartbeats in 2 s", hbs.len());
    assert_eq!(seqs, (0..hbs.len() as u64).collect::<Vec<_>>());
    assert!(hbs.iter().all(|hb| hb.corrupt_pages == 0));
}

#[test]
fn heartbeat_clock_advances_about_100_ms_per_beat() {
    let (_, lines) = run_guest(&["--seconds", "1"]);

    let hbs = heartbeats(&lines);
    let gaps: Vec<u64> = hbs.windows(2).map(|w| w[1].monotonic_ns - w[0].monotonic_ns).collect();
    assert!(gaps.iter().all(|gap| (90_000_000..200_000_000).contains(gap)), "gaps {gaps:?}");
}

#[test]
fn injected_corruption_is_reported_loudly_and_counted() {
    let (output, lines) = run_guest(&["--workload", "dirty:4:4", "--seconds", "1", "--corrupt-page", "5"]);

    let corrupt: Vec<&ConsoleLine> = lines.iter().filter(|l| matches!(l, ConsoleLine::Corrupt(_))).collect();
    assert_eq!(corrupt.len(), 1, "lines {lines:?}");
    assert!(corrupt[0].to_string().starts_with("CORRUPT page=5 addr=0x"));
    assert_eq!(heartbeats(&lines).last().map(|hb| hb.corrupt_pages), Some(1));
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn unknown_workload_prints_an_error_and_runs_idle() {
    let (output, lines) = run_guest(&["--workload", "bogus", "--seconds", "1"]);

    assert!(output.status.success());
    assert_eq!(lines.first(), Some(&ConsoleLine::Error("unknown workload 'bogus': expected idle or dirty:<MiB>:<MiB/s>".into())));
    assert!(matches!(lines.get(1), Some(ConsoleLine::Ready(Ready { workload: Workload::Idle, .. }))));
    assert!(heartbeats(&lines).len() >= 5);
}

#[test]
fn unknown_argument_is_refused_with_usage() {
    let (output, _) = run_guest(&["--frobnicate"]);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.contains("unknown argument '--frobnicate'"), "stderr: {stderr}");
}
