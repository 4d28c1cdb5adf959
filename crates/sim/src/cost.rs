//! How long a simulated live migration takes: a pre-copy cost model fitted to what
//! `bench/migrate` measured on real guests (`bench/results/migrate.json`).
//!
//! Pre-copy sends the guest's memory once, then what the guest dirtied meanwhile, again
//! and again; its time grows with the memory and with the dirty rate. The model is
//! linear in both, `total_ms = setup + per_mib * memory_mib + per_dirty * dirty_mib_s`,
//! fitted by least squares over the completed Walkabout runs at the bench's default
//! (uncapped) bandwidth. A cap on the rate the guest dirties relative to the link is
//! kept by [`CostModel::migration_ms`]: a guest dirtying faster than the link would
//! never converge, and Walkabout's policy switches it to post-copy, which ends in about
//! the time of one pass.

use serde::{Deserialize, Serialize};

/// Errors reading the bench results.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// The results are not the JSON `bench/migrate` writes.
    #[error("bench results {what}: {cause}")]
    Malformed {
        /// Which part.
        what: String,
        /// Why.
        cause: String,
    },
    /// Fewer runs than parameters, or runs that do not determine them.
    #[error("bench results hold {0} usable runs: too few to fit the cost model")]
    TooFew(usize),
}

/// The fitted model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Fixed cost of a migration (prepare the destination, the handshake), ms.
    pub setup_ms: f64,
    /// Cost per MiB of guest memory, ms.
    pub per_mib_ms: f64,
    /// Cost per MiB/s of dirty rate, ms.
    pub per_dirty_mib_s_ms: f64,
    /// Runs the fit used.
    pub runs: usize,
    /// Median absolute error of the fit over those runs, ms.
    pub median_error_ms: f64,
}

impl CostModel {
    /// The model fitted to `bench/migrate`'s JSON report.
    pub fn fit(results_json: &str) -> Result<CostModel, CostError> {
        let v: serde_json::Value =
            serde_json::from_str(results_json).map_err(|e| CostError::Malformed { what: "JSON".into(), cause: e.to_string() })?;
        let cells =
            v["cells"].as_array().ok_or_else(|| CostError::Malformed { what: "cells".into(), cause: "missing or not a list".into() })?;
        let mut rows: Vec<([f64; 3], f64)> = Vec::new();
        for c in cells.iter().filter(|c| c["bandwidth"] == "default") {
            let Some(mem) = c["memory_mib"].as_f64() else { continue };
            for r in c["walkabout"]["per_run"].as_array().into_iter().flatten() {
                if r["result"] != "completed" {
                    continue;
                }
                let (Some(total), Some(dirty)) = (r["total_ms"].as_f64(), r["dirty_rate_bps"].as_f64()) else { continue };
                rows.push(([1.0, mem, dirty / (1024.0 * 1024.0)], total));
            }
        }
        let beta = least_squares(&rows).ok_or(CostError::TooFew(rows.len()))?;
        let mut errors: Vec<f64> = rows.iter().map(|(x, y)| (dot(&beta, x) - y).abs()).collect();
        errors.sort_by(f64::total_cmp);
        let model = CostModel {
            setup_ms: beta[0].max(0.0),
            per_mib_ms: beta[1].max(0.0),
            per_dirty_mib_s_ms: beta[2].max(0.0),
            runs: rows.len(),
            median_error_ms: errors.get(errors.len() / 2).copied().unwrap_or(0.0),
        };
        Ok(model)
    }

    /// A model with the given coefficients (tests, or when no results are at hand).
    pub fn new(setup_ms: f64, per_mib_ms: f64, per_dirty_mib_s_ms: f64) -> CostModel {
        CostModel { setup_ms, per_mib_ms, per_dirty_mib_s_ms, runs: 0, median_error_ms: 0.0 }
    }

    /// Predicted time to migrate a guest of `memory_mib` dirtying `dirty_mib_s`: the
    /// fit, with the dirty rate taken at most at the memory per second one pass moves
    /// (beyond it pre-copy does not converge and the policy goes post-copy).
    pub fn migration_ms(&self, memory_mib: u64, dirty_mib_s: f64) -> u64 {
        #[allow(clippy::cast_precision_loss)]
        let mem = memory_mib as f64;
        let pass_mib_s = if self.per_mib_ms > 0.0 { 1000.0 / self.per_mib_ms } else { f64::INFINITY };
        let dirty = dirty_mib_s.clamp(0.0, pass_mib_s);
        let ms = self.setup_ms + self.per_mib_ms * mem + self.per_dirty_mib_s_ms * dirty;
        // Truncation intended: whole milliseconds, at least one.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = ms.max(1.0).round() as u64;
        ms
    }
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Ordinary least squares for three parameters by the normal equations (Cramer's rule).
fn least_squares(rows: &[([f64; 3], f64)]) -> Option<[f64; 3]> {
    if rows.len() < 3 {
        return None;
    }
    let mut a = [[0.0f64; 3]; 3];
    let mut b = [0.0f64; 3];
    for (x, y) in rows {
        for i in 0..3 {
            b[i] += x[i] * y;
            for j in 0..3 {
                a[i][j] += x[i] * x[j];
            }
        }
    }
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(&a);
    if d.abs() < 1e-9 {
        return None;
    }
    let mut out = [0.0; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut m = a;
        for i in 0..3 {
            m[i][k] = b[i];
        }
        *o = det(&m) / d;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(runs: &[(u64, f64, f64)]) -> String {
        let cells: Vec<serde_json::Value> = runs
            .iter()
            .map(|(mem, dirty, total)| {
                serde_json::json!({"bandwidth": "default", "memory_mib": mem,
                    "walkabout": {"per_run": [{"result": "completed", "total_ms": total, "dirty_rate_bps": dirty * 1048576.0}]}})
            })
            .collect();
        serde_json::json!({ "cells": cells }).to_string()
    }

    #[test]
    fn the_fit_recovers_a_linear_cost_exactly() {
        // total = 200 + 1.5 * mem + 20 * dirty
        let runs: Vec<(u64, f64, f64)> = [(512, 0.0), (2048, 0.0), (512, 100.0), (2048, 120.0)]
            .iter()
            .map(|&(m, d)| (m, d, 200.0 + 1.5 * m as f64 + 20.0 * d))
            .collect();

        let model = CostModel::fit(&results(&runs)).expect("fits");

        assert!((model.setup_ms - 200.0).abs() < 1e-6, "{model:?}");
        assert!((model.per_mib_ms - 1.5).abs() < 1e-6, "{model:?}");
        assert!((model.per_dirty_mib_s_ms - 20.0).abs() < 1e-6, "{model:?}");
        assert_eq!(model.migration_ms(1024, 0.0), 1736);
    }

    #[test]
    fn the_checked_in_bench_results_give_a_model_that_grows_with_memory() {
        let text = include_str!("../../../bench/results/migrate.json");

        let model = CostModel::fit(text).expect("fits");

        assert!(model.runs >= 6, "{model:?}");
        assert!(model.migration_ms(4096, 0.0) > model.migration_ms(512, 0.0), "{model:?}");
    }

    #[test]
    fn too_few_runs_are_refused() {
        let e = CostModel::fit(&results(&[(512, 0.0, 700.0)])).expect_err("one run");
        assert_eq!(e.to_string(), "bench results hold 1 usable runs: too few to fit the cost model");
    }
}
