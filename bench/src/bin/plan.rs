//! `bench/plan`: the migration path planner beside the peer (aspiers' migrationpaths).
//!
//! Runs every case of the peer's `random.json` (its own random generator; inputs and
//! the peer's recorded path lengths and times), timing our planner on the same input,
//! then plans one large generated cluster (1,000 hosts x 10,000 VMs at 90% memory
//! fill, the target scrambled by random valid moves) and the 200 generated tight cases
//! of the planner's tests (6-40 hosts, 88-97% fill). Prints one JSON document.
//!
//! Run: `cargo run --release -p walkabout-bench --bin plan`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use walkabout_plan::tight::Rng;
use walkabout_plan::{plan, tight_case, Case, Host, Outcome, TightKind, Vm};

fn peer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/migrationpaths")
}

/// Times `f`, repeating it until at least 20 ms have passed; returns the mean.
fn time<T>(mut f: impl FnMut() -> T) -> (T, f64) {
    let start = Instant::now();
    let mut runs = 0u32;
    let mut out = f();
    runs += 1;
    while start.elapsed() < Duration::from_millis(20) {
        out = f();
        runs += 1;
    }
    (out, start.elapsed().as_secs_f64() / f64::from(runs))
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn input_of(case: &Value) -> Result<Case> {
    let mut out = serde_json::Map::new();
    for k in ["hosts", "vms", "current", "target", "limits"] {
        if let Some(v) = case.get(k) {
            out.insert(k.to_string(), v.clone());
        }
    }
    serde_json::from_value(Value::Object(out)).context("peer case does not parse")
}

fn misplaced(case: &Case) -> usize {
    case.target.iter().filter(|(v, h)| case.current.get(*v).is_some_and(|c| c != *h)).count()
}

fn random_cases() -> Result<(Vec<Value>, Value)> {
    let path = peer_dir().join("random.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("peer data missing: cannot read {} (expected ../shared/peers/migrationpaths beside the repository)", path.display())
    })?;
    let doc: Value = serde_json::from_str(&text)?;
    let Some(cases) = doc["cases"].as_array() else { bail!("{} has no cases", path.display()) };
    let mut rows = Vec::new();
    let (mut ratios, mut ours_t, mut peer_t) = (Vec::new(), Vec::new(), Vec::new());
    let (mut shorter, mut equal, mut longer, mut unsolved) = (0, 0, 0, 0);
    let (mut ours_sum, mut peer_sum, mut lb_sum) = (0u64, 0u64, 0u64);
    for c in cases {
        let case = input_of(c)?;
        let (outcome, secs) = time(|| plan(&case));
        let outcome = outcome.context("peer case rejected")?;
        let peer = &c["peer_result"];
        let peer_count = peer["count"].as_u64();
        let peer_secs = peer["seconds"].as_f64().unwrap_or(f64::NAN);
        let (count, lower, optimal) = match &outcome {
            Outcome::Ok(p) => (Some(p.count as u64), p.lower_bound as u64, p.optimal),
            _ => (None, misplaced(&case) as u64, false),
        };
        match (count, peer_count) {
            (None, _) => unsolved += 1,
            (Some(o), Some(p)) => {
                ours_sum += o;
                peer_sum += p;
                lb_sum += lower;
                match o.cmp(&p) {
                    std::cmp::Ordering::Less => shorter += 1,
                    std::cmp::Ordering::Equal => equal += 1,
                    std::cmp::Ordering::Greater => longer += 1,
                }
            }
            (Some(_), None) => shorter += 1,
        }
        ours_t.push(secs);
        peer_t.push(peer_secs);
        ratios.push(peer_secs / secs);
        rows.push(json!({
            "case": c["name"],
            "hosts": case.hosts.len(),
            "vms": case.vms.len(),
            "misplaced": misplaced(&case),
            "ours": { "count": count, "seconds": secs, "lower_bound": lower, "optimal": optimal },
            "peer": { "status": peer["status"], "count": peer_count, "seconds": peer_secs },
            "speedup": peer_secs / secs,
        }));
    }
    let summary = json!({
        "cases": rows.len(),
        "unsolved": unsolved,
        "vs_peer_count": { "shorter": shorter, "equal": equal, "longer": longer },
        "total_migrations": { "ours": ours_sum, "peer": peer_sum, "lower_bound": lb_sum,
            "note": "over cases the peer solved" },
        "median_seconds": { "ours": median(ours_t.clone()), "peer": median(peer_t) },
        "median_speedup": median(ratios.clone()),
        "min_speedup": ratios.iter().copied().fold(f64::INFINITY, f64::min),
        "slower_than_peer": ratios.iter().filter(|&&r| r < 1.0).count(),
        "max_seconds": { "ours": ours_t.iter().copied().fold(0.0, f64::max) },
    });
    Ok((rows, summary))
}

