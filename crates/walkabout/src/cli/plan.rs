//! `walkabout plan`: the offline migration path planner.
//!
//! `walkabout plan CASE.json [--output PLAN.json]` plans the way from `current` to
//! `target`; `walkabout plan drain --host h2 CLUSTER.json`, `... consolidate` and
//! `... balance` first make the target from a policy. The plan (or the explanation of
//! why none exists) is JSON on stdout or in `--output`; exit 0 for any plan outcome,
//! 2 for malformed or inconsistent input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use walkabout_plan::policy::{plan_policy, Policy};
use walkabout_plan::{plan_with, Case, InputError, Options, Outcome};

/// Arguments of `walkabout plan`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlanArgs {
    #[command(subcommand)]
    policy: Option<PolicyCommand>,
    /// The case file (hosts, VMs, current and target placement).
    case: Option<PathBuf>,
    /// Write the plan here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

/// Policies that make the target placement before planning.
#[derive(clap::Subcommand)]
enum PolicyCommand {
    /// Move every VM off the given hosts.
    Drain {
        /// A host to empty (repeat for several).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[command(flatten)]
        io: ClusterIo,
    },
    /// Run every VM on as few hosts as possible.
    Consolidate {
        #[command(flatten)]
        io: ClusterIo,
    },
    /// Even out memory use across hosts.
    Balance {
        #[command(flatten)]
        io: ClusterIo,
    },
}

/// Input and output of a policy subcommand.
#[derive(clap::Args)]
struct ClusterIo {
    /// The cluster file (hosts, VMs, current placement, optional groups).
    cluster: PathBuf,
    /// Write the plan here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

/// Runs `walkabout plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let opts = Options::default();
    let (input, output, policy) = match args.policy {
        Some(PolicyCommand::Drain { hosts, io }) => (io.cluster, io.output, Some(Policy::Drain { hosts })),
        Some(PolicyCommand::Consolidate { io }) => (io.cluster, io.output, Some(Policy::Consolidate)),
        Some(PolicyCommand::Balance { io }) => (io.cluster, io.output, Some(Policy::Balance)),
        None => {
            let case = args.case.context("missing CASE.json (or a policy: drain, consolidate, balance)")?;
            (case, args.output, None)
        }
    };
    let text = std::fs::read_to_string(&input).with_context(|| format!("cannot read {}", input.display()))?;
    let outcome = Case::from_json(&text).and_then(|case| match &policy {
        Some(p) => plan_policy(&case, p, &opts),
        None => plan_with(&case, &opts),
    });
    match outcome {
        Ok(outcome) => {
            write(&outcome, output.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            report_input_error(&input, &e);
            Ok(ExitCode::from(2))
        }
    }
}

fn report_input_error(input: &Path, e: &InputError) {
    eprintln!("walkabout plan: {}: {e}", input.display());
}

fn write(outcome: &Outcome, output: Option<&Path>) -> anyhow::Result<()> {
    let mut json = serde_json::to_string_pretty(outcome)?;
    json.push('\n');
    match output {
        Some(path) => std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display())),
        None => {
            print!("{json}");
            Ok(())
        }
    }
}
