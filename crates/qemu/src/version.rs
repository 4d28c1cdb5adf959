//! The QEMU version gate: Walkabout refuses QEMU older than 10.

use crate::QemuError;
use std::process::Command;

/// The oldest QEMU major version Walkabout accepts.
pub const MIN_MAJOR: u32 = 10;

pub use walkabout_api::QemuVersion;

/// Parses the output of `qemu-system-x86_64 --version`.
pub fn parse(output: &str) -> Option<QemuVersion> {
    let line = output.lines().next()?.trim();
    let rest = line.split("version ").nth(1)?;
    let num = rest.split(|c: char| c.is_whitespace() || c == '(').next()?;
    let mut parts = num.split('.').map(|p| p.parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next().and_then(Result::ok).unwrap_or(0);
    let micro = parts.next().and_then(Result::ok).unwrap_or(0);
    Some(QemuVersion { major, minor, micro, banner: line.to_string() })
}

/// Runs `binary --version` and refuses versions older than [`MIN_MAJOR`].
pub fn check(binary: &str) -> Result<QemuVersion, QemuError> {
    let out = Command::new(binary).arg("--version").output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            QemuError::Missing { binary: binary.to_string() }
        } else {
            QemuError::io(format!("running `{binary} --version`"), e)
        }
    })?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v = parse(&text)
        .ok_or_else(|| QemuError::UnknownVersion { binary: binary.to_string(), output: text.trim().chars().take(200).collect() })?;
    if v.major < MIN_MAJOR {
        return Err(QemuError::TooOld { binary: binary.to_string(), found: v.to_string(), need: MIN_MAJOR });
    }
    Ok(v)
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_backports_banner() {
        let v = parse("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright").expect("parses");
        assert_eq!((v.major, v.minor, v.micro), (10, 0, 2));
    }

    #[test]
    fn parses_two_part_version() {
        let v = parse("QEMU emulator version 7.2").expect("parses");
        assert_eq!((v.major, v.minor, v.micro), (7, 2, 0));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("hello").is_none());
    }
}
