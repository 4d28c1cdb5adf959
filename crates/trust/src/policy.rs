//! Who may call what: one function, [`decide`], for both servers.
//!
//! - Without a verified identity: 401, except `POST /v1/join` on the controller with a
//!   join token (checked by its handler).
//! - A viewer may only read (`GET`, `HEAD`).
//! - An operator and the controller may do everything.
//! - A host (an agent's certificate) may only use the routes agents use between
//!   themselves: on an agent, `/v1/incoming...`, `/v1/replicas...` (checkpoints shipped
//!   to a replica) but not `POST /v1/replicas/{vm}/forward` (which makes the agent send
//!   a VM's memory to a URL of the caller's choosing: the controller's and operators'
//!   only), and reading `/v1/host`; nothing on the controller.
//!
//! Plain HTTP on loopback (asked for with `--insecure-loopback`) bypasses this: it is
//! for tests and a single machine.

use crate::identity::{Identity, Role};

/// Which server is deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// An agent.
    Agent,
    /// The controller.
    Controller,
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// A request that needs a join token in `Authorization: Bearer` (the handler checks it).
    JoinToken,
    /// 401: no valid client certificate.
    Unauthenticated(String),
    /// 403: the identity's role does not allow this.
    Forbidden(String),
}

/// The path of the controller's join route (token-authenticated).
pub const JOIN_PATH: &str = "/v1/join";

fn reads(method: &str) -> bool {
    matches!(method, "GET" | "HEAD")
}

/// Whether `path` is a replica's forward route (`/v1/replicas/{vm}/forward`, or below
/// it), which no host certificate may call.
fn is_forward(path: &str) -> bool {
    path.strip_prefix("/v1/replicas/").is_some_and(|rest| rest.split('/').nth(1) == Some("forward"))
}

/// Whether a host certificate may call `method path` on an agent.
fn host_to_host(method: &str, path: &str) -> bool {
    path == "/v1/incoming"
        || path.starts_with("/v1/incoming/")
        || path == "/v1/replicas"
        || (path.starts_with("/v1/replicas/") && !is_forward(path))
        || (reads(method) && matches!(path, "/v1/host" | "/v1/host/cpu"))
}

/// Whether `method path` on an agent is a checkpoint file upload, whose body is
/// streamed to its handler rather than held in memory (and may exceed the 1 MiB limit
/// of every other request, up to [`MAX_FILE_BODY`]).
pub fn is_file_upload(method: &str, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v1/replicas/") else { return false };
    let mut parts = rest.split('/');
    method == "PUT"
        && matches!((parts.next(), parts.next(), parts.next(), parts.next()), (Some(vm), Some("files"), Some(f), None) if !vm.is_empty() && !f.is_empty())
}

/// The largest checkpoint file upload body (a memory image or a disk layer).
pub const MAX_FILE_BODY: u64 = 256 << 30;

