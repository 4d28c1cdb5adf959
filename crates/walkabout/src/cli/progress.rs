//! Progress of long operations, on stderr: on a terminal an `indicatif` bar with an
//! ETA; anywhere else (a file, a pipe, a CI log) plain lines at a modest rate, one per
//! pass or change of state, never one per redraw.
//!
//! The displays take plain numbers and strings ([`MigrationView`], [`PlanView`]), read
//! from the servers' typed replies (`walkabout_api`) by their constructors.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use walkabout_api::{MigrationRecord, Phase, PlanRecord, Progress, StepStatus};

/// Least time between two plain lines that only report more of the same (a new pass).
const PLAIN_GAP: Duration = Duration::from_secs(1);

/// A byte count in whole MiB, rounded to nearest.
pub fn mib(bytes: u64) -> u64 {
    bytes.saturating_add(1 << 19) >> 20
}

/// A duration for people: `45s`, `3m05s`, `1h02m`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// What a migration's progress display needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationView {
    /// The phase (`running`, `switchover`, ...).
    pub phase: String,
    /// Pre-copy passes so far.
    pub pass: u64,
    /// Guest memory to move, bytes.
    pub total_bytes: u64,
    /// Bytes still to send in this pass.
    pub remaining_bytes: u64,
    /// The guest's dirty rate, bytes/s.
    pub dirty_rate_bps: u64,
    /// The transfer rate, bytes/s.
    pub transfer_rate_bps: u64,
    /// QEMU's expected downtime, ms.
    pub expected_downtime_ms: u64,
}

impl MigrationView {
    /// The view of a migration in `phase` with `progress` (an agent's record or the
    /// controller's).
    pub fn new(phase: Phase, p: &Progress) -> MigrationView {
        MigrationView {
            phase: phase.to_string(),
            pass: p.iteration,
            total_bytes: p.total_bytes,
            remaining_bytes: p.remaining_bytes,
            dirty_rate_bps: p.dirty_rate_bps,
            transfer_rate_bps: p.transfer_rate_bps,
            expected_downtime_ms: p.expected_downtime_ms,
        }
    }

    /// The view of an agent's migration record.
    pub fn from_record(rec: &MigrationRecord) -> MigrationView {
        MigrationView::new(rec.phase, &rec.progress)
    }

    /// Bytes of guest memory not left to send (the bar's position).
    pub fn done_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.remaining_bytes.min(self.total_bytes))
    }

    /// Time until what is left is sent: pre-copy gains on the guest at the transfer rate
    /// less the dirty rate (re-sent pages are the reason a position-based estimate is
    /// wrong here); `None` while it does not gain, or before any rate is known.
    pub fn eta(&self) -> Option<Duration> {
        let net = self.transfer_rate_bps.checked_sub(self.dirty_rate_bps).filter(|n| *n > 0)?;
        Some(Duration::from_secs(self.remaining_bytes.div_ceil(net)))
    }

    /// The numbers beside the bar, or on a plain line.
    pub fn detail(&self) -> String {
        // Most telling first: a narrow terminal cuts the end of the line.
        format!(
            "pass {}  ETA {}  left {}/{} MiB  send {} MiB/s  dirty {} MiB/s  downtime~{} ms",
            self.pass,
            self.eta().map_or_else(|| "?".to_string(), human_duration),
            mib(self.remaining_bytes),
            mib(self.total_bytes),
            mib(self.transfer_rate_bps),
            mib(self.dirty_rate_bps),
            self.expected_downtime_ms,
        )
    }
}

/// Decides when a plain line is worth printing: at once for a new state, at most one
/// per [`PLAIN_GAP`] for a new step of the same state, never for a repeat.
#[derive(Debug, Default)]
pub struct LineThrottle {
    last: Option<(String, u64, Instant)>,
}

