//! Disk images through `qemu-img`: inspect (format, size, backing chain), check, create.
//!
//! Walkabout has no image-format code of its own: QEMU's block layer (over QMP) and
//! `qemu-img` (here) do all image work. `qemu-img` runs with a timeout and is killed if it
//! overruns, so a path that never answers (a FIFO, a hung mount) cannot hang the caller.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use walkabout_api::DiskFormat;

/// How long one `qemu-img` call may take.
pub const IMG_TIMEOUT: Duration = Duration::from_secs(20);

/// What is wrong with an image, or with running `qemu-img` on it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file does not exist.
    #[error("disk image {path} does not exist")]
    Missing {
        /// The image.
        path: PathBuf,
    },
    /// The path is not a regular file (a directory, a FIFO, a device...).
    #[error("disk image {path} is not a regular file")]
    NotAFile {
        /// The image.
        path: PathBuf,
    },
    /// `qemu-img` could not read the image: a corrupt header, a truncated file, an
    /// unknown format.
    #[error("disk image {path} cannot be opened: {detail}")]
    Unreadable {
        /// The image.
        path: PathBuf,
        /// What `qemu-img` said.
        detail: String,
    },
    /// A backing file of the image's chain is missing.
    #[error("disk image {path}: its backing file {backing} is missing")]
    BackingMissing {
        /// The image.
        path: PathBuf,
        /// The missing backing file, as the image names it.
        backing: String,
    },
    /// Another process (another VM's QEMU) holds the image's write lock.
    #[error("disk image {path} is in use by another process (its write lock is held)")]
    InUse {
        /// The image.
        path: PathBuf,
    },
    /// `qemu-img check` found corruption.
    #[error("disk image {path} is corrupt: {corruptions} corruptions, {errors} check errors")]
    Corrupt {
        /// The image.
        path: PathBuf,
        /// Corrupt clusters or tables.
        corruptions: u64,
        /// Errors while checking.
        errors: u64,
    },
    /// `qemu-img` failed for another reason, or is missing.
    #[error("`{command}` failed: {detail}")]
    Tool {
        /// The command line.
        command: String,
        /// Its error output or the spawn error.
        detail: String,
    },
    /// `qemu-img` did not finish in time and was killed.
    #[error("`{command}` did not finish within {} s", .timeout.as_secs())]
    Timeout {
        /// The command line.
        command: String,
        /// The time allowed.
        timeout: Duration,
    },
}

/// One layer of an image's backing chain as `qemu-img info` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The layer's file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Guest-visible size, bytes.
    pub virtual_size: u64,
    /// Bytes the file occupies on the host.
    pub actual_size: u64,
    /// Its backing file, resolved (absent for the base).
    pub backing: Option<PathBuf>,
}

#[derive(Deserialize)]
struct RawInfo {
    filename: String,
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: u64,
    #[serde(rename = "full-backing-filename", default)]
    full_backing: Option<String>,
}

#[derive(Deserialize)]
struct RawCheck {
    #[serde(default)]
    corruptions: u64,
    #[serde(rename = "check-errors", default)]
    check_errors: u64,
}

/// The `qemu-img` tool.
#[derive(Debug, Clone)]
pub struct QemuImg {
    binary: String,
}

impl Default for QemuImg {
    fn default() -> Self {
        QemuImg { binary: "qemu-img".into() }
    }
}

impl QemuImg {
    /// A `qemu-img` at `binary` (a name on `PATH` or a path).
    pub fn new(binary: impl Into<String>) -> QemuImg {
        QemuImg { binary: binary.into() }
    }

    /// The binary this runs (a name on `PATH` or a path).
    pub fn binary(&self) -> &str {
        &self.binary
    }

