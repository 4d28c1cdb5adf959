//! `walkabout balance`: the controller's automatic balancing, shown and set
//! (`GET`/`PUT /v1/balance`): its level (`manual`, `recommend`, `automatic`), threshold
//! and the other settings, whether the load is out of balance now, and the moves its
//! last round decided with their reasons.

use super::client::{self, print_json, runtime, Output};
use super::cluster::CtlArgs;
use super::table::{clean, Align, Table};
use std::process::ExitCode;
use walkabout_api::{BalanceConfig, BalanceLevel, BalanceStatus};

/// `walkabout balance ...`
#[derive(clap::Subcommand)]
pub enum BalanceCommand {
    /// The balancer's settings, whether it is balancing now, and its last moves.
    Show(CtlArgs),
    /// Changes the balancer's settings; those not given stay as they are.
    Set(SetArgs),
}

/// The level, as the command line spells it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Decide nothing.
    Manual,
    /// Offer moves (as proposed plans, with their reasons); move nothing.
    Recommend,
    /// Move VMs, within the executor's limits, each with its reason.
    Automatic,
}

impl From<Level> for BalanceLevel {
    fn from(l: Level) -> BalanceLevel {
        match l {
            Level::Manual => BalanceLevel::Manual,
            Level::Recommend => BalanceLevel::Recommend,
            Level::Automatic => BalanceLevel::Automatic,
        }
    }
}

/// Options of `balance set`.
#[derive(clap::Args)]
pub struct SetArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// What the balancer may do.
    #[arg(long, value_enum)]
    level: Option<Level>,
    /// Spread of CPU use (hottest host's share of its CPUs less the coolest's, 0-1)
    /// above which balancing starts.
    #[arg(long)]
    threshold: Option<f64>,
    /// Balancing stops once the spread is below threshold - hysteresis (0-threshold).
    #[arg(long)]
    hysteresis: Option<f64>,
    /// Least gain a move must bring, net of its cost.
    #[arg(long)]
    min_gain: Option<f64>,
    /// Seconds before a moved VM may move again.
    #[arg(long)]
    cooldown_s: Option<u64>,
    /// Moves per round at most.
    #[arg(long)]
    max_moves: Option<usize>,
    /// Seconds between rounds (at least 1).
    #[arg(long)]
    interval_s: Option<u64>,
}

impl SetArgs {
    /// `cfg` with the options given; refuses settings the balancer cannot work with.
    fn apply(&self, mut cfg: BalanceConfig) -> anyhow::Result<BalanceConfig> {
        if let Some(l) = self.level {
            cfg.level = l.into();
        }
        if let Some(t) = self.threshold {
            cfg.threshold = t;
        }
        if let Some(h) = self.hysteresis {
            cfg.hysteresis = h;
        }
        if let Some(g) = self.min_gain {
            cfg.min_gain = g;
        }
        if let Some(c) = self.cooldown_s {
            cfg.cooldown_s = c;
        }
        if let Some(m) = self.max_moves {
            cfg.max_moves = m;
        }
        if let Some(i) = self.interval_s {
            cfg.interval_s = i;
        }
        if cfg.threshold.is_nan() || cfg.threshold <= 0.0 || cfg.threshold > 1.0 {
            anyhow::bail!("threshold {} is not a spread of CPU use: give one in (0, 1]", cfg.threshold);
        }
        if cfg.hysteresis.is_nan() || cfg.hysteresis < 0.0 || cfg.hysteresis >= cfg.threshold {
            anyhow::bail!("hysteresis {} must be at least 0 and below the threshold {}", cfg.hysteresis, cfg.threshold);
        }
        if cfg.min_gain.is_nan() || cfg.min_gain < 0.0 {
            anyhow::bail!("min-gain {} must be at least 0", cfg.min_gain);
        }
        if cfg.interval_s == 0 {
            anyhow::bail!("interval-s must be at least 1");
        }
        Ok(cfg)
    }
}

