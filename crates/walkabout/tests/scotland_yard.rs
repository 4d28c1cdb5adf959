//! Scotland Yard on real guests: eight hosts in network namespaces joined by a sparse
//! board (a taxi ring, bus chords, one underground line), each board link shaped at its
//! rate (`htb` + `u32` filters). Mr X's guest chooses his moves over its free-will port;
//! a bot detective chases him. The game ends with a winner, every move a completed live
//! migration over a link of the board within that link's rate, no guest hurt.
//!
//! The CI game is 6 rounds; the full 20-round game is `#[ignore]`d and writes
//! `bench/results/scotland-yard.json`:
//! `cargo test -p walkabout --test scotland_yard -- --ignored --nocapture`.

mod common;

use common::{AgentProc, ControllerProc};
use std::time::{Duration, Instant};
use walkabout_api::{Link, LinkKind, MrXBy, Phase, ScotlandOptions, Side, WalkRecord, WalkStatus};
use walkabout_testbed::{Agent, BridgeNet, Controller, ControllerSpec, TestCa};

/// Hosts on the board.
const HOSTS: usize = 8;
/// The links' rates, bytes/s: low enough that shaping, not the machine, sets the pace.
const TAXI: u64 = 32 << 20;
const BUS: u64 = 64 << 20;
const UNDERGROUND: u64 = 128 << 20;

/// The board over h1..h8: a taxi ring, a bus from every other host to the next but
/// one, one underground line from h2 to h6 (13 links of the 28 a complete board has).
fn board() -> Vec<(usize, usize, LinkKind, u64)> {
    let mut links = vec![];
    for i in 1..=HOSTS {
        links.push((i, i % HOSTS + 1, LinkKind::Taxi, TAXI));
    }
    for i in (1..=HOSTS).step_by(2) {
        links.push((i, (i + 1) % HOSTS + 1, LinkKind::Bus, BUS));
    }
    links.push((2, 6, LinkKind::Underground, UNDERGROUND));
    links
}

/// One move as measured: what the bench records and the test checks.
#[derive(Debug, serde::Serialize)]
struct MoveReport {
    round: u32,
    vm: String,
    side: Side,
    by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    forfeit: Option<String>,
    from: String,
    to: String,
    link: LinkKind,
    rate_bps: u64,
    result: String,
    migration: String,
    transferred_bytes: u64,
    total_ms: u64,
    /// transferred_bytes / total_ms: at most the link's rate.
    measured_rate_bps: u64,
    downtime_ms: Option<u64>,
    /// How the move's migration ended.
    migration_result: Phase,
    /// The migration's VM, source and destination.
    #[serde(skip)]
    migration_ran: (String, String, String),
}

/// A finished game on real guests.
struct Played {
    game: WalkRecord,
    moves: Vec<MoveReport>,
    elapsed: Duration,
}

