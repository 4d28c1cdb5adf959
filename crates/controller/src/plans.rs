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
use walkabout_api::{ClusterVm, GroupRule, VmGroup};
use walkabout_plan::policy::{annotate, placement_for, Policy};
use walkabout_plan::{Case, Group, GroupKind, Limits, Outcome};

pub use walkabout_api::plan::PLAN_VERSION;
pub use walkabout_api::{Blocked, Goal, PlanRecord, PlanStatus, Problem, Step, StepStatus};

/// The planner's per-VM proof that a goal is impossible, as the API reports it.
fn wire(blocked: Vec<walkabout_plan::Blocked>) -> Vec<Blocked> {
    blocked.into_iter().map(|b| Blocked { vm: b.vm, needs: b.needs, why: b.why }).collect()
}

/// The planner's case for the cluster as it is, and the VMs left out of it (on hosts
/// that are down) with why.
///
/// The whole model goes in: memory; vCPUs (each host's CPUs times the view's
/// overcommit ratio, each VM's vCPUs); CPU features (each host's ceiling from its
/// agent's catalog, each VM's model as its host expands it, so a VM goes only where
/// its CPU runs); and the VMs' affinity and anti-affinity groups. CPU rules apply
/// once every host in the case has reported its catalog; until then (an agent still
/// probing its QEMU) the case says nothing of CPUs and the agents' own check before
/// any memory moves stays the guard.
pub fn case_of(view: &View, max_parallel_per_host: u32) -> (Case, Vec<Problem>) {
    let mut case = Case { limits: Some(Limits { max_parallel_per_host: max_parallel_per_host.max(1) }), ..Case::default() };
    let mut left_out = vec![];
    let up: Vec<&crate::cluster::Host> = view.hosts.values().filter(|h| h.status == HostStatus::Up).collect();
    let cpu_rules = !up.is_empty() && up.iter().all(|h| view.catalogs.contains_key(&h.name));
    for h in &up {
        let cpu_features = match view.catalogs.get(&h.name) {
            Some(c) if cpu_rules => c.ceiling_features.iter().cloned().collect(),
            _ => vec![],
        };
        case.hosts.push(walkabout_plan::Host {
            name: h.name.clone(),
            memory_mib: h.capacity_mib,
            vcpus: crate::cluster::vcpu_capacity(view.vcpu_overcommit, h.cpus),
            arch: None,
            guest_archs: None,
            cpu_features,
            reserved_mib: 0,
        });
    }
    let in_case: std::collections::BTreeSet<&str> = up.iter().map(|h| h.name.as_str()).collect();
    let mut groups: BTreeMap<&str, (GroupRule, Vec<String>)> = BTreeMap::new();
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
        if !v.is_active() || !in_case.contains(host) {
            continue;
        }
        let cpu_features = if cpu_rules { vm_features(view, v) } else { vec![] };
        case.vms.push(walkabout_plan::Vm {
            name: v.name.clone(),
            memory_mib: v.memory_mib,
            vcpus: Some(u64::from(v.vcpus)),
            arch: None,
            cpu_features,
        });
        case.current.insert(v.name.clone(), host.to_string());
        for g in &v.groups {
            // The first member's rule names the group's rule.
            groups.entry(g.name.as_str()).or_insert_with(|| (g.rule, vec![])).1.push(v.name.clone());
        }
    }
    case.groups = groups
        .into_iter()
        .map(|(name, (rule, vms))| Group {
            name: name.to_string(),
            kind: match rule {
                GroupRule::Affinity => GroupKind::Affinity,
                GroupRule::AntiAffinity => GroupKind::AntiAffinity,
            },
            vms,
        })
        .collect();
    (case, left_out)
}

/// The CPU features `vm`'s model uses: as its host expands the model, else as any host
/// that knows the model does; none for a model no host knows.
fn vm_features(view: &View, vm: &crate::cluster::ClusterVm) -> Vec<String> {
    let model = vm.cpu_model.as_deref().unwrap_or(walkabout_api::vm::DEFAULT_CPU_MODEL);
    let here = vm.host.as_deref().and_then(|h| view.catalogs.get(h)).and_then(|c| c.features_of(model));
    here.or_else(|| view.catalogs.values().find_map(|c| c.models.get(model))).map(|f| f.iter().cloned().collect()).unwrap_or_default()
}

