//! Scotland Yard: detectives chase Mr X over a board of host links.
//!
//! The hosts are the board's stations; links between them are of three kinds (taxi, bus,
//! underground: the underground joins only a few hosts), each with a rate. Every move of
//! a piece is a live migration of its VM over a link. Each round Mr X moves first (a bot
//! that runs from the detectives), then the detectives move at once (bots, or players
//! through `POST /v1/games/{id}/move`). The detectives see the kind of link Mr X used,
//! never his host, except every `reveal_every` rounds. A detective landing on Mr X's host
//! catches him; Mr X wins by surviving `rounds` rounds (and loses when he has no move).
//!
//! The rules and the bots are pure ([`Board`], [`Game`], [`mr_x_bot`],
//! [`detective_bot`]); the migrations sit behind [`Mover`], so the game is unit-tested
//! without guests. [`ControllerMover`] moves through the controller's API
//! (`POST /v1/vms/{vm}/move`: a `place` plan under the controller's limits).
//!
//! Mr X's moves come from his guest by default ([`MrXBy::Guest`]): the game writes his
//! legal moves, the detectives' hosts and the board on his VM's free-will port
//! ([`yard_prompt`]), the guest answers `walk HOST`, the game checks the move is legal and
//! plays it; a guest that does not answer in `guest_wait_ms`, or asks for a move that
//! is not legal, forfeits that move to [`mr_x_bot`], and the move records why.
//!
//! Link rates: a move's migration is recorded with its link's rate; the controller's
//! move API takes no per-move bandwidth limit, so the rate is enforced by the network
//! between the hosts: the testbed shapes each board link between namespace hosts at its
//! rate (`BridgeNet::shape`: an `htb` class per link, a `u32` filter on the peer's
//! address), and the Scotland Yard test checks each move's transfer stayed within it.

use super::{Games, Rng, TICK};
use crate::error::ControllerError;
use crate::{lock, now_ms};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use walkabout_api::{
    AgentClient, ClientOptions, ClusterSummary, ControllerClient, Hop, Link, LinkKind, MrXBy, PlanStatus, PlayerMove, ScotlandGame,
    ScotlandMove, ScotlandOptions, Side, Sighting, WalkKind, WalkRecord, WalkStatus, WillAnswer, WillAsk,
};

/// The board: hosts and the links between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    links: Vec<Link>,
}

impl Board {
    /// A board of `links`.
    pub fn new(links: Vec<Link>) -> Board {
        Board { links }
    }

    /// The default board over `hosts` (in order): a taxi ring, bus links across it
    /// (from every other host to the next but one), and, with four hosts or more, one
    /// underground line from the second host to the one half-way round from it.
    pub fn default_for(hosts: &[String]) -> Board {
        let n = hosts.len();
        let mut links: Vec<Link> = vec![];
        let add = |a: usize, b: usize, kind: LinkKind, links: &mut Vec<Link>| {
            let (a, b) = (&hosts[a], &hosts[b]);
            if a != b && !links.iter().any(|l| (&l.a == a && &l.b == b) || (&l.a == b && &l.b == a)) {
                links.push(Link { a: a.clone(), b: b.clone(), kind, rate_bps: None });
            }
        };
        for i in 0..n {
            add(i, (i + 1) % n, LinkKind::Taxi, &mut links);
        }
        for i in (0..n).step_by(2) {
            add(i, (i + 2) % n, LinkKind::Bus, &mut links);
        }
        if n > 3 {
            add(1, 1 + n / 2, LinkKind::Underground, &mut links);
        }
        Board { links }
    }

    /// The links.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// Every host on the board.
    pub fn hosts(&self) -> BTreeSet<String> {
        self.links.iter().flat_map(|l| [l.a.clone(), l.b.clone()]).collect()
    }

    /// The moves from `host`: (to, kind, rate), one per link.
    pub fn moves_from(&self, host: &str) -> Vec<(String, LinkKind, u64)> {
        self.links
            .iter()
            .filter_map(|l| {
                let to = if l.a == host {
                    &l.b
                } else if l.b == host {
                    &l.a
                } else {
                    return None;
                };
                Some((to.clone(), l.kind, l.rate_bps.unwrap_or(l.kind.default_rate_bps())))
            })
            .collect()
    }

    /// The link of `kind` (any kind if `None`) between `a` and `b`.
    pub fn link(&self, a: &str, b: &str, kind: Option<LinkKind>) -> Option<(LinkKind, u64)> {
        self.moves_from(a).into_iter().find(|(to, k, _)| to == b && kind.is_none_or(|x| x == *k)).map(|(_, k, r)| (k, r))
    }

    /// Hops from `a` to `b`, if connected.
    pub fn distance(&self, a: &str, b: &str) -> Option<u32> {
        let mut seen = BTreeSet::from([a.to_string()]);
        let mut queue = VecDeque::from([(a.to_string(), 0u32)]);
        while let Some((h, d)) = queue.pop_front() {
            if h == b {
                return Some(d);
            }
            for (to, _, _) in self.moves_from(&h) {
                if seen.insert(to.clone()) {
                    queue.push_back((to, d + 1));
                }
            }
        }
        None
    }

    /// Checks the board is usable: links between distinct hosts, all connected.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(l) = self.links.iter().find(|l| l.a == l.b) {
            return Err(format!("a link joins {} to itself", l.a));
        }
        let hosts = self.hosts();
        let Some(first) = hosts.iter().next() else { return Err("the board has no links".into()) };
        match hosts.iter().find(|h| self.distance(first, h).is_none()) {
            Some(h) => Err(format!("{h} cannot be reached from {first} on the board")),
            None => Ok(()),
        }
    }
}

