//! Checkpoint benchmark (issue 10), two parts in one JSON document.
//!
//! **cells**: guest pause and bytes per checkpoint. Walkabout's checkpoints (live,
//! background, paused; each shipped to a replica agent) beside QEMU's own ways on the
//! same guest, workload and gap between checkpoints in the same run: `savevm` into the
//! qcow2 (HMP over QMP) and a plain `migrate` to a `file:` (memory only, no disk
//! snapshot). Every pause is QEMU's own STOP -> RESUME event timestamps. Idle and
//! dirtying guests; the first checkpoint of each cell apart (it ships the bases), then
//! medians over the later ones.
//!
//! **failovers**: a controller and 3 agents on loopback, one protected VM (a checkpoint
//! every few seconds); N times: `kill -9` of the agent holding it and of its QEMUs, wait
//! for the controller's failover, check the guest where it runs again (0 corrupt pages,
//! heartbeat past the checkpoint's sequence), restart the killed agent so it rejoins,
//! wait for the VM's protection to ship again, repeat. RPO and RTO (median, max).
//!
//! `cargo run -p walkabout-bench --bin checkpoint -- --out bench/results/checkpoint.json`
//! (`--help` for the options). The document is rewritten after every cell and failover
//! so a cut run keeps what it measured (`"complete": false`); `--only cells|failovers`
//! keeps the other part from an existing `--out` file.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use walkabout_api::{
    AgentClient, Checkpoint, CheckpointMethod, CheckpointRequest, ClientOptions, ControllerClient, FailoverResult, FileKind, HostStatus,
    ProtectVm,
};
use walkabout_bench::{environment, guest_image, ratio, round3, stats, walkabout_copy, AgentCli};
use walkabout_qemu::qmp::Event;
use walkabout_testbed::{Agent, AgentSpec, Controller, ControllerSpec, TempDir};

/// Checkpoints beside QEMU's own ways, and failovers; one JSON document.
#[derive(clap::Parser)]
#[command(name = "checkpoint")]
struct Cli {
    /// Also write the document to FILE after every cell and failover.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// One part only (the other kept from an existing --out file).
    #[arg(long, value_parser = ["cells", "failovers"])]
    only: Option<String>,
    /// Later checkpoints per cell.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Guest memory of the cells, MiB.
    #[arg(long, value_name = "MiB", default_value_t = 384)]
    memory: u64,
    /// The cells' workloads, separated by ';'.
    #[arg(long, default_value = "idle;dirty:64:32")]
    workloads: String,
    /// Seconds between two checkpoints of a cell.
    #[arg(long, value_name = "S", default_value_t = 3.0)]
    gap_s: f64,
    /// Walkabout's checkpoint methods measured, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_method, default_value = "background,live,paused")]
    methods: Vec<CheckpointMethod>,
    /// Failovers measured.
    #[arg(long, default_value_t = 20)]
    failovers: usize,
    /// The controller's fence time.
    #[arg(long, default_value = "5s")]
    fence_time: String,
    /// The protected VM's checkpoint interval, ms.
    #[arg(long, default_value_t = 3_000)]
    every_ms: u64,
    /// When the host is killed: at a random moment, or right after a checkpoint's commit.
    #[arg(long, value_parser = ["random", "commit"], default_value = "random")]
    kill_at: String,
    /// The failover VM's memory, MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    fo_memory: u64,
    /// The failover VM's workload.
    #[arg(long, default_value = "dirty:32:8")]
    fo_workload: String,
    /// Bench this walkabout binary.
    #[arg(long, value_name = "PATH")]
    walkabout: Option<PathBuf>,
    /// Bench target/release/walkabout as it is (no cargo build first).
    #[arg(long)]
    no_build: bool,
}

fn parse_method(m: &str) -> Result<CheckpointMethod, String> {
    match m {
        "background" => Ok(CheckpointMethod::Background),
        "live" => Ok(CheckpointMethod::Live),
        "paused" => Ok(CheckpointMethod::Paused),
        other => Err(format!("--methods background,live,paused, not {other}")),
    }
}

struct Opts {
    out: Option<PathBuf>,
    only: Option<String>,
    runs: usize,
    memory: u64,
    workloads: Vec<String>,
    gap: Duration,
    failovers: usize,
    fence: String,
    every_ms: u64,
    fo_memory: u64,
    fo_workload: String,
    bin: Option<PathBuf>,
    build: bool,
    kill_at_random: bool,
    methods: Vec<CheckpointMethod>,
}

