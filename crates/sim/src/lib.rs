//! A simulator of large clusters: the real controller (its plans, limits, retries,
//! re-plans and host-failure decisions) against in-process simulated agents, in
//! simulated time, with migration times from a pre-copy cost model fitted to
//! `bench/migrate`'s results.

pub mod agents;
pub mod cost;
pub mod day;
pub mod plot;
pub mod rolling;
pub mod scenario;

pub use cost::CostModel;
pub use day::{run_day, DayConfig, DayReport};
pub use scenario::{run, Report, Scenario, SimConfig};
