//! Property tests of the planner's input (issue 11, "inputs fuzzed"): `walkabout plan`
//! reads a case file, outside input. Any text is a case or a JSON error; any case of
//! the right shape (unknown names, duplicates, zero limits, memory and vCPU counts up to
//! `u64::MAX`, groups naming anything) is an input error naming the cause, or an outcome
//! whose plan the independent simulator of `common` accepts; the policies too. The
//! well-formed random clusters are `exhaustive.rs`'s; these are the ill-formed ones.

mod common;

use proptest::prelude::*;
use serde_json::{json, Value};
use std::time::Duration;
use walkabout_plan::policy::{plan_policy, Policy};
use walkabout_plan::{plan_with, Case, InputError, Options, Outcome};

/// Small budgets: these cases test the input's handling, not the search.
fn opts() -> Options {
    Options {
        exact_max_vms: 6,
        node_budget: 2_000,
        improve_budget: 200,
        repair_budget: 500,
        variants_max_vms: 8,
        time_limit: Some(Duration::from_millis(200)),
    }
}

/// Memory or vCPU counts: ordinary ones, and the edges where sums overflow.
fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![24 => 0u64..5_000, 1 => Just(u64::MAX), 1 => (walkabout_plan::MAX_AMOUNT - 2)..=(walkabout_plan::MAX_AMOUNT + 2), 1 => any::<u64>()]
}

/// Names from a small pool, so that duplicates and references to unknown names happen.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c"), Just("h1"), Just("h2"), Just("h3"), Just(""), Just("é")].prop_map(String::from)
}

fn features() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(prop_oneof![Just("avx"), Just("sse4.2"), Just("aes")].prop_map(String::from), 0..2)
}

fn host() -> impl Strategy<Value = Value> {
    (
        name(),
        amount(),
        proptest::option::of(amount()),
        proptest::option::of(prop_oneof![Just("x86_64"), Just("aarch64")]),
        features(),
        amount(),
    )
        .prop_map(|(name, memory_mib, vcpus, arch, cpu_features, reserved_mib)| {
            let mut h = json!({"name": name, "memory_mib": memory_mib, "reserved_mib": reserved_mib, "cpu_features": cpu_features});
            if let Some(v) = vcpus {
                h["vcpus"] = json!(v);
            }
            if let Some(a) = arch {
                h["arch"] = json!(a);
            }
            h
        })
}

fn vm() -> impl Strategy<Value = Value> {
    (name(), amount(), proptest::option::of(amount()), proptest::option::of(prop_oneof![Just("x86_64"), Just("aarch64")]), features())
        .prop_map(|(name, memory_mib, vcpus, arch, cpu_features)| {
            let mut v = json!({"name": name, "memory_mib": memory_mib, "cpu_features": cpu_features});
            if let Some(c) = vcpus {
                v["vcpus"] = json!(c);
            }
            if let Some(a) = arch {
                v["arch"] = json!(a);
            }
            v
        })
}

fn placement() -> impl Strategy<Value = Value> {
    proptest::collection::btree_map(name(), name(), 0..5).prop_map(|m| json!(m))
}

fn group() -> impl Strategy<Value = Value> {
    (name(), prop_oneof![Just("affinity"), Just("anti-affinity")], proptest::collection::vec(name(), 0..4))
        .prop_map(|(name, kind, vms)| json!({"name": name, "kind": kind, "vms": vms}))
}

/// A case of the right shape with arbitrary contents.
fn wild_case() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(host(), 0..4),
        proptest::collection::vec(vm(), 0..5),
        placement(),
        placement(),
        proptest::option::of(0u32..3),
        proptest::collection::vec(group(), 0..2),
    )
        .prop_map(|(hosts, vms, current, target, parallel, groups)| {
            let mut c = json!({"hosts": hosts, "vms": vms, "current": current, "target": target, "groups": groups});
            if let Some(p) = parallel {
                c["limits"] = json!({"max_parallel_per_host": p});
            }
            c
        })
}

