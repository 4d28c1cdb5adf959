//! `walkabout image`: build the guest image, or show the cached one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use walkabout_image::{GuestImage, Workload};

use super::client::{print_json, Output};

/// Where the image lives and how to print it.
#[derive(clap::Args)]
pub struct ImageArgs {
    /// The image cache [default: $WALKABOUT_CACHE, else $XDG_CACHE_HOME/walkabout, else
    /// ~/.cache/walkabout].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The workload the printed kernel command line starts (idle, dirty:<MiB>:<MiB/s>,
    /// disk:<MiB>:<MiB/s>, or dirty:...,disk:...).
    #[arg(long, default_value = "idle")]
    workload: Workload,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Also build the hypervisor guest's root disk (`hyper`: this walkabout and the
    /// host's QEMU inside, for nested VMs; see docs/nesting.md). With `build` only.
    #[arg(long)]
    hyper: bool,
}

/// `walkabout image ...`
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build (or reuse from the cache) the kernel + initramfs guest image and its root
    /// disk (a qcow2 with an ext4 root) and print their paths. Fetches the kernel and busybox Debian packages (never installs them).
    Build(ImageArgs),
    /// Print the paths of the cached guest image, without building or fetching anything.
    Path(ImageArgs),
}

/// What `walkabout image` reports.
#[derive(serde::Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    image: &'a GuestImage,
    cmdline: String,
    /// The hypervisor guest's root disk, with `--hyper`.
    #[serde(skip_serializing_if = "Option::is_none")]
    hyper: Option<PathBuf>,
}

fn print(image: &GuestImage, hyper: Option<PathBuf>, args: &ImageArgs) -> anyhow::Result<()> {
    let report = Report { image, cmdline: walkabout_image::cmdline(&args.workload), hyper };
    match args.output {
        Output::Json => print_json(&report),
        Output::Text => {
            println!("kernel  {} (Linux {})", image.kernel.display(), image.kernel_version);
            println!("initrd  {}", image.initrd.display());
            println!("rootfs  {} (qcow2, ext4; boot it with root=/dev/vda, or `vm create --disk image:guest`)", image.rootfs.display());
            println!("cmdline {}", report.cmdline);
            if let Some(h) = &report.hyper {
                println!("hyper   {} (qcow2, ext4: an agent and QEMU inside; with a seed disk on /dev/vdb)", h.display());
            }
            Ok(())
        }
    }
}

/// Runs `walkabout image ...`.
pub fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Build(args) => {
            let dir = args.cache_dir.clone().unwrap_or_else(walkabout_image::default_cache_dir);
            let image = walkabout_image::build(&dir).with_context(|| format!("building the guest image in {}", dir.display()))?;
            let hyper = if args.hyper {
                let exe = std::env::current_exe().context("finding this walkabout binary")?;
                let h = walkabout_image::build_hyper(&dir, &exe, "qemu-system-x86_64")
                    .with_context(|| format!("building the hypervisor guest's image in {}", dir.display()))?;
                Some(h.rootfs)
            } else {
                None
            };
            print(&image, hyper, &args)?;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Path(args) => {
            let dir = args.cache_dir.clone().unwrap_or_else(walkabout_image::default_cache_dir);
            let cached = walkabout_image::cached(&dir).with_context(|| format!("reading the image cache {}", dir.display()))?;
            let image =
                cached.with_context(|| format!("no guest image for this walkabout in {}; run `walkabout image build`", dir.display()))?;
            print(&image, None, &args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
