//! `walkabout migrate` and `walkabout migration`: live migration between agents.

use super::client::{parse_duration_ms, parse_mib, print_json, runtime, Client, Output};
use serde_json::{json, Value};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `walkabout migrate`.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The source agent's URL.
    #[arg(long, env = "WALKABOUT_AGENT", default_value = "http://127.0.0.1:7701")]
    agent: String,
    /// The VM to move.
    vm: String,
    /// The destination agent's URL.
    #[arg(long = "to")]
    to: String,
    /// Longest acceptable guest pause (e.g. 50ms, 1s).
    #[arg(long, value_parser = parse_duration_ms, default_value = "300ms")]
    max_downtime: u64,
    /// Bandwidth cap per second (e.g. 100M, 1G); default: none.
    #[arg(long, value_parser = parse_mib)]
    max_bandwidth: Option<u64>,
    /// Time allowed per GiB of guest memory (e.g. 30s).
    #[arg(long, value_parser = parse_duration_ms, default_value = "30s")]
    budget_per_gib: u64,
    /// auto: Walkabout picks and adapts (may switch to post-copy); precopy: never
    /// post-copy; postcopy: switch after the first pass. While post-copy runs the VM
    /// depends on both hosts: losing either loses the VM.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Wait for the end, showing progress.
    #[arg(long)]
    wait: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// `walkabout migration ...`
#[derive(clap::Subcommand)]
pub enum MigrationCommand {
    /// List the migrations an agent drove.
    List(MigrationCommon),
    /// Show one migration.
    Show(MigrationId),
    /// Cancel a migration (before switchover only; the VM stays on its source).
    Cancel(MigrationId),
}