/// Arbitrary JSON with the format's keys likely.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        amount().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        let key = prop_oneof![
            "[a-z_]{0,8}",
            prop_oneof![
                Just("hosts"),
                Just("vms"),
                Just("current"),
                Just("target"),
                Just("limits"),
                Just("groups"),
                Just("name"),
                Just("memory_mib"),
                Just("vcpus"),
                Just("kind"),
                Just("max_parallel_per_host"),
                Just("reserved_mib"),
            ]
            .prop_map(String::from),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The checks every outcome of `case` must pass.
fn check(case_json: &Value, case: &Case, outcome: Result<Outcome, InputError>) -> Result<(), TestCaseError> {
    match outcome {
        Err(e) => prop_assert!(!e.to_string().is_empty()),
        Ok(Outcome::Ok(plan)) => {
            let out = serde_json::to_value(Outcome::Ok(plan)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            common::simulate(case_json, &out).map_err(|e| TestCaseError::fail(format!("invalid plan: {e}\n{case_json}\n{out}")))?;
        }
        Ok(Outcome::Impossible(i) | Outcome::Unsolved(i)) => {
            prop_assert!(!i.reason.is_empty(), "{:?}", case);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_a_case_or_a_json_error(text in "\\PC{0,200}", bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
        for t in [text, String::from_utf8_lossy(&bytes).into_owned()] {
            match Case::from_json(&t) {
                Ok(_) => prop_assert!(serde_json::from_str::<Value>(&t).is_ok()),
                Err(e) => prop_assert!(matches!(e, InputError::Json(_)), "{e}"),
            }
        }
    }

    /// Any JSON: a case (planned, checked) or a JSON error.
    #[test]
    fn any_json_is_planned_or_refused(v in json_value()) {
        match Case::from_json(&v.to_string()) {
            Ok(case) => check(&v, &case, plan_with(&case, &opts()))?,
            Err(e) => prop_assert!(matches!(e, InputError::Json(_)), "{e}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// A case of the right shape and any contents: an input error or a checked outcome.
    #[test]
    fn any_case_is_an_input_error_or_a_valid_plan(c in wild_case()) {
        let case = Case::from_json(&c.to_string()).map_err(|e| TestCaseError::fail(format!("{e}: {c}")))?;
        check(&c, &case, plan_with(&case, &opts()))?;
    }

    /// The policies (`walkabout plan drain|consolidate|balance`) on any case: an input
    /// error, or an outcome; a plan they make is valid toward its own target.
    #[test]
    fn any_case_under_a_policy_is_an_input_error_or_a_valid_plan(c in wild_case(), which in 0u8..3, drained in proptest::collection::vec(name(), 0..2)) {
        let case = Case::from_json(&c.to_string()).map_err(|e| TestCaseError::fail(format!("{e}: {c}")))?;
        let policy = match which { 0 => Policy::Drain { hosts: drained }, 1 => Policy::Consolidate, _ => Policy::Balance };
        match plan_policy(&case, &policy, &opts()) {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(Outcome::Ok(plan)) => {
                let mut with_target = c.clone();
                if let Some(t) = &plan.target {
                    with_target["target"] = json!(t);
                }
                let out = serde_json::to_value(Outcome::Ok(plan)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                common::simulate(&with_target, &out).map_err(|e| TestCaseError::fail(format!("invalid plan: {e}\n{with_target}\n{out}")))?;
            }
            Ok(Outcome::Impossible(i) | Outcome::Unsolved(i)) => prop_assert!(!i.reason.is_empty()),
        }
    }
}

/// The minimal case the policy property found: two VMs of one name, one of `u64::MAX`
/// MiB, consolidated (a panic summing their memory, before the duplicate was refused).
#[test]
fn consolidating_duplicate_vms_of_the_largest_size_is_an_input_error() {
    let case = Case::from_json(
        r#"{"hosts": [], "vms": [{"name": "a", "memory_mib": 1}, {"name": "a", "memory_mib": 18446744073709551615}],
            "current": {}, "target": {}}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let outcome = plan_policy(&case, &Policy::Consolidate, &opts());
    assert!(outcome.is_err() || matches!(outcome, Ok(Outcome::Impossible(_))), "{outcome:?}");
}
