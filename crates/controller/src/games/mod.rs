//! The walkabout games — a walk (VMs wander by live migration), musical chairs,
//! Scotland Yard — and free will (guests asking to move), as clients of the
//! controller's public API.
//!
//! They run inside the controller process (so `POST /v1/walks` and
//! `POST /v1/games/musical-chairs` stay where the API declares them, and `walkabout up`
//! and `walkabout controller` serve them without another process), but they hold only
//! their own records and reach the cluster the way any client does: through
//! [`ControllerClient`] at the controller's own URL. A hop is `POST /v1/vms/{vm}/move`
//! (a `place` plan the controller executes under its limits); a round of musical chairs
//! is a power cut of the host (its agent and QEMUs killed; the one call no controller
//! route offers, made to the host's agent through the controller's agent API), or in
//! the gentle game `POST /v1/hosts/{h}/drain`; then `DELETE /v1/hosts/{h}`: taking a
//! host away is something the game asks for, not a maintenance state of the core. So the
//! games obey every rule an operator's request does — nothing moves into a host in
//! maintenance, a VM a drain means to move is not taken from it — and, but for the
//! power cut, could move out of the process unchanged.
//!
//! The controller's URL is the one given to [`Games::serve_at`] (by `serve` and
//! `walkabout up`), else the address the game was requested at (the request's `Host`).

mod chairs;
pub mod hanoi;
mod hanoi_play;
pub mod scotland;
mod walk;
pub mod will;

use crate::agents::AgentApi;
use crate::error::ControllerError;
use crate::events::{Events, Subject};
use crate::{lock, now_ms};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use walkabout_api::{ClientOptions, ControllerClient, HanoiOptions, HanoiPlan, HanoiPlanQuery, HanoiStep, HANOI_PLAN_MAX_LEVELS};

pub use hanoi_play::{line as hanoi_move_line, HanoiAgents, HanoiSetup, HttpHanoiAgents, Nest, LEVELS as HANOI_LEVELS};
pub use walk::Rng;
pub use walkabout_api::{Hop, PlayerMove, Round, ScotlandOptions, Survivor, WalkKind, WalkOptions, WalkRecord, WalkStatus};

/// How often a game looks at the cluster.
const TICK: Duration = Duration::from_millis(200);

/// The games and their records. Shared as `Arc<Games>`.
pub struct Games {
    /// The controller's API, once its URL is known.
    client: Mutex<Option<ControllerClient>>,
    /// Walks and games by id.
    walks: Mutex<BTreeMap<String, WalkRecord>>,
    next_id: AtomicU64,
    events: Arc<Events>,
    stop: watch::Receiver<bool>,
    /// Free will: requests seen and answered.
    will: Mutex<will::WillState>,
    /// Scotland Yard: players' moves awaiting their turn, by game and detective.
    player_moves: Mutex<BTreeMap<(String, String), PlayerMove>>,
    /// The Towers of Hanoi: how this controller is set up to play it.
    hanoi: Mutex<HanoiSetup>,
    /// The agents' API, for the one call no controller route offers: musical chairs'
    /// power cut.
    agents: Arc<dyn AgentApi>,
}

impl Games {
    /// No games yet; they announce themselves on `events` and end when `stop` turns true;
    /// musical chairs cuts a host's power through `agents`.
    pub fn new(events: Arc<Events>, stop: watch::Receiver<bool>, agents: Arc<dyn AgentApi>) -> Arc<Games> {
        Arc::new(Games {
            client: Mutex::new(None),
            walks: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            events,
            stop,
            will: Mutex::default(),
            player_moves: Mutex::default(),
            hanoi: Mutex::default(),
            agents,
        })
    }

