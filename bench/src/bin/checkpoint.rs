//! Checkpoint benchmark: guest pause per checkpoint and bytes shipped per checkpoint,
//! Walkabout's checkpoints (live, background, paused; each shipped to a replica agent)
//! beside QEMU's own ways on the same guest and workload in the same run: `savevm` into
//! the qcow2 (HMP over QMP) and a plain `migrate` to a `file:` (no disk snapshot). Idle
//! and dirtying guests; medians. For memory files it also reports what each encoding
//! would send: whole file, data extents (holes skipped), and a 64 KiB-chunk delta against
//! the previous checkpoint's memory file.
//!
//! `cargo run --release -p walkabout-bench --bin checkpoint [-- --runs 5 --memory 384]`
//! (`--walkabout PATH` benches that binary as it is, e.g. a debug build).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use walkabout_api::{AgentClient, Checkpoint, CheckpointMethod, CheckpointRequest, ClientOptions, FileKind};
use walkabout_bench::{environment, guest_image, median, round3, start_agent, walkabout_copy, AgentCli};
use walkabout_testbed::TempDir;

fn main() -> Result<()> {
    let mut runs = 5usize;
    let mut memory = 384u64;
    let mut bin: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse().context("--runs N")?,
            "--memory" => memory = args.next().context("--memory MiB")?.parse().context("--memory MiB")?,
            "--walkabout" => bin = Some(args.next().context("--walkabout PATH")?.into()),
            "-h" | "--help" => {
                eprintln!("usage: checkpoint [--runs N] [--memory MiB] [--walkabout PATH]   (one JSON document on stdout)");
                return Ok(());
            }
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    let mut env = environment();
    let wbin = match &bin {
        Some(p) => walkabout_copy(p, false)?,
        None => walkabout_bench::build_walkabout(true)?,
    };
    env["walkabout_binary"] = wbin.provenance.clone();
    guest_image(&wbin.path)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let a = start_agent(&wbin.path)?;
    let b = start_agent(&wbin.path)?;
    let scratch = TempDir::new("ckbench")?;
    let dirty = format!("dirty:{}:32", memory / 2);
    let mut results = vec![];
    for workload in ["idle", dirty.as_str()] {
        for method in [CheckpointMethod::Live, CheckpointMethod::Background, CheckpointMethod::Paused] {
            results.push(rt.block_on(walkabout_runs(&a, &b, method, workload, memory, runs))?);
        }
        results.push(rt.block_on(qemu_runs(scratch.path(), workload, memory, runs))?);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"bench": "checkpoint", "environment": env, "runs": runs,
        "memory_mib": memory, "results": results}))?
    );
    Ok(())
}

fn med(xs: &[f64]) -> Option<f64> {
    median(xs).map(round3)
}

