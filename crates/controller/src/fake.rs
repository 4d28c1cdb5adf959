//! A fake cluster of agents for unit tests of the controller's logic: hosts with
//! capacity, VMs, migrations that finish after a few polls (or fail, for chosen VMs),
//! hosts that stop answering. Memory is held on both ends while a migration runs,
//! and an overfilling migration is refused, as the real agent does.

use crate::agents::{AgentApi, AgentCallError, AgentHost, AgentMigration, AgentProgress, AgentVm, AgentVmSpec, BoxFut, MigrateRequest};
use crate::lock;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use walkabout_migrate::Phase;

#[derive(Default)]
pub(crate) struct State {
    /// Capacity by URL.
    pub capacity: BTreeMap<String, u64>,
    /// Hosts that do not answer.
    pub down: Vec<String>,
    /// VM -> (URL, MiB).
    pub vms: BTreeMap<String, (String, u64)>,
    /// Migrations by id: (record, from URL, polls left).
    pub migs: BTreeMap<String, (AgentMigration, String, u32)>,
    /// VMs whose migrations fail.
    pub failing: Vec<String>,
    /// Every migration started: (VM, from URL, to URL).
    pub started: Vec<(String, String, String)>,
    /// Most migrations out of one host at once, by URL.
    pub max_out: BTreeMap<String, usize>,
    /// Polls a migration takes.
    pub polls: u32,
}

#[derive(Clone, Default)]
pub(crate) struct Fake(pub Arc<Mutex<State>>);

impl Fake {
    pub fn new(hosts: &[(&str, u64)], vms: &[(&str, u64, &str)]) -> Fake {
        let f = Fake::default();
        {
            let mut s = lock(&f.0);
            s.polls = 3;
            for (h, cap) in hosts {
                s.capacity.insert(url(h), *cap);
            }
            for (vm, mem, h) in vms {
                s.vms.insert(vm.to_string(), (url(h), *mem));
            }
        }
        f
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.0)
    }
}

pub(crate) fn url(host: &str) -> String {
    format!("http://{host}")
}

fn used(s: &State, u: &str) -> u64 {
    let placed: u64 = s.vms.values().filter(|(h, _)| h == u).map(|(_, m)| m).sum();
    let incoming: u64 = s
        .migs
        .values()
        .filter(|(m, _, _)| !m.phase.is_final() && m.destination == u)
        .filter_map(|(m, _, _)| s.vms.get(&m.vm).map(|(_, mem)| *mem))
        .sum();
    placed + incoming
}

fn ready<T: Send + 'static>(v: T) -> BoxFut<T> {
    Box::pin(async move { v })
}

impl Fake {
    fn check(&self, u: &str) -> Result<(), AgentCallError> {
        if self.state().down.iter().any(|d| d == u) || !self.state().capacity.contains_key(u) {
            return Err(AgentCallError::Unreachable { url: u.into(), detail: "connection refused".into() });
        }
        Ok(())
    }
}

impl AgentApi for Fake {
    fn host(&self, u: String) -> BoxFut<Result<AgentHost, AgentCallError>> {
        let r = self.check(&u).map(|()| {
            let s = self.state();
            let cap = s.capacity[&u];
            let used = used(&s, &u);
            AgentHost {
                hostname: "fake".into(),
                cpu_model: "fake".into(),
                cpus: 2,
                capacity_mib: cap,
                used_mib: used,
                free_mib: cap.saturating_sub(used),
            }
        });
        ready(r)
    }

    fn vms(&self, u: String) -> BoxFut<Result<Vec<AgentVm>, AgentCallError>> {
        let r = self.check(&u).map(|()| {
            let s = self.state();
            s.vms
                .iter()
                .filter(|(_, (h, _))| *h == u)
                .map(|(name, (_, mem))| AgentVm {
                    spec: AgentVmSpec { name: name.clone(), memory_mib: *mem, vcpus: 1, workload: "idle".into() },
                    state: "running".into(),
                    reason: None,
                    guest: Default::default(),
                })
                .collect()
        });
        ready(r)
    }

