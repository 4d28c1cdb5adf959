//! `walkabout cluster`: rebalance, consolidate and review plans against a controller;
//! and what `host drain`, `vm move`, `walk` and `game` share: the controller client,
//! following a plan with a progress bar, printing plans.

use super::client::{print_json, runtime, Output};
use super::progress::{MigrationView, PlanProgress, PlanView, RunningStep};
use super::table::{clean, num, Align, Table};
use anyhow::{anyhow, Context};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;

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

/// A JSON client for the controller that keeps error bodies (an impossible goal's
/// per-VM reasons are in them).
pub struct Ctl {
    base: String,
    http: reqwest::Client,
}

/// An error answer of the controller: its sentence and its whole body.
#[derive(Debug)]
pub struct Refusal {
    /// The controller's sentence.
    pub message: String,
    /// The whole body.
    pub body: Value,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

impl Ctl {
    /// A client for the controller at `base`.
    pub fn new(base: &str) -> anyhow::Result<Ctl> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            anyhow::bail!("controller URL {base:?} must start with http:// (e.g. {DEFAULT_CONTROLLER})");
        }
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().context("building HTTP client")?;
        Ok(Ctl { base, http })
    }

    /// GET a JSON document.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// POST a JSON body (or none).
    pub async fn post(&self, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.send(reqwest::Method::POST, path, body).await
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!("cannot reach the controller at {} (is `walkabout up` or `walkabout controller` running?)", self.base)
            } else {
                anyhow!("request to {}{path} failed: {e}", self.base)
            }
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.with_context(|| format!("reading reply from {}{path}", self.base))?;
        let v: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        if !status.is_success() {
            let message =
                v["error"].as_str().map(String::from).unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)));
            return Err(Refusal { message, body: v }.into());
        }
        Ok(v)
    }
}

