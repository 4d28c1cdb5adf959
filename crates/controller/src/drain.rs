//! Draining a host: maintenance first, then a drain plan that coordinates with the
//! migrations already under way, and an end that states what became of the host.
//!
//! Why the order of operations is what it is:
//! - The plan is made first (from the view as it will be once the migrations under way
//!   land), so an impossible drain is refused up front with each VM and why, and the
//!   host is left as it was.
//! - Then the host goes `draining` *before* the plan runs: from then on the executor
//!   starts nothing into it (its check and a migration's reservation happen with the
//!   view held still), so walks and operators' moves cannot fill it again.
//! - Migrations already in flight are neither fought nor ignored: a VM leaving the host
//!   needs no step (its step, if any, waits and is then moot); a VM on its way in is
//!   counted as on the host and drained once it lands. The drain ends only when the host
//!   holds no VM and no migration into or out of it runs; a VM found there at that point
//!   (one that arrived after the plan was made) is re-planned, not forgotten.
//! - Every end says what became of the host: `drained`, or `drain_failed` with the
//!   reason (which VMs stayed and why, or why the plan ended), never `draining` forever.
//!   An undrain during the drain wins: the host stays in service.

use crate::cluster::{ClusterView, Maintenance, View};
use crate::controller::Cluster;
use crate::error::ControllerError;
use crate::execute::Migration;
use crate::plans::{Goal, PlanRecord, PlanStatus};
use walkabout_api::Host;

/// What keeps a drain's host from being empty once its plan has nothing left to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Remaining {
    /// Nothing: the plan can conclude (VMs given up may still be there).
    Nothing,
    /// A migration into or out of the host still runs: wait for it to land.
    InFlight,
    /// VMs arrived during the drain: re-plan, for this reason.
    Arrived(String),
}

/// What is left on the host `rec` drains (for other goals, [`Remaining::Nothing`]).
pub(crate) fn remaining(view: &View, in_flight: &[Migration], rec: &PlanRecord) -> Remaining {
    let Goal::Drain { host } = &rec.goal else { return Remaining::Nothing };
    if in_flight.iter().any(|m| !m.phase.is_final() && (&m.to == host || &m.from == host)) {
        return Remaining::InFlight;
    }
    let arrived: Vec<&str> = view.vms_on(host).map(|v| v.name.as_str()).filter(|vm| !rec.gave_up.iter().any(|g| g == vm)).collect();
    if arrived.is_empty() {
        Remaining::Nothing
    } else {
        Remaining::Arrived(format!("{} arrived on {host} during its drain", arrived.join(", ")))
    }
}

/// The VMs a plan for `goal` leaves where they are because another drain owns them:
/// for a drain, those on the other hosts being drained now (each has its own plan; this
/// one only keeps new VMs off those hosts). Other goals: none.
pub(crate) fn others_own(view: &View, goal: &Goal) -> Vec<String> {
    let Goal::Drain { host } = goal else { return vec![] };
    let draining: Vec<&str> =
        view.hosts.values().filter(|h| &h.name != host && h.maintenance == Maintenance::Draining).map(|h| h.name.as_str()).collect();
    if draining.is_empty() {
        return vec![];
    }
    draining.iter().flat_map(|h| view.vms_on(h).map(|v| v.name.clone())).collect()
}

/// Why a step of a drain that was to move a VM off `from` is no longer needed, now that
/// the VM is at `at` (another migration took it off the drained host); `None` when the
/// step still matters.
pub(crate) fn moot(goal: &Goal, from: &str, at: Option<&str>) -> Option<String> {
    let Goal::Drain { host } = goal else { return None };
    match at {
        Some(at) if from == host && at != host => Some(format!("left {host} by another migration (it is on {at})")),
        _ => None,
    }
}