/// Runs `walkabout balance ...`.
pub fn run(cmd: BalanceCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let (ctl, status) = match cmd {
            BalanceCommand::Show(ctl) => {
                let status = client::controller(&ctl.controller)?.balance().await?;
                (ctl, status)
            }
            BalanceCommand::Set(s) => {
                let c = client::controller(&s.ctl.controller)?;
                let cfg = s.apply(c.balance().await?.config)?;
                (s.ctl, c.set_balance(&cfg).await?)
            }
        };
        match ctl.output {
            Output::Json => print_json(&status)?,
            Output::Text => print_status(&status),
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn level_name(l: BalanceLevel) -> &'static str {
    match l {
        BalanceLevel::Manual => "manual",
        BalanceLevel::Recommend => "recommend",
        BalanceLevel::Automatic => "automatic",
    }
}

/// The settings as a table, then the last round's moves.
fn settings_table(s: &BalanceStatus) -> Table {
    let c = &s.config;
    let mut t = Table::new(&[("SETTING", Align::Left), ("VALUE", Align::Right)]);
    t.row(["level".to_string(), level_name(c.level).to_string()]);
    t.row(["balancing now".to_string(), if s.active { "yes" } else { "no" }.to_string()]);
    t.row(["threshold".to_string(), format!("{:.2}", c.threshold)]);
    t.row(["hysteresis".to_string(), format!("{:.2}", c.hysteresis)]);
    t.row(["min gain".to_string(), format!("{:.3}", c.min_gain)]);
    t.row(["cost per GiB".to_string(), format!("{:.4}", c.cost_per_gib)]);
    t.row(["cooldown".to_string(), format!("{} s", c.cooldown_s)]);
    t.row(["moves per round".to_string(), c.max_moves.to_string()]);
    t.row(["interval".to_string(), format!("{} s", c.interval_s)]);
    t
}

fn print_status(s: &BalanceStatus) {
    settings_table(s).print();
    if s.last_moves.is_empty() {
        println!("\nlast round: no moves");
        return;
    }
    let mut t =
        Table::new(&[("VM", Align::Left), ("FROM", Align::Left), ("TO", Align::Left), ("GAIN", Align::Right), ("REASON", Align::Left)]);
    for m in &s.last_moves {
        t.row([m.vm.clone(), m.from.clone(), m.to.clone(), format!("{:.3}", m.gain), clean(&m.reason).into_owned()]);
    }
    println!("\nlast round:");
    t.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(level: Option<Level>, threshold: Option<f64>) -> SetArgs {
        SetArgs {
            ctl: CtlArgs { controller: String::new(), output: Output::Text },
            level,
            threshold,
            hysteresis: None,
            min_gain: None,
            cooldown_s: None,
            max_moves: None,
            interval_s: None,
        }
    }

    #[test]
    fn set_changes_only_what_is_given() {
        let before = BalanceConfig::default();
        let after = args(Some(Level::Automatic), None).apply(before).expect("valid");
        assert_eq!(after.level, BalanceLevel::Automatic);
        assert_eq!(BalanceConfig { level: before.level, ..after }, before);
    }

    #[test]
    fn a_threshold_out_of_range_or_under_the_hysteresis_is_refused_naming_it() {
        let e = args(None, Some(1.5)).apply(BalanceConfig::default()).expect_err("refused");
        assert!(e.to_string().contains("threshold 1.5"), "{e}");
        let e = args(None, Some(0.05)).apply(BalanceConfig::default()).expect_err("refused");
        assert!(e.to_string().contains("hysteresis"), "{e}");
    }

    #[test]
    fn the_table_shows_the_level_and_each_move_with_its_reason() {
        let s = BalanceStatus {
            config: BalanceConfig { level: BalanceLevel::Recommend, ..BalanceConfig::default() },
            active: true,
            last_moves: vec![],
        };
        let text = settings_table(&s).render();
        assert!(text.contains("recommend") && text.contains("balancing now"), "{text}");
    }
}
