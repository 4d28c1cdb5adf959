//! Goals become plans: the cluster view is turned into the planner's [`Case`], a
//! [`Goal`] into a target placement (through `walkabout-plan`'s policies), and the
//! planner's answer into a [`PlanRecord`] of steps in waves, each with its reason — or
//! a refusal naming every VM that cannot go anywhere, and why.
//!
//! Rules the case encodes:
//! - hosts that are down are not in the case; VMs on a down host are
//!   reported (they cannot be migrated) and left out;
//! - `drain HOST` empties HOST and keeps every host already draining or drained empty,
//!   so a drain never picks a host that is itself draining or down;
//! - rebalance and consolidate rearrange only hosts in service; VMs on draining hosts
//!   stay for their drain;
//! - VMs a running plan gave up on (retries exhausted) are pinned where they are;
//! - a plan starts from the view as it will be once the migrations under way land
//!   ([`project`]): a VM leaving a host needs no step off it, one on its way in is there.

use crate::cluster::{HostStatus, View};
use crate::error::ControllerError;
use crate::execute::Migration;
use std::collections::BTreeMap;
use walkabout_plan::policy::{target_for, Policy};
use walkabout_plan::{Case, Limits, Outcome};

pub use walkabout_api::plan::PLAN_VERSION;
pub use walkabout_api::{Blocked, Goal, PlanRecord, PlanStatus, Problem, Step, StepStatus};

/// The planner's per-VM proof that a goal is impossible, as the API reports it.
fn wire(blocked: Vec<walkabout_plan::Blocked>) -> Vec<Blocked> {
    blocked.into_iter().map(|b| Blocked { vm: b.vm, needs: b.needs, why: b.why }).collect()
}

/// The planner's case for the cluster as it is, and the VMs left out of it (on hosts
/// that are down) with why.
pub fn case_of(view: &View, max_parallel_per_host: u32) -> (Case, Vec<Problem>) {
    let mut case = Case { limits: Some(Limits { max_parallel_per_host: max_parallel_per_host.max(1) }), ..Case::default() };
    let mut left_out = vec![];
    for h in view.hosts.values() {
        if h.status == HostStatus::Up {
            case.hosts.push(walkabout_plan::Host {
                name: h.name.clone(),
                memory_mib: h.capacity_mib,
                vcpus: None,
                arch: None,
                guest_archs: None,
                cpu_features: vec![],
                reserved_mib: 0,
            });
        }
    }
    for v in view.vms.values() {
        let Some(host) = v.host.as_deref() else { continue };
        let h = &view.hosts.get(host);
        if h.is_some_and(|h| h.status != HostStatus::Up) {
            let reason = h
                .map(|h| format!("{} is on {host}, which is down ({})", v.name, h.down_reason.as_deref().unwrap_or("not answering")))
                .unwrap_or_default();
            left_out.push(Problem { vm: v.name.clone(), reason });
            continue;
        }
        if !v.is_active() || !case.hosts.iter().any(|h| h.name == host) {
            continue;
        }
        case.vms.push(walkabout_plan::Vm { name: v.name.clone(), memory_mib: v.memory_mib, vcpus: None, arch: None, cpu_features: vec![] });
        case.current.insert(v.name.clone(), host.to_string());
    }
    (case, left_out)
}

/// The view as it will be once the migrations `in_flight` land: each VM they move
/// placed at its destination. A migration that fails leaves its VM where it was, and the
/// plan made from this projection notices when its step finds the VM elsewhere.
pub fn project(view: &View, in_flight: &[Migration]) -> View {
    let mut v = view.clone();
    for m in in_flight.iter().filter(|m| !m.phase.is_final()) {
        if let Some(vm) = v.vms.get_mut(&m.vm) {
            vm.host = Some(m.to.clone());
        }
    }
    v
}

/// What planning a goal gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// Steps (round-local waves), the target, the lower bound and whether optimal.
    Steps {
        /// The steps.
        steps: Vec<Step>,
        /// The target.
        target: BTreeMap<String, String>,
        /// Lower bound on the number of migrations.
        lower_bound: u64,
        /// Proven minimal.
        optimal: bool,
    },
    /// No plan: the reason and the blocked VMs.
    Impossible {
        /// One sentence.
        reason: String,
        /// Per VM.
        blocked: Vec<Blocked>,
    },
}

