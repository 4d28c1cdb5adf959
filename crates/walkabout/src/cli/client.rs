//! The HTTP client the CLI uses to talk to agents, and helpers shared by subcommands.

use anyhow::{anyhow, Context};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How a command prints what it reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

/// A JSON API client bound to one base URL.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// A client for the API at `base` (e.g. `http://127.0.0.1:7701`).
    pub fn new(base: &str) -> anyhow::Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            anyhow::bail!("agent URL {base:?} must start with http:// (e.g. http://127.0.0.1:7701)");
        }
        let http = reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(5)).build().context("building HTTP client")?;
        Ok(Client { base, http })
    }

    /// GET a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(self.url(path)), path).await
    }

    /// POST a JSON body (or none) and read JSON back.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: Option<&Value>) -> anyhow::Result<T> {
        let mut req = self.http.post(self.url(path));
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req, path).await
    }

    /// DELETE a resource.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let _: Value = self.send(self.http.delete(self.url(path)), path).await?;
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder, path: &str) -> anyhow::Result<T> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!("cannot reach {}: connection refused or unreachable (is the agent running?)", self.base)
            } else {
                anyhow!("request to {}{} failed: {e}", self.base, path)
            }
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.with_context(|| format!("reading reply from {}{path}", self.base))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            anyhow::bail!("{msg}");
        }
        let bytes = if bytes.is_empty() { "null".as_bytes().into() } else { bytes };
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected reply from {}{path}", self.base))
    }
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
}