fn parse() -> Result<Option<Opts>> {
    let c = <Cli as clap::Parser>::parse();
    Ok(Some(Opts {
        out: c.out,
        only: c.only,
        runs: c.runs,
        memory: c.memory,
        workloads: c.workloads.split(';').map(str::to_string).collect(),
        gap: Duration::from_secs_f64(c.gap_s),
        failovers: c.failovers,
        fence: c.fence_time,
        every_ms: c.every_ms,
        fo_memory: c.fo_memory,
        fo_workload: c.fo_workload,
        bin: c.walkabout,
        build: !c.no_build,
        kill_at_random: c.kill_at == "random",
        methods: c.methods,
    }))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string()
}

/// The document being built; written to `--out` (if given) after every step.
struct Doc {
    v: Value,
    out: Option<PathBuf>,
}

impl Doc {
    fn save(&self) -> Result<()> {
        if let Some(p) = &self.out {
            let text = serde_json::to_string_pretty(&self.v)?;
            std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let Some(o) = parse()? else { return Ok(()) };
    let wbin = match &o.bin {
        Some(p) => walkabout_copy(p, false)?,
        None => walkabout_bench::build_walkabout(o.build)?,
    };
    let mut env = environment();
    env["git_head"] = json!(wbin.provenance["git_head_when_benched"].clone());
    env["walkabout_binary"] = wbin.provenance.clone();
    guest_image(&wbin.path)?;
    // Keep the part not run from an earlier document.
    let old: Value =
        o.out.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null);
    let mut doc = Doc { v: json!({"bench": "checkpoint", "complete": false, "environment": env, "notes": notes(&o)}), out: o.out.clone() };
    let run_cells = o.only.as_deref() != Some("failovers");
    let run_failovers = o.only.as_deref() != Some("cells");
    if !run_cells {
        doc.v["cells"] = old["cells"].clone();
        doc.v["environment_cells"] = old["environment_cells"].clone().or_env(&old);
    }
    if !run_failovers {
        doc.v["failovers"] = old["failovers"].clone();
        doc.v["environment_failovers"] = old["environment_failovers"].clone().or_env(&old);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if run_cells {
        doc.v["environment_cells"] = doc.v["environment"].clone();
        rt.block_on(cells(&o, &wbin.path, &mut doc))?;
        doc.v["environment_cells"]["loadavg_at_end"] = json!(loadavg());
    }
    if run_failovers {
        doc.v["environment_failovers"] = doc.v["environment"].clone();
        doc.v["environment_failovers"]["loadavg_at_start"] = json!(loadavg());
        rt.block_on(failovers(&o, &wbin.path, &mut doc))?;
        doc.v["environment_failovers"]["loadavg_at_end"] = json!(loadavg());
    }
    doc.v["environment"]["loadavg_at_end"] = json!(loadavg());
    doc.v["complete"] = json!(true);
    doc.save()?;
    println!("{}", serde_json::to_string_pretty(&doc.v)?);
    Ok(())
}

trait OrEnv {
    fn or_env(self, old: &Value) -> Value;
}

impl OrEnv for Value {
    /// `self`, or the old document's `environment` when `self` is null.
    fn or_env(self, old: &Value) -> Value {
        if self.is_null() {
            old["environment"].clone()
        } else {
            self
        }
    }
}

fn notes(o: &Opts) -> Value {
    json!([
        "pause_ms: the guest's vCPUs stopped, from QEMU's own STOP and RESUME QMP event timestamps, on both sides (Walkabout reports them in the checkpoint; the bench reads them itself from the peer's QEMU).",
        format!("cells: {} MiB, 1 vCPU, TCG, booting a qcow2 overlay of the guest image as its root disk; per cell one VM, a first checkpoint, then {} more, {} s apart (after the previous one ended). Medians are over the later ones; the first is reported apart (it ships the bases).", o.memory, o.runs, o.gap.as_secs_f64()),
        "Walkabout live: pre-copy into a mapped-ram file while the guest runs, the disk snapshot at the switchover; background: QEMU's background-snapshot (userfaultfd write-protect), the guest resumes once the write-protection is armed; paused: stop, write everything, cont (the reference). Each checkpoint is shipped to a second agent (ship_to) as a production replica would be: shipped_bytes is what went over the wire (the memory file's data or its 64 KiB-chunk delta against the previous, the new disk layer's allocated clusters, bases on the first).",
        "written_bytes (Walkabout): the data bytes (allocated extents) of the checkpoint's memory file plus its new disk layers (the layer holds what the guest wrote since the previous checkpoint; a base is a hard link, not written).",
        "QEMU savevm: HMP savevm into the running VM's qcow2 (an internal snapshot: vmstate + the disk's state, guest stopped throughout); written_bytes = growth of the qcow2's allocated size. Nothing is shipped: QEMU has no way to send only what a replica lacks, so the ratio of bytes compares Walkabout's shipped bytes with what QEMU's way writes (what it would have to copy).",
        "QEMU migrate to a file: plain live migrate (stream format, QEMU's defaults) to file:, no disk snapshot (the disk is not consistent with it unless the disk is copied while stopped); the guest stays stopped from the migration's completion until the bench's cont (QMP, immediately), and that wait is in the pause, as a management tool's cont would be. written_bytes = the file's size.",
        "ratios: Walkabout's median / QEMU's median per cell (below 1: Walkabout pauses less / ships fewer bytes).",
        format!("failovers: controller --fence-time {}; 3 agents on loopback; one VM of {} MiB running {} (memory only, no disk), protected with a checkpoint every {} ms, keep 2; each round kills (SIGKILL) the agent holding the VM and its QEMUs. RPO = the host's last contact - the checkpoint's instant; RTO = last contact -> the restore's answer (the guest is running then), both as the controller reports them (GET /v1/failovers). rto_minus_fence_ms = RTO - fence time - the controller's 1 s margin: what the failover itself costs. The killed agent is restarted (same data directory and port) before the next round, which starts once its host is up and the VM's protection has shipped 2 checkpoints from where it now runs; with --kill-at random (the default) the kill then comes after a random delay within one checkpoint cycle (the gap between those two checkpoints' instants, checkpoint_cycle_ms), so the RPO is what a failure at any instant sees; with --kill-at commit it comes right after the second commit is seen (newest_commit_seen_after_ms: that commit's instant to the bench seeing it), the least RPO: one checkpoint's latency from its instant to its commit on the replica.", o.fence, o.fo_memory, o.fo_workload, o.every_ms),
    ])
}

// ---------------------------------------------------------------------------------------
// cells

fn opts(timeout_s: u64) -> ClientOptions {
    ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(timeout_s) }
}

fn summary(xs: &[f64]) -> Value {
    match stats(xs) {
        Some((m, lo, hi)) => json!({"median": round3(m), "min": lo, "max": hi, "n": xs.len()}),
        None => json!({"median": null, "n": 0}),
    }
}

async fn cells(o: &Opts, bin: &Path, doc: &mut Doc) -> Result<()> {
    let a = walkabout_bench::start_agent(bin)?;
    let b = walkabout_bench::start_agent(bin)?;
    let scratch = TempDir::new("ckbench")?;
    doc.v["cells"] = json!([]);
    for workload in &o.workloads {
        for method in o.methods.iter().copied() {
            let load = loadavg();
            let mut cell = match walkabout_cell(o, &a, &b, method, workload).await {
                Ok(c) => c,
                Err(e) => json!({"who": "walkabout", "method": method.to_string(), "workload": workload, "error": format!("{e:#}")}),
            };
            cell["loadavg_at_start"] = json!(load);
            push_cell(doc, cell)?;
        }
        let load = loadavg();
        let mut cell = match qemu_cell(o, scratch.path(), workload).await {
            Ok(c) => c,
            Err(e) => json!({"who": "qemu", "workload": workload, "error": format!("{e:#}")}),
        };
        cell["loadavg_at_start"] = json!(load);
        push_cell(doc, cell)?;
    }
    Ok(())
}

fn push_cell(doc: &mut Doc, cell: Value) -> Result<()> {
    eprintln!("cell: {}", serde_json::to_string(&cell)?);
    if let Some(cells) = doc.v["cells"].as_array_mut() {
        cells.push(cell);
    }
    doc.v["compare"] = compare(&doc.v["cells"]);
    doc.save()
}

/// Ratios Walkabout / QEMU per workload and method, over the medians of later checkpoints.
fn compare(cells: &Value) -> Value {
    let mut out = vec![];
    let empty = vec![];
    let cells = cells.as_array().unwrap_or(&empty);
    for q in cells.iter().filter(|c| c["who"] == "qemu") {
        let w = &q["workload"];
        for c in cells.iter().filter(|c| c["who"] == "walkabout" && c["workload"] == *w) {
            let m = |v: &Value, k: &str| v["later"][k]["median"].as_f64();
            let sv = &q["savevm"];
            let mf = &q["migrate_to_file"];
            out.push(json!({
                "workload": w, "method": c["method"],
                "pause_ms": {"walkabout": m(c, "pause_ms"), "savevm": m(sv, "pause_ms"), "migrate_to_file": m(mf, "pause_ms"),
                    "ratio_vs_savevm": ratio(m(c, "pause_ms"), m(sv, "pause_ms")),
                    "ratio_vs_migrate_to_file": ratio(m(c, "pause_ms"), m(mf, "pause_ms"))},
                "bytes": {"walkabout_shipped": m(c, "shipped_bytes"), "walkabout_written": m(c, "written_bytes"),
                    "savevm_written": m(sv, "written_bytes"), "migrate_to_file_written": m(mf, "written_bytes"),
                    "shipped_ratio_vs_savevm": ratio(m(c, "shipped_bytes"), m(sv, "written_bytes")),
                    "shipped_ratio_vs_migrate_to_file": ratio(m(c, "shipped_bytes"), m(mf, "written_bytes"))},
                "first_checkpoint": {"walkabout_shipped_bytes": c["first"]["shipped_bytes"], "walkabout_pause_ms": c["first"]["pause_ms"],
                    "savevm_written_bytes": sv["first"]["written_bytes"], "migrate_to_file_written_bytes": mf["first"]["written_bytes"]},
            }));
        }
    }
    Value::Array(out)
}

/// One VM checkpointed by `method` (1 + `runs` times), each shipped to `b`.
async fn walkabout_cell(o: &Opts, a: &Agent, b: &Agent, method: CheckpointMethod, workload: &str) -> Result<Value> {
    let vm = format!("b-{method}-{}", workload.split(':').next().unwrap_or("w"));
    let _: Value =
        a.cli(&["vm", "create", "--name", &vm, "--memory", &format!("{}M", o.memory), "--disk", "image:guest", "--workload", workload])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = AgentClient::new(&a.url, opts(600))?;
    let mut per_run = vec![];
    let mut error: Option<Value> = None;
    for i in 0..=o.runs {
        let req = CheckpointRequest { method: Some(method), ship_to: Some(b.url.clone()) };
        let t = Instant::now();
        let ck: Checkpoint = match client.checkpoint(&vm, &req).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{method} {workload}: {e}");
                error = Some(json!({"error": e.to_string(), "agent_log_tail": tail(&a.log(), 40), "replica_log_tail": tail(&b.log(), 20)}));
                break;
            }
        };
        let wall_ms = t.elapsed().as_millis() as u64;
        let mem = ck.files.iter().filter(|f| f.kind == FileKind::Memory).map(|f| f.data_bytes).sum::<u64>();
        let mem_logical = ck.files.iter().filter(|f| f.kind == FileKind::Memory).map(|f| f.bytes).sum::<u64>();
        let layers = ck.files.iter().filter(|f| f.kind == FileKind::Layer).map(|f| f.data_bytes).sum::<u64>();
        let bases = ck.files.iter().filter(|f| f.kind == FileKind::Base).map(|f| f.data_bytes).sum::<u64>();
        let run = json!({"i": i, "id": ck.id, "pause_ms": ck.pause_ms, "total_ms": ck.total_ms, "wall_ms": wall_ms,
            "shipped_bytes": ck.shipped_bytes, "written_bytes": mem + layers, "memory_data_bytes": mem,
            "memory_logical_bytes": mem_logical, "layer_data_bytes": layers, "base_data_bytes": bases, "heartbeat_seq": ck.guest.last_seq});
        eprintln!("walkabout {method} {workload} #{i}: {run}");
        per_run.push(run);
        tokio::time::sleep(o.gap).await;
    }
    let info: walkabout_api::VmInfo = a.cli(&["vm", "info", &vm])?;
    a.cli_ok(&["vm", "delete", &vm])?;
    for c in client.checkpoints().await.unwrap_or_default().iter().filter(|c| c.vm == vm) {
        let _ = client.delete_checkpoint(&c.id).await;
    }
    let _ = AgentClient::new(&b.url, opts(60))?.delete_replica(&vm).await;
    let later: Vec<&Value> = per_run.iter().skip(1).collect();
    let col = |k: &str| later.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<f64>>();
    Ok(json!({"who": "walkabout", "method": method.to_string(), "workload": workload, "error": error,
        "first": per_run.first(),
        "later": {"pause_ms": summary(&col("pause_ms")), "shipped_bytes": summary(&col("shipped_bytes")),
            "written_bytes": summary(&col("written_bytes")), "memory_data_bytes": summary(&col("memory_data_bytes")),
            "layer_data_bytes": summary(&col("layer_data_bytes")), "total_ms": summary(&col("total_ms"))},
        "guest_after": {"heartbeats": info.guest.heartbeats, "seq_breaks": info.guest.seq_breaks,
            "corrupt_pages": info.guest.corrupt_pages, "corrupt_blocks": info.guest.corrupt_blocks},
        "per_run": per_run}))
}

