//! Soak of `walkabout up`: the cluster the README starts (a controller, 3 agents on
//! loopback, 4 guests walking about by live migration), left running for `--duration`
//! (default an hour), then asked how the guests fared. One JSON document on stdout:
//! hops (completed / failed), downtime, and per guest the agents' own counters of
//! heartbeat sequence breaks, corrupt pages and kernel trouble. Not a test: it reports.
//!
//! `cargo run --release -p walkabout-bench --bin soak [-- --duration 1h]`
//!
//! With `--faults` it soaks a cluster of its own instead, dealing faults (see `faults`).

mod faults;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use walkabout_api::VmInfo;
use walkabout_bench::{build_walkabout, environment, guest_image, stats, walkabout_copy};
use walkabout_testbed::{TempDir, UpSession};

/// Soak of `walkabout up` (or, with --faults, of a cluster of its own dealt faults); one
/// JSON document on stdout.
#[derive(clap::Parser)]
#[command(name = "soak")]
struct Cli {
    /// How long the guests walk (s, m or h).
    #[arg(long, value_parser = parse_duration_arg, default_value = "1h")]
    duration: Duration,
    /// Guests walking (as `walkabout up`).
    #[arg(long, default_value_t = 4)]
    guests: usize,
    /// Rest of each guest between two hops (as `walkabout up`).
    #[arg(long, default_value = "3s")]
    pause: String,
    /// Soak target/release/walkabout as it is (no cargo build first).
    #[arg(long)]
    no_build: bool,
    /// Soak the walkabout binary at PATH (e.g. a debug build).
    #[arg(long, value_name = "PATH")]
    walkabout: Option<PathBuf>,
    /// A controller and 3 agents in namespaces with mutual TLS, a fault every
    /// --fault-every hops (agent restart, link cut, cancel, destination killed) until
    /// --hops hops or --duration; --memory, --workload and --parallel shape the guests
    /// and the walk.
    #[arg(long)]
    faults: bool,
    /// With --faults: hops to walk.
    #[arg(long, default_value_t = 1000)]
    hops: usize,
    /// With --faults: a fault every this many hops.
    #[arg(long, default_value_t = 50)]
    fault_every: usize,
    /// With --faults: each guest's memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// With --faults: each guest's workload.
    #[arg(long, default_value = "dirty:16:8")]
    workload: String,
    /// With --faults: hops at once.
    #[arg(long, default_value_t = 2)]
    parallel: u32,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Hosts of the cluster, as `walkabout up` (and scripts/up.sh) starts it.
const HOSTS: u16 = 3;

struct Args {
    duration: Duration,
    guests: usize,
    pause: String,
    build: bool,
    binary: Option<PathBuf>,
    faults: bool,
    hops: usize,
    every: usize,
    memory: String,
    workload: String,
    parallel: u32,
}

fn parse_duration(s: &str) -> Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?} (e.g. 300s, 5m, 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => bail!("bad duration {s:?} (e.g. 300s, 5m, 1h)"),
    };
    Ok(Duration::from_secs(secs))
}

/// A pause such as `3s`, `500ms` or `1m`, in ms.
fn parse_duration_ms(s: &str) -> Result<u64> {
    match s.strip_suffix("ms") {
        Some(ms) => ms.parse().with_context(|| format!("bad duration {s:?}")),
        None => Ok(parse_duration(s)?.as_millis() as u64),
    }
}

fn parse_args() -> Result<Option<Args>> {
    let c = <Cli as clap::Parser>::parse();
    Ok(Some(Args {
        duration: c.duration,
        guests: c.guests,
        pause: c.pause,
        build: !c.no_build,
        binary: c.walkabout,
        faults: c.faults,
        hops: c.hops,
        every: c.fault_every,
        memory: c.memory,
        workload: c.workload,
        parallel: c.parallel,
    }))
}

/// One hop as `walkabout up` prints it:
/// `hop N: VM FROM -> TO  RESULT  total T ms  downtime D ms[  (reason)]  heartbeat seq S, B breaks, C corrupt pages`.
#[derive(Debug)]
struct Hop {
    vm: String,
    result: String,
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
    breaks: Option<u64>,
    line: String,
}

fn parse_hop(line: &str) -> Option<Hop> {
    let t: Vec<&str> = line.split_whitespace().collect();
    if t.first() != Some(&"hop") || t.len() < 13 || t.get(4) != Some(&"->") {
        return None;
    }
    let after = |key: &str| t.iter().position(|w| *w == key).and_then(|i| t.get(i + 1)).and_then(|v| v.parse::<f64>().ok());
    let breaks = t.iter().position(|w| *w == "breaks,").and_then(|i| t.get(i.checked_sub(1)?)).and_then(|v| v.parse().ok());
    Some(Hop {
        vm: t[2].to_string(),
        result: t[6].to_string(),
        total_ms: after("total"),
        downtime_ms: after("downtime"),
        breaks,
        line: line.to_string(),
    })
}

