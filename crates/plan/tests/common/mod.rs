//! Shared test helpers: the peer's data and an independent plan simulator.
//!
//! The simulator works on the raw JSON of the case and of the plan, not on the
//! planner's types or checks, so a planner bug cannot hide behind its own checker.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use serde_json::Value;

/// `../shared/peers/migrationpaths` relative to the repository root.
pub fn peer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/peers/migrationpaths")
}

/// Loads `cases` of a peer file, failing clearly if the data is missing.
pub fn peer_cases(file: &str) -> Vec<Value> {
    let path = peer_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "peer data missing: cannot read {} ({e}); the conformance tests need \
             ../shared/peers/migrationpaths next to the repository",
            path.display()
        )
    });
    let doc: Value = serde_json::from_str(&text).expect("peer file is JSON");
    doc["cases"].as_array().expect("peer file has cases").clone()
}

/// Just the planner input of a peer case (drops the peer's fields).
pub fn input_of(case: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for k in ["hosts", "vms", "current", "target", "limits", "groups"] {
        if let Some(v) = case.get(k) {
            out.insert(k.to_string(), v.clone());
        }
    }
    Value::Object(out)
}

struct Host {
    mem: u64,
    cpu: Option<u64>,
    archs: Option<Vec<String>>,
    features: HashSet<String>,
}

