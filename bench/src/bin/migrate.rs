//! Migration benchmark: Walkabout's `--mode auto` against QEMU's defaults (the peer's
//! `migrate-bench.py`), cell by cell in the same run: guest memory x workload x bandwidth,
//! completion rate, total time, downtime and bytes (medians over the runs that
//! completed), and for Walkabout the guest's health after every migration (heartbeat
//! sequence unbroken, no corrupt page, no kernel trouble) — a migration that completed
//! but hurt the guest counts as a failure.
//!
//! `cargo run --release -p walkabout-bench --bin migrate -- [--quick] [--out FILE]`
//! (see `--help`). One JSON document on stdout; progress on stderr; with `--out` the
//! document is also rewritten after every cell, so a cut run leaves what it measured.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use walkabout_api::{Phase, VmInfo};
use walkabout_bench::{
    environment, median, prepare, ratio, round3, run_with_deadline, start_agent, stats, AgentCli, Created, MigrateSummary, Prepared,
};
use walkabout_testbed::{kill9, processes_mentioning, Agent, TempDir};

/// Walkabout's `--mode auto` against QEMU's defaults, cell by cell; one JSON document.
#[derive(clap::Parser)]
#[command(name = "migrate")]
struct Cli {
    /// 512 MiB only, 1 run per cell (a smoke check).
    #[arg(long)]
    quick: bool,
    /// Guest sizes in MiB (default 512,2048; 512 with --quick).
    #[arg(long, value_delimiter = ',')]
    mem: Option<Vec<u64>>,
    /// Guest workloads.
    #[arg(long, default_value = "idle,dirty:64:32,dirty:64:128,dirty:64:512")]
    workload: String,
    /// 'default' (each side's own default) and/or a cap in MiB/s.
    #[arg(long, default_value = "default,100")]
    bandwidth: String,
    /// Migrations per cell and side (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// The peer cancels a run that has not completed after this long.
    #[arg(long, default_value_t = 30)]
    give_up_s: u64,
    /// Measure one side only.
    #[arg(long, value_parser = ["walkabout", "qemu"])]
    only: Option<String>,
    /// Also write the document to FILE after every cell.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Bench target/release/walkabout as it is (no cargo build first).
    #[arg(long)]
    no_build: bool,
    /// Bench this walkabout binary (implies --no-build).
    #[arg(long, value_name = "PATH")]
    bin: Option<PathBuf>,
    /// Instead of the grid, the migration engine's cells (issue #15): post-copy with and
    /// without preempt (the guest's stall), a 20 MiB/s tbf link with compression, 4 and
    /// 8 GiB guests idle and dirtying 256 MiB; QEMU's defaults beside each.
    #[arg(long)]
    engine: bool,
    /// With --engine, only the cells whose names are listed.
    #[arg(long, value_delimiter = ',')]
    cells: Option<Vec<String>>,
    /// With --engine, the guest QEMU's peer boots: its own (dirty.c, the default),
    /// Walkabout's (the same kernel, initramfs and guest program as Walkabout's side: the
    /// same workload), or both, one after the other (`qemu` and `qemu_walkabout_guest` in
    /// each cell).
    #[arg(long, value_enum, default_value = "own")]
    peer_guest: PeerGuest,
    /// Instead of the grid, the cost of TLS and of the relay: each --mem x --workload cell
    /// migrated by Walkabout between two plain agents (--insecure-loopback: QEMU's
    /// streams plain) and between two agents under a CA (QEMU's streams over TLS), each
    /// direct and with --relay (every stream through the destination agent's API port),
    /// --runs each, medians and the ratios tls/plain, relay/direct.
    #[arg(long)]
    tls: bool,
}

struct Args {
    mems: Vec<u64>,
    workloads: Vec<String>,
    bandwidths: Vec<Option<u64>>,
    runs: usize,
    give_up_s: u64,
    only: Option<String>,
    out: Option<PathBuf>,
    quick: bool,
    build: bool,
    bin: Option<PathBuf>,
    engine: bool,
    cells: Option<Vec<String>>,
    tls: bool,
    peer_guest: PeerGuest,
}

/// Which guest the peer boots (`--peer-guest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PeerGuest {
    /// The peer's own (`build-guest.sh`: `dirty.c`, one byte written per page).
    Own,
    /// Walkabout's guest image: the same workload program on both sides.
    Walkabout,
    /// Both, one after the other.
    Both,
}

fn parse_args() -> Result<Option<Args>> {
    let c = <Cli as clap::Parser>::parse();
    let quick = c.quick;
    let mut a = Args {
        mems: vec![512, 2048],
        workloads: c.workload.split(',').map(|w| w.trim().to_string()).collect(),
        bandwidths: walkabout_bench::parse_bandwidths(&c.bandwidth)?,
        runs: 3,
        give_up_s: c.give_up_s,
        only: c.only,
        out: c.out,
        quick: c.quick,
        build: !c.no_build && c.bin.is_none(),
        bin: c.bin,
        engine: c.engine,
        cells: c.cells.map(|v| v.into_iter().map(|x| x.trim().to_string()).collect()),
        tls: c.tls,
        peer_guest: c.peer_guest,
    };
    if quick {
        a.mems = vec![512];
        a.runs = 1;
    }
    if let Some(m) = c.mem {
        a.mems = m;
    }
    if let Some(r) = c.runs {
        a.runs = r;
    }
    Ok(Some(a))
}