/// `runs` checkpoints of one VM by `method`, each shipped to `b`.
async fn walkabout_runs(
    a: &walkabout_testbed::Agent,
    b: &walkabout_testbed::Agent,
    method: CheckpointMethod,
    workload: &str,
    memory: u64,
    runs: usize,
) -> Result<Value> {
    let vm = format!("b-{method}-{}", workload.split(':').next().unwrap_or("w"));
    let _: Value =
        a.cli(&["vm", "create", "--name", &vm, "--memory", &format!("{memory}M"), "--disk", "image:guest", "--workload", workload])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let opts = ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(600) };
    let client = AgentClient::new(&a.url, opts)?;
    let dir = a.data.join("checkpoints").join(&vm);
    let (mut pause, mut shipped, mut whole, mut sparse, mut delta) = (vec![], vec![], vec![], vec![], vec![]);
    let mut prev: Option<PathBuf> = None;
    let mut error = None;
    for i in 0..=runs {
        let req = CheckpointRequest { method: Some(method), ship_to: Some(b.url.clone()) };
        let ck: Checkpoint = match client.checkpoint(&vm, &req).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{method} {workload}: {e}");
                error = Some(e.to_string());
                break;
            }
        };
        let mem = ck.files.iter().find(|f| f.kind == FileKind::Memory).context("memory file")?;
        let path = dir.join(&mem.name);
        // The first checkpoint ships the bases: measured from the second on.
        if i > 0 {
            pause.push(ck.pause_ms as f64);
            shipped.push(ck.shipped_bytes.unwrap_or(0) as f64);
            whole.push(mem.bytes as f64);
            sparse.push(walkabout_agent::checkpoint::files::encode_extents(&path)?.len() as f64);
            if let Some(p) = &prev {
                let hashes = walkabout_agent::checkpoint::files::chunk_hashes(p)?;
                delta.push(walkabout_agent::checkpoint::files::encode_delta(&path, &hashes)?.len() as f64);
            }
        }
        eprintln!("{method} {workload} #{i}: pause {} ms, shipped {:?} bytes", ck.pause_ms, ck.shipped_bytes);
        prev = Some(path);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    a.cli_ok(&["vm", "delete", &vm])?;
    let _ = AgentClient::new(&b.url, opts)?.delete_replica(&vm).await;
    Ok(json!({"who": "walkabout", "method": method.to_string(), "workload": workload, "n": pause.len(), "error": error,
        "pause_ms_median": med(&pause), "pause_ms_max": pause.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
        "shipped_bytes_median": med(&shipped),
        "memory_whole_bytes_median": med(&whole), "memory_sparse_bytes_median": med(&sparse), "memory_delta_bytes_median": med(&delta)}))
}

/// QEMU's own ways on a QEMU the bench starts itself: `savevm` (HMP) into the qcow2
/// and a plain live `migrate` to a file.
async fn qemu_runs(scratch: &Path, workload: &str, memory: u64, runs: usize) -> Result<Value> {
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
        memory_mib: memory,
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
    let qmp = walkabout_qemu::Qmp::connect(&p.qmp_path, Duration::from_secs(10)).await?;
    let start = Instant::now();
    while !std::fs::read_to_string(cfg.console_path()).unwrap_or_default().contains("WALKABOUT READY") {
        if start.elapsed() > Duration::from_secs(180) {
            p.kill(Duration::from_secs(2)).await;
            bail!("the peer's guest was not ready after 180 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let allocated = |p: &Path| -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
    };
    let (mut sv_pause, mut sv_bytes, mut mf_pause, mut mf_bytes) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let before = allocated(&disk);
        let t = Instant::now();
        let args = json!({"command-line": format!("savevm s{i}")});
        qmp.execute_raw_timeout("human-monitor-command", Some(args), Duration::from_secs(600)).await?;
        sv_pause.push(t.elapsed().as_millis() as f64);
        sv_bytes.push(allocated(&disk).saturating_sub(before) as f64);
        tokio::time::sleep(Duration::from_secs(1)).await;

        let file = run_dir.join(format!("m{i}.mig"));
        let mig = json!({"channels": [{"channel-type": "main", "addr": {"transport": "file", "filename": file, "offset": 0}}]});
        qmp.execute_raw("migrate", Some(mig)).await?;
        let downtime = loop {
            let st = qmp.execute_raw("query-migrate", None).await?;
            match st["status"].as_str().unwrap_or("") {
                "completed" => break st["downtime"].as_f64().unwrap_or(0.0),
                "failed" => bail!("migrate to file failed: {st}"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let t = Instant::now();
        qmp.cont().await?;
        // The guest stays stopped from completion until `cont`: QEMU's downtime plus that.
        mf_pause.push(downtime + t.elapsed().as_millis() as f64);
        mf_bytes.push(std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) as f64);
        let _ = std::fs::remove_file(&file);
        eprintln!("qemu {workload} #{i}: savevm {} ms, migrate-to-file downtime {} ms", sv_pause[i], mf_pause[i]);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = qmp.quit().await;
    p.wait_exit(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(json!({"who": "qemu", "workload": workload, "n": runs,
        "savevm": {"pause_ms_median": med(&sv_pause), "qcow2_growth_bytes_median": med(&sv_bytes)},
        "migrate_to_file": {"pause_ms_median": med(&mf_pause), "file_bytes_median": med(&mf_bytes)}}))
}