/// Runs `walkabout cluster ...`.
pub fn run(cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match cmd {
            ClusterCommand::Rebalance(g) => goal(g, json!({"goal": "rebalance"})).await,
            ClusterCommand::Consolidate(g) => goal(g, json!({"goal": "consolidate"})).await,
            ClusterCommand::Plans(c) => {
                let plans = Ctl::new(&c.controller)?.get("/v1/plans").await?;
                match c.output {
                    Output::Json => print_json(&plans)?,
                    Output::Text => {
                        let mut t = Table::new(&[
                            ("ID", Align::Left),
                            ("STATUS", Align::Left),
                            ("GOAL", Align::Left),
                            ("STEPS", Align::Right),
                            ("ROUND", Align::Right),
                            ("REASON", Align::Left),
                        ]);
                        for p in plans.as_array().into_iter().flatten() {
                            t.row([
                                p["id"].as_str().unwrap_or("?").to_string(),
                                p["status"].as_str().unwrap_or("?").to_string(),
                                describe_goal(&p["goal"]),
                                p["steps"].as_array().map_or(0, Vec::len).to_string(),
                                num(&p["round"]),
                                p["reason"].as_str().unwrap_or("").to_string(),
                            ]);
                        }
                        t.print();
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            ClusterCommand::PlanShow(p) => {
                let plan = Ctl::new(&p.ctl.controller)?.get(&format!("/v1/plans/{}", p.id)).await?;
                match p.ctl.output {
                    Output::Json => print_json(&plan)?,
                    Output::Text => print_plan(&plan),
                }
                Ok(ExitCode::SUCCESS)
            }
            ClusterCommand::PlanExecute(p) => {
                let ctl = Ctl::new(&p.ctl.controller)?;
                let plan = ctl.post(&format!("/v1/plans/{}/execute", p.id), None).await?;
                finish(&ctl, plan, &p.ctl, p.no_wait).await
            }
            ClusterCommand::PlanCancel(p) => {
                let ctl = Ctl::new(&p.ctl.controller)?;
                let plan = ctl.post(&format!("/v1/plans/{}/cancel", p.id), None).await?;
                finish(&ctl, plan, &p.ctl, false).await
            }
        }
    })
}

async fn goal(g: GoalArgs, goal: Value) -> anyhow::Result<ExitCode> {
    let ctl = Ctl::new(&g.ctl.controller)?;
    let plan = ctl.post("/v1/plans", Some(goal)).await?;
    if g.dry_run || plan["status"] != "proposed" {
        match g.ctl.output {
            Output::Json => print_json(&plan)?,
            Output::Text => print_plan(&plan),
        }
        return Ok(if plan["status"] == "impossible" { ExitCode::from(1) } else { ExitCode::SUCCESS });
    }
    let id = plan["id"].as_str().unwrap_or_default().to_string();
    let plan = ctl.post(&format!("/v1/plans/{id}/execute"), None).await?;
    finish(&ctl, plan, &g.ctl, g.no_wait).await
}

/// Follows `plan` to its end (unless `no_wait`), then prints it; exit 0 only when it
/// completed (or, without waiting, runs).
pub async fn finish(ctl: &Ctl, plan: Value, args: &CtlArgs, no_wait: bool) -> anyhow::Result<ExitCode> {
    let plan = if no_wait { plan } else { follow(ctl, plan, args.output == Output::Text).await? };
    match args.output {
        Output::Json => print_json(&plan)?,
        Output::Text => print_plan(&plan),
    }
    let ok = match plan["status"].as_str() {
        Some("completed") => true,
        Some("running" | "proposed") => no_wait,
        _ => false,
    };
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Polls a plan until it ends, showing its progress on stderr when `bar` (a bar on a
/// terminal, plain lines elsewhere).
pub async fn follow(ctl: &Ctl, plan: Value, bar: bool) -> anyhow::Result<Value> {
    let id = plan["id"].as_str().unwrap_or_default().to_string();
    let mut progress = bar.then(|| PlanProgress::new(&id));
    let mut plan = plan;
    loop {
        if !matches!(plan["status"].as_str(), Some("running")) {
            if let Some(p) = &progress {
                p.finish();
            }
            return Ok(plan);
        }
        if let Some(p) = &mut progress {
            p.update(&view(ctl, &plan).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        plan = ctl.get(&format!("/v1/plans/{id}")).await?;
    }
}

/// The plan's progress, with each running step's migration phase and share done.
async fn view(ctl: &Ctl, plan: &Value) -> PlanView {
    let mut v = PlanView::from_plan(plan);
    for s in plan["steps"].as_array().into_iter().flatten().filter(|s| s["status"] == "running") {
        let state = match s["migration"].as_str() {
            Some(mid) => match ctl.get(&format!("/v1/migrations/{mid}")).await {
                Ok(m) => {
                    let m = MigrationView::from_record(&m);
                    let pct = (m.done_bytes() * 100).checked_div(m.total_bytes).unwrap_or(0);
                    format!("{} {pct}%", m.phase)
                }
                Err(_) => "?".into(),
            },
            None => "starting".into(),
        };
        let text = |x: &Value| clean(x.as_str().unwrap_or("?")).into_owned();
        v.running.push(RunningStep { vm: text(&s["vm"]), from: text(&s["from"]), to: text(&s["to"]), state });
    }
    v
}

/// A goal in a few words.
pub fn describe_goal(g: &Value) -> String {
    match g["goal"].as_str() {
        Some("drain") => format!("drain {}", clean(g["host"].as_str().unwrap_or("?"))),
        Some("place") => format!("move {} to {}", clean(g["vm"].as_str().unwrap_or("?")), clean(g["host"].as_str().unwrap_or("?"))),
        Some(other) => other.to_string(),
        None => "?".into(),
    }
}

/// Prints a plan for people.
pub fn print_plan(p: &Value) {
    println!(
        "plan {} ({}): {}{}",
        clean(p["id"].as_str().unwrap_or("?")),
        describe_goal(&p["goal"]),
        clean(p["status"].as_str().unwrap_or("?")),
        p["reason"].as_str().map(|r| format!(" — {r}")).unwrap_or_default()
    );
    for s in p["steps"].as_array().into_iter().flatten() {
        println!(
            "  round {} wave {}: {:<10} {} -> {}  {:<10} {}{}",
            s["round"],
            s["wave"],
            clean(s["vm"].as_str().unwrap_or("?")),
            clean(s["from"].as_str().unwrap_or("?")),
            clean(s["to"].as_str().unwrap_or("?")),
            clean(s["status"].as_str().unwrap_or("?")),
            clean(s["why"].as_str().unwrap_or("")),
            s["reason"].as_str().map(|r| format!(" [{r}]")).unwrap_or_default()
        );
    }
    for b in p["blocked"].as_array().into_iter().flatten() {
        println!(
            "  blocked: {} needs {}: {}",
            clean(b["vm"].as_str().unwrap_or("?")),
            clean(b["needs"].as_str().unwrap_or("?")),
            clean(b["why"].as_str().unwrap_or(""))
        );
    }
    for x in p["problems"].as_array().into_iter().flatten() {
        println!("  problem: {}: {}", clean(x["vm"].as_str().unwrap_or("?")), clean(x["reason"].as_str().unwrap_or("")));
    }
    if p["status"] == "proposed" {
        println!("  execute with: walkabout cluster plan-execute {}", clean(p["id"].as_str().unwrap_or("?")));
    }
}

/// Prints a refusal: in JSON, the controller's whole error body; in text, its sentence
/// and one line per blocked VM.
pub fn print_refusal(e: &anyhow::Error, output: Output) -> anyhow::Result<ExitCode> {
    let Some(r) = e.downcast_ref::<Refusal>() else { return Err(anyhow!("{e:#}")) };
    match output {
        Output::Json => print_json(&r.body)?,
        Output::Text => {
            eprintln!("walkabout: {}", r.body["error"].as_str().unwrap_or(&r.message));
            for b in r.body["blocked"].as_array().into_iter().flatten() {
                eprintln!(
                    "  {} needs {}: {}",
                    clean(b["vm"].as_str().unwrap_or("?")),
                    clean(b["needs"].as_str().unwrap_or("?")),
                    clean(b["why"].as_str().unwrap_or(""))
                );
            }
        }
    }
    Ok(ExitCode::from(1))
}
