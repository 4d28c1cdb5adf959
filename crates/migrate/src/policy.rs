//! Migration policy: pick a strategy from what was measured, then watch every sample and
//! decide when to adapt. Pure: no I/O, no clock; the executor feeds it samples.
//!
//! The model: pre-copy sends the guest's memory while the guest keeps dirtying it. Each
//! pass must resend what was dirtied during the previous one, so with a dirty rate `d`
//! and a link of bandwidth `b` the remaining bytes shrink geometrically when `d < b` and
//! stop shrinking when `d >= b`. QEMU finishes when the remainder fits in the downtime
//! limit. So:
//! - the least downtime first: QEMU switches over as soon as the remainder fits its
//!   downtime limit, and on a fast link that is after one pass with a big remainder. So
//!   the limit starts at a tenth of the operator's maximum ([`initial_downtime_ms`]) and
//!   is raised to the maximum only when passes stall while QEMU expects the remainder to
//!   fit in it;
//! - the bandwidth cap is lifted unless the operator set one (QEMU's default cap of
//!   128 MiB/s alone makes a guest dirtying at 128 MiB/s never finish);
//! - post-copy readiness is not free: QEMU's `postcopy-ram` opens a return path, and the
//!   source then waits, with the guest paused, until the destination has loaded the last
//!   pages and closed that path (it made an idle guest's pause at 100 MiB/s twice QEMU's
//!   default). So in `auto` mode it is armed only when the dirty rate measured before the
//!   start is at least [`READY_SHARE`] of the expected link bandwidth (the cap, or
//!   [`ASSUMED_LINK_BPS`] without one), or could not be measured; below that the guest
//!   gets plain pre-copy, with auto-converge armed as its fallback;
//! - a *stall* is the remaining bytes not falling for [`STALL_ITERATIONS`] passes, judged
//!   on what QEMU reports, not on a timer;
//! - in `auto` mode with post-copy armed, a stall, a failed prediction after the first
//!   full pass, or half the time budget spent switches to post-copy, which always
//!   finishes (each page moves once) at the price of the VM depending on both hosts
//!   until it does;
//! - without post-copy (`precopy` mode, or `auto` for a guest that was quiet before the
//!   start and dirties later) the fallbacks are the downtime limit raised to the maximum
//!   on a stall that would fit it, QEMU's auto-converge throttling the vCPUs, and at the
//!   budget's end a cancel that leaves the VM on its source, unless the remainder is
//!   falling fast enough to be sent before [`OVERRUN_FACTOR`] times the budget (a loaded
//!   host's slow stream must not cost a hop that is seconds from done). In `precopy` mode a
//!   predicted non-convergence turns on auto-converge (vCPU throttling) from the start.

use serde::{Deserialize, Serialize};

/// Passes with no progress that make a stall.
pub const STALL_ITERATIONS: usize = 3;
/// A pass "makes progress" when it gets the remainder below this fraction of the best so far.
const PROGRESS_FRACTION: f64 = 0.95;
/// Pre-copy past its budget carries on, while it is predicted to finish, up to this many
/// times the budget ([`Policy::observe`]'s give-up).
pub const OVERRUN_FACTOR: u64 = 3;
/// Pre-copy is predicted to converge when the dirty rate is below this share of the bandwidth.
const CONVERGE_SHARE: f64 = 0.8;
/// The bandwidth QEMU is given when the operator sets no cap: the link is the limit.
pub const UNCAPPED_BPS: u64 = 100 << 30;
/// The link bandwidth assumed before the start when the operator sets no cap, bytes/s:
/// a 10 Gbit/s migration network, rounded down (loopback is faster). Only the post-copy
/// readiness decision uses it; the transfer itself runs at whatever the link gives.
pub const ASSUMED_LINK_BPS: u64 = 1 << 30;
/// In `auto` mode post-copy is armed when the dirty rate measured before the start is at
/// least this share of the expected link bandwidth: a margin of 2 for what a 500 ms sample
/// misses and for a guest that speeds up. Below it, plain pre-copy.
pub const READY_SHARE: f64 = 0.5;

pub use walkabout_api::{Compression, Limits, Mode, Strategy, Switch, Tuning};

/// What one migration stream (QEMU's single migration thread) carries at most on this
/// kind of host, bytes/s: measured on the project's 2-core TCG hosts over loopback with
/// 1 GiB of non-zero pages (`bench/single-stream.py`; bench/results/migrate-engine.json,
/// `single_stream`): 66-104 MiB/s for one stream, 539-648 MiB/s for 2 multifd channels.
/// A link faster than this is worth multifd channels, if cores are spare to run them.
pub const SINGLE_STREAM_BPS: u64 = 100 << 20;
/// Most multifd channels the policy picks by itself.
pub const MAX_AUTO_CHANNELS: u8 = 4;
/// Post-copy preempt gives page faults a channel (and a thread at each end) of their
/// own, so they do not queue behind the bulk stream. That queue is long only on a slow
/// link: the policy turns preempt on by itself only when the operator's cap says the
/// link is slower than this and a core is spare for its thread. Measured on the 2-core
/// TCG hosts, whose cores are never spare (bench/results/migrate-engine.json, cells
/// `postcopy_[no_]preempt[_link25]`), preempt lengthened the guest's longest stall both
/// over loopback (median 523 ms against 190 ms) and over a 25 MiB/s link (308 against
/// 156 ms), and the pause at the switch (70 against 6 ms on the link).
pub const PREEMPT_BELOW_BPS: u64 = ASSUMED_LINK_BPS;

/// Facts about the source host the stream settings depend on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    /// CPUs of the host.
    pub cores: u32,
    /// CPUs busy now (the 1-minute load average).
    pub busy_cores: f64,
    /// What one migration stream carries at most, bytes/s.
    pub single_stream_bps: u64,
}

impl HostFacts {
    /// Cores not busy, rounded down.
    pub fn spare_cores(&self) -> u32 {
        let busy = self.busy_cores.max(0.0).ceil() as u32;
        self.cores.saturating_sub(busy)
    }

