//! Playing the Towers of Hanoi with nested VMs (`POST /v1/games/hanoi`).
//!
//! Three hosts of the cluster are the pegs. The tower is built on the first: a
//! hypervisor guest (`hanoi0`, the `hyper` image: its own agent and QEMU inside) boots
//! there, and a plain guest (`hanoi1`) boots on the same host and is live-migrated into
//! it. The planner ([`super::hanoi`]) then moves the tower to the third peg, one VM that
//! holds no other at a time, each move a live migration through the agents' API into
//! or out of the nested agent; each is verified at its destination (the moved guest's
//! heartbeat unbroken, no corrupt page, no kernel trouble) and recorded with its
//! downtime in the game's [`HanoiRecord`], announced on the event stream as it lands.
//!
//! The game speaks to the agents directly, not through the controller's executor: the
//! nested agent is a host that exists only while its VM runs, at an address on the
//! guests' bridge, and it stands on different hosts over the game. Its host identity is
//! issued from the cluster CA for its address and handed to it on a seed disk; making
//! those disks is the binary's ([`Nest`]: the controller does not build images).
//!
//! A stop starts no further move and lets the one under way finish (the ownership rule
//! keeps the VM whole either way); while the hypervisor guest boots it ends the wait at
//! once. At the end the game's VMs are deleted, innermost first, unless `keep`.
//!
//! Levels: 2 (one hypervisor guest holding one plain guest). A hypervisor guest nested
//! in another would need a bridge inside its holder for its own agent's address; not
//! built (docs/nesting.md).

use super::hanoi::{plan, Move, State};
use super::Games;
use crate::agents::BoxFut;
use crate::error::ControllerError;
use crate::lock;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use walkabout_api::{
    AgentClient, ClientError, ClientOptions, ControllerClient, DiskSpec, HanoiMove, HanoiOptions, HanoiRecord, HanoiStage, MigrationRecord,
    MigrationRequest, Mode, NicSpec, Phase, VmInfo, VmSpec, VmState, WalkKind, WalkRecord, WalkStatus,
};

/// The levels the game plays.
pub const LEVELS: u32 = 2;

/// How long the hypervisor guest may take to boot and start its agent.
const HYPER_BOOT_LIMIT: Duration = Duration::from_secs(900);

/// How long a plain guest may take to boot (its guest program ready).
const GUEST_BOOT_LIMIT: Duration = Duration::from_secs(300);

/// Kernel parameters of the game's guests: the kernel's lockup and stall detectors off.
/// A guest run by a QEMU inside a TCG guest on a busy host has its vCPU starved for
/// longer than their 20 s thresholds (seen: "soft lockup - CPU#0 stuck for 29s" after a
/// move out of the nested hypervisor, heartbeats continuous, 0 corrupt pages); they
/// would report scheduling, not damage. An oops, a panic or a protection fault still
/// fails the move.
const NESTED_CMDLINE: &str = "nosoftlockup nowatchdog rcupdate.rcu_cpu_stall_suppress=1 sysctl.kernel.hung_task_timeout_secs=0";

/// How long an agent may stay silent during a move before its peer gives up, ms.
const PEER_TIMEOUT_MS: u64 = 20_000;

/// How long the game waits for one move: longer than the source agent's own budget
/// for it (at most 900 s), so that the agent's end of it (a forced switchover at the
/// budget, or a failure with the VM still at its source) is what the game sees. At
/// 900 s, under a load of 20 on 2 cores, the game gave up on a move into the nested
/// agent seconds before its switchover.
const MOVE_LIMIT: Duration = Duration::from_secs(1200);

/// What the game needs of the machine the controller runs on to make a hypervisor
/// guest: its disks (implemented by the `walkabout` binary, which builds the image and
/// holds the CA).
pub trait Nest: Send + Sync + 'static {
    /// The disks of hypervisor guest `vm` whose agent will serve at `ip`: an overlay of
    /// the hyper image and a seed disk with a host identity for `ip`. Blocking (the
    /// image is built on first use).
    fn hyper_disks(&self, vm: &str, ip: &str) -> Result<Vec<DiskSpec>, String>;
    /// The port the agent inside a hypervisor guest serves on.
    fn agent_port(&self) -> u16;
}

/// The agent calls the game makes, each to the agent at `url` (a peg's host's, or the
/// one inside the hypervisor guest): [`AgentClient`] over HTTP, faked in unit tests.
pub trait HanoiAgents: Send + Sync + 'static {
    /// `POST /v1/vms`.
    fn create_vm(&self, url: String, spec: VmSpec) -> BoxFut<Result<(), ClientError>>;
    /// `GET /v1/vms/{name}`.
    fn vm(&self, url: String, name: String) -> BoxFut<Result<VmInfo, ClientError>>;
    /// `DELETE /v1/vms/{name}`.
    fn delete_vm(&self, url: String, name: String) -> BoxFut<Result<(), ClientError>>;
    /// `POST /v1/migrations`.
    fn start_migration(&self, url: String, req: MigrationRequest) -> BoxFut<Result<MigrationRecord, ClientError>>;
    /// `GET /v1/migrations/{id}`.
    fn migration(&self, url: String, id: String) -> BoxFut<Result<MigrationRecord, ClientError>>;
    /// `DELETE /v1/incoming/{vm}`: whatever a destination prepared for `vm` goes.
    fn abort_incoming(&self, url: String, vm: String) -> BoxFut<Result<(), ClientError>>;
    /// `GET /v1/host`: whether the agent answers.
    fn host(&self, url: String) -> BoxFut<Result<(), ClientError>>;
    /// `GET /v1/host/cpu`, allowed `limit`: the nested agent measures its QEMU's CPU
    /// models on first use (minutes under nested TCG).
    fn cpu(&self, url: String, limit: Duration) -> BoxFut<Result<(), ClientError>>;
    /// The last lines of `vm`'s serial console, for an error.
    fn console_tail(&self, url: String, vm: String) -> BoxFut<String>;
}