/// Plans `goal` on `case` (from [`case_of`]), keeping `pinned` VMs where they are.
pub fn plan_goal(view: &View, case: &Case, goal: &Goal, pinned: &[String], round: u32) -> Result<Planned, ControllerError> {
    let invalid = |e: walkabout_plan::InputError| ControllerError::Invalid(format!("cannot plan {}: {e}", goal.describe()));
    let in_case = |h: &str| case.hosts.iter().any(|x| x.name == h);
    let target = match goal {
        Goal::Drain { host } => {
            if !view.hosts.contains_key(host) {
                return Err(ControllerError::not_found("host", host));
            }
            if !in_case(host) {
                return Err(ControllerError::Conflict(format!("cannot drain {host}: it is down, so its VMs cannot be migrated")));
            }
            let mut hosts: Vec<String> = vec![host.clone()];
            for h in view.hosts.values() {
                if in_case(&h.name) && &h.name != host && !h.maintenance.accepts_vms() {
                    hosts.push(h.name.clone());
                }
            }
            let mut c = case.clone();
            pin(&mut c, pinned, &hosts);
            match target_for(&c, &Policy::Drain { hosts: hosts.clone() }).map_err(invalid)? {
                Ok(t) => t,
                Err(blocked) => {
                    return Ok(Planned::Impossible {
                        reason: format!("cannot drain {host}: not enough room for its VMs elsewhere"),
                        blocked: wire(blocked),
                    })
                }
            }
        }
        Goal::Rebalance | Goal::Consolidate => {
            let in_service: Vec<String> =
                view.hosts.values().filter(|h| in_case(&h.name) && h.maintenance.accepts_vms()).map(|h| h.name.clone()).collect();
            let mut sub = case.clone();
            sub.hosts.retain(|h| in_service.contains(&h.name));
            let movable: Vec<String> =
                sub.current.iter().filter(|(vm, h)| in_service.contains(h) && !pinned.contains(vm)).map(|(vm, _)| vm.clone()).collect();
            sub.vms.retain(|v| movable.contains(&v.name));
            sub.current.retain(|vm, _| movable.contains(vm));
            // Pinned VMs take their room on their hosts.
            for h in sub.hosts.iter_mut() {
                h.reserved_mib += case
                    .vms
                    .iter()
                    .filter(|v| pinned.contains(&v.name) && case.current.get(&v.name) == Some(&h.name))
                    .map(|v| v.memory_mib)
                    .sum::<u64>();
            }
            let policy = if *goal == Goal::Rebalance { Policy::Balance } else { Policy::Consolidate };
            let mut t = match target_for(&sub, &policy).map_err(invalid)? {
                Ok(t) => t,
                Err(blocked) => return Ok(Planned::Impossible { reason: format!("cannot {}", goal.describe()), blocked: wire(blocked) }),
            };
            for (vm, h) in &case.current {
                t.entry(vm.clone()).or_insert_with(|| h.clone());
            }
            t
        }
        Goal::Place { vm, host } => {
            let Some(from) = case.current.get(vm) else {
                return match view.vms.get(vm) {
                    None => Err(ControllerError::not_found("VM", vm)),
                    Some(v) => Err(ControllerError::Conflict(format!(
                        "cannot move {vm}: it is {} on {}",
                        v.state,
                        v.host.as_deref().unwrap_or("no host")
                    ))),
                };
            };
            let h = view.hosts.get(host).ok_or_else(|| ControllerError::not_found("host", host))?;
            if !h.accepts_vms() {
                return Err(ControllerError::Conflict(format!(
                    "cannot move {vm} to {host}: {host} takes no VMs (it is {})",
                    if h.status != HostStatus::Up { "down".to_string() } else { format!("{:?}", h.maintenance).to_lowercase() }
                )));
            }
            if from == host {
                return Err(ControllerError::Conflict(format!("{vm} already runs on {host}")));
            }
            let mut t = case.current.clone();
            t.insert(vm.clone(), host.clone());
            t
        }
    };
    let mut target = target;
    for p in pinned {
        if let Some(h) = case.current.get(p) {
            target.insert(p.clone(), h.clone());
        }
    }
    let mut with_target = case.clone();
    with_target.target = target.clone();
    match walkabout_plan::plan(&with_target).map_err(|e| match e {
        walkabout_plan::InputError::Overfilled { ref host, needs, usable, .. } => ControllerError::Conflict(format!(
            "cannot {}: the goal would put {needs} MiB on {host}, which holds {usable} MiB",
            goal.describe()
        )),
        e => invalid(e),
    })? {
        Outcome::Ok(p) => Ok(Planned::Steps {
            steps: p
                .migrations
                .into_iter()
                .map(|m| Step {
                    vm: m.vm,
                    from: m.from,
                    to: m.to,
                    wave: m.wave,
                    round,
                    why: m.why,
                    status: StepStatus::Pending,
                    migration: None,
                    reason: None,
                    started_ms: None,
                    finished_ms: None,
                    downtime_ms: None,
                })
                .collect(),
            target,
            lower_bound: p.lower_bound as u64,
            optimal: p.optimal,
        }),
        Outcome::Impossible(i) | Outcome::Unsolved(i) => Ok(Planned::Impossible { reason: i.reason, blocked: wire(i.blocked) }),
    }
}

