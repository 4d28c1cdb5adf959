//! Progress of a migration as users see it, read from QEMU's `query-migrate`.

use crate::phase::Phase;
use crate::policy::Sample;
use serde_json::Value;

pub use walkabout_api::Progress;

/// Builds progress from a `query-migrate` reply.
pub fn from_query(v: &Value) -> Progress {
    let ram = &v["ram"];
    let u = |x: &Value| x.as_u64().unwrap_or(0);
    let page = u(&ram["page-size"]).max(4096);
    Progress {
        phase: None,
        qemu_status: v["status"].as_str().unwrap_or("none").to_string(),
        iteration: u(&ram["dirty-sync-count"]),
        transferred_bytes: u(&ram["transferred"]),
        remaining_bytes: u(&ram["remaining"]),
        total_bytes: u(&ram["total"]),
        dirty_rate_bps: u(&ram["dirty-pages-rate"]).saturating_mul(page),
        // `mbps` is megabits per second.
        transfer_rate_bps: (ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0) as u64,
        expected_downtime_ms: u(&v["expected-downtime"]),
        elapsed_ms: u(&v["total-time"]),
        throttle_pct: u(&v["cpu-throttle-percentage"]),
        ..Progress::default()
    }
}

/// Builds progress from a `query-migrate` reply that follows the sample `last`.
/// QEMU reports RAM statistics only while a migration runs and once it completed; a
/// failed or cancelled one answers with its status alone. What was sent and in how
/// many passes then carries over from `last`, instead of reading as zero (a failed
/// migration's summary once said "0 MiB sent in 0 passes" after 68 MiB had gone);
/// the rates are zero, since nothing moves any more.
pub fn from_query_after(v: &Value, last: &Progress) -> Progress {
    let mut p = from_query(v);
    if v.get("ram").is_none() {
        p.iteration = last.iteration;
        p.transferred_bytes = last.transferred_bytes;
        p.remaining_bytes = last.remaining_bytes;
        p.total_bytes = last.total_bytes;
    }
    if v.get("total-time").is_none() {
        p.elapsed_ms = last.elapsed_ms;
    }
    p
}

/// The policy's view of a progress report.
pub fn sample(p: &Progress) -> Sample {
    Sample {
        elapsed_ms: p.elapsed_ms,
        iteration: p.iteration,
        remaining_bytes: p.remaining_bytes,
        transferred_bytes: p.transferred_bytes,
        dirty_rate_bps: p.dirty_rate_bps,
        transfer_rate_bps: p.transfer_rate_bps,
        expected_downtime_ms: p.expected_downtime_ms,
    }
}

/// Maps QEMU's migration status on the source to a phase.
pub fn phase_of(qemu_status: &str) -> Phase {
    match qemu_status {
        "none" | "setup" => Phase::Preparing,
        "active" | "pre-switchover" | "wait-unplug" | "cancelling" => Phase::Running,
        "device" | "postcopy-active" | "postcopy-paused" | "postcopy-recover-setup" | "postcopy-recover" => Phase::Switchover,
        "completed" => Phase::Completed,
        "cancelled" => Phase::Cancelled,
        _ => Phase::Failed,
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_reply_becomes_progress() {
        let v = serde_json::json!({
            "status": "active", "total-time": 1500, "expected-downtime": 40,
            "ram": {"transferred": 1000, "remaining": 2000, "total": 4096, "dirty-sync-count": 3,
                    "dirty-pages-rate": 10, "page-size": 4096, "mbps": 800.0}
        });
        let p = from_query(&v);
        assert_eq!((p.iteration, p.remaining_bytes, p.dirty_rate_bps), (3, 2000, 40960));
        assert_eq!(p.transfer_rate_bps, 100_000_000);
        assert_eq!(phase_of(&p.qemu_status), Phase::Running);
        assert_eq!(phase_of("postcopy-active"), Phase::Switchover);
        assert_eq!(phase_of("failed"), Phase::Failed);
    }

    #[test]
    fn a_failed_migration_keeps_what_it_had_sent() {
        let running = serde_json::json!({
            "status": "active", "total-time": 4000,
            "ram": {"transferred": 68u64 << 20, "remaining": 10u64 << 20, "total": 256u64 << 20, "dirty-sync-count": 3, "mbps": 200.0}
        });
        let last = from_query(&running);
        // What QEMU answers once the migration failed: its status, no RAM statistics.
        let failed = serde_json::json!({"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"});
        let p = from_query_after(&failed, &last);
        assert_eq!((p.transferred_bytes, p.iteration, p.total_bytes, p.elapsed_ms), (68 << 20, 3, 256 << 20, 4000));
        assert_eq!((p.qemu_status.as_str(), p.transfer_rate_bps), ("failed", 0));
    }

    #[test]
    fn a_reply_with_ram_statistics_is_read_as_it_is() {
        let last = Progress { transferred_bytes: 1 << 30, iteration: 9, ..Progress::default() };
        let done = serde_json::json!({"status": "completed", "total-time": 900, "ram": {"transferred": 300, "dirty-sync-count": 2}});
        let p = from_query_after(&done, &last);
        assert_eq!((p.transferred_bytes, p.iteration), (300, 2));
    }
}
