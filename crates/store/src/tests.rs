//! The store's behaviour against real database files in a temporary directory.

use super::*;
use crate::redb::{META, REDB_MAGIC};
use ::redb::TableDefinition;
use serde::Deserialize;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Rec {
    name: String,
    mib: u64,
}

const RECS: Table = Table::new("recs", 1, no_upgrades);
const EVENTS: Log = Log::new("events", 1, no_upgrades);

/// A fresh directory for one test; removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("wa-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("test.redb")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rec(name: &str, mib: u64) -> Rec {
    Rec { name: name.into(), mib }
}

/// Version 2 of `recs` renamed `mib` to `memory_mib`; version 3 added `cpus` (default 1).
fn upgrade_recs(from: u32, mut v: Value) -> Result<Value, String> {
    let obj = v.as_object_mut().ok_or("not an object")?;
    match from {
        1 => {
            let mib = obj.remove("mib").ok_or("no field `mib`")?;
            obj.insert("memory_mib".into(), mib);
        }
        2 => {
            obj.insert("cpus".into(), Value::from(1));
        }
        other => return Err(format!("unknown version {other}")),
    }
    Ok(v)
}

#[derive(Debug, PartialEq, Deserialize)]
struct RecV3 {
    name: String,
    memory_mib: u64,
    cpus: u32,
}

const RECS_V3: Table = Table::new("recs", 3, upgrade_recs);

#[test]
fn records_survive_reopen_and_delete_removes() {
    let dir = TempDir::new("reopen");
    {
        let s = Store::open(&dir.db()).expect("open");
        s.put(&RECS, "a", &rec("a", 1)).expect("put");
        s.put(&RECS, "b", &rec("b", 2)).expect("put");
        s.put(&RECS, "c", &rec("c", 3)).expect("put");
        s.delete(&RECS, "a").expect("delete");
    }
    let s = Store::open(&dir.db()).expect("reopen");
    assert_eq!(s.list::<Rec>(&RECS).expect("list"), vec![rec("b", 2), rec("c", 3)]);
    assert_eq!(s.get::<Rec>(&RECS, "c").expect("get"), Some(rec("c", 3)));
    assert_eq!(s.get::<Rec>(&RECS, "a").expect("get"), None);
}

#[test]
fn a_new_database_reads_as_empty_before_any_write() {
    let dir = TempDir::new("fresh");
    let s = Store::open(&dir.db()).expect("open");
    assert_eq!(s.list::<Rec>(&RECS).expect("list"), vec![]);
    assert_eq!(s.get::<Rec>(&RECS, "a").expect("get"), None);
    assert_eq!(s.events_after::<u64>(&EVENTS, 0).expect("events"), Vec::<u64>::new());
    assert_eq!(s.last_event_seq(&EVENTS).expect("last"), 0);
    s.delete(&RECS, "a").expect("deleting an absent record is no error");
}

#[test]
fn counters_count_from_one_and_continue_after_reopen() {
    let dir = TempDir::new("counters");
    {
        let s = Store::open(&dir.db()).expect("open");
        assert_eq!(s.next("plan").expect("next"), 1);
        assert_eq!(s.next("plan").expect("next"), 2);
        assert_eq!(s.next("walk").expect("next"), 1);
    }
    let s = Store::open(&dir.db()).expect("reopen");
    assert_eq!(s.next("plan").expect("next"), 3);
}

#[test]
fn events_after_returns_newer_events_oldest_first_across_reopen() {
    let dir = TempDir::new("events");
    {
        let s = Store::open(&dir.db()).expect("open");
        for (seq, ev) in [(1, "a"), (2, "b"), (3, "c")] {
            s.put_event(&EVENTS, seq, &ev, 10).expect("event");
        }
    }
    let s = Store::open(&dir.db()).expect("reopen");
    assert_eq!(s.events_after::<String>(&EVENTS, 1).expect("events"), vec!["b".to_string(), "c".to_string()]);
    assert_eq!(s.last_event_seq(&EVENTS).expect("last"), 3);
}

