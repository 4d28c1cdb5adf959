//! CPU models: which features a model has, so a VM is only sent to a host that can run
//! every feature its CPU model exposes.

use crate::{Qmp, QmpError};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// The CPU features (flags set to true) of `model` as this QEMU and accelerator expand
/// it (`query-cpu-model-expansion`, type `full`).
pub async fn features(qmp: &Qmp, model: &str) -> Result<BTreeSet<String>, QmpError> {
    let v = qmp
        .execute_raw("query-cpu-model-expansion", Some(json!({"type": "full", "model": {"name": model}})))
        .await?;
    Ok(true_flags(&v["model"]["props"]))
}

fn true_flags(props: &Value) -> BTreeSet<String> {
    props
        .as_object()
        .map(|m| m.iter().filter(|(_, v)| v.as_bool() == Some(true)).map(|(k, _)| k.clone()).collect())
        .unwrap_or_default()
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

    #[test]
    fn missing_lists_what_the_host_lacks() {
        let need: BTreeSet<String> = ["sse4.1", "avx512f"].iter().map(|s| s.to_string()).collect();
        let have: BTreeSet<String> = ["sse4.1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(missing(&need, &have), vec!["avx512f".to_string()]);
    }
}
