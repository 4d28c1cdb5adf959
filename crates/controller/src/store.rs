//! The controller's embedded database (redb): hosts, VMs and their placement, plans,
//! migrations and the event log, so a restarted controller knows its cluster and can
//! resume (or re-plan) a plan it was executing.
//!
//! Every record is a plain struct serialized as JSON with a `version` field; a record
//! that no longer decodes is reported by key, never silently dropped.

use redb::{ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const PLANS: TableDefinition<&str, &[u8]> = TableDefinition::new("plans");
const MIGRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("migrations");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The tables that hold records keyed by name or id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Hosts by name.
    Hosts,
    /// VMs by name.
    Vms,
    /// Plans by id.
    Plans,
    /// Migrations by id.
    Migrations,
}

impl Table {
    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Hosts => HOSTS,
            Table::Vms => VMS,
            Table::Plans => PLANS,
            Table::Migrations => MIGRATIONS,
        }
    }
}

/// Errors of the controller's database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (another controller may hold it).
    #[error("cannot open controller database {path}: {detail}")]
    Open {
        /// The database file.
        path: String,
        /// What redb said.
        detail: String,
    },
    /// A read or write failed.
    #[error("controller database error: {0}")]
    Db(String),
    /// A stored record could not be decoded.
    #[error("stored record `{key}` is unreadable: {detail}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The decode error.
        detail: String,
    },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The controller's database.
pub struct Store {
    db: redb::Database,
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = redb::Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            detail: match e {
                redb::DatabaseError::DatabaseAlreadyOpen => "it is in use by another controller".into(),
                other => other.to_string(),
            },
        })?;
        let txn = db.begin_write().map_err(db_err)?;
        for t in [Table::Hosts, Table::Vms, Table::Plans, Table::Migrations] {
            txn.open_table(t.def()).map_err(db_err)?;
        }
        txn.open_table(EVENTS).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    /// Inserts or replaces a record.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(db_err)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(table.def()).map_err(db_err)?;
            t.insert(key, bytes.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Removes a record (no error if absent).
    pub fn delete(&self, table: Table, key: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(table.def()).map_err(db_err)?;
            t.remove(key).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Every record of a table, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(table.def()).map_err(db_err)?;
        let mut out = vec![];
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let rec =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt { key: k.value().to_string(), detail: e.to_string() })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Takes the next value of a persistent counter (1, 2, ...), so ids are never reused
    /// across restarts.
    pub fn next(&self, counter: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let n = {
            let mut t = txn.open_table(META).map_err(db_err)?;
            let n = t.get(counter).map_err(db_err)?.map(|v| v.value()).unwrap_or(0) + 1;
            t.insert(counter, n).map_err(db_err)?;
            n
        };
        txn.commit().map_err(db_err)?;
        Ok(n)
    }

    /// Appends an event under `seq`, keeping at most `keep` events.
    pub fn put_event<T: Serialize>(&self, seq: u64, event: &T, keep: u64) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(event).map_err(db_err)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(EVENTS).map_err(db_err)?;
            t.insert(seq, bytes.as_slice()).map_err(db_err)?;
            if seq > keep {
                let old = seq - keep;
                let _ = t.retain_in(..old, |_, _| false);
            }
        }
        txn.commit().map_err(db_err)
    }

    /// Events with a sequence number above `after`, oldest first.
    pub fn events_after<T: DeserializeOwned>(&self, after: u64) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(EVENTS).map_err(db_err)?;
        let mut out = vec![];
        for item in t.range(after.saturating_add(1)..).map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let ev = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Corrupt { key: format!("event {}", k.value()), detail: e.to_string() })?;
            out.push(ev);
        }
        Ok(out)
    }

    /// The highest event sequence number stored (0 when none).
    pub fn last_event_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(EVENTS).map_err(db_err)?;
        let last = t.last().map_err(db_err)?.map(|(k, _)| k.value()).unwrap_or(0);
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Rec {
        version: u32,
        name: String,
    }

    fn temp(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("wa-ctl-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn records_counters_and_events_survive_reopen() {
        let dir = temp("reopen");
        let path = dir.join("c.redb");
        {
            let s = Store::open(&path).expect("open");
            s.put(Table::Plans, "p1", &Rec { version: 1, name: "p1".into() }).expect("put");
            assert_eq!(s.next("plan").expect("next"), 1);
            s.put_event(1, &"a", 10).expect("event");
            s.put_event(2, &"b", 10).expect("event");
        }
        let s = Store::open(&path).expect("reopen");
        let plans: Vec<Rec> = s.list(Table::Plans).expect("list");
        assert_eq!(plans, vec![Rec { version: 1, name: "p1".into() }]);
        assert_eq!(s.next("plan").expect("next"), 2);
        assert_eq!(s.events_after::<String>(1).expect("events"), vec!["b".to_string()]);
        assert_eq!(s.last_event_seq().expect("last"), 2);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn old_events_are_trimmed() {
        let dir = temp("trim");
        let s = Store::open(&dir.join("c.redb")).expect("open");
        for i in 1..=20u64 {
            s.put_event(i, &i, 5).expect("event");
        }
        let kept: Vec<u64> = s.events_after(0).expect("events");
        assert_eq!(kept.first().copied(), Some(15));
        std::fs::remove_dir_all(&dir).ok();
    }
}