    /// Tells the games the controller's URL (e.g. `http://127.0.0.1:7700`), and starts
    /// serving free will there (once).
    pub fn serve_at(self: &Arc<Self>, url: &str) -> Result<(), ControllerError> {
        let c = ControllerClient::new(url, ClientOptions::default())
            .map_err(|e| ControllerError::Invalid(format!("the games cannot reach the controller: {e}")))?;
        *lock(&self.client) = Some(c.clone());
        let start = !std::mem::replace(&mut lock(&self.will).started, true);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if start => drop(rt.spawn(self.clone().free_will(c))),
            Ok(_) => {}
            Err(_) => lock(&self.will).started = false,
        }
        Ok(())
    }

    fn client(self: &Arc<Self>, headers: Option<&HeaderMap>) -> Result<ControllerClient, ControllerError> {
        if let Some(c) = lock(&self.client).clone() {
            return Ok(c);
        }
        let host = headers.and_then(|h| h.get(axum::http::header::HOST)).and_then(|h| h.to_str().ok()).ok_or_else(|| {
            ControllerError::Invalid("the games do not know the controller's URL (no Host header and none configured)".into())
        })?;
        self.serve_at(&format!("http://{host}"))?;
        lock(&self.client).clone().ok_or_else(|| ControllerError::Invalid("the games do not know the controller's URL".into()))
    }

    /// All walks and games (Mr X hidden while a game of Scotland Yard runs).
    pub fn walks(&self) -> Vec<WalkRecord> {
        lock(&self.walks).values().cloned().map(scotland::redacted).collect()
    }

    /// One walk or game (Mr X hidden while a game of Scotland Yard runs).
    pub fn walk(&self, id: &str) -> Result<WalkRecord, ControllerError> {
        lock(&self.walks).get(id).cloned().map(scotland::redacted).ok_or_else(|| ControllerError::not_found("walk", id))
    }

    /// Stops a walk or game: no new hop starts; hops under way finish.
    pub fn stop_walk(&self, id: &str) -> Result<WalkRecord, ControllerError> {
        let mut walks = lock(&self.walks);
        let w = walks.get_mut(id).ok_or_else(|| ControllerError::not_found("walk", id))?;
        if w.status == WalkStatus::Running {
            w.status = WalkStatus::Stopped;
        }
        Ok(w.clone())
    }

    /// Starts a walk: for `duration_ms`, VMs hop to random hosts with room. Returns at
    /// once; poll the walk.
    pub fn start_walk(self: &Arc<Self>, opts: WalkOptions) -> Result<WalkRecord, ControllerError> {
        self.start_walk_with(self.client(None)?, opts)
    }

    fn start_walk_with(self: &Arc<Self>, client: ControllerClient, opts: WalkOptions) -> Result<WalkRecord, ControllerError> {
        let w = self.new_walk(WalkKind::Walk);
        self.announce(&w.id, format!("walk {} starts for {} s", w.id, opts.duration_ms / 1000));
        let g = self.clone();
        let id = w.id.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let deadline = started + Duration::from_millis(opts.duration_ms);
            g.wander(&client, &id, deadline, opts).await;
            let result = if g.walk(&id).is_ok_and(|w| w.status == WalkStatus::Stopped) {
                format!("stopped after {} s", started.elapsed().as_secs())
            } else {
                format!("walked for {} s", opts.duration_ms / 1000)
            };
            g.end_walk(&client, &id, result).await;
        });
        Ok(w)
    }

    /// Starts musical chairs. Returns at once; poll the walk.
    pub fn start_musical_chairs(self: &Arc<Self>, opts: WalkOptions) -> Result<WalkRecord, ControllerError> {
        self.start_chairs_with(self.client(None)?, opts)
    }

    fn start_chairs_with(self: &Arc<Self>, client: ControllerClient, opts: WalkOptions) -> Result<WalkRecord, ControllerError> {
        let w = self.new_walk(WalkKind::MusicalChairs);
        self.announce(&w.id, format!("musical chairs {} starts", w.id));
        let g = self.clone();
        let id = w.id.clone();
        tokio::spawn(async move {
            let result = g.musical_chairs(&client, &id, opts).await;
            g.end_walk(&client, &id, result).await;
        });
        Ok(w)
    }

    fn new_walk(&self, kind: WalkKind) -> WalkRecord {
        let id = format!("w{}", self.next_id.fetch_add(1, Ordering::SeqCst));
        let w = WalkRecord {
            id: id.clone(),
            kind,
            status: WalkStatus::Running,
            started_ms: now_ms(),
            finished_ms: None,
            hops: vec![],
            rounds: vec![],
            survivors: vec![],
            result: None,
            failovers: vec![],
            scotland: None,
            hanoi: None,
        };
        lock(&self.walks).insert(id, w.clone());
        w
    }

    fn update_walk(&self, id: &str, f: impl FnOnce(&mut WalkRecord)) -> Option<WalkRecord> {
        let mut walks = lock(&self.walks);
        let w = walks.get_mut(id)?;
        f(w);
        Some(w.clone())
    }

    fn announce(&self, id: &str, message: String) {
        self.events.emit(Subject::Walk, id, message, serde_json::Value::Null);
    }

    /// True while walk `id` runs and the controller does not stop.
    fn running(&self, id: &str) -> bool {
        !*self.stop.borrow() && self.walk(id).map(|w| w.status == WalkStatus::Running).unwrap_or(false)
    }

    async fn end_walk(&self, client: &ControllerClient, id: &str, result: String) {
        let survivors = match client.vms().await {
            Ok(vms) => vms
                .into_iter()
                .filter(|v| v.is_active())
                .map(|v| Survivor {
                    vm: v.name,
                    host: v.host,
                    heartbeats: v.guest.heartbeats,
                    seq_breaks: v.guest.seq_breaks,
                    corrupt_pages: v.guest.corrupt_pages,
                })
                .collect(),
            Err(e) => {
                tracing::warn!(walk = id, error = %e, "cannot list the survivors");
                vec![]
            }
        };
        if let Some(w) = self.update_walk(id, |w| {
            if w.status == WalkStatus::Running {
                w.status = WalkStatus::Finished;
            }
            w.finished_ms = Some(now_ms());
            w.survivors = survivors;
            w.result = Some(result.clone());
        }) {
            self.events.emit(Subject::Walk, id, format!("{id} ended: {result}"), serde_json::to_value(&w).unwrap_or_default());
        }
    }
}

