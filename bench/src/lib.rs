//! Shared helpers of the benchmarks: where the workspace, the built `walkabout` binary
//! and the QEMU peer live; agents from the testbed driven through the CLI, its JSON read
//! into `walkabout-api`'s types; commands run with a deadline; small statistics.
//!
//! The benchmarks shell out to the real binaries and scripts, as an operator would.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use walkabout_api::VmInfo;
use walkabout_testbed::{Agent, AgentSpec, KillOnDrop};

/// Parses a `--bandwidth` list: comma-separated MiB/s, or `default` (no cap).
pub fn parse_bandwidths(text: &str) -> Result<Vec<Option<u64>>> {
    text.split(',')
        .map(|b| match b.trim() {
            "default" => Ok(None),
            n => n.parse::<u64>().map(Some).context("--bandwidth: 'default' or MiB/s"),
        })
        .collect()
}

/// The workspace root (the directory holding the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else `target/` under the workspace root.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let p = PathBuf::from(d);
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The `walkabout` binary a benchmark runs: a private copy, so that a rebuild of
/// `target/release/walkabout` during a long run cannot change the binary under it.
/// The copy is removed on drop.
pub struct WalkaboutBin {
    /// The copy's path.
    pub path: PathBuf,
    /// Where it was copied from, and what it was built from.
    pub provenance: Value,
}