/// Decides whether `who` may call `method path` on `server`.
pub fn decide(server: ServerKind, who: Option<&Identity>, method: &str, path: &str) -> Decision {
    let Some(id) = who else {
        if server == ServerKind::Controller && method == "POST" && path == JOIN_PATH {
            return Decision::JoinToken;
        }
        return Decision::Unauthenticated(format!(
            "{method} {path} needs a client certificate signed by the cluster CA (walkabout user add, --identity)"
        ));
    };
    match id.role {
        Role::Operator | Role::Controller => Decision::Allow,
        Role::Viewer if reads(method) => Decision::Allow,
        Role::Viewer => Decision::Forbidden(format!("{id} may only read; {method} {path} changes something")),
        Role::Host if server == ServerKind::Agent && host_to_host(method, path) => Decision::Allow,
        Role::Host => Decision::Forbidden(format!("{id} is a host certificate; {method} {path} is not a host-to-host route")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: Role) -> Identity {
        Identity { name: "x".into(), role }
    }

    #[test]
    fn nobody_is_refused_everywhere_but_the_join() {
        assert!(matches!(decide(ServerKind::Agent, None, "GET", "/v1/vms"), Decision::Unauthenticated(_)));
        assert!(matches!(decide(ServerKind::Agent, None, "POST", "/v1/join"), Decision::Unauthenticated(_)));
        assert_eq!(decide(ServerKind::Controller, None, "POST", "/v1/join"), Decision::JoinToken);
    }

    #[test]
    fn a_viewer_reads_and_changes_nothing() {
        assert_eq!(decide(ServerKind::Controller, Some(&id(Role::Viewer)), "GET", "/v1/hosts"), Decision::Allow);
        assert!(matches!(decide(ServerKind::Controller, Some(&id(Role::Viewer)), "POST", "/v1/plans"), Decision::Forbidden(_)));
        assert!(matches!(decide(ServerKind::Agent, Some(&id(Role::Viewer)), "DELETE", "/v1/vms/a"), Decision::Forbidden(_)));
    }

    #[test]
    fn a_host_only_uses_host_to_host_routes() {
        let h = id(Role::Host);
        assert_eq!(decide(ServerKind::Agent, Some(&h), "POST", "/v1/incoming"), Decision::Allow);
        assert_eq!(decide(ServerKind::Agent, Some(&h), "POST", "/v1/incoming/vm1/commit"), Decision::Allow);
        assert!(matches!(decide(ServerKind::Agent, Some(&h), "POST", "/v1/migrations"), Decision::Forbidden(_)));
        assert!(matches!(decide(ServerKind::Agent, Some(&h), "GET", "/v1/vms"), Decision::Forbidden(_)));
        assert!(matches!(decide(ServerKind::Controller, Some(&h), "GET", "/v1/hosts"), Decision::Forbidden(_)));
    }

    #[test]
    fn a_host_ships_checkpoints_to_a_replica_and_nothing_else_of_checkpoints() {
        let h = id(Role::Host);
        for (m, p) in [
            ("GET", "/v1/replicas/vm1"),
            ("PUT", "/v1/replicas/vm1/files/vm1.2.mem"),
            ("POST", "/v1/replicas/vm1/checkpoints"),
            ("POST", "/v1/replicas/vm1/restore"),
            ("DELETE", "/v1/replicas/vm1"),
            ("GET", "/v1/replicas"),
        ] {
            assert_eq!(decide(ServerKind::Agent, Some(&h), m, p), Decision::Allow, "{m} {p}");
        }
        assert!(matches!(decide(ServerKind::Agent, Some(&h), "POST", "/v1/vms/vm1/checkpoint"), Decision::Forbidden(_)));
        // Forwarding sends a VM's memory where the caller says: not for a host.
        for p in ["/v1/replicas/vm1/forward", "/v1/replicas/vm1/forward/", "/v1/replicas/forward/forward"] {
            assert!(matches!(decide(ServerKind::Agent, Some(&h), "POST", p), Decision::Forbidden(_)), "{p}");
        }
        for r in [Role::Controller, Role::Operator] {
            assert_eq!(decide(ServerKind::Agent, Some(&id(r)), "POST", "/v1/replicas/vm1/forward"), Decision::Allow);
        }
        assert!(matches!(decide(ServerKind::Agent, Some(&id(Role::Viewer)), "POST", "/v1/replicas/vm1/forward"), Decision::Forbidden(_)));
        assert!(matches!(decide(ServerKind::Agent, Some(&h), "PUT", "/v1/vms/vm1/protection"), Decision::Forbidden(_)));
        assert!(matches!(decide(ServerKind::Controller, Some(&h), "GET", "/v1/replicas"), Decision::Forbidden(_)));
    }

    #[test]
    fn only_the_replica_file_route_is_an_upload() {
        assert!(is_file_upload("PUT", "/v1/replicas/vm1/files/vm1.1.mem"));
        assert!(!is_file_upload("POST", "/v1/replicas/vm1/files/vm1.1.mem"));
        assert!(!is_file_upload("PUT", "/v1/replicas/vm1/files/"));
        assert!(!is_file_upload("PUT", "/v1/replicas/vm1/files/a/b"));
        assert!(!is_file_upload("POST", "/v1/vms"));
    }

    #[test]
    fn only_operators_and_the_controller_answer_a_guest_free_will_or_move_a_detective() {
        let answer = "/v1/vms/x/will/answer";
        assert_eq!(decide(ServerKind::Agent, Some(&id(Role::Controller)), "POST", answer), Decision::Allow);
        assert_eq!(decide(ServerKind::Agent, Some(&id(Role::Viewer)), "GET", "/v1/will"), Decision::Allow);
        assert!(matches!(decide(ServerKind::Agent, Some(&id(Role::Viewer)), "POST", answer), Decision::Forbidden(_)));
        assert!(matches!(decide(ServerKind::Agent, Some(&id(Role::Host)), "POST", answer), Decision::Forbidden(_)));
        assert!(matches!(decide(ServerKind::Agent, Some(&id(Role::Host)), "GET", "/v1/will"), Decision::Forbidden(_)));
        assert_eq!(decide(ServerKind::Controller, Some(&id(Role::Operator)), "POST", "/v1/games/w1/move"), Decision::Allow);
        assert!(matches!(
            decide(ServerKind::Controller, Some(&id(Role::Viewer)), "POST", "/v1/games/scotland-yard"),
            Decision::Forbidden(_)
        ));
    }

    #[test]
    fn operators_and_the_controller_change_things() {
        assert_eq!(decide(ServerKind::Agent, Some(&id(Role::Operator)), "POST", "/v1/migrations"), Decision::Allow);
        assert_eq!(decide(ServerKind::Agent, Some(&id(Role::Controller)), "POST", "/v1/migrations"), Decision::Allow);
    }
}
