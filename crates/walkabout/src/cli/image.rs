//! `walkabout image`: build the guest image.

use std::process::ExitCode;

/// `walkabout image ...`
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build (or reuse from the cache) the kernel + initramfs guest image.
    Build,
}

/// Runs `walkabout image ...`.
pub fn run(_cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
