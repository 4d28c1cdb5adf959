//! CPU models: which features a model has, so a VM is only sent to a host that can run
//! every feature its CPU model exposes, and the cluster baseline (like vMotion's EVC):
//! the most capable named model every host can run.

use crate::{Accel, QemuError, Qmp, QmpError};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the probe's QEMU may take to start and to answer each query: seconds on a
/// host, tens of seconds for an agent inside a TCG guest (nested VMs).
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

pub use walkabout_api::CpuCatalog;

/// Asks a throwaway QEMU (`-machine none`, as libvirt probes) for its CPU catalog under
/// `accel`, with `ceiling` as the host's most capable model. `work_dir` holds its socket.
pub async fn catalog(binary: &str, accel: Accel, ceiling: &str, work_dir: &Path) -> Result<CpuCatalog, QemuError> {
    std::fs::create_dir_all(work_dir).map_err(|e| QemuError::io(format!("creating {}", work_dir.display()), e))?;
    let sock = work_dir.join("cpu-probe.qmp");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(["-machine", "none", "-accel", &accel.to_string(), "-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    // `kill_on_drop` covers a probe abandoned in-process; an agent killed mid-probe (the
    // probe takes seconds under TCG) must not leave it behind waiting on QMP forever.
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| QemuError::io(format!("running {binary} to probe CPU models"), e))?;
    let start = Instant::now();
    let qmp = loop {
        match Qmp::connect(&sock, PROBE_TIMEOUT).await {
            Ok(q) => break q,
            Err(e) if start.elapsed() > PROBE_TIMEOUT => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let defs = qmp.execute_raw("query-cpu-definitions", None).await?;
    let mut models = BTreeMap::new();
    for d in defs.as_array().map(Vec::as_slice).unwrap_or_default() {
        let Some(name) = d["name"].as_str() else { continue };
        if d["deprecated"].as_bool() == Some(true) || matches!(name, "max" | "host" | "base") {
            continue;
        }
        models.insert(name.to_string(), features(&qmp, name).await?);
    }
    let ceiling_features = features(&qmp, ceiling).await?;
    let _ = qmp.quit().await;
    let _ = child.kill().await;
    Ok(CpuCatalog { ceiling: ceiling.to_string(), ceiling_features, models })
}

/// The cluster baseline: the named model with the most features that every host's
/// ceiling includes, and the features all hosts share. `None` if no model fits.
pub fn baseline(hosts: &[CpuCatalog]) -> Option<(String, BTreeSet<String>)> {
    let first = hosts.first()?;
    let common: BTreeSet<String> =
        hosts.iter().skip(1).fold(first.ceiling_features.clone(), |acc, h| acc.intersection(&h.ceiling_features).cloned().collect());
    // A model counts only if every host knows it by that name.
    first
        .models
        .iter()
        .filter(|(name, f)| f.is_subset(&common) && hosts.iter().all(|h| h.models.contains_key(*name)))
        .max_by(|(an, af), (bn, bf)| af.len().cmp(&bf.len()).then_with(|| bn.cmp(an)))
        .map(|(name, _)| (name.clone(), common))
}

/// The CPU features (flags set to true) of `model` as this QEMU and accelerator expand
/// it (`query-cpu-model-expansion`, type `full`).
pub async fn features(qmp: &Qmp, model: &str) -> Result<BTreeSet<String>, QmpError> {
    let v = qmp.execute_raw("query-cpu-model-expansion", Some(json!({"type": "full", "model": {"name": model}}))).await?;
    Ok(true_flags(&v["model"]["props"]))
}

fn true_flags(props: &Value) -> BTreeSet<String> {
    props.as_object().map(|m| m.iter().filter(|(_, v)| v.as_bool() == Some(true)).map(|(k, _)| k.clone()).collect()).unwrap_or_default()
}

/// Features in `needed` that `offered` lacks.
pub fn missing(needed: &BTreeSet<String>, offered: &BTreeSet<String>) -> Vec<String> {
    needed.difference(offered).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_true_boolean_props_are_features() {
        let f = true_flags(&json!({"sse4.1": true, "avx": false, "family": 6, "model-id": "x"}));
        assert_eq!(f.into_iter().collect::<Vec<_>>(), vec!["sse4.1".to_string()]);
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn baseline_is_the_richest_model_every_host_can_run() {
        let models: BTreeMap<String, BTreeSet<String>> = [
            ("old".to_string(), set(&["sse2"])),
            ("mid".to_string(), set(&["sse2", "sse4.1"])),
            ("new".to_string(), set(&["sse2", "sse4.1", "avx512f"])),
        ]
        .into_iter()
        .collect();
        let big = CpuCatalog { ceiling: "max".into(), ceiling_features: set(&["sse2", "sse4.1", "avx512f"]), models: models.clone() };
        let small = CpuCatalog { ceiling: "max".into(), ceiling_features: set(&["sse2", "sse4.1"]), models };
        let (name, common) = baseline(&[big.clone(), small]).expect("a baseline");
        assert_eq!(name, "mid");
        assert_eq!(common, set(&["sse2", "sse4.1"]));
        assert_eq!(baseline(&[big]).map(|b| b.0), Some("new".to_string()));
    }

    #[test]
    fn missing_lists_what_the_host_lacks() {
        let need: BTreeSet<String> = ["sse4.1", "avx512f"].iter().map(|s| s.to_string()).collect();
        let have: BTreeSet<String> = ["sse4.1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(missing(&need, &have), vec!["avx512f".to_string()]);
    }
}