struct Vm {
    mem: u64,
    cpu: u64,
    arch: Option<String>,
    features: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

fn placement(v: &Value) -> BTreeMap<String, String> {
    v.as_object().map(|m| m.iter().map(|(k, h)| (k.clone(), h.as_str().unwrap_or("").to_string())).collect()).unwrap_or_default()
}

/// Replays `plan` (the planner's JSON output, status ok) on `case` (the input JSON),
/// both one migration at a time in list order and wave by wave, checking capacity on
/// both ends, compatibility, the per-host parallel limit, the totals, and that the
/// final placement is the target.
pub fn simulate(case: &Value, plan: &Value) -> Result<(), String> {
    let hosts: HashMap<String, Host> = case["hosts"]
        .as_array()
        .ok_or("no hosts")?
        .iter()
        .map(|h| {
            let mem = h["memory_mib"].as_u64().unwrap_or(0) - h["reserved_mib"].as_u64().unwrap_or(0);
            let archs = if h.get("guest_archs").is_some_and(|g| !g.is_null()) {
                Some(strings(&h["guest_archs"]))
            } else {
                h["arch"].as_str().map(|a| vec![a.to_string()])
            };
            let host = Host { mem, cpu: h["vcpus"].as_u64(), archs, features: strings(&h["cpu_features"]).into_iter().collect() };
            (h["name"].as_str().unwrap_or("").to_string(), host)
        })
        .collect();
    let vms: HashMap<String, Vm> = case["vms"]
        .as_array()
        .ok_or("no vms")?
        .iter()
        .map(|v| {
            let vm = Vm {
                mem: v["memory_mib"].as_u64().unwrap_or(0),
                cpu: v["vcpus"].as_u64().unwrap_or(0),
                arch: v["arch"].as_str().map(String::from),
                features: strings(&v["cpu_features"]),
            };
            (v["name"].as_str().unwrap_or("").to_string(), vm)
        })
        .collect();
    let target = placement(&case["target"]);
    let limit = case["limits"]["max_parallel_per_host"].as_u64().unwrap_or(1);
    // Shut down what the target does not want, before the first migration.
    let start: BTreeMap<String, String> = placement(&case["current"]).into_iter().filter(|(v, _)| target.contains_key(v)).collect();
    let load_of = |at: &BTreeMap<String, String>| {
        let mut load: HashMap<String, (u64, u64)> = HashMap::new();
        for (v, h) in at {
            let e = load.entry(h.clone()).or_default();
            e.0 += vms[v].mem;
            e.1 += vms[v].cpu;
        }
        load
    };
    let fits = |h: &str, mem: u64, cpu: u64| -> bool {
        let host = &hosts[h];
        mem <= host.mem && host.cpu.is_none_or(|c| cpu <= c)
    };
    let compatible = |vm: &Vm, h: &Host| -> bool {
        let arch_ok = match (&vm.arch, &h.archs) {
            (Some(a), Some(list)) => list.contains(a),
            _ => true,
        };
        arch_ok && vm.features.iter().all(|f| h.features.contains(f))
    };

    let migrations = plan["migrations"].as_array().ok_or("plan has no migrations")?;
    let mut steps = Vec::new();
    for m in migrations {
        let vm = m["vm"].as_str().ok_or("migration without vm")?.to_string();
        let from = m["from"].as_str().ok_or("migration without from")?.to_string();
        let to = m["to"].as_str().ok_or("migration without to")?.to_string();
        let wave = m["wave"].as_u64().ok_or("migration without wave")?;
        if !vms.contains_key(&vm) || !hosts.contains_key(&from) || !hosts.contains_key(&to) {
            return Err(format!("unknown name in {m}"));
        }
        if m["why"].as_str().is_none_or(str::is_empty) {
            return Err(format!("migration without a reason: {m}"));
        }
        steps.push((vm, from, to, wave));
    }

    // One at a time, in list order: the VM is still on its source while it lands.
    let mut at = start.clone();
    let mut load = load_of(&at);
    for (i, (vm, from, to, _)) in steps.iter().enumerate() {
        if at.get(vm) != Some(from) {
            return Err(format!("step {i}: {vm} is not on {from}"));
        }
        if from == to {
            return Err(format!("step {i}: {vm} migrates to its own host"));
        }
        if !compatible(&vms[vm], &hosts[to]) {
            return Err(format!("step {i}: {to} cannot run {vm}"));
        }
        let l = load.get(to).copied().unwrap_or_default();
        if !fits(to, l.0 + vms[vm].mem, l.1 + vms[vm].cpu) {
            return Err(format!("step {i}: {to} overfilled by {vm} (sequential)"));
        }
        load.entry(from.clone()).or_default().0 -= vms[vm].mem;
        load.entry(from.clone()).or_default().1 -= vms[vm].cpu;
        let e = load.entry(to.clone()).or_default();
        e.0 += vms[vm].mem;
        e.1 += vms[vm].cpu;
        at.insert(vm.clone(), to.clone());
    }

    // Wave by wave: sources hold until the wave ends, destinations from its start.
    let waves = plan["waves"].as_u64().ok_or("no waves")?;
    let mut at = start;
    for w in 1..=waves {
        let this: Vec<_> = steps.iter().filter(|s| s.3 == w).collect();
        if this.is_empty() {
            return Err(format!("wave {w} is empty"));
        }
        let mut peak = load_of(&at);
        let mut parts: HashMap<&str, u64> = HashMap::new();
        let mut moving = HashSet::new();
        for (vm, from, to, _) in &this {
            if !moving.insert(vm) {
                return Err(format!("wave {w}: {vm} migrates twice"));
            }
            if at.get(vm) != Some(from) {
                return Err(format!("wave {w}: {vm} is not on {from} when the wave starts"));
            }
            let e = peak.entry(to.clone()).or_default();
            e.0 += vms[vm].mem;
            e.1 += vms[vm].cpu;
            *parts.entry(from).or_default() += 1;
            *parts.entry(to).or_default() += 1;
        }
        for (h, (mem, cpu)) in &peak {
            if !fits(h, *mem, *cpu) {
                return Err(format!("wave {w}: {h} holds {mem} MiB / {cpu} vCPUs at its peak"));
            }
        }
        if let Some((h, n)) = parts.iter().find(|(_, &n)| n > limit) {
            return Err(format!("wave {w}: {h} takes part in {n} migrations (limit {limit})"));
        }
        for (vm, _, to, _) in &this {
            at.insert(vm.clone(), to.clone());
        }
    }
    if steps.iter().any(|s| s.3 == 0 || s.3 > waves) {
        return Err("a migration outside the waves".into());
    }
    for (vm, h) in &at {
        if target.get(vm) != Some(h) {
            return Err(format!("{vm} ends on {h}, target {:?}", target.get(vm)));
        }
    }
    let moved: u64 = steps.iter().map(|s| vms[&s.0].mem).sum();
    if plan["count"].as_u64() != Some(steps.len() as u64) {
        return Err("count differs from the migrations".into());
    }
    if plan["moved_mib"].as_u64() != Some(moved) {
        return Err("moved_mib differs from the migrations".into());
    }
    if plan["lower_bound"].as_u64().is_none_or(|lb| lb > steps.len() as u64) {
        return Err("lower_bound above count".into());
    }
    Ok(())
}

/// Runs the planner on a JSON case and returns its JSON output.
pub fn run(case: &Value) -> Value {
    let case: walkabout_plan::Case = serde_json::from_value(input_of(case)).expect("case parses");
    let outcome = walkabout_plan::plan(&case).expect("case is valid");
    serde_json::to_value(outcome).expect("outcome serialises")
}
