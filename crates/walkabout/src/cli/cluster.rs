//! `walkabout cluster`: rebalance, consolidate and review plans against a controller;
//! and what `host drain`, `vm move`, `walk` and `game` share: the controller client,
//! following a plan with a progress bar, printing plans.

use super::client::{self, print_json, runtime, Output};
use super::progress::{MigrationView, PlanProgress, PlanView, RunningStep};
use super::table::{clean, Align, Table};
use std::process::ExitCode;
use std::time::Duration;
use walkabout_api::{ClientError, ControllerClient, Goal, PlanRecord, PlanStatus};

/// The controller's default URL (where `walkabout up` serves it).
pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:7700";

/// Which controller, and how to print.
#[derive(clap::Args, Clone)]
pub struct CtlArgs {
    /// The controller's URL.
    #[arg(long, env = "WALKABOUT_CONTROLLER", default_value = DEFAULT_CONTROLLER)]
    pub controller: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// `walkabout cluster ...`
#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// Even out memory use across hosts in service.
    Rebalance(GoalArgs),
    /// Run every VM on as few hosts as possible.
    Consolidate(GoalArgs),
    /// List plans.
    Plans(CtlArgs),
    /// Show one plan: its steps (with their reasons), problems.
    PlanShow(PlanId),
    /// Execute a proposed plan, following it to its end.
    PlanExecute(PlanFollow),
    /// Cancel a plan (running migrations are cancelled before their switchover).
    PlanCancel(PlanId),
}

/// A goal's options.
#[derive(clap::Args)]
pub struct GoalArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// Only plan: print the plan (its id lets you execute it later).
    #[arg(long)]
    dry_run: bool,
    /// Return once the plan runs instead of following it.
    #[arg(long)]
    no_wait: bool,
}

/// A plan by id.
#[derive(clap::Args)]
pub struct PlanId {
    #[command(flatten)]
    ctl: CtlArgs,
    /// The plan's id.
    id: String,
}

/// A plan by id, followed or not.
#[derive(clap::Args)]
pub struct PlanFollow {
    #[command(flatten)]
    ctl: CtlArgs,
    /// The plan's id.
    id: String,
    /// Return once the plan runs instead of following it.
    #[arg(long)]
    no_wait: bool,
}

/// Runs `walkabout cluster ...`.
pub fn run(cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match cmd {
            ClusterCommand::Rebalance(g) => goal(g, Goal::Rebalance).await,
            ClusterCommand::Consolidate(g) => goal(g, Goal::Consolidate).await,
            ClusterCommand::Plans(c) => {
                let plans = client::controller(&c.controller)?.plans().await?;
                match c.output {
                    Output::Json => print_json(&plans)?,
                    Output::Text => plans_table(&plans).print(),
                }
                Ok(ExitCode::SUCCESS)
            }
            ClusterCommand::PlanShow(p) => {
                let plan = client::controller(&p.ctl.controller)?.plan(&p.id).await?;
                match p.ctl.output {
                    Output::Json => print_json(&plan)?,
                    Output::Text => print_plan(&plan),
                }
                Ok(ExitCode::SUCCESS)
            }
            ClusterCommand::PlanExecute(p) => {
                let ctl = client::controller(&p.ctl.controller)?;
                let plan = ctl.execute_plan(&p.id).await?;
                finish(&ctl, plan, &p.ctl, p.no_wait).await
            }
            ClusterCommand::PlanCancel(p) => {
                let ctl = client::controller(&p.ctl.controller)?;
                let plan = ctl.cancel_plan(&p.id).await?;
                finish(&ctl, plan, &p.ctl, false).await
            }
        }
    })
}

/// The plans as a table.
fn plans_table(plans: &[PlanRecord]) -> Table {
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("STATUS", Align::Left),
        ("GOAL", Align::Left),
        ("STEPS", Align::Right),
        ("ROUND", Align::Right),
        ("REASON", Align::Left),
    ]);
    for p in plans {
        t.row([
            p.id.clone(),
            p.status.to_string(),
            p.goal.describe(),
            p.steps.len().to_string(),
            p.round.to_string(),
            p.reason.clone().unwrap_or_default(),
        ]);
    }
    t
}

async fn goal(g: GoalArgs, goal: Goal) -> anyhow::Result<ExitCode> {
    let ctl = client::controller(&g.ctl.controller)?;
    let plan = ctl.propose(&goal).await?;
    if g.dry_run || plan.status != PlanStatus::Proposed {
        match g.ctl.output {
            Output::Json => print_json(&plan)?,
            Output::Text => print_plan(&plan),
        }
        return Ok(if plan.status == PlanStatus::Impossible { ExitCode::from(1) } else { ExitCode::SUCCESS });
    }
    let plan = ctl.execute_plan(&plan.id).await?;
    finish(&ctl, plan, &g.ctl, g.no_wait).await
}

/// Whether a plan in `status` is a success: completed, or (when not waiting for its
/// end) under way or proposed.
fn succeeded(status: PlanStatus, no_wait: bool) -> bool {
    match status {
        PlanStatus::Completed => true,
        PlanStatus::Running | PlanStatus::Proposed => no_wait,
        PlanStatus::Impossible | PlanStatus::Failed | PlanStatus::Cancelled => false,
    }
}

