//! The planner's output format.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the planner concluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    /// A plan that never overfills a host.
    Ok(Plan),
    /// Proven: no order of migrations reaches the target.
    Impossible(Impossible),
    /// No plan was found, but it is not proven that none exists (a large case where the
    /// fast planner got stuck, or a small one whose exact search ran out of budget).
    Unsolved(Impossible),
}

/// A plan: migrations in order, grouped into waves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The migrations, in an order that is safe one at a time; `wave` groups them.
    pub migrations: Vec<Migration>,
    /// Number of migrations (temporary moves included).
    pub count: usize,
    /// Memory moved over all migrations.
    pub moved_mib: u64,
    /// Number of waves.
    pub waves: u32,
    /// No plan needs fewer migrations than this.
    pub lower_bound: usize,
    /// Whether `count` is proven minimal (`count == lower_bound`). Memory moved is
    /// minimised second, proven only where the exact search completed.
    pub optimal: bool,
    /// The target the plan reaches, when a policy made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<BTreeMap<String, String>>,
}

/// One live migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The VM.
    pub vm: String,
    /// Source host.
    pub from: String,
    /// Destination host.
    pub to: String,
    /// Wave, from 1; all migrations of a wave run at once.
    pub wave: u32,
    /// Why this migration is in the plan.
    pub why: String,
}

/// Why no plan exists (or none was found).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impossible {
    /// One sentence for the whole case.
    pub reason: String,
    /// The VMs that cannot reach their targets, each with what it needs and why.
    pub blocked: Vec<Blocked>,
    /// The target, when a policy made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<BTreeMap<String, String>>,
}

/// One VM that cannot reach its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// The VM.
    pub vm: String,
    /// What it needs, e.g. "4096 MiB on h2".
    pub needs: String,
    /// Why it cannot have it.
    pub why: String,
}
