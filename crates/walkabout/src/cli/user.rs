//! `walkabout user add`: an operator's credentials, signed by the cluster CA: a viewer
//! reads everything and changes nothing; an operator may change everything.

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
