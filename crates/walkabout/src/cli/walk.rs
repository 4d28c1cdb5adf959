//! `walkabout walk` and `walkabout game musical-chairs`: VMs wandering about the
//! cluster by live migration, each hop printed with its downtime.

use super::client::parse_duration_ms;
use super::client::{print_json, runtime, Output};
use super::cluster::CtlArgs;
use super::table::clean;
use std::process::ExitCode;
use std::time::Duration;
use walkabout_api::{ControllerClient, Hop, Phase, WalkOptions, WalkRecord, WalkStatus};

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
    /// Towers of Hanoi with nested VMs: a hypervisor guest holding a guest, moved from
    /// the first peg (host) to the last one VM at a time, each move a live migration
    /// into or out of the nested hypervisor; reports every move's downtime.
    Hanoi(super::hanoi::HanoiArgs),
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
    let opts = WalkOptions { duration_ms: a.duration, parallel: a.parallel, pause_ms: a.pause, gentle: false };
    runtime()?.block_on(play(a.ctl, Game::Walk, opts))
}

/// Runs `walkabout game ...`.
pub fn run_game(cmd: GameCommand) -> anyhow::Result<ExitCode> {
    let a = match cmd {
        GameCommand::MusicalChairs(a) => a,
        GameCommand::Hanoi(a) => return super::hanoi::run(a),
    };
    let opts = WalkOptions { duration_ms: a.round, parallel: a.parallel, pause_ms: 0, gentle: true };
    runtime()?.block_on(play(a.ctl, Game::MusicalChairs, opts))
}

/// Which of the controller's games to start.
enum Game {
    Walk,
    MusicalChairs,
}

async fn play(ctl_args: CtlArgs, game: Game, opts: WalkOptions) -> anyhow::Result<ExitCode> {
    let ctl = super::client::controller(&ctl_args.controller)?;
    let w = match game {
        Game::Walk => ctl.start_walk(&opts).await?,
        Game::MusicalChairs => ctl.start_musical_chairs(&opts).await?,
    };
    let text = ctl_args.output == Output::Text;
    let w = follow(&ctl, &w.id, text).await?;
    match ctl_args.output {
        Output::Json => print_json(&w)?,
        Output::Text => print_summary(&w),
    }
    let ok = w.hops.iter().all(|h| h.result == Phase::Completed) && w.survivors.iter().all(|s| s.corrupt_pages == 0 && s.seq_breaks == 0);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Polls walk `id` to its end, printing hops and rounds as they land when `text`;
/// Ctrl-C stops the walk (hops under way finish).
pub async fn follow(ctl: &ControllerClient, id: &str, text: bool) -> anyhow::Result<WalkRecord> {
    let (mut hops, mut rounds) = (0usize, 0usize);
    let mut stopping = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let w = ctl.walk(id).await?;
        if text {
            for h in w.hops.iter().skip(hops) {
                hops += 1;
                println!("{}", hop_line(hops, h));
            }
            for r in w.rounds.iter().skip(rounds) {
                rounds += 1;
                println!("round {}: {} — {}", r.round, clean(&r.host), clean(&r.result));
            }
        }
        if w.status != WalkStatus::Running && w.finished_ms.is_some() {
            return Ok(w);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = &mut ctrl_c, if !stopping => {
                stopping = true;
                if text {
                    println!("stopping: hops under way finish first...");
                }
                ctl.stop_walk(id).await?;
            }
        }
    }
}

/// One line for one hop.
pub fn hop_line(n: usize, h: &Hop) -> String {
    let ms = |v: Option<u64>| v.map_or_else(|| "null".to_string(), |v| v.to_string());
    format!(
        "hop {n}: {} {} -> {}  {}  total {} ms  downtime {} ms{}",
        clean(&h.vm),
        clean(&h.from),
        clean(&h.to),
        h.result,
        ms(h.total_ms),
        ms(h.downtime_ms),
        h.reason.as_deref().map(|r| format!("  ({})", clean(r))).unwrap_or_default()
    )
}

fn print_summary(w: &WalkRecord) {
    let mut downs: Vec<u64> = w.hops.iter().filter(|h| h.result == Phase::Completed).filter_map(|h| h.downtime_ms).collect();
    downs.sort_unstable();
    let median = downs.get(downs.len() / 2).copied().unwrap_or(0);
    println!(
        "{}: {} hop(s), {} completed; downtime median {median} ms, max {} ms",
        clean(w.result.as_deref().unwrap_or("ended")),
        w.hops.len(),
        downs.len(),
        downs.last().copied().unwrap_or(0)
    );
    for s in &w.survivors {
        println!(
            "survivor {} on {}: {} heartbeats, {} sequence breaks, {} corrupt pages",
            clean(&s.vm),
            clean(s.host.as_deref().unwrap_or("?")),
            s.heartbeats,
            s.seq_breaks,
            s.corrupt_pages
        );
    }
}