/// A game of Scotland Yard: the rules, without migrations.
#[derive(Debug, Clone)]
pub struct Game {
    /// The board.
    pub board: Board,
    /// Mr X's VM.
    pub mr_x: String,
    /// Mr X's host.
    pub x_at: String,
    /// Each detective's host.
    pub detectives: BTreeMap<String, String>,
    /// The round under way (0 before the first).
    pub round: u32,
    /// Rounds Mr X must survive.
    pub rounds: u32,
    /// Mr X is shown every this many rounds.
    pub reveal_every: u32,
    /// Where the detectives know Mr X may be.
    pub possible: BTreeSet<String>,
    /// Who won.
    pub winner: Option<Side>,
}

impl Game {
    /// A game with Mr X on `x_at` and the detectives where `detectives` says.
    pub fn new(
        board: Board,
        mr_x: &str,
        x_at: &str,
        detectives: BTreeMap<String, String>,
        rounds: u32,
        reveal_every: u32,
    ) -> Result<Game, String> {
        board.validate()?;
        let hosts = board.hosts();
        for (vm, h) in std::iter::once((&mr_x.to_string(), &x_at.to_string())).chain(detectives.iter()) {
            if !hosts.contains(h) {
                return Err(format!("{vm} is on {h}, which is not on the board"));
            }
        }
        if let Some((d, _)) = detectives.iter().find(|(_, h)| *h == x_at) {
            return Err(format!("detective {d} starts on Mr X's host {x_at}"));
        }
        if detectives.is_empty() || rounds == 0 || reveal_every == 0 {
            return Err("a game needs a detective, at least one round and a reveal period".into());
        }
        let possible = hosts.into_iter().filter(|h| !detectives.values().any(|d| d == h)).collect();
        Ok(Game { board, mr_x: mr_x.into(), x_at: x_at.into(), detectives, round: 0, rounds, reveal_every, possible, winner: None })
    }

    /// Mr X's legal moves: any link to a host no detective holds.
    pub fn mr_x_options(&self) -> Vec<(String, LinkKind, u64)> {
        self.board.moves_from(&self.x_at).into_iter().filter(|(to, _, _)| !self.detectives.values().any(|d| d == to)).collect()
    }

    /// Detective `d`'s legal moves: any link to a host no other detective holds.
    pub fn detective_options(&self, d: &str) -> Vec<(String, LinkKind, u64)> {
        let Some(at) = self.detectives.get(d) else { return vec![] };
        self.board.moves_from(at).into_iter().filter(|(to, _, _)| !self.detectives.iter().any(|(other, h)| other != d && h == to)).collect()
    }

    /// Starts the next round; false (and Mr X has lost) when he has no move.
    pub fn begin_round(&mut self) -> bool {
        self.round += 1;
        if self.mr_x_options().is_empty() {
            self.winner = Some(Side::Detectives);
            return false;
        }
        true
    }

    /// Mr X moved over a link of `kind` to `to` (`None`: the migration failed and he
    /// stayed, which the detectives are told). Returns his host when this round shows him.
    pub fn mr_x_moved(&mut self, to: Option<&str>, kind: LinkKind) -> Option<String> {
        if let Some(to) = to {
            self.x_at = to.to_string();
            let next: BTreeSet<String> = self
                .possible
                .iter()
                .flat_map(|p| self.board.moves_from(p))
                .filter(|(h, k, _)| *k == kind && !self.detectives.values().any(|d| d == h))
                .map(|(h, _, _)| h)
                .collect();
            self.possible = next;
        }
        if self.round.is_multiple_of(self.reveal_every) {
            self.possible = BTreeSet::from([self.x_at.clone()]);
            return Some(self.x_at.clone());
        }
        None
    }

    /// Detective `d` is now on `to`; true if that catches Mr X.
    pub fn detective_moved(&mut self, d: &str, to: &str) -> bool {
        self.detectives.insert(d.to_string(), to.to_string());
        self.possible.remove(to);
        if to == self.x_at {
            self.winner = Some(Side::Detectives);
        }
        self.winner.is_some()
    }

    /// Ends the round; Mr X wins once he has survived the last.
    pub fn end_round(&mut self) {
        if self.winner.is_none() && self.round >= self.rounds {
            self.winner = Some(Side::MrX);
        }
    }
}

/// Mr X's bot: the move that keeps him farthest from the nearest detective; then the
/// one whose ticket leaves the detectives the most hosts to suspect; then the one with
/// the most ways on; then at random.
pub fn mr_x_bot(game: &Game, rng: &mut Rng) -> Option<(String, LinkKind, u64)> {
    let score = |to: &str, kind: LinkKind| {
        let nearest = game.detectives.values().filter_map(|d| game.board.distance(d, to)).min().unwrap_or(u32::MAX);
        let mut after = game.clone();
        after.round += 1;
        after.mr_x_moved(Some(to), kind);
        let suspects = if after.round.is_multiple_of(after.reveal_every) { 1 } else { after.possible.len() };
        let ways = game.board.moves_from(to).iter().filter(|(h, _, _)| !game.detectives.values().any(|d| d == h)).count();
        (nearest, suspects, ways)
    };
    best(game.mr_x_options(), rng, |(to, kind, _)| score(to, *kind))
}

/// A detective's bot: the move that comes nearest to where Mr X may be (ties at random).
pub fn detective_bot(game: &Game, d: &str, rng: &mut Rng) -> Option<(String, LinkKind, u64)> {
    let near = |to: &str| game.possible.iter().filter_map(|p| game.board.distance(to, p)).min().unwrap_or(u32::MAX);
    best(game.detective_options(d), rng, |(to, _, _)| std::cmp::Reverse(near(to)))
}

