//! Property tests of reading `query-migrate` (issue 11, "inputs fuzzed"): any JSON QEMU
//! answers gives a progress report without a panic; a generated reply reads back as the
//! numbers it holds; a reply without RAM statistics keeps what the last one had.

use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,10}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 8, |inner| {
        let key = prop_oneof![
            "[a-z-]{0,10}",
            prop_oneof![
                Just("status"),
                Just("ram"),
                Just("total-time"),
                Just("expected-downtime"),
                Just("cpu-throttle-percentage"),
                Just("transferred"),
                Just("remaining"),
                Just("total"),
                Just("dirty-sync-count"),
                Just("dirty-pages-rate"),
                Just("page-size"),
                Just("mbps"),
            ]
            .prop_map(String::from),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A plausible `query-migrate` reply with its numbers anywhere in `u64`.
#[derive(Debug, Clone)]
struct Reply {
    status: String,
    total_time: u64,
    downtime: u64,
    throttle: u64,
    ram: Option<(u64, u64, u64, u64, u64, u64, f64)>,
}

fn reply() -> impl Strategy<Value = Reply> {
    let n = || prop_oneof![3 => 0u64..1 << 40, 1 => any::<u64>()];
    let page = prop_oneof![Just(0u64), Just(4096), Just(65536), any::<u64>()];
    let ram = (n(), n(), n(), n(), n(), page, 0.0f64..100_000.0);
    (
        prop_oneof![
            Just("setup"),
            Just("active"),
            Just("completed"),
            Just("failed"),
            Just("postcopy-active"),
            Just("cancelled"),
            Just("device")
        ],
        n(),
        n(),
        0u64..=100,
        proptest::option::of(ram),
    )
        .prop_map(|(status, total_time, downtime, throttle, ram)| Reply { status: status.into(), total_time, downtime, throttle, ram })
}

impl Reply {
    fn json(&self) -> Value {
        let mut v = json!({"status": self.status, "total-time": self.total_time, "expected-downtime": self.downtime,
                           "cpu-throttle-percentage": self.throttle});
        if let Some((transferred, remaining, total, passes, rate, page, mbps)) = self.ram {
            v["ram"] = json!({"transferred": transferred, "remaining": remaining, "total": total, "dirty-sync-count": passes,
                              "dirty-pages-rate": rate, "page-size": page, "mbps": mbps, "normal": 3, "duplicate": 7});
        }
        v
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_reply_gives_progress(v in json_value(), last_sent in any::<u64>()) {
        let p = from_query(&v);
        prop_assert_eq!(p.qemu_status.as_str(), v["status"].as_str().unwrap_or("none"));
        let last = Progress { transferred_bytes: last_sent, ..Progress::default() };
        let after = from_query_after(&v, &last);
        if v.get("ram").is_none() {
            prop_assert_eq!(after.transferred_bytes, last_sent);
        }
        let _ = phase_of(&p.qemu_status);
        let _ = sample(&after);
    }

    #[test]
    fn a_generated_reply_reads_back(r in reply()) {
        let p = from_query(&r.json());
        prop_assert_eq!((p.qemu_status.as_str(), p.elapsed_ms, p.expected_downtime_ms, p.throttle_pct),
                        (r.status.as_str(), r.total_time, r.downtime, r.throttle));
        let (transferred, remaining, total, passes, rate, page, mbps) = r.ram.unwrap_or((0, 0, 0, 0, 0, 0, 0.0));
        prop_assert_eq!((p.transferred_bytes, p.remaining_bytes, p.total_bytes, p.iteration), (transferred, remaining, total, passes));
        // Dirty pages per second times the page size (4 KiB at least), saturating.
        prop_assert_eq!(p.dirty_rate_bps, rate.saturating_mul(page.max(4096)));
        prop_assert_eq!(p.transfer_rate_bps, (mbps * 1e6 / 8.0) as u64);
    }
}

/// The minimal reply the property found: a dirty-page rate whose product with the page
/// size does not fit in `u64` (a panic in debug builds, a wrapped rate in release).
#[test]
fn a_dirty_rate_too_large_for_u64_saturates() {
    let p = from_query(&json!({"status": "active", "ram": {"dirty-pages-rate": u64::MAX / 2, "page-size": 4096}}));
    assert_eq!(p.dirty_rate_bps, u64::MAX);
}
