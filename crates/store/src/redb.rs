//! The embedded [`Backend`]: one redb file. A missing file becomes a new, empty
//! database; an existing one must be a whole redb database (a zero-byte file is refused
//! with [`StoreError::EmptyFile`], a damaged one with [`StoreError::Damaged`]).
//!
//! Beside it the last good copy of the database is kept (`<file>.good`, see
//! [`good_copy_path`]): taken after every successful open of an existing file and at
//! most every [`GOOD_COPY_EVERY`] on a write, checked to open whole before it replaces
//! the previous one (an atomic rename). When the file is damaged, empty or missing
//! while a good copy exists, opening refuses with [`StoreError::LastGoodCopy`], which
//! names the copy and how to start from it ([`restore_good_copy`]); nothing starts
//! empty over a lost database.

use crate::{Backend, StoreError};
use redb::{ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often, at most, a write refreshes the last good copy.
pub const GOOD_COPY_EVERY: Duration = Duration::from_secs(300);

/// Where the last good copy of the database at `path` is kept: `<path>.good`.
pub fn good_copy_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(".good");
    PathBuf::from(p)
}

/// Replaces the database at `path` by its last good copy: the file there (damaged,
/// empty) is kept aside as `<path>.damaged-<ms since the epoch>`, returned. Run with
/// the database closed (the process that owns it stopped). Records written after the
/// copy was taken are not in it.
pub fn restore_good_copy(path: &Path) -> Result<Option<PathBuf>, StoreError> {
    let good = good_copy_path(path);
    let failed = |p: &Path, e: std::io::Error| StoreError::Open { path: p.to_path_buf(), detail: e.to_string() };
    if !good.exists() {
        return Err(StoreError::Open { path: good, detail: "no good copy to restore".into() });
    }
    let aside = match path.exists() {
        true => {
            let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
            let mut p = path.as_os_str().to_os_string();
            p.push(format!(".damaged-{ms}"));
            let aside = PathBuf::from(p);
            std::fs::rename(path, &aside).map_err(|e| failed(path, e))?;
            Some(aside)
        }
        false => None,
    };
    let tmp = tmp_path(path);
    std::fs::copy(&good, &tmp).map_err(|e| failed(&tmp, e))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| failed(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| failed(path, e))?;
    Ok(aside)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(".tmp");
    PathBuf::from(p)
}

/// Counters by name.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// An open redb database: the embedded [`Backend`].
pub struct Redb {
    db: redb::Database,
    path: PathBuf,
    /// When the last good copy was taken (`None`: never by this process).
    good_at: Mutex<Option<Instant>>,
}

impl Redb {
    /// Opens the database at `path`, creating an empty one only if the file does not
    /// exist and no good copy of it does either; keeps a good copy of a file that
    /// opened.
    pub fn open(path: &Path) -> Result<Redb, StoreError> {
        let good = good_copy_path(path);
        let has_good = std::fs::metadata(&good).is_ok_and(|m| m.len() > 0);
        if has_good && !path.exists() {
            return Err(StoreError::LastGoodCopy { path: path.to_path_buf(), problem: "is missing".into(), good });
        }
        let existed = path.exists();
        match Redb::open_file(path) {
            Ok(db) => {
                if existed {
                    if let Err(e) = db.keep_good_copy() {
                        tracing::warn!(error = %e, "cannot keep a good copy of the database");
                    }
                }
                Ok(db)
            }
            Err(e @ (StoreError::EmptyFile { .. } | StoreError::Damaged { .. })) if has_good => {
                let problem = match e {
                    StoreError::Damaged { detail, .. } => format!("is damaged ({detail})"),
                    _ => "is an empty file (0 bytes)".into(),
                };
                Err(StoreError::LastGoodCopy { path: path.to_path_buf(), problem, good })
            }
            Err(e) => Err(e),
        }
    }

