//! Several controllers over one etcd, one of them leading: the leader runs the cluster
//! (watchers, plans, migrations); the others wait, answer with the leader's address, and
//! take over when its lease lapses.
//!
//! ```text
//!  controller A ──campaign──> etcd  PREFIX/leader = A's URL (lease, TTL)
//!    leads: Cluster over etcd (writes fenced by the leader key's create revision,
//!           the epoch); every agent request carries X-Walkabout-Epoch: epoch
//!  controller B, C: campaign, blocked while the key exists;
//!    answer every request: 307 to A (body: not_leader naming A), or 503 with no leader
//!  A dies -> its lease expires -> B creates the key (epoch > A's) -> B opens the
//!    Cluster from etcd: resumes A's running plans and adopts A's migrations
//! ```
//!
//! Why the order of operations is what it is:
//! - The new leader opens the cluster (loads everything from etcd) only after it has won
//!   the key, so it sees every record the old leader managed to write; the old leader
//!   can write nothing more (its writes are fenced by its epoch).
//! - The API is served by the leader only once its cluster is open; until then it
//!   answers like a follower.
//! - A leader whose lease is lost (etcd unreachable for its TTL, or the lease expired)
//!   stops its cluster at once, before campaigning again: a deposed leader keeps no
//!   watcher, plan or migration task. Agents refuse it anyway once the next leader has
//!   spoken to them (its epoch is older), and etcd refuses its writes.
//! - On a clean stop the leader revokes its lease, so the next leader need not wait for
//!   the lease to expire.

use crate::agents::HttpAgents;
use crate::controller::{Cluster, ControllerConfig};
use crate::error::ControllerError;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tower::ServiceExt;
use walkabout_api::{ErrorBody, ErrorKind};
use walkabout_store_etcd::{Etcd, EtcdConfig, Leadership};

/// The default lease of the leader: a leader that died is replaced within about this long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);

/// How one controller of several takes part.
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// Where etcd is.
    pub etcd: EtcdConfig,
    /// The URL other controllers send clients to while this one leads.
    pub url: String,
    /// The leader's lease.
    pub lease_ttl: Duration,
}

/// What a controller is now, read by every request.
struct Role {
    /// The leader's API while this controller leads and its cluster is open, with the
    /// term it leads in (whose lease must still hold for a request to be served).
    api: RwLock<Option<(Router, Leadership)>>,
    etcd: Etcd,
    url: String,
    /// The CA that signs hosts' joins while this controller leads.
    trust: Arc<crate::join::Trust>,
}

/// Serves the API on `listener` as one of several controllers sharing etcd until
/// `shutdown` resolves: campaigns, leads while it holds the lease (registering
/// `agent_urls` and resuming what the previous leader left), follows otherwise. The
/// listener's TLS and the trust policy are the single controller's (401 without an
/// identity, 403 for a viewer's change).
pub async fn serve_ha(
    config: ControllerConfig,
    ha: HaConfig,
    agent_urls: Vec<String>,
    listener: walkabout_trust::Listener,
    trust: Arc<crate::join::Trust>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let etcd_config = ha.etcd.clone();
    let etcd = tokio::task::spawn_blocking(move || Etcd::connect(etcd_config))
        .await
        .map_err(|e| ControllerError::Invalid(format!("connecting to etcd: {e}")))??;
    let role = Arc::new(Role { api: RwLock::new(None), etcd: etcd.clone(), url: ha.url.clone(), trust });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = Router::new().fallback(dispatch).with_state(role.clone());
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        let stopped = async move {
            let _ = server_stop.wait_for(|s| *s).await;
        };
        walkabout_trust::serve::serve(listener, app, walkabout_trust::ServerKind::Controller, None, stopped).await
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut stop = stop_rx;
    loop {
        let term = tokio::select! {
            t = etcd.campaign(&ha.url, ha.lease_ttl) => t,
            _ = stop.wait_for(|s| *s) => break,
        };
        let term = match term {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let stopping = lead(&config, &etcd, &role, &term, &agent_urls, &mut stop).await;
        *write(&role.api) = None;
        if stopping {
            etcd.resign(&term).await;
            break;
        }
    }
    match server.await {
        Ok(r) => r.map_err(|e| ControllerError::Invalid(format!("serving the API: {e}"))),
        Err(e) => Err(ControllerError::Invalid(format!("the API server task failed: {e}"))),
    }
}

/// Leads for one term: opens the cluster over etcd, serves it until the term is lost or
/// the controller stops. True when it stops.
async fn lead(
    config: &ControllerConfig,
    etcd: &Etcd,
    role: &Role,
    term: &Leadership,
    agent_urls: &[String],
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let store = Arc::new(etcd.store(Some(term)));
    let opened = Cluster::open_on(config.clone(), store, Arc::new(HttpAgents::with_epoch(term.epoch))).await;
    let cluster = match opened {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, epoch = term.epoch, "cannot open the cluster from etcd; giving up this term");
            return false;
        }
    };
    for a in agent_urls {
        let (name, url) = crate::split_agent(a);
        if let Err(e) = cluster.add_host(url, name).await {
            tracing::warn!(agent = %a, error = %e, "cannot register agent");
        }
    }
    if let Err(e) = cluster.games().serve_at(&role.url) {
        tracing::warn!(error = %e, "the games cannot reach this controller");
    }
    *write(&role.api) = Some((crate::api::router_with_trust(cluster.clone(), role.trust.clone()), term.clone()));
    tracing::info!(epoch = term.epoch, url = %role.url, hosts = cluster.hosts().len(), "leading the cluster");
    let stopping = tokio::select! {
        _ = term.lost() => {
            tracing::warn!(epoch = term.epoch, "lost the leadership; stopping this controller's cluster and following");
            false
        }
        _ = stop.wait_for(|s| *s) => true,
    };
    *write(&role.api) = None;
    cluster.stop();
    stopping
}

fn write(lock: &RwLock<Option<(Router, Leadership)>>) -> std::sync::RwLockWriteGuard<'_, Option<(Router, Leadership)>> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves a request: the leader's API while leading; otherwise a redirect to the leader
/// (307, the body saying why), or 503 while no controller leads.
async fn dispatch(State(role): State<Arc<Role>>, req: Request) -> Response {
    let api = role.api.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    // A controller woken from a pause past its lease answers as a follower at once,
    // before its keep-alive notices: another may lead by now.
    if let Some((api, _)) = api.filter(|(_, term)| term.is_current()) {
        return match api.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
    }
    let leader = role.etcd.leader().await;
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    match leader {
        Ok(Some(l)) if l.url != role.url => {
            let why = format!(
                "this controller ({}) is a follower: the cluster is led by {} (epoch {}); send requests there",
                role.url, l.url, l.epoch
            );
            let location = format!("{}{path}", l.url.trim_end_matches('/'));
            let body = Json(ErrorBody::new(ErrorKind::NotLeader, why));
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)], body).into_response()
        }
        Ok(_) => {
            let why = format!("no controller leads the cluster yet ({} is campaigning); retry in a few seconds", role.url);
            (StatusCode::SERVICE_UNAVAILABLE, Json(ErrorBody::new(ErrorKind::NotLeader, why))).into_response()
        }
        Err(e) => {
            let why = format!("this controller ({}) does not lead and cannot tell who does: {e}", role.url);
            (StatusCode::SERVICE_UNAVAILABLE, Json(ErrorBody::new(ErrorKind::NotLeader, why))).into_response()
        }
    }
}
