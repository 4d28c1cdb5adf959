//! Policies make targets that keep their promises, and the plans to them validate.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};
use walkabout_plan::policy::{plan_policy, Policy};
use walkabout_plan::{Case, Options};

fn cluster() -> Value {
    json!({
        "hosts": [
            {"name": "h1", "memory_mib": 8192}, {"name": "h2", "memory_mib": 8192},
            {"name": "h3", "memory_mib": 8192}, {"name": "h4", "memory_mib": 8192}],
        "vms": [
            {"name": "a", "memory_mib": 2048}, {"name": "b", "memory_mib": 2048},
            {"name": "c", "memory_mib": 1024}, {"name": "d", "memory_mib": 3072},
            {"name": "e", "memory_mib": 1024}, {"name": "f", "memory_mib": 512}],
        "current": {"a": "h1", "b": "h2", "c": "h3", "d": "h3", "e": "h4", "f": "h4"},
        "groups": [
            {"name": "web", "kind": "anti-affinity", "vms": ["a", "b"]},
            {"name": "db", "kind": "affinity", "vms": ["c", "d"]}]
    })
}

/// Runs a policy; returns the plan JSON and the case with the target filled in.
fn run(cluster: &Value, policy: Policy) -> (Value, Value) {
    let case: Case = serde_json::from_value(cluster.clone()).expect("cluster parses");
    let out = plan_policy(&case, &policy, &Options::default()).expect("valid cluster");
    let out = serde_json::to_value(out).expect("serialises");
    assert_eq!(out["status"], "ok", "{out}");
    let mut with_target = cluster.clone();
    with_target["target"] = out["target"].clone();
    common::simulate(&with_target, &out).expect("plan validates");
    (out, with_target)
}

fn target(out: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(out["target"].clone()).expect("target map")
}

fn groups_hold(t: &BTreeMap<String, String>) {
    assert_ne!(t["a"], t["b"], "anti-affinity web broken: {t:?}");
    assert_eq!(t["c"], t["d"], "affinity db broken: {t:?}");
}

#[test]
fn drain_empties_the_host_and_moves_nothing_else() {
    let (out, _) = run(&cluster(), Policy::Drain { hosts: vec!["h4".into()] });
    let t = target(&out);
    assert!(t.values().all(|h| h != "h4"), "{t:?}");
    for vm in ["a", "b", "c", "d"] {
        assert_eq!(t[vm], cluster()["current"][vm], "{vm} moved");
    }
    groups_hold(&t);
    assert_eq!(out["count"], 2);
}

#[test]
fn drain_of_an_unknown_host_is_an_input_error() {
    let case: Case = serde_json::from_value(cluster()).expect("parses");
    let err = plan_policy(&case, &Policy::Drain { hosts: vec!["h9".into()] }, &Options::default()).expect_err("unknown host");
    assert_eq!(err.to_string(), "unknown host \"h9\" given to the policy");
}

#[test]
fn drain_that_cannot_fit_is_impossible_and_says_who() {
    let mut c = cluster();
    c["vms"][3]["memory_mib"] = json!(7000); // d+c = 8024 MiB: fits only where it is
    let case: Case = serde_json::from_value(c).expect("parses");
    let out = plan_policy(&case, &Policy::Drain { hosts: vec!["h3".into()] }, &Options::default()).expect("valid");
    let out = serde_json::to_value(out).expect("serialises");
    assert_eq!(out["status"], "impossible", "{out}");
    assert_eq!(out["blocked"][0]["vm"], "c+d");
}

#[test]
fn consolidate_uses_the_fewest_hosts_and_keeps_groups() {
    let (out, _) = run(&cluster(), Policy::Consolidate);
    let t = target(&out);
    let used: BTreeSet<&String> = t.values().collect();
    // 9728 MiB of VMs on 8192 MiB hosts needs two hosts.
    assert_eq!(used.len(), 2, "{t:?}");
    groups_hold(&t);
}

#[test]
fn balance_narrows_the_spread_of_memory_use() {
    let c = json!({
        "hosts": [{"name": "h1", "memory_mib": 8192}, {"name": "h2", "memory_mib": 8192},
                  {"name": "h3", "memory_mib": 8192}],
        "vms": [{"name": "a", "memory_mib": 2048}, {"name": "b", "memory_mib": 2048},
                {"name": "c", "memory_mib": 2048}, {"name": "d", "memory_mib": 2048}],
        "current": {"a": "h1", "b": "h1", "c": "h1", "d": "h2"}
    });
    let (out, _) = run(&c, Policy::Balance);
    let t = target(&out);
    let per_host: BTreeSet<usize> = ["h1", "h2", "h3"].iter().map(|h| t.values().filter(|x| x == h).count()).collect();
    assert_eq!(per_host, BTreeSet::from([1, 2]), "{t:?}");
    assert_eq!(out["count"], 1);
}
