//! `bench/store`: the controller's store, embedded redb beside etcd (Debian's
//! etcd-server 3.4, one member on loopback), the same records through the same
//! `walkabout_store::Store` front. Writes alternate between the two so both see the same
//! machine load; etcd's writes are fenced by a leader's term, as the leading controller's
//! are. Prints one JSON document.
//!
//! Run: `cargo run -p walkabout-bench --bin store > bench/results/store.json`.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use walkabout_store::{no_upgrades, Store, Table};
use walkabout_store_etcd::{Etcd, EtcdConfig};
use walkabout_testbed::{Etcd as EtcdProcess, TempDir};

/// Writes per backend (each a put of one record).
const WRITES: usize = 400;
/// Counter increments per backend (ids of plans and migrations).
const COUNTS: usize = 200;

const MIGRATIONS: Table = Table::new("migrations", 1, no_upgrades);

fn record(i: usize) -> Value {
    // About the size of a controller's migration record (about 700 bytes of JSON).
    json!({
        "version": 1, "id": format!("m{i}"), "vm": format!("vm{}", i % 50), "from": "h1", "to": "h2",
        "plan": "p7", "why": "drain h1: h2 has the most free memory once the migrations under way land",
        "phase": "running", "reason": null, "agent_id": format!("mig-{i}-a1b2c3d4"),
        "progress": {"transferred_bytes": 123_456_789u64, "remaining_bytes": 98_765_432u64, "total_bytes": 268_435_456u64,
                      "dirty_rate_bps": 33_554_432u64, "bandwidth_bps": 1_073_741_824u64, "iteration": 3, "expected_downtime_ms": 40},
        "downtime_ms": null, "total_ms": null, "started_ms": 1_764_600_000_000u64 + i as u64, "finished_ms": null
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(mut xs: Vec<f64>) -> Value {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs.get(((xs.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    json!({"n": xs.len(), "median_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "max_ms": at(1.0)})
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(ms(start.elapsed()))
}

fn main() -> Result<()> {
    let dir = TempDir::new("bench-store")?;
    let redb = Store::open(&dir.path().join("controller.redb"))?;
    let mut process = EtcdProcess::start(dir.path(), Duration::from_secs(60)).context("etcd (run scripts/setup-host.sh)")?;
    let etcd = Etcd::connect(EtcdConfig::parse(&process.store_url()).map_err(anyhow::Error::msg)?)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let term = rt.block_on(etcd.campaign("http://bench", Duration::from_secs(10)))?;
    let fenced = etcd.store(Some(&term));

    let (mut w_redb, mut w_etcd) = (vec![], vec![]);
    for i in 0..WRITES {
        let r = record(i);
        let key = format!("m{i}");
        w_redb.push(timed(|| Ok(redb.put(&MIGRATIONS, &key, &r)?))?);
        w_etcd.push(timed(|| Ok(fenced.put(&MIGRATIONS, &key, &r)?))?);
    }
    let (mut c_redb, mut c_etcd) = (vec![], vec![]);
    for _ in 0..COUNTS {
        c_redb.push(timed(|| redb.next("migration").map(|_| ()).map_err(Into::into))?);
        c_etcd.push(timed(|| fenced.next("migration").map(|_| ()).map_err(Into::into))?);
    }
    let l_redb = timed(|| redb.list::<Value>(&MIGRATIONS).map(|_| ()).map_err(Into::into))?;
    let l_etcd = timed(|| fenced.list::<Value>(&MIGRATIONS).map(|_| ()).map_err(Into::into))?;
    let (wr, we) = (stats(w_redb), stats(w_etcd));
    let ratio = we["median_ms"].as_f64().unwrap_or(f64::NAN) / wr["median_ms"].as_f64().unwrap_or(f64::NAN);
    let report = json!({
        "bench": "store",
        "peer": "the embedded redb store (the single controller's default), same records, same run",
        "etcd": "Debian etcd-server 3.4, one member on loopback, writes fenced by a leader's term",
        "record_bytes": serde_json::to_vec(&record(0))?.len(),
        "put": {"redb": wr, "etcd": we, "etcd_over_redb_median": ratio},
        "next_counter": {"redb": stats(c_redb), "etcd": stats(c_etcd)},
        "list_all": {"records": WRITES, "redb_ms": l_redb, "etcd_ms": l_etcd},
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("").to_string(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    drop(fenced);
    rt.block_on(etcd.resign(&term));
    process.stop(Duration::from_secs(5));
    Ok(())
}
