//! An exclusive lock on a file (flock(2)), held for as long as the value lives.
//!
//! Declared directly rather than through `File::lock`, which is newer than the
//! workspace's minimum Rust version.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::ImageError;

const LOCK_EX: i32 = 2;

extern "C" {
    fn flock(fd: i32, operation: i32) -> i32;
}

/// An exclusive flock on a file; released when dropped (the file is closed).
#[derive(Debug)]
pub(crate) struct Exclusive {
    _file: File,
}

impl Exclusive {
    /// Opens (creating it if needed) `path` and waits until this process holds an
    /// exclusive lock on it.
    pub(crate) fn acquire(path: &Path) -> Result<Exclusive, ImageError> {
        let io_error = |source| ImageError::Io { action: "lock", path: path.to_owned(), source };
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io_error)?;
        loop {
            // SAFETY: flock(2) only reads its two integer arguments; the descriptor is
            // open (owned by `file`, which outlives the call).
            let rc = unsafe { flock(file.as_raw_fd(), LOCK_EX) };
            if rc == 0 {
                return Ok(Exclusive { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(io_error(err));
            }
        }
    }
}