/// Pinned VMs on hosts being drained stay there: take them out of the case, and the
/// room they hold with them, so the drain policy does not try to move them.
fn pin(case: &mut Case, pinned: &[String], _drained: &[String]) {
    for p in pinned {
        let Some(h) = case.current.remove(p) else { continue };
        let mem = case.vms.iter().find(|v| &v.name == p).map(|v| v.memory_mib).unwrap_or(0);
        case.vms.retain(|v| &v.name != p);
        if let Some(host) = case.hosts.iter_mut().find(|x| x.name == h) {
            host.reserved_mib += mem;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ClusterVm as Vm, Host, Maintenance};

    pub(crate) fn view(hosts: &[(&str, u64, Maintenance, HostStatus)], vms: &[(&str, u64, &str)]) -> View {
        let mut v = View::default();
        for (name, cap, m, st) in hosts {
            let h: Host = serde_json::from_value(serde_json::json!({
                "version": 1, "name": name, "url": format!("http://{name}"), "status": st, "status_since_ms": 0,
                "maintenance": m, "capacity_mib": cap, "free_mib": cap,
            }))
            .expect("host");
            v.hosts.insert(name.to_string(), h);
        }
        for (name, mem, host) in vms {
            let vm: Vm = serde_json::from_value(serde_json::json!({
                "version": 1, "name": name, "host": host, "memory_mib": mem, "vcpus": 1, "workload": "idle", "state": "running",
            }))
            .expect("vm");
            v.vms.insert(name.to_string(), vm);
        }
        v
    }

    use HostStatus::{Down, Up};
    use Maintenance::{Active, Draining};

    #[test]
    fn drain_never_picks_a_host_that_is_draining_or_down() {
        let v = view(
            &[("h1", 1024, Active, Up), ("h2", 1024, Draining, Up), ("h3", 1024, Active, Down), ("h4", 1024, Active, Up)],
            &[("a", 256, "h1"), ("b", 256, "h1")],
        );
        let (case, _) = case_of(&v, 1);
        let Planned::Steps { steps, .. } = plan_goal(&v, &case, &Goal::Drain { host: "h1".into() }, &[], 0).expect("plans") else {
            panic!("drain should be possible")
        };
        assert!(steps.iter().all(|s| s.to == "h4"), "{steps:?}");
        assert_eq!(steps.len(), 2);
    }

    #[test]
    fn impossible_drain_names_each_vm_and_why() {
        let v = view(&[("h1", 1024, Active, Up), ("h2", 300, Active, Up)], &[("a", 256, "h1"), ("b", 256, "h1")]);
        let (case, _) = case_of(&v, 1);
        let Planned::Impossible { blocked, .. } = plan_goal(&v, &case, &Goal::Drain { host: "h1".into() }, &[], 0).expect("plans") else {
            panic!("drain should be impossible")
        };
        assert_eq!(blocked.len(), 1, "{blocked:?}");
        assert!(!blocked[0].why.is_empty());
    }

    #[test]
    fn vms_on_a_down_host_are_reported_not_planned() {
        let v = view(&[("h1", 1024, Active, Down), ("h2", 1024, Active, Up)], &[("a", 256, "h1")]);
        let (case, left_out) = case_of(&v, 1);
        assert!(case.vms.is_empty());
        assert_eq!(left_out.len(), 1);
        assert!(left_out[0].reason.contains("down"), "{left_out:?}");
    }

    #[test]
    fn a_pinned_vm_stays_on_the_drained_host() {
        let v = view(&[("h1", 1024, Active, Up), ("h2", 1024, Active, Up)], &[("a", 256, "h1"), ("b", 256, "h1")]);
        let (case, _) = case_of(&v, 1);
        let Planned::Steps { steps, target, .. } =
            plan_goal(&v, &case, &Goal::Drain { host: "h1".into() }, &["a".to_string()], 1).expect("plans")
        else {
            panic!("plan")
        };
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].vm, "b");
        assert_eq!(target.get("a").map(String::as_str), Some("h1"));
    }

    #[test]
    fn place_refuses_a_draining_host() {
        let v = view(&[("h1", 1024, Active, Up), ("h2", 1024, Draining, Up)], &[("a", 256, "h1")]);
        let (case, _) = case_of(&v, 1);
        let e = plan_goal(&v, &case, &Goal::Place { vm: "a".into(), host: "h2".into() }, &[], 0).expect_err("refused");
        assert!(e.to_string().contains("draining"), "{e}");
    }
}