impl Drop for WalkaboutBin {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Builds the release `walkabout` binary (`cargo build --release -p walkabout`, a no-op
/// when it is up to date; skipped when `build` is false) and returns a private copy of
/// `target/release/walkabout`.
pub fn build_walkabout(build: bool) -> Result<WalkaboutBin> {
    walkabout_copy(&target_dir().join("release").join("walkabout"), build)
}

/// A private copy of the `walkabout` binary at `bin`, built first with
/// `cargo build --release -p walkabout` when `build` is true.
pub fn walkabout_copy(bin: &Path, build: bool) -> Result<WalkaboutBin> {
    if build {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("bench: cargo build --release -p walkabout");
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "walkabout"])
            .current_dir(workspace_root())
            .stdout(Stdio::null())
            .status()
            .context("running cargo build --release -p walkabout")?;
        if !status.success() {
            bail!(
                "cargo build --release -p walkabout failed ({status}); to bench the binary already at {}, pass --no-build",
                bin.display()
            );
        }
    }
    if !bin.is_file() {
        bail!("{} is missing: build it with `cargo build --release -p walkabout`", bin.display());
    }
    let dir = PathBuf::from(format!("/tmp/wab-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("walkabout");
    std::fs::copy(bin, &path).with_context(|| format!("copying {}", bin.display()))?;
    let git = |args: &[&str]| stdout_of("git", args);
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let provenance = json!({
        "binary": bin.display().to_string(),
        "built_unix_s": built.map(|d| d.as_secs()),
        "git_head_when_benched": git(&["rev-parse", "--short", "HEAD"]),
        "uncommitted_changes_in_crates": !git(&["status", "--porcelain", "--", "crates", "Cargo.toml", "Cargo.lock"]).is_empty(),
    });
    Ok(WalkaboutBin { path, provenance })
}

/// The QEMU peer's scripts: `../shared/peers/qemu/` relative to the workspace root.
pub fn peer_dir() -> Result<PathBuf> {
    let d = workspace_root().join("../shared/peers/qemu");
    if !d.join("migrate-bench.py").is_file() || !d.join("build-guest.sh").is_file() {
        bail!("the QEMU peer is missing: expected build-guest.sh and migrate-bench.py in {}", d.display());
    }
    Ok(d.canonicalize().unwrap_or(d))
}

/// The peer's guest (vmlinuz + initrd.gz), built by the peer's own `build-guest.sh` into
/// `target/bench/qemu-peer-guest` the first time and reused after.
pub fn peer_guest() -> Result<PathBuf> {
    let out = target_dir().join("bench").join("qemu-peer-guest");
    if out.join("vmlinuz").is_file() && out.join("initrd.gz").is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let script = peer_dir()?.join("build-guest.sh");
    eprintln!("bench: building the peer's guest: {} {}", script.display(), out.display());
    let status = Command::new(&script).arg(&out).stdout(Stdio::null()).status().context("running build-guest.sh")?;
    if !status.success() || !out.join("vmlinuz").is_file() {
        bail!("{} {} failed ({status})", script.display(), out.display());
    }
    Ok(out)
}

/// What the QEMU-side benches need before anything is timed.
pub struct Prepared {
    /// The walkabout binary benched.
    pub walkabout: WalkaboutBin,
    /// The QEMU peer's scripts.
    pub peer: PathBuf,
    /// The peer's guest.
    pub guest: PathBuf,
}

/// Builds (or finds) the walkabout binary, the peer's guest, and Walkabout's own guest
/// image (built or found in its cache), so none of it lands in a timed run.
pub fn prepare(build: bool) -> Result<Prepared> {
    let walkabout = build_walkabout(build)?;
    let peer = peer_dir()?;
    let guest = peer_guest()?;
    guest_image(&walkabout.path)?;
    Ok(Prepared { walkabout, peer, guest })
}

/// Builds Walkabout's own guest image with `bin image build` (or finds it in its cache).
pub fn guest_image(bin: &Path) -> Result<()> {
    let out = Command::new(bin).args(["image", "build"]).env("WALKABOUT_LOG", "warn").output()?;
    if !out.status.success() {
        bail!("walkabout image build failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `qemu-system-x86_64 --version`, first line.
pub fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The trimmed stdout of `cmd ARGS` run in the workspace root; empty when it cannot run.
fn stdout_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// What the results depend on: date, CPUs, load, QEMU version, kernel, git commit.
pub fn environment() -> Value {
    let sh = stdout_of;
    json!({
        "date": sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "kernel": sh("uname", &["-r"]),
        "qemu": qemu_version(),
        "accel": "tcg",
    })
}

/// Output of a command run with a deadline.
pub struct Ran {
    /// Exit status; `None` when it was killed at the deadline.
    pub status: Option<ExitStatus>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub wall: Duration,
}

/// Runs `cmd` to its end or kills it after `limit`; stdout and stderr go to temporary
/// files (so nothing blocks on a full pipe) and are read back.
pub fn run_with_deadline(mut cmd: Command, limit: Duration, scratch: &Path, tag: &str) -> Result<Ran> {
    let out_path = scratch.join(format!("{tag}.out"));
    let err_path = scratch.join(format!("{tag}.err"));
    let out = std::fs::File::create(&out_path)?;
    let err = std::fs::File::create(&err_path)?;
    let start = Instant::now();
    let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let mut p = KillOnDrop(child);
    let status = loop {
        if let Some(s) = p.0.try_wait()? {
            break Some(s);
        }
        if start.elapsed() > limit {
            break None; // KillOnDrop kills it
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall = start.elapsed();
    drop(p);
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(err_path);
    Ok(Ran { status, stdout, stderr, wall })
}

/// Starts a `walkabout agent` of `bin` on a free loopback port under TCG, in a
/// temporary data directory; on drop the testbed kills it, its QEMUs, and removes the
/// directory.
pub fn start_agent(bin: &Path) -> Result<Agent> {
    Ok(Agent::start(AgentSpec::new(bin).env("WALKABOUT_LOG", "warn"))?)
}

/// The CLI calls the benchmarks make against an agent.
pub trait AgentCli {
    /// `walkabout ARGS --agent URL --output json`, parsed as a `T` (`VmInfo` for
    /// `vm info`, [`Created`] for `vm create`...); an error carries stderr.
    fn cli<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T>;

    /// `walkabout ARGS --agent URL --output json`, whose output is not read (`vm delete`);
    /// an error carries stderr.
    fn cli_ok(&self, args: &[&str]) -> Result<()>;
}

impl AgentCli for Agent {
    fn cli<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let stdout = cli_stdout(self, args)?;
        serde_json::from_slice(&stdout).with_context(|| {
            format!("walkabout {}: not a {}: {}", args.join(" "), std::any::type_name::<T>(), String::from_utf8_lossy(&stdout))
        })
    }

    fn cli_ok(&self, args: &[&str]) -> Result<()> {
        cli_stdout(self, args).map(drop)
    }
}

/// Runs `walkabout ARGS --agent URL --output json` against `agent`; its stdout, or an
/// error with stderr.
fn cli_stdout(agent: &Agent, args: &[&str]) -> Result<Vec<u8>> {
    let out = agent.command(args).args(["--output", "json"]).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("walkabout {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// `walkabout vm create --output json`: the VM as the agent reports it, plus the CLI's
/// own `create_ms` (POST to the guest's READY seen).
#[derive(Debug, Clone, Deserialize)]
pub struct Created {
    /// The VM.
    #[serde(flatten)]
    pub vm: VmInfo,
    /// Milliseconds from the create request to READY.
    pub create_ms: u64,
}

/// `walkabout migrate VM --to DEST --wait --output json`: the one summary it ends with.
pub use walkabout_api::MigrationSummary as MigrateSummary;

/// Median, minimum and maximum of `xs` (the median of an even count is the mean of the
/// middle two); `None` when empty.
pub fn stats(xs: &[f64]) -> Option<(f64, f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some((med, v[0], v[n - 1]))
}

/// The median of `xs`, `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    stats(xs).map(|s| s.0)
}

/// `a / b` rounded to 3 decimals, `None` unless both are known and `b > 0`.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(round3(a / b)),
        _ => None,
    }
}

/// Rounds to 3 decimals.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
