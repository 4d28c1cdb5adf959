//! `walkabout walk` and `walkabout game musical-chairs`: VMs wandering about the
//! cluster by live migration, each hop printed with its downtime.

use super::client::parse_duration_ms;
use super::client::{print_json, runtime, Output};
use super::cluster::{Ctl, CtlArgs};
use super::table::clean;
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `walkabout walk`.
#[derive(clap::Args)]
pub struct WalkArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// How long the VMs wander (e.g. 60s, 5m).
    #[arg(long, value_parser = parse_duration_ms, default_value = "60s")]
    duration: u64,
    /// Hops at once (the controller's limits apply too).
    #[arg(long, default_value_t = 1)]
    parallel: u32,
    /// Rest of a VM between two of its hops (e.g. 2s).
    #[arg(long, value_parser = parse_duration_ms, default_value = "0s")]
    pause: u64,
}

/// `walkabout game ...`
#[derive(clap::Subcommand)]
pub enum GameCommand {
    /// VMs circulate; each round a random host is drained and taken out of the cluster,
    /// until the VMs no longer fit. Reports survivors and every hop's downtime.
    MusicalChairs(GameArgs),
}

/// Arguments of `walkabout game musical-chairs`.
#[derive(clap::Args)]
pub struct GameArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// How long the VMs circulate each round before the music stops.
    #[arg(long, value_parser = parse_duration_ms, default_value = "20s")]
    round: u64,
    /// Hops at once.
    #[arg(long, default_value_t = 1)]
    parallel: u32,
}

/// Runs `walkabout walk`.
pub fn run_walk(a: WalkArgs) -> anyhow::Result<ExitCode> {
    let body = json!({"duration_ms": a.duration, "parallel": a.parallel, "pause_ms": a.pause});
    runtime()?.block_on(play(a.ctl, "/v1/walks", body))
}

/// Runs `walkabout game ...`.
pub fn run_game(cmd: GameCommand) -> anyhow::Result<ExitCode> {
    let GameCommand::MusicalChairs(a) = cmd;
    let body = json!({"duration_ms": a.round, "parallel": a.parallel});
    runtime()?.block_on(play(a.ctl, "/v1/games/musical-chairs", body))
}

async fn play(ctl_args: CtlArgs, path: &str, body: Value) -> anyhow::Result<ExitCode> {
    let ctl = Ctl::new(&ctl_args.controller)?;
    let w = ctl.post(path, Some(body)).await?;
    let id = w["id"].as_str().unwrap_or_default().to_string();
    let text = ctl_args.output == Output::Text;
    let w = follow(&ctl, &id, text).await?;
    match ctl_args.output {
        Output::Json => print_json(&w)?,
        Output::Text => print_summary(&w),
    }
    let ok = w["hops"].as_array().into_iter().flatten().all(|h| h["result"] == "completed")
        && w["survivors"].as_array().into_iter().flatten().all(|s| s["corrupt_pages"] == 0 && s["seq_breaks"] == 0);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Polls walk `id` to its end, printing hops and rounds as they land when `text`;
/// Ctrl-C stops the walk (hops under way finish).
pub async fn follow(ctl: &Ctl, id: &str, text: bool) -> anyhow::Result<Value> {
    let (mut hops, mut rounds) = (0usize, 0usize);
    let mut stopping = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let w = ctl.get(&format!("/v1/walks/{id}")).await?;
        if text {
            for h in w["hops"].as_array().into_iter().flatten().skip(hops) {
                hops += 1;
                println!("{}", hop_line(hops, h));
            }
            for r in w["rounds"].as_array().into_iter().flatten().skip(rounds) {
                rounds += 1;
                println!("round {}: {} — {}", r["round"], r["host"].as_str().unwrap_or("?"), r["result"].as_str().unwrap_or(""));
            }
        }
        if w["status"] != "running" && w["finished_ms"].is_u64() {
            return Ok(w);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = &mut ctrl_c, if !stopping => {
                stopping = true;
                if text {
                    println!("stopping: hops under way finish first...");
                }
                ctl.post(&format!("/v1/walks/{id}/stop"), None).await?;
            }
        }
    }
}

/// One line for one hop.
pub fn hop_line(n: usize, h: &Value) -> String {
    format!(
        "hop {n}: {} {} -> {}  {}  total {} ms  downtime {} ms{}",
        clean(h["vm"].as_str().unwrap_or("?")),
        clean(h["from"].as_str().unwrap_or("?")),
        clean(h["to"].as_str().unwrap_or("?")),
        clean(h["result"].as_str().unwrap_or("?")),
        h["total_ms"],
        h["downtime_ms"],
        h["reason"].as_str().map(|r| format!("  ({r})")).unwrap_or_default()
    )
}

fn print_summary(w: &Value) {
    let hops: Vec<&Value> = w["hops"].as_array().map(|h| h.iter().collect()).unwrap_or_default();
    let mut downs: Vec<u64> = hops.iter().filter(|h| h["result"] == "completed").filter_map(|h| h["downtime_ms"].as_u64()).collect();
    downs.sort_unstable();
    let median = downs.get(downs.len() / 2).copied().unwrap_or(0);
    println!(
        "{}: {} hop(s), {} completed; downtime median {median} ms, max {} ms",
        clean(w["result"].as_str().unwrap_or("ended")),
        hops.len(),
        downs.len(),
        downs.last().copied().unwrap_or(0)
    );
    for s in w["survivors"].as_array().into_iter().flatten() {
        println!(
            "survivor {} on {}: {} heartbeats, {} sequence breaks, {} corrupt pages",
            clean(s["vm"].as_str().unwrap_or("?")),
            clean(s["host"].as_str().unwrap_or("?")),
            s["heartbeats"],
            s["seq_breaks"],
            s["corrupt_pages"]
        );
    }
}