    fn create_vm(&self, u: String, spec: serde_json::Value) -> BoxFut<Result<AgentVm, AgentCallError>> {
        let name = spec["name"].as_str().unwrap_or_default().to_string();
        let mem = spec["memory_mib"].as_u64().unwrap_or(0);
        self.state().vms.insert(name.clone(), (u, mem));
        ready(Ok(AgentVm {
            spec: AgentVmSpec { name, memory_mib: mem, vcpus: 1, workload: "idle".into() },
            state: "running".into(),
            reason: None,
            guest: Default::default(),
        }))
    }

    fn delete_vm(&self, _u: String, name: String) -> BoxFut<Result<(), AgentCallError>> {
        self.state().vms.remove(&name);
        ready(Ok(()))
    }

    fn start_migration(&self, u: String, req: MigrateRequest) -> BoxFut<Result<AgentMigration, AgentCallError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let mut s = self.state();
        let Some((at, mem)) = s.vms.get(&req.vm).cloned() else {
            return ready(Err(AgentCallError::Refused {
                status: 404,
                kind: "not_found".into(),
                message: format!("no VM named `{}`", req.vm),
            }));
        };
        assert_eq!(at, u, "migration asked of a host that does not run {}", req.vm);
        let cap = s.capacity.get(&req.destination).copied().unwrap_or(0);
        if used(&s, &req.destination) + mem > cap {
            return ready(Err(AgentCallError::Refused {
                status: 409,
                kind: "insufficient_memory".into(),
                message: format!("{} would overfill {}", req.vm, req.destination),
            }));
        }
        let id = format!("agent-mig-{}", s.migs.len() + 1);
        let rec = AgentMigration {
            id: id.clone(),
            vm: req.vm.clone(),
            destination: req.destination.clone(),
            phase: Phase::Running,
            reason: None,
            progress: AgentProgress::default(),
            downtime_ms: None,
            total_ms: None,
            created_at_ms: crate::now_ms(),
        };
        let polls = s.polls;
        s.migs.insert(id, (rec.clone(), u.clone(), polls));
        s.started.push((req.vm, u.clone(), req.destination));
        let out = s.migs.values().filter(|(m, from, _)| !m.phase.is_final() && *from == u).count();
        let e = s.max_out.entry(u).or_insert(0);
        *e = (*e).max(out);
        ready(Ok(rec))
    }

    fn migration(&self, u: String, id: String) -> BoxFut<Result<AgentMigration, AgentCallError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let mut s = self.state();
        let failing = s.failing.clone();
        let down = s.down.clone();
        let Some((rec, _, left)) = s.migs.get_mut(&id) else {
            return ready(Err(AgentCallError::Refused {
                status: 404,
                kind: "migration_not_found".into(),
                message: format!("no migration `{id}`"),
            }));
        };
        if !rec.phase.is_final() {
            *left = left.saturating_sub(1);
            if down.contains(&rec.destination) {
                rec.phase = Phase::Failed;
                rec.reason = Some(format!("destination agent {} unreachable", rec.destination));
            } else if *left == 0 {
                if failing.contains(&rec.vm) {
                    rec.phase = Phase::Failed;
                    rec.reason = Some(format!("migration of {} failed: destination QEMU exited", rec.vm));
                } else {
                    rec.phase = Phase::Completed;
                    rec.downtime_ms = Some(42);
                    rec.total_ms = Some(1000);
                }
            }
        }
        let rec = rec.clone();
        if rec.phase == Phase::Completed {
            if let Some(v) = s.vms.get_mut(&rec.vm) {
                v.0 = rec.destination.clone();
            }
        }
        ready(Ok(rec))
    }

    fn migrations(&self, u: String) -> BoxFut<Result<Vec<AgentMigration>, AgentCallError>> {
        if let Err(e) = self.check(&u) {
            return ready(Err(e));
        }
        let s = self.state();
        ready(Ok(s.migs.values().filter(|(_, from, _)| *from == u).map(|(m, _, _)| m.clone()).collect()))
    }

    fn cancel_migration(&self, _u: String, id: String) -> BoxFut<Result<(), AgentCallError>> {
        let mut s = self.state();
        if let Some((rec, _, _)) = s.migs.get_mut(&id) {
            if !rec.phase.is_final() {
                rec.phase = Phase::Cancelled;
                rec.reason = Some("cancelled".into());
            }
        }
        ready(Ok(()))
    }
}
