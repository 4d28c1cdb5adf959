//! Conformance with the peer (aspiers' migrationpaths): its fixed and random cases.

mod common;

use common::{input_of, peer_cases, run, simulate};

#[test]
fn every_fixed_case_is_solved_no_longer_than_the_peer_and_optimal_where_known() {
    let mut failures = Vec::new();
    for case in peer_cases("fixed.json") {
        let name = case["name"].as_str().unwrap_or("?").to_string();
        let out = run(&case);
        let optimum = case["optimum"].as_i64();
        if optimum == Some(-1) {
            if out["status"] != "impossible" {
                failures.push(format!("{name}: expected impossible, got {}", out["status"]));
            }
            continue;
        }
        if out["status"] != "ok" {
            failures.push(format!("{name}: no plan: {out}"));
            continue;
        }
        if let Err(e) = simulate(&input_of(&case), &out) {
            failures.push(format!("{name}: invalid plan: {e}"));
        }
        let count = out["count"].as_u64().unwrap_or(u64::MAX);
        if let Some(peer) = case["peer_result"]["count"].as_u64() {
            if count > peer {
                failures.push(format!("{name}: {count} migrations, peer {peer}"));
            }
        }
        if let Some(opt) = optimum {
            if count != opt as u64 {
                failures.push(format!("{name}: {count} migrations, optimum {opt}"));
            }
        }
        eprintln!("{name}: count {count} lb {} optimal {} waves {}", out["lower_bound"], out["optimal"], out["waves"]);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_random_case_is_solved_and_never_longer_than_the_peer() {
    let mut failures = Vec::new();
    let mut ours_total = 0;
    let mut peer_total = 0;
    for case in peer_cases("random.json") {
        let name = case["name"].as_str().unwrap_or("?").to_string();
        let out = run(&case);
        if out["status"] != "ok" {
            failures.push(format!("{name}: no plan: {out}"));
            continue;
        }
        if let Err(e) = simulate(&input_of(&case), &out) {
            failures.push(format!("{name}: invalid plan: {e}"));
        }
        let count = out["count"].as_u64().unwrap_or(u64::MAX);
        if let Some(peer) = case["peer_result"]["count"].as_u64() {
            ours_total += count;
            peer_total += peer;
            if count > peer {
                failures.push(format!("{name}: {count} migrations, peer {peer}"));
            }
        }
        eprintln!("{name}: count {count} lb {} optimal {} peer {}", out["lower_bound"], out["optimal"], case["peer_result"]["count"]);
    }
    eprintln!("total ours {ours_total} peer {peer_total}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