    /// What one stream carries on this host now, bytes/s: its share of the cores when
    /// more is runnable than there are cores (at a load of 28 on 2 cores, a fourteenth
    /// of [`HostFacts::single_stream_bps`]; QEMU reported 3-14 MiB/s then).
    pub fn loaded_stream_bps(&self) -> u64 {
        let cores = f64::from(self.cores.max(1));
        let share = cores / self.busy_cores.max(cores);
        (self.single_stream_bps as f64 * share) as u64
    }
}

/// One reading of QEMU's migration statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Time since the migration started, ms.
    pub elapsed_ms: u64,
    /// Completed dirty-bitmap syncs (pre-copy passes).
    pub iteration: u64,
    /// Bytes still to send.
    pub remaining_bytes: u64,
    /// Bytes sent so far.
    pub transferred_bytes: u64,
    /// Guest dirty rate, bytes/s.
    pub dirty_rate_bps: u64,
    /// Transfer rate, bytes/s.
    pub transfer_rate_bps: u64,
    /// QEMU's expected downtime, ms.
    pub expected_downtime_ms: u64,
}

/// The downtime limit a migration starts with: a tenth of the operator's maximum, at
/// least 10 ms (and never above the maximum).
pub fn initial_downtime_ms(max_downtime_ms: u64) -> u64 {
    (max_downtime_ms / 10).max(10).min(max_downtime_ms)
}

/// What the executor should do after a sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Keep going.
    Continue,
    /// Raise QEMU's downtime limit.
    SetDowntime {
        /// The new limit, ms.
        ms: u64,
        /// Why.
        reason: String,
    },
    /// Switch to post-copy now.
    StartPostcopy {
        /// Why.
        reason: String,
    },
    /// Give up: cancel, leaving the VM on its source.
    GiveUp {
        /// Why.
        reason: String,
    },
}

/// The policy for one migration.
#[derive(Debug, Clone)]
pub struct Policy {
    mode: Mode,
    limits: Limits,
    strategy: Strategy,
    deadline_ms: u64,
    /// Remaining bytes at the end of each pass seen, in order.
    passes: Vec<u64>,
    last_iteration: u64,
    postcopy: bool,
    predicted_to_converge: Option<bool>,
    /// The dirty rate measured before the start, bytes/s: the prediction's basis.
    measured_dirty_bps: Option<u64>,
    downtime_ms: u64,
    guest_bytes: u64,
}

fn mib(bps: u64) -> u64 {
    bps >> 20
}

/// `auto` mode's start when pre-copy is not predicted to fail outright: post-copy armed
/// (QEMU's `postcopy-ram`, which opens the return path the switchover then waits on) only
/// when the measured dirty rate is at least [`READY_SHARE`] of the expected link, or
/// unknown; otherwise plain pre-copy with auto-converge armed as the fallback. Returns
/// the strategy's name, post-copy readiness, auto-converge, and why.
fn auto_readiness(dirty_rate_bps: Option<u64>, cap_bps: Option<u64>, dirty: &str) -> (&'static str, bool, bool, String) {
    let link_bps = cap_bps.unwrap_or(ASSUMED_LINK_BPS);
    let link = match cap_bps {
        Some(b) => format!("the {} MiB/s cap", mib(b)),
        None => format!("the {} MiB/s link assumed without a cap", mib(ASSUMED_LINK_BPS)),
    };
    let share = (READY_SHARE * 100.0) as u32;
    match dirty_rate_bps {
        None => (
            "precopy+postcopy-ready",
            true,
            false,
            format!("{dirty}: post-copy armed as a precaution; pre-copy first, post-copy if it stalls or half the budget goes"),
        ),
        Some(d) if d as f64 >= READY_SHARE * link_bps as f64 => (
            "precopy+postcopy-ready",
            true,
            false,
            format!(
                "{dirty} is at least {share}% of {link}: pre-copy may not converge, so post-copy is armed; pre-copy first, post-copy if it stalls or half the budget goes"
            ),
        ),
        Some(_) => (
            "precopy+auto-converge",
            false,
            true,
            format!(
                "{dirty} is under {share}% of {link}: plain pre-copy, post-copy not armed (its return path would lengthen the pause); \
                 should the guest start dirtying, the fallback is auto-converge instead of post-copy (QEMU throttles the vCPUs once \
                 a pass dirties more than half of what it sent), the downtime limit raised on a stall, and a cancel at the budget's end"
            ),
        ),
    }
}

