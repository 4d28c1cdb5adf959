//! The whole model in the planner: CPU features, vCPUs, affinity and anti-affinity, and
//! the constraint named for each VM placed or refused.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use walkabout_plan::policy::{plan_policy, Policy};
use walkabout_plan::{plan, Case, Options, Outcome};

fn outcome(cluster: &Value, policy: Policy) -> Value {
    let case: Case = serde_json::from_value(cluster.clone()).expect("cluster parses");
    serde_json::to_value(plan_policy(&case, &policy, &Options::default()).expect("valid cluster")).expect("serialises")
}

fn target(out: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(out["target"].clone()).expect("target map")
}

/// h1 and h2 run AVX-512 guests; h3 is empty and large but lacks avx512f.
fn mixed_cpus() -> Value {
    json!({
        "hosts": [
            {"name": "h1", "memory_mib": 8192, "cpu_features": ["sse2", "avx2", "avx512f"]},
            {"name": "h2", "memory_mib": 8192, "cpu_features": ["sse2", "avx2", "avx512f"]},
            {"name": "h3", "memory_mib": 32768, "cpu_features": ["sse2", "avx2"]}],
        "vms": [
            {"name": "a", "memory_mib": 2048, "cpu_features": ["sse2", "avx512f"]},
            {"name": "b", "memory_mib": 2048, "cpu_features": ["sse2", "avx512f"]},
            {"name": "c", "memory_mib": 2048, "cpu_features": ["sse2", "avx512f"]},
            {"name": "d", "memory_mib": 1024, "cpu_features": ["sse2"]}],
        "current": {"a": "h1", "b": "h1", "c": "h1", "d": "h1"}
    })
}

#[test]
fn a_rebalance_never_proposes_a_host_that_cannot_run_the_vms_cpu() {
    let out = outcome(&mixed_cpus(), Policy::Balance);

    assert_eq!(out["status"], "ok", "{out}");
    let t = target(&out);
    for vm in ["a", "b", "c"] {
        assert_ne!(t[vm], "h3", "{vm} needs avx512f, which h3 lacks: {t:?}");
    }
    assert_eq!(t["d"], "h3", "d runs anywhere and h3 is the emptiest: {t:?}");
}

#[test]
fn each_balancing_move_says_which_constraint_placed_it() {
    let out = outcome(&mixed_cpus(), Policy::Balance);

    let whys: Vec<&str> = out["migrations"].as_array().expect("migrations").iter().filter_map(|m| m["why"].as_str()).collect();
    assert!(whys.iter().all(|w| w.starts_with("to target: balances memory")), "{whys:?}");
    assert!(whys.iter().any(|w| w.contains("runs its CPU")), "{whys:?}");
}

#[test]
fn a_drain_refuses_a_vm_no_remaining_host_can_run_and_names_the_missing_features() {
    let mut c = mixed_cpus();
    c["current"] = json!({"a": "h1", "b": "h2", "c": "h2", "d": "h1"});
    c["hosts"][1]["memory_mib"] = json!(4096);

    let out = outcome(&c, Policy::Drain { hosts: vec!["h1".into()] });

    assert_eq!(out["status"], "impossible", "{out}");
    assert_eq!(out["blocked"][0]["vm"], "a");
    let why = out["blocked"][0]["why"].as_str().expect("why");
    assert!(why.contains("h3 lack CPU features avx512f"), "{why}");
    assert!(why.contains("h2 lack free memory"), "{why}");
}

#[test]
fn a_drain_places_each_vm_on_a_host_that_runs_its_cpu_and_says_what_ruled_the_others_out() {
    let mut c = mixed_cpus();
    c["current"] = json!({"a": "h1", "b": "h1", "c": "h2", "d": "h2"});

    let out = outcome(&c, Policy::Drain { hosts: vec!["h1".into()] });

    assert_eq!(out["status"], "ok", "{out}");
    let t = target(&out);
    assert_eq!((t["a"].as_str(), t["b"].as_str()), ("h2", "h2"), "{t:?}");
    let why = out["migrations"][0]["why"].as_str().expect("why");
    assert!(why.contains("h2 has the most free memory of the 1 host(s) that can take it"), "{why}");
    assert!(why.contains("ruled out: h3 lack CPU features avx512f"), "{why}");
}

#[test]
fn a_host_short_of_vcpus_is_not_chosen_even_with_the_most_memory() {
    let c = json!({
        "hosts": [
            {"name": "h1", "memory_mib": 8192, "vcpus": 16},
            {"name": "h2", "memory_mib": 32768, "vcpus": 4},
            {"name": "h3", "memory_mib": 8192, "vcpus": 16}],
        "vms": [
            {"name": "big", "memory_mib": 1024, "vcpus": 8},
            {"name": "small", "memory_mib": 1024, "vcpus": 2}],
        "current": {"big": "h1", "small": "h3"}
    });

    let out = outcome(&c, Policy::Drain { hosts: vec!["h1".into()] });

    assert_eq!(out["status"], "ok", "{out}");
    assert_eq!(target(&out)["big"], "h3");
    let why = out["migrations"][0]["why"].as_str().expect("why");
    assert!(why.contains("h2 lack free vCPUs (8 needed)"), "{why}");
}

