//! Walks and games: VMs wandering by live migration, and musical chairs. They are
//! clients of the controller's plans and migrations; these are their records.

use crate::migration::Phase;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Which game.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WalkKind {
    /// VMs wander for a while.
    Walk,
    /// Musical chairs.
    MusicalChairs,
    /// Scotland Yard: detectives chase Mr X over a board of host links.
    ScotlandYard,
    /// The Towers of Hanoi with nested VMs.
    Hanoi,
}

/// Where a walk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WalkStatus {
    /// Under way.
    Running,
    /// Ended (its time ran out, or the game is over).
    Finished,
    /// Stopped by the operator.
    Stopped,
}

impl WalkStatus {
    /// True once nothing more will happen.
    pub fn is_final(self) -> bool {
        self != WalkStatus::Running
    }
}

/// One hop: a live migration of the walk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Hop {
    /// The controller's migration id.
    pub migration: String,
    /// The VM.
    pub vm: String,
    /// From host.
    pub from: String,
    /// To host.
    pub to: String,
    /// `completed`, `failed` or `cancelled`.
    pub result: Phase,
    /// Guest pause, ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Downtime as the guest's users saw it (longest gap between echo replies), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_downtime_ms: Option<u64>,
    /// Why the probe of the guest failed (connection reset, no reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_error: Option<String>,
    /// Migration time, ms.
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One round of musical chairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Round {
    /// Round number, from 1.
    pub round: u32,
    /// The host whose power was cut, or in the gentle game the host drained (and taken
    /// out of the game if the drain completed).
    pub host: String,
    /// The drain's plan, if one was made.
    #[serde(default)]
    pub plan: Option<String>,
    /// What happened.
    pub result: String,
}

/// A VM at the end, with its guest's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Survivor {
    /// The VM.
    pub vm: String,
    /// Where it runs.
    pub host: Option<String>,
    /// Heartbeats counted over its life, across hosts.
    pub heartbeats: u64,
    /// Heartbeat sequence breaks.
    pub seq_breaks: u64,
    /// Corrupt pages its checker found.
    pub corrupt_pages: u64,
}

/// A walk or a game, as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WalkRecord {
    /// Its id (`w1`...).
    pub id: String,
    /// Which.
    pub kind: WalkKind,
    /// Where it is.
    pub status: WalkStatus,
    /// Started, ms since the epoch.
    pub started_ms: u64,
    /// Ended.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Every hop, in the order they finished.
    pub hops: Vec<Hop>,
    /// Musical chairs' rounds.
    #[serde(default)]
    pub rounds: Vec<Round>,
    /// VMs still running at the end, and their health.
    #[serde(default)]
    pub survivors: Vec<Survivor>,
    /// How it ended.
    #[serde(default)]
    pub result: Option<String>,
    /// Musical chairs: each VM brought back (or lost) after a power cut.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failovers: Vec<crate::checkpoint::Failover>,
    /// Scotland Yard: the board, the pieces and every move. While the game runs, Mr X's
    /// hosts are hidden except at reveals (his hops are left out of `hops` until the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scotland: Option<ScotlandGame>,
    /// The Towers of Hanoi: the pegs, the tower as it stands, every move played.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hanoi: Option<HanoiRecord>,
}

/// A kind of link between two hosts, like the board's tickets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// Short, slow links between neighbours.
    Taxi,
    /// Longer links, faster.
    Bus,
    /// Few, fast links between a few hosts.
    Underground,
}

impl LinkKind {
    /// The default rate of a link of this kind, bytes/s.
    pub fn default_rate_bps(self) -> u64 {
        match self {
            LinkKind::Taxi => 200 << 20,
            LinkKind::Bus => 400 << 20,
            LinkKind::Underground => 1 << 30,
        }
    }
}

impl std::fmt::Display for LinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkKind::Taxi => "taxi",
            LinkKind::Bus => "bus",
            LinkKind::Underground => "underground",
        })
    }
}

