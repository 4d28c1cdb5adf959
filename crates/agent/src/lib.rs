//! The Walkabout agent: the daemon on each host that runs its VMs under QEMU, keeps their
//! specs in an embedded database, re-attaches to them after its own restart, and serves
//! an HTTP/JSON API.

pub mod api;
pub mod console;
pub mod disks;
pub mod error;
pub mod host;
pub mod metrics;
pub mod migration;
pub mod spec;
pub mod store;
pub mod vms;

pub use console::GuestStatus;
pub use error::AgentError;
pub use host::HostInfo;
pub use migration::{MigrationRecord, MigrationRequest};
pub use spec::{VmRecord, VmSpec, VmState};
pub use vms::{Agent, AgentConfig, ConsoleChunk, StartError, VmInfo};

/// Serves the agent's API on `listener` until `shutdown` resolves. VMs keep running
/// after the agent stops; a restarted agent re-attaches to them.
pub async fn serve(
    agent: Agent,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, api::router(agent)).with_graceful_shutdown(shutdown).await
}