/// Drops from the case's groups the VMs no longer in it, and groups left empty.
fn prune_groups(case: &mut Case) {
    let names: std::collections::HashSet<&str> = case.vms.iter().map(|v| v.name.as_str()).collect();
    for g in &mut case.groups {
        g.vms.retain(|v| names.contains(v.as_str()));
    }
    case.groups.retain(|g| !g.vms.is_empty());
}

/// Where a new VM should be created: `host` if given (refused, with the constraint, if
/// it cannot run the VM's CPU or breaks one of its groups), else the planner's choice
/// among the hosts in service: one that runs its CPU, has the memory and vCPUs, keeps
/// its anti-affinity groups apart and its affinity groups together.
pub fn place_new(view: &View, vm: &walkabout_api::VmSpec, groups: &[VmGroup], host: Option<&str>) -> Result<String, ControllerError> {
    let (mut case, _) = case_of(view, 1);
    let cpu_rules = case.hosts.iter().any(|h| !h.cpu_features.is_empty());
    let new = ClusterVm {
        version: crate::cluster::VIEW_VERSION,
        name: vm.name.clone(),
        host: None,
        memory_mib: vm.memory_mib,
        vcpus: vm.vcpus,
        workload: vm.workload.clone(),
        state: walkabout_api::ClusterVmState::Starting,
        reason: None,
        guest: Default::default(),
        seen_ms: 0,
        cpu_model: vm.cpu_model.clone(),
        groups: groups.to_vec(),
        nics: vm.nics.clone(),
        protection: None,
        protection_status: None,
    };
    let features = if cpu_rules { vm_features(view, &new) } else { vec![] };
    case.vms.retain(|v| v.name != vm.name);
    case.current.remove(&vm.name);
    case.vms.push(walkabout_plan::Vm {
        name: vm.name.clone(),
        memory_mib: vm.memory_mib,
        vcpus: Some(u64::from(vm.vcpus)),
        arch: None,
        cpu_features: features,
    });
    for g in groups {
        match case.groups.iter_mut().find(|x| x.name == g.name) {
            Some(x) => x.vms.push(vm.name.clone()),
            None => case.groups.push(Group {
                name: g.name.clone(),
                kind: match g.rule {
                    GroupRule::Affinity => GroupKind::Affinity,
                    GroupRule::AntiAffinity => GroupKind::AntiAffinity,
                },
                vms: vec![vm.name.clone()],
            }),
        }
    }
    let refuse = |why: String| ControllerError::Conflict(format!("cannot create {}: {why}", vm.name));
    let chosen = match host {
        Some(h) => h.to_string(),
        None => {
            // An affinity group already running somewhere decides the host.
            let with = groups.iter().filter(|g| g.rule == GroupRule::Affinity).find_map(|g| {
                view.vms.values().find(|v| v.is_active() && v.groups.iter().any(|x| x.name == g.name)).and_then(|v| v.host.clone())
            });
            match with {
                Some(h) => h,
                None => {
                    let banned: Vec<String> = view
                        .hosts
                        .values()
                        .filter(|h| !h.accepts_vms() && case.hosts.iter().any(|x| x.name == h.name))
                        .map(|h| h.name.clone())
                        .collect();
                    // The others stay where they are: their room is taken, their groups count.
                    match placement_for(&case, &Policy::Drain { hosts: banned }).map_err(|e| refuse(e.to_string()))? {
                        Ok(p) => match p.target.get(&vm.name) {
                            Some(h) => h.clone(),
                            None => return Err(refuse("the planner found no host for it".into())),
                        },
                        Err(blocked) => return Err(refuse(blocked.iter().map(|b| b.why.clone()).collect::<Vec<_>>().join("; "))),
                    }
                }
            }
        }
    };
    if !case.hosts.iter().any(|h| h.name == chosen) {
        return Err(refuse(format!("host {chosen} is not up")));
    }
    let mut check = case.clone();
    check.target = case.current.clone();
    check.target.insert(vm.name.clone(), chosen.clone());
    match walkabout_plan::plan(&check) {
        Ok(Outcome::Ok(_)) => Ok(chosen),
        Ok(Outcome::Impossible(i) | Outcome::Unsolved(i)) => {
            Err(refuse(i.blocked.iter().filter(|b| b.vm == vm.name).map(|b| b.why.clone()).collect::<Vec<_>>().join("; ")))
        }
        Err(walkabout_plan::InputError::Overfilled { host, needs, usable, unit, .. }) => {
            Err(refuse(format!("{host} would hold {needs} {unit} of {usable}")))
        }
        Err(e) => Err(refuse(e.to_string())),
    }
}

