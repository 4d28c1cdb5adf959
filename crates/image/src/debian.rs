//! Fetching the parts of the guest image from Debian packages, without installing them:
//! `apt-cache depends` to find the concrete kernel package, `apt-get download` to fetch
//! a `.deb`, `dpkg -x` to unpack it into a scratch directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ImageError;

/// The meta-package whose dependency names the current kernel package.
pub(crate) const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
/// The package that provides a statically linked busybox.
pub(crate) const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Runs apt and dpkg; refreshes the package lists (`apt-get update`) at most once, the
/// first time a lookup or download fails, then retries it.
#[derive(Debug, Default)]
pub(crate) struct Apt {
    updated: bool,
}

/// Runs `program args...` and returns its stdout, or an error naming the command and
/// carrying its stderr.
fn run(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String, ImageError> {
    let command_line = std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    let mut command = Command::new(program);
    command.args(args).env("LC_ALL", "C").env("DEBIAN_FRONTEND", "noninteractive");
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    tracing::debug!(command = %command_line, "running");
    let output = command.output().map_err(|source| ImageError::Spawn { command: command_line.clone(), source })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(ImageError::Command {
            command: command_line,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The concrete kernel package (`linux-image-<version>-amd64`) named by
/// `apt-cache depends linux-image-amd64` output.
pub(crate) fn kernel_package_from_depends(depends: &str) -> Option<String> {
    depends.lines().find_map(|line| {
        let line = line.trim().trim_start_matches('|');
        let package = line.strip_prefix("Depends:")?.trim();
        let version = package.strip_prefix("linux-image-")?;
        version.starts_with(|c: char| c.is_ascii_digit()).then(|| package.to_owned())
    })
}

impl Apt {
    /// Runs `attempt`; if it fails and the package lists were not refreshed yet in this
    /// build, runs `apt-get update` and tries once more.
    fn with_update<T>(&mut self, mut attempt: impl FnMut() -> Result<T, ImageError>) -> Result<T, ImageError> {
        match attempt() {
            Ok(value) => Ok(value),
            Err(first) if !self.updated => {
                tracing::info!(error = %first, "refreshing the package lists (apt-get update) and retrying");
                self.updated = true;
                run("apt-get", &["update", "-qq"], None)?;
                attempt()
            }
            Err(e) => Err(e),
        }
    }

    /// The concrete kernel package the meta-package currently depends on.
    pub(crate) fn kernel_package(&mut self) -> Result<String, ImageError> {
        self.with_update(|| {
            let depends = run("apt-cache", &["depends", KERNEL_META_PACKAGE], None)?;
            kernel_package_from_depends(&depends)
                .ok_or_else(|| ImageError::NoKernelPackage { meta: KERNEL_META_PACKAGE, output: depends.trim().to_owned() })
        })
    }

    /// Downloads `package`'s `.deb` into `dir` (which holds nothing else) and returns its
    /// path.
    pub(crate) fn download(&mut self, package: &str, dir: &Path) -> Result<PathBuf, ImageError> {
        tracing::info!(package, "downloading (apt-get download; not installed)");
        self.with_update(|| {
            run("apt-get", &["download", "-q", package], Some(dir))?;
            find_with_extension(dir, "deb")?.ok_or_else(|| ImageError::MissingInPackage {
                package: package.to_owned(),
                wanted: "a .deb file after apt-get download".to_owned(),
            })
        })
    }
}

/// Unpacks `deb` into `dir` with `dpkg -x` (nothing is installed).
pub(crate) fn unpack(deb: &Path, dir: &Path) -> Result<(), ImageError> {
    let (deb, dir) = (deb.to_string_lossy(), dir.to_string_lossy());
    run("dpkg", &["-x", &deb, &dir], None).map(drop)
}

/// The first file in `dir` whose name ends in `.{extension}`.
fn find_with_extension(dir: &Path, extension: &str) -> Result<Option<PathBuf>, ImageError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ImageError::Io { action: "list", path: dir.to_owned(), source })?;
    Ok(entries.filter_map(Result::ok).map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == extension)))
}

/// The `vmlinuz-<version>` file in an unpacked kernel package's `boot/` and its version.
pub(crate) fn find_vmlinuz(unpacked: &Path) -> Result<Option<(PathBuf, String)>, ImageError> {
    let boot = unpacked.join("boot");
    let entries = std::fs::read_dir(&boot).map_err(|source| ImageError::Io { action: "list", path: boot.clone(), source })?;
    Ok(entries.filter_map(Result::ok).find_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        let version = name.strip_prefix("vmlinuz-")?.to_owned();
        Some((entry.path(), version))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_is_the_versioned_dependency() {
        let depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(kernel_package_from_depends(depends), Some("linux-image-6.1.0-56-amd64".into()));
    }

    #[test]
    fn alternative_dependency_lines_are_understood() {
        let depends = "linux-image-amd64\n |Depends: linux-image-6.12.9-amd64\n  Depends: foo\n";
        assert_eq!(kernel_package_from_depends(depends), Some("linux-image-6.12.9-amd64".into()));
    }

    #[test]
    fn unversioned_dependencies_are_skipped() {
        let depends = "linux-image-amd64\n  Depends: linux-image-amd64-signed\n  Depends: <linux-image-6>\n";
        assert_eq!(kernel_package_from_depends(depends), None);
    }

    #[test]
    fn missing_command_is_named() {
        let err = run("walkabout-no-such-program", &["--x"], None).expect_err("must fail");
        assert!(err.to_string().starts_with("cannot run `walkabout-no-such-program --x`"), "{err}");
    }

    #[test]
    fn failing_command_carries_its_stderr() {
        let err = run("sh", &["-c", "echo oops >&2; exit 3"], None).expect_err("must fail");
        assert_eq!(err.to_string(), "`sh -c echo oops >&2; exit 3` failed (exit status: 3): oops");
    }
}
