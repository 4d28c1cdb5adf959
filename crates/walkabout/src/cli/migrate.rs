//! `walkabout migrate` and `walkabout migration`: live migration between agents.

use super::client::{self, parse_duration_ms, parse_mib, print_json, runtime, Output};
use super::progress::{mib, MigrationProgress, MigrationView};
use super::table::{clean, num, Align, Table};
use std::process::ExitCode;
use std::time::Duration;
use walkabout_api::{MigrationRecord, MigrationRequest, Mode, Phase, StorageMode};

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
    /// multifd channels (2 or more; QEMU 10 cannot combine them with post-copy, which
    /// is then not armed); default: the policy's choice.
    #[arg(long)]
    multifd_channels: Option<u8>,
    /// Compression: none, zstd (on multifd) or xbzrle; default: the policy's choice.
    #[arg(long)]
    compression: Option<String>,
    /// Post-copy preempt channel (true/false); default: on when post-copy is armed.
    #[arg(long)]
    postcopy_preempt: Option<bool>,
    /// How long a post-copy whose link was lost may wait for it (e.g. 2m); default 120s.
    #[arg(long, value_parser = parse_duration_ms)]
    recovery_budget: Option<u64>,
    /// How the VM's disks move: shared (both hosts open the same image, proven by a
    /// marker file), copy (the destination makes its own image; the source mirrors into
    /// it before memory moves), auto (shared when both hosts see the same file).
    #[arg(long, default_value = "auto")]
    storage: String,
    /// Send every stream (memory, disks) through the destination agent's one API port
    /// (its URL, `--to`): for a destination behind a NAT that publishes only that port.
    /// The source agent relays its QEMU's connections over mutual TLS.
    #[arg(long)]
    relay: bool,
    /// Wait for the end, showing progress.
    #[arg(long)]
    wait: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// With --wait: keep one TCP connection to the guest's echo at ADDR:PORT through the
    /// migration (a request every 10 ms) and report the longest gap between replies as
    /// the observed downtime; a reset connection fails the command. Default: the address
    /// of the VM's NIC, when it has one and answers from here.
    #[arg(long, value_name = "ADDR:PORT")]
    probe: Option<std::net::SocketAddr>,
    /// Do not probe the guest.
    #[arg(long, conflicts_with = "probe")]
    no_probe: bool,
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
    let mode = a.mode.parse::<Mode>().map_err(anyhow::Error::msg)?;
    let compression = a.compression.as_deref().map(str::parse::<walkabout_api::Compression>).transpose().map_err(anyhow::Error::msg)?;
    let tuning = walkabout_api::Tuning {
        multifd_channels: a.multifd_channels,
        compression,
        postcopy_preempt: a.postcopy_preempt,
        recovery_budget_ms: a.recovery_budget,
        peer_timeout_ms: None,
        relay: a.relay,
    };
    let storage = a.storage.parse::<StorageMode>().map_err(anyhow::Error::msg)?;
    runtime()?.block_on(async move {
        let client = client::agent(&a.agent)?;
        let req = MigrationRequest {
            max_downtime_ms: Some(a.max_downtime),
            max_bandwidth_bps: a.max_bandwidth.map(|m| m << 20),
            budget_per_gib_ms: Some(a.budget_per_gib),
            tuning,
            storage,
            ..MigrationRequest::new(a.vm.clone(), a.to.clone(), mode)
        };
        let probe = if a.wait && !a.no_probe { open_probe(&client, &a).await? } else { None };
        let rec = client.start_migration(&req).await?;
        if !a.wait {
            match a.output {
                Output::Json => print_json(&rec)?,
                Output::Text => println!("migration {} of {} to {} started", clean(&rec.id), clean(&a.vm), clean(&a.to)),
            }
            return Ok(ExitCode::SUCCESS);
        }
        let mut progress = (a.output == Output::Text).then(|| MigrationProgress::new(&rec.id));
        let mut last_switches = 0;
        // Short requests, one every 100 ms, each bounded by --timeout: the wait itself is not.
        let rec = loop {
            let rec = client.migration(&rec.id).await?;
            if let Some(p) = &mut progress {
                for s in rec.switches.iter().skip(last_switches) {
                    p.note(&format!("  switch to {} at {} ms: {}", clean(&s.to), s.at_ms, clean(&s.reason)));
                }
                last_switches = rec.switches.len();
                // The end is the summary's to tell.
                if !rec.phase.is_final() {
                    p.update(&MigrationView::from_record(&rec));
                }
            }
            if rec.phase.is_final() {
                break rec;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if let Some(p) = &progress {
            p.finish();
        }
        let mut summary = summarize(&rec);
        if let Some(probe) = probe {
            match tokio::task::spawn_blocking(move || probe.end_window()).await? {
                Ok(w) => summary.observed_downtime_ms = Some(w.max_gap_ms),
                Err(e) => summary.probe_error = Some(e.to_string()),
            }
        }
        match a.output {
            Output::Json => print_json(&summary)?,
            Output::Text => {
                println!("{}", Summary::from_record(&rec));
                if let Some(ms) = summary.observed_downtime_ms {
                    println!(
                        "observed downtime {ms} ms (longest gap between the guest's echo replies; QEMU's: {} ms)",
                        num(summary.downtime_ms)
                    );
                }
                if let Some(e) = &summary.probe_error {
                    println!("probe FAILED: {}", clean(e));
                }
            }
        }
        let ok = rec.phase == Phase::Completed && summary.probe_error.is_none();
        Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}

/// The probe of the guest, connected and its window started: at `--probe`, else at the
/// address of the VM's NIC if it answers (quietly none if it does not).
async fn open_probe(client: &walkabout_api::AgentClient, a: &MigrateArgs) -> anyhow::Result<Option<walkabout_probe::Prober>> {
    let (target, explicit) = match a.probe {
        Some(t) => (t, true),
        None => {
            let vm = client.vm(&a.vm).await?;
            match vm.record.spec.nics.iter().find_map(|n| n.address.as_deref()).and_then(walkabout_probe::echo_target) {
                Some(t) => (t, false),
                None => return Ok(None),
            }
        }
    };
    let options =
        walkabout_probe::ProbeOptions { connect_timeout: Duration::from_secs(if explicit { 10 } else { 3 }), ..Default::default() };
    match tokio::task::spawn_blocking(move || walkabout_probe::Prober::connect(target, options)).await? {
        Ok(p) => {
            p.start_window();
            Ok(Some(p))
        }
        Err(e) if explicit => Err(anyhow::anyhow!("--probe: {e}")),
        Err(e) => {
            tracing::info!(error = %e, "not probing the guest");
            Ok(None)
        }
    }
}

/// The one object `--output json` ends with.
fn summarize(rec: &MigrationRecord) -> walkabout_api::MigrationSummary {
    walkabout_api::MigrationSummary::from(rec)
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
    /// The stream settings and why (`multifd 2, zstd, preempt: ...`).
    pub stream: Option<String>,
    /// What QEMU says now (`postcopy-paused`, ...), while not final.
    pub qemu_status: Option<String>,
    /// Post-copy's interruptions: one line each.
    pub postcopy_pauses: Vec<String>,
    /// How the disks moved, for a VM with disks.
    pub storage: Option<StorageMode>,
    /// Disk bytes copied (with `copy`).
    pub disk_bytes: u64,
    /// Where the wall time went (`prepare 210 ms, disk 4.9 s, memory 1.1 s`), once known.
    pub timings: Option<String>,
}

impl Summary {
    /// Reads a summary from a migration record as the agent reports it.
    pub fn from_record(rec: &MigrationRecord) -> Summary {
        let text = |s: &str| clean(s).into_owned();
        Summary {
            id: text(&rec.id),
            vm: text(&rec.vm),
            to: text(&rec.destination),
            result: rec.phase.to_string(),
            reason: rec.reason.as_deref().map(text),
            total_ms: rec.total_ms,
            downtime_ms: rec.downtime_ms,
            transferred_bytes: rec.progress.transferred_bytes,
            passes: rec.progress.iteration,
            strategy: rec.strategy.as_ref().map(|s| text(&s.name)),
            // Said only when it is more than one plain stream.
            stream: rec
                .strategy
                .as_ref()
                .filter(|s| s.multifd_channels >= 2 || s.compression != walkabout_api::Compression::None || s.postcopy_preempt)
                .map(|s| {
                    text(&format!(
                        "multifd {}, compression {}, preempt {}, recovery budget {} ms: {}",
                        s.multifd_channels, s.compression, s.postcopy_preempt, s.recovery_budget_ms, s.stream_reason
                    ))
                }),
            qemu_status: (!rec.phase.is_final() && !rec.progress.qemu_status.is_empty()).then(|| {
                let mut q = text(&rec.progress.qemu_status);
                if let Some(since) = rec.progress.postcopy_paused_since_ms {
                    q.push_str(&format!(" since {since} ms after the epoch, {} recovery attempts", rec.progress.recovery_attempts));
                }
                q
            }),
            postcopy_pauses: rec
                .postcopy_pauses
                .iter()
                .map(|p| {
                    let end = match p.resumed_at_ms {
                        Some(r) => format!("recovered after {} ms", r.saturating_sub(p.paused_at_ms)),
                        None => "not recovered".into(),
                    };
                    let last = p.last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default();
                    text(&format!(
                        "postcopy-paused at {} ms after the epoch, {} attempts, {end}: {}{last}",
                        p.paused_at_ms, p.attempts, p.cause
                    ))
                })
                .collect(),
            storage: rec.storage,
            disk_bytes: rec.disk.transferred_bytes,
            timings: timings(&rec.timings),
        }
    }
}

/// `prepare 210 ms, disk 4920 ms, memory 1130 ms`: the parts known, or `None`.
fn timings(t: &walkabout_api::PhaseTimes) -> Option<String> {
    let parts: Vec<String> = [("prepare", t.prepare_ms), ("disk copy", t.disk_ms), ("memory", t.memory_ms)]
        .into_iter()
        .filter_map(|(what, ms)| ms.map(|ms| format!("{what} {ms} ms")))
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
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
        if let Some(s) = self.storage {
            write!(f, ", storage {s}")?;
            if s == StorageMode::Copy {
                write!(f, " ({} MiB of disk copied)", mib(self.disk_bytes))?;
            }
        }
        if let Some(t) = &self.timings {
            write!(f, "\n  time: {t}")?;
        }
        if let Some(q) = &self.qemu_status {
            write!(f, "\n  QEMU: {q}")?;
        }
        if let Some(st) = &self.stream {
            write!(f, "\n  stream: {st}")?;
        }
        for p in &self.postcopy_pauses {
            write!(f, "\n  {p}")?;
        }
        if let Some(r) = &self.reason {
            write!(f, "\n  reason: {r}")?;
        }
        Ok(())
    }
}

/// Runs `walkabout migration ...`.
pub fn run_migration(cmd: MigrationCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let (common, rec) = match &cmd {
            MigrationCommand::List(c) => {
                let list = client::agent(&c.agent)?.migrations().await?;
                match c.output {
                    Output::Json => print_json(&list)?,
                    Output::Text => migrations_table(&list).print(),
                }
                return Ok(ExitCode::SUCCESS);
            }
            MigrationCommand::Show(m) => (&m.common, client::agent(&m.common.agent)?.migration(&m.id).await?),
            MigrationCommand::Cancel(m) => (&m.common, client::agent(&m.common.agent)?.cancel_migration(&m.id).await?),
        };
        match common.output {
            Output::Json => print_json(&rec)?,
            Output::Text => println!("{}", Summary::from_record(&rec)),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// An agent's migrations as a table.
fn migrations_table(list: &[MigrationRecord]) -> Table {
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("VM", Align::Left),
        ("PHASE", Align::Left),
        ("TOTAL_MS", Align::Right),
        ("DOWN_MS", Align::Right),
        ("DESTINATION", Align::Left),
    ]);
    for m in list {
        t.row([m.id.clone(), m.vm.clone(), m.phase.to_string(), num(m.total_ms), num(m.downtime_ms), m.destination.clone()]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A migration record as an agent sends it, with `over` laid over its defaults.
    fn record(over: Value) -> MigrationRecord {
        let mut rec = json!({"version": 1, "id": "m1", "vm": "g1", "destination": "h2", "mode": "auto",
            "limits": {"max_downtime_ms": 300, "max_bandwidth_bps": null, "budget_per_gib_ms": 30000},
            "phase": "completed", "reason": null, "dirty_rate_bps": null, "strategy": null, "switches": [],
            "progress": {}, "total_ms": null, "downtime_ms": null, "created_at_ms": 0, "finished_at_ms": null});
        for (k, v) in over.as_object().into_iter().flatten() {
            rec[k] = v.clone();
        }
        serde_json::from_value(rec).expect("a migration record")
    }

    fn strategy(name: &str) -> Value {
        json!({"name": name, "postcopy_ready": false, "auto_converge": false, "bandwidth_bps": 0, "downtime_ms": 300, "reason": ""})
    }

    #[test]
    fn the_summary_of_a_failed_migration_counts_what_was_sent() {
        let rec = record(json!({"id": "m20", "vm": "g4", "destination": "http://h1:7701", "phase": "failed",
            "reason": "the destination went away", "total_ms": 4100,
            "progress": {"transferred_bytes": 68u64 << 20, "iteration": 3}, "strategy": strategy("precopy")}));
        assert_eq!(
            Summary::from_record(&rec).to_string(),
            "m20 g4 -> http://h1:7701: failed in 4100 ms, 68 MiB sent in 3 passes, strategy precopy\n  reason: the destination went away"
        );
    }

    #[test]
    fn the_summary_of_a_completed_migration_gives_its_downtime() {
        let rec = record(json!({"id": "m3", "vm": "g1", "destination": "h2", "phase": "completed", "total_ms": 2345,
            "downtime_ms": 23, "progress": {"transferred_bytes": 300u64 << 20, "iteration": 1}, "strategy": strategy("auto")}));
        assert_eq!(
            Summary::from_record(&rec).to_string(),
            "m3 g1 -> h2: completed in 2345 ms, downtime 23 ms, 300 MiB sent in 1 pass, strategy auto"
        );
    }

    #[test]
    fn the_summary_of_a_disk_copy_says_where_the_time_went() {
        let rec = record(json!({"id": "m5", "vm": "g1", "destination": "h2", "phase": "completed", "total_ms": 6100,
            "downtime_ms": 30, "progress": {"transferred_bytes": 80u64 << 20, "iteration": 1}, "strategy": strategy("precopy"),
            "storage": "copy", "disk": {"transferred_bytes": 1u64 << 30, "total_bytes": 1u64 << 30},
            "timings": {"prepare_ms": 420, "disk_ms": 4800, "memory_ms": 850}}));
        assert_eq!(
            Summary::from_record(&rec).to_string(),
            "m5 g1 -> h2: completed in 6100 ms, downtime 30 ms, 80 MiB sent in 1 pass, strategy precopy, storage copy \
             (1024 MiB of disk copied)\n  time: prepare 420 ms, disk copy 4800 ms, memory 850 ms"
        );
    }

    #[test]
    fn the_summary_of_a_postcopy_that_recovered_shows_the_pause() {
        let rec = record(json!({"id": "m4", "vm": "g1", "destination": "h2", "phase": "completed", "total_ms": 9000,
            "downtime_ms": 20, "progress": {"transferred_bytes": 600u64 << 20, "iteration": 2}, "strategy": strategy("postcopy"),
            "postcopy_pauses": [{"paused_at_ms": 1000, "resumed_at_ms": 6500, "attempts": 2, "cause": "the destination stopped answering", "last_error": null}]}));
        assert_eq!(
            Summary::from_record(&rec).to_string(),
            "m4 g1 -> h2: completed in 9000 ms, downtime 20 ms, 600 MiB sent in 2 passes, strategy postcopy\n  \
             postcopy-paused at 1000 ms after the epoch, 2 attempts, recovered after 5500 ms: the destination stopped answering"
        );
    }

    #[test]
    fn the_summary_of_a_paused_postcopy_says_since_when() {
        let rec = record(json!({"phase": "switchover", "strategy": strategy("postcopy"),
            "progress": {"qemu_status": "postcopy-paused", "postcopy_paused_since_ms": 1000, "recovery_attempts": 3}}));
        assert!(
            Summary::from_record(&rec).to_string().contains("QEMU: postcopy-paused since 1000 ms after the epoch, 3 recovery attempts"),
            "{}",
            Summary::from_record(&rec)
        );
    }

    #[test]
    fn a_summary_shows_control_characters_in_names_instead_of_obeying_them() {
        let rec = record(json!({"id": "m1", "vm": "g\u{1b}[2J1", "destination": "h2", "phase": "completed"}));
        assert!(!Summary::from_record(&rec).to_string().contains('\u{1b}'));
    }

    #[test]
    fn the_json_summary_keeps_the_keys_scripts_read() {
        let rec = record(json!({"phase": "cancelled", "reason": "asked", "progress": {"transferred_bytes": 5, "iteration": 2}}));
        let s = serde_json::to_value(summarize(&rec)).expect("JSON");
        assert_eq!((s["result"].as_str(), s["to"].as_str(), s["iterations"].as_u64()), (Some("cancelled"), Some("h2"), Some(2)));
    }
}
