//! Standard output when its reader goes away (`walkabout vm list --output json | head`):
//! the command ends quietly, with no panic and no message, as `cat` or `grep` would.
//!
//! Two ways, by kind of command:
//! - Short-lived client commands take SIGPIPE's default action back (Rust starts every
//!   program with SIGPIPE ignored), so a write to a closed stdout ends the process at
//!   once, status 141 for the shell, from any `println!` on any path.
//! - Commands that serve HTTP or supervise children (`agent`, `controller`, `up`,
//!   `demo`) keep SIGPIPE ignored: a peer closing a socket must not kill an agent, and
//!   `up` must still stop its guests and agents. They print through [`line`] and treat
//!   [`is_closed_pipe`] errors as a reason to stop, cleanly.

use std::io::Write;

/// The exit status of a command whose reader went away: 128 + SIGPIPE, what a shell
/// reports for a process that SIGPIPE ended.
pub const CLOSED_PIPE_STATUS: u8 = 128 + 13;

/// Lets a write to a closed pipe end the process silently (SIGPIPE's default action).
/// Call first thing in `main`, before any thread starts, and only for commands that
/// neither serve HTTP nor supervise children.
pub fn end_quietly_on_closed_pipe() {
    // SAFETY: signal(2) with a valid signal number and SIG_DFL has no memory-safety
    // preconditions; it runs before any other thread exists, so no thread races on the
    // disposition, and no Rust code relies on SIGPIPE being ignored at this point.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Writes one line to stdout and flushes it; an error (a closed pipe above all) is
/// returned, never a panic.
pub fn line(text: impl std::fmt::Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Whether `e`, or an error it wraps, is a write to a closed pipe.
pub fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_broken_pipe_is_recognised_under_context() {
        let e = Err::<(), _>(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("printing the VM list").expect_err("an error");
        assert!(is_closed_pipe(&e));
    }

    #[test]
    fn other_io_errors_are_not_a_closed_pipe() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(!is_closed_pipe(&e));
    }
}
