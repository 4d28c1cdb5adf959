//! Errors of the agent, each naming the VM and the cause, and the HTTP status each maps to.

use crate::spec::VmState;
use crate::store::StoreError;
use walkabout_api::{ErrorBody, ErrorKind};
use walkabout_qemu::QemuError;

/// Errors of agent operations.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No VM of that name on this agent.
    #[error("no VM named `{vm}` on this agent")]
    NotFound {
        /// The VM name.
        vm: String,
    },
    /// A VM of that name exists already.
    #[error("a VM named `{vm}` already exists on this agent")]
    Duplicate {
        /// The VM name.
        vm: String,
    },
    /// Not enough free memory for the VM.
    #[error("cannot start `{vm}`: it needs {need_mib} MiB but this host has {free_mib} MiB free ({capacity_mib} MiB capacity, {used_mib} MiB given to other VMs)")]
    InsufficientMemory {
        /// The VM name.
        vm: String,
        /// Memory it needs.
        need_mib: u64,
        /// Memory free for VMs.
        free_mib: u64,
        /// The host's capacity for VMs.
        capacity_mib: u64,
        /// Memory used by active VMs.
        used_mib: u64,
    },
    /// The spec is invalid.
    #[error("invalid spec for VM `{vm}`: {reason}")]
    InvalidSpec {
        /// The VM name.
        vm: String,
        /// What is wrong.
        reason: String,
    },
    /// The operation does not apply in the VM's current state.
    #[error("cannot {op} VM `{vm}`: it is {state:?}")]
    InvalidState {
        /// The VM name.
        vm: String,
        /// The operation.
        op: &'static str,
        /// Its state.
        state: VmState,
    },
    /// A request is malformed or cannot be carried out as asked.
    #[error("{reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// The destination lacks CPU features the VM's CPU model has.
    #[error("cannot migrate {vm} to {host}: {host} lacks CPU features {missing} (its most capable CPU model is {ceiling})")]
    CpuIncompatible {
        /// The VM name.
        vm: String,
        /// This host.
        host: String,
        /// The host's CPU ceiling model.
        ceiling: String,
        /// The missing features, comma-separated.
        missing: String,
    },
    /// No migration with that id.
    #[error("no migration `{id}` on this agent")]
    MigrationNotFound {
        /// The id.
        id: String,
    },
    /// The VM is already being migrated.
    #[error("VM `{vm}` is already being migrated ({id})")]
    MigrationInProgress {
        /// The VM.
        vm: String,
        /// The running migration.
        id: String,
    },
    /// Cancel after switchover.
    #[error("cannot cancel migration {id} of `{vm}`: it is past its switchover ({phase:?}); {why}")]
    NotCancellable {
        /// The id.
        id: String,
        /// The VM.
        vm: String,
        /// Its phase.
        phase: walkabout_migrate::Phase,
        /// Why it cannot be undone (post-copy paused, or the VM belongs to the destination).
        why: String,
    },
    /// QEMU failed for this VM.
    #[error("VM `{vm}`: {source}")]
    Qemu {
        /// The VM name.
        vm: String,
        /// What failed.
        source: QemuError,
    },
    /// No checkpoint with that id on this agent.
    #[error("no checkpoint `{id}` on this agent")]
    CheckpointNotFound {
        /// The id.
        id: String,
    },
    /// This agent holds no replica of that VM.
    #[error("this agent holds no replica of VM `{vm}`")]
    ReplicaNotFound {
        /// The VM.
        vm: String,
    },
    /// Taking, restoring or merging a checkpoint failed.
    #[error("checkpoint of VM `{vm}`: {reason}")]
    Checkpoint {
        /// The VM.
        vm: String,
        /// What failed, and QEMU's or the system's words for it.
        reason: String,
    },
    /// A checkpoint file is not what its checksum says (or is missing).
    #[error("checkpoint file `{file}` of VM `{vm}`: {reason}")]
    FileMismatch {
        /// The VM.
        vm: String,
        /// The file.
        file: String,
        /// What is wrong (expected and found checksums, a short file).
        reason: String,
    },
    /// A checkpoint file could not be read or written.
    #[error("checkpoint file {path}: {source}")]
    CheckpointIo {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No checkpoint of a replica passed verification.
    #[error("no usable checkpoint of VM `{vm}` on this agent: {why}")]
    NoUsableCheckpoint {
        /// The VM.
        vm: String,
        /// Each checkpoint passed over, and why.
        why: String,
    },
    /// Shipping a checkpoint to its replica failed.
    #[error("shipping checkpoint `{id}` to {to}: {reason}")]
    Ship {
        /// The checkpoint.
        id: String,
        /// The replica agent's URL.
        to: String,
        /// What failed.
        reason: String,
    },
    /// The agent's database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AgentError {
    /// The HTTP status this error is served with.
    pub fn http_status(&self) -> u16 {
        match self {
            AgentError::NotFound { .. }
            | AgentError::MigrationNotFound { .. }
            | AgentError::CheckpointNotFound { .. }
            | AgentError::ReplicaNotFound { .. } => 404,
            AgentError::Duplicate { .. }
            | AgentError::InvalidState { .. }
            | AgentError::InsufficientMemory { .. }
            | AgentError::CpuIncompatible { .. }
            | AgentError::MigrationInProgress { .. }
            | AgentError::NotCancellable { .. }
            | AgentError::NoUsableCheckpoint { .. } => 409,
            AgentError::InvalidSpec { .. } | AgentError::InvalidRequest { .. } | AgentError::FileMismatch { .. } => 422,
            AgentError::Qemu { .. } | AgentError::Store(_) | AgentError::Checkpoint { .. } | AgentError::CheckpointIo { .. } => 500,
            AgentError::Ship { .. } => 502,
        }
    }

    /// The machine-readable kind clients match on.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::NotFound { .. } => ErrorKind::NotFound,
            AgentError::Duplicate { .. } => ErrorKind::Duplicate,
            AgentError::InsufficientMemory { .. } => ErrorKind::InsufficientMemory,
            AgentError::InvalidSpec { .. } => ErrorKind::InvalidSpec,
            AgentError::InvalidState { .. } => ErrorKind::InvalidState,
            AgentError::InvalidRequest { .. } => ErrorKind::InvalidRequest,
            AgentError::CpuIncompatible { .. } => ErrorKind::CpuIncompatible,
            AgentError::MigrationNotFound { .. } => ErrorKind::MigrationNotFound,
            AgentError::MigrationInProgress { .. } => ErrorKind::MigrationInProgress,
            AgentError::NotCancellable { .. } => ErrorKind::NotCancellable,
            AgentError::Qemu { .. } => ErrorKind::Qemu,
            AgentError::Store(_) => ErrorKind::Store,
            AgentError::CheckpointNotFound { .. } | AgentError::ReplicaNotFound { .. } => ErrorKind::NotFound,
            AgentError::Checkpoint { .. } => ErrorKind::Qemu,
            AgentError::FileMismatch { .. } => ErrorKind::InvalidRequest,
            AgentError::CheckpointIo { .. } => ErrorKind::Other,
            AgentError::NoUsableCheckpoint { .. } => ErrorKind::Conflict,
            AgentError::Ship { .. } => ErrorKind::Agent,
        }
    }

    /// The error as served.
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.kind(), self.to_string())
    }

    pub(crate) fn qemu(vm: &str) -> impl FnOnce(QemuError) -> AgentError + '_ {
        move |source| AgentError::Qemu { vm: vm.to_string(), source }
    }
}