/// 1,000 hosts of 64 GiB usable, 10 VMs each filling 90%, target by random valid moves.
fn big_case(hosts: usize, per_host: usize, fill: f64, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let usable = 65_536u64;
    let mut case = Case::default();
    let mut sizes = Vec::new();
    let mut home = Vec::new();
    for h in 0..hosts {
        case.hosts.push(Host {
            name: format!("h{h:04}"),
            memory_mib: usable + 1024,
            vcpus: None,
            arch: Some("x86_64".into()),
            guest_archs: None,
            cpu_features: Vec::new(),
            reserved_mib: 1024,
        });
        let weights: Vec<u64> = (0..per_host).map(|_| 1 + rng.below(4)).collect();
        let total: u64 = weights.iter().sum();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let budget = (usable as f64 * fill) as u64;
        for w in weights {
            sizes.push(budget * w / total);
            home.push(h);
        }
    }
    let mut load = vec![0u64; hosts];
    for (v, &s) in sizes.iter().enumerate() {
        load[home[v]] += s;
    }
    let mut target = home.clone();
    let moves = sizes.len();
    for _ in 0..moves {
        let v = rng.below(sizes.len() as u64) as usize;
        let h = rng.below(hosts as u64) as usize;
        if h != target[v] && load[h] + sizes[v] <= usable {
            load[target[v]] -= sizes[v];
            load[h] += sizes[v];
            target[v] = h;
        }
    }
    for (v, &s) in sizes.iter().enumerate() {
        let name = format!("vm{v:05}");
        case.vms.push(Vm { name: name.clone(), memory_mib: s, vcpus: None, arch: Some("x86_64".into()), cpu_features: Vec::new() });
        case.current.insert(name.clone(), case.hosts[home[v]].name.clone());
        case.target.insert(name, case.hosts[target[v]].name.clone());
    }
    case
}

fn big() -> Result<Value> {
    let case = big_case(1000, 10, 0.9, 7);
    let start = Instant::now();
    let outcome = plan(&case).context("big case rejected")?;
    let secs = start.elapsed().as_secs_f64();
    let mut out = json!({
        "hosts": case.hosts.len(),
        "vms": case.vms.len(),
        "fill": 0.9,
        "misplaced": misplaced(&case),
        "seconds": secs,
        "goal_seconds": 2.0,
    });
    match outcome {
        Outcome::Ok(p) => {
            out["status"] = json!("ok");
            out["count"] = json!(p.count);
            out["lower_bound"] = json!(p.lower_bound);
            out["waves"] = json!(p.waves);
            out["temporary"] = json!(p.count - misplaced(&case));
        }
        Outcome::Impossible(i) | Outcome::Unsolved(i) => {
            out["status"] = json!("no plan");
            out["reason"] = json!(i.reason);
        }
    }
    Ok(out)
}

/// The planner tests' 200 tight cases: how many planned, proven impossible, unsolved.
fn tight() -> Result<Value> {
    let (mut ok, mut impossible, mut unsolved, mut wrong) = (0, 0, 0, 0);
    let mut times = Vec::new();
    for seed in 0..200 {
        let t = tight_case(seed);
        let (outcome, secs) = time(|| plan(&t.case));
        times.push(secs);
        let planned = match outcome.context("tight case rejected")? {
            Outcome::Ok(_) => {
                ok += 1;
                true
            }
            Outcome::Impossible(_) => {
                impossible += 1;
                false
            }
            Outcome::Unsolved(_) => {
                unsolved += 1;
                false
            }
        };
        // A plan for a case built without one, or none for a reachable one.
        if planned != (t.kind == TightKind::Reachable) {
            wrong += 1;
        }
    }
    Ok(json!({
        "cases": 200,
        "ok": ok,
        "impossible": impossible,
        "unsolved": unsolved,
        "disagree_with_construction": wrong,
        "median_seconds": median(times.clone()),
        "max_seconds": times.iter().copied().fold(0.0, f64::max),
    }))
}

fn main() -> Result<()> {
    let (rows, summary) = random_cases()?;
    let big = big()?;
    let tight = tight()?;
    let doc = json!({
        "bench": "plan",
        "peer": "aspiers/migrationpaths (recorded on a 2-core machine of this class)",
        "random": rows,
        "summary": summary,
        "large": big,
        "tight": tight,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
