//! Who changed what on this agent. Every change a caller made through the API (any
//! method but GET and HEAD, once the trust policy let it through) is logged with the
//! caller's identity, its certificate's name and role, the method, the path and the
//! status it got (at `info`, target `walkabout_agent::audit`), and the last [`KEPT`]
//! are kept in memory for `GET /v1/audit`, as events of subject `audit` shaped like
//! the controller's (whose event log records the changes made through it). The
//! changes an operator makes on an agent directly, or another host's agent makes as a
//! migration's peer, are seen here. The list starts empty when the agent starts; the
//! log keeps them all.

use std::collections::VecDeque;
use std::sync::Mutex;
use walkabout_api::event::EVENT_VERSION;
use walkabout_api::{Event, Subject};
use walkabout_trust::Identity;

/// How many changes `GET /v1/audit` shows, the latest last.
pub const KEPT: usize = 256;

/// The agent's recent changes, with who made them.
#[derive(Debug, Default)]
pub struct AuditLog {
    /// The number of the last change, and the changes kept.
    kept: Mutex<(u64, VecDeque<Event>)>,
}

impl AuditLog {
    /// Records that `who` asked `method path` and got `status`.
    pub fn record(&self, who: &Identity, method: &str, path: &str, status: u16) {
        let role = who.role.as_str();
        tracing::info!(target: "walkabout_agent::audit", who = %who.name, role, method, path, status, "change by {who}");
        let mut kept = crate::vms::lock(&self.kept);
        kept.0 += 1;
        let event = Event {
            version: EVENT_VERSION,
            seq: kept.0,
            at_ms: crate::vms::now_ms(),
            subject: Subject::Audit,
            name: who.name.clone(),
            message: format!("{who}: {method} {path} -> {status}"),
            data: serde_json::json!({"who": who.name, "role": role, "method": method, "path": path, "status": status}),
        };
        if kept.1.len() == KEPT {
            kept.1.pop_front();
        }
        kept.1.push_back(event);
    }

    /// The changes kept, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        crate::vms::lock(&self.kept).1.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walkabout_trust::Role;

    #[test]
    fn a_change_is_kept_with_who_made_it_and_only_the_latest_are_kept() {
        let log = AuditLog::default();
        let alice = Identity { name: "alice".into(), role: Role::Operator };
        for i in 0..KEPT + 3 {
            log.record(&alice, "DELETE", &format!("/v1/vms/vm{i}"), 204);
        }
        let kept = log.recent();
        let last = kept.last().expect("a change");

        assert_eq!(kept.len(), KEPT);
        assert_eq!((kept[0].seq, last.seq), (4, KEPT as u64 + 3));
        assert_eq!((last.subject, last.name.as_str()), (Subject::Audit, "alice"));
        assert_eq!(last.message, format!("alice (operator): DELETE /v1/vms/vm{} -> 204", KEPT + 2));
        assert_eq!(last.data["role"], "operator");
    }
}
