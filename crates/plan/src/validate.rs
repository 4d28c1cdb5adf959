//! Checks a [`Case`] and compiles it into a [`Problem`].
//!
//! Input mistakes (unknown names, duplicates, a placement that itself overfills a host)
//! are [`InputError`]s. A target host that cannot run its VM is not an input mistake but
//! a reason no plan exists; it is returned beside the problem.

use std::collections::{BTreeMap, HashMap};

use crate::error::InputError;
use crate::model::{Case, GroupKind, Host, Vm};
use crate::problem::{Problem, Res};

/// A VM whose target host cannot run it.
#[derive(Debug, Clone)]
pub(crate) struct Incompatible {
    pub vm: String,
    pub needs: String,
    pub why: String,
}

/// A checked case.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    pub problem: Problem,
    pub incompatible: Vec<Incompatible>,
}

/// The largest memory size (MiB) or vCPU count a host or VM may state: 2^40 MiB is an
/// exbibyte. Sums over any case that fits in memory then stay far below `u64::MAX`, so
/// the planner's arithmetic needs no overflow checks.
pub const MAX_AMOUNT: u64 = 1 << 40;

/// Refuses a memory size or vCPU count above [`MAX_AMOUNT`], naming the field.
pub(crate) fn check_amounts(case: &Case) -> Result<(), InputError> {
    let too_large = |what: String, value: u64| InputError::TooLarge { what, value, max: MAX_AMOUNT };
    for h in &case.hosts {
        for (field, value) in [("memory_mib", Some(h.memory_mib)), ("reserved_mib", Some(h.reserved_mib)), ("vcpus", h.vcpus)] {
            if let Some(v) = value.filter(|v| *v > MAX_AMOUNT) {
                return Err(too_large(format!("{field} of host \"{}\"", h.name), v));
            }
        }
    }
    for vm in &case.vms {
        for (field, value) in [("memory_mib", Some(vm.memory_mib)), ("vcpus", vm.vcpus)] {
            if let Some(v) = value.filter(|v| *v > MAX_AMOUNT) {
                return Err(too_large(format!("{field} of vm \"{}\"", vm.name), v));
            }
        }
    }
    Ok(())
}

/// Checks names and placements of a case; builds the problem of the VMs that migrate.
pub(crate) fn compile(case: &Case) -> Result<Compiled, InputError> {
    check_amounts(case)?;
    let host_ix = index_hosts(&case.hosts)?;
    let vm_ix = index_vms(&case.vms)?;
    if case.max_parallel_per_host() == 0 {
        return Err(InputError::ZeroParallel);
    }
    let current = resolve(&case.current, "current", &host_ix, &vm_ix)?;
    let target = resolve(&case.target, "target", &host_ix, &vm_ix)?;
    for (v, vm) in case.vms.iter().enumerate() {
        if current[v].is_none() && target[v].is_none() {
            return Err(InputError::VmUnplaced(vm.name.clone()));
        }
    }
    check_fill(case, &current, "current")?;
    check_fill(case, &target, "target")?;

    let mut incompatible = Vec::new();
    for (v, vm) in case.vms.iter().enumerate() {
        if let Some(t) = target[v] {
            if let Some(why) = case.hosts[t].incompatibility(vm) {
                incompatible.push(Incompatible {
                    vm: vm.name.clone(),
                    needs: format!("a host that can run it at {}", case.hosts[t].name),
                    why: format!("cannot run {} on {}: {why}", vm.name, case.hosts[t].name),
                });
            }
        }
    }

    incompatible.extend(group_violations(case, &vm_ix, &target)?);

    let active: Vec<usize> = (0..case.vms.len()).filter(|&v| current[v].is_some() && target[v].is_some()).collect();
    let cap = case.hosts.iter().map(host_cap).collect();
    let req = active.iter().map(|&v| vm_req(&case.vms[v])).collect();
    let as_u32 = |h: Option<usize>| h.map_or(0, |h| u32::try_from(h).unwrap_or(u32::MAX));
    let start = active.iter().map(|&v| as_u32(current[v])).collect();
    let goal = active.iter().map(|&v| as_u32(target[v])).collect();
    let active_vms: Vec<&Vm> = active.iter().map(|&v| &case.vms[v]).collect();
    let problem = Problem::new(
        case.hosts.iter().map(|h| h.name.clone()).collect(),
        active_vms.iter().map(|v| v.name.clone()).collect(),
        cap,
        req,
        start,
        goal,
        classes(&case.hosts, &active_vms),
        case.max_parallel_per_host(),
    );
    Ok(Compiled { problem, incompatible })
}

