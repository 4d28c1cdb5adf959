//! `walkabout migrate` and `walkabout migration`: live migration between agents.

use super::client::{parse_duration_ms, parse_mib, print_json, runtime, Client, Output};
use super::progress::{mib, MigrationProgress, MigrationView};
use super::table::{clean, num, Align, Table};
use serde_json::{json, Value};
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
        let mut progress = (a.output == Output::Text).then(|| MigrationProgress::new(&id));
        let mut last_switches = 0;
        let rec = loop {
            let rec: Value = client.get(&format!("/v1/migrations/{id}")).await?;
            if let Some(p) = &mut progress {
                if let Some(sw) = rec["switches"].as_array() {
                    for s in &sw[last_switches.min(sw.len())..] {
                        p.note(&format!(
                            "  switch to {} at {} ms: {}",
                            clean(s["to"].as_str().unwrap_or("?")),
                            s["at_ms"],
                            clean(s["reason"].as_str().unwrap_or(""))
                        ));
                    }
                    last_switches = sw.len();
                }
                // The end is the summary's to tell.
                if !is_final(&rec) {
                    p.update(&MigrationView::from_record(&rec));
                }
            }
            if is_final(&rec) {
                break rec;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if let Some(p) = &progress {
            p.finish();
        }
        let summary = summarize(&rec);
        match a.output {
            Output::Json => print_json(&summary)?,
            Output::Text => println!("{}", Summary::from_record(&rec)),
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

/// What the last line of `walkabout migrate --wait` (and `migration show`) says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The migration's id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The destination.
    pub to: String,
    /// `completed`, `failed`, `cancelled` (or the phase it is in).
    pub result: String,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Wall time, ms, once it ended.
    pub total_ms: Option<u64>,
    /// Guest pause, ms, once completed.
    pub downtime_ms: Option<u64>,
    /// Bytes sent.
    pub transferred_bytes: u64,
    /// Pre-copy passes.
    pub passes: u64,
    /// The strategy picked.
    pub strategy: Option<String>,
}

impl Summary {
    /// Reads a summary from a migration record as the agent reports it.
    pub fn from_record(rec: &Value) -> Summary {
        let text = |v: &Value| v.as_str().map(|s| clean(s).into_owned());
        Summary {
            id: text(&rec["id"]).unwrap_or_else(|| "?".into()),
            vm: text(&rec["vm"]).unwrap_or_else(|| "?".into()),
            to: text(&rec["destination"]).unwrap_or_else(|| "?".into()),
            result: text(&rec["phase"]).unwrap_or_else(|| "?".into()),
            reason: text(&rec["reason"]),
            total_ms: rec["total_ms"].as_u64(),
            downtime_ms: rec["downtime_ms"].as_u64(),
            transferred_bytes: rec["progress"]["transferred_bytes"].as_u64().unwrap_or(0),
            passes: rec["progress"]["iteration"].as_u64().unwrap_or(0),
            strategy: text(&rec["strategy"]["name"]),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {}: {}", self.id, self.vm, self.to, self.result)?;
        if let Some(ms) = self.total_ms {
            write!(f, " in {ms} ms")?;
        }
        if let Some(ms) = self.downtime_ms {
            write!(f, ", downtime {ms} ms")?;
        }
        let passes = if self.passes == 1 { "pass" } else { "passes" };
        write!(f, ", {} MiB sent in {} {passes}", mib(self.transferred_bytes), self.passes)?;
        write!(f, ", strategy {}", self.strategy.as_deref().unwrap_or("-"))?;
        if let Some(r) = &self.reason {
            write!(f, "\n  reason: {r}")?;
        }
        Ok(())
    }
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
                    let mut t = Table::new(&[
                        ("ID", Align::Left),
                        ("VM", Align::Left),
                        ("PHASE", Align::Left),
                        ("TOTAL_MS", Align::Right),
                        ("DOWN_MS", Align::Right),
                        ("DESTINATION", Align::Left),
                    ]);
                    for m in list {
                        let text = |k: &str| m[k].as_str().unwrap_or("?").to_string();
                        t.row([text("id"), text("vm"), text("phase"), num(&m["total_ms"]), num(&m["downtime_ms"]), text("destination")]);
                    }
                    t.print();
                }
                None => println!("{}", Summary::from_record(&v)),
            },
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_of_a_failed_migration_counts_what_was_sent() {
        let rec = json!({"id": "m20", "vm": "g4", "destination": "http://h1:7701", "phase": "failed",
            "reason": "the destination went away", "total_ms": 4100, "downtime_ms": null,
            "progress": {"transferred_bytes": 68u64 << 20, "iteration": 3}, "strategy": {"name": "precopy"}});
        assert_eq!(
            Summary::from_record(&rec).to_string(),
            "m20 g4 -> http://h1:7701: failed in 4100 ms, 68 MiB sent in 3 passes, strategy precopy\n  reason: the destination went away"
        );
    }

    #[test]
    fn the_summary_of_a_completed_migration_gives_its_downtime() {
        let rec = json!({"id": "m3", "vm": "g1", "destination": "h2", "phase": "completed", "total_ms": 2345,
            "downtime_ms": 23, "progress": {"transferred_bytes": 300u64 << 20, "iteration": 1}, "strategy": {"name": "auto"}});
        assert_eq!(
            Summary::from_record(&rec).to_string(),
            "m3 g1 -> h2: completed in 2345 ms, downtime 23 ms, 300 MiB sent in 1 pass, strategy auto"
        );
    }

    #[test]
    fn a_summary_shows_control_characters_in_names_instead_of_obeying_them() {
        let rec = json!({"id": "m1", "vm": "g\u{1b}[2J1", "destination": "h2", "phase": "completed"});
        assert!(!Summary::from_record(&rec).to_string().contains('\u{1b}'));
    }
}