/// A link of the board between hosts `a` and `b` (both ways).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Link {
    /// One end.
    pub a: String,
    /// The other end.
    pub b: String,
    /// Its kind.
    pub kind: LinkKind,
    /// Its rate, bytes/s (absent: the kind's default): the bandwidth limit of a move's
    /// migration over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u64>,
}

/// How to play Scotland Yard (`POST /v1/games/scotland-yard`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScotlandOptions {
    /// Mr X's VM.
    pub mr_x: String,
    /// The detectives' VMs.
    pub detectives: Vec<String>,
    /// Detectives moved by players (`POST /v1/games/{id}/move`); the others are bots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub players: Vec<String>,
    /// Rounds Mr X must survive to win.
    #[serde(default = "twenty")]
    #[schema(default = 20)]
    pub rounds: u32,
    /// Mr X is shown every this many rounds.
    #[serde(default = "five")]
    #[schema(default = 5)]
    pub reveal_every: u32,
    /// The board; absent: one made from the hosts in service (a taxi ring, bus links
    /// across it, one underground line).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<Link>,
    /// How long a player has for a move before a bot plays it, ms.
    #[serde(default = "minute")]
    #[schema(default = 60000)]
    pub player_wait_ms: u64,
    /// Seed of the bots' dice (absent: the clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Who chooses Mr X's moves: his guest, over its free-will port (the default), or
    /// a bot.
    #[serde(default)]
    pub mr_x_by: MrXBy,
    /// How long Mr X's guest has to answer with its move before a bot plays it, ms.
    #[serde(default = "fifteen_s")]
    #[schema(default = 15000)]
    pub guest_wait_ms: u64,
}

/// Who chooses Mr X's moves in Scotland Yard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MrXBy {
    /// His guest, by its free will: the controller writes on its `org.walkabout.0` port
    /// `yard round=R at=HOST go=H1,H2 detectives=H3,H4 board=A/B,...` (its legal moves
    /// and where the detectives are) and the guest answers `walk HOST`. A guest that
    /// does not answer in time, or asks for a move that is not legal, forfeits the move
    /// to the bot, and the move says so (`ScotlandMove::forfeit`).
    #[default]
    Guest,
    /// The controller's bot.
    Bot,
}

fn fifteen_s() -> u64 {
    15_000
}

fn twenty() -> u32 {
    20
}

fn five() -> u32 {
    5
}

fn minute() -> u64 {
    60_000
}

/// Which side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Mr X.
    MrX,
    /// The detectives.
    Detectives,
}

/// One move of Scotland Yard: a live migration over a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScotlandMove {
    /// The round, from 1.
    pub round: u32,
    /// The VM moved.
    pub vm: String,
    /// Whose piece.
    pub side: Side,
    /// From host (hidden for Mr X while the game runs, except at reveals).
    #[serde(default)]
    pub from: Option<String>,
    /// To host (hidden likewise).
    #[serde(default)]
    pub to: Option<String>,
    /// The link used (always shown: it is Mr X's ticket).
    pub link: LinkKind,
    /// The link's rate, bytes/s.
    pub rate_bps: u64,
    /// `bot`, `player` or `guest` (Mr X's guest chose it).
    pub by: String,
    /// Why Mr X's guest did not choose this move (no answer in time, a move that is not
    /// legal, no free-will port): a bot played it instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forfeit: Option<String>,
    /// The migration's id (hidden for Mr X likewise).
    #[serde(default)]
    pub migration: Option<String>,
    /// How it ended: `completed`, or why not.
    pub result: String,
}

/// A detective's move asked by a player (`POST /v1/games/{id}/move`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlayerMove {
    /// The detective's VM.
    pub detective: String,
    /// Where to.
    pub to: String,
    /// Over which kind of link (absent: any link between the two hosts).
    #[serde(default)]
    pub link: Option<LinkKind>,
}

/// Where Mr X was shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Sighting {
    /// The round.
    pub round: u32,
    /// His host then.
    pub host: String,
}