/// The groups a target breaks: two members of an anti-affinity group on one host, or
/// members of an affinity group on different hosts (VMs not wanted at the end ignored).
fn group_violations(case: &Case, vm_ix: &HashMap<&str, usize>, target: &[Option<usize>]) -> Result<Vec<Incompatible>, InputError> {
    let mut out = Vec::new();
    for g in &case.groups {
        let mut at: Vec<(&str, usize)> = Vec::new();
        for name in &g.vms {
            let v = *vm_ix
                .get(name.as_str())
                .ok_or_else(|| InputError::BadGroup { group: g.name.clone(), cause: format!("unknown VM \"{name}\"") })?;
            if let Some(h) = target[v] {
                at.push((name.as_str(), h));
            }
        }
        match g.kind {
            GroupKind::AntiAffinity => {
                for (i, (vm, h)) in at.iter().enumerate() {
                    if let Some((other, _)) = at[..i].iter().find(|(_, x)| x == h) {
                        let host = &case.hosts[*h].name;
                        out.push(Incompatible {
                            vm: vm.to_string(),
                            needs: format!("a host without another member of anti-affinity group {}", g.name),
                            why: format!("anti-affinity group {}: {vm} and {other} would both run on {host}", g.name),
                        });
                    }
                }
            }
            GroupKind::Affinity => {
                if let Some((first, h0)) = at.first() {
                    for (vm, h) in at.iter().filter(|(_, h)| h != h0) {
                        out.push(Incompatible {
                            vm: vm.to_string(),
                            needs: format!("the host of affinity group {} ({})", g.name, case.hosts[*h0].name),
                            why: format!(
                                "affinity group {}: {vm} would run on {} but {first} on {}",
                                g.name, case.hosts[*h].name, case.hosts[*h0].name
                            ),
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

fn index_hosts(hosts: &[Host]) -> Result<HashMap<&str, usize>, InputError> {
    let mut ix = HashMap::with_capacity(hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        if ix.insert(h.name.as_str(), i).is_some() {
            return Err(InputError::DuplicateHost(h.name.clone()));
        }
        if h.reserved_mib > h.memory_mib {
            return Err(InputError::ReservedExceedsMemory { host: h.name.clone(), reserved_mib: h.reserved_mib, memory_mib: h.memory_mib });
        }
    }
    Ok(ix)
}

fn index_vms(vms: &[Vm]) -> Result<HashMap<&str, usize>, InputError> {
    let mut ix = HashMap::with_capacity(vms.len());
    for (i, v) in vms.iter().enumerate() {
        if ix.insert(v.name.as_str(), i).is_some() {
            return Err(InputError::DuplicateVm(v.name.clone()));
        }
    }
    Ok(ix)
}

fn resolve(
    placement: &BTreeMap<String, String>,
    which: &'static str,
    host_ix: &HashMap<&str, usize>,
    vm_ix: &HashMap<&str, usize>,
) -> Result<Vec<Option<usize>>, InputError> {
    let mut out = vec![None; vm_ix.len()];
    for (vm, host) in placement {
        let v = *vm_ix.get(vm.as_str()).ok_or_else(|| InputError::UnknownVm { vm: vm.clone(), placement: which })?;
        let h =
            *host_ix.get(host.as_str()).ok_or_else(|| InputError::UnknownHost { host: host.clone(), vm: vm.clone(), placement: which })?;
        out[v] = Some(h);
    }
    Ok(out)
}

fn check_fill(case: &Case, at: &[Option<usize>], which: &'static str) -> Result<(), InputError> {
    let mut mem = vec![0u64; case.hosts.len()];
    let mut cpu = vec![0u64; case.hosts.len()];
    for (v, h) in at.iter().enumerate() {
        if let Some(h) = *h {
            mem[h] += case.vms[v].memory_mib;
            cpu[h] += case.vms[v].vcpus.unwrap_or(0);
        }
    }
    for (h, host) in case.hosts.iter().enumerate() {
        let over = |needs, usable, unit| InputError::Overfilled { placement: which, host: host.name.clone(), needs, usable, unit };
        if mem[h] > host.usable_mib() {
            return Err(over(mem[h], host.usable_mib(), "MiB"));
        }
        if let Some(vcpus) = host.vcpus {
            if cpu[h] > vcpus {
                return Err(over(cpu[h], vcpus, "vCPUs"));
            }
        }
    }
    Ok(())
}

fn host_cap(h: &Host) -> Res {
    Res { mem: h.usable_mib(), cpu: h.vcpus.unwrap_or(u64::MAX / 4) }
}

fn vm_req(v: &Vm) -> Res {
    Res { mem: v.memory_mib, cpu: v.vcpus.unwrap_or(0) }
}

/// What makes two hosts alike for compatibility: guest architectures, own
/// architecture, sorted CPU features.
type HostKey = (Option<Vec<String>>, Option<String>, Vec<String>);

/// Groups hosts and VMs into compatibility classes and builds the class matrix,
/// so a 1,000 x 10,000 cluster needs a handful of comparisons, not ten million.
fn classes(hosts: &[Host], vms: &[&Vm]) -> (Vec<u32>, Vec<u32>, Vec<bool>, usize) {
    let mut host_keys: HashMap<HostKey, u32> = HashMap::new();
    let mut host_rep: Vec<usize> = Vec::new();
    let host_class = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut feats = h.cpu_features.clone();
            feats.sort();
            let key = (h.guest_archs.clone(), h.arch.clone(), feats);
            let next = u32::try_from(host_keys.len()).unwrap_or(u32::MAX);
            *host_keys.entry(key).or_insert_with(|| {
                host_rep.push(i);
                next
            })
        })
        .collect();
    let mut vm_keys: HashMap<(Option<String>, Vec<String>), u32> = HashMap::new();
    let mut vm_rep: Vec<usize> = Vec::new();
    let vm_class = vms
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut feats = v.cpu_features.clone();
            feats.sort();
            let next = u32::try_from(vm_keys.len()).unwrap_or(u32::MAX);
            *vm_keys.entry((v.arch.clone(), feats)).or_insert_with(|| {
                vm_rep.push(i);
                next
            })
        })
        .collect();
    let mut compat = Vec::with_capacity(vm_rep.len() * host_rep.len());
    for &v in &vm_rep {
        for &h in &host_rep {
            compat.push(hosts[h].can_run(vms[v]));
        }
    }
    (vm_class, host_class, compat, host_rep.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(json: &str) -> Case {
        Case::from_json(json).expect("test case parses")
    }

    const HOSTS: &str = r#""hosts":[{"name":"h1","memory_mib":4096,"reserved_mib":256},
                                     {"name":"h2","memory_mib":2048}]"#;

    #[test]
    fn unknown_host_in_current_names_host_and_vm() {
        let c = case(&format!(
            r#"{{{HOSTS},"vms":[{{"name":"vm3","memory_mib":512}}],
               "current":{{"vm3":"h9"}},"target":{{"vm3":"h1"}}}}"#
        ));
        let err = compile(&c).expect_err("unknown host");
        assert_eq!(err.to_string(), "unknown host \"h9\" in current of vm \"vm3\"");
    }

    #[test]
    fn target_that_overfills_a_host_is_an_input_error() {
        let c = case(&format!(
            r#"{{{HOSTS},"vms":[{{"name":"a","memory_mib":1500}},{{"name":"b","memory_mib":1000}}],
               "current":{{"a":"h1","b":"h1"}},"target":{{"a":"h2","b":"h2"}}}}"#
        ));
        let err = compile(&c).expect_err("overfilled target");
        assert_eq!(err.to_string(), "target overfills host \"h2\": needs 2500 MiB, usable 2048");
    }

    #[test]
    fn duplicate_vm_names_are_refused() {
        let c = case(&format!(
            r#"{{{HOSTS},"vms":[{{"name":"a","memory_mib":1}},{{"name":"a","memory_mib":2}}],
               "current":{{"a":"h1"}},"target":{{"a":"h1"}}}}"#
        ));
        assert_eq!(compile(&c).expect_err("duplicate"), InputError::DuplicateVm("a".into()));
    }

    #[test]
    fn vm_in_neither_placement_is_refused() {
        let c = case(&format!(r#"{{{HOSTS},"vms":[{{"name":"a","memory_mib":1}}],"current":{{}},"target":{{}}}}"#));
        assert_eq!(compile(&c).expect_err("unplaced"), InputError::VmUnplaced("a".into()));
    }

    #[test]
    fn shut_down_and_started_vms_do_not_migrate() {
        let c = case(&format!(
            r#"{{{HOSTS},"vms":[{{"name":"old","memory_mib":1}},{{"name":"new","memory_mib":1}},
                                {{"name":"m","memory_mib":1}}],
               "current":{{"old":"h1","m":"h1"}},"target":{{"new":"h2","m":"h2"}}}}"#
        ));
        let p = compile(&c).expect("valid").problem;
        assert_eq!(p.vm_names, vec!["m".to_string()]);
    }

    #[test]
    fn incompatible_target_is_reported_not_refused() {
        let c = case(
            r#"{"hosts":[{"name":"h1","memory_mib":4096,"cpu_features":["avx512f"]},
                         {"name":"h2","memory_mib":4096}],
                "vms":[{"name":"vm7","memory_mib":512,"cpu_features":["avx512f","vaes"]}],
                "current":{"vm7":"h1"},"target":{"vm7":"h2"}}"#,
        );
        let compiled = compile(&c).expect("valid input");
        assert_eq!(compiled.incompatible[0].why, "cannot run vm7 on h2: h2 lacks CPU features avx512f, vaes");
    }
}
