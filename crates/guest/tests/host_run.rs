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
    assert!(matches!(lines.first(), Some(ConsoleLine::Ready(Ready { workload, .. })) if *workload == Workload::dirty(8, 16)));
    assert!(hbs.len() >= 15, "only {} heartbeats in 2 s", hbs.len());
    assert_eq!(seqs, (0..hbs.len() as u64).collect::<Vec<_>>());
    assert!(hbs.iter().all(|hb| hb.corrupt_pages == 0));
}

#[test]
fn heartbeat_clock_advances_about_100_ms_per_beat() {
    let (_, lines) = run_guest(&["--seconds", "1"]);

    let hbs = heartbeats(&lines);
    let mut gaps: Vec<u64> = hbs.windows(2).map(|w| w[1].monotonic_ns - w[0].monotonic_ns).collect();
    // One beat may come late on a busy host (and the next sooner, back on schedule: no
    // burst); the schedule itself is every 100 ms.
    assert!(gaps.len() >= 4, "only {} heartbeats in 1 s", hbs.len());
    gaps.sort_unstable();
    let median = gaps[gaps.len() / 2];
    assert!((90_000_000..=130_000_000).contains(&median), "median gap {median} ns of {gaps:?}");
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
    assert!(matches!(lines.first(), Some(ConsoleLine::Error(e)) if e.starts_with("unknown workload 'bogus': expected idle, dirty:")));
    assert!(matches!(lines.get(1), Some(ConsoleLine::Ready(Ready { workload, .. })) if workload.is_idle()));
    assert!(heartbeats(&lines).len() >= 5);
}

#[test]
fn unknown_argument_is_refused_with_usage() {
    let (output, _) = run_guest(&["--frobnicate"]);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.contains("unknown argument '--frobnicate'"), "stderr: {stderr}");
}

/// A scratch file standing in for the disk (on the target directory's file system, which
/// takes O_DIRECT; removed when dropped).
struct ScratchDisk(std::path::PathBuf);

impl ScratchDisk {
    fn new(name: &str, mib: u64) -> ScratchDisk {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join(format!("guest-disk-{name}-{}.raw", std::process::id()));
        let file = std::fs::File::create(&path).expect("create scratch disk");
        file.set_len(mib << 20).expect("size scratch disk");
        ScratchDisk(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn disk_line(lines: &[ConsoleLine]) -> Option<(u64, u64)> {
    lines.iter().find_map(|l| match l {
        ConsoleLine::Disk { blocks, adopted, .. } => Some((*blocks, *adopted)),
        _ => None,
    })
}

#[test]
fn disk_workload_writes_blocks_a_second_run_adopts_them_intact() {
    let disk = ScratchDisk::new("adopt", 2);

    let (first, first_lines) = run_guest(&["--workload", "disk:1:8", "--disk", disk.arg(), "--seconds", "1"]);
    let (second, second_lines) = run_guest(&["--workload", "disk:1:8", "--disk", disk.arg(), "--seconds", "1"]);

    assert!(first.status.success() && second.status.success(), "{first_lines:?} {second_lines:?}");
    assert_eq!(disk_line(&first_lines), Some((256, 0)));
    assert_eq!(disk_line(&second_lines), Some((256, 256)), "{second_lines:?}");
    assert_eq!(heartbeats(&second_lines).last().and_then(|hb| hb.corrupt_blocks), Some(0));
}

#[test]
fn a_flipped_byte_on_the_disk_is_a_corrupt_block() {
    use std::os::unix::fs::FileExt;
    let disk = ScratchDisk::new("flip", 2);
    let (first, _) = run_guest(&["--workload", "disk:1:8", "--disk", disk.arg(), "--seconds", "1"]);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&disk.0).expect("open disk");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 3 * 4096 + 100).expect("read");
    file.write_all_at(&[byte[0] ^ 0x01], 3 * 4096 + 100).expect("flip");

    let (second, lines) = run_guest(&["--workload", "disk:1:8", "--disk", disk.arg(), "--seconds", "1"]);

    let corrupt: Vec<String> = lines.iter().filter(|l| matches!(l, ConsoleLine::Corrupt(_))).map(ToString::to_string).collect();
    assert!(first.status.success());
    assert_eq!(corrupt.len(), 1, "{lines:?}");
    assert!(corrupt[0].starts_with("CORRUPT block=3 "), "{corrupt:?}");
    assert_eq!(heartbeats(&lines).last().and_then(|hb| hb.corrupt_blocks), Some(1));
    assert_eq!(second.status.code(), Some(1));
}

#[test]
fn a_disk_too_small_for_the_workload_is_an_error_and_the_rest_runs() {
    let disk = ScratchDisk::new("small", 1);

    let (output, lines) = run_guest(&["--workload", "dirty:1:1,disk:2:1", "--disk", disk.arg(), "--seconds", "1"]);

    assert!(output.status.success());
    assert!(matches!(lines.first(), Some(ConsoleLine::Error(e)) if e.contains("needs 2 MiB")), "{lines:?}");
    assert!(matches!(lines.get(1), Some(ConsoleLine::Ready(Ready { workload, .. })) if *workload == Workload::dirty(1, 1)));
    assert_eq!(heartbeats(&lines).last().map(|hb| hb.corrupt_blocks), Some(None));
}