/// A QMP event's timestamp, µs since the epoch.
fn event_us(ev: &Event) -> Option<u64> {
    Some(ev.timestamp["seconds"].as_u64()? * 1_000_000 + ev.timestamp["microseconds"].as_u64()?)
}

/// Waits (up to `limit`) for a RESUME after a STOP among `rx`'s events; the pause, ms.
async fn pause_from_events(rx: &mut tokio::sync::broadcast::Receiver<Event>, limit: Duration) -> Result<f64> {
    let deadline = Instant::now() + limit;
    let mut stop = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(ev)) => ev,
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(e)) => bail!("QMP events ended: {e}"),
            Err(_) => bail!("no STOP then RESUME within {} s (STOP seen: {})", limit.as_secs(), stop.is_some()),
        };
        match (ev.event.as_str(), stop) {
            ("STOP", None) => stop = event_us(&ev),
            ("RESUME", Some(s)) => {
                let r = event_us(&ev).context("RESUME without a timestamp")?;
                return Ok(r.saturating_sub(s) as f64 / 1000.0);
            }
            _ => {}
        }
    }
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// QEMU's own ways on a QEMU the bench starts itself with Walkabout's guest: `savevm`
/// (HMP) into the qcow2 and a plain live `migrate` to a file, alternating, 1 + `runs`
/// of each.
async fn qemu_cell(o: &Opts, scratch: &Path, workload: &str) -> Result<Value> {
    let img = walkabout_image::build(&walkabout_image::default_cache_dir())?;
    let w: walkabout_guest::workload::Workload = workload.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let run_dir = scratch.join(format!("peer-{}", workload.split(':').next().unwrap_or("w")));
    std::fs::create_dir_all(&run_dir)?;
    let disk = run_dir.join("root.qcow2");
    let qimg = walkabout_qemu::img::QemuImg::default();
    qimg.create(&disk, walkabout_api::DiskFormat::Qcow2, None, Some((&img.rootfs, walkabout_api::DiskFormat::Qcow2))).await?;
    let cfg = walkabout_qemu::QemuConfig {
        binary: "qemu-system-x86_64".into(),
        name: "peer".into(),
        memory_mib: o.memory,
        vcpus: 1,
        cpu_model: "qemu64".into(),
        machine: "q35".into(),
        accel: walkabout_qemu::Accel::Tcg,
        kernel: img.kernel.clone(),
        initrd: Some(img.initrd.clone()),
        cmdline: format!("{} root=/dev/vda", walkabout_image::cmdline(&w)),
        run_dir: run_dir.clone(),
        incoming: None,
        start_paused: false,
        disks: vec![walkabout_qemu::QemuDisk {
            node_name: "disk0".into(),
            path: disk.clone(),
            format: walkabout_api::DiskFormat::Qcow2,
            bus: walkabout_api::DiskBus::VirtioBlk,
        }],
        nics: vec![],
        will_port: false,
    };
    let p = walkabout_qemu::QemuProcess::spawn(&cfg).await?;
    let result = qemu_runs(o, &p, &cfg, &disk, &run_dir, workload).await;
    p.kill(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

async fn qemu_runs(
    o: &Opts,
    p: &walkabout_qemu::QemuProcess,
    cfg: &walkabout_qemu::QemuConfig,
    disk: &Path,
    run_dir: &Path,
    workload: &str,
) -> Result<Value> {
    let qmp = walkabout_qemu::Qmp::connect(&p.qmp_path, Duration::from_secs(10)).await?;
    let start = Instant::now();
    while !std::fs::read_to_string(cfg.console_path()).unwrap_or_default().contains("WALKABOUT READY") {
        if start.elapsed() > Duration::from_secs(180) {
            bail!("the peer's guest was not ready after 180 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut sv, mut mf) = (vec![], vec![]);
    for i in 0..=o.runs {
        // savevm into the qcow2.
        let before = allocated(disk);
        let mut rx = qmp.events();
        let t = Instant::now();
        let args = json!({"command-line": format!("savevm s{i}")});
        let said = qmp.execute_raw_timeout("human-monitor-command", Some(args), Duration::from_secs(600)).await?;
        if let Some(text) = said.as_str().filter(|s| !s.trim().is_empty()) {
            bail!("savevm s{i}: {text}");
        }
        let wall = t.elapsed().as_millis() as u64;
        let pause = pause_from_events(&mut rx, Duration::from_secs(10)).await.context("savevm's STOP/RESUME")?;
        let run = json!({"i": i, "pause_ms": pause, "wall_ms": wall, "written_bytes": allocated(disk).saturating_sub(before)});
        eprintln!("qemu savevm {workload} #{i}: {run}");
        sv.push(run);
        tokio::time::sleep(o.gap).await;

        // A plain live migrate to a file, then cont.
        let file = run_dir.join(format!("m{i}.mig"));
        let mut rx = qmp.events();
        let t = Instant::now();
        let mig = json!({"channels": [{"channel-type": "main", "addr": {"transport": "file", "filename": file, "offset": 0}}]});
        qmp.execute_raw("migrate", Some(mig)).await?;
        let st = loop {
            let st = qmp.execute_raw("query-migrate", None).await?;
            match st["status"].as_str().unwrap_or("") {
                "completed" => break st,
                "failed" => bail!("migrate to file failed: {st}"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        qmp.cont().await?;
        let wall = t.elapsed().as_millis() as u64;
        let pause = pause_from_events(&mut rx, Duration::from_secs(10)).await.context("migrate's STOP/RESUME")?;
        let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let run = json!({"i": i, "pause_ms": pause, "qemu_downtime_ms": st["downtime"], "wall_ms": wall, "written_bytes": len,
            "allocated_bytes": allocated(&file), "transferred_bytes": st["ram"]["transferred"]});
        eprintln!("qemu migrate-to-file {workload} #{i}: {run}");
        mf.push(run);
        let _ = std::fs::remove_file(&file);
        tokio::time::sleep(o.gap).await;
    }
    let _ = qmp.quit().await;
    let part = |runs: &[Value]| {
        let col = |k: &str| runs.iter().skip(1).filter_map(|r| r[k].as_f64()).collect::<Vec<f64>>();
        json!({"first": runs.first(), "later": {"pause_ms": summary(&col("pause_ms")), "written_bytes": summary(&col("written_bytes"))},
            "per_run": runs})
    };
    Ok(json!({"who": "qemu", "workload": workload, "savevm": part(&sv), "migrate_to_file": part(&mf)}))
}

// ---------------------------------------------------------------------------------------
// failovers

/// Parses `5s`, `500ms` or plain milliseconds.
fn parse_ms(s: &str) -> Result<u64> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().context("a duration in ms");
    }
    if let Some(secs) = s.strip_suffix('s') {
        return Ok((secs.parse::<f64>().context("a duration in s")? * 1000.0) as u64);
    }
    s.parse().context("a duration (5s, 500ms)")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Polls `f` every 250 ms until it gives a value, at most `secs`.
async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {secs} s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

const FO_VM: &str = "fo";

async fn failovers(o: &Opts, bin: &Path, doc: &mut Doc) -> Result<()> {
    let fence_ms = parse_ms(&o.fence)?;
    let port = walkabout_testbed::free_ports(3)?;
    let mut agents = vec![];
    for i in 0..3u16 {
        let spec = AgentSpec::new(bin).env("WALKABOUT_LOG", "warn").at(None, &format!("127.0.0.1:{}", port + i));
        agents.push(Agent::start(spec)?);
    }
    let refs: Vec<&Agent> = agents.iter().collect();
    let ctl = Controller::start(ControllerSpec::new(bin, &refs).args(&["--fence-time", &o.fence]))?;
    let cc = ControllerClient::new(&ctl.url, opts(60))?;
    agents[0].cli_ok(&["vm", "create", "--name", FO_VM, "--memory", &format!("{}M", o.fo_memory), "--workload", &o.fo_workload])?;
    let c = &cc;
    wait_for("the controller sees the VM", 60, move || async move { c.vm(FO_VM).await.ok().filter(|v| v.host.is_some()) }).await?;
    let req = ProtectVm { replica: None, every_ms: Some(o.every_ms), keep: Some(2) };
    cc.protect_vm(FO_VM, &req).await.context("protecting the VM")?;
    let kill_at = if o.kill_at_random { "random" } else { "commit" };
    doc.v["failovers"] = json!({"fence_ms": fence_ms, "every_ms": o.every_ms, "kill_at": kill_at, "rounds": [], "summary": null});
    let mut seen: Vec<String> = vec![];
    let mut problems = 0;
    for round in 0..o.failovers {
        let r = failover_round(&cc, &mut agents, round, fence_ms, o.kill_at_random, &mut seen).await;
        let rec = match r {
            Ok(v) => v,
            Err(e) => {
                problems += 1;
                json!({"round": round, "error": format!("{e:#}"), "controller_log_tail": tail(&ctl.log(), 30)})
            }
        };
        eprintln!("failover round {round}: {rec}");
        if let Some(rounds) = doc.v["failovers"]["rounds"].as_array_mut() {
            rounds.push(rec);
        }
        doc.v["failovers"]["summary"] = failover_summary(&doc.v["failovers"]["rounds"], fence_ms);
        doc.save()?;
        if problems >= 3 {
            eprintln!("three rounds failed: stopping the failovers");
            break;
        }
    }
    drop(ctl);
    drop(agents);
    Ok(())
}

fn tail(s: &str, lines: usize) -> Vec<String> {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].iter().map(|l| l.to_string()).collect()
}

async fn failover_round(
    cc: &ControllerClient,
    agents: &mut [Agent],
    round: usize,
    fence_ms: u64,
    kill_at_random: bool,
    seen: &mut Vec<String>,
) -> Result<Value> {
    // Every host up (the one killed last round has rejoined), the VM running and
    // protected, 2 checkpoints shipped from where it runs now.
    let urls: Vec<String> = agents.iter().map(|a| a.url.clone()).collect();
    let urls = &urls;
    wait_for("every host up", 120, move || async move {
        cc.hosts().await.ok().filter(|hs| hs.len() == 3 && hs.iter().all(|h| h.status == HostStatus::Up))
    })
    .await?;
    let since = now_ms();
    let v = wait_for("2 checkpoints shipped from the VM's host", 240, move || async move {
        let v = cc.vm(FO_VM).await.ok()?;
        v.host.as_ref()?;
        let replica = v.protection.as_ref()?.replica.clone();
        let i = host_index(&replica)?;
        let rep = AgentClient::new(urls.get(i)?, opts(10)).ok()?.replica(FO_VM).await.ok()?;
        // Taken after every host was up: from where the VM runs now (a checkpoint's
        // `host` is the machine's hostname, the same for every agent here).
        (rep.checkpoints.iter().filter(|c| c.taken_ms > since).count() >= 2).then_some((v, rep, now_ms()))
    })
    .await?;
    let (v, rep, seen_ms) = v;
    let taken: Vec<u64> = rep.checkpoints.iter().map(|c| c.taken_ms).collect();
    let newest = taken.iter().copied().max().unwrap_or(seen_ms);
    let cycle_ms = match taken.len() {
        n if n >= 2 => taken[n - 1].saturating_sub(taken[n - 2]),
        _ => 0,
    };
    // A failure comes at any instant of the checkpoint cycle, not just after a commit.
    let delay_ms = if kill_at_random && cycle_ms > 0 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        u64::from(nanos) % cycle_ms
    } else {
        0
    };
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let last = v.protection_status.as_ref().and_then(|s| s.last.clone());
    let host = v.host.clone().context("the VM's host")?;
    let replica = v.protection.as_ref().map(|p| p.replica.clone()).unwrap_or_default();
    let hi = host_index(&host).context("the VM's host index")?;
    let before: walkabout_api::VmInfo = agents[hi].cli(&["vm", "info", FO_VM])?;

    // Power cut: the agent, then its QEMUs, SIGKILL.
    let qemus = agents[hi].qemu_pids();
    let killed_ms = now_ms();
    agents[hi].kill();
    for pid in &qemus {
        walkabout_testbed::kill9(*pid);
    }
    let old: &[String] = seen;
    let f = wait_for("the failover ends", 240, move || async move {
        cc.failovers().await.ok()?.into_iter().find(|f| f.vm == FO_VM && !old.contains(&f.id) && f.result != FailoverResult::Fencing)
    })
    .await?;
    seen.push(f.id.clone());
    let mut rec = json!({"round": round, "failover": f.id, "from": host, "replica": replica, "to": f.to, "result": f.result,
        "rpo_ms": f.rpo_ms, "rto_ms": f.rto_ms, "rto_minus_fence_ms": f.rto_ms.map(|r| r as i64 - fence_ms as i64 - 1_000),
        "kill_to_restored_ms": f.finished_ms.map(|t| t as i64 - killed_ms as i64), "lost_ms_before_kill": killed_ms as i64 - f.lost_ms as i64,
        "checkpoint": f.checkpoint, "skipped": f.skipped, "reason": f.reason, "heartbeat_seq_before_kill": before.guest.last_seq,
        "kill_delay_ms": delay_ms, "checkpoint_cycle_ms": cycle_ms, "newest_commit_seen_after_ms": seen_ms.saturating_sub(newest),
        "last_checkpoint_shipped_bytes": last.as_ref().and_then(|c| c.shipped_bytes), "last_checkpoint_pause_ms": last.as_ref().map(|c| c.pause_ms)});
    let restart = agents[hi].restart();
    if f.result != FailoverResult::Restored {
        restart.context("restarting the killed agent")?;
        return Ok(rec);
    }
    // The guest where it runs now: memory verifies, heartbeat past the checkpoint's.
    let to = f.to.clone().context("restored with no host")?;
    let ti = host_index(&to).context("the new host's index")?;
    let cp_seq = match (&f.checkpoint, AgentClient::new(&agents_url(agents, ti), opts(30))?.replica(FO_VM).await) {
        (Some(id), Ok(rep)) => rep.checkpoints.iter().find(|c| c.id == *id).and_then(|c| c.guest.last_seq),
        _ => None,
    };
    let at: &Agent = &agents[ti];
    let first: walkabout_api::VmInfo = at.cli(&["vm", "info", FO_VM])?;
    let base = first.guest.heartbeats;
    let after = wait_for("5 heartbeats after the restore", 60, move || async move {
        let i: walkabout_api::VmInfo = at.cli(&["vm", "info", FO_VM]).ok()?;
        (i.guest.heartbeats >= base + 5).then_some(i)
    })
    .await;
    match after {
        Ok(i) => {
            rec["guest_after"] = json!({"heartbeats": i.guest.heartbeats, "last_seq": i.guest.last_seq, "seq_breaks": i.guest.seq_breaks,
                "corrupt_pages": i.guest.corrupt_pages, "corrupt_blocks": i.guest.corrupt_blocks, "kernel_trouble": i.guest.kernel_trouble});
            rec["checkpoint_seq"] = json!(cp_seq);
            let ok = i.guest.corrupt_pages == 0
                && i.guest.corrupt_blocks == 0
                && !i.guest.kernel_trouble
                && cp_seq.is_some_and(|s| i.guest.last_seq.is_some_and(|l| l > s));
            rec["guest_ok"] = json!(ok);
        }
        Err(e) => {
            rec["guest_ok"] = json!(false);
            rec["guest_error"] = json!(format!("{e:#}"));
        }
    }
    restart.context("restarting the killed agent")?;
    Ok(rec)
}

fn agents_url(agents: &[Agent], i: usize) -> String {
    agents.get(i).map(|a| a.url.clone()).unwrap_or_default()
}

/// `h2` -> 1: the controller names the agents h1, h2, h3 in the order given.
fn host_index(h: &str) -> Option<usize> {
    h.trim_start_matches('h').parse::<usize>().ok().and_then(|n| n.checked_sub(1)).filter(|i| *i < 3)
}

fn failover_summary(rounds: &Value, fence_ms: u64) -> Value {
    let empty = vec![];
    let rounds = rounds.as_array().unwrap_or(&empty);
    let restored: Vec<&Value> = rounds.iter().filter(|r| r["result"] == "restored").collect();
    let col = |k: &str| restored.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<f64>>();
    let st = |k: &str| match stats(&col(k)) {
        Some((m, lo, hi)) => json!({"median": round3(m), "min": lo, "max": hi}),
        None => Value::Null,
    };
    json!({
        "rounds": rounds.len(),
        "restored": restored.len(),
        "guest_ok": restored.iter().filter(|r| r["guest_ok"] == true).count(),
        "failed": rounds.iter().filter(|r| r["result"] != "restored").map(|r| json!({"round": r["round"], "result": r["result"],
            "why": r["reason"].as_str().or(r["error"].as_str())})).collect::<Vec<_>>(),
        "fence_ms": fence_ms,
        "rpo_ms": st("rpo_ms"),
        "rto_ms": st("rto_ms"),
        "rto_minus_fence_ms": st("rto_minus_fence_ms"),
        "kill_to_restored_ms": st("kill_to_restored_ms"),
        "checkpoint_cycle_ms": st("checkpoint_cycle_ms"),
        "newest_commit_seen_after_ms": st("newest_commit_seen_after_ms"),
        "kill_delay_ms": st("kill_delay_ms"),
    })
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_flags_and_defaults_are_those_of_the_hand_parser() {
        Cli::command().debug_assert();
        let d = Cli::try_parse_from(["checkpoint"]).expect("defaults");
        assert_eq!((d.out, d.only, d.runs, d.memory, d.workloads.as_str(), d.gap_s), (None, None, 3, 384, "idle;dirty:64:32", 3.0));
        assert_eq!((d.failovers, d.fence_time.as_str(), d.every_ms, d.kill_at.as_str()), (20, "5s", 3_000, "random"));
        assert_eq!((d.fo_memory, d.fo_workload.as_str(), d.walkabout, d.no_build, d.methods.len()), (256, "dirty:32:8", None, false, 3));
        let args = [
            "checkpoint",
            "--out",
            "o.json",
            "--only",
            "cells",
            "--runs",
            "1",
            "--memory",
            "256",
            "--workloads",
            "idle",
            "--gap-s",
            "0.5",
            "--methods",
            "live",
            "--failovers",
            "2",
            "--fence-time",
            "4s",
            "--every-ms",
            "500",
            "--kill-at",
            "commit",
            "--fo-memory",
            "128",
            "--fo-workload",
            "idle",
            "--walkabout",
            "/bin/true",
            "--no-build",
        ];
        let g = Cli::try_parse_from(args).expect("every flag");
        assert_eq!((g.methods, g.kill_at.as_str(), g.gap_s), (vec![walkabout_api::CheckpointMethod::Live], "commit", 0.5));
        assert!(Cli::try_parse_from(["checkpoint", "--only", "both"]).is_err());
    }
}