/// The option with the highest `score`, ties broken by `rng`.
fn best<T, S: Ord>(options: Vec<T>, rng: &mut Rng, score: impl Fn(&T) -> S) -> Option<T> {
    let top = options.iter().map(&score).max()?;
    let mut tied: Vec<T> = options.into_iter().filter(|o| score(o) == top).collect();
    let i = rng.below(tied.len());
    Some(tied.swap_remove(i))
}

/// A move's migration, done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// Its migrations, in order: more than one when the controller's plan retried a
    /// failed attempt; the last is the one that moved the VM, if it moved.
    pub hops: Vec<Hop>,
    /// `completed`, or why not.
    pub result: String,
}

/// Moves a piece: one live migration of `vm` to `to`, over a link of `rate_bps`.
pub trait Mover: Send + Sync + 'static {
    /// Migrates and waits for the end.
    fn migrate(&self, vm: String, to: String, rate_bps: u64) -> crate::agents::BoxFut<Moved>;

    /// Writes `prompt` on free-will VM `vm`'s port (it runs on `host`) and waits up to
    /// `wait` for the host its guest asks for (`walk HOST`), or says why there is none.
    /// By default there is no guest to ask.
    fn ask_guest(&self, vm: String, host: String, prompt: String, wait: Duration) -> crate::agents::BoxFut<Result<String, String>> {
        let _ = (vm, host, prompt, wait);
        Box::pin(std::future::ready(Err("no guest to ask".to_string())))
    }
}

/// What Mr X's guest is told before his move: the round, his host, his legal moves,
/// the detectives' hosts and the board (`a/b` a link, any kind), one line.
pub fn yard_prompt(game: &Game) -> String {
    let mut go: Vec<String> = game.mr_x_options().into_iter().map(|(to, _, _)| to).collect();
    go.dedup();
    let detectives: Vec<&str> = game.detectives.values().map(String::as_str).collect();
    let board: Vec<String> = game.board.links().iter().map(|l| format!("{}/{}", l.a, l.b)).collect();
    format!("yard round={} at={} go={} detectives={} board={}", game.round, game.x_at, go.join(","), detectives.join(","), board.join(","))
}

/// Mr X's move as his guest asked for it: the link to `host` among his legal moves
/// (the fastest, if several kinds join the two), or why it is not legal.
pub fn guest_move(game: &Game, host: &str) -> Result<(String, LinkKind, u64), String> {
    game.mr_x_options()
        .into_iter()
        .filter(|(to, _, _)| to == host)
        .max_by_key(|(_, _, rate)| *rate)
        .ok_or_else(|| "Mr X's guest asked for a host he cannot move to".to_string())
}

/// [`Mover`] through the controller's API: `POST /v1/vms/{vm}/move`, then the plan and
/// its migration; Mr X's guest asked through his agent's free-will routes. The rate is
/// recorded here and enforced by the network between the hosts (see the module's
/// documentation).
pub struct ControllerMover(pub ControllerClient);