/// Plays a game of `rounds` with Mr X's guest against one bot detective (seed `seed`).
fn play(rounds: u32, seed: u64) -> Played {
    let net = BridgeNet::new("sybr0", "sy-h", "10.247.7", HOSTS).expect("the hosts' namespaces");
    let links = board();
    let shaped: Vec<(usize, usize, u64)> = links.iter().map(|&(a, b, _, r)| (a, b, r)).collect();
    net.shape(&shaped).expect("the links shaped");
    let hosts: Vec<AgentProc> =
        (1..=HOSTS).map(|n| AgentProc::start_at(net.namespace(n), &format!("{}:7701", net.addr(n)), &["--capacity", "640M"])).collect();
    hosts[0].create(&["--name", "mrx", "--memory", "256M", "--free-will"]);
    hosts[4].create(&["--name", "d1", "--memory", "256M"]);
    // Off loopback the agents serve TLS only (the testbed's shared CA): so does the
    // controller.
    let ca = TestCa::shared().expect("the shared test CA");
    let agents: Vec<&Agent> = hosts.iter().map(|a| &a.0).collect();
    let ctl =
        ControllerProc(Controller::start(ControllerSpec::new(common::bin(), &agents).tls(ca.dir(), &ca.operator())).expect("a controller"));
    ctl.wait_vms(2);
    let opts = ScotlandOptions {
        mr_x: "mrx".into(),
        detectives: vec!["d1".into()],
        players: vec![],
        rounds,
        reveal_every: 5,
        links: links.iter().map(|&(a, b, kind, r)| Link { a: format!("h{a}"), b: format!("h{b}"), kind, rate_bps: Some(r) }).collect(),
        player_wait_ms: 0,
        seed: Some(seed),
        mr_x_by: MrXBy::Guest,
        guest_wait_ms: 20_000,
    };

    let start = Instant::now();
    let game = ctl.call(|c| async move { c.start_scotland_yard(&opts).await }).expect("the game starts");
    let w = loop {
        let id = game.id.clone();
        let w = ctl.call(|c| async move { c.walk(&id).await }).expect("the game");
        if w.status != WalkStatus::Running && w.finished_ms.is_some() {
            break w;
        }
        assert!(start.elapsed() < Duration::from_secs(1500), "the game has not ended in 1500 s: {w:#?}\n{}", ctl.log());
        std::thread::sleep(Duration::from_millis(500));
    };
    let elapsed = start.elapsed();
    let g = w.scotland.clone().expect("the game's state");
    let mut moves = vec![];
    for m in &g.moves {
        let id = m.migration.clone().unwrap_or_else(|| panic!("move {m:?} has no migration: {w:#?}"));
        let hop = w.hops.iter().find(|h| h.migration == id).unwrap_or_else(|| panic!("move {m:?} has no hop: {w:#?}"));
        let mid = id.clone();
        let mig = ctl.call(|c| async move { c.migration(&mid).await }).unwrap_or_else(|e| panic!("migration {id}: {e}"));
        let total_ms = hop.total_ms.unwrap_or(mig.progress.elapsed_ms).max(1);
        let bytes = mig.progress.transferred_bytes;
        moves.push(MoveReport {
            round: m.round,
            vm: m.vm.clone(),
            side: m.side,
            by: m.by.clone(),
            forfeit: m.forfeit.clone(),
            from: m.from.clone().unwrap_or_default(),
            to: m.to.clone().unwrap_or_default(),
            link: m.link,
            rate_bps: m.rate_bps,
            result: m.result.clone(),
            migration: id,
            transferred_bytes: bytes,
            total_ms,
            measured_rate_bps: bytes.saturating_mul(1000) / total_ms,
            downtime_ms: hop.downtime_ms,
            migration_result: hop.result,
            migration_ran: (hop.vm.clone(), hop.from.clone(), hop.to.clone()),
        });
    }
    for m in &moves {
        eprintln!(
            "round {:2} {:4} by {:5} {} -> {} {:11} {:3} MiB/s link, {:5.1} MiB in {:5} ms = {:5.1} MiB/s, downtime {:?} ms{}",
            m.round,
            m.vm,
            m.by,
            m.from,
            m.to,
            m.link.to_string(),
            m.rate_bps >> 20,
            m.transferred_bytes as f64 / f64::from(1 << 20),
            m.total_ms,
            m.measured_rate_bps as f64 / f64::from(1 << 20),
            m.downtime_ms,
            m.forfeit.as_deref().map(|f| format!(" (forfeit: {f})")).unwrap_or_default()
        );
    }
    eprintln!("{} after {} rounds, {} moves, in {:.0} s", w.result.as_deref().unwrap_or("?"), g.round, moves.len(), elapsed.as_secs_f64());
    drop(ctl);
    drop(hosts);
    drop(net);
    Played { game: w, moves, elapsed }
}

