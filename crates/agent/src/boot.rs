//! What a VM spec may name that reaches the host's files or QEMU's option parser.
//!
//! - A kernel or initramfs only from the agent's image catalog (the directory of its
//!   default guest image) or a directory its operator configured (`--boot-dir`): the
//!   path is resolved (symlinks followed) without opening it, must lie inside one of
//!   those directories and be a regular file. Any other path, missing or not, readable
//!   or not, a directory or a FIFO, gets the same sentence: the agent runs as root and
//!   must not tell a caller which files exist, nor block opening a FIFO.
//! - A machine type or CPU model is a name (letters, digits, `-`, `_`, `.`), never an
//!   option string: a `,` would add sub-options to `-machine`/`-cpu`.
//! - Incoming migrations listen on the address the agent's configuration names.

use std::path::{Path, PathBuf};

impl crate::vms::Agent {
    /// The address this agent's incoming QEMUs listen on: its configuration's
    /// (`--migration-address`), never the request's (a source naming `0.0.0.0` would
    /// open the port to anyone who connects first).
    pub(crate) fn incoming_host(&self) -> String {
        self.inner.config.migration_address.clone().unwrap_or_else(|| "127.0.0.1".into())
    }
}

/// The pid a VM's run directory's `qemu.pid` names, if any (QEMU writes it when it
/// starts, before the agent records the pid).
pub fn pid_file(run_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(run_dir.join("qemu.pid")).ok()?.trim().parse().ok()
}

/// Stops the QEMUs of run directories under `vms_dir` that no record knows (`known`
/// are the recorded VM names): left by an agent killed between starting QEMU and
/// writing its record, by an older agent. A pid counts only while its command line
/// names that run directory (a reused pid is left alone). The directory is left for
/// the operator to look at (it may hold disks).
pub fn stop_orphans(vms_dir: &Path, known: &[String]) {
    let Ok(entries) = std::fs::read_dir(vms_dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if known.contains(&name) || !e.path().is_dir() {
            continue;
        }
        let dir = e.path();
        if let Some(pid) = pid_file(&dir) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(dir.to_string_lossy().as_ref()) {
                tracing::warn!(vm = %name, pid, "stopping an orphaned QEMU (no record of its VM)");
                // SAFETY: kill(2) with a pid read from the VM's own pid file whose command
                // line names its run directory; no memory is touched.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// The one refusal for a boot file the agent will not use.
pub fn refused(what: &str, path: &Path) -> String {
    format!("{what} {} is not a file of the agent's image catalog or boot directories (--boot-dir)", path.display())
}

/// `path` resolved, if it is a regular file inside one of `dirs`; else [`refused`].
pub fn checked_file(path: &Path, what: &str, dirs: &[PathBuf]) -> Result<PathBuf, String> {
    let no = || refused(what, path);
    let real = path.canonicalize().map_err(|_| no())?;
    let inside = dirs.iter().filter_map(|d| d.canonicalize().ok()).any(|d| real.starts_with(&d));
    // metadata, not open: a FIFO is refused without blocking.
    let regular = std::fs::metadata(&real).map(|m| m.file_type().is_file()).unwrap_or(false);
    if inside && regular {
        Ok(real)
    } else {
        Err(no())
    }
}

/// Whether `s` is a plain name QEMU can take as a machine type or CPU model.
pub fn plain_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wa-boot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn a_file_outside_the_boot_directories_gets_one_answer_whatever_it_is() {
        let dir = temp("outside");
        let allowed = vec![dir.clone()];
        let answers: Vec<String> = ["/etc/shadow", "/etc", "/nonexistent/vmlinuz", "/proc/self/mem"]
            .iter()
            .map(|p| checked_file(Path::new(p), "kernel", &allowed).expect_err("refused"))
            .collect();
        for (a, p) in answers.iter().zip(["/etc/shadow", "/etc", "/nonexistent/vmlinuz", "/proc/self/mem"]) {
            assert_eq!(*a, refused("kernel", Path::new(p)));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fifo_or_an_escaping_symlink_inside_is_refused_without_blocking() {
        let dir = temp("fifo");
        let allowed = vec![dir.clone()];
        let fifo = dir.join("vmlinuz");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("path");
        // SAFETY: mkfifo on a NUL-terminated path we own; the return value is checked.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(checked_file(&fifo, "kernel", &allowed), Err(refused("kernel", &fifo)));
        let link = dir.join("escape");
        std::os::unix::fs::symlink("/etc/hostname", &link).expect("symlink");
        assert_eq!(checked_file(&link, "kernel", &allowed), Err(refused("kernel", &link)));
        let good = dir.join("bzImage");
        std::fs::write(&good, b"x").expect("write");
        assert_eq!(checked_file(&good, "kernel", &allowed), good.canonicalize().map_err(|e| e.to_string()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_orphaned_run_directory_is_found_and_its_qemu_stopped() {
        let vms = temp("orphans");
        let dir = vms.join("lost");
        std::fs::create_dir_all(&dir).expect("dir");
        // A stand-in for QEMU whose command line names its run directory.
        let mut child =
            std::process::Command::new("sh").args(["-c", "sleep 30; true", dir.to_str().expect("utf8")]).spawn().expect("spawn");
        std::fs::write(dir.join("qemu.pid"), child.id().to_string()).expect("pid");
        // Until the child has exec'd, its command line is still this test's.
        let named =
            || String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default()).contains("orphans");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !named() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let kept = vms.join("known");
        std::fs::create_dir_all(&kept).expect("dir");
        stop_orphans(&vms, &["known".to_string()]);
        let status = child.wait().expect("wait");
        assert!(!status.success(), "the orphan was not stopped: {status:?}");
        assert!(kept.exists());
        let _ = std::fs::remove_dir_all(&vms);
    }

    #[test]
    fn machine_and_cpu_names_carry_no_options() {
        assert!(plain_name("pc-q35-10.0"));
        assert!(plain_name("Skylake-Client-v4"));
        assert!(!plain_name("q35,accel=kvm"));
        assert!(!plain_name("max,+avx512f"));
        assert!(!plain_name("host\nx"));
        assert!(!plain_name(""));
    }
}
