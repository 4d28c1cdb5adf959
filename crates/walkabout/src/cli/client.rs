//! What every subcommand shares: the typed clients of `walkabout_api` built with the
//! command's timeouts, the output format, size and duration parsers, the runtime.

use anyhow::Context;
use std::sync::OnceLock;
use std::time::Duration;
use walkabout_api::{AgentClient, ClientOptions, ControllerClient};

/// How a command prints what it reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

/// The default of the global `--timeout`: the longest wait for one answer.
pub const DEFAULT_TIMEOUT: &str = "30s";

/// The longest wait for a TCP connection (shorter when `--timeout` is).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The timeouts the command line chose, set once by `main` before any command runs.
static OPTIONS: OnceLock<ClientOptions> = OnceLock::new();

/// Sets the timeouts of every client this process makes: `timeout` for a whole request,
/// the connection within at most 5 s of it. Called once by `main` (later calls are
/// ignored: one command, one setting).
pub fn set_timeout(timeout: Duration) {
    let _ = OPTIONS.set(ClientOptions { connect_timeout: CONNECT_TIMEOUT.min(timeout), request_timeout: timeout });
}

/// The timeouts of this command's clients (the library's defaults if `main` set none).
pub fn options() -> ClientOptions {
    OPTIONS.get().copied().unwrap_or_default()
}

/// A typed client of the agent at `url`, with this command's timeouts.
pub fn agent(url: &str) -> anyhow::Result<AgentClient> {
    Ok(AgentClient::new(url, options())?)
}

/// A typed client of the controller at `url`, with this command's timeouts.
pub fn controller(url: &str) -> anyhow::Result<ControllerClient> {
    Ok(ControllerClient::new(url, options())?)
}

/// Parses `<number><unit>` into the number times the unit's multiplier; `what` names the
/// kind of value in errors ("size", "duration"), `units` lists each unit (lowercase for
/// `fold`) with its multiplier, the empty unit included.
fn scaled(s: &str, what: &str, fold: bool, units: &[(&[&str], u64)]) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a {what}"))?;
    let unit = if fold { unit.to_ascii_lowercase() } else { unit.to_string() };
    let mult = units
        .iter()
        .find(|(names, _)| names.contains(&unit.as_str()))
        .map(|(_, m)| *m)
        .ok_or_else(|| format!("unknown {what} unit '{unit}' in '{s}'"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{what} '{s}' is too large"))
}

/// Parses a memory size: `512M`, `2G`, `512MiB`, `1GiB`, or a bare number of MiB.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let units: &[(&[&str], u64)] = &[(&["", "m", "mb", "mib"], 1), (&["g", "gb", "gib"], 1024), (&["t", "tb", "tib"], 1024 * 1024)];
    scaled(s, "size", true, units).map_err(|e| format!("{e} (e.g. 512M, 2G)"))
}

/// Parses a duration into ms: `50ms`, `30s`, `2m`, or a bare number of ms.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let units: &[(&[&str], u64)] = &[(&["", "ms"], 1), (&["s"], 1000), (&["m", "min"], 60_000)];
    scaled(s, "duration", false, units).map_err(|e| format!("{e} (e.g. 50ms, 30s)"))
}

/// Parses the global `--timeout`: `500ms`, `10s`, `2m`, or a bare number of seconds.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let ms =
        if s.trim().chars().all(|c| c.is_ascii_digit()) { scaled(s, "duration", false, &[(&[""], 1000)])? } else { parse_duration_ms(s)? };
    if ms == 0 {
        return Err(format!("timeout '{s}' must be more than zero"));
    }
    Ok(Duration::from_millis(ms))
}

/// Prints a value as pretty JSON.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A multi-threaded runtime for one command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_their_units() {
        assert_eq!(parse_mib("512M"), Ok(512));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert_eq!(parse_mib("1GiB"), Ok(1024));
        assert_eq!(parse_mib("300"), Ok(300));
        assert!(parse_mib("12Q").expect_err("unit").contains("unknown size unit"));
        assert!(parse_mib("lots").is_err());
        assert_eq!(parse_duration_ms("50ms"), Ok(50));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert!(parse_duration_ms("5h").expect_err("unit").contains("unknown duration unit"));
    }

    #[test]
    fn a_bare_timeout_is_seconds_and_zero_is_refused() {
        assert_eq!(parse_timeout("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_timeout("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_timeout("0s").is_err());
    }
}
