//! The agent's embedded database (redb): VM records by name, so a restarted agent knows
//! its VMs and re-attaches to them, and the migrations it drove, so it can finish or
//! undo one that its restart interrupted.

use crate::migration::MigrationRecord;
use crate::spec::VmRecord;
use redb::{ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const MIGRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("migrations");

/// Errors of the agent's database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (another agent may hold it).
    #[error("cannot open agent database {path}: {detail}")]
    Open {
        /// The database file.
        path: String,
        /// What redb said.
        detail: String,
    },
    /// A read or write failed.
    #[error("agent database error: {0}")]
    Db(String),
    /// A stored record could not be decoded.
    #[error("stored record `{name}` is unreadable: {detail}")]
    Corrupt {
        /// The record's key (VM name or migration id).
        name: String,
        /// The decode error.
        detail: String,
    },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// VM records, persisted.
pub struct Store {
    db: redb::Database,
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = redb::Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            detail: match e {
                redb::DatabaseError::DatabaseAlreadyOpen => "it is in use by another agent".into(),
                other => other.to_string(),
            },
        })?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(VMS).map_err(db_err)?;
        txn.open_table(MIGRATIONS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    /// Inserts or replaces a VM record.
    pub fn put(&self, rec: &VmRecord) -> Result<(), StoreError> {
        self.put_in(VMS, &rec.spec.name, rec)
    }

    /// Removes a VM record.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(VMS).map_err(db_err)?;
            t.remove(name).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// All VM records.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.list_in(VMS)
    }

    /// Inserts or replaces a migration record.
    pub fn put_migration(&self, rec: &MigrationRecord) -> Result<(), StoreError> {
        self.put_in(MIGRATIONS, &rec.id, rec)
    }

    /// All migration records.
    pub fn list_migrations(&self) -> Result<Vec<MigrationRecord>, StoreError> {
        self.list_in(MIGRATIONS)
    }

    fn put_in<T: Serialize>(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(db_err)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(table).map_err(db_err)?;
            t.insert(key, bytes.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    fn list_in<T: DeserializeOwned>(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(table).map_err(db_err)?;
        let mut out = vec![];
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let rec = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Corrupt { name: k.value().to_string(), detail: e.to_string() })?;
            out.push(rec);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{VmState, RECORD_VERSION};

    fn rec(name: &str) -> VmRecord {
        VmRecord {
            version: RECORD_VERSION,
            spec: serde_json::from_value(serde_json::json!({"name": name, "memory_mib": 256})).expect("spec"),
            state: VmState::Running,
            reason: None,
            accel: walkabout_qemu::Accel::Tcg,
            pid: Some(42),
            run_dir: "/x".into(),
            created_at_ms: 1,
            guest_before: None,
        }
    }

    #[test]
    fn records_survive_reopen_and_delete_removes() {
        let dir = std::env::temp_dir().join(format!("wa-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("agent.redb");
        {
            let s = Store::open(&path).expect("open");
            s.put(&rec("a")).expect("put");
            s.put(&rec("b")).expect("put");
            s.delete("a").expect("delete");
        }
        let s = Store::open(&path).expect("reopen");
        let names: Vec<String> = s.list().expect("list").into_iter().map(|r| r.spec.name).collect();
        assert_eq!(names, vec!["b".to_string()]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
