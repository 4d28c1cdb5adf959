//! Prometheus metrics as the agent and the controller serve them at `/metrics`: a
//! `prometheus-client` registry filled at each scrape with typed gauges and counters,
//! encoded by the crate as OpenMetrics text.
//!
//! One thing the crate leaves to its users: it writes label values as they are
//! (prometheus/client_rust#151). A VM or host name holding a newline or a quote would
//! then end its sample early and inject lines of its own, so every label value here is
//! a [`LabelText`], escaped as the text formats require.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::fmt::Write;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label value, escaped when encoded: `\` as `\\`, `"` as `\"`, a line feed as `\n`
/// (the three escapes of the Prometheus and OpenMetrics text formats).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelText(pub String);

impl EncodeLabelValue for LabelText {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A sample's labels: names and escaped values.
pub type Labels = Vec<(&'static str, LabelText)>;

/// Labels from name and value pairs.
pub fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.into_iter().map(|(k, v)| (k, LabelText(v.to_string()))).collect()
}

/// A value for a gauge: counts and sizes beyond `i64::MAX` saturate.
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A registry filled for one scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    registry: Registry,
}

impl Scrape {
    /// An empty scrape.
    pub fn new() -> Scrape {
        Scrape::default()
    }

    /// Registers a gauge without labels, set to `value`. `help` ends without a period
    /// (the encoder adds one).
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) {
        let g: Gauge = Gauge::default();
        g.set(gauge_value(value));
        self.registry.register(name, help, g);
    }

    /// Registers a family of labelled gauges; set its samples through the handle.
    pub fn gauges(&mut self, name: &str, help: &str) -> Family<Labels, Gauge> {
        let f = Family::<Labels, Gauge>::default();
        self.registry.register(name, help, f.clone());
        f
    }

    /// Registers a counter without labels at `value`. `name` is without its `_total`
    /// suffix, which the encoder adds.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let c: Counter = Counter::default();
        c.inc_by(value);
        self.registry.register(name, help, c);
    }

    /// Registers a family of labelled counters (`name` without `_total`).
    pub fn counters(&mut self, name: &str, help: &str) -> Family<Labels, Counter> {
        let f = Family::<Labels, Counter>::default();
        self.registry.register(name, help, f.clone());
        f
    }

    /// The OpenMetrics text of everything registered.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; the encoder only passes on the writer's errors.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Sets a labelled gauge.
pub fn set(family: &Family<Labels, Gauge>, labels: Labels, value: u64) {
    family.get_or_create(&labels).set(gauge_value(value));
}

/// Sets a labelled counter (a fresh one, at each scrape).
pub fn count(family: &Family<Labels, Counter>, labels: Labels, value: u64) {
    family.get_or_create(&labels).inc_by(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newline_in_a_label_value_cannot_inject_a_sample() {
        let mut s = Scrape::new();
        let up = s.gauges("walkabout_cluster_host_up", "Whether the host's agent answers");
        set(&up, labels([("host", "h1\"} 0\nwalkabout_cluster_host_up{host=\"evil")]), 1);
        let text = s.render();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples, [r#"walkabout_cluster_host_up{host="h1\"} 0\nwalkabout_cluster_host_up{host=\"evil"} 1"#]);
    }

    #[test]
    fn a_backslash_is_doubled() {
        let mut s = Scrape::new();
        let g = s.gauges("m", "M");
        set(&g, labels([("vm", r"a\b")]), 2);
        assert!(s.render().contains(r#"m{vm="a\\b"} 2"#), "{}", s.render());
    }

    #[test]
    fn counters_get_their_total_suffix_and_types_are_declared() {
        let mut s = Scrape::new();
        s.counter("walkabout_migration_failed", "Migrations that failed", 3);
        s.gauge("walkabout_host_memory_used_bytes", "Memory given to active VMs", 1 << 30);
        let text = s.render();
        assert!(text.contains("# TYPE walkabout_migration_failed counter\n"), "{text}");
        assert!(text.contains("walkabout_migration_failed_total 3\n"), "{text}");
        assert!(text.contains("# HELP walkabout_host_memory_used_bytes Memory given to active VMs.\n"), "{text}");
        assert!(text.contains("walkabout_host_memory_used_bytes 1073741824\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
