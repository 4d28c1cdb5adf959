//! The embedded database (redb) of the agent and the controller: JSON records in named
//! tables, each stored with its table's record version and upgraded when read, counters
//! that never hand out a number twice, and an append-only log with retention.
//!
//! # Versions
//! A table is described by a const [`Table`]: its name, the version of the records this
//! program writes, and an [`Upgrade`] function. The store, not the record type, owns the
//! version, so record types from another crate need nothing but `Serialize` and
//! `DeserializeOwned` (no trait to implement, which the orphan rule would forbid).
//!
//! Every value is written as one tag byte (`0x00`, which never starts JSON text), the
//! table's version (`u32`, little endian) and the record's JSON. Reading a record of an
//! older version runs `upgrade(v, value)` for each `v` from the stored version up to the
//! current one, then deserializes; a record of a newer version is refused with
//! [`StoreError::TooNew`], naming the table, the key and both versions.
//!
//! Databases written before this crate hold untagged JSON whose inline `"version"` field
//! (absent: version 1) is taken as the stored version. When a record that carries such an
//! inline field is upgraded, the field is set to the version it was upgraded to, so the
//! record agrees with itself.
//!
//! # Opening
//! A missing file becomes a new, empty database. An existing file must be a whole redb
//! database: a zero-byte file is refused ([`StoreError::EmptyFile`]) rather than silently
//! starting empty, and a damaged one (truncated, overwritten) is refused with
//! [`StoreError::Damaged`], naming the file.

use redb::{ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Turns a record of version `from_version` into a record of version `from_version + 1`,
/// or says why it cannot.
pub type Upgrade = fn(from_version: u32, record: Value) -> Result<Value, String>;

/// A table of records keyed by name or id: its name in the database, the version of the
/// records this program writes, and the upgrade step from each older version.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// The table's name in the database.
    pub name: &'static str,
    /// The version of the records this program writes (1 for the first layout).
    pub version: u32,
    /// The step from each older version to the next.
    pub upgrade: Upgrade,
}

impl Table {
    /// Describes a table (usable in a `const`).
    pub const fn new(name: &'static str, version: u32, upgrade: Upgrade) -> Table {
        Table { name, version, upgrade }
    }
}

/// A log of records keyed by a sequence number (1, 2, ...), oldest first, of which only
/// the newest are kept; versioned like a [`Table`].
#[derive(Debug, Clone, Copy)]
pub struct Log(pub Table);

impl Log {
    /// Describes a log (usable in a `const`).
    pub const fn new(name: &'static str, version: u32, upgrade: Upgrade) -> Log {
        Log(Table::new(name, version, upgrade))
    }
}

/// The [`Upgrade`] of a table that has only ever had one layout: every upgrade is refused.
pub fn no_upgrades(from_version: u32, _record: Value) -> Result<Value, String> {
    Err(format!("no upgrade is defined from version {from_version}"))
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the database open.
    #[error("cannot open database {path}: it is in use by another process")]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The file exists but holds zero bytes: it is not a database, and starting afresh
    /// over it could hide the loss of one.
    #[error("database {path} is an empty file (0 bytes), not a database; remove it to start with a new, empty database")]
    EmptyFile {
        /// The database file.
        path: PathBuf,
    },
    /// The file is not a whole redb database (truncated, overwritten, or not redb at all).
    #[error("database {path} is damaged: {detail}; restore a copy, or move it aside to start with a new, empty database")]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// What redb found.
        detail: String,
    },
    /// The database could not be opened for another reason (permissions, I/O, format).
    #[error("cannot open database {path}: {detail}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        detail: String,
    },
    /// A read or write of a table failed.
    #[error("database {path}: cannot {action}: {detail}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What was being done, naming the table ("write table `vms`").
        action: String,
        /// What redb said.
        detail: String,
    },
    /// A record could not be turned into JSON.
    #[error("cannot encode record `{key}` of table `{table}`: {source}")]
    Encode {
        /// The table.
        table: &'static str,
        /// The record's key.
        key: String,
        /// The serializer's error.
        source: serde_json::Error,
    },
    /// A stored record does not decode as the type asked for.
    #[error("record `{key}` of table `{table}` (version {version}) is unreadable: {detail}")]
    Decode {
        /// The table.
        table: &'static str,
        /// The record's key.
        key: String,
        /// The record's version (after any upgrade).
        version: u32,
        /// The decode error.
        detail: String,
    },
    /// A step of the upgrade chain refused a stored record.
    #[error("record `{key}` of table `{table}` cannot be upgraded from version {from} to {to}: {detail}")]
    Upgrade {
        /// The table.
        table: &'static str,
        /// The record's key.
        key: String,
        /// The version the failing step started from.
        from: u32,
        /// The version it was to produce.
        to: u32,
        /// Why the step refused.
        detail: String,
    },
    /// A stored record is newer than this program understands.
    #[error(
        "record `{key}` of table `{table}` has version {stored}, newer than version {current} that this program knows; \
         it was written by a newer walkabout"
    )]
    TooNew {
        /// The table.
        table: &'static str,
        /// The record's key.
        key: String,
        /// The stored record's version.
        stored: u32,
        /// The table's version in this program.
        current: u32,
    },
}