    /// The `qemu-img` beside a `qemu-system-*` binary given by path, or the one on `PATH`.
    pub fn beside(qemu_system: &str) -> QemuImg {
        let p = Path::new(qemu_system);
        match p.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) if dir.join("qemu-img").exists() => QemuImg::new(dir.join("qemu-img").display().to_string()),
            _ => QemuImg::default(),
        }
    }

    /// The image's whole backing chain, top layer first, with `format` when known (else
    /// probed). Refuses a missing path, a non-regular file, an unreadable image, a
    /// missing backing file, and an image whose write lock another process holds.
    pub async fn chain(&self, path: &Path, format: Option<DiskFormat>) -> Result<Vec<ImageInfo>, ImageError> {
        self.chain_with(path, format, false).await
    }

    /// The backing chain of an image another process may hold open and locked (a
    /// running VM's, on shared storage): read without taking a lock (`-U`). Refuses a
    /// missing path, an unreadable image and a missing backing file.
    pub async fn chain_in_use(&self, path: &Path, format: Option<DiskFormat>) -> Result<Vec<ImageInfo>, ImageError> {
        self.chain_with(path, format, true).await
    }

    async fn chain_with(&self, path: &Path, format: Option<DiskFormat>, unlocked: bool) -> Result<Vec<ImageInfo>, ImageError> {
        regular_file(path)?;
        let mut args: Vec<String> = vec!["info".into(), "--output=json".into(), "--backing-chain".into()];
        if unlocked {
            args.push("-U".into());
        }
        if let Some(f) = format {
            args.extend(["-f".into(), f.as_str().into()]);
        }
        args.push(path.display().to_string());
        let out = self.run(&args).await?;
        if !out.status.success() {
            return Err(classify(path, &String::from_utf8_lossy(&out.stderr)));
        }
        let raw: Vec<RawInfo> = serde_json::from_slice(&out.stdout)
            .map_err(|e| ImageError::Tool { command: self.line(&args), detail: format!("unexpected output: {e}") })?;
        raw.into_iter()
            .map(|r| {
                let format = r.format.parse::<DiskFormat>().map_err(|_| ImageError::Unreadable {
                    path: PathBuf::from(&r.filename),
                    detail: format!("format '{}' is not supported (qcow2 or raw)", r.format),
                })?;
                Ok(ImageInfo {
                    path: PathBuf::from(r.filename),
                    format,
                    virtual_size: r.virtual_size,
                    actual_size: r.actual_size,
                    backing: r.full_backing.map(PathBuf::from),
                })
            })
            .collect()
    }

    /// Checks a qcow2 image's metadata (`qemu-img check`); raw images have none.
    pub async fn check(&self, path: &Path, format: DiskFormat) -> Result<(), ImageError> {
        if format == DiskFormat::Raw {
            return Ok(());
        }
        let args: Vec<String> = vec!["check".into(), "--output=json".into(), "-f".into(), "qcow2".into(), path.display().to_string()];
        let out = self.run(&args).await?;
        // Exit status 2 = corruptions, 3 = leaks only (harmless), 1 = could not check.
        // Only a JSON object is a report: serde would read `[]` as a struct of defaults,
        // that is as a clean image.
        let report = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().filter(serde_json::Value::is_object);
        if let Some(Ok(r)) = report.map(serde_json::from_value::<RawCheck>) {
            if r.corruptions > 0 || r.check_errors > 0 {
                return Err(ImageError::Corrupt { path: path.into(), corruptions: r.corruptions, errors: r.check_errors });
            }
            return Ok(());
        }
        Err(classify(path, &String::from_utf8_lossy(&out.stderr)))
    }

    /// Creates an image of `size_bytes` (a qcow2 may sit on a `backing` image, in which
    /// case its size defaults to the backing's). Refuses to overwrite an existing file.
    pub async fn create(
        &self,
        path: &Path,
        format: DiskFormat,
        size_bytes: Option<u64>,
        backing: Option<(&Path, DiskFormat)>,
    ) -> Result<(), ImageError> {
        if path.exists() {
            return Err(ImageError::Tool {
                command: format!("{} create {}", self.binary, path.display()),
                detail: "the file already exists".into(),
            });
        }
        let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), format.as_str().into()];
        if let Some((b, bf)) = backing {
            args.extend(["-b".into(), b.display().to_string(), "-F".into(), bf.as_str().into()]);
        }
        args.push(path.display().to_string());
        if let Some(s) = size_bytes {
            args.push(s.to_string());
        }
        let out = self.run(&args).await?;
        if !out.status.success() {
            return Err(ImageError::Tool { command: self.line(&args), detail: String::from_utf8_lossy(&out.stderr).trim().to_string() });
        }
        Ok(())
    }

    async fn run(&self, args: &[String]) -> Result<std::process::Output, ImageError> {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
        match tokio::time::timeout(IMG_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(ImageError::Tool { command: self.line(args), detail: e.to_string() }),
            Err(_) => Err(ImageError::Timeout { command: self.line(args), timeout: IMG_TIMEOUT }),
        }
    }

    fn line(&self, args: &[String]) -> String {
        format!("{} {}", self.binary, args.join(" "))
    }
}