impl Mover for ControllerMover {
    fn migrate(&self, vm: String, to: String, _rate_bps: u64) -> crate::agents::BoxFut<Moved> {
        let client = self.0.clone();
        Box::pin(async move {
            let plan = match client.move_vm(&vm, &to).await {
                Ok(p) => p,
                Err(e) => return Moved { hops: vec![], result: format!("refused: {e}") },
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            loop {
                match client.plan(&plan.id).await {
                    Ok(p) if p.status.is_final() => {
                        let hops = super::walk::hops(&client, &p).await;
                        let result = if p.status == PlanStatus::Completed {
                            "completed".to_string()
                        } else {
                            format!("{}: {}", p.status, p.reason.unwrap_or_default())
                        };
                        return Moved { hops, result };
                    }
                    Ok(_) => {}
                    Err(e) if e.is_transport() => {}
                    Err(e) => return Moved { hops: vec![], result: format!("plan {} lost: {e}", plan.id) },
                }
                if tokio::time::Instant::now() > deadline {
                    return Moved { hops: vec![], result: format!("plan {} did not end in 600 s", plan.id) };
                }
                tokio::time::sleep(TICK).await;
            }
        })
    }

    fn ask_guest(&self, vm: String, host: String, prompt: String, wait: Duration) -> crate::agents::BoxFut<Result<String, String>> {
        let client = self.0.clone();
        Box::pin(async move {
            // The reasons given are shown while the game runs: they never name his host
            // (the log does).
            let url = match client.host(&host).await {
                Ok(h) => h.url,
                Err(e) => {
                    tracing::warn!(vm, host, error = %e, "Mr X's host is not known");
                    return Err("Mr X's host is not known to the controller".to_string());
                }
            };
            let agent = AgentClient::new(&url, ClientOptions::default()).map_err(|e| {
                tracing::warn!(vm, host, error = %e, "no client of Mr X's agent");
                "Mr X's agent cannot be reached".to_string()
            })?;
            let sent_ms = now_ms();
            if let Err(e) = agent.will_answer(&vm, &WillAnswer { id: None, answer: prompt }).await {
                tracing::warn!(vm, host, error = %e, "Mr X's guest cannot be asked");
                return Err(format!(
                    "Mr X's guest cannot be asked (no free-will port?): {}",
                    e.kind().map_or("transport".to_string(), |k| format!("{k:?}"))
                ));
            }
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if let Ok(reqs) = agent.with_timeout(Duration::from_secs(2)).will_requests().await {
                    if let Some(req) = reqs.into_iter().rfind(|r| r.vm == vm && r.asked_ms >= sent_ms) {
                        // Taken: the agent drops it from its queue and the guest reads this.
                        let heard = WillAnswer { id: Some(req.id), answer: format!("yard heard {}", req.ask) };
                        let _ = agent.will_answer(&vm, &heard).await;
                        return match req.ask {
                            WillAsk::Host(h) => Ok(h),
                            other => Err(format!("Mr X's guest asked `{other}`, not for a host")),
                        };
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(format!("Mr X's guest did not answer in {} ms", wait.as_millis()));
                }
                tokio::time::sleep(TICK).await;
            }
        })
    }
}

/// The game's record while it runs: Mr X's hosts and migrations hidden except at
/// reveals, his hops left out.
pub(crate) fn redacted(mut w: WalkRecord) -> WalkRecord {
    if w.status != WalkStatus::Running {
        return w;
    }
    if let Some(g) = w.scotland.as_mut() {
        let x = g.mr_x.clone();
        w.hops.retain(|h| h.vm != x);
        let shown: BTreeSet<u32> = g.mr_x_seen.iter().map(|s| s.round).collect();
        for m in g.moves.iter_mut().filter(|m| m.side == Side::MrX && !shown.contains(&m.round)) {
            (m.from, m.to, m.migration) = (None, None, None);
        }
    }
    w
}

impl Games {
    /// Starts Scotland Yard with the pieces where they run now. Returns at once; poll
    /// the game.
    pub(super) async fn start_scotland_with(
        self: &Arc<Self>,
        client: ControllerClient,
        opts: ScotlandOptions,
    ) -> Result<WalkRecord, ControllerError> {
        let cluster = client.cluster().await.map_err(|e| ControllerError::Invalid(format!("the game cannot read the cluster: {e}")))?;
        let game = setup(&cluster, &opts)?;
        let mut w = self.new_walk(WalkKind::ScotlandYard);
        w = self
            .update_walk(&w.id, |w| {
                w.scotland = Some(ScotlandGame {
                    mr_x: opts.mr_x.clone(),
                    detectives: opts.detectives.clone(),
                    players: opts.players.clone(),
                    links: game.board.links().to_vec(),
                    rounds: game.rounds,
                    reveal_every: game.reveal_every,
                    round: 0,
                    detective_hosts: game.detectives.clone(),
                    mr_x_seen: None,
                    moves: vec![],
                    winner: None,
                });
            })
            .unwrap_or(w);
        let board: Vec<String> = game.board.links().iter().map(|l| format!("{}-{} {}", l.a, l.b, l.kind)).collect();
        self.announce(
            &w.id,
            format!(
                "Scotland Yard {} starts: Mr X is {}; detectives {}; board {}",
                w.id,
                opts.mr_x,
                opts.detectives.join(", "),
                board.join(", ")
            ),
        );
        let (g, id) = (self.clone(), w.id.clone());
        let mover: Arc<dyn Mover> = Arc::new(ControllerMover(client.clone()));
        let seed = opts.seed.unwrap_or_else(now_ms);
        tokio::spawn(async move {
            let by_guest = opts.mr_x_by == MrXBy::Guest;
            if by_guest {
                g.claim_will(&opts.mr_x, true);
            }
            let result = g.play_scotland(&id, game, mover, &opts, seed).await;
            if by_guest {
                g.claim_will(&opts.mr_x, false);
            }
            g.end_walk(&client, &id, result).await;
        });
        Ok(redacted(w))
    }

    /// A player's move: checked now, played when the detectives' turn comes.
    pub fn scotland_move(&self, id: &str, mv: PlayerMove) -> Result<WalkRecord, ControllerError> {
        let w = self.walk(id)?;
        let g = w.scotland.as_ref().ok_or_else(|| ControllerError::Invalid(format!("{id} is not a game of Scotland Yard")))?;
        if w.status != WalkStatus::Running {
            return Err(ControllerError::Conflict(format!("game {id} is over")));
        }
        if !g.players.contains(&mv.detective) {
            return Err(ControllerError::Invalid(format!("{} is not a detective moved by a player in game {id}", mv.detective)));
        }
        let at = g.detective_hosts.get(&mv.detective).cloned().unwrap_or_default();
        let board = Board::new(g.links.clone());
        if board.link(&at, &mv.to, mv.link).is_none() {
            let kind = mv.link.map(|k| format!("{k} ")).unwrap_or_default();
            return Err(ControllerError::Invalid(format!("no {kind}link from {at} to {} on the board", mv.to)));
        }
        if g.detective_hosts.iter().any(|(d, h)| d != &mv.detective && *h == mv.to) {
            return Err(ControllerError::Conflict(format!("another detective holds {}", mv.to)));
        }
        self.announce(id, format!("round {}: a player moves detective {} to {}", g.round, mv.detective, mv.to));
        lock(&self.player_moves).insert((id.to_string(), mv.detective.clone()), mv);
        Ok(redacted(w))
    }