/// Marks a tagged value; JSON text never starts with a NUL byte, so an untagged (legacy)
/// value is never mistaken for a tagged one.
const TAG: u8 = 0;
/// Counters by name.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// An open database.
pub struct Store {
    db: redb::Database,
    path: PathBuf,
}

impl Store {
    /// Opens the database at `path`, creating an empty one only if the file does not exist.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
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
        Ok(Store { db, path: path.to_path_buf() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Inserts or replaces the record under `key`, stamped with the table's version.
    pub fn put<T: Serialize>(&self, table: &Table, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = encode(table, key, value)?;
        self.write(
            || format!("write record `{key}` of table `{}`", table.name),
            |txn| {
                txn.open_table(records(table))?.insert(key, bytes.as_slice())?;
                Ok(())
            },
        )
    }

    /// The record under `key`, upgraded to the table's version; `None` when absent.
    pub fn get<T: DeserializeOwned>(&self, table: &Table, key: &str) -> Result<Option<T>, StoreError> {
        let bytes = self.read(
            || format!("read record `{key}` of table `{}`", table.name),
            |txn| match open_read(txn, records(table))? {
                Some(t) => Ok(t.get(key)?.map(|v| v.value().to_vec())),
                None => Ok(None),
            },
        )?;
        bytes.map(|b| decode(table, key, &b)).transpose()
    }

    /// Removes the record under `key` (no error if absent).
    pub fn delete(&self, table: &Table, key: &str) -> Result<(), StoreError> {
        self.write(
            || format!("delete record `{key}` of table `{}`", table.name),
            |txn| {
                txn.open_table(records(table))?.remove(key)?;
                Ok(())
            },
        )
    }

    /// Every record of a table, in key order, upgraded to the table's version.
    pub fn list<T: DeserializeOwned>(&self, table: &Table) -> Result<Vec<T>, StoreError> {
        let raw = self.read(
            || format!("list table `{}`", table.name),
            |txn| {
                let Some(t) = open_read(txn, records(table))? else { return Ok(vec![]) };
                t.iter()?.map(|item| item.map(|(k, v)| (k.value().to_string(), v.value().to_vec())).map_err(Failure::from)).collect()
            },
        )?;
        raw.iter().map(|(k, v)| decode(table, k, v)).collect()
    }

    /// Takes the next value of a persistent counter (1, 2, ...), so ids are never reused
    /// across restarts.
    pub fn next(&self, counter: &str) -> Result<u64, StoreError> {
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

    /// Appends `event` to a log under `seq`, then drops the events older than the newest
    /// `keep` (those numbered `seq - keep` or lower).
    pub fn put_event<T: Serialize>(&self, log: &Log, seq: u64, event: &T, keep: u64) -> Result<(), StoreError> {
        let bytes = encode(&log.0, &seq.to_string(), event)?;
        self.write(
            || format!("append event {seq} to log `{}`", log.0.name),
            |txn| {
                let mut t = txn.open_table(entries(log))?;
                t.insert(seq, bytes.as_slice())?;
                if let Some(oldest_kept) = seq.checked_sub(keep) {
                    t.retain_in(..=oldest_kept, |_, _| false)?;
                }
                Ok(())
            },
        )
    }

    /// The events of a log numbered above `after`, oldest first, upgraded to its version.
    pub fn events_after<T: DeserializeOwned>(&self, log: &Log, after: u64) -> Result<Vec<T>, StoreError> {
        let raw = self.read(
            || format!("read log `{}`", log.0.name),
            |txn| {
                let Some(t) = open_read(txn, entries(log))? else { return Ok(vec![]) };
                t.range(after.saturating_add(1)..)?
                    .map(|item| item.map(|(k, v)| (k.value(), v.value().to_vec())).map_err(Failure::from))
                    .collect()
            },
        )?;
        raw.iter().map(|(seq, v)| decode(&log.0, &seq.to_string(), v)).collect()
    }

    /// The highest sequence number in a log (0 when it is empty).
    pub fn last_event_seq(&self, log: &Log) -> Result<u64, StoreError> {
        self.read(
            || format!("read log `{}`", log.0.name),
            |txn| match open_read(txn, entries(log))? {
                Some(t) => Ok(t.last()?.map(|(k, _)| k.value()).unwrap_or(0)),
                None => Ok(0),
            },
        )
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
        run().map_err(|e| self.db_error(action(), e))
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

/// A redb failure inside a transaction, boxed because `redb::Error` is large.
struct Failure(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(Box::new(e.into()))
    }
}

fn records(table: &Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name)
}

fn entries(log: &Log) -> TableDefinition<'static, u64, &'static [u8]> {
    TableDefinition::new(log.0.name)
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
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

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

fn encode<T: Serialize>(table: &Table, key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(128);
    out.push(TAG);
    out.extend_from_slice(&table.version.to_le_bytes());
    serde_json::to_writer(&mut out, value).map_err(|source| StoreError::Encode { table: table.name, key: key.to_string(), source })?;
    Ok(out)
}

/// A stored value split into its version and its JSON; untagged values are legacy JSON
/// whose version is their inline `"version"` field (1 when absent).
fn split(bytes: &[u8]) -> (Option<u32>, &[u8]) {
    match bytes {
        [TAG, a, b, c, d, json @ ..] => (Some(u32::from_le_bytes([*a, *b, *c, *d])), json),
        _ => (None, bytes),
    }
}

fn decode<T: DeserializeOwned>(table: &Table, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let unreadable = |version: u32, detail: String| StoreError::Decode { table: table.name, key: key.to_string(), version, detail };
    let (tagged, json) = split(bytes);
    if tagged == Some(table.version) {
        return serde_json::from_slice(json).map_err(|e| unreadable(table.version, e.to_string()));
    }
    let mut value: Value = serde_json::from_slice(json).map_err(|e| unreadable(tagged.unwrap_or(1), e.to_string()))?;
    let stored = match tagged {
        Some(v) => v,
        None => match value.get("version") {
            None => 1,
            Some(v) => v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| unreadable(1, format!("its version field is {v}, not a version number")))?,
        },
    };
    if stored > table.version {
        return Err(StoreError::TooNew { table: table.name, key: key.to_string(), stored, current: table.version });
    }
    for from in stored..table.version {
        value = (table.upgrade)(from, value).map_err(|detail| StoreError::Upgrade {
            table: table.name,
            key: key.to_string(),
            from,
            to: from + 1,
            detail,
        })?;
    }
    if stored < table.version {
        if let Some(inline) = value.get_mut("version") {
            *inline = Value::from(table.version);
        }
    }
    serde_json::from_value(value).map_err(|e| unreadable(table.version, e.to_string()))
}

#[cfg(test)]
mod tests;
