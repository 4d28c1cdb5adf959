//! `walkabout balance show|set` against a real controller (no agents, no guests: the
//! balancer's settings live in the controller alone).

use walkabout_api::{BalanceLevel, BalanceStatus};
use walkabout_testbed::{Controller, ControllerSpec};

fn run(ctl: &Controller, args: &[&str]) -> std::process::Output {
    ctl.command(args).output().expect("run walkabout")
}

fn status(out: &std::process::Output) -> BalanceStatus {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn balance_set_changes_the_level_and_threshold_and_show_reads_them_back() {
    let ctl = Controller::start(ControllerSpec::new(env!("CARGO_BIN_EXE_walkabout"), &[])).expect("controller");

    let before = status(&run(&ctl, &["balance", "show", "--output", "json"]));
    assert_eq!(before.config.level, BalanceLevel::Manual);

    let set = status(&run(&ctl, &["balance", "set", "--level", "automatic", "--threshold", "0.4", "--output", "json"]));
    assert_eq!(set.config.level, BalanceLevel::Automatic);
    assert!((set.config.threshold - 0.4).abs() < 1e-9, "{set:?}");
    assert_eq!(set.config.cooldown_s, before.config.cooldown_s, "a setting not given changed");

    let table = run(&ctl, &["balance", "show"]);
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("automatic") && text.contains("0.40"), "{text}");

    let refused = run(&ctl, &["balance", "set", "--threshold", "2"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("threshold 2"), "{}", String::from_utf8_lossy(&refused.stderr));
    let after = status(&run(&ctl, &["balance", "show", "--output", "json"]));
    assert!((after.config.threshold - 0.4).abs() < 1e-9, "a refused setting reached the controller: {after:?}");
}
