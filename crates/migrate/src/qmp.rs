//! What a migration needs of a VM's QEMU, behind a trait so that the logic driving a
//! migration (the switchover gate, cancel, settling on the source) can be tested against
//! a scripted fake; [`Qmp`] is the real thing.

use std::collections::BTreeSet;
use std::future::Future;
use tokio::sync::broadcast;
use walkabout_qemu::qmp::StatusInfo;
use walkabout_qemu::{cpu, Event, Qmp, QmpError};

/// The QMP session of one VM's QEMU, as a migration uses it (either end).
pub trait MigrationQmp: Send + Sync {
    /// Runs one QMP command and returns QEMU's `return` value (`migrate`,
    /// `query-migrate`, `migrate_cancel`, `migrate-continue`, `migrate-set-*`,
    /// `calc-dirty-rate`, ...).
    fn execute(&self, command: &str, args: Option<serde_json::Value>) -> impl Future<Output = Result<serde_json::Value, QmpError>> + Send;

    /// Runs one command out of band where QEMU allows it (`migrate-pause`,
    /// `migrate-recover`): served even while QEMU's main loop waits for a page a
    /// paused post-copy cannot bring.
    fn execute_oob(
        &self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> impl Future<Output = Result<serde_json::Value, QmpError>> + Send {
        self.execute(command, args)
    }

    /// Subscribes to QEMU's events from now on.
    fn events(&self) -> broadcast::Receiver<Event>;

    /// The CPU features (flags set) of `model` as this QEMU expands it.
    fn cpu_features(&self, model: &str) -> impl Future<Output = Result<BTreeSet<String>, QmpError>> + Send;

    /// `query-status`: whether the guest runs, and QEMU's run state.
    fn query_status(&self) -> impl Future<Output = Result<StatusInfo, QmpError>> + Send {
        async move {
            let v = self.execute("query-status", None).await?;
            serde_json::from_value(v).map_err(|e| QmpError::Protocol { context: "query-status".into(), detail: e.to_string() })
        }
    }

    /// `cont`: resumes the guest's vCPUs.
    fn cont(&self) -> impl Future<Output = Result<(), QmpError>> + Send {
        async move { self.execute("cont", None).await.map(drop) }
    }
}

impl MigrationQmp for Qmp {
    fn execute(&self, command: &str, args: Option<serde_json::Value>) -> impl Future<Output = Result<serde_json::Value, QmpError>> + Send {
        self.execute_raw(command, args)
    }

    fn execute_oob(
        &self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> impl Future<Output = Result<serde_json::Value, QmpError>> + Send {
        Qmp::execute_oob(self, command, args)
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        Qmp::events(self)
    }

    fn cpu_features(&self, model: &str) -> impl Future<Output = Result<BTreeSet<String>, QmpError>> + Send {
        cpu::features(self, model)
    }
}
