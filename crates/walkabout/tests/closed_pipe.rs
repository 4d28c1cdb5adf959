//! `walkabout vm list | head -1`: when the reader of stdout goes away the real binary
//! ends quietly (no panic, no backtrace, no message), with the status a shell gives a
//! process that a closed pipe ended. The agent is a stand-in that answers one request
//! with many VMs, so the listing is larger than a pipe holds and the reader closes
//! while the CLI is still writing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use walkabout_api::{Accel, GuestStatus, VmInfo, VmRecord, VmSpec, VmState};

/// Serves one `GET /v1/vms` with `n` VMs, then closes; returns the agent's URL.
fn agent_with_vms(n: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    let vms: Vec<VmInfo> = (0..n)
        .map(|i| VmInfo {
            record: VmRecord {
                version: 1,
                spec: VmSpec::new(format!("vm{i}"), 256),
                state: VmState::Running,
                reason: None,
                accel: Accel::Tcg,
                pid: None,
                run_dir: "/nonexistent".into(),
                created_at_ms: 0,
                guest_before: None,
                protection: None,
            },
            guest: GuestStatus { last_seq: Some(i as u64), ..GuestStatus::default() },
            protection: None,
        })
        .collect();
    let body = serde_json::to_string(&vms).expect("VMs as JSON");
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else { return };
        let mut request = [0u8; 4096];
        let _ = conn.read(&mut request);
        let head =
            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(body.as_bytes());
    });
    url
}

/// Runs `walkabout vm list` with `extra` args into a reader that takes one line and
/// closes; returns the exit status and what the CLI wrote on stderr.
fn list_into_a_reader_of_one_line(extra: &[&str]) -> (std::process::ExitStatus, String) {
    let url = agent_with_vms(20_000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_walkabout"))
        .args(["vm", "list", "--agent", &url])
        .args(extra)
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start walkabout");
    let mut first = String::new();
    {
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        out.read_line(&mut first).expect("the first line");
    } // The reader closes here, long before 20 000 VMs are printed.
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    let status = child.wait().expect("walkabout ends");
    assert!(!first.is_empty(), "walkabout printed nothing; stderr: {err}");
    (status, err)
}

/// Quiet: ended by SIGPIPE (141 in a shell) or with 141 itself, and nothing on stderr.
fn assert_quiet(status: std::process::ExitStatus, err: &str) {
    assert!(status.signal() == Some(libc::SIGPIPE) || status.code() == Some(141), "status {status:?}, stderr: {err}");
    assert!(err.is_empty(), "walkabout said something on a closed pipe: {err}");
}

#[test]
fn vm_list_as_json_into_a_reader_that_closes_after_one_line_exits_quietly() {
    let (status, err) = list_into_a_reader_of_one_line(&["--output", "json"]);
    assert_quiet(status, &err);
}

#[test]
fn vm_list_as_a_table_into_a_reader_that_closes_after_one_line_exits_quietly() {
    let (status, err) = list_into_a_reader_of_one_line(&[]);
    assert_quiet(status, &err);
}
