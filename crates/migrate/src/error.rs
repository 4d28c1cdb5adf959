//! Errors of a migration, each saying what failed and where.

use walkabout_qemu::QmpError;

/// Errors while running a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A QMP command failed on one side.
    #[error("{side} QEMU: {source}")]
    Qmp {
        /// `source` or `destination`.
        side: &'static str,
        /// The QMP error.
        source: QmpError,
    },
    /// QEMU reported the migration failed.
    #[error("QEMU reports the migration failed: {0}")]
    Failed(String),
    /// A paused post-copy could not listen again (not paused, or QEMU refused).
    #[error("destination QEMU's post-copy could not listen again: {0}")]
    NotPaused(String),
    /// The destination did not say where to connect.
    #[error("destination QEMU did not report its listening address: {0}")]
    NoIncomingAddress(String),
}

impl MigrateError {
    pub(crate) fn source(e: QmpError) -> MigrateError {
        MigrateError::Qmp { side: "source", source: e }
    }
    pub(crate) fn destination(e: QmpError) -> MigrateError {
        MigrateError::Qmp { side: "destination", source: e }
    }
}