    fn open_file(path: &Path) -> Result<Redb, StoreError> {
        let exists = match std::fs::metadata(path) {
            Ok(meta) if meta.len() == 0 => return Err(StoreError::EmptyFile { path: path.to_path_buf() }),
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::Open { path: path.to_path_buf(), detail: e.to_string() }),
        };
        if exists {
            check_header(path)?;
        }
        // redb 2 asserts rather than returning an error on some malformed files; a damaged
        // file must be an error the caller can report, never the end of the process.
        let opened = std::panic::catch_unwind(|| if exists { redb::Database::open(path) } else { redb::Database::create(path) });
        let db = match opened {
            Ok(result) => result.map_err(|e| open_error(path, e))?,
            Err(panic) => {
                let detail = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                let detail = format!("redb could not read it ({})", detail.as_deref().unwrap_or("no detail"));
                return Err(StoreError::Damaged { path: path.to_path_buf(), detail });
            }
        };
        Ok(Redb { db, path: path.to_path_buf(), good_at: Mutex::new(None) })
    }

    /// Copies the database to its good copy ([`good_copy_path`]): the file is copied
    /// while a write transaction holds every writer off, the copy is opened to check it
    /// is whole, then renamed over the previous good copy.
    pub fn keep_good_copy(&self) -> Result<PathBuf, StoreError> {
        let good = good_copy_path(&self.path);
        let tmp = tmp_path(&good);
        let failed = |p: &Path, detail: String| StoreError::Open { path: p.to_path_buf(), detail };
        {
            let txn = self.db.begin_write().map_err(|e| failed(&self.path, e.to_string()))?;
            let copied = std::fs::copy(&self.path, &tmp);
            txn.abort().map_err(|e| failed(&self.path, e.to_string()))?;
            copied.map_err(|e| failed(&tmp, e.to_string()))?;
        }
        let checked = std::panic::catch_unwind(|| redb::Database::open(&tmp).map(drop));
        match checked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(failed(&tmp, format!("the copy does not open: {e}")));
            }
            Err(_) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(failed(&tmp, "the copy does not open".into()));
            }
        }
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| failed(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, &good).map_err(|e| failed(&good, e.to_string()))?;
        *self.good_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        Ok(good)
    }

    /// After a write: refreshes the good copy when the last is older than
    /// [`GOOD_COPY_EVERY`] (or was never taken by this process).
    fn refresh_good_copy(&self) {
        let due = self.good_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none_or(|t| t.elapsed() >= GOOD_COPY_EVERY);
        if due {
            if let Err(e) = self.keep_good_copy() {
                tracing::warn!(error = %e, "cannot keep a good copy of the database");
            }
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in a write transaction and commits it.
    fn write<R>(
        &self,
        action: impl FnOnce() -> String,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<R, Failure>,
    ) -> Result<R, StoreError> {
        let run = || {
            let txn = self.db.begin_write()?;
            let out = f(&txn)?;
            txn.commit()?;
            Ok(out)
        };
        let out = run().map_err(|e| self.db_error(action(), e))?;
        self.refresh_good_copy();
        Ok(out)
    }

    /// Runs `f` in a read transaction.
    fn read<R>(
        &self,
        action: impl FnOnce() -> String,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<R, Failure>,
    ) -> Result<R, StoreError> {
        let run = || f(&self.db.begin_read()?);
        run().map_err(|e| self.db_error(action(), e))
    }

    fn db_error(&self, action: String, e: Failure) -> StoreError {
        match *e.0 {
            redb::Error::Corrupted(detail) => StoreError::Damaged { path: self.path.clone(), detail },
            other => StoreError::Db { path: self.path.clone(), action, detail: other.to_string() },
        }
    }
}

impl Backend for Redb {
    fn describe(&self) -> String {
        format!("database {}", self.path.display())
    }

    fn put(&self, table: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(
            || format!("write record `{key}` of table `{table}`"),
            |txn| {
                txn.open_table(records(table))?.insert(key, value)?;
                Ok(())
            },
        )
    }

    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(
            || format!("read record `{key}` of table `{table}`"),
            |txn| match open_read(txn, records(table))? {
                Some(t) => Ok(t.get(key)?.map(|v| v.value().to_vec())),
                None => Ok(None),
            },
        )
    }

    fn delete(&self, table: &str, key: &str) -> Result<(), StoreError> {
        self.write(
            || format!("delete record `{key}` of table `{table}`"),
            |txn| {
                txn.open_table(records(table))?.remove(key)?;
                Ok(())
            },
        )
    }

    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(
            || format!("list table `{table}`"),
            |txn| {
                let Some(t) = open_read(txn, records(table))? else { return Ok(vec![]) };
                t.iter()?.map(|item| item.map(|(k, v)| (k.value().to_string(), v.value().to_vec())).map_err(Failure::from)).collect()
            },
        )
    }

    fn next(&self, counter: &str) -> Result<u64, StoreError> {
        self.write(
            || format!("advance counter `{counter}`"),
            |txn| {
                let mut t = txn.open_table(META)?;
                let n = t.get(counter)?.map(|v| v.value()).unwrap_or(0) + 1;
                t.insert(counter, n)?;
                Ok(n)
            },
        )
    }

    fn raise(&self, counter: &str, at_least: u64) -> Result<u64, StoreError> {
        self.write(
            || format!("raise counter `{counter}` to {at_least}"),
            |txn| {
                let mut t = txn.open_table(META)?;
                let now = t.get(counter)?.map(|v| v.value()).unwrap_or(0);
                if at_least > now {
                    t.insert(counter, at_least)?;
                }
                Ok(now.max(at_least))
            },
        )
    }

    fn counter(&self, counter: &str) -> Result<u64, StoreError> {
        self.read(
            || format!("read counter `{counter}`"),
            |txn| match open_read(txn, META)? {
                Some(t) => Ok(t.get(counter)?.map(|v| v.value()).unwrap_or(0)),
                None => Ok(0),
            },
        )
    }

    fn append(&self, log: &str, seq: u64, value: &[u8], keep: u64) -> Result<(), StoreError> {
        self.write(
            || format!("append event {seq} to log `{log}`"),
            |txn| {
                let mut t = txn.open_table(entries(log))?;
                t.insert(seq, value)?;
                if let Some(oldest_kept) = seq.checked_sub(keep) {
                    t.retain_in(..=oldest_kept, |_, _| false)?;
                }
                Ok(())
            },
        )
    }

    fn after(&self, log: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.read(
            || format!("read log `{log}`"),
            |txn| {
                let Some(t) = open_read(txn, entries(log))? else { return Ok(vec![]) };
                t.range(after.saturating_add(1)..)?
                    .map(|item| item.map(|(k, v)| (k.value(), v.value().to_vec())).map_err(Failure::from))
                    .collect()
            },
        )
    }

    fn last_seq(&self, log: &str) -> Result<u64, StoreError> {
        self.read(
            || format!("read log `{log}`"),
            |txn| match open_read(txn, entries(log))? {
                Some(t) => Ok(t.last()?.map(|(k, _)| k.value()).unwrap_or(0)),
                None => Ok(0),
            },
        )
    }
}

