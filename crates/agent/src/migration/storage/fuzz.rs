//! Property tests of reading `query-block-jobs` while disks are mirrored (issue 11,
//! "inputs fuzzed"): any JSON QEMU answers gives summed progress or an error naming one
//! of our jobs, never a panic; generated job lists sum to what they hold.

use super::*;
use proptest::prelude::*;
use std::future::Future;

/// A QEMU that answers every command with `reply`.
struct Answers {
    reply: Value,
    events: broadcast::Sender<Event>,
}

impl MigrationQmp for Answers {
    fn execute(&self, _command: &str, _args: Option<Value>) -> impl Future<Output = Result<Value, QmpError>> + Send {
        let reply = self.reply.clone();
        async move { Ok(reply) }
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn cpu_features(&self, _model: &str) -> Result<BTreeSet<String>, QmpError> {
        Ok(BTreeSet::new())
    }
}

fn poll(jobs: &[&str], reply: Value) -> Result<(DiskProgress, bool), StorageError> {
    let m = Mirrors { jobs: jobs.iter().map(|n| (job_id(n), nbd_node(n))).collect() };
    let qmp = Answers { reply, events: broadcast::channel(1).0 };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap_or_else(|e| panic!("runtime: {e}"));
    rt.block_on(m.poll(&qmp))
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "\\PC{0,8}".prop_map(Value::from),
        prop_oneof![Just("mirror-disk0"), Just("mirror-disk1"), Just("ok"), Just("failed"), Just("aborting"), Just("ready")]
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        let key = prop_oneof![
            "[a-z-]{0,8}",
            prop_oneof![Just("device"), Just("offset"), Just("len"), Just("ready"), Just("io-status"), Just("status"), Just("error")]
                .prop_map(String::from),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0u64..1 << 40, 1 => (u64::MAX / 2)..=u64::MAX]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_reply_is_progress_or_an_error_naming_our_job(v in json_value()) {
        match poll(&["disk0", "disk1"], v) {
            Ok((p, _)) => prop_assert!(p.remaining_bytes <= p.total_bytes, "{:?}", p),
            Err(StorageError::Mirror { job, .. }) => prop_assert!(job == "mirror-disk0" || job == "mirror-disk1", "{}", job),
            Err(e) => prop_assert!(false, "{}", e),
        }
    }

    #[test]
    fn generated_jobs_sum_to_what_they_hold(jobs in proptest::collection::vec((amount(), amount(), any::<bool>()), 1..4)) {
        let names: Vec<String> = (0..jobs.len()).map(node_name_of).collect();
        let reply = Value::Array(jobs.iter().zip(&names).map(|((offset, len, ready), n)| json!({
            "device": job_id(n), "offset": offset, "len": len, "ready": ready, "io-status": "ok", "status": "running", "type": "mirror"
        })).collect());
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (p, ready) = poll(&names, reply).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let sum = |f: &dyn Fn(&(u64, u64, bool)) -> u64| jobs.iter().map(f).fold(0u64, u64::saturating_add);
        prop_assert_eq!(p.transferred_bytes, sum(&|j| j.0));
        prop_assert_eq!(p.total_bytes, sum(&|j| j.1));
        prop_assert_eq!(p.remaining_bytes, sum(&|j| j.1.saturating_sub(j.0)));
        prop_assert_eq!(ready, jobs.iter().all(|j| j.2));
    }
}

fn node_name_of(i: usize) -> String {
    walkabout_api::DiskSpec::node_name(i)
}

/// The minimal reply the property found: two mirror jobs whose offsets together pass
/// `u64::MAX` (a panic in debug builds).
#[test]
fn job_counters_too_large_to_add_saturate() {
    let reply = json!([
        {"device": "mirror-disk0", "offset": u64::MAX, "len": u64::MAX, "ready": true, "io-status": "ok"},
        {"device": "mirror-disk1", "offset": 1, "len": 1, "ready": true, "io-status": "ok"},
    ]);
    let (p, ready) = poll(&["disk0", "disk1"], reply).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((p.transferred_bytes, p.total_bytes, ready), (u64::MAX, u64::MAX, true));
}