    async fn play_scotland(&self, id: &str, mut game: Game, mover: Arc<dyn Mover>, opts: &ScotlandOptions, seed: u64) -> String {
        let mut rng = Rng::seeded(seed);
        while game.winner.is_none() {
            if !self.running(id) {
                return format!("stopped in round {}", game.round);
            }
            if !game.begin_round() {
                self.scotland_update(id, &game, None);
                return format!("detectives win in round {}: Mr X on {} has no move", game.round, game.x_at);
            }
            // Mr X: his guest chooses, or a bot when it cannot.
            let (choice, by, forfeit) = match opts.mr_x_by {
                MrXBy::Bot => (mr_x_bot(&game, &mut rng), "bot", None),
                MrXBy::Guest => {
                    let wait = Duration::from_millis(opts.guest_wait_ms);
                    let asked = mover.ask_guest(game.mr_x.clone(), game.x_at.clone(), yard_prompt(&game), wait).await;
                    match asked.and_then(|h| guest_move(&game, &h)) {
                        Ok(c) => (Some(c), "guest", None),
                        Err(why) => (mr_x_bot(&game, &mut rng), "bot", Some(why)),
                    }
                }
            };
            if let Some(why) = &forfeit {
                self.announce(id, format!("round {}: a bot moves Mr X: {why}", game.round));
            }
            let Some(choice) = choice else { break };
            let (to, kind, rate) = choice.clone();
            let mut mv = planned(&game, &game.mr_x, Side::MrX, game.x_at.clone(), choice, by);
            mv.forfeit = forfeit;
            let moved = mover.migrate(game.mr_x.clone(), to.clone(), rate).await;
            let ok = moved.result == "completed";
            let shown = game.mr_x_moved(ok.then_some(to.as_str()), kind);
            self.scotland_update(id, &game, Some((played(mv, &moved), moved.hops.clone())));
            self.announce(
                id,
                format!("round {}: Mr X takes the {kind}{}", game.round, if ok { "" } else { " (his migration failed; he stays)" }),
            );
            if let Some(h) = shown {
                self.update_walk(id, |w| {
                    if let Some(s) = w.scotland.as_mut() {
                        s.mr_x_seen = Some(Sighting { round: game.round, host: h.clone() });
                    }
                });
                self.announce(id, format!("round {}: Mr X is seen on {h}", game.round));
            }
            // The detectives, all at once.
            let mut chosen: Vec<ScotlandMove> = vec![];
            let mut plan = game.clone();
            for d in opts.detectives.clone() {
                let pick = match opts.players.contains(&d) {
                    true => self.player_pick(id, &plan, &d, opts.player_wait_ms).await.map(|m| (m, "player")),
                    false => None,
                };
                let pick = pick.or_else(|| detective_bot(&plan, &d, &mut rng).map(|m| (m, "bot")));
                let Some((choice, by)) = pick else {
                    self.announce(id, format!("round {}: detective {d} cannot move", game.round));
                    continue;
                };
                let from = plan.detectives.get(&d).cloned().unwrap_or_default();
                plan.detectives.insert(d.clone(), choice.0.clone());
                chosen.push(planned(&game, &d, Side::Detectives, from, choice, by));
            }
            // A stop during Mr X's move or a player's turn: no detective's move starts.
            if !self.running(id) {
                return format!("stopped in round {}", game.round);
            }
            let runs = chosen.iter().map(|m| mover.migrate(m.vm.clone(), m.to.clone().unwrap_or_default(), m.rate_bps));
            let results = futures_join(runs.collect()).await;
            for (mv, moved) in chosen.into_iter().zip(results) {
                let ok = moved.result == "completed";
                let (d, from, to, kind) = (mv.vm.clone(), mv.from.clone().unwrap_or_default(), mv.to.clone().unwrap_or_default(), mv.link);
                let caught = ok && game.detective_moved(&d, &to);
                self.scotland_update(id, &game, Some((played(mv, &moved), moved.hops.clone())));
                self.announce(
                    id,
                    format!(
                        "round {}: detective {d} takes the {kind} from {from} to {to}{}",
                        game.round,
                        if ok { "" } else { " (migration failed)" }
                    ),
                );
                if caught {
                    self.scotland_update(id, &game, None);
                    return format!("detectives win in round {}: {d} caught Mr X on {to}", game.round);
                }
            }
            game.end_round();
            self.scotland_update(id, &game, None);
        }
        format!("Mr X wins: he survived {} rounds", game.rounds)
    }

    /// The move a player asked for detective `d`, waiting up to `wait_ms`; `None` (a bot
    /// plays) if none comes or it is no longer legal.
    async fn player_pick(&self, id: &str, game: &Game, d: &str, wait_ms: u64) -> Option<(String, LinkKind, u64)> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        loop {
            if let Some(mv) = lock(&self.player_moves).remove(&(id.to_string(), d.to_string())) {
                return game.detective_options(d).into_iter().find(|(to, k, _)| *to == mv.to && mv.link.is_none_or(|l| l == *k));
            }
            if tokio::time::Instant::now() > deadline || !self.running(id) {
                return None;
            }
            tokio::time::sleep(TICK).await;
        }
    }

    fn scotland_update(&self, id: &str, game: &Game, mv: Option<(ScotlandMove, Vec<Hop>)>) {
        self.update_walk(id, |w| {
            if let Some((mv, hops)) = mv {
                w.hops.extend(hops);
                if let Some(s) = w.scotland.as_mut() {
                    s.moves.push(mv);
                }
            }
            if let Some(s) = w.scotland.as_mut() {
                s.round = game.round;
                s.detective_hosts = game.detectives.clone();
                s.winner = game.winner;
                if game.winner.is_some() {
                    s.mr_x_seen = Some(Sighting { round: game.round, host: game.x_at.clone() });
                }
            }
        });
    }
}

/// A move chosen and not yet played: (to, link kind, rate) for `vm` from `from`.
fn planned(game: &Game, vm: &str, side: Side, from: String, (to, kind, rate): (String, LinkKind, u64), by: &str) -> ScotlandMove {
    ScotlandMove {
        round: game.round,
        vm: vm.to_string(),
        side,
        from: Some(from),
        to: Some(to),
        link: kind,
        rate_bps: rate,
        by: by.to_string(),
        forfeit: None,
        migration: None,
        result: "pending".into(),
    }
}

/// The move `mv` as its migration ended.
fn played(mut mv: ScotlandMove, moved: &Moved) -> ScotlandMove {
    mv.migration = moved.hops.last().map(|h| h.migration.clone());
    mv.result.clone_from(&moved.result);
    mv
}

/// Runs `futs` at once and returns their outputs in order.
async fn futures_join<T: Send + 'static>(futs: Vec<crate::agents::BoxFut<T>>) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) => tracing::error!(error = %e, "a move's task failed"),
        }
    }
    out
}