/// The state of a game of Scotland Yard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScotlandGame {
    /// Mr X's VM.
    pub mr_x: String,
    /// The detectives' VMs.
    pub detectives: Vec<String>,
    /// Detectives players move.
    #[serde(default)]
    pub players: Vec<String>,
    /// The board.
    pub links: Vec<Link>,
    /// Rounds to survive.
    pub rounds: u32,
    /// Reveal period.
    pub reveal_every: u32,
    /// The round under way (0 before the first).
    pub round: u32,
    /// Where each detective is.
    pub detective_hosts: std::collections::BTreeMap<String, String>,
    /// Where Mr X was last shown, and in which round (all the time once the game is over).
    #[serde(default)]
    pub mr_x_seen: Option<Sighting>,
    /// Every move.
    pub moves: Vec<ScotlandMove>,
    /// Who won.
    #[serde(default)]
    pub winner: Option<Side>,
}

/// How to walk (`POST /v1/walks`, `POST /v1/games/musical-chairs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WalkOptions {
    /// How long VMs wander (a walk), or circulate per round (musical chairs), ms.
    pub duration_ms: u64,
    /// Hops at once (the controller's limits apply too).
    #[serde(default = "one")]
    #[schema(default = 1)]
    pub parallel: u32,
    /// Pause between the end of a VM's hop and its next, ms.
    #[serde(default)]
    pub pause_ms: u64,
    /// Musical chairs only: drain the round's host first (the gentle game) instead of
    /// cutting its power (agent and QEMUs killed; protected VMs fail over).
    #[serde(default)]
    pub gentle: bool,
}

fn one() -> u32 {
    1
}

/// One move of the Towers of Hanoi game with nested VMs: a live migration of a VM that
/// holds no other, from the agent it runs on (a host's, or the one inside the VM
/// holding it) to the agent at the top of another peg.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HanoiMove {
    /// 1, 2, ... in the order played (0 for the setup moves that build the tower).
    #[serde(default)]
    pub number: u32,
    /// The VM moved.
    pub vm: String,
    /// Where it ran: a peg (`peg1`) or the VM holding it (`hanoi0@peg1`).
    pub from: String,
    /// Where it runs now, the same way.
    pub to: String,
    /// The source agent's migration id.
    #[serde(default)]
    pub migration: String,
    /// `completed`, `failed` or `cancelled`.
    pub result: Phase,
    /// Guest pause at the switchover, ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Migration time, ms.
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// Heartbeats the moved guest had printed at its destination when it was checked.
    #[serde(default)]
    pub heartbeats: u64,
    /// Breaks in its heartbeat sequence (0: continuous through the move).
    #[serde(default)]
    pub seq_breaks: u64,
    /// Pages its integrity checker found corrupt.
    #[serde(default)]
    pub corrupt_pages: u64,
    /// Why it failed, or what the check at the destination found wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Migrations it took: 2 when the first failed (the VM stayed at its source) and the
    /// move was tried again.
    #[serde(default = "one")]
    pub attempts: u32,
}

/// A game of Towers of Hanoi with nested VMs: the tower built, the moves planned and
/// played, and whether it ended solved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HanoiRecord {
    /// Levels of nesting (VMs in the tower).
    pub levels: u32,
    /// The VMs, outermost first.
    #[serde(default)]
    pub vms: Vec<String>,
    /// The pegs, first to last: the hosts' names.
    #[serde(default)]
    pub pegs: Vec<String>,
    /// Where the game is.
    #[serde(default)]
    pub stage: HanoiStage,
    /// The VMs on each peg now, outermost first (each holds the next); a VM that runs
    /// beside the tower rather than in it (the plain guest booting) is not listed.
    #[serde(default)]
    pub tower: Vec<Vec<String>>,
    /// Moves that built the tower on the first peg (a VM booted on a host and migrated
    /// into the VM that holds it).
    #[serde(default)]
    pub setup: Vec<HanoiMove>,
    /// The planned moves, as played.
    #[serde(default)]
    pub moves: Vec<HanoiMove>,
    /// Every VM on the last peg, nested, every move completed and verified.
    #[serde(default)]
    pub solved: bool,
    /// Time from the hypervisor guest's start until its agent answered, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyper_boot_ms: Option<u64>,
}

