//! `walkabout ca init`: the cluster CA; and the identity this process speaks with
//! (`--identity FILE`, a bundle from `walkabout user add` or `walkabout host join`).

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use walkabout_trust::{Bundle, Ca};

/// `walkabout ca ...`
#[derive(clap::Subcommand)]
pub enum CaCommand {
    /// Create the cluster CA in a directory (ca.crt, and ca.key readable by you only).
    /// Give the directory to the controller (`--ca-dir`); keep ca.key secret.
    Init {
        /// Directory for the CA (created; never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's name, written into the CA's certificate.
        #[arg(long, default_value = "walkabout")]
        cluster: String,
    },
}

/// Runs `walkabout ca ...`.
pub fn run(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCommand::Init { dir, cluster } => {
            Ca::init(&dir, &cluster)?;
            super::out::line(format_args!(
                "cluster CA created in {}: give it to the controller (walkabout controller --ca-dir {}), add operators with `walkabout user add`",
                dir.display(),
                dir.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The identity bundle this process was given with `--identity`.
static IDENTITY: OnceLock<Bundle> = OnceLock::new();

/// Loads `--identity FILE` and makes it the TLS identity of every client this process
/// makes (`https://` URLs). Called once by `main`.
pub fn set_identity(path: &Path) -> anyhow::Result<()> {
    let b = Bundle::load(path).with_context(|| format!("reading the identity {}", path.display()))?;
    let tls = walkabout_trust::tls::client_config(&b)?;
    walkabout_api::client::set_process_tls(tls);
    let _ = IDENTITY.set(b);
    Ok(())
}

/// The identity given with `--identity`, if any.
pub fn identity() -> Option<&'static Bundle> {
    IDENTITY.get()
}
