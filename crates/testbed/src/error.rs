//! The testbed's one error type.

use std::path::PathBuf;

/// What went wrong while starting, waiting for or wiring up local processes.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A file or directory operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An external command (`ip`, `tc`) exited with an error.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it said on stderr (or how it could not be run).
        stderr: String,
    },
    /// The subnet a test network asked for is already routed through another device of
    /// this machine (often a leftover of a killed run): sharing it would misroute both.
    #[error(
        "subnet {subnet}.0/24 is already routed through {device} on this machine (a leftover of an earlier run? `ip link del {device}`)"
    )]
    SubnetTaken {
        /// The /24 asked for, as its first three octets.
        subnet: String,
        /// The device that routes it now.
        device: String,
    },
    /// A daemon did not announce its URL: it exited first, or took too long.
    #[error("{what} did not write its URL to {}: {why}; last lines of {}:\n{log}", file.display(), log_file.display())]
    NoUrl {
        /// Which daemon (`agent h1`, `controller`).
        what: String,
        /// Why not: `exited (exit status: 2)`, `nothing after 60 s`.
        why: String,
        /// The URL file it should have written.
        file: PathBuf,
        /// Its log file.
        log_file: PathBuf,
        /// The tail of its log.
        log: String,
    },
    /// A daemon was asked for something while not running.
    #[error("{what} is not running")]
    NotRunning {
        /// Which daemon.
        what: String,
    },
    /// No block of free loopback ports was found.
    #[error("no {count} consecutive free loopback ports found")]
    NoFreePorts {
        /// How many ports were wanted.
        count: u16,
    },
    /// A host that is not there was named.
    #[error("no host {host} in this {what}")]
    NoSuchHost {
        /// Its number (1-based).
        host: usize,
        /// Where it was looked for.
        what: &'static str,
    },
}

impl TestbedError {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> TestbedError {
        TestbedError::Io { what: what.into(), source }
    }
}

/// The testbed's result.
pub type Result<T> = std::result::Result<T, TestbedError>;