/// The view as it will be once the migrations `in_flight` land: each VM they move
/// placed at its destination. A migration that fails leaves its VM where it was, and the
/// plan made from this projection notices when its step finds the VM elsewhere.
pub fn project(view: &View, in_flight: &[Migration]) -> View {
    project_owned(view.clone(), in_flight)
}

/// [`project`] on a view the caller owns (a fresh snapshot): no second copy of it.
pub fn project_owned(view: View, in_flight: &[Migration]) -> View {
    let mut v = view;
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
    let mut placed_why: BTreeMap<String, String> = BTreeMap::new();
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
            prune_groups(&mut c);
            match placement_for(&c, &Policy::Drain { hosts: hosts.clone() }).map_err(invalid)? {
                Ok(p) => {
                    placed_why = p.why;
                    p.target
                }
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
            // Pinned VMs take their room (memory and vCPUs) on their hosts.
            for h in sub.hosts.iter_mut() {
                let stay = case.vms.iter().filter(|v| pinned.contains(&v.name) && case.current.get(&v.name) == Some(&h.name));
                let (mem, cpu) = stay.fold((0, 0), |(m, c), v| (m + v.memory_mib, c + v.vcpus.unwrap_or(0)));
                h.reserved_mib += mem;
                h.vcpus = h.vcpus.map(|n| n.saturating_sub(cpu));
            }
            prune_groups(&mut sub);
            let policy = if *goal == Goal::Rebalance { Policy::Balance } else { Policy::Consolidate };
            let mut t = match placement_for(&sub, &policy).map_err(invalid)? {
                Ok(p) => {
                    placed_why = p.why;
                    p.target
                }
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
            placed_why.insert(vm.clone(), format!("asked for by the operator; {host} runs its CPU and has room"));
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
    // The plan keeps only the VMs it moves or pins (the others stay where they are): the
    // whole placement in every plan made each record, and its every save and event, as
    // large as the cluster.
    let target: BTreeMap<String, String> =
        target.into_iter().filter(|(vm, h)| case.current.get(vm) != Some(h) || pinned.contains(vm)).collect();
    match walkabout_plan::plan(&with_target)
        .map(|mut o| {
            if let Outcome::Ok(p) = &mut o {
                annotate(&mut p.migrations, &placed_why);
            }
            o
        })
        .map_err(|e| match e {
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
        let (mem, cpu) = case.vms.iter().find(|v| &v.name == p).map_or((0, 0), |v| (v.memory_mib, v.vcpus.unwrap_or(0)));
        case.vms.retain(|v| &v.name != p);
        if let Some(host) = case.hosts.iter_mut().find(|x| x.name == h) {
            host.reserved_mib += mem;
            host.vcpus = host.vcpus.map(|n| n.saturating_sub(cpu));
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

    mod whole_model {
        use super::super::*;
        use crate::fake::{open, temp, url, Fake};
        use std::collections::{BTreeMap, BTreeSet};
        use walkabout_api::{CpuCatalog, VmGroup, VmSpec};

        fn set(items: &[&str]) -> BTreeSet<String> {
            items.iter().map(|s| s.to_string()).collect()
        }

        fn catalog(ceiling: &[&str]) -> CpuCatalog {
            let models: BTreeMap<String, BTreeSet<String>> = [
                ("qemu64".to_string(), set(&["sse2"])),
                ("Haswell".to_string(), set(&["sse2", "avx2"])),
                ("Skylake-Server".to_string(), set(&["sse2", "avx2", "avx512f"])),
            ]
            .into();
            CpuCatalog { ceiling: "max".into(), ceiling_features: set(ceiling), models }
        }

        /// h1 and h2 offer AVX-512; h3, empty and four times larger, does not. Three
        /// Skylake-Server VMs crowd h1.
        async fn mixed() -> (Fake, std::path::PathBuf, crate::Cluster) {
            let fake = Fake::new(&[("h1", 4096), ("h2", 4096), ("h3", 16384)], &[("a", 1024, "h1"), ("b", 1024, "h1"), ("c", 1024, "h1")]);
            {
                let mut s = fake.state();
                for h in ["h1", "h2"] {
                    s.cpu.insert(url(h), catalog(&["sse2", "avx2", "avx512f"]));
                }
                s.cpu.insert(url("h3"), catalog(&["sse2", "avx2"]));
                for vm in ["a", "b", "c"] {
                    s.models.insert(vm.into(), "Skylake-Server".into());
                }
            }
            let dir = temp(&format!("whole-model-{}", std::thread::current().name().unwrap_or("t").replace("::", "-")));
            let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
            for _ in 0..100 {
                if c.hosts().iter().all(|h| h.cpu_ceiling.is_some()) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            (fake, dir, c)
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_rebalance_never_proposes_a_host_that_cannot_run_the_vms_cpu() {
            let (_fake, dir, c) = mixed().await;

            let p = c.propose(Goal::Rebalance).expect("rebalance");

            assert!(!p.steps.is_empty(), "h1 is crowded and h2 runs the same CPUs: {p:?}");
            assert!(p.steps.iter().all(|s| s.to == "h2"), "h3 lacks avx512f: {:?}", p.steps);
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_drain_to_hosts_that_cannot_run_the_cpu_is_refused_with_the_missing_features() {
            let (fake, dir, c) = mixed().await;
            fake.state().capacity.insert(url("h2"), 1024);
            while c.host("h2").expect("h2").capacity_mib != 1024 {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }

            let p = c.propose(Goal::Drain { host: "h1".into() }).expect("drain");

            assert_eq!(p.status, PlanStatus::Impossible, "{p:?}");
            assert!(p.blocked.iter().all(|b| b.why.contains("h3 lack CPU features avx512f")), "{:?}", p.blocked);
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_vm_created_with_the_baseline_model_runs_on_every_host() {
            let (fake, dir, c) = mixed().await;

            let vm = c.create_vm(VmSpec { cpu_model: Some("baseline".into()), ..VmSpec::new("d", 512) }, None).await.expect("created");

            assert_eq!(vm.cpu_model.as_deref(), Some("Haswell"));
            assert_eq!(fake.state().models.get("d").map(String::as_str), Some("Haswell"));
            assert_eq!(vm.host.as_deref(), Some("h3"), "the most free memory, and h3 runs Haswell");
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn creating_on_a_host_that_cannot_run_the_cpu_is_refused_by_name() {
            let (_fake, dir, c) = mixed().await;

            let spec = VmSpec { cpu_model: Some("Skylake-Server".into()), ..VmSpec::new("d", 512) };
            let e = c.create_vm(spec, Some("h3")).await.expect_err("refused");

            assert!(e.to_string().contains("h3 lacks CPU features avx512f"), "{e}");
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn anti_affinity_members_are_created_apart_and_affinity_members_together() {
            let (_fake, dir, c) = mixed().await;
            let anti: VmGroup = "web".parse().expect("group");
            let with: VmGroup = "db:affinity".parse().expect("group");

            let mut hosts = BTreeSet::new();
            for name in ["w1", "w2", "w3"] {
                let vm = c.create_vm_in(VmSpec::new(name, 256), None, vec![anti.clone()]).await.expect("created");
                hosts.insert(vm.host.unwrap_or_default());
            }
            let d1 = c.create_vm_in(VmSpec::new("d1", 256), None, vec![with.clone()]).await.expect("created");
            let d2 = c.create_vm_in(VmSpec::new("d2", 256), None, vec![with]).await.expect("created");
            let w4 = c.create_vm_in(VmSpec::new("w4", 256), None, vec![anti]).await.expect_err("three hosts only");

            assert_eq!(hosts.len(), 3, "{hosts:?}");
            assert_eq!(d1.host, d2.host);
            assert!(w4.to_string().contains("already hold a member of anti-affinity group web"), "{w4}");
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_drain_keeps_anti_affinity_members_apart() {
            let fake = Fake::new(&[("h1", 4096), ("h2", 4096), ("h3", 8192)], &[]);
            let dir = temp("whole-model-anti-drain");
            let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
            let web: VmGroup = "web:anti".parse().expect("group");
            for (name, host) in [("w1", "h1"), ("w2", "h2")] {
                c.create_vm_in(VmSpec::new(name, 256), Some(host), vec![web.clone()]).await.expect("created");
            }
            c.create_vm(VmSpec::new("x", 256), Some("h1")).await.expect("created");

            let p = c.propose(Goal::Drain { host: "h1".into() }).expect("drain");

            let w1 = p.steps.iter().find(|s| s.vm == "w1").expect("w1 moves");
            assert_eq!(w1.to, "h3", "h2 holds w2: {:?}", p.steps);
            assert!(w1.why.contains("h2 already hold a member of anti-affinity group web"), "{}", w1.why);
            c.stop();
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}
