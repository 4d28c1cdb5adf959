//! Errors of this crate: one enum for QMP, one for the QEMU process and its binary.

use std::path::PathBuf;

/// Errors while talking to QEMU over QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Could not connect to the QMP socket.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// QEMU refused a command, with QEMU's own error class and text.
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Refused {
        /// The command QEMU refused.
        command: String,
        /// QEMU's error class (e.g. `GenericError`, `DeviceNotFound`).
        class: String,
        /// QEMU's description of the error.
        desc: String,
    },
    /// QEMU did not answer in time.
    #[error("QEMU did not answer `{command}` within {timeout_ms} ms")]
    Timeout {
        /// The command that timed out.
        command: String,
        /// The timeout.
        timeout_ms: u128,
    },
    /// The QMP connection closed (QEMU exited or the socket was closed).
    #[error("QMP connection closed while waiting for `{command}`")]
    Closed {
        /// The command in flight, or `greeting`.
        command: String,
    },
    /// QEMU sent something that is not valid QMP.
    #[error("QEMU sent malformed QMP ({context}): {detail}")]
    Protocol {
        /// What we were reading.
        context: String,
        /// What was wrong.
        detail: String,
    },
    /// An I/O error on the socket.
    #[error("QMP socket I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Errors about the QEMU binary and processes.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The QEMU binary was not found.
    #[error("QEMU binary `{binary}` not found: install QEMU >= 10 (scripts/setup-host.sh does) or pass its path")]
    Missing {
        /// The binary looked for.
        binary: String,
    },
    /// The QEMU binary is older than Walkabout supports.
    #[error("QEMU {found} at `{binary}` is too old: Walkabout needs QEMU >= {need} (QEMU 7.2 corrupted migrated guests under TCG in our measurements); install it from backports (scripts/setup-host.sh)")]
    TooOld {
        /// The binary.
        binary: String,
        /// The version it reported.
        found: String,
        /// The minimum major version.
        need: u32,
    },
    /// The QEMU binary's version output could not be understood.
    #[error("cannot tell the version of QEMU binary `{binary}`: it printed {output:?}")]
    UnknownVersion {
        /// The binary.
        binary: String,
        /// What it printed.
        output: String,
    },
    /// QEMU failed to start; carries what QEMU printed.
    #[error("QEMU for VM `{vm}` failed to start: {stderr}")]
    StartFailed {
        /// The VM name.
        vm: String,
        /// QEMU's standard error, trimmed.
        stderr: String,
    },
    /// A path is too long for a Unix socket.
    #[error("socket path {path} is {len} bytes; Unix sockets allow at most 107: use a shorter data directory")]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The accelerator was asked for but cannot be used.
    #[error("accelerator {accel} is not usable here: {reason}")]
    AccelUnusable {
        /// The accelerator.
        accel: String,
        /// Why.
        reason: String,
    },
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// An I/O error on a file of the VM.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl QemuError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        QemuError::Io { context: context.into(), source }
    }
}