impl Policy {
    /// Picks the strategy for a guest of `guest_bytes`, given the dirty rate measured
    /// before the start (bytes/s), if any.
    pub fn new(mode: Mode, limits: Limits, guest_bytes: u64, dirty_rate_bps: Option<u64>) -> Policy {
        let gib = (guest_bytes as f64 / f64::from(1u32 << 30)).max(0.25);
        // A cap the operator set makes a pass take what it takes: the budget is never
        // shorter than one pass of the whole guest at the cap.
        let one_pass_ms = limits.max_bandwidth_bps.map_or(0, |b| guest_bytes.saturating_mul(1000) / b.max(1));
        let deadline_ms = ((limits.budget_per_gib_ms as f64 * gib) as u64).max(one_pass_ms);
        let bandwidth_bps = limits.max_bandwidth_bps.unwrap_or(UNCAPPED_BPS);
        let predicted = match (dirty_rate_bps, limits.max_bandwidth_bps) {
            (Some(d), Some(b)) => Some((d as f64) < CONVERGE_SHARE * b as f64),
            // With no cap, the link speed is learnt from the first pass.
            _ => None,
        };
        let cap = match limits.max_bandwidth_bps {
            Some(b) => format!("bandwidth capped at {} MiB/s as asked", mib(b)),
            None => "bandwidth uncapped (QEMU's default 128 MiB/s cap lifted; the link is the limit)".into(),
        };
        let dirty = dirty_rate_bps.map(|d| format!("dirty rate {} MiB/s", mib(d))).unwrap_or_else(|| "dirty rate unknown".into());
        let (name, postcopy_ready, auto_converge, why) = match (mode, predicted) {
            (Mode::Postcopy, _) => ("postcopy", true, false, "post-copy requested: switch after the first pass".to_string()),
            (Mode::Auto, Some(false)) => (
                "precopy+postcopy-ready",
                true,
                false,
                format!(
                    "{dirty} exceeds {}% of the cap: pre-copy predicted not to converge; post-copy after the first pass",
                    (CONVERGE_SHARE * 100.0) as u32
                ),
            ),
            (Mode::Auto, _) => auto_readiness(dirty_rate_bps, limits.max_bandwidth_bps, &dirty),
            (Mode::Precopy, Some(false)) => (
                "precopy+auto-converge",
                false,
                true,
                format!("{dirty} exceeds {}% of the cap: vCPU throttling from the start", (CONVERGE_SHARE * 100.0) as u32),
            ),
            (Mode::Precopy, _) => ("precopy", false, false, format!("{dirty}: plain pre-copy")),
        };
        Policy {
            mode,
            limits,
            strategy: Strategy {
                name: name.into(),
                postcopy_ready,
                auto_converge,
                bandwidth_bps,
                downtime_ms: initial_downtime_ms(limits.max_downtime_ms),
                reason: format!(
                    "{why}; {cap}; downtime limit {} ms, raised up to {} ms only if passes stall; budget {} ms",
                    initial_downtime_ms(limits.max_downtime_ms),
                    limits.max_downtime_ms,
                    deadline_ms
                ),
                postcopy_preempt: false,
                multifd_channels: 0,
                compression: Compression::None,
                recovery_budget_ms: walkabout_api::migration::DEFAULT_RECOVERY_BUDGET_MS,
                stream_reason: "one stream, no compression".into(),
            },
            deadline_ms,
            passes: vec![],
            last_iteration: 0,
            postcopy: false,
            predicted_to_converge: predicted,
            measured_dirty_bps: dirty_rate_bps,
            downtime_ms: initial_downtime_ms(limits.max_downtime_ms),
            guest_bytes,
        }
    }

    /// Picks the stream settings (multifd, compression, post-copy preempt, the recovery
    /// budget) from what the operator forced, the link, the guest's dirty rate and the
    /// host's spare cores; every choice is said in [`Strategy::stream_reason`].
    ///
    /// QEMU 10 cannot combine multifd with post-copy, so multifd (and with it zstd) is
    /// for strategies that do not arm post-copy, unless the operator forces it, which
    /// then disarms post-copy (in `postcopy` mode post-copy wins and multifd is dropped).
    pub fn tuned(mut self, tuning: &Tuning, host: &HostFacts) -> Policy {
        let mut why: Vec<String> = vec![];
        let link_bps = self.limits.max_bandwidth_bps;
        let dirty = self.measured_dirty_bps;
        self.arm_postcopy_for_a_loaded_host(tuning, host);
        // Compression wanted? Forced, or a link slower than the guest rewrites memory
        // while the guest rewrites a working set smaller than itself (its pages repeat).
        let compression = match tuning.compression {
            Some(c) => {
                why.push(format!("compression {c} as asked"));
                c
            }
            None => match (link_bps, dirty) {
                (Some(l), Some(d)) if d > l && d < self.guest_bytes => {
                    why.push(format!(
                        "the {} MiB/s link is slower than the guest rewrites memory ({} MiB/s, a working set under its {} MiB): pages repeat, so they are compressed",
                        mib(l),
                        mib(d),
                        mib(self.guest_bytes)
                    ));
                    Compression::Xbzrle
                }
                _ => Compression::None,
            },
        };
        let mut channels = match tuning.multifd_channels {
            Some(n) if n >= 2 => {
                why.push(format!("{n} multifd channels as asked"));
                n
            }
            Some(_) => 0,
            None if self.strategy.postcopy_ready => 0,
            None => {
                let link = link_bps.unwrap_or(ASSUMED_LINK_BPS);
                let spare = host.spare_cores();
                if link > host.single_stream_bps && spare >= 2 {
                    let n = u8::try_from(spare).unwrap_or(u8::MAX).min(MAX_AUTO_CHANNELS);
                    why.push(format!(
                        "{n} multifd channels: the {} MiB/s link is faster than one stream carries ({} MiB/s) and {spare} cores are spare",
                        mib(link),
                        mib(host.single_stream_bps)
                    ));
                    n
                } else {
                    0
                }
            }
        };
        // zstd rides on multifd; a compression the policy chose (not forced) becomes
        // zstd when multifd runs anyway, since XBZRLE cannot run beside multifd.
        let compression = match compression {
            Compression::Zstd if channels < 2 => {
                channels = 2;
                why.push("zstd runs on multifd: 2 channels".into());
                Compression::Zstd
            }
            Compression::Xbzrle if channels >= 2 && tuning.compression.is_none() => Compression::Zstd,
            Compression::Xbzrle if channels >= 2 => {
                why.push("XBZRLE cannot run beside multifd: multifd dropped".into());
                channels = 0;
                Compression::Xbzrle
            }
            c => c,
        };
        if channels >= 2 && self.strategy.postcopy_ready {
            if self.mode == Mode::Postcopy {
                why.push("post-copy requested, which QEMU 10 cannot combine with multifd: one stream".into());
                channels = 0;
            } else {
                why.push("post-copy not armed: QEMU 10 cannot combine it with multifd".into());
                self.strategy.reason.push_str(
                    "; then post-copy disarmed for the multifd channels asked (QEMU 10 cannot combine them): auto-converge instead",
                );
                self.strategy.postcopy_ready = false;
                self.strategy.auto_converge = true;
                self.strategy.name = "precopy+auto-converge".into();
            }
        }
        let compression = if channels < 2 && compression == Compression::Zstd { Compression::None } else { compression };
        let slow_link = link_bps.filter(|&l| l < PREEMPT_BELOW_BPS);
        let spare = host.spare_cores();
        let preempt = self.strategy.postcopy_ready && tuning.postcopy_preempt.unwrap_or(slow_link.is_some() && spare >= 1);
        if self.strategy.postcopy_ready {
            why.push(match (preempt, tuning.postcopy_preempt, slow_link) {
                (true, Some(_), _) => "post-copy preempt as asked".into(),
                (false, Some(_), _) => "no post-copy preempt, as asked".into(),
                (true, None, Some(l)) => format!(
                    "post-copy preempt: on the {} MiB/s link page faults would queue behind the bulk stream, and {spare} cores are spare for its channel",
                    mib(l)
                ),
                (false, None, Some(_)) => "no post-copy preempt: no core spare for its channel".into(),
                (_, None, None) => {
                    "no post-copy preempt: the link is not known to be slow (no cap), and on fast links its extra channel lengthened the guest's stalls".into()
                }
            });
        }
        if why.is_empty() {
            why.push("one stream, no compression".into());
        }
        self.strategy.multifd_channels = channels;
        self.strategy.compression = compression;
        self.strategy.postcopy_preempt = preempt;
        self.strategy.recovery_budget_ms = tuning.recovery_budget_ms.unwrap_or(walkabout_api::migration::DEFAULT_RECOVERY_BUDGET_MS);
        self.strategy.stream_reason = why.join("; ");
        self
    }