#[test]
fn a_log_keeps_only_its_newest_events() {
    let dir = TempDir::new("trim");
    let s = Store::open(&dir.db()).expect("open");
    for seq in 1..=20u64 {
        s.put_event(&EVENTS, seq, &seq, 5).expect("event");
    }
    assert_eq!(s.events_after::<u64>(&EVENTS, 0).expect("events"), vec![16, 17, 18, 19, 20]);
}

#[test]
fn an_older_record_is_upgraded_through_each_version_when_read() {
    let dir = TempDir::new("upgrade");
    {
        let s = Store::open(&dir.db()).expect("open");
        s.put(&RECS, "a", &rec("a", 256)).expect("put v1");
    }
    let s = Store::open(&dir.db()).expect("reopen");
    let want = RecV3 { name: "a".into(), memory_mib: 256, cpus: 1 };
    assert_eq!(s.get::<RecV3>(&RECS_V3, "a").expect("get"), Some(want));
}

#[test]
fn a_newer_record_is_refused_naming_table_key_and_both_versions() {
    let dir = TempDir::new("newer");
    let s = Store::open(&dir.db()).expect("open");
    s.put(&RECS_V3, "vm7", &serde_json::json!({"name": "vm7", "memory_mib": 1, "cpus": 1})).expect("put v3");
    let err = s.list::<Rec>(&RECS).expect_err("a version-3 record read as version 1");
    assert!(matches!(err, StoreError::TooNew { table: "recs", ref key, stored: 3, current: 1 } if key == "vm7"), "{err:?}");
    assert_eq!(
        err.to_string(),
        "record `vm7` of table `recs` has version 3, newer than version 1 that this program knows; it was written by a newer walkabout"
    );
}

#[test]
fn a_refused_upgrade_step_is_reported_with_its_versions() {
    let dir = TempDir::new("badupgrade");
    let s = Store::open(&dir.db()).expect("open");
    s.put(&RECS, "odd", &serde_json::json!({"name": "odd"})).expect("put v1 without mib");
    let err = s.get::<RecV3>(&RECS_V3, "odd").expect_err("upgrade needs `mib`");
    assert_eq!(err.to_string(), "record `odd` of table `recs` cannot be upgraded from version 1 to 2: no field `mib`");
}

#[test]
fn a_record_of_another_shape_is_reported_by_table_and_key() {
    let dir = TempDir::new("decode");
    let s = Store::open(&dir.db()).expect("open");
    s.put(&RECS, "x", &"just a string").expect("put");
    let err = s.list::<Rec>(&RECS).expect_err("a string is no Rec");
    assert!(matches!(err, StoreError::Decode { table: "recs", ref key, version: 1, .. } if key == "x"), "{err:?}");
}