/// The game from the cluster as it is: the pieces on their hosts, the board given or
/// made from the hosts in service.
fn setup(cluster: &ClusterSummary, opts: &ScotlandOptions) -> Result<Game, ControllerError> {
    let invalid = ControllerError::Invalid;
    let host_of = |vm: &str| -> Result<String, ControllerError> {
        let v = cluster.vms.iter().find(|v| v.name == vm).ok_or_else(|| ControllerError::not_found("VM", vm))?;
        v.host.clone().ok_or_else(|| invalid(format!("{vm} runs nowhere")))
    };
    let mut pieces = BTreeSet::from([opts.mr_x.clone()]);
    for d in &opts.detectives {
        if !pieces.insert(d.clone()) {
            return Err(invalid(format!("{d} is named twice among the pieces")));
        }
    }
    if let Some(p) = opts.players.iter().find(|p| !opts.detectives.contains(p)) {
        return Err(invalid(format!("player piece {p} is not a detective")));
    }
    let x_at = host_of(&opts.mr_x)?;
    let mut detectives = BTreeMap::new();
    for d in &opts.detectives {
        let h = host_of(d)?;
        if detectives.values().any(|x| *x == h) {
            return Err(invalid(format!("two detectives start on {h}; put each on a host of its own")));
        }
        detectives.insert(d.clone(), h);
    }
    let board = if opts.links.is_empty() {
        let hosts: Vec<String> = cluster.hosts.iter().filter(|h| h.accepts_vms()).map(|h| h.name.clone()).collect();
        Board::default_for(&hosts)
    } else {
        Board::new(opts.links.clone())
    };
    if let Some(h) = board.hosts().into_iter().find(|h| !cluster.hosts.iter().any(|x| &x.name == h)) {
        return Err(invalid(format!("the board names {h}, which is not a host of the cluster")));
    }
    Game::new(board, &opts.mr_x, &x_at, detectives, opts.rounds, opts.reveal_every).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("h{i}")).collect()
    }

    fn game(n: usize, x: &str, ds: &[(&str, &str)]) -> Game {
        let ds = ds.iter().map(|(d, h)| (d.to_string(), h.to_string())).collect();
        Game::new(Board::default_for(&hosts(n)), "x", x, ds, 20, 5).expect("a game")
    }

    /// Plays a whole game with the bots, every migration succeeding.
    fn play(mut g: Game, seed: u64) -> (Game, u32) {
        let mut rng = Rng::seeded(seed);
        let mut moves = 0;
        while g.winner.is_none() {
            if !g.begin_round() {
                break;
            }
            let (to, kind, _) = mr_x_bot(&g, &mut rng).expect("Mr X has a move");
            assert!(g.board.link(&g.x_at, &to, Some(kind)).is_some(), "Mr X moves over a link");
            g.mr_x_moved(Some(&to), kind);
            moves += 1;
            let ds: Vec<String> = g.detectives.keys().cloned().collect();
            for d in ds {
                if let Some((to, _, _)) = detective_bot(&g, &d, &mut rng) {
                    moves += 1;
                    if g.detective_moved(&d, &to) {
                        break;
                    }
                }
            }
            g.end_round();
        }
        (g, moves)
    }

    #[test]
    fn the_default_board_has_three_kinds_and_few_underground_links() {
        let b = Board::default_for(&hosts(4));
        let kinds: BTreeSet<LinkKind> = b.links().iter().map(|l| l.kind).collect();
        assert_eq!(kinds, BTreeSet::from([LinkKind::Taxi, LinkKind::Bus, LinkKind::Underground]));
        assert_eq!(b.links().iter().filter(|l| l.kind == LinkKind::Underground).count(), 1);
        assert_eq!(b.validate(), Ok(()));
        assert_eq!(b.distance("h1", "h3"), Some(1), "the bus crosses the ring");
    }

    #[test]
    fn a_board_in_two_pieces_is_refused() {
        let l = |a: &str, b: &str| Link { a: a.into(), b: b.into(), kind: LinkKind::Taxi, rate_bps: None };
        let b = Board::new(vec![l("h1", "h2"), l("h3", "h4")]);
        assert!(b.validate().is_err());
    }

    #[test]
    fn mr_x_never_moves_onto_a_detective() {
        let g = game(4, "h1", &[("d1", "h2")]);
        let opts: Vec<String> = g.mr_x_options().into_iter().map(|(to, _, _)| to).collect();
        assert!(!opts.contains(&"h2".to_string()) && !opts.is_empty(), "{opts:?}");
    }

    #[test]
    fn mr_x_runs_to_the_host_farthest_from_the_detective() {
        let ring = |a: &str, b: &str| Link { a: a.into(), b: b.into(), kind: LinkKind::Taxi, rate_bps: None };
        let board = Board::new(vec![ring("h1", "h2"), ring("h2", "h3"), ring("h3", "h4"), ring("h4", "h5"), ring("h5", "h1")]);
        let g = Game::new(board, "x", "h1", BTreeMap::from([("d".into(), "h2".into())]), 20, 5).expect("game");
        let (to, _, _) = mr_x_bot(&g, &mut Rng::seeded(1)).expect("a move");
        assert_eq!(to, "h5");
    }

    #[test]
    fn a_detective_on_mr_x_catches_him() {
        let mut g = game(4, "h1", &[("d1", "h3")]);
        g.begin_round();
        assert!(g.detective_moved("d1", "h1"));
        assert_eq!(g.winner, Some(Side::Detectives));
    }

    #[test]
    fn mr_x_is_shown_every_fifth_round_only() {
        let mut g = game(4, "h1", &[("d1", "h3")]);
        let mut shown = vec![];
        for _ in 0..10 {
            g.begin_round();
            let (to, kind, _) = g.mr_x_options()[0].clone();
            if g.mr_x_moved(Some(&to), kind).is_some() {
                shown.push(g.round);
            }
        }
        assert_eq!(shown, [5, 10]);
    }

    #[test]
    fn the_detectives_knowledge_follows_mr_x_tickets() {
        let mut g = game(4, "h2", &[("d1", "h4")]);
        g.begin_round();
        g.mr_x_moved(Some("h1"), LinkKind::Taxi);
        assert!(g.possible.contains("h1"), "{:?}", g.possible);
        assert!(!g.possible.contains("h4"), "never where a detective is");
    }

    #[test]
    fn surviving_every_round_wins_for_mr_x() {
        let mut g = game(4, "h1", &[("d1", "h3")]);
        g.rounds = 1;
        g.begin_round();
        g.end_round();
        assert_eq!(g.winner, Some(Side::MrX));
    }

    #[test]
    fn a_cornered_mr_x_loses() {
        let l = |a: &str, b: &str| Link { a: a.into(), b: b.into(), kind: LinkKind::Taxi, rate_bps: None };
        let board = Board::new(vec![l("h1", "h2"), l("h2", "h3")]);
        let mut g = Game::new(board, "x", "h1", BTreeMap::from([("d".into(), "h2".into())]), 20, 5).expect("game");
        assert!(!g.begin_round());
        assert_eq!(g.winner, Some(Side::Detectives));
    }

    #[test]
    fn bot_games_always_end_with_a_winner_within_the_rounds() {
        for seed in 1..40 {
            let (g, moves) = play(game(4, "h1", &[("d1", "h3")]), seed);
            assert!(g.winner.is_some() && g.round <= 20, "seed {seed}: {g:?}");
            assert!(moves <= 40);
            let (g, _) = play(game(4, "h1", &[("d1", "h2"), ("d2", "h3")]), seed);
            assert!(g.winner.is_some(), "seed {seed}");
        }
    }

    #[test]
    fn on_the_sparse_eight_host_board_either_side_can_win() {
        let mut winners = BTreeSet::new();
        let mut detective_rounds = vec![];
        for seed in 1..60 {
            let (g, _) = play(game(8, "h1", &[("d1", "h5")]), seed);
            if g.winner == Some(Side::Detectives) {
                detective_rounds.push(g.round);
            }
            winners.insert(format!("{:?}", g.winner));
        }
        assert_eq!(winners.len(), 2, "{winners:?}");
        assert!(detective_rounds.iter().all(|r| *r > 2), "never caught at once: {detective_rounds:?}");
        let b = Board::default_for(&hosts(8));
        assert!(b.links().len() < 8 * 7 / 2 / 2, "sparse: {} links", b.links().len());
    }

    #[test]
    fn the_guest_is_told_its_legal_moves_the_detectives_and_the_board() {
        let g = game(4, "h1", &[("d1", "h2")]);
        assert_eq!(yard_prompt(&g), "yard round=0 at=h1 go=h4,h3 detectives=h2 board=h1/h2,h2/h3,h3/h4,h4/h1,h1/h3,h2/h4");
    }

    #[test]
    fn a_guest_asking_for_a_host_it_cannot_reach_is_refused() {
        let l = |a: &str, b: &str| Link { a: a.into(), b: b.into(), kind: LinkKind::Taxi, rate_bps: None };
        let board = Board::new(vec![l("h1", "h2"), l("h2", "h3"), l("h3", "h4"), l("h4", "h1")]);
        let g = Game::new(board, "x", "h1", BTreeMap::from([("d".into(), "h2".into())]), 20, 5).expect("game");
        assert_eq!(guest_move(&g, "h4").map(|m| m.0), Ok("h4".to_string()));
        assert!(guest_move(&g, "h3").is_err(), "no link");
        assert!(guest_move(&g, "h2").is_err(), "a detective holds it");
    }

    /// Every migration completes at once.
    #[derive(Default)]
    struct InstantMover(std::sync::Mutex<u32>);

    impl Mover for InstantMover {
        fn migrate(&self, vm: String, to: String, _rate_bps: u64) -> crate::agents::BoxFut<Moved> {
            let n = {
                let mut n = lock(&self.0);
                *n += 1;
                *n
            };
            let hop = Hop {
                migration: format!("m{n}"),
                vm,
                from: String::new(),
                to,
                result: walkabout_api::Phase::Completed,
                downtime_ms: Some(1),
                observed_downtime_ms: None,
                probe_error: None,
                total_ms: Some(1),
                reason: None,
            };
            Box::pin(std::future::ready(Moved { hops: vec![hop], result: "completed".into() }))
        }
    }

    /// Migrates at once; Mr X's guest asks for the first legal move it is told of, or
    /// never answers.
    struct GuestMover {
        inner: InstantMover,
        answers: bool,
    }

    impl Mover for GuestMover {
        fn migrate(&self, vm: String, to: String, rate_bps: u64) -> crate::agents::BoxFut<Moved> {
            self.inner.migrate(vm, to, rate_bps)
        }

        fn ask_guest(&self, _vm: String, _host: String, prompt: String, _wait: Duration) -> crate::agents::BoxFut<Result<String, String>> {
            let first = prompt.split_whitespace().find_map(|w| w.strip_prefix("go=")).and_then(|g| g.split(',').next()).map(str::to_string);
            let r = match (self.answers, first) {
                (true, Some(h)) => Ok(h),
                _ => Err("Mr X's guest did not answer in 0 ms".to_string()),
            };
            Box::pin(std::future::ready(r))
        }
    }

    /// Fresh `Games` (events stored in `dir`) with a Scotland Yard walk on `start`'s board,
    /// `rounds` long; the stop sender must live as long as the games.
    fn game_walk(dir: &std::path::Path, start: &Game, rounds: u32) -> (Arc<Games>, WalkRecord, tokio::sync::watch::Sender<bool>) {
        let store = Arc::new(crate::store::Store::open(&dir.join("events.redb")).expect("a store"));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let games = Games::new(Arc::new(crate::events::Events::new(store)), stopped, Arc::new(crate::fake::Fake::default()));
        let w = games.new_walk(WalkKind::ScotlandYard);
        games.update_walk(&w.id, |w| {
            w.scotland = Some(ScotlandGame {
                mr_x: "x".into(),
                detectives: vec!["d1".into()],
                players: vec![],
                links: start.board.links().to_vec(),
                rounds,
                reveal_every: 5,
                round: 0,
                detective_hosts: start.detectives.clone(),
                mr_x_seen: None,
                moves: vec![],
                winner: None,
            });
        });
        (games, w, stop)
    }

    async fn guest_game(answers: bool) -> ScotlandGame {
        let dir = crate::fake::temp("scotland-guest");
        std::fs::create_dir_all(&dir).expect("a directory");
        let start = game(8, "h1", &[("d1", "h5")]);
        let (games, w, _stop) = game_walk(&dir, &start, 3);
        let mut opts = ScotlandOptions {
            mr_x: "x".into(),
            detectives: vec!["d1".into()],
            players: vec![],
            rounds: 3,
            reveal_every: 5,
            links: vec![],
            player_wait_ms: 0,
            seed: Some(5),
            mr_x_by: MrXBy::Guest,
            guest_wait_ms: 0,
        };
        let mut start = start;
        start.rounds = 3;
        opts.rounds = 3;
        let mover = Arc::new(GuestMover { inner: InstantMover::default(), answers });
        games.play_scotland(&w.id, start, mover, &opts, 5).await;
        let rec = lock(&games.walks).get(&w.id).cloned().expect("the record");
        let _ = std::fs::remove_dir_all(&dir);
        rec.scotland.expect("the game")
    }

    #[tokio::test]
    async fn mr_x_moves_where_his_guest_asks() {
        let g = guest_game(true).await;
        let x: Vec<&ScotlandMove> = g.moves.iter().filter(|m| m.side == Side::MrX).collect();
        assert!(!x.is_empty(), "{g:?}");
        assert!(x.iter().all(|m| m.by == "guest" && m.forfeit.is_none()), "{g:?}");
    }

    #[tokio::test]
    async fn a_guest_that_does_not_answer_forfeits_its_move_to_the_bot_and_it_is_said() {
        let g = guest_game(false).await;
        let x: Vec<&ScotlandMove> = g.moves.iter().filter(|m| m.side == Side::MrX).collect();
        assert!(!x.is_empty(), "{g:?}");
        assert!(x.iter().all(|m| m.by == "bot" && m.forfeit.as_deref() == Some("Mr X's guest did not answer in 0 ms")), "{g:?}");
        assert!(x.iter().all(|m| m.result == "completed"), "the bot's move is played: {g:?}");
    }

    #[tokio::test]
    async fn a_game_played_through_a_mover_records_every_move_its_migration_and_the_winner() {
        let dir = crate::fake::temp("scotland");
        std::fs::create_dir_all(&dir).expect("a directory");
        let start = game(4, "h1", &[("d1", "h3")]);
        let (games, w, _stop) = game_walk(&dir, &start, 20);
        let opts = ScotlandOptions {
            mr_x: "x".into(),
            detectives: vec!["d1".into()],
            players: vec![],
            rounds: 20,
            reveal_every: 5,
            links: vec![],
            player_wait_ms: 0,
            seed: Some(3),
            mr_x_by: MrXBy::Bot,
            guest_wait_ms: 0,
        };

        let result = games.play_scotland(&w.id, start, Arc::new(InstantMover::default()), &opts, 3).await;

        let rec = lock(&games.walks).get(&w.id).cloned().expect("the record");
        let _ = std::fs::remove_dir_all(&dir);
        let g = rec.scotland.as_ref().expect("the game");
        assert!(result.contains("win") && g.winner.is_some(), "{result}: {g:?}");
        assert_eq!(g.moves.len(), 2 * g.round as usize, "Mr X and the detective move every round: {g:?}");
        assert_eq!(rec.hops.len(), g.moves.len(), "{rec:?}");
        for m in &g.moves {
            let hop = rec.hops.iter().find(|h| Some(&h.migration) == m.migration.as_ref()).expect("the move's migration");
            assert_eq!((&hop.vm, Some(&hop.to), m.result.as_str()), (&m.vm, m.to.as_ref(), "completed"));
        }
        assert!(g.mr_x_seen.is_some(), "Mr X is shown at the end: {g:?}");
    }

    #[test]
    fn mr_x_hosts_are_hidden_while_the_game_runs() {
        let mut w: WalkRecord = serde_json::from_value(serde_json::json!({
            "id": "w1", "kind": "scotland_yard", "status": "running", "started_ms": 0, "hops": [
                {"migration": "m1", "vm": "x", "from": "h1", "to": "h2", "result": "completed"}],
            "scotland": {"mr_x": "x", "detectives": ["d"], "links": [], "rounds": 20, "reveal_every": 5, "round": 1,
                "detective_hosts": {"d": "h3"}, "moves": [{"round": 1, "vm": "x", "side": "mr_x", "from": "h1", "to": "h2",
                "link": "taxi", "rate_bps": 1, "by": "bot", "migration": "m1", "result": "completed"}]}
        }))
        .expect("a record");
        let r = redacted(w.clone());
        assert!(r.hops.is_empty());
        let m = &r.scotland.as_ref().expect("game").moves[0];
        assert_eq!((m.to.as_deref(), m.migration.as_deref(), m.link), (None, None, LinkKind::Taxi));
        w.status = WalkStatus::Finished;
        assert_eq!(redacted(w.clone()), w, "all is shown at the end");
    }
}
