//! The CLI toward servers that misbehave or that it must choose between: a server that
//! accepts and never answers makes it give up within `--timeout`, naming the server and
//! the limit; `vm list` asks the controller when one is named and the agent when
//! `--agent` is given. The servers here are fakes (the behaviour is the CLI's logic).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Longest a CLI run may take before the test calls it a hang.
const GUARD: Duration = Duration::from_secs(20);

/// Runs `walkabout ARGS` with `env`, killing it and failing the test if it outlives
/// [`GUARD`]; its output and how long it ran.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walkabout"));
    cmd.args(args).env("WALKABOUT_LOG", "warn").env_remove("WALKABOUT_AGENT").env_remove("WALKABOUT_CONTROLLER");
    cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("run walkabout");
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > GUARD {
            let _ = child.kill();
            let _ = child.wait();
            panic!("walkabout {args:?} still ran after {GUARD:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().expect("output"), start.elapsed())
}

/// A listener that accepts connections and never answers; its URL.
fn silent_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = vec![];
        for s in listener.incoming().flatten() {
            held.push(s); // accepted, never read, never answered
        }
    });
    url
}

/// A server answering `GET path` with `body` (JSON) for each `(path, body)`, 404
/// otherwise; its URL.
fn json_server(routes: Vec<(&'static str, String)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut reader = BufReader::new(s.try_clone().expect("clone"));
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = first.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match routes.iter().find(|(p, _)| *p == path) {
                Some((_, b)) => ("200 OK", b.clone()),
                None => ("404 Not Found", r#"{"error":"no such path","kind":"not_found"}"#.to_string()),
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts that `walkabout ARGS` toward the silent server at `url` failed within a few
/// seconds of its 1 s timeout, saying which server did not answer within 1000 ms.
fn assert_gives_up(args: &[&str], url: &str) {
    let (out, took) = run(args, &[]);
    assert!(!out.status.success(), "walkabout {args:?} succeeded against a silent server: {}", stdout(&out));
    let e = stderr(&out);
    assert!(e.contains(url) && e.contains("within 1000 ms"), "walkabout {args:?}: the message names neither the server nor the limit: {e}");
    assert!(took < Duration::from_secs(10), "walkabout {args:?} took {took:?} to give up with --timeout 1s");
}

#[test]
fn the_cli_against_a_silent_agent_gives_up_within_its_timeout_naming_it() {
    let url = silent_server();
    assert_gives_up(&["host", "info", "--agent", &url, "--timeout", "1s"], &url);
    assert_gives_up(&["vm", "list", "--agent", &url, "--timeout", "1s"], &url);
}

#[test]
fn the_cli_against_a_silent_controller_gives_up_within_its_timeout_naming_it() {
    let url = silent_server();
    assert_gives_up(&["host", "list", "--controller", &url, "--timeout", "1s"], &url);
    assert_gives_up(&["--timeout", "1s", "cluster", "plans", "--controller", &url], &url);
    assert_gives_up(&["walk", "--controller", &url, "--timeout", "1s"], &url);
}

/// A VM as the controller reports it.
fn cluster_vm(name: &str, host: &str) -> String {
    format!(
        r#"{{"version":1,"name":"{name}","host":"{host}","memory_mib":256,"vcpus":1,"workload":"idle","state":"running",
        "guest":{{"ready":true,"cpus":1,"heartbeats":9,"last_seq":9,"seq_breaks":0,"corrupt_pages":0,"kernel_trouble":false,"alerts":[]}}}}"#
    )
}

/// A VM as an agent reports it.
fn agent_vm(name: &str) -> String {
    format!(
        r#"{{"version":1,"spec":{{"name":"{name}","memory_mib":256}},"state":"running","accel":"tcg","pid":42,"run_dir":"/tmp/x",
        "created_at_ms":0,"guest":{{"ready":true,"cpus":1,"heartbeats":3,"last_seq":3,"seq_breaks":0,"corrupt_pages":0,"kernel_trouble":false,"alerts":[]}}}}"#
    )
}

#[test]
fn vm_list_with_a_controller_shows_the_clusters_vms_and_their_hosts() {
    let ctl = json_server(vec![("/v1/vms", format!("[{},{}]", cluster_vm("g1", "h1"), cluster_vm("g2", "h3")))]);
    let (out, _) = run(&["vm", "list"], &[("WALKABOUT_CONTROLLER", &ctl)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().take(3).collect()).collect();
    assert_eq!(rows, [vec!["NAME", "HOST", "STATE"], vec!["g1", "h1", "running"], vec!["g2", "h3", "running"]], "{text}");
}

#[test]
fn vm_info_with_a_controller_names_the_vms_host() {
    let ctl = json_server(vec![("/v1/vms/g2", cluster_vm("g2", "h3"))]);
    let (out, _) = run(&["vm", "info", "g2", "--controller", &ctl, "--output", "json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!((v["name"].as_str(), v["host"].as_str()), (Some("g2"), Some("h3")), "{v}");
}

#[test]
fn vm_list_with_an_agent_asks_that_agent_even_when_a_controller_is_named() {
    let ctl = json_server(vec![("/v1/vms", format!("[{}]", cluster_vm("from-controller", "h1")))]);
    let agent = json_server(vec![("/v1/vms", format!("[{}]", agent_vm("from-agent")))]);
    let (out, _) = run(&["vm", "list", "--agent", &agent, "--output", "json"], &[("WALKABOUT_CONTROLLER", &ctl)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["spec"]["name"].as_str(), Some("from-agent"), "{v}");
}
