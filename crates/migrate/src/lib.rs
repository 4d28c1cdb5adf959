//! Live migration, steered: measure the guest's dirty rate and the link, pick a strategy
//! that finishes within the operator's downtime and time budget, watch QEMU's every pass
//! and adapt (post-copy on a stall), and report progress.
//!
//! This crate drives QEMU over QMP on one host pair; which hosts and when is the agent's
//! and the controller's business.

pub mod error;
pub mod phase;
pub mod policy;
pub mod progress;
mod qmp;
pub mod run;

pub use error::MigrateError;
pub use phase::Phase;
pub use policy::{Compression, HostFacts, Limits, Mode, Policy, Strategy, Switch, Tuning};
pub use progress::Progress;
pub use qmp::MigrationQmp;
pub use run::{Outcome, Stream};