/// Follows `plan` to its end (unless `no_wait`), then prints it; exit 0 only when it
/// completed (or, without waiting, runs).
pub async fn finish(ctl: &ControllerClient, plan: PlanRecord, args: &CtlArgs, no_wait: bool) -> anyhow::Result<ExitCode> {
    let plan = if no_wait { plan } else { follow(ctl, plan, args.output == Output::Text).await? };
    match args.output {
        Output::Json => print_json(&plan)?,
        Output::Text => print_plan(&plan),
    }
    Ok(if succeeded(plan.status, no_wait) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Polls a plan until it ends, showing its progress on stderr when `bar` (a bar on a
/// terminal, plain lines elsewhere). Each poll is one short request.
pub async fn follow(ctl: &ControllerClient, plan: PlanRecord, bar: bool) -> anyhow::Result<PlanRecord> {
    let mut progress = bar.then(|| PlanProgress::new(&plan.id));
    let mut plan = plan;
    loop {
        if plan.status != PlanStatus::Running {
            if let Some(p) = &progress {
                p.finish();
            }
            return Ok(plan);
        }
        if let Some(p) = &mut progress {
            p.update(&view(ctl, &plan).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        plan = ctl.plan(&plan.id).await?;
    }
}

/// The plan's progress, with each running step's migration phase and share done.
async fn view(ctl: &ControllerClient, plan: &PlanRecord) -> PlanView {
    let mut v = PlanView::from_plan(plan);
    for (_, s) in plan.running() {
        let state = match &s.migration {
            Some(mid) => match ctl.migration(mid).await {
                Ok(m) => {
                    let m = MigrationView::new(m.phase, &m.progress);
                    let pct = (m.done_bytes() * 100).checked_div(m.total_bytes).unwrap_or(0);
                    format!("{} {pct}%", m.phase)
                }
                Err(_) => "?".into(),
            },
            None => "starting".into(),
        };
        v.running.push(RunningStep {
            vm: clean(&s.vm).into_owned(),
            from: clean(&s.from).into_owned(),
            to: clean(&s.to).into_owned(),
            state,
        });
    }
    v
}

/// A plan for people.
pub fn plan_text(p: &PlanRecord) -> String {
    let mut out = format!(
        "plan {} ({}): {}{}\n",
        clean(&p.id),
        clean(&p.goal.describe()),
        p.status,
        p.reason.as_deref().map(|r| format!(" — {}", clean(r))).unwrap_or_default()
    );
    for s in &p.steps {
        out.push_str(&format!(
            "  round {} wave {}: {:<10} {} -> {}  {:<10} {}{}\n",
            s.round,
            s.wave,
            clean(&s.vm),
            clean(&s.from),
            clean(&s.to),
            s.status.to_string(),
            clean(&s.why),
            s.reason.as_deref().map(|r| format!(" [{}]", clean(r))).unwrap_or_default()
        ));
    }
    for b in &p.blocked {
        out.push_str(&format!("  blocked: {} needs {}: {}\n", clean(&b.vm), clean(&b.needs), clean(&b.why)));
    }
    for x in &p.problems {
        out.push_str(&format!("  problem: {}: {}\n", clean(&x.vm), clean(&x.reason)));
    }
    if p.status == PlanStatus::Proposed {
        out.push_str(&format!("  execute with: walkabout cluster plan-execute {}\n", clean(&p.id)));
    }
    out
}

/// Prints a plan for people.
pub fn print_plan(p: &PlanRecord) {
    print!("{}", plan_text(p));
}

/// Prints a refusal: in JSON, the controller's whole error body; in text, its sentence
/// and one line per blocked VM. Any other error (the controller not answering) is
/// returned as it is.
pub fn print_refusal(e: &ClientError, output: Output) -> anyhow::Result<ExitCode> {
    let ClientError::Api { body, .. } = e else { return Err(e.clone().into()) };
    match output {
        Output::Json => print_json(body)?,
        Output::Text => {
            eprintln!("walkabout: {}", body.error);
            for b in &body.blocked {
                eprintln!("  {} needs {}: {}", clean(&b.vm), clean(&b.needs), clean(&b.why));
            }
        }
    }
    Ok(ExitCode::from(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(status: PlanStatus) -> PlanRecord {
        serde_json::from_value(serde_json::json!({
            "version": 1, "id": "p7", "goal": {"goal": "drain", "host": "h1"}, "status": status,
            "created_ms": 0, "round": 1,
            "steps": [{"vm": "g1", "from": "h1", "to": "h2", "wave": 0, "round": 1, "why": "drain h1", "status": "completed"}],
            "blocked": [{"vm": "g2", "needs": "512 MiB", "why": "no host has room"}]
        }))
        .expect("a plan record")
    }

    #[test]
    fn a_plan_is_shown_with_its_goal_steps_and_blocked_vms() {
        let text = plan_text(&plan(PlanStatus::Proposed));
        assert!(text.starts_with("plan p7 (drain h1): proposed\n"), "{text}");
        assert!(text.contains("g1         h1 -> h2  completed  drain h1"), "{text}");
        assert!(text.contains("blocked: g2 needs 512 MiB: no host has room"), "{text}");
        assert!(text.contains("execute with: walkabout cluster plan-execute p7"), "{text}");
    }

    #[test]
    fn only_a_completed_plan_succeeds_when_followed_to_its_end() {
        assert!(succeeded(PlanStatus::Completed, false));
        assert!(!succeeded(PlanStatus::Running, false));
        assert!(succeeded(PlanStatus::Running, true));
        assert!(!succeeded(PlanStatus::Failed, true));
        assert!(!succeeded(PlanStatus::Impossible, false));
    }
}
