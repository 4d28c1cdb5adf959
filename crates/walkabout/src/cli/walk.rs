//! `walkabout walk`, `walkabout game musical-chairs` and `walkabout game scotland-yard`:
//! VMs wandering about the cluster by live migration, each hop printed with its downtime.

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
    /// VMs circulate; each round a random host's power is cut (its agent and QEMUs
    /// killed): its protected VMs come back from their replicas, the others are lost.
    /// Ends when the VMs no longer fit; reports survivors, each failover's RPO and RTO
    /// and every hop's downtime. `--gentle`: each round's host is drained and taken out
    /// of the cluster instead.
    MusicalChairs(GameArgs),
    /// Scotland Yard: detectives (bots, or you with `game move`) chase Mr X over a
    /// board of host links (taxi, bus, underground); every move is a live migration;
    /// Mr X is shown every fifth round and wins if he survives 20.
    ScotlandYard(ScotlandArgs),
    /// Moves one of your detectives in a game of Scotland Yard (played when the
    /// detectives' turn comes).
    Move(MoveArgs),
    /// Towers of Hanoi with nested VMs: a hypervisor guest holding a guest, moved from
    /// the first peg (host) to the last one VM at a time, each move a live migration
    /// into or out of the nested hypervisor; reports every move's downtime.
    Hanoi(super::hanoi::HanoiArgs),
}

/// Arguments of `walkabout game scotland-yard`.
#[derive(clap::Args)]
pub struct ScotlandArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// Mr X's VM.
    #[arg(long)]
    mr_x: String,
    /// A detective's VM (repeatable).
    #[arg(long = "detective", required = true)]
    detectives: Vec<String>,
    /// A detective you move yourself with `game move` (repeatable); the others are bots.
    #[arg(long = "player")]
    players: Vec<String>,
    /// Rounds Mr X must survive.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Mr X is shown every this many rounds.
    #[arg(long, default_value_t = 5)]
    reveal_every: u32,
    /// A link of the board, `A-B:taxi|bus|underground[:RATE_MiB/s]` (repeatable;
    /// default: a taxi ring of the hosts in service, bus links across, one underground).
    #[arg(long = "link", value_parser = parse_link)]
    links: Vec<walkabout_api::Link>,
    /// The bots' seed.
    #[arg(long)]
    seed: Option<u64>,
    /// A bot moves Mr X (default: his guest chooses, over its free-will port; create
    /// his VM with `--free-will`).
    #[arg(long)]
    mr_x_bot: bool,
    /// Seconds Mr X's guest has to choose a move before a bot plays it.
    #[arg(long, default_value_t = 15)]
    guest_wait: u64,
}

/// Arguments of `walkabout game move`.
#[derive(clap::Args)]
pub struct MoveArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// The game's id.
    game: String,
    /// Your detective's VM.
    detective: String,
    /// Where to.
    to: String,
    /// Over which kind of link (default: any between the two hosts).
    #[arg(long, value_parser = parse_kind)]
    link: Option<walkabout_api::LinkKind>,
}

fn parse_kind(s: &str) -> Result<walkabout_api::LinkKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| format!("`{s}` is not taxi, bus or underground"))
}

/// Parses `A-B:KIND[:RATE]` (RATE in MiB/s).
fn parse_link(s: &str) -> Result<walkabout_api::Link, String> {
    let mut parts = s.split(':');
    let ends = parts.next().unwrap_or_default();
    let (a, b) = ends.split_once('-').ok_or_else(|| format!("`{s}`: the ends are `A-B`"))?;
    let kind = parse_kind(parts.next().ok_or_else(|| format!("`{s}`: the kind is missing (taxi, bus, underground)"))?)?;
    let rate_bps = parts.next().map(|r| r.parse::<u64>().map(|m| m << 20).map_err(|_| format!("`{s}`: the rate is MiB/s"))).transpose()?;
    Ok(walkabout_api::Link { a: a.to_string(), b: b.to_string(), kind, rate_bps })
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
    /// The gentle game: each round's host is drained and taken away. Without it, the
    /// host's power is cut (agent and QEMUs killed; the agents must allow it,
    /// `--allow-power-cut`): its protected VMs come back from their replicas, the
    /// others are out.
    #[arg(long)]
    gentle: bool,
}

