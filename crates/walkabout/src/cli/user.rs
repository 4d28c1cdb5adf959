//! `walkabout user add`: an operator's credentials, signed by the cluster CA: a viewer
//! reads everything and changes nothing; an operator may change everything.
//! `walkabout console-url`: a web console URL with a one-time login token for a session
//! of either role.

use std::path::PathBuf;
use std::process::ExitCode;
use walkabout_trust::{Ca, Role};

/// The roles a user may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UserRole {
    /// Reads everything, changes nothing.
    Viewer,
    /// Reads and changes everything.
    Operator,
}

/// `walkabout user ...`
#[derive(clap::Subcommand)]
pub enum UserCommand {
    /// Issue credentials for a user: one file (certificate, key, CA) to pass with
    /// `--identity` (or WALKABOUT_IDENTITY).
    Add {
        /// The user's name (letters, digits, '-', '_', '.'); recorded with each change.
        name: String,
        /// What the user may do.
        #[arg(long, value_enum)]
        role: UserRole,
        /// The cluster CA's directory (`walkabout ca init`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write the credentials (default: NAME.pem here).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Runs `walkabout user ...`.
pub fn run(cmd: UserCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        UserCommand::Add { name, role, ca_dir, out } => {
            let ca = Ca::load(&ca_dir)?;
            let role = match role {
                UserRole::Viewer => Role::Viewer,
                UserRole::Operator => Role::Operator,
            };
            let bundle = ca.issue(&name, role, &[])?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.pem")));
            if out.exists() {
                anyhow::bail!("{} exists; refusing to overwrite credentials", out.display());
            }
            bundle.save(&out)?;
            super::out::line(format_args!(
                "{name} ({role}): credentials in {} (walkabout --identity {} ...)",
                out.display(),
                out.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Arguments of `walkabout console-url`.
#[derive(clap::Args)]
pub struct ConsoleUrlArgs {
    #[command(flatten)]
    ctl: super::cluster::CtlArgs,
    /// The session's role: a viewer sees everything and changes nothing.
    #[arg(long, value_enum, default_value_t = UserRole::Operator)]
    role: UserRole,
    /// How long the token may wait to be used (e.g. 10m, 1h).
    #[arg(long, value_parser = super::client::parse_duration_ms)]
    ttl: Option<u64>,
}

/// Runs `walkabout console-url`: asks the controller for a login and prints its URL.
pub fn console_url(a: ConsoleUrlArgs) -> anyhow::Result<ExitCode> {
    super::client::runtime()?.block_on(async move {
        let role = match a.role {
            UserRole::Viewer => walkabout_api::ConsoleRole::Viewer,
            UserRole::Operator => walkabout_api::ConsoleRole::Operator,
        };
        let req = walkabout_api::ConsoleLoginRequest { role, ttl_s: a.ttl.map(|ms| ms.div_ceil(1000)) };
        let login = super::client::controller(&a.ctl.controller)?.console_login(&req).await?;
        match a.ctl.output {
            super::client::Output::Json => super::client::print_json(&login)?,
            super::client::Output::Text => super::out::line(format_args!("{}", login.url))?,
        }
        Ok(ExitCode::SUCCESS)
    })
}