    /// `auto` without a cap judged the dirty rate against a fast link; on a loaded host
    /// one stream carries far less ([`HostFacts::loaded_stream_bps`]), and a guest
    /// dirtying [`READY_SHARE`] of that cannot converge in pre-copy (its hops ran out of
    /// budget 10-60 MiB from done): post-copy is armed after all, so that half the
    /// budget spent switches to it. Not when the operator forced multifd or a cap.
    fn arm_postcopy_for_a_loaded_host(&mut self, tuning: &Tuning, host: &HostFacts) {
        let (Some(d), None, None) = (self.measured_dirty_bps, self.limits.max_bandwidth_bps, tuning.multifd_channels) else { return };
        let stream = host.loaded_stream_bps();
        if self.mode != Mode::Auto || self.strategy.postcopy_ready || (d as f64) < READY_SHARE * stream as f64 {
            return;
        }
        self.strategy.postcopy_ready = true;
        self.strategy.auto_converge = false;
        self.strategy.name = "precopy+postcopy-ready".into();
        self.strategy.reason.push_str(&format!(
            "; then post-copy armed after all: this host is loaded ({:.1} of {} cores busy), one stream carries about {} MiB/s, and dirty {} MiB/s is at least {}% of that",
            host.busy_cores,
            host.cores,
            mib(stream),
            mib(d),
            (READY_SHARE * 100.0) as u32
        ));
    }

    /// Keeps the stream settings both ends already agreed on (`agreed`), where the
    /// policy, chosen later with more knowledge, would set them otherwise: the
    /// destination's QEMU was prepared with them. XBZRLE is the source's alone, so it
    /// may still be chosen over a single stream; the change is said in
    /// [`Strategy::stream_reason`].
    pub fn within(mut self, agreed: &crate::run::Stream) -> Policy {
        // What the destination sees: XBZRLE over one stream is the source's alone.
        let shared = |s: &crate::run::Stream| {
            let multifd_compression = if s.multifd_channels >= 2 { s.compression } else { Compression::None };
            (s.postcopy_ready, s.postcopy_preempt, s.multifd_channels, multifd_compression)
        };
        if shared(&crate::run::Stream::of(&self.strategy)) == shared(agreed) {
            return self;
        }
        let s = &mut self.strategy;
        s.postcopy_ready = agreed.postcopy_ready;
        s.postcopy_preempt = agreed.postcopy_preempt;
        s.multifd_channels = agreed.multifd_channels;
        s.compression = agreed.compression;
        if !s.postcopy_ready && !s.auto_converge {
            s.auto_converge = true;
        }
        s.stream_reason = format!(
            "{}; kept as the destination was prepared: {} multifd channels, compression {}, post-copy {}",
            s.stream_reason,
            agreed.multifd_channels,
            agreed.compression,
            if agreed.postcopy_ready { "armed" } else { "not armed" }
        );
        self
    }

    /// The strategy chosen at the start.
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// The time budget, ms.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// Feeds one sample; returns what to do.
    pub fn observe(&mut self, s: &Sample) -> Action {
        if self.postcopy {
            return Action::Continue;
        }
        let new_pass = s.iteration > self.last_iteration;
        if new_pass {
            self.last_iteration = s.iteration;
            self.passes.push(s.remaining_bytes);
        }
        let can_postcopy = self.strategy.postcopy_ready;
        // A full pass is done once QEMU has synced the dirty bitmap twice.
        let first_pass_done = s.iteration >= 2;
        if self.mode == Mode::Postcopy && first_pass_done {
            return self.go_postcopy("post-copy requested; first pass done".into());
        }
        if can_postcopy && first_pass_done && new_pass {
            if self.predicted_to_converge == Some(false) {
                // Quote what the prediction rests on (the measurement before the start)
                // and, beside it, QEMU's live figure, which may differ.
                return self.go_postcopy(format!(
                    "predicted not to converge: dirty {} MiB/s measured before the start (QEMU now sees {} MiB/s) vs cap {} MiB/s; first pass done",
                    mib(self.measured_dirty_bps.unwrap_or(0)),
                    mib(s.dirty_rate_bps),
                    mib(self.strategy.bandwidth_bps)
                ));
            }
            if let Some(why) = self.stalled(s) {
                if let Some(raise) = self.raise_downtime(s, &why) {
                    return raise;
                }
                return self.go_postcopy(why);
            }
        }
        if can_postcopy && first_pass_done && s.elapsed_ms * 2 >= self.deadline_ms {
            return self.go_postcopy(format!(
                "half the {} ms budget spent with {} MiB still to send",
                self.deadline_ms,
                mib(s.remaining_bytes)
            ));
        }
        if !can_postcopy && first_pass_done && new_pass {
            if let Some(why) = self.stalled(s) {
                if let Some(raise) = self.raise_downtime(s, &why) {
                    return raise;
                }
            }
        }
        if !can_postcopy && s.elapsed_ms >= self.deadline_ms && !self.finishing_within_overrun(s) {
            return Action::GiveUp {
                reason: format!(
                    "pre-copy did not finish within its {} ms budget ({} MiB left, dirty {} MiB/s, sending {} MiB/s){}; the VM stays on its source",
                    self.deadline_ms,
                    mib(s.remaining_bytes),
                    mib(s.dirty_rate_bps),
                    mib(s.transfer_rate_bps),
                    self.fallback_note()
                ),
            };
        }
        Action::Continue
    }