/// A redb failure inside a transaction, boxed because `redb::Error` is large.
struct Failure(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(Box::new(e.into()))
    }
}

fn records(table: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(table)
}

fn entries(log: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(log)
}

/// Opens a table for reading; `None` when no write has created it yet.
fn open_read<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, Failure> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// redb's magic number, the first bytes of every redb file.
pub(crate) const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Checks that an existing file starts like a redb database and is as long as its header
/// says. redb 2.6 asserts (panics) when the file is shorter than its header's layout, so a
/// truncated file is caught here, by the header fields it would read (redb's
/// `tree_store/page_store/header.rs`: page size at byte 12, then region header pages,
/// region data pages, full regions and trailing-region data pages, each a `u32` LE).
fn check_header(path: &Path) -> Result<(), StoreError> {
    use std::io::Read;
    let damaged = |detail: String| StoreError::Damaged { path: path.to_path_buf(), detail };
    let open_failed = |e: std::io::Error| StoreError::Open { path: path.to_path_buf(), detail: e.to_string() };
    let file = std::fs::File::open(path).map_err(open_failed)?;
    let len = file.metadata().map_err(open_failed)?.len();
    let mut head = Vec::with_capacity(32);
    file.take(32).read_to_end(&mut head).map_err(open_failed)?;
    if !head.starts_with(&REDB_MAGIC) {
        return Err(damaged("it does not start with redb's magic number (not a redb database, or overwritten)".into()));
    }
    if head.len() < 32 {
        return Err(damaged(format!("it is {len} bytes long, shorter than a redb header")));
    }
    let field = |at: usize| u64::from(u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]));
    let (page, region_header, region_data, full_regions, trailing_data) = (field(12), field(16), field(20), field(24), field(28));
    let full_region = (region_header + region_data).saturating_mul(page);
    let trailing_region = if trailing_data > 0 { (region_header + trailing_data).saturating_mul(page) } else { 0 };
    let expected = page.saturating_add(full_regions.saturating_mul(full_region)).saturating_add(trailing_region);
    if expected > len {
        return Err(damaged(format!("it is {len} bytes long but its header describes {expected} bytes: the file was cut short")));
    }
    Ok(())
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    let path = path.to_path_buf();
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path },
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)) => StoreError::Damaged { path, detail },
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            StoreError::Damaged { path, detail: format!("the file ends early ({io})") }
        }
        other => StoreError::Open { path, detail: other.to_string() },
    }
}
