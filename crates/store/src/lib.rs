//! The database of the agent and the controller: JSON records in named tables, each
//! stored with its table's record version and upgraded when read, counters that never
//! hand out a number twice, and an append-only log with retention.
//!
//! # Backends
//! [`Store`] is the typed front; where the bytes live is a [`Backend`]: [`Redb`], one
//! embedded file (the agent's, and the controller's by default), or etcd
//! (`walkabout-store-etcd`, for several controllers sharing one cluster). Both hold the
//! same tables, counters and logs with the same encoding, so a record reads the same
//! from either.
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
//! [`StoreError::Damaged`], naming the file. The last good copy of the file is kept
//! beside it (`<file>.good`, refreshed at each open and at most every
//! [`GOOD_COPY_EVERY`] on a write); while it exists, a damaged, empty or missing file is
//! refused with [`StoreError::LastGoodCopy`], naming the copy and how to start from it
//! ([`restore_good_copy`]).

mod redb;

pub use crate::redb::{good_copy_path, restore_good_copy, Redb, GOOD_COPY_EVERY};
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
    /// The database is damaged, empty or missing, and its last good copy is at hand:
    /// nothing starts until an operator chooses (restore it, or start afresh).
    #[error(
        "database {path} {problem}; its last good copy is {good}: to start from it (records written since it was taken are lost), \
         stop the process and run `mv {path} {path}.damaged && cp {good} {path}` (walkabout_store::restore_good_copy), \
         or move both files aside to start with a new, empty database"
    )]
    LastGoodCopy {
        /// The database file.
        path: PathBuf,
        /// What is wrong with it ("is damaged (...)", "is an empty file", "is missing").
        problem: String,
        /// Its last good copy.
        good: PathBuf,
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
    /// A remote store (etcd) did not answer or refused a request.
    #[error("{store}: cannot {action}: {detail}")]
    Remote {
        /// The store, with its endpoints ("etcd http://127.0.0.1:2379").
        store: String,
        /// What was being done, naming the table.
        action: String,
        /// What the store or the transport said.
        detail: String,
    },
    /// A write was refused because this process no longer holds the lease it writes
    /// under: another controller leads the cluster now.
    #[error("{store}: cannot {action}: this controller is no longer the leader (its leadership of epoch {epoch} ended)")]
    Fenced {
        /// The store.
        store: String,
        /// What was being done.
        action: String,
        /// The epoch this process led.
        epoch: u64,
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

/// Where a [`Store`] keeps its bytes: tables of values by key, counters, and logs by
/// sequence number. Values are opaque here; [`Store`] encodes and decodes them, so every
/// backend holds the same records.
pub trait Backend: Send + Sync {
    /// What this store is, for messages ("database /x/controller.redb", "etcd http://...").
    fn describe(&self) -> String;
    /// Inserts or replaces the value under `key` in `table`.
    fn put(&self, table: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// The value under `key`; `None` when absent.
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Removes the value under `key` (no error if absent).
    fn delete(&self, table: &str, key: &str) -> Result<(), StoreError>;
    /// Every value of `table`, in key order.
    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Takes the next value of a counter (1, 2, ...), never the same twice.
    fn next(&self, counter: &str) -> Result<u64, StoreError>;
    /// Raises a counter to `at_least` if it is lower; returns its value after.
    fn raise(&self, counter: &str, at_least: u64) -> Result<u64, StoreError>;
    /// A counter's value (0 before its first use).
    fn counter(&self, counter: &str) -> Result<u64, StoreError>;
    /// Appends `value` to `log` under `seq` and drops the entries numbered `seq - keep`
    /// or lower.
    fn append(&self, log: &str, seq: u64, value: &[u8], keep: u64) -> Result<(), StoreError>;
    /// The entries of `log` numbered above `after`, oldest first.
    fn after(&self, log: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The highest sequence number in `log` (0 when empty).
    fn last_seq(&self, log: &str) -> Result<u64, StoreError>;
}

/// An open store: typed, versioned records over a [`Backend`].
pub struct Store {
    backend: Box<dyn Backend>,
}

impl Store {
    /// Opens the redb database at `path`, creating an empty one only if the file does
    /// not exist.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store::over(Box::new(Redb::open(path)?)))
    }

    /// A store over `backend`.
    pub fn over(backend: Box<dyn Backend>) -> Store {
        Store { backend }
    }

    /// What this store is, for messages.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Inserts or replaces the record under `key`, stamped with the table's version.
    pub fn put<T: Serialize>(&self, table: &Table, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = encode(table, key, value)?;
        self.backend.put(table.name, key, &bytes)
    }

    /// The record under `key`, upgraded to the table's version; `None` when absent.
    pub fn get<T: DeserializeOwned>(&self, table: &Table, key: &str) -> Result<Option<T>, StoreError> {
        self.backend.get(table.name, key)?.map(|b| decode(table, key, &b)).transpose()
    }

    /// Removes the record under `key` (no error if absent).
    pub fn delete(&self, table: &Table, key: &str) -> Result<(), StoreError> {
        self.backend.delete(table.name, key)
    }

    /// Every record of a table, in key order, upgraded to the table's version.
    pub fn list<T: DeserializeOwned>(&self, table: &Table) -> Result<Vec<T>, StoreError> {
        self.backend.list(table.name)?.iter().map(|(k, v)| decode(table, k, v)).collect()
    }

    /// Takes the next value of a persistent counter (1, 2, ...), so ids are never reused
    /// across restarts.
    pub fn next(&self, counter: &str) -> Result<u64, StoreError> {
        self.backend.next(counter)
    }

    /// Raises a persistent counter to `at_least` if it is lower (a high-water mark, such
    /// as the highest leader epoch an agent has seen); returns its value after.
    pub fn raise(&self, counter: &str, at_least: u64) -> Result<u64, StoreError> {
        self.backend.raise(counter, at_least)
    }

    /// A persistent counter's value (0 before its first use).
    pub fn counter(&self, counter: &str) -> Result<u64, StoreError> {
        self.backend.counter(counter)
    }

    /// Appends `event` to a log under `seq`, then drops the events older than the newest
    /// `keep` (those numbered `seq - keep` or lower).
    pub fn put_event<T: Serialize>(&self, log: &Log, seq: u64, event: &T, keep: u64) -> Result<(), StoreError> {
        let bytes = encode(&log.0, &seq.to_string(), event)?;
        self.backend.append(log.0.name, seq, &bytes, keep)
    }

    /// The events of a log numbered above `after`, oldest first, upgraded to its version.
    pub fn events_after<T: DeserializeOwned>(&self, log: &Log, after: u64) -> Result<Vec<T>, StoreError> {
        self.backend.after(log.0.name, after)?.iter().map(|(seq, v)| decode(&log.0, &seq.to_string(), v)).collect()
    }

    /// The highest sequence number in a log (0 when it is empty).
    pub fn last_event_seq(&self, log: &Log) -> Result<u64, StoreError> {
        self.backend.last_seq(log.0.name)
    }
}

/// Marks a tagged value; JSON text never starts with a NUL byte, so an untagged (legacy)
/// value is never mistaken for a tagged one.
const TAG: u8 = 0;

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