/// The games' routes: `/v1/walks`, `/v1/walks/{id}`, `/v1/walks/{id}/stop`,
/// `/v1/games/musical-chairs`, `/v1/games/scotland-yard`, `/v1/games/{id}/move`,
/// `/v1/games/hanoi`, `/v1/games/hanoi/plan`, `/v1/will`. A game is stopped like a walk, at
/// `/v1/walks/{id}/stop` (one spelling per action).
pub fn router(games: Arc<Games>) -> Router {
    Router::new()
        .route("/v1/walks", get(list).post(start_walk))
        .route("/v1/games/musical-chairs", post(start_game))
        .route("/v1/games/scotland-yard", post(start_scotland))
        .route("/v1/games/{id}/move", post(game_move))
        .route("/v1/games/hanoi", post(start_hanoi))
        .route("/v1/games/hanoi/plan", get(hanoi_plan))
        .route("/v1/will", get(will_records))
        .route("/v1/walks/{id}", get(one))
        .route("/v1/walks/{id}/stop", post(stop))
        .with_state(games)
}

type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn reply<T: serde::Serialize>(status: StatusCode, r: Result<T, ControllerError>) -> Response {
    match r {
        Ok(v) => (status, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn options(b: Body<WalkOptions>, what: &str) -> Result<WalkOptions, ControllerError> {
    b.map(|Json(v)| v).map_err(|e| ControllerError::Invalid(format!("invalid {what}: {}", e.body_text())))
}

async fn list(State(g): State<Arc<Games>>) -> Response {
    Json(g.walks()).into_response()
}

async fn one(State(g): State<Arc<Games>>, Path(id): Path<String>) -> Response {
    reply(StatusCode::OK, g.walk(&id))
}

async fn stop(State(g): State<Arc<Games>>, Path(id): Path<String>) -> Response {
    reply(StatusCode::ACCEPTED, g.stop_walk(&id))
}

async fn start_walk(State(g): State<Arc<Games>>, headers: HeaderMap, b: Body<WalkOptions>) -> Response {
    let r = options(b, "walk").and_then(|o| g.start_walk_with(g.client(Some(&headers))?, o));
    reply(StatusCode::ACCEPTED, r)
}

async fn start_game(State(g): State<Arc<Games>>, headers: HeaderMap, b: Body<WalkOptions>) -> Response {
    let r = options(b, "game").and_then(|o| g.start_chairs_with(g.client(Some(&headers))?, o));
    reply(StatusCode::ACCEPTED, r)
}

async fn start_scotland(State(g): State<Arc<Games>>, headers: HeaderMap, b: Body<ScotlandOptions>) -> Response {
    let r = async {
        let o = b.map(|Json(v)| v).map_err(|e| ControllerError::Invalid(format!("invalid game: {}", e.body_text())))?;
        g.start_scotland_with(g.client(Some(&headers))?, o).await
    }
    .await;
    reply(StatusCode::ACCEPTED, r)
}

async fn start_hanoi(State(g): State<Arc<Games>>, headers: HeaderMap, b: Body<HanoiOptions>) -> Response {
    let r = async {
        let o = b.map(|Json(v)| v).map_err(|e| ControllerError::Invalid(format!("invalid game: {}", e.body_text())))?;
        g.start_hanoi_with(g.client(Some(&headers))?, o).await
    }
    .await;
    reply(StatusCode::ACCEPTED, r)
}

async fn game_move(State(g): State<Arc<Games>>, Path(id): Path<String>, b: Body<PlayerMove>) -> Response {
    let r = b
        .map(|Json(v)| v)
        .map_err(|e| ControllerError::Invalid(format!("invalid move: {}", e.body_text())))
        .and_then(|m| g.scotland_move(&id, m));
    reply(StatusCode::ACCEPTED, r)
}

async fn hanoi_plan(q: Result<Query<HanoiPlanQuery>, QueryRejection>) -> Response {
    let r = q
        .map_err(|e| ControllerError::Invalid(format!("invalid Hanoi query: {}", e.body_text())))
        .and_then(|Query(q)| hanoi_planned(q.levels));
    reply(StatusCode::OK, r)
}

/// The Towers of Hanoi's planned moves for `levels` levels, peg 1 to peg 3, each VM's
/// place named as `walkabout game hanoi` names it (`peg2`, `hanoi0@peg3`).
fn hanoi_planned(levels: u32) -> Result<HanoiPlan, ControllerError> {
    if !(1..=HANOI_PLAN_MAX_LEVELS).contains(&levels) {
        return Err(ControllerError::Invalid(format!("{levels} levels of Hanoi: plan 1 to {HANOI_PLAN_MAX_LEVELS}")));
    }
    let n = levels as usize;
    let vms: Vec<String> = (0..n).map(|i| format!("hanoi{i}")).collect();
    let mut state = hanoi::State::start(n, 0);
    let moves = hanoi::plan(&state, n, 2).map_err(|e| ControllerError::Invalid(format!("planning {levels} levels of Hanoi: {e}")))?;
    let place = |s: &hanoi::State, vm: usize| {
        let peg = s.peg_of(vm).map_or_else(|| "?".to_string(), |p| format!("peg{}", p + 1));
        match s.holder_of(vm) {
            Some(h) => format!("{}@{peg}", vms[h]),
            None => peg,
        }
    };
    let mut steps = Vec::with_capacity(moves.len());
    for (i, m) in moves.into_iter().enumerate() {
        let from = place(&state, m.vm);
        state.apply(m).map_err(|e| ControllerError::Invalid(format!("the planner's move {} is illegal: {e}", i + 1)))?;
        steps.push(HanoiStep { number: u32::try_from(i + 1).unwrap_or(u32::MAX), vm: vms[m.vm].clone(), from, to: place(&state, m.vm) });
    }
    Ok(HanoiPlan { levels, vms, steps })
}

async fn will_records(State(g): State<Arc<Games>>) -> Response {
    Json(g.will_records()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{open, temp, url, wait_final, Fake};
    use crate::plans::PlanStatus;

    #[test]
    fn the_hanoi_plan_of_three_levels_is_seven_moves_ending_nested_on_peg_three() {
        let p = hanoi_planned(3).expect("a plan");

        assert_eq!(p.steps.len(), 7);
        assert_eq!((p.steps[0].vm.as_str(), p.steps[0].from.as_str(), p.steps[0].to.as_str()), ("hanoi2", "hanoi1@peg1", "peg3"));
        let last = p.steps.last().expect("a last step");
        assert_eq!((last.vm.as_str(), last.to.as_str()), ("hanoi2", "hanoi1@peg3"));
        assert!(p.steps.iter().any(|s| s.vm == "hanoi0" && s.from == "peg1" && s.to == "peg3"), "{p:?}");
    }

    #[test]
    fn a_hanoi_plan_of_no_level_or_too_many_is_refused() {
        assert!(matches!(hanoi_planned(0), Err(ControllerError::Invalid(_))));
        assert!(matches!(hanoi_planned(HANOI_PLAN_MAX_LEVELS + 1), Err(ControllerError::Invalid(_))));
        assert_eq!(hanoi_planned(HANOI_PLAN_MAX_LEVELS).map(|p| p.steps.len()).ok(), Some(1023));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_walk_never_targets_a_draining_host() {
        let vms = [("a", 256, "h1"), ("b", 256, "h1"), ("c", 256, "h2"), ("d", 256, "h3")];
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024), ("h3", 1024)], &vms);
        let dir = temp("walk-drain");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
        c.games().serve_at(&format!("http://{}", listener.local_addr().expect("address"))).expect("url");
        let app = crate::api::router(c.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let walk = c.games().start_walk(WalkOptions { duration_ms: 8_000, parallel: 2, pause_ms: 0, gentle: false }).expect("walk");
        while c.games().walk(&walk.id).expect("walk").hops.len() < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let plan = c.drain("h1").expect("drain");
        let since = now_ms();
        let plan = wait_final(&c, &plan.id).await;
        let mut w = c.games().walk(&walk.id).expect("walk");
        while w.finished_ms.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            w = c.games().walk(&walk.id).expect("walk");
        }

        assert_eq!(plan.status, PlanStatus::Completed, "{plan:#?}");
        let into_h1: Vec<_> = c.migrations().into_iter().filter(|m| m.to == "h1" && m.started_ms >= since).collect();
        assert!(into_h1.is_empty(), "migrations started into draining h1: {into_h1:#?}");
        assert!(w.hops.iter().any(|h| c.migration(&h.migration).is_ok_and(|m| m.started_ms > since)), "the walk went on: {w:#?}");
        assert!(fake.state().vms.values().all(|(h, _)| *h != url("h1")));
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }
}