impl LineThrottle {
    /// Whether to print a line for `state` at `step` (a pass, a count) at `now`.
    pub fn due(&mut self, state: &str, step: u64, now: Instant) -> bool {
        let due = match &self.last {
            None => true,
            Some((s, _, _)) if s != state => true,
            Some((_, n, _)) if *n == step => false,
            Some((_, _, at)) => now.saturating_duration_since(*at) >= PLAIN_GAP,
        };
        if due {
            self.last = Some((state.to_string(), step, now));
        }
        due
    }
}

/// Where a display draws.
enum Sink {
    Bar(ProgressBar),
    Lines(LineThrottle),
}

impl Sink {
    fn detect(template: &str) -> Sink {
        if std::io::stderr().is_terminal() {
            let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("#>.");
            Sink::Bar(ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr()).with_style(style))
        } else {
            Sink::Lines(LineThrottle::default())
        }
    }

    /// A line above the bar (or just a line).
    fn note(&self, line: &str) {
        match self {
            Sink::Bar(b) => b.println(line),
            Sink::Lines(_) => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Sink::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

/// The progress display of one migration (`walkabout migrate --wait`).
pub struct MigrationProgress {
    id: String,
    sink: Sink,
}

impl MigrationProgress {
    /// A display for migration `id`: a bar on a terminal, plain lines elsewhere.
    pub fn new(id: &str) -> MigrationProgress {
        let sink = Sink::detect("{prefix:10} [{bar:20}] {percent:>3}%  {wide_msg}");
        MigrationProgress { id: id.to_string(), sink }
    }

    /// Shows the migration as it now is.
    pub fn update(&mut self, v: &MigrationView) {
        match &mut self.sink {
            Sink::Bar(b) => {
                b.set_length(v.total_bytes.max(1));
                b.set_position(v.done_bytes());
                b.set_prefix(v.phase.clone());
                b.set_message(v.detail());
            }
            Sink::Lines(t) => {
                if t.due(&v.phase, v.pass, Instant::now()) {
                    eprintln!("{}: {}  {}", self.id, v.phase, v.detail());
                }
            }
        }
    }

    /// Prints a line of its own (a change of strategy) without breaking the bar.
    pub fn note(&self, line: &str) {
        self.sink.note(line);
    }

    /// Takes the bar away (the summary follows).
    pub fn finish(&self) {
        self.sink.finish();
    }
}

/// A step of a plan under way, as its progress display shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningStep {
    /// The VM.
    pub vm: String,
    /// Its source host.
    pub from: String,
    /// Its destination host.
    pub to: String,
    /// The migration's phase and share done (`running 45%`), or `starting`.
    pub state: String,
}

/// What a plan's progress display needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanView {
    /// Steps completed.
    pub done: u64,
    /// Steps that count (not superseded or cancelled).
    pub total: u64,
    /// The plan's round (a re-plan starts a new one).
    pub round: u64,
    /// The steps running now.
    pub running: Vec<RunningStep>,
}

impl PlanView {
    /// Counts a plan's steps (the controller's plan record); the running steps' states
    /// come from their migrations, so the caller adds them.
    pub fn from_plan(plan: &PlanRecord) -> PlanView {
        let live = plan.steps.iter().filter(|s| !matches!(s.status, StepStatus::Superseded | StepStatus::Cancelled));
        let (mut done, mut total) = (0, 0);
        for s in live {
            total += 1;
            done += u64::from(s.status == StepStatus::Completed);
        }
        PlanView { done, total, round: u64::from(plan.round), running: vec![] }
    }

    /// The running steps in a few words.
    pub fn detail(&self) -> String {
        let steps: Vec<String> = self.running.iter().map(|s| format!("{} {}->{} {}", s.vm, s.from, s.to, s.state)).collect();
        format!("round {}  {}", self.round, steps.join("  "))
    }

    /// What changes the plan's state for plain lines: steps done and which run (not how
    /// far each has got).
    fn state_key(&self) -> String {
        let vms: Vec<&str> = self.running.iter().map(|s| s.vm.as_str()).collect();
        format!("{}/{} r{} [{}]", self.done, self.total, self.round, vms.join(","))
    }
}

/// The progress display of a plan followed to its end (`host drain`, `vm move`,
/// `cluster rebalance`, ...).
pub struct PlanProgress {
    id: String,
    sink: Sink,
}