/// States what became of a drain's host once its plan ended: `drained`, or
/// `drain_failed` with the reason; left alone if it is no longer `draining` (an
/// undrain came first).
pub(crate) fn ended(view: &ClusterView, rec: &PlanRecord) {
    let Goal::Drain { host } = &rec.goal else { return };
    let draining = |m: Maintenance| m == Maintenance::Draining;
    let r = if rec.status == PlanStatus::Completed {
        view.set_maintenance_if(host, draining, Maintenance::Drained, None)
    } else {
        let reason = if rec.problems.is_empty() {
            format!("plan {} {}: {}", rec.id, rec.status, rec.reason.as_deref().unwrap_or("no reason given"))
        } else {
            let vms: Vec<&str> = rec.problems.iter().map(|p| p.vm.as_str()).collect();
            let detail: Vec<String> = rec.problems.iter().map(|p| format!("{}: {}", p.vm, p.reason)).collect();
            format!("plan {}: {} stayed ({})", rec.id, vms.join(", "), detail.join("; "))
        };
        view.set_maintenance_if(host, draining, Maintenance::DrainFailed, Some(reason))
    };
    if let Err(e) = r {
        tracing::warn!(host, plan = %rec.id, error = %e, "cannot record the end of the drain");
    }
}

impl Cluster {
    /// Puts `host` in maintenance and drains it: plans, refuses up front (with each VM
    /// and why, and the host left as it was) when no plan exists, else executes.
    pub fn drain(&self, host: &str) -> Result<PlanRecord, ControllerError> {
        let before = self.host(host)?;
        let plan = self.propose(Goal::Drain { host: host.to_string() })?;
        if plan.status == PlanStatus::Impossible {
            return Err(ControllerError::Impossible {
                reason: plan.reason.clone().unwrap_or_default(),
                blocked: plan.blocked.clone(),
                plan: Some(plan.id.clone()),
            });
        }
        self.view_part().set_maintenance(host, Maintenance::Draining)?;
        match self.execute(&plan.id) {
            Ok(p) => Ok(p),
            Err(e) => {
                let _ = self.view_part().set_maintenance_because(host, before.maintenance, before.maintenance_reason);
                let _ = futures_util::FutureExt::now_or_never(self.cancel_plan(&plan.id));
                Err(e)
            }
        }
    }

    /// Takes `host` out of maintenance, cancelling its drain if one runs.
    pub async fn undrain(&self, host: &str) -> Result<Host, ControllerError> {
        self.host(host)?;
        for p in self.plans().into_iter().filter(|p| p.status == PlanStatus::Running) {
            if p.goal == (Goal::Drain { host: host.to_string() }) {
                self.cancel_plan(&p.id).await?;
            }
        }
        self.view_part().set_maintenance(host, Maintenance::Active)
    }
}

#[cfg(test)]
mod tests {
    use crate::cluster::Maintenance;
    use crate::fake::{open, temp, url, wait_final, Fake};
    use crate::plans::{PlanStatus, StepStatus};
    use std::time::Duration;

    /// Migrations started of `vm`, as the agents saw them: (from URL, to URL).
    fn started(fake: &Fake, vm: &str) -> Vec<(String, String)> {
        fake.state().started.iter().filter(|(v, _, _)| v == vm).map(|(_, f, t)| (f.clone(), t.clone())).collect()
    }

