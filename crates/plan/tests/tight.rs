//! 200 generated tight cases (6-40 hosts, 88-97% memory fill): the planner never gives
//! up. Each answer is a plan that the independent simulator replays (never overfilling
//! a host, ending on the target), or a proof of impossibility with per-VM reasons, and
//! only for cases built to have no plan.

mod common;

use walkabout_plan::{plan_with, tight_case, Options, Outcome, TightKind};

#[test]
fn two_hundred_tight_cases_are_all_solved_or_proven_impossible() {
    // No wall-clock cap: the state budgets alone decide, so a slow or busy machine
    // cannot change the answers.
    let opts = Options { time_limit: None, ..Options::default() };
    let (mut ok, mut impossible, mut cluster_wide) = (0, 0, 0);
    for seed in 0..200u64 {
        let t = tight_case(seed);
        let hosts = t.case.hosts.len();
        assert!((6..=40).contains(&hosts), "case {seed}: {hosts} hosts");
        assert!((0.87..=0.975).contains(&t.fill), "case {seed}: fill {}", t.fill);
        let outcome = plan_with(&t.case, &opts).unwrap_or_else(|e| panic!("case {seed} rejected: {e}"));
        match &outcome {
            Outcome::Ok(_) => {
                assert_eq!(t.kind, TightKind::Reachable, "case {seed}: a plan for a case built to have none");
                let input = serde_json::to_value(&t.case).expect("case serialises");
                let out = serde_json::to_value(&outcome).expect("outcome serialises");
                common::simulate(&input, &out).unwrap_or_else(|e| panic!("case {seed}: invalid plan: {e}"));
                ok += 1;
            }
            Outcome::Impossible(i) => {
                assert_ne!(t.kind, TightKind::Reachable, "case {seed}: reachable by construction, yet \"impossible\": {}", i.reason);
                assert!(!i.blocked.is_empty(), "case {seed}: impossible without per-VM reasons");
                assert!(i.blocked.iter().all(|b| !b.why.is_empty()), "case {seed}: a blocked VM without a reason");
                if i.blocked.iter().any(|b| b.why.ends_with("(all hosts together have no more free)")) {
                    cluster_wide += 1;
                }
                impossible += 1;
            }
            Outcome::Unsolved(u) => panic!("case {seed} ({hosts} hosts, fill {:.3}): unsolved: {}", t.fill, u.reason),
        }
    }
    // The generator builds both kinds, so both branches above were exercised.
    assert!(ok >= 150 && impossible >= 10, "ok {ok}, impossible {impossible}");
    // Some oversize swaps are only provable by the cluster-wide bound on free memory
    // (each host alone could make room), so that proof was exercised.
    assert!(cluster_wide > 0, "no proof used the cluster-wide free memory");
}

#[test]
fn the_generator_is_deterministic_and_varied() {
    let a = tight_case(42);
    let b = tight_case(42);
    assert_eq!(a.case, b.case);
    let kinds: std::collections::HashSet<_> = (0..200).map(|s| format!("{:?}", tight_case(s).kind)).collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    let sizes: std::collections::HashSet<u64> = a.case.vms.iter().map(|v| v.memory_mib).collect();
    assert!(sizes.len() > 5, "VM sizes vary: {sizes:?}");
}
