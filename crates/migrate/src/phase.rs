//! The phases of a migration and the one place their transitions are decided.
//!
//! ```text
//! Pending -> Preparing -> Running -> Switchover -> Completed
//!    \           \           \            \
//!     +-----------+-----------+-> Failed    +-> Failed (post-copy only: the VM is lost)
//!     +-----------+-----------+-> Cancelled
//! ```
//!
//! Before `Switchover` the source still owns the VM: a failure or a cancel leaves it
//! running there. `Switchover` starts when the source's vCPUs stop for the last time
//! (pre-copy's final copy) or when post-copy starts; from then on cancel is refused.

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted, nothing done yet.
    Pending,
    /// Checking the destination and preparing its QEMU.
    Preparing,
    /// Memory is being copied while the VM runs on the source.
    Running,
    /// The VM is switching over to the destination (or runs there in post-copy).
    Switchover,
    /// The VM runs on the destination; the source copy is gone.
    Completed,
    /// The migration failed; see the reason. Before switchover the VM runs on the source.
    Failed,
    /// Cancelled before switchover; the VM runs on the source.
    Cancelled,
}

impl Phase {
    /// True once nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }

    /// True while a cancel can still return the VM to its source.
    pub fn cancellable(self) -> bool {
        matches!(self, Phase::Pending | Phase::Preparing | Phase::Running)
    }

    /// Whether `self -> next` is a legal transition.
    pub fn can_become(self, next: Phase) -> bool {
        use Phase::*;
        match (self, next) {
            (a, b) if a == b => true,
            (Pending, Preparing) | (Preparing, Running) | (Running, Switchover) | (Switchover, Completed) => true,
            (Pending | Preparing | Running, Cancelled) => true,
            (Pending | Preparing | Running | Switchover, Failed) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Phase::*;

    #[test]
    fn cancel_is_possible_only_before_switchover() {
        assert!(Running.cancellable());
        assert!(!Switchover.cancellable());
        assert!(!Completed.cancellable());
        assert!(Running.can_become(Cancelled));
        assert!(!Switchover.can_become(Cancelled));
    }

    #[test]
    fn final_phases_do_not_move() {
        for p in [Completed, Failed, Cancelled] {
            assert!(p.is_final());
            assert!(!p.can_become(Running));
        }
        assert!(!Completed.can_become(Failed));
    }
}