    /// Past the budget, pre-copy that is about to finish is let finish: the budget is per
    /// GiB of guest and assumes a link that moves it in time, but on a loaded host the
    /// one stream may carry a few tens of MiB/s, and a guest booted from a disk has
    /// little zero memory (page cache), so a 256 MiB guest can reach its 7.5 s budget
    /// with a few MiB left (`walkabout up`'s disk guests lost a hop per run that way).
    /// True when the remainder, sent at the rate QEMU reports minus the dirty rate, is
    /// gone before [`OVERRUN_FACTOR`] times the budget; a remainder that does not shrink
    /// (the guest dirties as fast as the link sends) still ends at the budget.
    fn finishing_within_overrun(&self, s: &Sample) -> bool {
        let net_bps = s.transfer_rate_bps.saturating_sub(s.dirty_rate_bps);
        if net_bps == 0 {
            return false;
        }
        let to_send_ms = u64::try_from(u128::from(s.remaining_bytes) * 1000 / u128::from(net_bps)).unwrap_or(u64::MAX);
        s.elapsed_ms.saturating_add(to_send_ms) <= self.deadline_ms.saturating_mul(OVERRUN_FACTOR)
    }

    /// On a stall, the downtime limit goes to the operator's maximum if QEMU expects the
    /// remainder to fit in it; the pass history restarts so a later stall is judged anew.
    fn raise_downtime(&mut self, s: &Sample, stall: &str) -> Option<Action> {
        let max = self.limits.max_downtime_ms;
        if self.downtime_ms >= max || s.expected_downtime_ms > max {
            return None;
        }
        self.downtime_ms = max;
        self.passes.clear();
        Some(Action::SetDowntime {
            ms: max,
            reason: format!(
                "{stall}; QEMU expects {} ms, within the allowed {max} ms: downtime limit raised{}",
                s.expected_downtime_ms,
                self.fallback_note()
            ),
        })
    }

    /// In `auto` mode without post-copy, what stands in for it, for the switch reasons;
    /// empty otherwise.
    fn fallback_note(&self) -> String {
        if self.mode != Mode::Auto || self.strategy.postcopy_ready {
            return String::new();
        }
        let before = self.measured_dirty_bps.map(|d| format!("dirty {} MiB/s", mib(d))).unwrap_or_else(|| "dirty rate unknown".into());
        format!(" (post-copy not armed: {before} before the start; auto-converge throttling the vCPUs instead of post-copy)")
    }

    fn go_postcopy(&mut self, reason: String) -> Action {
        self.postcopy = true;
        Action::StartPostcopy { reason }
    }