/// Runs `walkabout walk`.
pub fn run_walk(a: WalkArgs) -> anyhow::Result<ExitCode> {
    let opts = WalkOptions { duration_ms: a.duration, parallel: a.parallel, pause_ms: a.pause, gentle: false };
    runtime()?.block_on(play(a.ctl, Game::Walk, opts))
}

/// Runs `walkabout game ...`.
pub fn run_game(cmd: GameCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        GameCommand::MusicalChairs(a) => {
            let opts = WalkOptions { duration_ms: a.round, parallel: a.parallel, pause_ms: 0, gentle: a.gentle };
            runtime()?.block_on(play(a.ctl, Game::MusicalChairs, opts))
        }
        GameCommand::ScotlandYard(a) => runtime()?.block_on(scotland_yard(a)),
        GameCommand::Hanoi(a) => super::hanoi::run(a),
        GameCommand::Move(a) => runtime()?.block_on(async move {
            let ctl = super::client::controller(&a.ctl.controller)?;
            let w = ctl.game_move(&a.game, &walkabout_api::PlayerMove { detective: a.detective, to: a.to, link: a.link }).await?;
            match a.ctl.output {
                Output::Json => print_json(&w)?,
                Output::Text => println!("move accepted for round {}", w.scotland.map_or(0, |g| g.round)),
            }
            Ok(ExitCode::SUCCESS)
        }),
    }
}

async fn scotland_yard(a: ScotlandArgs) -> anyhow::Result<ExitCode> {
    let ctl = super::client::controller(&a.ctl.controller)?;
    let opts = walkabout_api::ScotlandOptions {
        mr_x: a.mr_x,
        detectives: a.detectives,
        players: a.players,
        rounds: a.rounds,
        reveal_every: a.reveal_every,
        links: a.links,
        player_wait_ms: 60_000,
        seed: a.seed,
        mr_x_by: if a.mr_x_bot { walkabout_api::MrXBy::Bot } else { walkabout_api::MrXBy::Guest },
        guest_wait_ms: a.guest_wait.saturating_mul(1000),
    };
    let w = ctl.start_scotland_yard(&opts).await?;
    let text = a.ctl.output == Output::Text;
    if text {
        println!(
            "game {}: Scotland Yard; follow with `walkabout events`; move your detectives with `walkabout game move {} DETECTIVE HOST`",
            w.id, w.id
        );
    }
    let mut shown = 0usize;
    let w = loop {
        let w = ctl.walk(&w.id).await?;
        if let (true, Some(g)) = (text, &w.scotland) {
            for m in g.moves.iter().skip(shown) {
                shown += 1;
                println!("{}", move_line(m));
            }
        }
        if w.status != WalkStatus::Running && w.finished_ms.is_some() {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    match a.ctl.output {
        Output::Json => print_json(&w)?,
        Output::Text => print_summary(&w),
    }
    let ok = w.hops.iter().all(|h| h.result == Phase::Completed) && w.survivors.iter().all(|s| s.corrupt_pages == 0 && s.seq_breaks == 0);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// One line for one move of Scotland Yard.
fn move_line(m: &walkabout_api::ScotlandMove) -> String {
    let host = |h: &Option<String>| h.as_deref().map_or_else(|| "?".to_string(), |h| clean(h).into_owned());
    let who = match m.side {
        walkabout_api::Side::MrX => "Mr X".to_string(),
        walkabout_api::Side::Detectives => format!("detective {}", clean(&m.vm)),
    };
    format!("round {}: {who} takes the {} {} -> {} ({}, {})", m.round, m.link, host(&m.from), host(&m.to), clean(&m.by), clean(&m.result))
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