#[test]
fn a_vm_that_fits_nowhere_for_vcpus_is_refused_with_the_vcpus_it_needs() {
    let c = json!({
        "hosts": [{"name": "h1", "memory_mib": 8192, "vcpus": 16}, {"name": "h2", "memory_mib": 8192, "vcpus": 4}],
        "vms": [{"name": "big", "memory_mib": 1024, "vcpus": 8}],
        "current": {"big": "h1"}
    });

    let out = outcome(&c, Policy::Drain { hosts: vec!["h1".into()] });

    assert_eq!(out["status"], "impossible", "{out}");
    assert_eq!(out["blocked"][0]["needs"], "1024 MiB and 8 vCPUs on one host");
    assert!(out["blocked"][0]["why"].as_str().unwrap_or("").contains("h2 lack free vCPUs"), "{out}");
}

/// web-1..3 in anti-affinity group web; db-1, db-2 in affinity group db; h4 to drain.
fn grouped() -> Value {
    json!({
        "hosts": [
            {"name": "h1", "memory_mib": 8192}, {"name": "h2", "memory_mib": 8192},
            {"name": "h3", "memory_mib": 8192}, {"name": "h4", "memory_mib": 8192}],
        "vms": [
            {"name": "web-1", "memory_mib": 512}, {"name": "web-2", "memory_mib": 512},
            {"name": "web-3", "memory_mib": 512},
            {"name": "db-1", "memory_mib": 1024}, {"name": "db-2", "memory_mib": 1024},
            {"name": "filler", "memory_mib": 1024}],
        "current": {"web-1": "h1", "web-2": "h2", "web-3": "h4", "db-1": "h4", "db-2": "h4", "filler": "h3"},
        "groups": [
            {"name": "web", "kind": "anti-affinity", "vms": ["web-1", "web-2", "web-3"]},
            {"name": "db", "kind": "affinity", "vms": ["db-1", "db-2"]}]
    })
}

#[test]
fn a_drain_keeps_anti_affinity_members_apart_and_says_why_their_host() {
    let out = outcome(&grouped(), Policy::Drain { hosts: vec!["h4".into()] });

    assert_eq!(out["status"], "ok", "{out}");
    let t = target(&out);
    assert_eq!(t["web-3"], "h3", "h1 and h2 hold web-1 and web-2: {t:?}");
    let web3 = out["migrations"].as_array().expect("migrations").iter().find(|m| m["vm"] == "web-3").expect("web-3 moves");
    let why = web3["why"].as_str().expect("why");
    assert!(why.contains("h1, h2 already hold a member of anti-affinity group web"), "{why}");
}

#[test]
fn a_drain_moves_an_affinity_group_as_one() {
    let out = outcome(&grouped(), Policy::Drain { hosts: vec!["h4".into()] });

    let t = target(&out);
    assert_eq!(t["db-1"], t["db-2"], "{t:?}");
    let db = out["migrations"].as_array().expect("migrations").iter().find(|m| m["vm"] == "db-1").expect("db-1 moves");
    assert!(db["why"].as_str().unwrap_or("").contains("(affinity: with db-1, db-2)"), "{db}");
}

#[test]
fn an_anti_affinity_group_larger_than_the_hosts_left_is_refused_by_its_rule() {
    let mut c = grouped();
    c["hosts"].as_array_mut().expect("hosts").remove(2); // no h3

    let out = outcome(&c, Policy::Drain { hosts: vec!["h4".into()] });

    assert_eq!(out["status"], "impossible", "{out}");
    assert_eq!(out["blocked"][0]["vm"], "web-3");
    let why = out["blocked"][0]["why"].as_str().expect("why");
    assert!(why.contains("h1, h2 already hold a member of anti-affinity group web"), "{why}");
}

#[test]
fn a_target_that_breaks_a_group_is_impossible_and_names_the_group() {
    let mut c = grouped();
    let mut t: BTreeMap<String, String> = serde_json::from_value(c["current"].clone()).expect("current");
    t.insert("web-2".into(), "h1".into());
    c["target"] = serde_json::to_value(&t).expect("target");
    let case: Case = serde_json::from_value(c).expect("parses");

    let out = plan(&case).expect("valid");

    let Outcome::Impossible(i) = out else { panic!("expected impossible: {out:?}") };
    assert_eq!(i.blocked[0].why, "anti-affinity group web: web-2 and web-1 would both run on h1");
}