    fn on(fake: &Fake, host: &str) -> Vec<String> {
        fake.state().vms.iter().filter(|(_, (h, _))| *h == url(host)).map(|(n, _)| n.clone()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_while_a_migration_out_of_the_host_runs_waits_for_it_and_moves_that_vm_once() {
        let fake = Fake::new(&[("h1", 768), ("h2", 512), ("h3", 512)], &[("a", 256, "h1"), ("b", 256, "h1"), ("c", 256, "h1")]);
        fake.state().polls = 8;
        let dir = temp("drain-out");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        let m = c.try_migrate("a", "h2", "operator").expect("migrate").expect("within limits");

        let p = c.drain("h1").expect("drain");
        let p = wait_final(&c, &p.id).await;

        assert_eq!(p.status, PlanStatus::Completed, "{p:#?}");
        assert!(p.steps.iter().all(|s| s.vm != "a" || s.status != StepStatus::Failed), "{p:#?}");
        assert!(p.steps.iter().all(|s| s.status != StepStatus::Failed), "no step fought the migration in flight: {p:#?}");
        assert_eq!(started(&fake, "a"), vec![(url("h1"), url("h2"))], "a moved once, by {}", m.id);
        assert_eq!(on(&fake, "h1"), Vec::<String>::new());
        assert_eq!(c.host("h1").expect("h1").maintenance, Maintenance::Drained);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_while_a_migration_into_the_host_runs_includes_that_vm() {
        let fake = Fake::new(&[("h1", 768), ("h2", 768), ("h3", 512)], &[("a", 256, "h1"), ("b", 256, "h2"), ("d", 256, "h3")]);
        fake.state().polls = 8;
        let dir = temp("drain-in");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        c.try_migrate("d", "h1", "operator").expect("migrate").expect("within limits");

        let p = c.drain("h1").expect("drain");
        let p = wait_final(&c, &p.id).await;

        assert_eq!(p.status, PlanStatus::Completed, "{p:#?}");
        let d = started(&fake, "d");
        assert_eq!(d.len(), 2, "d went into h1, then out: {d:?}");
        assert_eq!(d[0], (url("h3"), url("h1")));
        assert_eq!(d[1].0, url("h1"));
        assert!(p.steps.iter().any(|s| s.vm == "d" && s.status == StepStatus::Completed), "{p:#?}");
        assert_eq!(on(&fake, "h1"), Vec::<String>::new());
        assert_eq!(c.host("h1").expect("h1").maintenance, Maintenance::Drained);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_new_starts_into_a_draining_host() {
        let fake = Fake::new(&[("h1", 1024), ("h2", 1024)], &[("a", 256, "h1"), ("b", 256, "h2")]);
        fake.state().polls = 8;
        let dir = temp("drain-closed");
        let c = open(&dir, &fake, &["h1", "h2"]).await;
        c.drain("h1").expect("drain");

        let e = c.try_migrate("b", "h1", "operator").expect_err("refused");

        assert!(e.to_string().contains("h1 takes no VMs (it is draining)"), "{e}");
        assert!(started(&fake, "b").is_empty());
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_that_cannot_finish_ends_drain_failed_with_the_reason() {
        let fake = Fake::new(&[("h1", 768), ("h2", 512), ("h3", 512)], &[("a", 256, "h1"), ("b", 256, "h1"), ("c", 256, "h1")]);
        fake.state().failing.push("b".into());
        let dir = temp("drain-failed");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;

        let p = c.drain("h1").expect("drain");
        let p = wait_final(&c, &p.id).await;

        assert_eq!(p.status, PlanStatus::Failed, "{p:#?}");
        let h1 = c.host("h1").expect("h1");
        assert_eq!(h1.maintenance, Maintenance::DrainFailed, "{h1:?}");
        let reason = h1.maintenance_reason.unwrap_or_default();
        assert!(reason.contains(&p.id) && reason.contains("b stayed"), "{reason}");
        assert!(reason.contains("destination QEMU exited"), "{reason}");
        assert_eq!(on(&fake, "h1"), vec!["b".to_string()]);
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_drain_leaves_its_host_drain_failed_saying_so() {
        let fake = Fake::new(&[("h1", 768), ("h2", 512), ("h3", 512)], &[("a", 256, "h1"), ("b", 256, "h1")]);
        fake.state().polls = 20;
        let dir = temp("drain-cancelled");
        let c = open(&dir, &fake, &["h1", "h2", "h3"]).await;
        let p = c.drain("h1").expect("drain");
        while fake.state().started.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        c.cancel_plan(&p.id).await.expect("cancel");
        let p = wait_final(&c, &p.id).await;

        assert_eq!(p.status, PlanStatus::Cancelled, "{p:#?}");
        let h1 = c.host("h1").expect("h1");
        assert_eq!(h1.maintenance, Maintenance::DrainFailed, "{h1:?}");
        assert!(h1.maintenance_reason.unwrap_or_default().contains("cancelled by the operator"));
        c.stop();
        std::fs::remove_dir_all(&dir).ok();
    }
}
