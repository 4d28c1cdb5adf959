//! Walkabout's placement model and migration path planner: pure computation, no I/O.
//! The exact searches are bounded by counts of states (so results do not depend on the
//! machine), with a monotonic-clock cap as a safety net ([`Options::time_limit`]).
//!
//! Give [`plan`] a [`Case`] (hosts, VMs, where they are, where they should be) and get
//! an [`Outcome`]: an ordered plan of live migrations grouped into parallel waves that
//! never overfills a host (a migrating VM holds memory on both ends for its whole
//! wave), with temporary moves where a cycle needs them; or a per-VM explanation of why
//! no plan exists. Small cases are solved exactly (A* with an admissible bound), large
//! ones by a fast greedy planner with a reported lower bound, whose deadlocks are
//! repaired by exact search on the stuck hosts. [`tight_case`] generates the hard,
//! nearly full clusters the tests and the bench use. The [`policy`] module
//! turns goals (drain a host, consolidate, balance) into targets for the same planner.

mod error;
mod explain;
mod fxhash;
mod heuristic;
mod model;
mod output;
mod planner;
pub mod policy;
mod problem;
mod repair;
mod search;
pub mod tight;
mod validate;
mod waves;

pub use error::InputError;
pub use model::{Case, Group, GroupKind, Host, Limits, Vm};
pub use output::{Blocked, Impossible, Migration, Outcome, Plan};
pub use planner::{plan, plan_with, Options};
pub use tight::{tight_case, TightCase, TightKind};
pub use validate::MAX_AMOUNT;
