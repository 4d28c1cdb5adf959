//! `walkabout host`: what a host offers (from its agent); the cluster's hosts and their
//! maintenance (from the controller).

use super::client::{self, print_json, runtime, Output};
use super::table::{clean, wire, Align, Table};
use std::process::ExitCode;
use walkabout_api::{Host, HostInfo};

/// `walkabout host ...`
#[derive(clap::Subcommand)]
pub enum HostCommand {
    /// Show an agent's host: memory, CPUs, CPU model, accelerator (and why), QEMU.
    Info {
        /// The agent's URL.
        #[arg(long, env = "WALKABOUT_AGENT", default_value = super::vm::DEFAULT_AGENT)]
        agent: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List the cluster's hosts: up or down (since when, why), maintenance, memory, VMs.
    List(super::cluster::CtlArgs),
    /// Put a host in maintenance and move its VMs elsewhere, following the plan; refused
    /// up front, with each VM and why, when they do not fit elsewhere.
    Drain(HostAction),
    /// Take a host out of maintenance (cancels its drain if one runs).
    Undrain(HostAction),
    /// Take a host out of the cluster: no longer polled, planned for or listed. Refused
    /// while VMs run there (drain it first) or, for a host that is down, until its VMs'
    /// failovers have ended (a lost VM keeps its record until `walkabout vm delete`).
    Remove {
        #[command(flatten)]
        ctl: super::cluster::CtlArgs,
        /// The host's name (`walkabout host list`).
        host: String,
    },
    /// Ask the controller for a short-lived, single-use token for one host to join the
    /// cluster with (`walkabout host join` on that host). Operators only.
    Token {
        #[command(flatten)]
        ctl: super::cluster::CtlArgs,
        /// The host's name.
        host: String,
        /// How long the token is valid (e.g. 10m; at most 1h).
        #[arg(long, value_parser = super::client::parse_duration_ms, default_value = "10m")]
        ttl: u64,
    },
    /// Join this host to the cluster: make a key here, send its CSR with a join token to
    /// the controller, and write the host certificate it signs (with the key and the CA)
    /// as the agent's identity (`walkabout agent --identity FILE`).
    Join {
        /// The controller's URL (https://...).
        #[arg(long, env = "WALKABOUT_CONTROLLER", default_value = super::cluster::DEFAULT_CONTROLLER)]
        controller: String,
        /// This host's name (the token's).
        host: String,
        /// The token from `walkabout host token`.
        #[arg(long, env = "WALKABOUT_JOIN_TOKEN")]
        token: String,
        /// The cluster CA's certificate (ca.crt), to know the controller is ours.
        #[arg(long)]
        ca_cert: std::path::PathBuf,
        /// An address (IP or DNS name) other hosts reach this agent at; repeatable.
        #[arg(long = "address", required = true)]
        addresses: Vec<String>,
        /// Where to write the identity (default: HOST.pem here).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// A command on one host of the cluster.
#[derive(clap::Args)]
pub struct HostAction {
    #[command(flatten)]
    ctl: super::cluster::CtlArgs,
    /// The host's name (`walkabout host list`).
    host: String,
    /// Return once the drain runs instead of following it.
    #[arg(long)]
    no_wait: bool,
}

/// Runs `walkabout host ...`.
pub fn run(cmd: HostCommand) -> anyhow::Result<ExitCode> {
    let (agent, output) = match cmd {
        HostCommand::Info { agent, output } => (agent, output),
        HostCommand::List(c) => return runtime()?.block_on(list(c)),
        HostCommand::Drain(a) => return runtime()?.block_on(drain(a)),
        HostCommand::Undrain(a) => return runtime()?.block_on(undrain(a)),
        HostCommand::Remove { ctl, host } => return runtime()?.block_on(remove(ctl, host)),
        HostCommand::Token { ctl, host, ttl } => return runtime()?.block_on(token(ctl, host, ttl)),
        HostCommand::Join { controller, host, token, ca_cert, addresses, out } => {
            return runtime()?.block_on(join(JoinArgs { controller, host, token, ca_cert, addresses, out }))
        }
    };
    runtime()?.block_on(async move {
        let h = client::agent(&agent)?.host().await?;
        match output {
            Output::Json => print_json(&h)?,
            Output::Text => print!("{}", host_text(&h)),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// An agent's host for people.
fn host_text(h: &HostInfo) -> String {
    format!(
        "host:     {}\ncpu:      {} x {}\nmemory:   {} MiB total, {} MiB for VMs, {} MiB used, {} MiB free ({} VMs)\naccel:    {} ({})\nqemu:     {}\n",
        clean(&h.hostname),
        h.cpus,
        clean(&h.cpu_model),
        h.memory_total_mib,
        h.capacity_mib,
        h.used_mib,
        h.free_mib,
        h.vms,
        h.accel.accel,
        clean(&h.accel.reason),
        clean(&h.qemu.banner)
    )
}

async fn list(c: super::cluster::CtlArgs) -> anyhow::Result<ExitCode> {
    let hosts = client::controller(&c.controller)?.hosts().await?;
    match c.output {
        Output::Json => print_json(&hosts)?,
        Output::Text => print!("{}", hosts_text(&hosts)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The cluster's hosts as a table, then a line per host that is down and why.
fn hosts_text(hosts: &[Host]) -> String {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("STATUS", Align::Left),
        ("MAINT", Align::Left),
        ("CAPACITY", Align::Right),
        ("FREE", Align::Right),
        ("URL", Align::Left),
        ("VMS", Align::Left),
    ]);
    let mut down = String::new();
    for h in hosts {
        t.row([
            h.name.clone(),
            wire(&h.status),
            wire(&h.maintenance),
            format!("{}M", h.capacity_mib),
            format!("{}M", h.free_mib),
            h.url.clone(),
            h.vms.join(","),
        ]);
        if let Some(r) = &h.down_reason {
            down.push_str(&format!("{} down since {} ms after the epoch: {}\n", clean(&h.name), h.status_since_ms, clean(r)));
        }
    }
    t.render() + &down
}

async fn drain(a: HostAction) -> anyhow::Result<ExitCode> {
    let ctl = client::controller(&a.ctl.controller)?;
    match ctl.drain(&a.host).await {
        Ok(plan) => super::cluster::finish(&ctl, plan, &a.ctl, a.no_wait).await,
        Err(e) => super::cluster::print_refusal(&e, a.ctl.output),
    }
}

async fn token(ctl: super::cluster::CtlArgs, host: String, ttl_ms: u64) -> anyhow::Result<ExitCode> {
    let req = walkabout_api::JoinTokenRequest { host, ttl_s: Some(ttl_ms.div_ceil(1000).max(1)) };
    let t = client::controller(&ctl.controller)?.join_token(&req).await?;
    match ctl.output {
        Output::Json => print_json(&t)?,
        Output::Text => println!(
            "{}\n(for host {}; single use; run on it: walkabout host join {} --controller {} --token TOKEN --ca-cert ca.crt --address ADDR)",
            t.token,
            clean(&t.host),
            clean(&t.host),
            clean(&ctl.controller)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// What `walkabout host join` was given.
struct JoinArgs {
    controller: String,
    host: String,
    token: String,
    ca_cert: std::path::PathBuf,
    addresses: Vec<String>,
    out: Option<std::path::PathBuf>,
}

async fn join(a: JoinArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let out = a.out.unwrap_or_else(|| std::path::PathBuf::from(format!("{}.pem", a.host)));
    if out.exists() {
        anyhow::bail!("{} exists; refusing to overwrite an identity", out.display());
    }
    let ca_pem = std::fs::read_to_string(&a.ca_cert).with_context(|| format!("reading {}", a.ca_cert.display()))?;
    let (key_pem, csr_pem) = walkabout_trust::ca::csr(&a.host, &a.addresses)?;
    let tls = walkabout_trust::tls::anonymous_client_config(&ca_pem)?;
    let ctl = walkabout_api::ControllerClient::with_tls(&a.controller, client::options(), tls)?;
    let reply = ctl.join(&a.token, &walkabout_api::JoinRequest { host: a.host.clone(), csr_pem }).await?;
    if reply.ca_pem.trim() != ca_pem.trim() {
        anyhow::bail!("the controller answered with another CA than {}; not writing the identity", a.ca_cert.display());
    }
    let bundle = walkabout_trust::Bundle { cert_pem: reply.cert_pem, key_pem, ca_pem };
    let id = bundle.identity()?;
    bundle.save(&out)?;
    println!("{} joined as {id}: identity in {} (walkabout agent --identity {})", clean(&a.host), out.display(), out.display());
    Ok(ExitCode::SUCCESS)
}

async fn remove(ctl: super::cluster::CtlArgs, host: String) -> anyhow::Result<ExitCode> {
    client::controller(&ctl.controller)?.remove_host(&host).await?;
    match ctl.output {
        Output::Json => print_json(&serde_json::json!({ "removed": host }))?,
        Output::Text => println!("host {} removed from the cluster", clean(&host)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn undrain(a: HostAction) -> anyhow::Result<ExitCode> {
    let h = client::controller(&a.ctl.controller)?.undrain(&a.host).await?;
    match a.ctl.output {
        Output::Json => print_json(&h)?,
        Output::Text => println!("host {} is {}", clean(&a.host), wire(&h.maintenance)),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_host_is_listed_with_its_state_in_wire_words_and_why_it_is_down() {
        let h: Host = serde_json::from_value(serde_json::json!({"version": 1, "name": "h2", "url": "http://127.0.0.1:7702",
            "status": "down", "status_since_ms": 1000, "down_reason": "connection refused", "maintenance": "drain_failed",
            "capacity_mib": 2048, "free_mib": 512, "vms": ["g1", "g2"]}))
        .expect("a host");
        let text = hosts_text(&[h]);
        let row: Vec<&str> = text.lines().nth(1).unwrap_or_default().split_whitespace().collect();
        assert_eq!(row, ["h2", "down", "drain_failed", "2048M", "512M", "http://127.0.0.1:7702", "g1,g2"]);
        assert!(text.contains("h2 down since 1000 ms after the epoch: connection refused"), "{text}");
    }
}
