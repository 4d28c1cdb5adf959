//! The agent's embedded database: VM records by name, so a restarted agent knows its VMs
//! and re-attaches to them, and the migrations it drove, so it can finish or undo one that
//! its restart interrupted. Storage, versions and upgrades are `walkabout-store`'s; this
//! module names the agent's tables and keys its records.

use crate::migration::{MigrationRecord, MIGRATION_VERSION};
use crate::spec::{VmRecord, RECORD_VERSION};
use std::path::Path;
use walkabout_store::{no_upgrades, Table};

pub use walkabout_store::StoreError;

/// VM records by VM name.
pub const VMS: Table = Table::new("vms", RECORD_VERSION, no_upgrades);
/// Migration records by migration id.
pub const MIGRATIONS: Table = Table::new("migrations", MIGRATION_VERSION, no_upgrades);

/// Checkpoints this agent took, by id (`<vm>.<n>`).
pub const CHECKPOINTS: Table = Table::new("checkpoints", walkabout_api::checkpoint::CHECKPOINT_VERSION, no_upgrades);
/// What this agent holds as a replica, by VM name.
pub const REPLICAS: Table = Table::new("replicas", walkabout_api::checkpoint::CHECKPOINT_VERSION, no_upgrades);

/// The counter holding the highest leader epoch seen (see `api.rs`).
const EPOCH: &str = "leader_epoch";

/// The agent's VM and migration records, persisted.
pub struct Store {
    db: walkabout_store::Store,
}

impl Store {
    /// Opens the database at `path`, creating it only if the file does not exist.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store { db: walkabout_store::Store::open(path)? })
    }

    /// Inserts or replaces a VM record.
    pub fn put(&self, rec: &VmRecord) -> Result<(), StoreError> {
        self.db.put(&VMS, &rec.spec.name, rec)
    }

    /// Removes a VM record.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.db.delete(&VMS, name)
    }

    /// All VM records.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.db.list(&VMS)
    }

    /// Inserts or replaces a migration record.
    pub fn put_migration(&self, rec: &MigrationRecord) -> Result<(), StoreError> {
        self.db.put(&MIGRATIONS, &rec.id, rec)
    }

    /// All migration records.
    pub fn list_migrations(&self) -> Result<Vec<MigrationRecord>, StoreError> {
        self.db.list(&MIGRATIONS)
    }

    /// Inserts or replaces a checkpoint taken here.
    pub fn put_checkpoint(&self, ck: &walkabout_api::Checkpoint) -> Result<(), StoreError> {
        self.db.put(&CHECKPOINTS, &ck.id, ck)
    }

    /// Removes a checkpoint record.
    pub fn delete_checkpoint(&self, id: &str) -> Result<(), StoreError> {
        self.db.delete(&CHECKPOINTS, id)
    }

    /// Every checkpoint taken here.
    pub fn list_checkpoints(&self) -> Result<Vec<walkabout_api::Checkpoint>, StoreError> {
        self.db.list(&CHECKPOINTS)
    }

    /// The next checkpoint number of `vm` (never reused, even after a failed attempt's
    /// number was given out or a checkpoint deleted).
    pub fn next_checkpoint(&self, vm: &str) -> Result<u64, StoreError> {
        self.db.next(&format!("checkpoint:{vm}"))
    }

    /// Raises `vm`'s checkpoint counter to at least `n` (a restored VM continues the
    /// numbering of its checkpoints).
    pub fn raise_checkpoint(&self, vm: &str, n: u64) -> Result<u64, StoreError> {
        self.db.raise(&format!("checkpoint:{vm}"), n)
    }

    /// Inserts or replaces what this agent holds as a replica of one VM.
    pub fn put_replica(&self, r: &walkabout_api::ReplicaState) -> Result<(), StoreError> {
        self.db.put(&REPLICAS, &r.vm, r)
    }

    /// What this agent holds as a replica of `vm`, if anything.
    pub fn replica(&self, vm: &str) -> Result<Option<walkabout_api::ReplicaState>, StoreError> {
        self.db.get(&REPLICAS, vm)
    }

    /// Forgets a replica.
    pub fn delete_replica(&self, vm: &str) -> Result<(), StoreError> {
        self.db.delete(&REPLICAS, vm)
    }

    /// Every replica held.
    pub fn list_replicas(&self) -> Result<Vec<walkabout_api::ReplicaState>, StoreError> {
        self.db.list(&REPLICAS)
    }

    /// The highest leader epoch this agent has seen (0: none).
    pub fn epoch(&self) -> Result<u64, StoreError> {
        self.db.counter(EPOCH)
    }

    /// Raises the highest leader epoch seen to `epoch`; returns the value after.
    pub fn raise_epoch(&self, epoch: u64) -> Result<u64, StoreError> {
        self.db.raise(EPOCH, epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmState;

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
            protection: None,
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

    #[test]
    fn a_database_written_before_walkabout_store_still_reads() {
        let dir = std::env::temp_dir().join(format!("wa-store-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("agent.redb");
        {
            // The layout of the agent's store.rs up to 0392632: untagged JSON by VM name.
            const OLD_VMS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("vms");
            let db = redb::Database::create(&path).expect("create");
            let txn = db.begin_write().expect("txn");
            let json = serde_json::to_vec(&rec("old")).expect("json");
            txn.open_table(OLD_VMS).expect("table").insert("old", json.as_slice()).expect("insert");
            txn.commit().expect("commit");
        }
        let s = Store::open(&path).expect("open");
        let names: Vec<String> = s.list().expect("list").into_iter().map(|r| r.spec.name).collect();
        assert_eq!(names, vec!["old".to_string()]);
        assert_eq!(s.list_migrations().expect("migrations").len(), 0);
        std::fs::remove_dir_all(&dir).ok();
    }
}