    /// A stall: the last [`STALL_ITERATIONS`] passes did not get the remainder meaningfully
    /// below the best seen before them.
    fn stalled(&self, s: &Sample) -> Option<String> {
        let n = self.passes.len();
        if n <= STALL_ITERATIONS {
            return None;
        }
        let (before, recent) = self.passes.split_at(n - STALL_ITERATIONS);
        let best_before = before.iter().copied().min()?;
        let best_recent = recent.iter().copied().min()?;
        // The first entries include the initial full pass; a later pass at or above
        // 95% of the best before is no progress.
        (best_recent as f64 >= PROGRESS_FRACTION * best_before as f64).then(|| {
            format!(
                "stalled: remaining {} MiB has not fallen over {} passes (dirty {} MiB/s, sending {} MiB/s, expected downtime {} ms > {} ms)",
                mib(s.remaining_bytes),
                STALL_ITERATIONS,
                mib(s.dirty_rate_bps),
                mib(s.transfer_rate_bps),
                s.expected_downtime_ms,
                self.limits.max_downtime_ms
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn pass(iteration: u64, remaining_mib: u64, elapsed_ms: u64) -> Sample {
        Sample {
            elapsed_ms,
            iteration,
            remaining_bytes: remaining_mib * MIB,
            dirty_rate_bps: 500 * MIB,
            transfer_rate_bps: 100 * MIB,
            expected_downtime_ms: 2000,
            ..Sample::default()
        }
    }

    #[test]
    fn uncapped_by_default_and_capped_when_asked() {
        let p = Policy::new(Mode::Auto, Limits::default(), GIB, None);
        assert_eq!(p.strategy().bandwidth_bps, UNCAPPED_BPS);
        let limits = Limits { max_bandwidth_bps: Some(100 * MIB), ..Limits::default() };
        assert_eq!(Policy::new(Mode::Auto, limits, GIB, None).strategy().bandwidth_bps, 100 * MIB);
    }

    #[test]
    fn auto_switches_to_postcopy_when_remaining_stops_falling() {
        let mut p = Policy::new(Mode::Auto, Limits::default(), GIB, None);
        let mut actions = vec![];
        for (i, rem) in [(1, 900), (2, 200), (3, 210), (4, 205), (5, 199)] {
            actions.push(p.observe(&pass(i, rem, i * 100)));
        }
        assert_eq!(actions[..4], vec![Action::Continue; 4]);
        assert!(matches!(&actions[4], Action::StartPostcopy { reason } if reason.starts_with("stalled")), "{actions:?}");
    }

    #[test]
    fn a_stall_that_fits_the_allowed_downtime_raises_the_limit_before_postcopy() {
        let mut p = Policy::new(Mode::Auto, Limits::default(), GIB, None);
        assert_eq!(p.strategy().downtime_ms, 30);
        let fits = |i, rem| Sample { expected_downtime_ms: 120, ..pass(i, rem, i * 100) };
        for (i, rem) in [(1, 900), (2, 200), (3, 210), (4, 205)] {
            assert_eq!(p.observe(&fits(i, rem)), Action::Continue);
        }
        assert!(matches!(p.observe(&fits(5, 199)), Action::SetDowntime { ms: 300, .. }));
        // Stalling again after the raise: now post-copy.
        for (i, rem) in [(6, 200), (7, 201), (8, 199)] {
            assert_eq!(p.observe(&fits(i, rem)), Action::Continue);
        }
        assert!(matches!(p.observe(&fits(9, 200)), Action::StartPostcopy { .. }));
    }

    #[test]
    fn converging_precopy_is_left_alone() {
        let mut p = Policy::new(Mode::Auto, Limits::default(), GIB, None);
        for (i, rem) in [(1, 900), (2, 400), (3, 150), (4, 60), (5, 20)] {
            assert_eq!(p.observe(&pass(i, rem, i * 100)), Action::Continue);
        }
    }

    #[test]
    fn predicted_non_convergence_switches_after_first_pass() {
        let limits = Limits { max_bandwidth_bps: Some(100 * MIB), ..Limits::default() };
        let mut p = Policy::new(Mode::Auto, limits, GIB, Some(500 * MIB));
        assert!(p.strategy().postcopy_ready);
        assert_eq!(p.observe(&pass(1, 900, 100)), Action::Continue);
        let live_zero = Sample { dirty_rate_bps: 0, ..pass(2, 300, 200) };
        assert!(
            matches!(p.observe(&live_zero), Action::StartPostcopy { reason } if reason.contains("dirty 500 MiB/s measured before the start")),
            "the reason must quote the measurement the prediction rests on"
        );
    }

    #[test]
    fn precopy_mode_throttles_when_predicted_to_fail_and_gives_up_at_budget() {
        let limits = Limits { max_bandwidth_bps: Some(200 * MIB), budget_per_gib_ms: 10_000, ..Limits::default() };
        let mut p = Policy::new(Mode::Precopy, limits, GIB, Some(500 * MIB));
        assert!(p.strategy().auto_converge && !p.strategy().postcopy_ready);
        assert_eq!(p.observe(&pass(5, 200, 9_000)), Action::Continue);
        assert!(matches!(p.observe(&pass(6, 200, 10_000)), Action::GiveUp { .. }));
    }

    #[test]
    fn a_cap_too_low_for_the_budget_stretches_it_to_one_pass_of_the_guest() {
        // 256 MiB at 24 MiB/s takes 10.7 s a pass; 30 s per GiB would give it 7.5 s.
        let limits = Limits { max_bandwidth_bps: Some(24 * MIB), ..Limits::default() };
        let p = Policy::new(Mode::Auto, limits, 256 * MIB, Some(4 * MIB));
        assert_eq!(p.deadline_ms(), 256 * 1000 / 24);
        assert!(p.strategy().reason.contains("budget 10666 ms"), "{}", p.strategy().reason);
        let uncapped = Policy::new(Mode::Auto, Limits::default(), 256 * MIB, Some(4 * MIB));
        assert_eq!(uncapped.deadline_ms(), 7_500, "no cap, the budget per GiB alone");
    }

    #[test]
    fn half_the_budget_spent_switches_auto_to_postcopy() {
        let limits = Limits { budget_per_gib_ms: 10_000, ..Limits::default() };
        let mut p = Policy::new(Mode::Auto, limits, GIB, None);
        assert_eq!(p.observe(&pass(2, 500, 4_000)), Action::Continue);
        assert!(matches!(p.observe(&pass(2, 450, 5_000)), Action::StartPostcopy { reason } if reason.contains("budget")));
    }

    fn capped(mib_s: u64) -> Limits {
        Limits { max_bandwidth_bps: Some(mib_s * MIB), ..Limits::default() }
    }

    /// Feeds `(iteration, remaining MiB, elapsed ms)` passes; returns every action.
    fn feed(p: &mut Policy, passes: &[(u64, u64, u64)], expected_downtime_ms: u64) -> Vec<Action> {
        passes.iter().map(|&(i, rem, ms)| p.observe(&Sample { expected_downtime_ms, ..pass(i, rem, ms) })).collect()
    }

    #[test]
    fn auto_gives_an_idle_guest_plain_precopy_without_the_return_path() {
        let p = Policy::new(Mode::Auto, capped(100), 2 * GIB, Some(0));
        let s = p.strategy();
        assert!(!s.postcopy_ready, "{s:?}");
        assert!(s.auto_converge, "auto-converge must stand in for post-copy: {s:?}");
        assert_eq!(s.name, "precopy+auto-converge");
        assert!(s.reason.contains("post-copy not armed") && s.reason.contains("100 MiB/s cap"), "{}", s.reason);
    }

    #[test]
    fn auto_without_a_cap_judges_the_dirty_rate_against_the_assumed_link() {
        let quiet = Policy::new(Mode::Auto, Limits::default(), GIB, Some(200 * MIB));
        assert!(!quiet.strategy().postcopy_ready);
        assert!(quiet.strategy().reason.contains("link assumed without a cap"), "{}", quiet.strategy().reason);
        let busy = Policy::new(Mode::Auto, Limits::default(), GIB, Some(ASSUMED_LINK_BPS / 2));
        assert!(busy.strategy().postcopy_ready);
    }

    #[test]
    fn auto_arms_postcopy_from_half_the_cap_with_no_switch_before_a_stall() {
        let below = Policy::new(Mode::Auto, capped(100), GIB, Some(49 * MIB));
        assert!(!below.strategy().postcopy_ready);
        let mut at_half = Policy::new(Mode::Auto, capped(100), GIB, Some(50 * MIB));
        assert!(at_half.strategy().postcopy_ready && !at_half.strategy().auto_converge);
        assert_eq!(at_half.strategy().name, "precopy+postcopy-ready");
        // Predicted to converge (under 80% of the cap): no switch after the first pass.
        assert_eq!(feed(&mut at_half, &[(1, 900, 100), (2, 300, 200), (3, 100, 300)], 2000), vec![Action::Continue; 3]);
    }

    #[test]
    fn auto_arms_postcopy_for_a_guest_dirtying_beyond_the_cap() {
        let p = Policy::new(Mode::Auto, capped(100), GIB, Some(150 * MIB));
        assert!(p.strategy().postcopy_ready);
        assert!(p.strategy().reason.contains("predicted not to converge"), "{}", p.strategy().reason);
    }

    #[test]
    fn auto_arms_postcopy_when_the_dirty_rate_could_not_be_measured() {
        let p = Policy::new(Mode::Auto, capped(100), GIB, None);
        assert!(p.strategy().postcopy_ready);
        assert!(p.strategy().reason.contains("dirty rate unknown"), "{}", p.strategy().reason);
    }

    #[test]
    fn a_guest_quiet_at_the_start_that_stalls_later_gets_the_downtime_raise_not_postcopy() {
        let mut p = Policy::new(Mode::Auto, capped(100), GIB, Some(0));
        let stall = feed(&mut p, &[(1, 900, 100), (2, 200, 2_000), (3, 210, 3_000), (4, 205, 4_000), (5, 199, 5_000)], 120);
        assert_eq!(stall[..4], vec![Action::Continue; 4]);
        assert!(
            matches!(&stall[4], Action::SetDowntime { ms: 300, reason } if reason.contains("auto-converge throttling the vCPUs instead of post-copy")),
            "{stall:?}"
        );
        // Throttled, the remainder falls again and fits: it finishes in pre-copy.
        assert_eq!(feed(&mut p, &[(6, 120, 6_000), (7, 40, 7_000), (8, 10, 8_000)], 100), vec![Action::Continue; 3]);
    }

    #[test]
    fn a_guest_quiet_at_the_start_that_never_converges_is_cancelled_at_the_budget_never_postcopied() {
        let limits = Limits { budget_per_gib_ms: 10_000, ..capped(200) };
        let mut p = Policy::new(Mode::Auto, limits, GIB, Some(0));
        // Half the budget gone: with post-copy armed this would switch; here it carries on.
        let actions = feed(&mut p, &[(2, 500, 4_000), (2, 450, 5_000), (3, 450, 9_000)], 2000);
        assert_eq!(actions, vec![Action::Continue; 3]);
        let end = p.observe(&pass(4, 450, 10_000));
        assert!(
            matches!(&end, Action::GiveUp { reason } if reason.contains("budget") && reason.contains("post-copy not armed: dirty 0 MiB/s")),
            "{end:?}"
        );
    }

    #[test]
    fn precopy_past_its_budget_with_a_shrinking_remainder_finishes_instead_of_giving_up() {
        // `up`'s disk guest on a loaded host: 256 MiB, budget 7.5 s, sending 19 MiB/s.
        let mut p = Policy::new(Mode::Auto, Limits::default(), 256 * MIB, Some(7 * MIB));
        assert_eq!((p.strategy().postcopy_ready, p.deadline_ms()), (false, 7_500));
        let slow = |i, rem_mib: u64, ms| Sample {
            dirty_rate_bps: 9 * MIB,
            transfer_rate_bps: 19 * MIB,
            remaining_bytes: rem_mib * MIB,
            ..pass(i, 0, ms)
        };
        // 52 MiB left at 10 MiB/s net: done by about 12.7 s, within 3 x 7.5 s.
        assert_eq!(p.observe(&slow(3, 52, 7_500)), Action::Continue);
        assert_eq!(p.observe(&slow(4, 20, 10_000)), Action::Continue);
    }

    #[test]
    fn precopy_past_its_budget_gives_up_when_the_remainder_cannot_be_sent_in_the_overrun() {
        let mut p = Policy::new(Mode::Auto, Limits::default(), 256 * MIB, Some(7 * MIB));
        let s = |rem_mib: u64, dirty_mib: u64, ms| Sample {
            dirty_rate_bps: dirty_mib * MIB,
            transfer_rate_bps: 19 * MIB,
            remaining_bytes: rem_mib * MIB,
            ..pass(3, 0, ms)
        };
        // Dirtying as fast as it sends: never, so at the budget.
        assert!(matches!(p.observe(&s(52, 19, 7_500)), Action::GiveUp { .. }));
        // Shrinking, but 200 MiB at 10 MiB/s is 20 s more: past 3 x 7.5 s.
        let mut q = Policy::new(Mode::Auto, Limits::default(), 256 * MIB, Some(7 * MIB));
        assert!(matches!(q.observe(&s(200, 9, 7_500)), Action::GiveUp { .. }));
        // And never past 3 x the budget, however close.
        let mut r = Policy::new(Mode::Auto, Limits::default(), 256 * MIB, Some(7 * MIB));
        assert!(matches!(r.observe(&s(1, 9, 22_500)), Action::GiveUp { .. }));
    }

    const IDLE_HOST: HostFacts = HostFacts { cores: 8, busy_cores: 1.0, single_stream_bps: GIB };

    #[test]
    fn auto_arms_postcopy_for_a_guest_dirtying_half_of_what_a_loaded_host_streams() {
        // 2 cores at a load of 28: one 80 MiB/s stream gets about 5 MiB/s.
        let loaded = HostFacts { cores: 2, busy_cores: 28.0, single_stream_bps: 80 * MIB };
        let p = Policy::new(Mode::Auto, Limits::default(), 256 * MIB, Some(7 * MIB)).tuned(&Tuning::default(), &loaded);
        let s = p.strategy();
        assert!(s.postcopy_ready && !s.auto_converge, "{s:?}");
        assert!(s.reason.contains("post-copy armed after all") && s.reason.contains("one stream carries about 5 MiB/s"), "{}", s.reason);
    }

    #[test]
    fn auto_keeps_plain_precopy_for_the_same_guest_on_a_quiet_host() {
        let quiet = HostFacts { cores: 2, busy_cores: 1.0, single_stream_bps: 80 * MIB };
        let p = Policy::new(Mode::Auto, Limits::default(), 256 * MIB, Some(7 * MIB)).tuned(&Tuning::default(), &quiet);
        assert!(!p.strategy().postcopy_ready && p.strategy().auto_converge, "{:?}", p.strategy());
    }
    const BUSY_HOST: HostFacts = HostFacts { cores: 2, busy_cores: 1.5, single_stream_bps: GIB };

    #[test]
    fn multifd_is_picked_for_a_link_faster_than_one_stream_when_cores_are_spare() {
        let limits = Limits { max_bandwidth_bps: Some(4 * GIB), ..Limits::default() };
        let p = Policy::new(Mode::Auto, limits, GIB, Some(0)).tuned(&Tuning::default(), &IDLE_HOST);
        assert_eq!(p.strategy().multifd_channels, 4, "{:?}", p.strategy());
        assert!(p.strategy().stream_reason.contains("faster than one stream"), "{}", p.strategy().stream_reason);
    }

    #[test]
    fn multifd_is_not_picked_without_spare_cores() {
        let limits = Limits { max_bandwidth_bps: Some(4 * GIB), ..Limits::default() };
        let p = Policy::new(Mode::Auto, limits, GIB, Some(0)).tuned(&Tuning::default(), &BUSY_HOST);
        assert_eq!(p.strategy().multifd_channels, 0);
    }

    #[test]
    fn a_slow_link_under_a_repeating_rewrite_rate_gets_compression() {
        let p = Policy::new(Mode::Auto, capped(20), GIB, Some(256 * MIB)).tuned(&Tuning::default(), &BUSY_HOST);
        assert_eq!(p.strategy().compression, Compression::Xbzrle, "{:?}", p.strategy());
        assert!(p.strategy().postcopy_ready, "XBZRLE runs beside post-copy");
    }

    #[test]
    fn forced_multifd_disarms_postcopy_in_auto_and_says_why() {
        let tuning = Tuning { multifd_channels: Some(2), compression: Some(Compression::Zstd), ..Tuning::default() };
        let p = Policy::new(Mode::Auto, capped(100), GIB, Some(500 * MIB)).tuned(&tuning, &BUSY_HOST);
        let s = p.strategy();
        assert_eq!((s.multifd_channels, s.compression, s.postcopy_ready, s.postcopy_preempt), (2, Compression::Zstd, false, false));
        assert!(s.stream_reason.contains("cannot combine"), "{}", s.stream_reason);
    }

    #[test]
    fn a_policy_chosen_later_keeps_the_stream_the_destination_was_prepared_for() {
        // A disk copy prepares its destination before its dirty-rate sample is read.
        let host = HostFacts { cores: 8, busy_cores: 1.0, single_stream_bps: 100 * MIB };
        let agreed = Policy::new(Mode::Precopy, capped(400), GIB, None).tuned(&Tuning::default(), &host);
        let agreed = crate::run::Stream::of(agreed.strategy());
        assert_eq!((agreed.multifd_channels >= 2, agreed.compression), (true, Compression::None), "{agreed:?}");
        // Dirtying 500 MiB/s of a 1 GiB guest over 400 MiB/s: alone it would pick zstd,
        // which the destination's multifd channels were not set up to decode.
        let later = Policy::new(Mode::Precopy, capped(400), GIB, Some(500 * MIB)).tuned(&Tuning::default(), &host);
        assert_eq!(later.strategy().compression, Compression::Zstd, "{:?}", later.strategy());
        let kept = later.within(&agreed);
        assert_eq!(crate::run::Stream::of(kept.strategy()), agreed);
        assert!(kept.strategy().stream_reason.contains("kept as the destination was prepared"), "{}", kept.strategy().stream_reason);
        // XBZRLE over one stream is the source's alone: chosen later, it stays.
        let agreed = Policy::new(Mode::Precopy, capped(20), GIB, None).tuned(&Tuning::default(), &BUSY_HOST);
        let later = Policy::new(Mode::Precopy, capped(20), GIB, Some(256 * MIB)).tuned(&Tuning::default(), &BUSY_HOST);
        let kept = later.within(&crate::run::Stream::of(agreed.strategy()));
        assert_eq!(kept.strategy().compression, Compression::Xbzrle, "{:?}", kept.strategy());
    }

    #[test]
    fn forced_zstd_alone_brings_two_multifd_channels() {
        let tuning = Tuning { compression: Some(Compression::Zstd), ..Tuning::default() };
        let p = Policy::new(Mode::Precopy, capped(20), GIB, Some(0)).tuned(&tuning, &BUSY_HOST);
        assert_eq!((p.strategy().multifd_channels, p.strategy().compression), (2, Compression::Zstd));
    }

    #[test]
    fn postcopy_mode_keeps_postcopy_over_forced_multifd() {
        let tuning = Tuning { multifd_channels: Some(2), ..Tuning::default() };
        let p = Policy::new(Mode::Postcopy, Limits::default(), GIB, None).tuned(&tuning, &BUSY_HOST);
        let s = p.strategy();
        assert!(s.postcopy_ready && s.multifd_channels == 0, "{s:?}");
    }

    #[test]
    fn preempt_is_picked_for_a_slow_link_with_a_spare_core_only() {
        let slow = Policy::new(Mode::Postcopy, capped(100), GIB, None).tuned(&Tuning::default(), &IDLE_HOST);
        assert!(slow.strategy().postcopy_preempt, "{:?}", slow.strategy());
        let fast = Policy::new(Mode::Postcopy, Limits::default(), GIB, None).tuned(&Tuning::default(), &IDLE_HOST);
        assert!(!fast.strategy().postcopy_preempt && fast.strategy().stream_reason.contains("not known to be slow"));
        let busy = Policy::new(Mode::Postcopy, capped(100), GIB, None).tuned(&Tuning::default(), &BUSY_HOST);
        assert!(!busy.strategy().postcopy_preempt && busy.strategy().stream_reason.contains("no core spare"));
    }

    #[test]
    fn preempt_can_be_turned_off_and_the_recovery_budget_set() {
        let tuning = Tuning { postcopy_preempt: Some(false), recovery_budget_ms: Some(15_000), ..Tuning::default() };
        let p = Policy::new(Mode::Postcopy, Limits::default(), GIB, None).tuned(&tuning, &BUSY_HOST);
        assert_eq!((p.strategy().postcopy_preempt, p.strategy().recovery_budget_ms), (false, 15_000));
    }

    #[test]
    fn mode_parsing_names_the_bad_value() {
        assert_eq!("postcopy".parse::<Mode>(), Ok(Mode::Postcopy));
        assert!("fast".parse::<Mode>().expect_err("bad").contains("'fast'"));
    }
}
