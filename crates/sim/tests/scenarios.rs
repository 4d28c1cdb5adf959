//! Small scenarios through the real controller, in simulated time: what CI can afford.

use walkabout_sim::{run, CostModel, Scenario, SimConfig};

fn config(scenario: Scenario, tag: &str) -> SimConfig {
    let cost = CostModel::fit(include_str!("../../../bench/results/migrate.json")).expect("bench results fit");
    let dir = walkabout_sim::scenario::scratch_dir(tag);
    let mut cfg = SimConfig::new(scenario, 20, 200, cost, dir);
    cfg.rack_size = 5;
    cfg.host_mib = 64 * 1024;
    cfg
}

#[test]
fn a_rolling_maintenance_drains_every_host_and_never_tries_a_host_that_cannot_run_the_cpu() {
    let mut cfg = config(Scenario::Rolling, "rolling");
    cfg.drain_hosts = Some(6);

    let r = run(cfg).expect("runs");

    assert_eq!(r.drains.len(), 6);
    assert!(r.drains.iter().all(|d| d.outcome == "drained"), "{:#?}", r.drains);
    assert_eq!(r.migrations["refused_cpu"], 0, "{:?}", r.migrations);
    assert_eq!(r.migrations["failed"], 0, "{:?}", r.migrations);
    let moved: usize = r.drains.iter().map(|d| d.migrations).sum();
    assert_eq!(r.migrations["completed"] as usize, moved, "{:?}", r.migrations);
    assert!(r.time_to_drain_s.median > 0.0, "{:?}", r.time_to_drain_s);
    assert!(walkabout_sim::plot::svg(&r).starts_with("<svg"));
}

#[test]
fn a_rolling_maintenance_takes_hosts_out_several_at_a_time_within_its_limits() {
    let mut cfg = config(Scenario::Rolling, "rolling-parallel");
    // Racks of five: four racks, at most one host of each out, three at once.
    cfg.rolling = walkabout_sim::rolling::RollingLimits { max_hosts: 3, max_per_rack: 1, reserve: 0.2 };
    cfg.steady_s = 5;

    let r = run(cfg).expect("runs");

    assert_eq!(r.drains.len(), 20, "{:#?}", r.drains);
    assert!(r.drains.iter().all(|d| d.outcome == "drained"), "{:#?}", r.drains);
    assert!(r.hosts_out_max >= 2, "never more than {} host out at once", r.hosts_out_max);
    assert!(r.hosts_out_max <= 3, "{} hosts out at once, 3 allowed", r.hosts_out_max);
    assert!(r.peak_host_fill <= 1.0, "a host was filled to {:.2} of its memory", r.peak_host_fill);
    assert_eq!(r.migrations["failed"] + r.migrations["refused_cpu"], 0, "{:?}", r.migrations);
    let moved: usize = r.drains.iter().map(|d| d.migrations).sum();
    assert_eq!(r.migrations["completed"] as usize, moved, "{:?}", r.migrations);
    // Never two hosts of one rack out at once: each drain's span against the others'.
    let span = |d: &walkabout_sim::scenario::DrainResult| (d.started_s, d.started_s + d.time_s);
    let rack = |h: &str| (h.trim_start_matches('h').parse::<usize>().expect("hN") - 1) / 5;
    for a in &r.drains {
        for b in r.drains.iter().filter(|b| b.host != a.host && rack(&b.host) == rack(&a.host)) {
            let ((a0, a1), (b0, b1)) = (span(a), span(b));
            assert!(a1 <= b0 || b1 <= a0, "{} and {} of one rack out together: {a:?} {b:?}", a.host, b.host);
        }
    }
    assert!(r.poll_cost.polls > 0 && r.poll_cost.cpu_us_per_poll > 0.0, "{:?}", r.poll_cost);
}

#[test]
fn a_lost_rack_is_marked_down_within_seconds_and_its_unprotected_vms_reported_lost() {
    let r = run(config(Scenario::Rack, "rack")).expect("runs");

    assert_eq!(r.failures.len(), 5);
    assert!(r.failures.iter().all(|f| f.detected_s.is_some_and(|s| s <= 5.0)), "{:#?}", r.failures);
    let lost: usize = r.failures.iter().map(|f| f.vms).sum();
    // Unprotected (the simulated VMs are): each is reported lost by name, none left in doubt.
    assert!(lost > 0 && r.lost_vms >= lost, "{} VMs on the rack, {} lost, {} unreachable", lost, r.lost_vms, r.unreachable_vms);
    assert_eq!(r.drains.len(), 1, "{:#?}", r.drains);
}

#[test]
fn a_day_of_load_changes_is_balanced_without_ping_pong() {
    let cost = CostModel::fit(include_str!("../../../bench/results/migrate.json")).expect("bench results fit");
    let mut cfg = walkabout_sim::DayConfig::new(12, 120, cost, walkabout_sim::scenario::scratch_dir("day"));
    cfg.cluster.rack_size = 4;
    cfg.cluster.host_mib = 64 * 1024;
    cfg.hours = 6;
    cfg.spikes = 2;

    let r = walkabout_sim::run_day(cfg).expect("runs");

    assert_eq!(r.load.len(), 6 * 60);
    assert_eq!(r.moves_per_hour.len(), 6);
    assert!(!r.moves.is_empty(), "racks peaking hours apart and two spikes moved nothing: {:?}", r.spread);
    assert!(r.ping_pong.is_empty(), "{:#?}", r.ping_pong);
    assert_eq!(r.migrations["failed"] + r.migrations["refused_cpu"], 0, "{:?}", r.migrations);
    assert!(walkabout_sim::plot::day_svg(&r).starts_with("<svg"));
}