/// Refuses anything but an existing regular file (following symlinks), before any tool
/// opens it: a FIFO or a device must not be opened at all.
fn regular_file(path: &Path) -> Result<(), ImageError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ImageError::Missing { path: path.into() }),
        Err(e) => Err(ImageError::Unreadable { path: path.into(), detail: e.to_string() }),
        Ok(m) if !m.is_file() => Err(ImageError::NotAFile { path: path.into() }),
        Ok(_) => Ok(()),
    }
}

/// Turns `qemu-img`'s error text into the cause it names.
fn classify(path: &Path, stderr: &str) -> ImageError {
    let text = stderr.trim();
    if text.contains("Failed to get shared \"write\" lock") || text.contains("Failed to get \"write\" lock") {
        return ImageError::InUse { path: path.into() };
    }
    // With --backing-chain a missing layer is named by its own path:
    // "qemu-img: Could not open '/b.qcow2': Could not open '/b.qcow2': No such file or directory";
    // without, "Could not open backing file: Could not open '/b.qcow2': ...".
    if text.contains("No such file or directory") {
        let missing = text.rsplit("Could not open '").next().and_then(|r| r.split('\'').next()).unwrap_or("?").to_string();
        if Path::new(&missing) != path {
            return ImageError::BackingMissing { path: path.into(), backing: missing };
        }
        return ImageError::Missing { path: path.into() };
    }
    ImageError::Unreadable { path: path.into(), detail: text.lines().last().unwrap_or("qemu-img failed").to_string() }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("walkabout-img-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }

    #[test]
    fn errors_are_classified_from_qemu_img_text() {
        let p = Path::new("/x.qcow2");
        let locked =
            "qemu-img: Could not open '/x.qcow2': Failed to get shared \"write\" lock\nIs another process using the image [/x.qcow2]?";
        assert!(matches!(classify(p, locked), ImageError::InUse { .. }));
        for backing in [
            "qemu-img: Could not open '/x.qcow2': Could not open backing file: Could not open '/b.qcow2': No such file or directory",
            "qemu-img: Could not open '/b.qcow2': Could not open '/b.qcow2': No such file or directory",
        ] {
            match classify(p, backing) {
                ImageError::BackingMissing { backing, .. } => assert_eq!(backing, "/b.qcow2"),
                e => panic!("{e}"),
            }
        }
        assert!(matches!(classify(p, "qemu-img: Could not open '/x.qcow2': Image is not in qcow2 format"), ImageError::Unreadable { .. }));
    }

    #[tokio::test]
    async fn a_chain_is_read_and_its_faults_named() {
        let d = scratch("chain");
        let img = QemuImg::default();
        let base = d.join("base.qcow2");
        let top = d.join("top.qcow2");
        img.create(&base, DiskFormat::Qcow2, Some(64 << 20), None).await.expect("base");
        img.create(&top, DiskFormat::Qcow2, None, Some((&base, DiskFormat::Qcow2))).await.expect("top");
        let chain = img.chain(&top, None).await.expect("chain");
        assert_eq!(chain.len(), 2);
        assert_eq!((chain[0].virtual_size, chain[0].backing.as_deref()), (64 << 20, Some(base.as_path())));
        img.check(&top, DiskFormat::Qcow2).await.expect("clean image checks");
        assert!(img.create(&top, DiskFormat::Qcow2, Some(1 << 20), None).await.is_err(), "no overwrite");

        std::fs::remove_file(&base).expect("rm base");
        assert!(matches!(img.chain(&top, None).await, Err(ImageError::BackingMissing { .. })));
        assert!(matches!(img.chain(&d.join("nope"), None).await, Err(ImageError::Missing { .. })));
        assert!(matches!(img.chain(&d, None).await, Err(ImageError::NotAFile { .. })));
        let garbage = d.join("garbage.qcow2");
        std::fs::write(&garbage, b"QFI\xfbnot really a qcow2 header at all").expect("write");
        assert!(matches!(img.chain(&garbage, Some(DiskFormat::Qcow2)).await, Err(ImageError::Unreadable { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }
}
