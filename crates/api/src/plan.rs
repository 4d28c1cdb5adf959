//! Goals and plans: what the operator wants (drain, rebalance, consolidate, place), the
//! plan that gets there in waves of live migrations, and why a goal is impossible.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Version of [`PlanRecord`]'s stored layout.
pub const PLAN_VERSION: u32 = 1;

/// What the operator wants (`POST /v1/plans`, a dry run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "goal", rename_all = "snake_case")]
pub enum Goal {
    /// Move every VM off `host` (maintenance).
    Drain {
        /// The host.
        host: String,
    },
    /// Even out memory use across hosts in service.
    Rebalance,
    /// Run everything on as few hosts as possible.
    Consolidate,
    /// Move one VM to a host (what a drag-and-drop asks).
    Place {
        /// The VM.
        vm: String,
        /// Where it should run.
        host: String,
    },
}

impl Goal {
    /// The goal in a few words.
    pub fn describe(&self) -> String {
        match self {
            Goal::Drain { host } => format!("drain {host}"),
            Goal::Rebalance => "rebalance".into(),
            Goal::Consolidate => "consolidate".into(),
            Goal::Place { vm, host } => format!("move {vm} to {host}"),
        }
    }
}

/// Where a plan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    /// Planned, not executed (a dry run): review it, then execute or cancel it.
    Proposed,
    /// No plan reaches the goal; `blocked` says why per VM. Cannot be executed.
    Impossible,
    /// Being executed.
    Running,
    /// Every step done; the goal is reached.
    Completed,
    /// Ended with the goal not (fully) reached; `problems` names each VM and why.
    Failed,
    /// Cancelled by the operator.
    Cancelled,
}

impl PlanStatus {
    /// True once nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(self, PlanStatus::Impossible | PlanStatus::Completed | PlanStatus::Failed | PlanStatus::Cancelled)
    }
}

impl std::fmt::Display for PlanStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlanStatus::Proposed => "proposed",
            PlanStatus::Impossible => "impossible",
            PlanStatus::Running => "running",
            PlanStatus::Completed => "completed",
            PlanStatus::Failed => "failed",
            PlanStatus::Cancelled => "cancelled",
        })
    }
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// Its migration runs.
    Running,
    /// Done: the VM runs at `to`.
    Completed,
    /// Its migration failed (see `reason`); the plan was re-planned.
    Failed,
    /// Dropped by a re-plan before it started.
    Superseded,
    /// Dropped by a cancel before it started, or cancelled while running.
    Cancelled,
}

impl StepStatus {
    /// True once nothing more will happen to the step.
    pub fn is_final(self) -> bool {
        !matches!(self, StepStatus::Pending | StepStatus::Running)
    }
}

impl std::fmt::Display for StepStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
            StepStatus::Superseded => "superseded",
            StepStatus::Cancelled => "cancelled",
        })
    }
}

/// One live migration of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Step {
    /// The VM.
    pub vm: String,
    /// From host.
    pub from: String,
    /// To host.
    pub to: String,
    /// Wave (from 1) within its round; the waves of a round run one after the other.
    pub wave: u32,
    /// Round: 0 for the plan as proposed, N for its N-th re-plan.
    pub round: u32,
    /// Why the planner put it there.
    pub why: String,
    /// Where it is.
    pub status: StepStatus,
    /// Its migration (controller id), once started.
    #[serde(default)]
    pub migration: Option<String>,
    /// Why it failed or was dropped.
    #[serde(default)]
    pub reason: Option<String>,
    /// When its migration was ordered, ms since the epoch.
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// When its migration ended.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// The guest's pause at switchover, ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
}

/// A VM the plan could not take where the goal wanted it, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// The VM.
    pub vm: String,
    /// Why.
    pub reason: String,
}

/// One VM that cannot reach its target, as the planner proved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Blocked {
    /// The VM.
    pub vm: String,
    /// What it needs, e.g. "4096 MiB on h2".
    pub needs: String,
    /// Why it cannot have it.
    pub why: String,
}

/// A plan, as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlanRecord {
    /// Layout version.
    pub version: u32,
    /// Its id (`p1`...).
    pub id: String,
    /// The goal.
    pub goal: Goal,
    /// Where it is.
    pub status: PlanStatus,
    /// One sentence on how it ended (or why it is impossible).
    #[serde(default)]
    pub reason: Option<String>,
    /// Created, ms since the epoch.
    pub created_ms: u64,
    /// Execution started.
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// Ended.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Every step of every round, in order.
    pub steps: Vec<Step>,
    /// Where each VM the plan moves or pins should end (VMs it leaves alone are not
    /// listed: a whole cluster's placement in every plan record made 1,000-host
    /// clusters slow).
    #[serde(default)]
    pub target: BTreeMap<String, String>,
    /// Why no plan exists, per VM (status `impossible`).
    #[serde(default)]
    pub blocked: Vec<Blocked>,
    /// VMs the plan could not move as the goal wanted, each with why.
    #[serde(default)]
    pub problems: Vec<Problem>,
    /// Re-plans so far.
    #[serde(default)]
    pub round: u32,
    /// Failed migrations per VM.
    #[serde(default)]
    pub attempts: BTreeMap<String, u32>,
    /// VMs given up on (pinned where they are).
    #[serde(default)]
    pub gave_up: Vec<String>,
    /// No plan needs fewer migrations than this (round 0).
    #[serde(default)]
    pub lower_bound: u64,
    /// Round 0's migration count is proven minimal.
    #[serde(default)]
    pub optimal: bool,
}

impl PlanRecord {
    /// Steps of the current round not yet started.
    pub fn pending(&self) -> impl Iterator<Item = (usize, &Step)> {
        self.steps.iter().enumerate().filter(move |(_, s)| s.status == StepStatus::Pending && s.round == self.round)
    }

    /// Steps whose migration runs.
    pub fn running(&self) -> impl Iterator<Item = (usize, &Step)> {
        self.steps.iter().enumerate().filter(|(_, s)| s.status == StepStatus::Running)
    }
}
