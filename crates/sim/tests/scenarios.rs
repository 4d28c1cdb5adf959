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
