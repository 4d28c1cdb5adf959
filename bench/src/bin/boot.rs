//! Boot benchmark: time from `walkabout vm create` to the guest's READY, beside plain
//! QEMU booting the QEMU peer's guest (process start to its READY line on the serial
//! file), in the same run. One JSON document on stdout; progress on stderr.
//!
//! `cargo run --release -p walkabout-bench --bin boot [-- --runs 5]`

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use walkabout_bench::{environment, prepare, round3, start_agent, stats, AgentCli, Created, Prepared};
use walkabout_testbed::{Agent, KillOnDrop, TempDir};

const MEMORY_MIB: u64 = 512;

/// Time from `walkabout vm create` to the guest's READY, beside plain QEMU; one JSON
/// document on stdout.
#[derive(clap::Parser)]
#[command(name = "boot")]
struct Args {
    /// Runs of each side.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Bench target/release/walkabout as it is (no cargo build first).
    #[arg(long)]
    no_build: bool,
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    let (runs, build) = (args.runs, !args.no_build);
    let mut env = environment();
    let Prepared { walkabout: wbin, peer, guest } = prepare(build)?;
    let bin = wbin.path.clone();
    env["walkabout_binary"] = wbin.provenance.clone();
    let scratch = TempDir::new("boot")?;
    let agent = start_agent(&bin)?;

    // One warm-up each (page cache, agent's first VM), then the runs, alternating which
    // side goes first so drift in the machine's load falls on both.
    let mut wa: Vec<Value> = vec![];
    let mut qe: Vec<Value> = vec![];
    let wa_warm = walkabout_boot(&agent, "warmup")?;
    let qe_warm = qemu_boot(&guest, scratch.path(), "warmup")?;
    eprintln!("warm-up: walkabout {} ms, qemu {} ms", wa_warm["create_ms"], qe_warm["ready_ms"]);
    for i in 0..runs {
        let (w, q) = if i % 2 == 0 {
            let w = walkabout_boot(&agent, &format!("boot{i}"))?;
            (w, qemu_boot(&guest, scratch.path(), &format!("run{i}"))?)
        } else {
            let q = qemu_boot(&guest, scratch.path(), &format!("run{i}"))?;
            (walkabout_boot(&agent, &format!("boot{i}"))?, q)
        };
        eprintln!("run {i}: walkabout {} ms, qemu {} ms", w["create_ms"], q["ready_ms"]);
        wa.push(w);
        qe.push(q);
    }
    drop(agent);

    let summarize = |runs: &[Value], key: &str| -> Value {
        let xs: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
        match stats(&xs) {
            Some((med, min, max)) => json!({"median": med, "min": min, "max": max, "n": xs.len()}),
            None => Value::Null,
        }
    };
    let wa_ms = summarize(&wa, "create_ms");
    let qe_ms = summarize(&qe, "ready_ms");
    let ratio = match (wa_ms["median"].as_f64(), qe_ms["median"].as_f64()) {
        (Some(w), Some(q)) if q > 0.0 => Some(round3(w / q)),
        _ => None,
    };
    let doc = json!({
        "bench": "boot",
        "environment": env,
        "guest": {"memory_mib": MEMORY_MIB, "vcpus": 1, "workload": "idle"},
        "runs": runs,
        "walkabout": {
            "what": "walkabout vm create --memory 512M --vcpus 1 --workload idle on an agent on loopback (TCG), until the agent reports the guest READY: the CLI's create_ms (POST to READY seen, polled every 50 ms); wall_ms is the CLI process from spawn to exit",
            "create_ms": wa_ms,
            "wall_ms": summarize(&wa, "wall_ms"),
            "warmup": wa_warm,
            "per_run": wa,
        },
        "qemu": {
            "what": format!("plain qemu-system-x86_64 -accel tcg -m 512 -smp 1 with the peer's guest (built by {}/build-guest.sh), the command line of its migrate-bench.py; time from process start to 'WORKLOAD READY' on the serial file (polled every 5 ms); guest_ready_ms is its init's earlier 'GUEST READY' line", peer.display()),
            "ready_ms": qe_ms,
            "guest_ready_ms": summarize(&qe, "guest_ready_ms"),
            "warmup": qe_warm,
            "per_run": qe,
        },
        "summary": {
            "walkabout_median_ms": wa_ms["median"],
            "qemu_median_ms": qe_ms["median"],
            "ratio_walkabout_over_qemu": ratio,
        },
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// One `walkabout vm create` to READY, then the VM is deleted.
fn walkabout_boot(agent: &Agent, name: &str) -> Result<Value> {
    let start = Instant::now();
    let out = agent
        .command(&["vm", "create", "--name", name, "--memory", "512M", "--vcpus", "1", "--workload", "idle", "--output", "json"])
        .stdin(Stdio::null())
        .output()?;
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let result = if out.status.success() {
        let v: Created = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("vm create: not a created VM: {}", String::from_utf8_lossy(&out.stdout)))?;
        Ok(json!({
            "create_ms": v.create_ms,
            "wall_ms": wall_ms.round(),
            "ready": v.vm.guest.ready,
            "cpus": v.vm.guest.cpus,
        }))
    } else {
        Err(anyhow::anyhow!("vm create {name} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    };
    // Delete even after a failure, so nothing is left running.
    let _ = agent.cli_ok(&["vm", "delete", name]);
    result
}

/// Plain QEMU with the peer's guest, as the peer's migrate-bench.py starts it; time from
/// process start to its READY line on the serial file.
fn qemu_boot(guest: &Path, scratch: &Path, tag: &str) -> Result<Value> {
    let serial = scratch.join(format!("{tag}.serial"));
    let qmp = scratch.join(format!("{tag}.qmp"));
    let _ = std::fs::remove_file(&serial);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", &MEMORY_MIB.to_string(), "-smp", "1", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.gz"))
        .args(["-append", "console=ttyS0 quiet walkabout.workload=idle"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut p = KillOnDrop(cmd.spawn().context("spawning qemu-system-x86_64")?);
    let mut guest_ready_ms = None;
    let ready_ms = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        let t = start.elapsed().as_secs_f64() * 1000.0;
        if guest_ready_ms.is_none() && text.contains("GUEST READY") {
            guest_ready_ms = Some(t.round());
        }
        if text.contains("WORKLOAD READY") {
            break t.round();
        }
        if let Some(status) = p.0.try_wait()? {
            bail!("QEMU exited ({status}) before its guest was ready: {}", text.chars().rev().take(2000).collect::<String>());
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!("the peer's guest was not ready after 180 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    drop(p); // kills and reaps QEMU
    let _ = std::fs::remove_file(&serial);
    let _ = std::fs::remove_file(&qmp);
    Ok(json!({"ready_ms": ready_ms, "guest_ready_ms": guest_ready_ms}))
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_flags_and_defaults_are_those_of_the_hand_parser() {
        Args::command().debug_assert();
        let d = Args::try_parse_from(["boot"]).expect("defaults");
        let given = Args::try_parse_from(["boot", "--runs", "2", "--no-build"]).expect("every flag");
        assert_eq!((d.runs, d.no_build, given.runs, given.no_build), (5, false, 2, true));
    }
}