/// Where a game of the Towers of Hanoi is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HanoiStage {
    /// The hypervisor guest and the plain guest boot on the first peg; the game waits
    /// for the agent inside the former.
    #[default]
    Booting,
    /// The plain guest migrates into the hypervisor guest (the tower is built).
    Building,
    /// The planned moves are played.
    Playing,
    /// Ended: solved, failed or stopped; the game's VMs deleted unless kept.
    Over,
}

fn two() -> u32 {
    2
}

fn hyper_mib() -> u64 {
    768
}

fn leaf_mib() -> u64 {
    128
}

fn leaf_workload() -> String {
    "dirty:8:1".into()
}

/// How to play the Towers of Hanoi with nested VMs (`POST /v1/games/hanoi`). The
/// hypervisor guest's image, the bridge and address of its agent and the CA that
/// issues its host certificate are the controller's (`walkabout controller --ca-dir
/// --hanoi-bridge --hanoi-address`); `bridge` and `address` here override them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HanoiOptions {
    /// The three pegs, first to last: hosts of the cluster (the tower starts on the
    /// first and ends on the last). Absent: the first three hosts by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pegs: Vec<String>,
    /// Levels of nesting (VMs in the tower); 2 is what is played today.
    #[serde(default = "two")]
    #[schema(default = 2)]
    pub levels: u32,
    /// Memory of the hypervisor guest, MiB (it holds the other VM and a QEMU for it).
    #[serde(default = "hyper_mib")]
    #[schema(default = 768)]
    pub hyper_memory_mib: u64,
    /// Memory of the innermost guest, MiB.
    #[serde(default = "leaf_mib")]
    #[schema(default = 128)]
    pub guest_memory_mib: u64,
    /// The innermost guest's workload.
    #[serde(default = "leaf_workload")]
    #[schema(default = "dirty:8:1")]
    pub workload: String,
    /// The bridge the hypervisor guest's NIC joins on every host (absent: the
    /// controller's `--hanoi-bridge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The hypervisor guest's address with its prefix, e.g. `10.77.0.20/24` (absent:
    /// the controller's `--hanoi-address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Leave the game's VMs running at the end (default: delete them).
    #[serde(default)]
    pub keep: bool,
}

impl Default for HanoiOptions {
    fn default() -> HanoiOptions {
        HanoiOptions {
            pegs: vec![],
            levels: two(),
            hyper_memory_mib: hyper_mib(),
            guest_memory_mib: leaf_mib(),
            workload: leaf_workload(),
            bridge: None,
            address: None,
            keep: false,
        }
    }
}

/// The query of `GET /v1/games/hanoi/plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HanoiPlanQuery {
    /// Levels of nesting (VMs in the tower), 1 to [`HANOI_PLAN_MAX_LEVELS`].
    pub levels: u32,
}

/// The most levels `GET /v1/games/hanoi/plan` plans (2^10 - 1 = 1023 moves).
pub const HANOI_PLAN_MAX_LEVELS: u32 = 10;

/// One planned move of the Towers of Hanoi with nested VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HanoiStep {
    /// 1, 2, ... in the order to play.
    pub number: u32,
    /// The VM moved (`hanoi0` the outermost, as `walkabout game hanoi` names them).
    pub vm: String,
    /// Where it runs before: a peg (`peg1`) or the VM holding it (`hanoi0@peg1`).
    pub from: String,
    /// Where it runs after, the same way.
    pub to: String,
}

/// The planned solution of the Towers of Hanoi for `levels` levels, the tower moved from
/// peg 1 to peg 3 (`GET /v1/games/hanoi/plan`): the planner's moves, nothing played.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HanoiPlan {
    /// Levels of nesting.
    pub levels: u32,
    /// The VMs, outermost first.
    pub vms: Vec<String>,
    /// The moves, in order (2^levels - 1 of them).
    pub steps: Vec<HanoiStep>,
}