impl PlanProgress {
    /// A display for plan `id`: a bar with an ETA on a terminal, plain lines elsewhere.
    pub fn new(id: &str) -> PlanProgress {
        let sink = Sink::detect("{prefix} [{bar:20}] {pos}/{len} steps  ETA {eta}  {wide_msg}");
        if let Sink::Bar(b) = &sink {
            b.set_prefix(id.to_string());
        }
        PlanProgress { id: id.to_string(), sink }
    }

    /// Shows the plan as it now is.
    pub fn update(&mut self, v: &PlanView) {
        match &mut self.sink {
            Sink::Bar(b) => {
                b.set_length(v.total.max(1));
                b.set_position(v.done);
                b.set_message(v.detail());
            }
            Sink::Lines(t) => {
                // Every change of state is a line; the same state is never repeated.
                if t.due(&v.state_key(), 0, Instant::now()) {
                    eprintln!("{}: {}/{} steps done  {}", self.id, v.done, v.total, v.detail());
                }
            }
        }
    }

    /// Takes the bar away (the plan is printed next).
    pub fn finish(&self) {
        self.sink.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_migration_view_reads_its_numbers_from_a_record() {
        let p = Progress {
            iteration: 3,
            total_bytes: 512 << 20,
            remaining_bytes: 64 << 20,
            dirty_rate_bps: 8 << 20,
            transfer_rate_bps: 40 << 20,
            expected_downtime_ms: 30,
            ..Default::default()
        };
        let v = MigrationView::new(Phase::Running, &p);
        assert_eq!(v.phase, "running");
        assert_eq!(v.done_bytes(), 448 << 20);
        assert_eq!(v.eta(), Some(Duration::from_secs(2)));
        assert_eq!(v.detail(), "pass 3  ETA 2s  left 64/512 MiB  send 40 MiB/s  dirty 8 MiB/s  downtime~30 ms");
    }

    #[test]
    fn no_eta_while_the_guest_dirties_faster_than_we_send() {
        let v = MigrationView { remaining_bytes: 1 << 30, dirty_rate_bps: 50 << 20, transfer_rate_bps: 40 << 20, ..Default::default() };
        assert_eq!(v.eta(), None);
        assert!(v.detail().contains("ETA ?"), "{}", v.detail());
    }

    #[test]
    fn durations_read_as_seconds_minutes_or_hours() {
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(human_duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn plain_lines_come_once_per_pass_and_at_most_once_a_second() {
        let mut t = LineThrottle::default();
        let t0 = Instant::now();
        let polls: Vec<bool> = (0..1000u64).map(|i| t.due("running", i / 100, t0 + Duration::from_millis(i * 10))).collect();
        // 1000 polls over 10 s across 10 passes: the first poll and one per new pass.
        assert_eq!(polls.iter().filter(|d| **d).count(), 10);
    }

    #[test]
    fn a_new_state_is_printed_at_once_and_a_repeat_never() {
        let mut t = LineThrottle::default();
        let t0 = Instant::now();
        assert!(t.due("running", 1, t0));
        assert!(t.due("switchover", 1, t0 + Duration::from_millis(10)));
        assert!(!t.due("switchover", 1, t0 + Duration::from_secs(60)));
        assert!(!t.due("switchover", 2, t0 + Duration::from_millis(20)));
    }

    #[test]
    fn a_plan_view_counts_live_steps_only() {
        let step =
            |status: &str| json!({"vm": "g1", "from": "h1", "to": "h2", "wave": 0, "round": 2, "why": "rebalance", "status": status});
        let plan: PlanRecord = serde_json::from_value(json!({"version": 1, "id": "p1", "goal": {"goal": "rebalance"},
            "status": "running", "created_ms": 0, "round": 2,
            "steps": [step("completed"), step("running"), step("superseded"), step("pending"), step("cancelled")]}))
        .expect("a plan record");
        let v = PlanView::from_plan(&plan);
        assert_eq!((v.done, v.total, v.round), (1, 3, 2));
    }
}
