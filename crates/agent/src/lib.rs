//! The Walkabout agent: the daemon on each host that runs its VMs under QEMU, keeps their
//! specs in an embedded database, re-attaches to them after its own restart, and serves
//! an HTTP/JSON API. It checkpoints running VMs, ships the checkpoints to a replica agent
//! and holds other hosts' replicas (`checkpoint`), and restores VMs from them.

pub mod api;
pub mod audit;
pub mod boot;
pub mod checkpoint;
pub mod console;
pub mod disks;
pub mod error;
pub mod fence;
pub mod host;
pub mod metrics;
pub mod migration;
pub mod nics;
pub mod spec;
pub mod store;
pub mod vms;
pub mod will;

pub use console::GuestStatus;
pub use error::AgentError;
pub use host::HostInfo;
pub use migration::{MigrationRecord, MigrationRequest};
pub use spec::{VmRecord, VmSpec, VmState};
pub use vms::{Agent, AgentConfig, ConsoleChunk, StartError, VmInfo};

/// Serves the agent's API on `listener` (TLS with client certificates, or plain HTTP
/// on loopback when asked) until `shutdown` resolves, the trust policy enforced (see
/// `walkabout_trust::policy`), every change recorded with who made it ([`audit`]). VMs
/// keep running after the agent stops; a restarted agent re-attaches to them.
pub async fn serve(
    agent: Agent,
    listener: walkabout_trust::Listener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    *vms::lock(&agent.inner.own_addr) = Some(listener.addr());
    let log = agent.clone();
    let audit: walkabout_trust::serve::Audit =
        std::sync::Arc::new(move |who, method, path, status| log.inner.audit.record(who, method, path, status));
    walkabout_trust::serve::serve(listener, api::router(agent), walkabout_trust::ServerKind::Agent, Some(audit), shutdown).await
}