/// What every game must show: a winner, a real game, every move a completed migration
/// over a board link at no more than its rate, Mr X moved by his guest, no guest hurt.
fn assert_sound(p: &Played, rounds: u32) {
    let w = &p.game;
    let g = w.scotland.as_ref().expect("the game's state");
    match g.winner {
        Some(Side::MrX) => assert_eq!(g.round, rounds, "Mr X wins only by surviving every round: {w:#?}"),
        Some(Side::Detectives) => {
            assert!(g.round > 2, "a real chase, not a catch in round 1 or 2: {w:#?}");
            assert!(g.detective_hosts.values().any(|h| Some(h) == g.mr_x_seen.as_ref().map(|s| &s.host)), "{w:#?}");
        }
        None => panic!("the game ended without a winner: {w:#?}"),
    }
    assert_eq!(p.moves.len(), g.moves.len());
    assert!(p.moves.iter().all(|m| m.result == "completed"), "{:#?}", p.moves);
    let completed = w.hops.iter().filter(|h| h.result == Phase::Completed).count();
    assert_eq!(completed, p.moves.len(), "one completed migration per move: {w:#?}");
    for m in &p.moves {
        assert_eq!(m.migration_result, Phase::Completed, "{m:?}");
        assert_eq!(m.migration_ran, (m.vm.clone(), m.from.clone(), m.to.clone()), "{m:?}");
        let on_board = g.links.iter().any(|l| ((l.a == m.from && l.b == m.to) || (l.a == m.to && l.b == m.from)) && l.kind == m.link);
        assert!(on_board, "a move off the board: {m:?}");
        assert!(m.transferred_bytes > 0, "{m:?}");
        // The shaped link sets the pace: the payload never outruns the link's rate.
        assert!(m.measured_rate_bps <= m.rate_bps + m.rate_bps / 20, "faster than its link: {m:?}");
    }
    let mr_x: Vec<&MoveReport> = p.moves.iter().filter(|m| m.side == Side::MrX).collect();
    assert!(mr_x.iter().all(|m| m.by == "guest" || m.forfeit.is_some()), "every bot move of Mr X says why: {mr_x:#?}");
    assert!(mr_x.iter().any(|m| m.by == "guest"), "Mr X's guest chose his moves: {mr_x:#?}");
    assert_eq!(w.survivors.len(), 2, "{w:#?}");
    assert!(w.survivors.iter().all(|s| s.corrupt_pages == 0 && s.seq_breaks == 0), "{w:#?}");
}

#[test]
fn a_game_on_a_shaped_sparse_board_with_mr_x_moved_by_his_guest_ends_with_a_winner() {
    let played = play(6, 4);

    assert_sound(&played, 6);
}

/// The game: 20 rounds. Writes `bench/results/scotland-yard.json`.
#[test]
#[ignore = "a 20-round game takes minutes: run by hand, it writes bench/results/scotland-yard.json"]
fn a_game_of_twenty_rounds_ends_with_a_winner_every_move_a_completed_migration() {
    let played = play(20, 4);

    let g = played.game.scotland.as_ref().expect("the game's state");
    let mut downtimes: Vec<u64> = played.moves.iter().filter_map(|m| m.downtime_ms).collect();
    downtimes.sort_unstable();
    let result = serde_json::json!({
        "bench": "scotland-yard",
        "hosts": HOSTS,
        "guest_memory_mib": 256,
        "shaping": "htb class per board link on each namespace host's eth0, u32 filter on the peer's address",
        "rounds_to_survive": 20,
        "rounds": g.round,
        "winner": g.winner,
        "result": played.game.result,
        "elapsed_s": played.elapsed.as_secs(),
        "mr_x_moves_by_guest": played.moves.iter().filter(|m| m.side == Side::MrX && m.by == "guest").count(),
        "mr_x_moves_forfeited": played.moves.iter().filter(|m| m.forfeit.is_some()).count(),
        "downtime_ms_median": downtimes.get(downtimes.len() / 2),
        "downtime_ms_max": downtimes.last(),
        "corrupt_pages": played.game.survivors.iter().map(|s| s.corrupt_pages).sum::<u64>(),
        "seq_breaks": played.game.survivors.iter().map(|s| s.seq_breaks).sum::<u64>(),
        "moves": played.moves,
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results/scotland-yard.json");
    let text = serde_json::to_string_pretty(&result).expect("JSON");
    std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));

    assert_sound(&played, 20);
}