/// Which agent, and how to print.
#[derive(clap::Args)]
pub struct MigrationCommon {
    /// The source agent's URL.
    #[arg(long, env = "WALKABOUT_AGENT", default_value = "http://127.0.0.1:7701")]
    agent: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// A command on one migration.
#[derive(clap::Args)]
pub struct MigrationId {
    #[command(flatten)]
    common: MigrationCommon,
    /// The migration id.
    id: String,
}

/// Runs `walkabout migrate`.
pub fn run(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    a.mode.parse::<walkabout_migrate::Mode>().map_err(|e| anyhow::anyhow!(e))?;
    runtime()?.block_on(async move {
        let client = Client::new(&a.agent)?;
        let req = json!({
            "vm": a.vm, "destination": a.to, "mode": a.mode,
            "max_downtime_ms": a.max_downtime,
            "max_bandwidth_bps": a.max_bandwidth.map(|m| m << 20),
            "budget_per_gib_ms": a.budget_per_gib,
        });
        let rec: Value = client.post("/v1/migrations", Some(&req)).await?;
        let id = rec["id"].as_str().unwrap_or_default().to_string();
        if !a.wait {
            match a.output {
                Output::Json => print_json(&rec)?,
                Output::Text => println!("migration {id} of {} to {} started", a.vm, a.to),
            }
            return Ok(ExitCode::SUCCESS);
        }
        let show_bar = a.output == Output::Text;
        let mut last_switches = 0;
        let rec = loop {
            let rec: Value = client.get(&format!("/v1/migrations/{id}")).await?;
            if show_bar {
                if let Some(sw) = rec["switches"].as_array() {
                    for s in &sw[last_switches.min(sw.len())..] {
                        eprintln!(
                            "\r\x1b[2K  switch to {} at {} ms: {}",
                            s["to"].as_str().unwrap_or("?"),
                            s["at_ms"],
                            s["reason"].as_str().unwrap_or("")
                        );
                    }
                    last_switches = sw.len();
                }
                draw_bar(&rec);
            }
            if is_final(&rec) {
                break rec;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if show_bar {
            eprintln!();
        }
        let summary = summarize(&rec);
        match a.output {
            Output::Json => print_json(&summary)?,
            Output::Text => print_summary(&summary),
        }
        Ok(if summary["result"] == "completed" { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}

fn is_final(rec: &Value) -> bool {
    matches!(rec["phase"].as_str(), Some("completed" | "failed" | "cancelled"))
}

/// The one object `--output json` ends with.
fn summarize(rec: &Value) -> Value {
    json!({
        "id": rec["id"], "vm": rec["vm"], "to": rec["destination"],
        "result": rec["phase"], "reason": rec["reason"],
        "total_ms": rec["total_ms"], "downtime_ms": rec["downtime_ms"],
        "transferred_bytes": rec["progress"]["transferred_bytes"],
        "iterations": rec["progress"]["iteration"],
        "dirty_rate_bps": rec["dirty_rate_bps"],
        "strategy": rec["strategy"], "switches": rec["switches"],
    })
}

fn print_summary(s: &Value) {
    println!(
        "{} {} -> {}: {} in {} ms, downtime {} ms, {} MiB sent in {} passes, strategy {}",
        s["id"].as_str().unwrap_or("?"),
        s["vm"].as_str().unwrap_or("?"),
        s["to"].as_str().unwrap_or("?"),
        s["result"].as_str().unwrap_or("?"),
        s["total_ms"],
        s["downtime_ms"],
        s["transferred_bytes"].as_u64().unwrap_or(0) >> 20,
        s["iterations"],
        s["strategy"]["name"].as_str().unwrap_or("-"),
    );
    if let Some(r) = s["reason"].as_str() {
        println!("  reason: {r}");
    }
}

fn draw_bar(rec: &Value) {
    let p = &rec["progress"];
    let total = p["total_bytes"].as_u64().unwrap_or(0).max(1);
    let remaining = p["remaining_bytes"].as_u64().unwrap_or(0).min(total);
    let done = ((total - remaining) * 30 / total) as usize;
    let bar = format!("{}{}", "#".repeat(done), ".".repeat(30 - done));
    eprint!(
        "\r\x1b[2K{:<10} [{bar}] pass {:>3}  left {:>6} MiB  dirty {:>5} MiB/s  send {:>5} MiB/s  exp.downtime {:>5} ms",
        rec["phase"].as_str().unwrap_or("?"),
        p["iteration"],
        remaining >> 20,
        p["dirty_rate_bps"].as_u64().unwrap_or(0) >> 20,
        p["transfer_rate_bps"].as_u64().unwrap_or(0) >> 20,
        p["expected_downtime_ms"],
    );
    let _ = std::io::stderr().flush();
}

/// Runs `walkabout migration ...`.
pub fn run_migration(cmd: MigrationCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let (common, v): (&MigrationCommon, Value) = match &cmd {
            MigrationCommand::List(c) => (c, Client::new(&c.agent)?.get("/v1/migrations").await?),
            MigrationCommand::Show(m) => (&m.common, Client::new(&m.common.agent)?.get(&format!("/v1/migrations/{}", m.id)).await?),
            MigrationCommand::Cancel(m) => {
                (&m.common, Client::new(&m.common.agent)?.post(&format!("/v1/migrations/{}/cancel", m.id), None).await?)
            }
        };
        match common.output {
            Output::Json => print_json(&v)?,
            Output::Text => match v.as_array() {
                Some(list) => {
                    println!("{:<24} {:<14} {:<10} {:>9} {:>9}  DESTINATION", "ID", "VM", "PHASE", "TOTAL_MS", "DOWN_MS");
                    for m in list {
                        println!(
                            "{:<24} {:<14} {:<10} {:>9} {:>9}  {}",
                            m["id"].as_str().unwrap_or("?"),
                            m["vm"].as_str().unwrap_or("?"),
                            m["phase"].as_str().unwrap_or("?"),
                            m["total_ms"].to_string(),
                            m["downtime_ms"].to_string(),
                            m["destination"].as_str().unwrap_or("?")
                        );
                    }
                }
                None => print_summary(&summarize(&v)),
            },
        }
        Ok(ExitCode::SUCCESS)
    })
}
