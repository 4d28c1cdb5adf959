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
    /// Who this command (or daemon) is: a bundle of certificate, key and cluster CA
    /// (`walkabout user add`, `walkabout host join`). Needed for https:// servers; a
    /// daemon given one serves mutual TLS with it.
    #[arg(long, global = true, env = "WALKABOUT_IDENTITY", value_name = "FILE")]
    identity: Option<std::path::PathBuf>,
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
    /// Hosts: what one offers (from its agent); the cluster's hosts, drain, undrain, remove.
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
    /// Checkpoints an agent holds (take one with `vm checkpoint`, restore with `vm restore`).
    #[command(subcommand)]
    Checkpoint(cli::checkpoint::CheckpointCommand),
    /// What an agent holds as a replica of other hosts' VMs; restore from it.
    #[command(subcommand)]
    Replica(cli::checkpoint::ReplicaCommand),
    /// Plan a safe order of migrations from a current to a target placement (offline).
    Plan(cli::plan::PlanArgs),
    /// Run the cluster controller: hosts, placement, plans, limits, events.
    Controller(cli::controller::ControllerArgs),
    /// Rebalance, consolidate, and review or run plans (against a controller).
    #[command(subcommand)]
    Cluster(cli::cluster::ClusterCommand),
    /// Automatic balancing: show it, set its level (manual, recommend, automatic) and threshold.
    #[command(subcommand)]
    Balance(cli::balance::BalanceCommand),
    /// Let VMs wander: each hop a live migration to a random host with room.
    Walk(cli::walk::WalkArgs),
    /// Failovers: the VMs of hosts that died, restored from their replicas or lost.
    #[command(subcommand)]
    Failover(cli::failover::FailoverCommand),
    /// Walkabout games.
    #[command(subcommand)]
    Game(cli::walk::GameCommand),
    /// The cluster's certificate authority.
    #[command(subcommand)]
    Ca(cli::ca::CaCommand),
    /// Operators' credentials: viewer (reads) or operator (changes).
    #[command(subcommand)]
    User(cli::user::UserCommand),
    /// A web console URL with a one-time login token (for an operator's or a viewer's
    /// session), from the controller serving the console.
    ConsoleUrl(cli::user::ConsoleUrlArgs),
    /// Print a shell completion script (e.g. `walkabout completions bash >
    /// /etc/bash_completion.d/walkabout`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Simulate a large cluster (1,000 hosts, 20,000 VMs by default) under the real
    /// controller: rolling maintenance, host failures, a lost rack, a day of load
    /// changes; JSON report + SVG.
    Sim(cli::sim::SimArgs),
}

fn main() -> std::process::ExitCode {
    let args = match cli::config::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walkabout: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    cli::client::set_timeout(cli.timeout);
    // `walkabout vm list | head`: a closed stdout ends a client command quietly. Servers
    // and supervisors keep SIGPIPE ignored and stop cleanly instead (see `cli::out`).
    if !matches!(cli.command, Command::Agent(_) | Command::Controller(_) | Command::Up(_) | Command::Demo(_)) {
        cli::out::end_quietly_on_closed_pipe();
    }
    // The interactive jobs print their own story; their logs default to warnings only.
    let default_level = match cli.command {
        Command::Up(_) | Command::Demo(_) => "warn",
        // A long simulation says how far it got.
        Command::Sim(_) => "warn,walkabout_sim=info",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WALKABOUT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(path) = &cli.identity {
        if let Err(e) = cli::ca::set_identity(path) {
            eprintln!("walkabout: {e:#}");
            return std::process::ExitCode::from(2);
        }
    }
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
        Command::Checkpoint(c) => cli::checkpoint::run(c),
        Command::Replica(c) => cli::checkpoint::run_replica(c),
        Command::Up(a) => cli::up::run(a),
        Command::Controller(a) => cli::controller::run(a),
        Command::Cluster(c) => cli::cluster::run(c),
        Command::Balance(c) => cli::balance::run(c),
        Command::Walk(a) => cli::walk::run_walk(a),
        Command::Game(c) => cli::walk::run_game(c),
        Command::Failover(c) => cli::failover::run(c),
        Command::Ca(c) => cli::ca::run(c),
        Command::User(c) => cli::user::run(c),
        Command::ConsoleUrl(a) => cli::user::console_url(a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "walkabout", &mut std::io::stdout());
            Ok(std::process::ExitCode::SUCCESS)
        }
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

    #[test]
    fn an_agent_config_file_parses_as_its_flags() {
        let file = std::env::temp_dir().join(format!("walkabout-agent-{}.toml", std::process::id()));
        std::fs::write(&file, "listen = \"127.0.0.1:7709\"\ndata-dir = \"/tmp/a\"\ninsecure-loopback = true\nboot-dir = [\"/srv/k\"]\n")
            .expect("write");
        let args: Vec<std::ffi::OsString> =
            ["walkabout", "agent", "--config"].iter().map(Into::into).chain([file.clone().into_os_string()]).collect();
        let cli = Cli::try_parse_from(cli::config::expand(args).expect("expand")).expect("parses");
        let _ = std::fs::remove_file(&file);
        assert!(matches!(cli.command, Command::Agent(_)));
    }

    #[test]
    fn bash_completions_know_the_subcommands() {
        let mut out = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut Cli::command(), "walkabout", &mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("complete -F") && text.contains("migrate") && text.contains("user"), "{}", &text[..text.len().min(400)]);
    }
}