/// The layout written before this crate (agent and controller `store.rs` up to 0392632):
/// untagged JSON records with an inline `version`, events keyed by `u64`, counters in
/// `meta`.
fn write_legacy_database(path: &Path) {
    const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
    const LEGACY_EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
    let db = ::redb::Database::create(path).expect("create legacy db");
    let txn = db.begin_write().expect("txn");
    {
        let mut vms = txn.open_table(VMS).expect("vms");
        let g1 = serde_json::json!({"version": 1, "name": "g1", "mib": 256});
        vms.insert("g1", serde_json::to_vec(&g1).expect("json").as_slice()).expect("insert");
        let mut events = txn.open_table(LEGACY_EVENTS).expect("events");
        for seq in 1..=3u64 {
            let ev = serde_json::json!({"version": 1, "seq": seq});
            events.insert(seq, serde_json::to_vec(&ev).expect("json").as_slice()).expect("insert");
        }
        txn.open_table(META).expect("meta").insert("plan", 7).expect("insert");
    }
    txn.commit().expect("commit");
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct LegacyVm {
    version: u32,
    name: String,
    mib: u64,
}

#[derive(Debug, PartialEq, Deserialize)]
struct LegacyEvent {
    version: u32,
    seq: u64,
}

/// A legacy database in a fresh directory, opened with this crate.
fn open_legacy(tag: &str) -> (Store, TempDir) {
    let dir = TempDir::new(tag);
    write_legacy_database(&dir.db());
    (Store::open(&dir.db()).expect("open legacy db"), dir)
}

#[test]
fn a_database_written_by_the_old_stores_opens_and_reads() {
    let (s, _dir) = open_legacy("legacy");
    let vms_v1 = Table::new("vms", 1, no_upgrades);
    let events_v1 = Log::new("events", 1, no_upgrades);
    assert_eq!(s.list::<LegacyVm>(&vms_v1).expect("list"), vec![LegacyVm { version: 1, name: "g1".into(), mib: 256 }]);
    assert_eq!(s.events_after::<LegacyEvent>(&events_v1, 2).expect("events"), vec![LegacyEvent { version: 1, seq: 3 }]);
    assert_eq!(s.last_event_seq(&events_v1).expect("last"), 3);
    assert_eq!(s.next("plan").expect("next"), 8);
    s.put(&vms_v1, "g2", &LegacyVm { version: 1, name: "g2".into(), mib: 512 }).expect("write beside legacy records");
    assert_eq!(s.list::<LegacyVm>(&vms_v1).expect("list").len(), 2);
}

#[test]
fn a_legacy_record_is_upgraded_from_its_inline_version_which_then_follows() {
    let (s, _dir) = open_legacy("legacy-upgrade");
    let vms_v2 = Table::new("vms", 2, upgrade_recs);
    let got: Value = s.get(&vms_v2, "g1").expect("get").expect("present");
    assert_eq!(got, serde_json::json!({"version": 2, "name": "g1", "memory_mib": 256}));
}

/// Writes a database of 200 records, then cuts its file to `keep(len)` bytes; its good
/// copy is removed (a database that has none).
fn truncated(tag: &str, keep: fn(u64) -> u64) -> TempDir {
    let dir = TempDir::new(tag);
    {
        let s = Store::open(&dir.db()).expect("open");
        for i in 0..200 {
            s.put(&RECS, &format!("vm{i}"), &rec("x", i)).expect("put");
        }
    }
    std::fs::remove_file(good_copy_path(&dir.db())).expect("the first write kept a good copy");
    let file = std::fs::OpenOptions::new().write(true).open(dir.db()).expect("open file");
    let len = file.metadata().expect("metadata").len();
    file.set_len(keep(len)).expect("truncate");
    dir
}

#[test]
fn a_truncated_file_is_refused_as_damaged_naming_it() {
    let dir = truncated("half", |len| len / 2);
    let err = Store::open(&dir.db()).err().expect("a truncated database must not open");
    assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("database {} is damaged: ", dir.db().display())), "{msg}");
    assert!(msg.contains("the file was cut short"), "{msg}");
}

#[test]
fn a_file_missing_only_its_last_byte_is_refused_as_damaged() {
    let dir = truncated("last-byte", |len| len - 1);
    let err = Store::open(&dir.db()).err().expect("a truncated database must not open");
    assert!(matches!(err, StoreError::Damaged { ref detail, .. } if detail.contains("the file was cut short")), "{err:?}");
}

/// Writes `contents` as the database file and opens it, which must fail.
fn refused(tag: &str, contents: &[u8]) -> (StoreError, TempDir) {
    let dir = TempDir::new(tag);
    std::fs::write(dir.db(), contents).expect("write");
    (Store::open(&dir.db()).err().expect("the file must not open"), dir)
}

#[test]
fn a_zero_byte_file_is_refused_not_started_empty() {
    let (err, dir) = refused("empty", b"");
    assert!(matches!(err, StoreError::EmptyFile { .. }), "{err:?}");
    assert!(err.to_string().starts_with(&format!("database {} is an empty file (0 bytes)", dir.db().display())), "{err}");
    assert_eq!(std::fs::metadata(dir.db()).expect("still there").len(), 0, "the empty file is left as it was");
}