/// [`HanoiAgents`] over HTTP: one [`AgentClient`] per agent, the controller's identity,
/// two minutes a request (an agent inside a TCG guest answers in seconds).
#[derive(Default)]
pub struct HttpHanoiAgents {
    clients: Mutex<BTreeMap<String, AgentClient>>,
}

impl HttpHanoiAgents {
    fn client(&self, url: &str) -> Result<AgentClient, ClientError> {
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(url) {
            return Ok(c.clone());
        }
        let opts = ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(120) };
        let c = AgentClient::new(url, opts)?;
        clients.insert(url.to_string(), c.clone());
        Ok(c)
    }

    fn call<T, F, Fut>(&self, url: &str, f: F) -> BoxFut<Result<T, ClientError>>
    where
        T: Send + 'static,
        F: FnOnce(AgentClient) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, ClientError>> + Send + 'static,
    {
        match self.client(url) {
            Ok(c) => Box::pin(f(c)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl HanoiAgents for HttpHanoiAgents {
    fn create_vm(&self, url: String, spec: VmSpec) -> BoxFut<Result<(), ClientError>> {
        self.call(&url, |c| async move { c.create_vm(&spec).await.map(|_| ()) })
    }
    fn vm(&self, url: String, name: String) -> BoxFut<Result<VmInfo, ClientError>> {
        self.call(&url, |c| async move { c.vm(&name).await })
    }
    fn delete_vm(&self, url: String, name: String) -> BoxFut<Result<(), ClientError>> {
        self.call(&url, |c| async move { c.delete_vm(&name).await })
    }
    fn start_migration(&self, url: String, req: MigrationRequest) -> BoxFut<Result<MigrationRecord, ClientError>> {
        self.call(&url, |c| async move { c.start_migration(&req).await })
    }
    fn migration(&self, url: String, id: String) -> BoxFut<Result<MigrationRecord, ClientError>> {
        self.call(&url, |c| async move { c.migration(&id).await })
    }
    fn abort_incoming(&self, url: String, vm: String) -> BoxFut<Result<(), ClientError>> {
        self.call(&url, |c| async move { c.abort_incoming(&vm).await })
    }
    fn host(&self, url: String) -> BoxFut<Result<(), ClientError>> {
        self.call(&url, |c| async move { c.with_timeout(Duration::from_secs(10)).host().await.map(|_| ()) })
    }
    fn cpu(&self, url: String, limit: Duration) -> BoxFut<Result<(), ClientError>> {
        self.call(&url, move |c| async move { c.with_timeout(limit).cpu().await.map(|_| ()) })
    }
    fn console_tail(&self, url: String, vm: String) -> BoxFut<String> {
        let Ok(c) = self.client(&url) else { return Box::pin(std::future::ready(String::new())) };
        Box::pin(async move {
            let text = c.console(&vm, 0).await.map(|c| c.text).unwrap_or_default();
            text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ")
        })
    }
}

/// How the controller is set up for the Towers of Hanoi (`walkabout controller
/// --ca-dir --hanoi-bridge --hanoi-address`; [`Games::enable_hanoi`]).
#[derive(Clone)]
pub struct HanoiSetup {
    /// The bridge the hypervisor guest's NIC joins on every host.
    pub bridge: Option<String>,
    /// The hypervisor guest's address with its prefix (`10.77.0.20/24`).
    pub address: Option<String>,
    /// Makes the hypervisor guest's disks; absent without the cluster CA.
    pub nest: Option<Arc<dyn Nest>>,
    /// The agents' API.
    pub agents: Arc<dyn HanoiAgents>,
    /// How often the game looks at a migration or a booting guest.
    pub poll: Duration,
    /// How long a moved guest runs at its destination before it is checked (a few
    /// heartbeats).
    pub settle: Duration,
}

impl Default for HanoiSetup {
    fn default() -> HanoiSetup {
        HanoiSetup {
            bridge: None,
            address: None,
            nest: None,
            agents: Arc::new(HttpHanoiAgents::default()),
            poll: Duration::from_millis(500),
            settle: Duration::from_secs(3),
        }
    }
}

/// Why the game ended before its end.
enum Halt {
    /// The operator stopped it (or the controller stops).
    Stopped,
    /// Something failed; the sentence says what.
    Failed(String),
}

impl Games {
    /// Sets the controller up for the Towers of Hanoi (by `walkabout controller` from its
    /// flags); until then `POST /v1/games/hanoi` says what is missing.
    pub fn enable_hanoi(&self, setup: HanoiSetup) {
        *lock(&self.hanoi) = setup;
    }

    /// Starts the Towers of Hanoi with nested VMs. Returns at once; poll the walk.
    pub async fn start_hanoi(self: &Arc<Self>, opts: HanoiOptions) -> Result<WalkRecord, ControllerError> {
        self.start_hanoi_with(self.client(None)?, opts).await
    }

    /// [`Games::start_hanoi`] through `client`.
    pub(super) async fn start_hanoi_with(
        self: &Arc<Self>,
        client: ControllerClient,
        opts: HanoiOptions,
    ) -> Result<WalkRecord, ControllerError> {
        let setup = lock(&self.hanoi).clone();
        let game = self.hanoi_game(&client, &setup, opts).await?;
        let w = self.new_walk(WalkKind::Hanoi);
        let record = HanoiRecord {
            levels: LEVELS,
            vms: game.vms.clone(),
            pegs: game.peg_names.clone(),
            stage: HanoiStage::Booting,
            tower: tower(&game.vms, &State { pegs: [vec![0], vec![], vec![]] }),
            setup: vec![],
            moves: vec![],
            solved: false,
            hyper_boot_ms: None,
        };
        let w = self.update_walk(&w.id, |w| w.hanoi = Some(record)).unwrap_or(w);
        self.announce(
            &w.id,
            format!("Towers of Hanoi {} starts: {} on {}, to {}", w.id, game.vms.join(" ⊃ "), game.peg_names[0], game.peg_names[2]),
        );
        let (g, id) = (self.clone(), w.id.clone());
        tokio::spawn(async move {
            let result = g.play_hanoi(&client, &id, game).await;
            g.hanoi_update(&id, "the game is over".into(), |h| h.stage = HanoiStage::Over);
            g.end_walk(&client, &id, result).await;
        });
        Ok(w)
    }

    /// Checks the request against the cluster and the controller's setup.
    async fn hanoi_game(&self, client: &ControllerClient, setup: &HanoiSetup, opts: HanoiOptions) -> Result<Game, ControllerError> {
        if opts.levels != LEVELS {
            return Err(ControllerError::Invalid(format!(
                "{} levels of Hanoi: this build plays {LEVELS} (a hypervisor guest holding a plain guest); a hypervisor guest nested in \
                 another needs a bridge inside its holder, which is not built (see docs/nesting.md)",
                opts.levels
            )));
        }
        let nest = setup.nest.clone().ok_or_else(|| {
            ControllerError::Conflict(
                "hanoi needs --ca-dir: the agent inside the hypervisor guest serves mutual TLS with a host certificate the controller \
                 issues from the cluster CA (start `walkabout controller --ca-dir DIR`)"
                    .into(),
            )
        })?;
        let bridge = opts.bridge.clone().or_else(|| setup.bridge.clone()).ok_or_else(|| {
            ControllerError::Conflict(
                "hanoi needs --hanoi-bridge: the bridge the hypervisor guest's NIC joins on every host, where its agent reaches the \
                 hosts' agents and they it (or `bridge` in the request)"
                    .into(),
            )
        })?;
        let address = opts.address.clone().or_else(|| setup.address.clone()).ok_or_else(|| {
            ControllerError::Conflict(
                "hanoi needs --hanoi-address: the hypervisor guest's address with its prefix on that bridge, e.g. 10.77.0.20/24 \
                 (or `address` in the request)"
                    .into(),
            )
        })?;
        let ip = match address.split_once('/') {
            Some((ip, prefix)) if ip.parse::<std::net::IpAddr>().is_ok() && prefix.parse::<u8>().is_ok() => ip.to_string(),
            _ => {
                return Err(ControllerError::Invalid(format!("hanoi: `{address}` is not an address with its prefix (e.g. 10.77.0.20/24)")))
            }
        };
        if let Some(w) = self.walks().into_iter().find(|w| w.kind == WalkKind::Hanoi && w.status == WalkStatus::Running) {
            return Err(ControllerError::Conflict(format!("a game of the Towers of Hanoi ({}) is running; stop it first", w.id)));
        }
        let hosts = client.hosts().await.map_err(|e| ControllerError::Invalid(format!("the game cannot read the hosts: {e}")))?;
        let mut names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        names.sort_unstable();
        let peg_names: Vec<String> =
            if opts.pegs.is_empty() { names.iter().take(3).map(|s| s.to_string()).collect() } else { opts.pegs.clone() };
        let distinct: std::collections::BTreeSet<&String> = peg_names.iter().collect();
        if peg_names.len() != 3 || distinct.len() != 3 {
            return Err(ControllerError::Invalid(format!(
                "hanoi needs three distinct hosts as pegs, got {} ({})",
                peg_names.len(),
                peg_names.join(", ")
            )));
        }
        let mut pegs = Vec::with_capacity(3);
        for p in &peg_names {
            let h = hosts.iter().find(|h| &h.name == p).ok_or_else(|| {
                ControllerError::Invalid(format!("hanoi: peg {p} is not a host of this cluster (hosts: {})", names.join(", ")))
            })?;
            pegs.push(h.url.clone());
        }
        let inner = format!("https://{ip}:{}", nest.agent_port());
        let vms = (0..LEVELS).map(|i| format!("hanoi{i}")).collect();
        Ok(Game {
            peg_names,
            pegs,
            inner,
            vms,
            state: State { pegs: [vec![0], vec![], vec![]] },
            opts,
            bridge,
            address,
            ip,
            nest,
            setup: setup.clone(),
        })
    }

    /// Changes game `id`'s record and announces it (with the whole walk as the event's
    /// data, so a page redraws from it).
    fn hanoi_update(&self, id: &str, message: String, f: impl FnOnce(&mut HanoiRecord)) {
        let w = self.update_walk(id, |w| {
            if let Some(h) = w.hanoi.as_mut() {
                f(h);
            }
        });
        if let Some(w) = w {
            self.events.emit(crate::events::Subject::Walk, id, format!("{id}: {message}"), serde_json::to_value(&w).unwrap_or_default());
        }
    }

    /// Plays the game to its end; how it ended, in a sentence.
    async fn play_hanoi(self: &Arc<Self>, client: &ControllerClient, id: &str, mut game: Game) -> String {
        let result = self.hanoi_moves(id, &mut game).await;
        if !game.opts.keep {
            game.delete_all().await;
            // The controller saw them come and go behind its back (as missing); it
            // forgets them too (a VM it never saw is a 404, nothing to forget).
            for vm in &game.vms {
                let _ = client.delete_vm(vm).await;
            }
        }
        let rec = self.walk(id).ok().and_then(|w| w.hanoi).map(|h| (h.solved, h.moves));
        let downs =
            |moves: &[HanoiMove]| moves.iter().map(|m| m.downtime_ms.map_or_else(|| "-".into(), |d| d.to_string())).collect::<Vec<_>>();
        match (result, rec) {
            (Ok(()), Some((true, moves))) => format!("solved in {} moves (downtimes ms: {})", moves.len(), downs(&moves).join(", ")),
            (Ok(()), _) => "not solved".into(),
            (Err(Halt::Stopped), Some((_, moves))) => format!("stopped after {} move(s)", moves.len()),
            (Err(Halt::Stopped), None) => "stopped".into(),
            (Err(Halt::Failed(why)), _) => format!("failed: {why}"),
        }
    }

    async fn hanoi_moves(self: &Arc<Self>, id: &str, game: &mut Game) -> Result<(), Halt> {
        let boot_ms = self.hanoi_boot(id, game).await?;
        self.hanoi_update(id, format!("{}'s agent answers at {} after {:.0} s", game.vms[0], game.inner, boot_ms as f64 / 1000.0), |h| {
            h.hyper_boot_ms = Some(boot_ms);
            h.stage = HanoiStage::Building;
        });
        if !self.running(id) {
            return Err(Halt::Stopped);
        }
        // The tower: the plain guest into the hypervisor guest.
        let m = game.migrate(game.pegs[0].clone(), game.inner.clone(), 1, format!("{}@{}", game.vms[0], game.peg(0))).await;
        let ok = m.result == Phase::Completed && m.reason.is_none();
        let reason = m.reason.clone();
        if ok {
            game.state = State::start(LEVELS as usize, 0);
        }
        let tower_now = tower(&game.vms, &game.state);
        self.hanoi_update(id, format!("the tower: {}", line(&m)), |h| {
            h.setup.push(m);
            if ok {
                h.stage = HanoiStage::Playing;
                h.tower = tower_now;
            }
        });
        if !ok {
            return Err(Halt::Failed(format!("the tower was not built: {}", reason.unwrap_or_default())));
        }
        let levels = LEVELS as usize;
        let moves = plan(&game.state, levels, 2).map_err(|e| Halt::Failed(format!("planning the game: {e}")))?;
        for (i, mv) in moves.iter().enumerate() {
            if !self.running(id) {
                return Err(Halt::Stopped);
            }
            let m = game.play_move(*mv, i).await?;
            let ok = m.result == Phase::Completed && m.reason.is_none();
            let reason = m.reason.clone();
            let tower_now = tower(&game.vms, &game.state);
            self.hanoi_update(id, format!("move {}: {}", m.number, line(&m)), |h| {
                h.moves.push(m);
                h.tower = tower_now;
            });
            if !ok {
                return Err(Halt::Failed(format!("move {} failed: {}", i + 1, reason.unwrap_or_default())));
            }
        }
        let solved = game.state == State::start(levels, 2);
        self.hanoi_update(id, if solved { "solved".into() } else { "not solved".into() }, |h| h.solved = solved);
        Ok(())
    }

    /// Boots the hypervisor guest and the plain guest on peg 1 and waits for the agent
    /// inside the former; how long that agent took to answer, ms.
    async fn hanoi_boot(self: &Arc<Self>, id: &str, game: &Game) -> Result<u64, Halt> {
        let nest = game.nest.clone();
        let (name, ip) = (game.vms[0].clone(), game.ip.clone());
        let disks = tokio::task::spawn_blocking(move || nest.hyper_disks(&name, &ip))
            .await
            .map_err(|e| Halt::Failed(format!("making the hypervisor guest's disks: {e}")))?
            .map_err(|e| Halt::Failed(format!("making the hypervisor guest's disks: {e}")))?;
        if !self.running(id) {
            return Err(Halt::Stopped);
        }
        let mut spec = VmSpec::new(game.vms[0].clone(), game.opts.hyper_memory_mib);
        spec.cmdline = Some(format!("root=/dev/vda {NESTED_CMDLINE}"));
        spec.workload = "dirty:8:1".into();
        spec.disks = disks;
        let mut nic = NicSpec::on(game.bridge.clone());
        nic.address = Some(game.address.clone());
        spec.nics = vec![nic];
        let agents = &game.setup.agents;
        let peg1 = game.pegs[0].clone();
        agents
            .create_vm(peg1.clone(), spec)
            .await
            .map_err(|e| Halt::Failed(format!("creating {} on {}: {e}", game.vms[0], game.peg_names[0])))?;
        let mut leaf = VmSpec::new(game.vms[1].clone(), game.opts.guest_memory_mib);
        leaf.workload = game.opts.workload.clone();
        leaf.cmdline = Some(NESTED_CMDLINE.into());
        agents
            .create_vm(peg1.clone(), leaf)
            .await
            .map_err(|e| Halt::Failed(format!("creating {} on {}: {e}", game.vms[1], game.peg_names[0])))?;
        self.hanoi_update(
            id,
            format!(
                "{} (hypervisor guest, {} MiB) and {} ({} MiB) boot on {}",
                game.vms[0], game.opts.hyper_memory_mib, game.vms[1], game.opts.guest_memory_mib, game.peg_names[0]
            ),
            |_| {},
        );
        let started = Instant::now();
        let deadline = started + GUEST_BOOT_LIMIT;
        loop {
            if agents.vm(peg1.clone(), game.vms[1].clone()).await.is_ok_and(|i| i.guest.ready) {
                break;
            }
            self.wait_or_stop(id, deadline, game.setup.poll, || {
                format!("{} on {} was not ready within {} s", game.vms[1], game.peg_names[0], GUEST_BOOT_LIMIT.as_secs())
            })
            .await?;
        }
        let deadline = started + HYPER_BOOT_LIMIT;
        while agents.host(game.inner.clone()).await.is_err() {
            if Instant::now() > deadline {
                let tail = agents.console_tail(peg1.clone(), game.vms[0].clone()).await;
                return Err(Halt::Failed(format!(
                    "the agent inside {} ({}) did not answer within {} s; its console ends: {tail}",
                    game.vms[0],
                    game.inner,
                    HYPER_BOOT_LIMIT.as_secs()
                )));
            }
            self.wait_or_stop(id, deadline, game.setup.poll, String::new).await?;
        }
        // The nested agent measures its QEMU's CPU models once, on first use: minutes under
        // nested TCG. Done now, so that the first migration's request does not wait for it.
        let cpu = agents.cpu(game.inner.clone(), HYPER_BOOT_LIMIT);
        tokio::pin!(cpu);
        loop {
            tokio::select! {
                r = &mut cpu => {
                    r.map_err(|e| Halt::Failed(format!("the CPU models of the agent inside {}: {e}", game.vms[0])))?;
                    break;
                }
                () = tokio::time::sleep(game.setup.poll) => {
                    if !self.running(id) {
                        return Err(Halt::Stopped);
                    }
                }
            }
        }
        Ok(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Sleeps `poll` unless the game was stopped or `deadline` passed (then the error
    /// `late` says).
    async fn wait_or_stop(&self, id: &str, deadline: Instant, poll: Duration, late: impl FnOnce() -> String) -> Result<(), Halt> {
        if !self.running(id) {
            return Err(Halt::Stopped);
        }
        if Instant::now() > deadline {
            return Err(Halt::Failed(late()));
        }
        tokio::time::sleep(poll).await;
        Ok(())
    }
}

/// A game under way: the VMs and where their agents are.
struct Game {
    /// The pegs' host names and their agents' URLs.
    peg_names: Vec<String>,
    pegs: Vec<String>,
    /// The URL of the agent inside `hanoi0`.
    inner: String,
    /// VM names, outermost first.
    vms: Vec<String>,
    state: State,
    opts: HanoiOptions,
    bridge: String,
    address: String,
    ip: String,
    nest: Arc<dyn Nest>,
    setup: HanoiSetup,
}

/// The VMs on each peg, by name.
fn tower(vms: &[String], s: &State) -> Vec<Vec<String>> {
    s.pegs.iter().map(|p| p.iter().filter_map(|v| vms.get(*v).cloned()).collect()).collect()
}

impl Game {
    /// `h2`: peg `p`'s host.
    fn peg(&self, p: usize) -> &str {
        self.peg_names.get(p).map_or("?", String::as_str)
    }

    /// The agent `vm` runs on: its holder's (the agent inside it) or its peg's host's.
    fn agent_of(&self, vm: usize) -> Option<String> {
        match self.state.holder_of(vm) {
            Some(_) => Some(self.inner.clone()),
            None => self.state.peg_of(vm).and_then(|p| self.pegs.get(p).cloned()),
        }
    }

    /// The agent an arrival on `peg` runs on.
    fn agent_on(&self, peg: usize) -> String {
        match self.state.top(peg) {
            Some(_) => self.inner.clone(),
            None => self.pegs[peg].clone(),
        }
    }

    /// `h2` or `hanoi0@h2`: where `vm` runs in state `s`.
    fn place_in(&self, s: &State, vm: usize) -> String {
        let peg = s.peg_of(vm).map_or("?", |p| self.peg(p)).to_string();
        match s.holder_of(vm) {
            Some(h) => format!("{}@{peg}", self.vms[h]),
            None => peg,
        }
    }

    /// Plays `mv` (number `i` from 0) and applies it to the board once it completed.
    async fn play_move(&mut self, mv: Move, i: usize) -> Result<HanoiMove, Halt> {
        let src = self.agent_of(mv.vm).ok_or_else(|| Halt::Failed(format!("{} is on no peg", self.vms[mv.vm])))?;
        let dst = self.agent_on(mv.to);
        let mut after = self.state.clone();
        after.apply(mv).map_err(|e| Halt::Failed(format!("the planner's move {} is illegal: {e}", i + 1)))?;
        let to = self.place_in(&after, mv.vm);
        let mut m = self.migrate(src, dst, mv.vm, to).await;
        m.number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if m.result == Phase::Completed {
            self.state = after;
        }
        Ok(m)
    }

    /// Migrates VM `vm` from `src` to `dst` and checks the guest at the destination; a
    /// migration that failed (the VM then still runs at the source: the ownership rule)
    /// is tried once more, since a nested agent under TCG may miss a deadline on a busy
    /// host.
    async fn migrate(&self, src: String, dst: String, vm: usize, to: String) -> HanoiMove {
        // Before the tower is built the plain guest runs beside hanoi0 on the first peg.
        let from = if self.state.peg_of(vm).is_some() { self.place_in(&self.state, vm) } else { self.peg(0).to_string() };
        let name = self.vms[vm].clone();
        let first = self.migrate_once(&src, &dst, &name, from.clone(), to.clone()).await;
        // Only a VM still running at its source is tried again; whatever the destination
        // prepared late (after the source gave up) goes first.
        let agents = &self.setup.agents;
        let stayed = agents.vm(src.clone(), name.clone()).await.is_ok_and(|v| v.record.state == VmState::Running);
        if first.result != Phase::Failed || !stayed {
            return first;
        }
        let _ = agents.abort_incoming(dst.clone(), name.clone()).await;
        tracing::warn!(vm = name, reason = ?first.reason, "Hanoi move failed; trying it once more");
        let mut second = self.migrate_once(&src, &dst, &name, from, to).await;
        second.attempts = 2;
        if let (Some(r), Some(earlier)) = (second.reason.as_mut(), first.reason) {
            r.push_str(&format!(" (first attempt: {earlier})"));
        }
        second
    }

    /// One attempt of [`Game::migrate`].
    async fn migrate_once(&self, src: &str, dst: &str, vm: &str, from: String, to: String) -> HanoiMove {
        let agents = &self.setup.agents;
        let mut m = HanoiMove {
            number: 0,
            vm: vm.to_string(),
            from,
            to,
            migration: String::new(),
            result: Phase::Failed,
            downtime_ms: None,
            total_ms: None,
            heartbeats: 0,
            seq_breaks: 0,
            corrupt_pages: 0,
            reason: None,
            attempts: 1,
        };
        let mut req = MigrationRequest::new(vm, dst, Mode::Precopy);
        // Nested TCG moves memory slowly: a generous budget, a pause the policy may stretch.
        req.budget_per_gib_ms = Some(3_600_000);
        req.max_downtime_ms = Some(1_000);
        // An agent inside a TCG guest answers in seconds, not milliseconds.
        req.tuning.peer_timeout_ms = Some(PEER_TIMEOUT_MS);
        let rec = match agents.start_migration(src.to_string(), req).await {
            Ok(r) => r,
            Err(e) => {
                m.reason = Some(format!("cannot start the migration of {vm} at {src}: {e}"));
                return m;
            }
        };
        m.migration = rec.id.clone();
        let deadline = Instant::now() + MOVE_LIMIT;
        let rec = loop {
            tokio::time::sleep(self.setup.poll).await;
            match agents.migration(src.to_string(), rec.id.clone()).await {
                Ok(r) if r.phase.is_final() => break Some(r),
                Ok(_) | Err(_) if Instant::now() > deadline => break None,
                Ok(_) | Err(_) => {}
            }
        };
        let Some(rec) = rec else {
            m.reason = Some(format!("the migration of {vm} did not end within {} s", MOVE_LIMIT.as_secs()));
            return m;
        };
        m.result = rec.phase;
        m.downtime_ms = rec.downtime_ms;
        m.total_ms = rec.total_ms;
        if rec.phase != Phase::Completed {
            m.reason = rec.reason.or_else(|| Some(format!("the migration {}", rec.phase)));
            return m;
        }
        // A few heartbeats at the destination before judging.
        tokio::time::sleep(self.setup.settle).await;
        match agents.vm(dst.to_string(), vm.to_string()).await {
            Ok(info) => check(&mut m, &info),
            Err(e) => m.reason = Some(format!("{vm} is not at {dst} after its migration: {e}")),
        }
        m
    }

    /// Deletes the game's VMs, innermost first, wherever they may be.
    async fn delete_all(&self) {
        let agents = &self.setup.agents;
        for vm in (0..self.vms.len()).rev() {
            if let Some(at) = self.agent_of(vm) {
                let _ = agents.delete_vm(at, self.vms[vm].clone()).await;
            }
            // A VM the state lost track of (a failed setup, the plain guest beside the
            // hypervisor guest): try every peg.
            for p in &self.pegs {
                let _ = agents.delete_vm(p.clone(), self.vms[vm].clone()).await;
            }
        }
    }
}

/// Records the guest's health in `m`; a reason when it is not healthy.
fn check(m: &mut HanoiMove, info: &VmInfo) {
    let g = &info.guest;
    m.heartbeats = g.heartbeats;
    m.seq_breaks = g.seq_breaks;
    m.corrupt_pages = g.corrupt_pages;
    if g.seq_breaks > 0 || g.corrupt_pages > 0 || g.kernel_trouble || !g.is_healthy() {
        m.reason = Some(format!(
            "{} unhealthy after the move: {} heartbeat breaks, {} corrupt pages, kernel trouble {}, alerts {:?}",
            m.vm, g.seq_breaks, g.corrupt_pages, g.kernel_trouble, g.alerts
        ));
    }
}

/// One move, for people.
pub fn line(m: &HanoiMove) -> String {
    let down = m.downtime_ms.map_or_else(|| "-".into(), |d| format!("{d} ms"));
    let total = m.total_ms.map_or_else(|| "-".into(), |t| format!("{:.1} s", t as f64 / 1000.0));
    let mut s = format!(
        "{} {} -> {}: {} (downtime {down}, took {total}, heartbeats {}, breaks {}, corrupt pages {})",
        m.vm, m.from, m.to, m.result, m.heartbeats, m.seq_breaks, m.corrupt_pages
    );
    if let Some(r) = &m.reason {
        s.push_str(&format!(": {r}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{open, temp, url, Fake};

    /// The nested agent's URL for the address the tests set up.
    const INNER: &str = "https://10.9.0.20:7701";

    /// Agents that run VMs in a map: a migration moves its VM when it is looked at
    /// (unless held), the nested agent answers once `inner_up`.
    #[derive(Default)]
    struct FakeAgents {
        s: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        /// Where each VM runs.
        vms: BTreeMap<String, String>,
        /// VMs created, with where.
        created: Vec<(String, String)>,
        /// Migrations started: source, destination, VM.
        migrations: Vec<(String, String, String)>,
        /// Migrations from this index on stay running until `released`.
        hold_from: Option<usize>,
        released: bool,
        inner_up: bool,
    }

    fn gone(url: &str, what: String) -> ClientError {
        ClientError::Unreachable { url: url.to_string(), detail: what }
    }

    fn ready<T: Send + 'static>(v: T) -> BoxFut<T> {
        Box::pin(std::future::ready(v))
    }

    impl FakeAgents {
        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            lock(&self.s)
        }
    }

    impl HanoiAgents for FakeAgents {
        fn create_vm(&self, url: String, spec: VmSpec) -> BoxFut<Result<(), ClientError>> {
            let mut s = self.state();
            s.created.push((spec.name.clone(), url.clone()));
            s.vms.insert(spec.name, url);
            ready(Ok(()))
        }
        fn vm(&self, url: String, name: String) -> BoxFut<Result<VmInfo, ClientError>> {
            if self.state().vms.get(&name) != Some(&url) {
                return ready(Err(gone(&url, format!("no {name}"))));
            }
            let mut info = crate::fake::running(VmSpec::new(name, 128));
            info.guest.ready = true;
            info.guest.heartbeats = 7;
            ready(Ok(info))
        }
        fn delete_vm(&self, url: String, name: String) -> BoxFut<Result<(), ClientError>> {
            let mut s = self.state();
            if s.vms.get(&name) == Some(&url) {
                s.vms.remove(&name);
                return ready(Ok(()));
            }
            ready(Err(gone(&url, format!("no {name}"))))
        }
        fn start_migration(&self, url: String, req: MigrationRequest) -> BoxFut<Result<MigrationRecord, ClientError>> {
            let mut s = self.state();
            if s.vms.get(&req.vm) != Some(&url) {
                return ready(Err(gone(&url, format!("{} does not run here", req.vm))));
            }
            let id = format!("m{}", s.migrations.len());
            s.migrations.push((url, req.destination.clone(), req.vm.clone()));
            ready(Ok(MigrationRecord::pending(id, &req, 0)))
        }
        fn migration(&self, url: String, id: String) -> BoxFut<Result<MigrationRecord, ClientError>> {
            let mut s = self.state();
            let i: usize = id.trim_start_matches('m').parse().unwrap_or(usize::MAX);
            let Some((src, dst, vm)) = s.migrations.get(i).cloned().filter(|m| m.0 == url) else {
                return ready(Err(gone(&url, format!("no migration {id}"))));
            };
            let req = MigrationRequest::new(vm.clone(), dst.clone(), Mode::Precopy);
            let mut rec = MigrationRecord::pending(id, &req, 0);
            if s.hold_from.is_some_and(|h| i >= h) && !s.released {
                rec.phase = Phase::Running;
                return ready(Ok(rec));
            }
            if s.vms.get(&vm) == Some(&src) {
                s.vms.insert(vm, dst);
            }
            rec.phase = Phase::Completed;
            rec.downtime_ms = Some(10 + i as u64);
            ready(Ok(rec))
        }
        fn abort_incoming(&self, _url: String, _vm: String) -> BoxFut<Result<(), ClientError>> {
            ready(Ok(()))
        }
        fn host(&self, url: String) -> BoxFut<Result<(), ClientError>> {
            let s = self.state();
            if url == INNER && !(s.inner_up && s.vms.contains_key("hanoi0")) {
                return ready(Err(gone(&url, "not up".into())));
            }
            ready(Ok(()))
        }
        fn cpu(&self, _url: String, _limit: Duration) -> BoxFut<Result<(), ClientError>> {
            ready(Ok(()))
        }
        fn console_tail(&self, _url: String, _vm: String) -> BoxFut<String> {
            ready(String::new())
        }
    }

    struct FakeNest;

    impl Nest for FakeNest {
        fn hyper_disks(&self, _vm: &str, _ip: &str) -> Result<Vec<DiskSpec>, String> {
            Ok(vec![])
        }
        fn agent_port(&self) -> u16 {
            7701
        }
    }

    /// A controller over fake hosts h1-h3 serving its API, its games set up for Hanoi
    /// over `agents` (not at all without them).
    async fn controller(tag: &str, agents: Option<Arc<FakeAgents>>) -> (crate::Cluster, std::path::PathBuf) {
        let fake = Fake::new(&[("h1", 4096), ("h2", 4096), ("h3", 4096)], &[]);
        let dir = temp(tag);
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
        c.games().serve_at(&format!("http://{}", listener.local_addr().expect("address"))).expect("url");
        let app = crate::api::router(c.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        if let Some(agents) = agents {
            c.games().enable_hanoi(HanoiSetup {
                bridge: Some("br0".into()),
                address: Some("10.9.0.20/24".into()),
                nest: Some(Arc::new(FakeNest)),
                agents,
                poll: Duration::from_millis(10),
                settle: Duration::from_millis(10),
            });
        }
        (c, dir)
    }

    async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} never happened");
    }

    async fn finished(c: &crate::Cluster, id: &str) -> WalkRecord {
        wait_until("the game's end", || c.games().walk(id).is_ok_and(|w| w.finished_ms.is_some())).await;
        c.games().walk(id).expect("the game")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_game_builds_the_tower_on_the_first_peg_and_moves_it_to_the_last_through_the_nested_agent() {
        let agents = Arc::new(FakeAgents { s: Mutex::new(FakeState { inner_up: true, ..FakeState::default() }) });
        let (c, dir) = controller("hanoi-solve", Some(agents.clone())).await;

        let w = c.games().start_hanoi(HanoiOptions::default()).await.expect("the game starts");
        let w = finished(&c, &w.id).await;

        let h = w.hanoi.clone().expect("the Hanoi record");
        assert_eq!((w.kind, w.status, h.stage, h.solved), (WalkKind::Hanoi, WalkStatus::Finished, HanoiStage::Over, true), "{w:#?}");
        assert_eq!(h.pegs, vec!["h1", "h2", "h3"]);
        assert_eq!(h.tower, vec![vec![], vec![], vec!["hanoi0".to_string(), "hanoi1".to_string()]]);
        let s = agents.state();
        assert_eq!(s.created, vec![("hanoi0".to_string(), url("h1")), ("hanoi1".to_string(), url("h1"))]);
        let migrations: Vec<(&str, &str, &str)> = s.migrations.iter().map(|(a, b, v)| (a.as_str(), b.as_str(), v.as_str())).collect();
        let (h1, h2, h3) = (url("h1"), url("h2"), url("h3"));
        assert_eq!(
            migrations,
            vec![
                (h1.as_str(), INNER, "hanoi1"),
                (INNER, h2.as_str(), "hanoi1"),
                (h1.as_str(), h3.as_str(), "hanoi0"),
                (h2.as_str(), INNER, "hanoi1")
            ]
        );
        let places: Vec<(&str, &str, &str)> = h.moves.iter().map(|m| (m.vm.as_str(), m.from.as_str(), m.to.as_str())).collect();
        assert_eq!(places, vec![("hanoi1", "hanoi0@h1", "h2"), ("hanoi0", "h1", "h3"), ("hanoi1", "h2", "hanoi0@h3")]);
        assert_eq!(h.moves.iter().map(|m| m.downtime_ms).collect::<Vec<_>>(), vec![Some(11), Some(12), Some(13)]);
        assert!(h.moves.iter().chain(&h.setup).all(|m| m.result == Phase::Completed && m.reason.is_none() && m.heartbeats == 7));
        assert!(s.vms.is_empty(), "the game's VMs were not deleted: {:?}", s.vms);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_while_the_hypervisor_guest_boots_ends_the_game_at_once_with_no_migration_and_its_vms_deleted() {
        let agents = Arc::new(FakeAgents::default());
        let (c, dir) = controller("hanoi-stop-boot", Some(agents.clone())).await;
        let w = c.games().start_hanoi(HanoiOptions::default()).await.expect("the game starts");
        wait_until("both VMs created", || agents.state().created.len() == 2).await;

        c.games().stop_walk(&w.id).expect("stop");
        let w = finished(&c, &w.id).await;

        let h = w.hanoi.clone().expect("the Hanoi record");
        assert_eq!((w.status, h.stage, h.solved), (WalkStatus::Stopped, HanoiStage::Over, false), "{w:#?}");
        assert_eq!(w.result.as_deref(), Some("stopped after 0 move(s)"));
        let s = agents.state();
        assert!(s.migrations.is_empty(), "{:?}", s.migrations);
        assert!(s.vms.is_empty(), "the game's VMs were not deleted: {:?}", s.vms);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_during_a_move_lets_it_finish_and_starts_no_other() {
        let state = FakeState { inner_up: true, hold_from: Some(1), ..FakeState::default() };
        let agents = Arc::new(FakeAgents { s: Mutex::new(state) });
        let (c, dir) = controller("hanoi-stop-move", Some(agents.clone())).await;
        let w = c.games().start_hanoi(HanoiOptions { keep: true, ..HanoiOptions::default() }).await.expect("the game starts");
        wait_until("the first planned move under way", || agents.state().migrations.len() == 2).await;

        c.games().stop_walk(&w.id).expect("stop");
        agents.state().released = true;
        let w = finished(&c, &w.id).await;

        let h = w.hanoi.clone().expect("the Hanoi record");
        assert_eq!((w.status, h.moves.len(), h.moves[0].result), (WalkStatus::Stopped, 1, Phase::Completed), "{w:#?}");
        assert_eq!(w.result.as_deref(), Some("stopped after 1 move(s)"));
        let s = agents.state();
        assert_eq!(s.migrations.len(), 2, "a move started after the stop: {:?}", s.migrations);
        assert_eq!(s.vms.len(), 2, "kept VMs were deleted: {:?}", s.vms);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_move_line_names_the_vm_its_places_and_its_downtime() {
        let m = HanoiMove {
            number: 2,
            vm: "hanoi0".into(),
            from: "h1".into(),
            to: "h3".into(),
            migration: "m1".into(),
            result: Phase::Completed,
            downtime_ms: Some(42),
            total_ms: Some(12_500),
            heartbeats: 9,
            seq_breaks: 0,
            corrupt_pages: 0,
            reason: None,
            attempts: 1,
        };

        let s = line(&m);
        let failed = line(&HanoiMove { result: Phase::Failed, reason: Some("refused".into()), ..m });

        assert_eq!(s, "hanoi0 h1 -> h3: completed (downtime 42 ms, took 12.5 s, heartbeats 9, breaks 0, corrupt pages 0)");
        assert!(failed.ends_with(": refused"), "{failed}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_controller_not_set_up_for_hanoi_says_which_flag_is_missing() {
        let (c, dir) = controller("hanoi-unset", None).await;

        let no_ca = c.games().start_hanoi(HanoiOptions::default()).await.map(|_| ()).map_err(|e| e.to_string());
        c.games().enable_hanoi(HanoiSetup { nest: Some(Arc::new(FakeNest)), ..HanoiSetup::default() });
        let no_bridge = c.games().start_hanoi(HanoiOptions::default()).await.map(|_| ()).map_err(|e| e.to_string());
        let opts = HanoiOptions { bridge: Some("br0".into()), ..HanoiOptions::default() };
        let no_address = c.games().start_hanoi(opts.clone()).await.map(|_| ()).map_err(|e| e.to_string());
        let three = c.games().start_hanoi(HanoiOptions { levels: 3, ..opts }).await.map(|_| ()).map_err(|e| e.to_string());

        assert!(no_ca.as_ref().is_err_and(|e| e.starts_with("hanoi needs --ca-dir")), "{no_ca:?}");
        assert!(no_bridge.as_ref().is_err_and(|e| e.starts_with("hanoi needs --hanoi-bridge")), "{no_bridge:?}");
        assert!(no_address.as_ref().is_err_and(|e| e.starts_with("hanoi needs --hanoi-address")), "{no_address:?}");
        assert!(three.as_ref().is_err_and(|e| e.contains("this build plays 2")), "{three:?}");
        assert!(c.games().walks().is_empty());
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }
}
