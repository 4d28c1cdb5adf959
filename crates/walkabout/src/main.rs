//! `walkabout`: the command line. Every subcommand is a thin shell over a crate.

mod cli;

use clap::{Parser, Subcommand};

/// Live migration, failover and placement for QEMU virtual machines.
#[derive(Parser)]
#[command(
    name = "walkabout",
    version,
    after_help = "Start with `walkabout up`: a whole cluster on this machine, guests walking about, \
                  then try `walkabout host list` and `walkabout host drain h1` in another terminal."
)]
struct Cli {
    /// Longest wait for any one answer of an agent or a controller (e.g. 500ms, 10s;
    /// a bare number is seconds). Long waits (`--wait`, following a plan, a guest
    /// booting) poll with short requests, each bounded by this, so they are not cut.
    #[arg(long, global = true, value_parser = cli::client::parse_timeout, default_value = cli::client::DEFAULT_TIMEOUT, value_name = "DURATION")]
    timeout: std::time::Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A controller, three agents and four guests walking about, on this machine: the
    /// main job (see also `demo`, a shorter tour without a controller).
    Up(cli::up::UpArgs),
    /// Three local agents and real guests hopping between them a set number of times,
    /// each hop's downtime printed; then everything is cleaned up.
    Demo(cli::demo::DemoArgs),
    /// Run the host daemon that owns this host's VMs.
    Agent(cli::agent::AgentArgs),
    /// Create, inspect and control VMs on an agent.
    #[command(subcommand)]
    Vm(cli::vm::VmCommand),
    /// CPU models across hosts: the cluster baseline.
    #[command(subcommand)]
    Cpu(cli::cpu::CpuCommand),
    /// Hosts: what one offers (from its agent); the cluster's hosts, drain, undrain.
    #[command(subcommand)]
    Host(cli::host::HostCommand),
    /// Build and inspect the guest image (kernel + initramfs).
    #[command(subcommand)]
    Image(cli::image::ImageCommand),
    /// Live-migrate a VM from one agent to another.
    Migrate(cli::migrate::MigrateArgs),
    /// List, show or cancel migrations.
    #[command(subcommand)]
    Migration(cli::migrate::MigrationCommand),
    /// Plan a safe order of migrations from a current to a target placement (offline).
    Plan(cli::plan::PlanArgs),
    /// Run the cluster controller: hosts, placement, plans, limits, events.
    Controller(cli::controller::ControllerArgs),
    /// Rebalance, consolidate, and review or run plans (against a controller).
    #[command(subcommand)]
    Cluster(cli::cluster::ClusterCommand),
    /// Let VMs wander: each hop a live migration to a random host with room.
    Walk(cli::walk::WalkArgs),
    /// Walkabout games.
    #[command(subcommand)]
    Game(cli::walk::GameCommand),
    /// Simulate a large cluster (1,000 hosts, 20,000 VMs by default) under the real
    /// controller: rolling maintenance, host failures, a lost rack; JSON report + SVG.
    Sim(cli::sim::SimArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli::client::set_timeout(cli.timeout);
    // `walkabout vm list | head`: a closed stdout ends a client command quietly. Servers
    // and supervisors keep SIGPIPE ignored and stop cleanly instead (see `cli::out`).
    if !matches!(cli.command, Command::Agent(_) | Command::Controller(_) | Command::Up(_) | Command::Demo(_)) {
        cli::out::end_quietly_on_closed_pipe();
    }
    // The interactive jobs print their own story; their logs default to warnings only.
    let default_level = match cli.command {
        Command::Up(_) | Command::Demo(_) | Command::Sim(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WALKABOUT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Agent(a) => cli::agent::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Vm(c) => cli::vm::run(c),
        Command::Host(c) => cli::host::run(c),
        Command::Cpu(c) => cli::cpu::run(c),
        Command::Image(c) => cli::image::run(c),
        Command::Plan(a) => cli::plan::run(a),
        Command::Migrate(a) => cli::migrate::run(a),
        Command::Migration(c) => cli::migrate::run_migration(c),
        Command::Up(a) => cli::up::run(a),
        Command::Controller(a) => cli::controller::run(a),
        Command::Cluster(c) => cli::cluster::run(c),
        Command::Walk(a) => cli::walk::run_walk(a),
        Command::Game(c) => cli::walk::run_game(c),
        Command::Sim(a) => cli::sim::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) if cli::out::is_closed_pipe(&e) => std::process::ExitCode::from(cli::out::CLOSED_PIPE_STATUS),
        Err(e) => {
            eprintln!("walkabout: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_timeout_is_global() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["walkabout", "host", "info", "--timeout", "2s"]).expect("parses");
        assert_eq!(cli.timeout, std::time::Duration::from_secs(2));
    }
}
