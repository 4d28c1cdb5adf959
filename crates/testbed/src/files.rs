//! Files other processes wait for, and temporary directories.

use crate::error::{Result, TestbedError};
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` so that a reader sees either no file or the whole of it:
/// written to a temporary file beside it, then renamed over it (rename is atomic within
/// a directory). Used for the daemons' `agent.url` and `controller.url`, which other
/// processes poll for.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Reads a URL file written by [`write_atomic`]: `Some(url)` once it holds a whole
/// `http://` or `https://` URL, `None` while it is missing or holds anything else.
pub fn read_url(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let url = text.trim();
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"))?;
    (!rest.is_empty()).then(|| url.to_string())
}

/// A fresh directory under /tmp, removed (with everything in it) on drop. Paths are
/// short on purpose: QMP sockets live in these directories and Unix socket paths are
/// limited to 107 bytes.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/wa-<tag>-<pid>-<n>`, emptied first if a stale one exists.
    pub fn new(tag: &str) -> Result<TempDir> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/wa-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| TestbedError::io(format!("creating {}", path.display()), e))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Where a `walkabout KIND` session (`up`, `demo`) of process `pid` keeps its agents'
/// and controller's data: `$TMPDIR/walkabout-KIND-PID`. Known to the testbed so that a
/// caller watching such a session can find (and clean up after) it.
pub fn session_root(kind: &str, pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("walkabout-{kind}-{pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_file_is_read_only_once_whole() {
        let dir = TempDir::new("urlfile").expect("temp dir");
        let f = dir.path().join("agent.url");
        assert_eq!(read_url(&f), None);
        std::fs::write(&f, "http://").expect("write");
        assert_eq!(read_url(&f), None);
        write_atomic(&f, b"http://127.0.0.1:7701").expect("write");
        assert_eq!(read_url(&f).as_deref(), Some("http://127.0.0.1:7701"));
    }

    #[test]
    fn an_atomic_write_leaves_no_temporary_file() {
        let dir = TempDir::new("atomic").expect("temp dir");
        write_atomic(&dir.path().join("x.url"), b"http://h:1").expect("write");
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).expect("read dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["x.url".to_string()]);
    }

    #[test]
    fn a_temp_dir_is_removed_on_drop() {
        let dir = TempDir::new("gone").expect("temp dir");
        let p = dir.path().to_path_buf();
        drop(dir);
        assert!(!p.exists());
    }
}