#[test]
fn a_file_that_is_not_a_database_is_refused_as_damaged() {
    let (err, _dir) = refused("garbage", b"{\"this is\": \"not redb\"}\n");
    assert!(matches!(err, StoreError::Damaged { ref detail, .. } if detail.contains("magic number")), "{err:?}");
}

#[test]
fn a_file_shorter_than_a_header_is_refused_as_damaged() {
    let (err, _dir) = refused("short", &REDB_MAGIC);
    assert!(matches!(err, StoreError::Damaged { ref detail, .. } if detail.contains("shorter than a redb header")), "{err:?}");
}

#[test]
fn a_second_open_of_the_same_file_reports_it_in_use() {
    let dir = TempDir::new("inuse");
    let _first = Store::open(&dir.db()).expect("open");
    let err = Store::open(&dir.db()).err().expect("second open");
    assert_eq!(err.to_string(), format!("cannot open database {}: it is in use by another process", dir.db().display()));
}

/// A database of `n` records opened twice (the second open keeps its good copy), then
/// `more` records written after it.
fn with_good_copy(tag: &str, n: u64, more: u64) -> TempDir {
    let dir = TempDir::new(tag);
    {
        let s = Store::open(&dir.db()).expect("create");
        for i in 0..n {
            s.put(&RECS, &format!("vm{i}"), &rec("kept", i)).expect("put");
        }
    }
    let s = Store::open(&dir.db()).expect("reopen");
    assert!(good_copy_path(&dir.db()).exists(), "no good copy after a successful open");
    for i in n..n + more {
        s.put(&RECS, &format!("vm{i}"), &rec("late", i)).expect("put");
    }
    dir
}

#[test]
fn a_cut_database_with_a_good_copy_is_refused_naming_the_copy_and_how_to_use_it() {
    let dir = with_good_copy("good-cut", 50, 5);
    let file = std::fs::OpenOptions::new().write(true).open(dir.db()).expect("open file");
    let len = file.metadata().expect("metadata").len();
    file.set_len(len / 2).expect("truncate");
    let err = Store::open(&dir.db()).err().expect("a cut database must not open");
    let good = good_copy_path(&dir.db());
    assert!(matches!(err, StoreError::LastGoodCopy { good: ref g, .. } if *g == good), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("database {} is damaged (", dir.db().display())), "{msg}");
    assert!(msg.contains(&format!("cp {} {}", good.display(), dir.db().display())), "{msg}");
}

#[test]
fn a_zero_byte_or_missing_database_with_a_good_copy_never_starts_empty() {
    let dir = with_good_copy("good-zero", 10, 0);
    std::fs::write(dir.db(), b"").expect("zero the file");
    let err = Store::open(&dir.db()).err().expect("an empty file must not open");
    assert!(matches!(err, StoreError::LastGoodCopy { ref problem, .. } if problem.contains("empty file")), "{err:?}");
    std::fs::remove_file(dir.db()).expect("remove");
    let err = Store::open(&dir.db()).err().expect("a missing file with a good copy must not start empty");
    assert!(matches!(err, StoreError::LastGoodCopy { ref problem, .. } if problem == "is missing"), "{err:?}");
    assert!(!dir.db().exists(), "no empty database was made");
}

#[test]
fn restoring_the_good_copy_brings_back_every_record_written_before_it_was_taken() {
    let dir = with_good_copy("good-restore", 30, 3);
    std::fs::write(dir.db(), b"garbage, not redb").expect("overwrite");
    let aside = restore_good_copy(&dir.db()).expect("restore").expect("the damaged file kept aside");
    assert_eq!(std::fs::read(&aside).expect("aside"), b"garbage, not redb");
    let s = Store::open(&dir.db()).expect("the restored database opens");
    let recs: Vec<Rec> = s.list(&RECS).expect("list");
    assert_eq!(recs.len(), 30, "the records of the good copy, not those written after it");
    assert!(recs.iter().all(|r| r.name == "kept"), "{recs:?}");
}
