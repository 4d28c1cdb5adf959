//! The Walkabout controller: the cluster view (hosts, VMs, placement), kept in an
//! embedded database; goals (drain, rebalance, consolidate, place) turned into plans by
//! `walkabout-plan` and executed through the agents with limits, retries and re-plans;
//! an HTTP/JSON API with an event stream; and the walkabout games, clients of that API.
//! `controller.rs` shows how the parts fit.
//!
//! ```text
//!  walkabout CLI ──HTTP──> controller ──HTTP──> agent h1 ── QEMU
//!                          │  cluster view   ├─> agent h2 ── QEMU
//!                          │  plans, events  └─> agent h3 ── QEMU
//!                          └─ redb (data-dir/controller.redb), or etcd shared by
//!                             several controllers of which one leads (leader.rs)
//! ```

pub mod agents;
pub mod api;
pub mod balance;
pub mod cluster;
pub mod controller;
pub mod drain;
pub mod error;
pub mod events;
pub mod execute;
pub mod failover;
#[cfg(test)]
mod fake;
pub mod games;
pub mod join;
pub mod leader;
pub mod metrics;
pub mod plan_runner;
pub mod plans;
pub mod store;

pub use controller::{Cluster, ControllerConfig};
pub use error::ControllerError;
pub use execute::within_limits;
pub use leader::{serve_ha, HaConfig};
pub use walkabout_store_etcd::EtcdConfig;

/// Milliseconds since the Unix epoch, by tokio's clock: the wall clock read once, then
/// advanced by tokio's monotonic clock. In production that is the system's monotonic
/// clock; under the simulator's paused runtime it is simulated time, so every
/// timestamp and every timeout the controller decides on (a host down after 4 s of
/// silence) follows the simulation.
pub fn now_ms() -> u64 {
    static BASE: std::sync::OnceLock<(u64, tokio::time::Instant)> = std::sync::OnceLock::new();
    let (wall, at) = BASE.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        (wall, tokio::time::Instant::now())
    });
    wall.saturating_add(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// Locks a mutex, recovering it if a thread panicked while holding it (the data is
/// plain records, consistent at every await point).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves `cluster`'s API on `listener` (TLS with client certificates, or plain HTTP on
/// loopback) until `shutdown` resolves: the trust policy enforced, joins signed with
/// `trust`, every change recorded in the event log with who asked. The games are told
/// the listener's URL.
pub async fn serve(
    cluster: Cluster,
    trust: std::sync::Arc<join::Trust>,
    listener: walkabout_trust::Listener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    cluster.games().serve_at(&listener.url())?;
    let app = api::router_with_trust(cluster.clone(), trust);
    let audit = join::audit(cluster.clone());
    walkabout_trust::serve::serve(listener, app, walkabout_trust::ServerKind::Controller, Some(audit), shutdown)
        .await
        .map_err(|e| ControllerError::Invalid(format!("serving the API: {e}")))
}

/// Opens the controller with agents over HTTP and registers `agent_urls` (each `URL` or
/// `NAME=URL`).
pub async fn start(config: ControllerConfig, agent_urls: &[String]) -> Result<Cluster, ControllerError> {
    let api = agents::HttpAgents::new();
    let cluster = Cluster::open(config, std::sync::Arc::new(api)).await?;
    for a in agent_urls {
        let (name, url) = split_agent(a);
        cluster.add_host(url, name).await?;
    }
    Ok(cluster)
}

/// An agent argument, `URL` or `NAME=URL`, as its name (if given) and URL.
pub(crate) fn split_agent(a: &str) -> (Option<&str>, &str) {
    match a.split_once('=') {
        Some((n, u)) if !n.contains('/') => (Some(n), u),
        _ => (None, a),
    }
}