/// `walkabout vm info NAME --agent URL --output json`, if that agent has the VM.
fn vm_info(bin: &std::path::Path, url: &str, name: &str) -> Option<VmInfo> {
    let out = Command::new(bin)
        .args(["vm", "info", name, "--agent", url, "--output", "json"])
        .env("WALKABOUT_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

/// The guest's counters from whichever agent has heard most of it (during a hop both
/// ends may list the VM; the source, still running it, has the whole history).
fn guest_report(bin: &std::path::Path, agents: &[(String, String)], name: &str) -> Value {
    let best =
        agents.iter().filter_map(|(host, url)| vm_info(bin, url, name).map(|v| (host.clone(), v))).max_by_key(|(_, v)| v.guest.heartbeats);
    match best {
        Some((host, v)) => {
            let g = &v.guest;
            json!({
                "vm": name, "host": host, "state": v.record.state,
                "heartbeats": g.heartbeats, "last_seq": g.last_seq,
                "seq_breaks": g.seq_breaks, "corrupt_pages": g.corrupt_pages,
                "kernel_trouble": g.kernel_trouble, "alerts": g.alerts,
            })
        }
        None => json!({"vm": name, "error": "no agent has this VM"}),
    }
}

fn main() -> Result<()> {
    let Some(args) = parse_args()? else { return Ok(()) };
    let mut env = environment();
    let wbin = match &args.binary {
        Some(p) => walkabout_copy(p, false)?,
        None => build_walkabout(args.build)?,
    };
    env["walkabout_binary"] = wbin.provenance.clone();
    let bin = wbin.path.clone();
    guest_image(&bin)?;
    if args.faults {
        let fa = faults::FaultArgs {
            hops: args.hops,
            every: args.every,
            guests: args.guests,
            memory: args.memory.clone(),
            workload: args.workload.clone(),
            parallel: args.parallel,
            pause_ms: parse_duration_ms(&args.pause)?,
            limit: args.duration,
        };
        let doc = faults::run(&bin, env, &fa)?;
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let scratch = TempDir::new("soak")?;
    let stderr_log = scratch.path().join("up.stderr");
    let guests = args.guests.to_string();
    let mut up = UpSession::start(&bin, HOSTS, &["--accel", "tcg", "--guests", &guests, "--pause", &args.pause], Some(&stderr_log))?;
    eprintln!("soak: walkabout up (pid root {}), walking for {} s", up.root.display(), args.duration.as_secs());

    // Boot: the agents' URLs, then every guest booted, then the walk starts.
    let mut agents: Vec<(String, String)> = vec![];
    let mut booted = 0usize;
    let boot_start = Instant::now();
    while booted < args.guests {
        match up.line(Duration::from_secs(1)) {
            Some(l) => {
                let t: Vec<&str> = l.split_whitespace().collect();
                if t.len() >= 4 && t[0] == "host" && t[2] == "at" {
                    agents.push((t[1].to_string(), t[3].to_string()));
                }
                if l.starts_with("booted g") {
                    booted += 1;
                    eprintln!("soak: {l}");
                }
            }
            None if up.wait(Duration::ZERO).is_some() || boot_start.elapsed() > Duration::from_secs(600) => {
                bail!("walkabout up did not boot its guests: {}", std::fs::read_to_string(&stderr_log).unwrap_or_default());
            }
            None => {}
        }
    }
    let boot_s = boot_start.elapsed().as_secs();

    // The walk.
    let mut hops: Vec<Hop> = vec![];
    let walk_start = Instant::now();
    let mut next_report = Duration::from_secs(60);
    while walk_start.elapsed() < args.duration {
        if let Some(h) = up.line(Duration::from_secs(1)).as_deref().and_then(parse_hop) {
            hops.push(h);
        } else if up.wait(Duration::ZERO).is_some() {
            bail!("walkabout up exited during the walk: {}", std::fs::read_to_string(&stderr_log).unwrap_or_default());
        }
        if walk_start.elapsed() >= next_report {
            next_report += Duration::from_secs(60);
            let failed = hops.iter().filter(|h| h.result != "completed").count();
            eprintln!("soak: {} s, {} hops, {failed} not completed", walk_start.elapsed().as_secs(), hops.len());
        }
    }
    let walked_s = walk_start.elapsed().as_secs();

    // The guests' health as their agents count it, then Ctrl-C; hops under way finish.
    let names: Vec<String> = (1..=args.guests).map(|g| format!("g{g}")).collect();
    let guests: Vec<Value> = names.iter().map(|n| guest_report(&bin, &agents, n)).collect();
    up.interrupt();
    let status = up.wait(Duration::from_secs(120));
    let mut tail = vec![];
    while let Some(l) = up.line(Duration::from_millis(200)) {
        match parse_hop(&l) {
            Some(h) => hops.push(h),
            None => tail.push(l),
        }
    }
    let leftovers = up.leftovers();

    let completed: Vec<&Hop> = hops.iter().filter(|h| h.result == "completed").collect();
    let not_completed: Vec<&str> = hops.iter().filter(|h| h.result != "completed").map(|h| h.line.as_str()).collect();
    let downtimes: Vec<f64> = completed.iter().filter_map(|h| h.downtime_ms).collect();
    let totals: Vec<f64> = completed.iter().filter_map(|h| h.total_ms).collect();
    let summary = |xs: &[f64]| stats(xs).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi})).unwrap_or(Value::Null);
    let sum = |key: &str| guests.iter().filter_map(|g| g[key].as_u64()).sum::<u64>();
    let breaks_in_hop_lines: Value = names
        .iter()
        .map(|n| (n.clone(), json!(hops.iter().filter(|h| &h.vm == n).filter_map(|h| h.breaks).max().unwrap_or(0))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let doc = json!({
        "bench": "soak",
        "environment": env,
        "settings": {
            "what": "walkabout up --accel tcg (controller in-process, agents on loopback started by the testbed), guests walking one hop at a time with the given pause; at the end each guest's counters are read from the agent holding it (walkabout vm info), then walkabout up is stopped with Ctrl-C",
            "hosts": HOSTS, "guests": args.guests, "pause": args.pause,
            "duration_s": args.duration.as_secs(),
        },
        "boot_s": boot_s,
        "walked_s": walked_s,
        "hops": hops.len(),
        "completed": completed.len(),
        "failed": not_completed.len(),
        "not_completed": not_completed,
        "downtime_ms": summary(&downtimes),
        "total_ms": summary(&totals),
        "guests": guests,
        "heartbeat_breaks": sum("seq_breaks"),
        "heartbeat_breaks_seen_in_hop_lines": breaks_in_hop_lines,
        "corrupt_pages": sum("corrupt_pages"),
        "kernel_trouble": guests.iter().filter(|g| g["kernel_trouble"] == true).count(),
        "stop": {
            "exit": status.map(|s| s.to_string()).unwrap_or_else(|| "still running after 120 s".into()),
            "clean": status.is_some_and(|s| s.success()) && leftovers.is_empty() && !up.root.exists(),
            "processes_left": leftovers,
            "last_lines": tail.iter().rev().take(3).rev().collect::<Vec<_>>(),
        },
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_line_of_walkabout_up_is_read_whole() {
        let h = parse_hop("hop 7: g2 h1 -> h3  completed  total 1834 ms  downtime 41 ms  heartbeat seq 912, 1 breaks, 0 corrupt pages")
            .expect("a hop");
        assert_eq!((h.vm.as_str(), h.result.as_str()), ("g2", "completed"));
        assert_eq!((h.total_ms, h.downtime_ms, h.breaks), (Some(1834.0), Some(41.0), Some(1)));
    }

    #[test]
    fn a_failed_hop_keeps_its_result_and_lacks_a_downtime() {
        let h = parse_hop("hop 3: g1 h2 -> h1  failed  total 900 ms  downtime null ms  (destination refused)  heartbeat seq 10, 0 breaks, 0 corrupt pages")
            .expect("a hop");
        assert_eq!((h.result.as_str(), h.downtime_ms), ("failed", None));
    }

    #[test]
    fn durations_take_seconds_minutes_and_hours() {
        assert_eq!(parse_duration("1h").expect("1h"), Duration::from_secs(3600));
        assert_eq!(parse_duration("5m").expect("5m"), Duration::from_secs(300));
        assert_eq!(parse_duration("90").expect("90"), Duration::from_secs(90));
        assert!(parse_duration("5x").is_err());
    }
}

#[cfg(test)]
mod cli {
    use super::Cli;
    use clap::{CommandFactory, Parser};
    use std::time::Duration;

    #[test]
    fn the_flags_and_defaults_are_those_of_the_hand_parser() {
        Cli::command().debug_assert();
        let d = Cli::try_parse_from(["soak"]).expect("defaults");
        assert_eq!(
            (d.duration, d.guests, d.pause.as_str(), d.no_build, d.walkabout, d.faults),
            (Duration::from_secs(3600), 4, "3s", false, None, false)
        );
        assert_eq!((d.hops, d.fault_every, d.memory.as_str(), d.workload.as_str(), d.parallel), (1000, 50, "256M", "dirty:16:8", 2));
        let args = [
            "soak",
            "--duration",
            "5m",
            "--guests",
            "2",
            "--pause",
            "1s",
            "--no-build",
            "--walkabout",
            "/bin/true",
            "--faults",
            "--hops",
            "10",
            "--fault-every",
            "3",
            "--memory",
            "384M",
            "--workload",
            "idle",
            "--parallel",
            "1",
        ];
        let g = Cli::try_parse_from(args).expect("every flag");
        assert_eq!((g.duration, g.fault_every, g.parallel), (Duration::from_secs(300), 3, 1));
        assert!(Cli::try_parse_from(["soak", "--duration", "5x"]).is_err());
    }
}