fn main() -> Result<()> {
    let Some(args) = parse_args()? else { return Ok(()) };
    let started = Instant::now();
    let mut env = environment();
    let Prepared { walkabout: wbin, peer, guest } = match &args.bin {
        Some(b) => {
            let walkabout = walkabout_bench::walkabout_copy(b, false)?;
            walkabout_bench::guest_image(&walkabout.path)?;
            Prepared { walkabout, peer: walkabout_bench::peer_dir()?, guest: walkabout_bench::peer_guest()? }
        }
        None => prepare(args.build)?,
    };
    let bin = wbin.path.clone();
    env["walkabout_binary"] = wbin.provenance.clone();
    let scratch = TempDir::new("migrate")?;
    if args.engine {
        return engine::run(&args, &env, &bin, &peer, &guest, scratch.path(), started);
    }
    if args.tls {
        return tls_cost(&args, &env, &bin, started);
    }
    let want_wa = args.only.as_deref() != Some("qemu");
    let want_qe = args.only.as_deref() != Some("walkabout");
    let agents = if want_wa { Some((start_agent(&bin)?, start_agent(&bin)?)) } else { None };

    let mut cells: Vec<Value> = vec![];
    let total_cells = args.mems.len() * args.bandwidths.len() * args.workloads.len();
    for &mem in &args.mems {
        for &bw in &args.bandwidths {
            for wl in &args.workloads {
                let label = format!("{mem} MiB, {wl}, bandwidth {}", bw.map(|b| format!("{b} MiB/s")).unwrap_or("default".into()));
                eprintln!("[{}/{total_cells}] {label} ({:.0} s in)", cells.len() + 1, started.elapsed().as_secs_f64());
                let wa = match &agents {
                    Some((a, b)) => {
                        walkabout_cell(a, b, mem, wl, bw, args.runs, &[]).unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
                    }
                    None => Value::Null,
                };
                if want_wa {
                    eprintln!("  walkabout: {}", brief(&wa));
                }
                let qe = if want_qe {
                    qemu_cell(&peer, &guest, scratch.path(), mem, wl, bw, args.runs, args.give_up_s, &Peer::default())
                        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
                } else {
                    Value::Null
                };
                if want_qe {
                    eprintln!("  qemu:      {}", brief(&qe));
                }
                let compare = compare(&wa, &qe);
                cells.push(json!({
                    "memory_mib": mem, "workload": wl,
                    "bandwidth": bw.map(|b| json!(b)).unwrap_or(json!("default")),
                    "walkabout": wa, "qemu": qe, "compare": compare,
                }));
                if let Some(path) = &args.out {
                    let doc = document(&env, &args, &peer, &cells, false, started.elapsed());
                    std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
                        .with_context(|| format!("writing {}", path.display()))?;
                }
            }
        }
    }
    drop(agents);
    let doc = document(&env, &args, &peer, &cells, true, started.elapsed());
    let text = serde_json::to_string_pretty(&doc)? + "\n";
    if let Some(path) = &args.out {
        std::fs::write(path, &text)?;
    }
    print!("{text}");
    Ok(())
}

/// The cost of QEMU's streams over TLS and of the relay: every cell by Walkabout between
/// plain agents and between agents under a CA, each direct and relayed (`--relay`: every
/// stream through the destination agent's API port), in the same run; prints (and
/// writes) one document.
fn tls_cost(args: &Args, env: &Value, bin: &Path, started: Instant) -> Result<()> {
    let ca = walkabout_testbed::TestCa::shared()?;
    let tls_agent = |name: &str| -> Result<Agent> {
        let id = ca.host(name, "127.0.0.1")?;
        Ok(Agent::start(walkabout_testbed::AgentSpec::new(bin).env("WALKABOUT_LOG", "warn").tls(&id, &ca.operator()))?)
    };
    let plain = (start_agent(bin)?, start_agent(bin)?);
    let tls = (tls_agent("bench-tls-a")?, tls_agent("bench-tls-b")?);
    let mut cells: Vec<Value> = vec![];
    let ratio_of = |over: &Value, side: &Value, key: &str| json!(ratio(side[key]["median"].as_f64(), over[key]["median"].as_f64()));
    let settings = json!({
        "runs_per_cell": args.runs,
        "plain": "walkabout migrate --wait --mode auto between two agents on --insecure-loopback (QEMU's migration stream plain)",
        "plain_relay": "the same with --relay: QEMU sends to a loopback listener of the source agent, which carries each connection through the destination agent's API port (plain HTTP upgrade on loopback) to the destination QEMU's loopback listener",
        "tls": "between two agents serving mutual TLS with host certificates of one CA: QEMU's migration stream over TLS (tls-creds-x509, tls-authz admitting the source alone)",
        "tls_relay": "the same with --relay: the relay's connections are the agents' mutual TLS, QEMU's own TLS inside (two encryptions, two more copies per byte)",
    });
    for &mem in &args.mems {
        for wl in &args.workloads {
            eprintln!("[{}] {mem} MiB, {wl} ({:.0} s in)", cells.len() + 1, started.elapsed().as_secs_f64());
            let side = |pair: &(Agent, Agent), extra: &[&str], label: &str| {
                let v = walkabout_cell(&pair.0, &pair.1, mem, wl, None, args.runs, extra)
                    .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
                eprintln!("  {label}: {}", brief(&v));
                v
            };
            let p = side(&plain, &[], "plain");
            let pr = side(&plain, &["--relay"], "plain+relay");
            let t = side(&tls, &[], "tls");
            let tr = side(&tls, &["--relay"], "tls+relay");
            let mut compare = serde_json::Map::new();
            for key in ["total_ms", "downtime_ms", "transferred_bytes"] {
                compare.insert(format!("{key}_tls_over_plain"), ratio_of(&p, &t, key));
                compare.insert(format!("{key}_plain_relay_over_plain"), ratio_of(&p, &pr, key));
                compare.insert(format!("{key}_tls_relay_over_tls"), ratio_of(&t, &tr, key));
                compare.insert(format!("{key}_tls_relay_over_plain"), ratio_of(&p, &tr, key));
            }
            cells.push(
                json!({"memory_mib": mem, "workload": wl, "plain": p, "plain_relay": pr, "tls": t, "tls_relay": tr, "compare": compare}),
            );
            let doc = json!({
                "bench": "migrate --tls",
                "complete": false,
                "elapsed_s": started.elapsed().as_secs(),
                "environment": env,
                "settings": settings,
                "cells": cells,
            });
            if let Some(path) = &args.out {
                std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n").with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    let doc = json!({"bench": "migrate --tls", "complete": true, "elapsed_s": started.elapsed().as_secs(), "environment": env, "settings": settings, "runs_per_cell": args.runs, "cells": cells});
    let text = serde_json::to_string_pretty(&doc)? + "\n";
    if let Some(path) = &args.out {
        std::fs::write(path, &text)?;
    }
    print!("{text}");
    Ok(())
}

/// One line for the progress log.
fn brief(side: &Value) -> String {
    if let Some(e) = side["error"].as_str() {
        return format!("error: {e}");
    }
    format!(
        "{}/{} ok, total {} ms, downtime {} ms, {} MiB",
        side["completed"],
        side["runs"],
        side["total_ms"]["median"],
        side["downtime_ms"]["median"],
        side["transferred_bytes"]["median"].as_f64().map(|b| (b / 1048576.0).round().to_string()).unwrap_or("-".into())
    )
}

/// Median/min/max of a field over the completed runs.
fn field_stats(runs: &[Value], key: &str) -> Value {
    let xs: Vec<f64> = runs.iter().filter(|r| r["ok"] == true).filter_map(|r| r[key].as_f64()).collect();
    match stats(&xs) {
        Some((m, lo, hi)) => json!({"median": m, "min": lo, "max": hi}),
        None => Value::Null,
    }
}

/// Completion and medians of one side's runs.
fn side_summary(runs: Vec<Value>, extra: Value) -> Value {
    let ok = runs.iter().filter(|r| r["ok"] == true).count();
    let mut v = json!({
        "runs": runs.len(),
        "completed": ok,
        "completion_rate": if runs.is_empty() { Value::Null } else { json!(round3(ok as f64 / runs.len() as f64)) },
        "total_ms": field_stats(&runs, "total_ms"),
        "downtime_ms": field_stats(&runs, "downtime_ms"),
        "transferred_bytes": field_stats(&runs, "transferred_bytes"),
        "per_run": runs,
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

/// The guest's health counters from `vm info`: heartbeats, sequence breaks, corrupt
/// pages, kernel trouble.
fn health(info: &VmInfo) -> (u64, u64, u64, bool) {
    let g = &info.guest;
    (g.heartbeats, g.seq_breaks, g.corrupt_pages, g.kernel_trouble)
}

/// Waits until the VM on `agent` has logged at least `n` heartbeats; its last info.
fn wait_heartbeats(agent: &Agent, name: &str, n: u64, limit: Duration) -> Result<VmInfo> {
    let start = Instant::now();
    loop {
        let v: VmInfo = agent.cli(&["vm", "info", name])?;
        if health(&v).0 >= n || start.elapsed() > limit {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Walkabout: boots the guest once on A, then migrates it A->B->A... `runs` times with
/// `--mode auto`, checking the guest after each migration; deletes it at the end.
fn walkabout_cell(a: &Agent, b: &Agent, mem: u64, wl: &str, bw: Option<u64>, runs: usize, extra: &[&str]) -> Result<Value> {
    let name = format!("m{mem}-{}-{}", wl.replace(':', "-"), bw.map(|b| b.to_string()).unwrap_or("def".into()));
    let agents = [a, b];
    let memory = format!("{mem}M");
    let create =
        a.cli::<Created>(&["vm", "create", "--name", &name, "--memory", &memory, "--vcpus", "1", "--workload", wl, "--timeout", "300"]);
    let create = match create {
        Ok(v) => v,
        Err(e) => {
            let _ = a.cli_ok(&["vm", "delete", &name]);
            return Err(e);
        }
    };
    let mut holder = 0usize;
    let result = (|| -> Result<Vec<Value>> {
        // Settle: two seconds of heartbeats, as the peer waits two seconds after READY.
        wait_heartbeats(a, &name, 20, Duration::from_secs(60))?;
        let mut out = vec![];
        for run in 0..runs {
            let src = holder;
            let (from, to) = (agents[src], agents[1 - src]);
            let before: VmInfo = from.cli(&["vm", "info", &name])?;
            let (_, breaks0, _, _) = health(&before);
            let mut cmd = from.command(&["migrate", &name, "--to", &to.url, "--wait", "--output", "json"]);
            if !extra.contains(&"--mode") {
                cmd.args(["--mode", "auto"]);
            }
            cmd.args(extra);
            if let Some(b) = bw {
                cmd.args(["--max-bandwidth", &format!("{b}M")]);
            }
            let ran = run_with_deadline(cmd, Duration::from_secs(900), &from.data, "migrate")?;
            let summary: Option<MigrateSummary> = serde_json::from_str(ran.stdout.trim()).ok();
            // Where is the VM now? The destination if it completed, else its source.
            let (now, info) = match to.cli::<VmInfo>(&["vm", "info", &name]) {
                Ok(v) => (1 - src, v),
                Err(_) => (src, from.cli(&["vm", "info", &name]).context("the VM is on neither agent")?),
            };
            holder = now;
            // The guest must keep its heartbeat going on whichever host holds it.
            let (hb_now, _, _, _) = health(&info);
            let after = wait_heartbeats(agents[holder], &name, hb_now + 10, Duration::from_secs(30))?;
            let stall_ms = max_heartbeat_gap_ms(&after.record.run_dir.join("console.log"));
            let (hb_after, breaks, corrupt, trouble) = health(&after);
            let result = summary
                .as_ref()
                .map(|s| s.result.to_string())
                .unwrap_or_else(|| (if ran.status.is_none() { "timed-out" } else { "no-summary" }).to_string());
            let completed = summary.as_ref().is_some_and(|s| s.result == Phase::Completed);
            let mut problems: Vec<String> = vec![];
            if !completed {
                let why = summary.as_ref().and_then(|s| s.reason.clone()).unwrap_or_else(|| ran.stderr.trim().chars().take(300).collect());
                problems.push(format!("migration {result}: {why}"));
            }
            if breaks > breaks0 {
                problems.push(format!("heartbeat sequence broke {} time(s)", breaks - breaks0));
            }
            if hb_after < hb_now + 10 {
                problems.push(format!("heartbeat stopped ({hb_now} -> {hb_after} in 30 s)"));
            }
            if corrupt > 0 {
                problems.push(format!("{corrupt} corrupt page(s)"));
            }
            if trouble {
                problems.push(format!("kernel trouble: {:?}", after.guest.alerts));
            }
            if completed && now == src {
                problems.push("reported completed but the VM is still on its source".into());
            }
            if !completed && now != src {
                problems.push(format!("reported {result} but the VM moved to the destination"));
            }
            let s = summary.as_ref();
            let switches: Vec<Value> = s
                .map(|s| s.switches.iter().map(|w| json!({"to": w.to, "at_ms": w.at_ms, "reason": w.reason})).collect())
                .unwrap_or_default();
            let strategy = s.and_then(|s| s.strategy.as_ref()).map(|st| st.name.clone());
            let stream = s.and_then(|s| s.strategy.as_ref()).map(|st| {
                json!({"multifd_channels": st.multifd_channels, "compression": st.compression, "postcopy_preempt": st.postcopy_preempt, "why": st.stream_reason})
            });
            out.push(json!({
                "run": run,
                "direction": if to.url == b.url { "A->B" } else { "B->A" },
                "result": result,
                "ok": problems.is_empty(),
                "problems": problems,
                "total_ms": s.and_then(|s| s.total_ms),
                "downtime_ms": s.and_then(|s| s.downtime_ms),
                "transferred_bytes": s.map(|s| s.transferred_bytes),
                "iterations": s.map(|s| s.iterations),
                "dirty_rate_bps": s.and_then(|s| s.dirty_rate_bps),
                "strategy": strategy,
                "stream": stream,
                "guest_max_hb_gap_ms": stall_ms,
                "switches": switches,
                "cli_wall_ms": ran.wall.as_millis() as u64,
                "guest_after": {"heartbeats": hb_after, "seq_breaks": breaks, "corrupt_pages": corrupt, "kernel_trouble": trouble},
            }));
            eprintln!(
                "    run {run}: {result} total {} ms downtime {} ms strategy {} {}",
                json!(s.and_then(|s| s.total_ms)),
                json!(s.and_then(|s| s.downtime_ms)),
                json!(strategy),
                if problems.is_empty() { String::new() } else { format!("PROBLEMS: {problems:?}") }
            );
        }
        Ok(out)
    })();
    // Whatever happened, the VM goes.
    if agents[holder].cli_ok(&["vm", "delete", &name]).is_err() {
        let _ = agents[1 - holder].cli_ok(&["vm", "delete", &name]);
    }
    let per_run = result?;
    let dirty: Vec<f64> = per_run.iter().filter_map(|r| r["dirty_rate_bps"].as_f64()).collect();
    let stall = field_stats(&per_run, "guest_max_hb_gap_ms");
    Ok(side_summary(
        per_run,
        json!({
            "guest_max_hb_gap_ms": stall,
            "create_ms": create.create_ms,
            "measured_dirty_rate_mib_s": median(&dirty).map(|d| round3(d / 1048576.0)),
        }),
    ))
}

/// The peer: `migrate-bench.py` boots its own guest per run and prints one JSON line
/// per run. A run counts as completed when QEMU says so and the heartbeat continued at
/// the destination.
#[allow(clippy::too_many_arguments)]
fn qemu_cell(
    peer: &Path,
    guest: &Path,
    scratch: &Path,
    mem: u64,
    wl: &str,
    bw: Option<u64>,
    runs: usize,
    give_up_s: u64,
    how: &Peer,
) -> Result<Value> {
    // Its temporary directories (serial files, QMP sockets) land in our scratch dir.
    let tmp = scratch.join(format!("qemu-{mem}-{}-{}-{}", wl.replace(':', "-"), bw.unwrap_or(0), how.args.join("")));
    std::fs::create_dir_all(&tmp)?;
    let mut cmd = match &how.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    cmd.arg(peer.join("migrate-bench.py"))
        .arg("--guest")
        .arg(guest)
        .args(["--mem", &mem.to_string(), "--workload", wl, "--accel", "tcg"])
        .args(["--bandwidth-mib", &bw.unwrap_or(0).to_string(), "--runs", &runs.to_string(), "--give-up-s", &give_up_s.to_string()])
        .args(&how.args)
        .env("TMPDIR", &tmp);
    let limit = Duration::from_secs(runs as u64 * (give_up_s + 240));
    let ran = run_with_deadline(cmd, limit, scratch, "peer");
    // If the script was cut off, its QEMUs (whose command lines name our directory) go too.
    kill_procs_mentioning(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let ran = ran?;
    let mut per_run: Vec<Value> = ran
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .enumerate()
        .map(|(i, r)| {
            let ok = r["status"] == "completed" && r["hb_continues"] == true;
            json!({
                "run": i,
                "result": r["status"],
                "ok": ok,
                "total_ms": r["total_ms"],
                "downtime_ms": r["downtime_ms"],
                "transferred_bytes": r["transferred_mib"].as_f64().map(|m| (m * 1048576.0).round()),
                "dirty_syncs": r["dirty_syncs"],
                "guest_hb_gap_ms": r["guest_hb_gap_ms"],
                "postcopy": r["postcopy"],
                "hb_continues": r["hb_continues"],
                "boot_s": r["boot_s"],
            })
        })
        .collect();
    let mut extra = json!({});
    if per_run.len() < runs {
        let why = if ran.status.is_none() { format!("killed after {} s", limit.as_secs()) } else { format!("exited {:?}", ran.status) };
        extra = json!({"error": format!("the peer printed {} of {runs} runs ({why}): {}", per_run.len(),
            ran.stderr.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | "))});
        // Runs it never printed count as not completed.
        for i in per_run.len()..runs {
            per_run.push(json!({"run": i, "result": "missing", "ok": false}));
        }
    }
    Ok(side_summary(per_run, extra))
}

/// How the peer runs: in a network namespace (a tbf-limited loopback), with extra
/// arguments of its script (`--postcopy`).
#[derive(Default)]
struct Peer {
    netns: Option<String>,
    args: Vec<String>,
}

/// The guest's longest pause as the guest saw it: the largest gap, in its own
/// CLOCK_MONOTONIC, between consecutive heartbeats (`hb <seq> <ns> <corrupt>`, every
/// 100 ms) on a console; vCPUs stopped by QEMU do not count (the guest's clock stops
/// with them), vCPUs waiting for post-copy pages do. `None` without two heartbeats.
fn max_heartbeat_gap_ms(console: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(console).ok()?;
    let ns: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("hb")).then(|| f.nth(1).and_then(|x| x.parse().ok())).flatten()
        })
        .collect();
    ns.windows(2).map(|w| w[1].saturating_sub(w[0]) as f64 / 1e6).reduce(f64::max).map(round3)
}

/// Kills (SIGKILL) every process whose command line contains `dir`: only QEMUs the
/// peer script started for us name our scratch directory.
fn kill_procs_mentioning(dir: &Path) {
    for pid in processes_mentioning(&dir.display().to_string()) {
        kill9(pid);
    }
}

/// Walkabout against QEMU in one cell.
fn compare(wa: &Value, qe: &Value) -> Value {
    if wa["runs"].is_null() || qe["runs"].is_null() {
        return Value::Null;
    }
    let rate = |s: &Value| s["completion_rate"].as_f64();
    let med = |s: &Value, k: &str| s[k]["median"].as_f64();
    let both = wa["completed"].as_u64().unwrap_or(0) > 0 && qe["completed"].as_u64().unwrap_or(0) > 0;
    let (wr, qr) = (rate(wa).unwrap_or(0.0), rate(qe).unwrap_or(0.0));
    let verdict = match (wr >= 1.0, qr >= 1.0) {
        (true, true) => "both complete",
        (true, false) => "walkabout completes where qemu does not",
        (false, true) => "walkabout fails where qemu completes",
        (false, false) => "both fail (some or all runs)",
    };
    let dr = if both { ratio(med(wa, "downtime_ms"), med(qe, "downtime_ms")) } else { None };
    json!({
        "verdict": verdict,
        "completion": {"walkabout": wr, "qemu": qr},
        "downtime_ratio": dr,
        "total_time_ratio": if both { ratio(med(wa, "total_ms"), med(qe, "total_ms")) } else { None },
        "bytes_ratio": if both { ratio(med(wa, "transferred_bytes"), med(qe, "transferred_bytes")) } else { None },
        "walkabout_downtime_worse": dr.map(|r| r > 1.0),
    })
}

/// A directory the peer script can boot Walkabout's guest from: `vmlinuz` and
/// `initrd.gz` (the script's names; QEMU takes the uncompressed kernel and initramfs
/// whatever they are called) linked to what `walkabout image build` reports. The guest
/// prints `WALKABOUT READY` and `hb <seq> <ns> ...` lines, which the peer reads.
fn walkabout_guest_for_peer(bin: &Path, scratch: &Path) -> Result<PathBuf> {
    let out = Command::new(bin).args(["image", "build"]).env("WALKABOUT_LOG", "warn").output().context("walkabout image build")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Result<PathBuf> {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.split_whitespace().next()).map(PathBuf::from))
            .with_context(|| format!("`walkabout image build` printed no {name} line: {text}"))
    };
    let (kernel, initrd) = (field("kernel ")?, field("initrd ")?);
    let dir = scratch.join("peer-walkabout-guest");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (link, target) in [("vmlinuz", &kernel), ("initrd.gz", &initrd)] {
        let link = dir.join(link);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    }
    Ok(dir)
}

/// The whole document: settings, cells, and the summary across cells.
fn document(env: &Value, a: &Args, peer: &Path, cells: &[Value], complete: bool, elapsed: Duration) -> Value {
    let label = |c: &Value| format!("{} MiB {} bw {}", c["memory_mib"], c["workload"].as_str().unwrap_or("?"), c["bandwidth"]);
    let ratios: Vec<f64> = cells.iter().filter_map(|c| c["compare"]["downtime_ratio"].as_f64()).collect();
    let cells_label = |pred: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        cells
            .iter()
            .filter(|c| pred(c))
            .map(|c| {
                json!({"cell": label(c), "walkabout_completion": c["compare"]["completion"]["walkabout"], "qemu_completion": c["compare"]["completion"]["qemu"],
                       "walkabout_downtime_ms": c["walkabout"]["downtime_ms"]["median"], "qemu_downtime_ms": c["qemu"]["downtime_ms"]["median"],
                       "downtime_ratio": c["compare"]["downtime_ratio"]})
            })
            .collect()
    };
    let qemu_fails = cells_label(&|c| c["compare"]["completion"]["qemu"].as_f64().is_some_and(|r| r < 1.0));
    let wa_fails = cells_label(&|c| c["compare"]["completion"]["walkabout"].as_f64().is_some_and(|r| r < 1.0));
    let worse = cells_label(&|c| c["compare"]["walkabout_downtime_worse"] == true);
    let completes_where_qemu_fails = cells
        .iter()
        .filter(|c| c["compare"]["completion"]["qemu"].as_f64().is_some_and(|r| r < 1.0))
        .filter(|c| c["compare"]["completion"]["walkabout"].as_f64().is_some_and(|r| r >= 1.0))
        .count();
    json!({
        "bench": "migrate",
        "complete": complete,
        "elapsed_s": elapsed.as_secs(),
        "environment": env,
        "settings": {
            "quick": a.quick, "runs_per_cell": a.runs, "memory_mib": a.mems, "workloads": a.workloads,
            "bandwidth": a.bandwidths.iter().map(|b| b.map(|b| json!(b)).unwrap_or(json!("default"))).collect::<Vec<_>>(),
            "walkabout": "walkabout migrate --mode auto (max downtime 300 ms, budget 30 s per GiB: the CLI's defaults) [--max-bandwidth NM], two agents on loopback, TCG, 1 vCPU; the guest boots once per cell and walks A->B->A...; after each migration the bench waits for 10 more heartbeats and checks seq_breaks, corrupt_pages, kernel_trouble",
            "qemu": format!("python3 {}/migrate-bench.py --mem M --workload W --bandwidth-mib B (0 = QEMU's default) --runs N --give-up-s {} --accel tcg: QEMU's defaults (pre-copy, downtime-limit 300 ms), one fresh pair of QEMUs per run", peer.display(), a.give_up_s),
            "medians": "total_ms, downtime_ms, transferred_bytes: median (min, max) over the runs that completed; a run completes when the migration completed and the guest's heartbeat continued (Walkabout also: no sequence break, no corrupt page, no kernel trouble)",
        },
        "cells": cells,
        "summary": {
            "cells": cells.len(),
            "cells_both_complete_some": ratios.len(),
            "downtime_ratio_walkabout_over_qemu": {
                "median": median(&ratios).map(round3),
                "min": ratios.iter().copied().reduce(f64::min),
                "max": ratios.iter().copied().reduce(f64::max),
            },
            "cells_walkabout_downtime_worse": worse,
            "cells_qemu_fails": qemu_fails,
            "walkabout_completes_all_runs_where_qemu_fails": format!("{completes_where_qemu_fails} of {}", cells.iter().filter(|c| c["compare"]["completion"]["qemu"].as_f64().is_some_and(|r| r < 1.0)).count()),
            "cells_walkabout_fails": wa_fails,
        },
    })
}

/// The migration engine's cells (issue #15), each beside QEMU's defaults in the same run.
mod engine {
    use super::*;

    /// One cell.
    struct Cell {
        name: &'static str,
        mem: u64,
        workload: &'static str,
        /// `walkabout migrate` arguments.
        walkabout: &'static [&'static str],
        /// The peer script's extra arguments (`--postcopy`: QEMU's post-copy, no preempt).
        qemu: &'static [&'static str],
        /// Both sides on a loopback limited by `tc tbf` to this rate (in a namespace).
        link_mbit: Option<u32>,
    }

    const CELLS: &[Cell] = &[
        Cell {
            name: "postcopy_preempt",
            mem: 512,
            workload: "dirty:256:512",
            walkabout: &["--mode", "postcopy", "--postcopy-preempt", "true"],
            qemu: &["--postcopy"],
            link_mbit: None,
        },
        Cell {
            name: "postcopy_no_preempt",
            mem: 512,
            workload: "dirty:256:512",
            walkabout: &["--mode", "postcopy", "--postcopy-preempt", "false"],
            qemu: &["--postcopy"],
            link_mbit: None,
        },
        Cell {
            name: "postcopy_preempt_link25",
            mem: 512,
            workload: "dirty:256:512",
            walkabout: &["--mode", "postcopy", "--postcopy-preempt", "true"],
            qemu: &["--postcopy"],
            link_mbit: Some(200),
        },
        Cell {
            name: "postcopy_no_preempt_link25",
            mem: 512,
            workload: "dirty:256:512",
            walkabout: &["--mode", "postcopy", "--postcopy-preempt", "false"],
            qemu: &["--postcopy"],
            link_mbit: Some(200),
        },
        Cell {
            name: "link20_auto",
            mem: 512,
            workload: "dirty:64:32",
            walkabout: &["--max-bandwidth", "20M"],
            qemu: &[],
            link_mbit: Some(160),
        },
        Cell {
            name: "link20_zstd",
            mem: 512,
            workload: "dirty:64:32",
            walkabout: &["--mode", "precopy", "--max-bandwidth", "20M", "--compression", "zstd", "--multifd-channels", "2"],
            qemu: &[],
            link_mbit: Some(160),
        },
        Cell { name: "mem4g_idle", mem: 4096, workload: "idle", walkabout: &[], qemu: &[], link_mbit: None },
        Cell { name: "mem4g_dirty256", mem: 4096, workload: "dirty:256:64", walkabout: &[], qemu: &[], link_mbit: None },
        Cell { name: "mem8g_idle", mem: 8192, workload: "idle", walkabout: &[], qemu: &[], link_mbit: None },
        Cell { name: "mem8g_dirty256", mem: 8192, workload: "dirty:256:64", walkabout: &[], qemu: &[], link_mbit: None },
        Cell {
            name: "mem8g_dirty256_precopy",
            mem: 8192,
            workload: "dirty:256:64",
            walkabout: &["--mode", "precopy"],
            qemu: &[],
            link_mbit: None,
        },
        Cell {
            name: "mem8g_dirty256_cap128",
            mem: 8192,
            workload: "dirty:256:64",
            walkabout: &["--max-bandwidth", "128M"],
            qemu: &[],
            link_mbit: None,
        },
    ];

    /// A namespace whose loopback is limited to `mbit` Mbit/s; removed on drop.
    struct SlowLoopback(String);

    impl SlowLoopback {
        fn new(mbit: u32) -> Result<SlowLoopback> {
            let ns = format!("wab-slow-{}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            walkabout_testbed::net::run("ip", &["netns", "add", &ns])?;
            let ns = SlowLoopback(ns);
            walkabout_testbed::net::run("ip", &["-n", &ns.0, "link", "set", "lo", "up"])?;
            let rate = format!("{mbit}mbit");
            walkabout_testbed::net::run(
                "ip",
                &[
                    "netns", "exec", &ns.0, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", &rate, "burst", "256kb", "latency",
                    "100ms",
                ],
            )?;
            Ok(ns)
        }
    }

    impl Drop for SlowLoopback {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }

    fn agents(bin: &Path, netns: Option<&str>) -> Result<(Agent, Agent)> {
        let spec = || walkabout_testbed::AgentSpec::new(bin).env("WALKABOUT_LOG", "warn").at(netns, "127.0.0.1:0");
        Ok((Agent::start(spec())?, Agent::start(spec())?))
    }

    /// Runs the cells; prints (and writes) one JSON document.
    pub(super) fn run(args: &Args, env: &Value, bin: &Path, peer: &Path, guest: &Path, scratch: &Path, started: Instant) -> Result<()> {
        let mut out: Vec<Value> = vec![];
        let wanted = |c: &Cell| args.cells.as_ref().is_none_or(|l| l.iter().any(|n| n == c.name));
        let cells: Vec<&Cell> = CELLS.iter().filter(|c| wanted(c)).collect();
        let same_guest = match args.peer_guest {
            PeerGuest::Own => None,
            PeerGuest::Walkabout | PeerGuest::Both => Some(walkabout_guest_for_peer(bin, scratch)?),
        };
        for (i, c) in cells.iter().enumerate() {
            eprintln!("[{}/{}] {} ({:.0} s in)", i + 1, cells.len(), c.name, started.elapsed().as_secs_f64());
            let link = c.link_mbit.map(SlowLoopback::new).transpose()?;
            let ns = link.as_ref().map(|l| l.0.clone());
            let wa = if args.only.as_deref() == Some("qemu") {
                Value::Null
            } else {
                match agents(bin, ns.as_deref()) {
                    Ok((a, b)) => walkabout_cell(&a, &b, c.mem, c.workload, None, args.runs, c.walkabout)
                        .unwrap_or_else(|e| json!({"error": format!("{e:#}")})),
                    Err(e) => json!({"error": format!("{e:#}")}),
                }
            };
            eprintln!("  walkabout: {}", brief(&wa));
            let how = Peer { netns: ns.clone(), args: c.qemu.iter().map(|s| s.to_string()).collect() };
            let peer_side = |g: &Path| {
                if args.only.as_deref() == Some("walkabout") {
                    return Value::Null;
                }
                qemu_cell(peer, g, scratch, c.mem, c.workload, None, args.runs, args.give_up_s, &how)
                    .unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
            };
            let qe = if args.peer_guest == PeerGuest::Walkabout { Value::Null } else { peer_side(guest) };
            eprintln!("  qemu:      {}", brief(&qe));
            let qs = match &same_guest {
                Some(g) => peer_side(g),
                None => Value::Null,
            };
            if !qs.is_null() {
                eprintln!("  qemu, Walkabout's guest: {}", brief(&qs));
            }
            let verdict = compare(&wa, &qe);
            let mut cell = json!({
                "cell": c.name, "memory_mib": c.mem, "workload": c.workload,
                "link": c.link_mbit.map(|m| format!("tc tbf {m} Mbit/s ({} MiB/s) on a namespace's loopback, both sides", m / 8)).unwrap_or("loopback".into()),
                "walkabout_args": c.walkabout, "qemu_args": c.qemu,
                "walkabout": wa, "qemu": qe, "compare": verdict,
            });
            if !qs.is_null() {
                cell["compare_walkabout_guest"] = compare(&wa, &qs);
                cell["qemu_walkabout_guest"] = qs;
            }
            out.push(cell);
            let doc = json!({
                "bench": "migrate --engine",
                "complete": i + 1 == cells.len(),
                "elapsed_s": started.elapsed().as_secs(),
                "environment": env,
                "settings": {
                    "runs_per_cell": args.runs,
                    "walkabout": "walkabout migrate --wait with the cell's arguments (--mode auto unless given), two agents (TCG, 1 vCPU), the guest boots once per cell and walks A->B->A; guest_max_hb_gap_ms: the largest gap in the guest's own clock between consecutive heartbeats on the destination's console (post-copy page waits count, QEMU's stop does not)",
                    "qemu": "the peer migrate-bench.py: QEMU's defaults (pre-copy, or --postcopy: post-copy after the first pass, no preempt), a fresh QEMU pair per run; guest_hb_gap_ms: guest clock between the last heartbeat at the source and the first at the destination",
                    "qemu_walkabout_guest": "the same peer booting Walkabout's guest image (kernel, initramfs, guest program) instead of its own dirty.c guest: both sides run the same workload",
                    "peer_guest": format!("{:?}", args.peer_guest),
                },
                "cells": out,
            });
            let text = serde_json::to_string_pretty(&doc)? + "\n";
            if let Some(p) = &args.out {
                std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
            }
            if i + 1 == cells.len() {
                print!("{text}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Cli, PeerGuest};
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_flags_and_defaults_are_those_of_the_hand_parser() {
        Cli::command().debug_assert();
        let d = Cli::try_parse_from(["migrate"]).expect("defaults");
        assert_eq!(
            (d.mem, d.runs, d.workload.as_str(), d.bandwidth.as_str()),
            (None, None, "idle,dirty:64:32,dirty:64:128,dirty:64:512", "default,100")
        );
        assert_eq!(
            (d.give_up_s, d.only, d.out, d.quick, d.no_build, d.bin, d.engine, d.cells, d.peer_guest, d.tls),
            (30, None, None, false, false, None, false, None, PeerGuest::Own, false)
        );
        let args = [
            "migrate",
            "--quick",
            "--mem",
            "256,512",
            "--workload",
            "idle",
            "--bandwidth",
            "100",
            "--runs",
            "2",
            "--give-up-s",
            "9",
            "--only",
            "qemu",
            "--out",
            "o.json",
            "--no-build",
            "--bin",
            "/bin/true",
            "--engine",
            "--cells",
            "a,b",
            "--peer-guest",
            "both",
            "--tls",
        ];
        let g = Cli::try_parse_from(args).expect("every flag");
        assert_eq!(
            (g.mem, g.runs, g.cells, g.peer_guest),
            (Some(vec![256, 512]), Some(2), Some(vec!["a".to_string(), "b".to_string()]), PeerGuest::Both)
        );
    }
}
