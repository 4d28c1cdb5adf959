//! Storage-migration benchmark: Walkabout's `--storage copy` against the way libvirt's
//! `--copy-storage-all` does it, both in the same run, over the same link between two
//! network namespaces (optionally `tc tbf`-limited), each with a disk of the same size
//! and content.
//!
//! The libvirt way, driven here over QMP: the destination QEMU (`-incoming defer`)
//! exports a new image over NBD (`nbd-server-start`, `block-export-add` writable); the
//! source adds an NBD client node and runs `blockdev-mirror sync=full` in the default
//! background copy mode; once the job is READY, a plain `migrate` (QEMU's defaults,
//! bandwidth uncapped as libvirt sets it); after completion `block-job-cancel` on the
//! source, `nbd-server-stop` and `cont` on the destination. Walkabout: `walkabout migrate
//! --storage copy` between two agents (mirror in write-blocking mode first, memory once
//! it is in sync, the gate, the hand-over).
//!
//! Total time runs from the request (Walkabout) or from creating the destination image
//! (the peer) to the guest running at the destination; downtime is QEMU's figure on the
//! source; bytes are memory plus disk (QEMU's mirror job counters). Walkabout's guest is
//! checked after every hop (heartbeats go on, no corrupt page).
//!
//! `cargo run --release -p walkabout-bench --bin storage -- [--disk-mib 1024]
//! [--fill-mib 1024] [--workload 'idle;dirty:32:8,disk:256:64'] [--bandwidth default,100] [--runs 3] [--out FILE]
//! [--no-build] [--peer-tls]`. Needs root (network namespaces). Walkabout's agents in
//! namespaces serve mutual TLS and run QEMU's streams over TLS; `--peer-tls` runs the
//! libvirt way over TLS too (`virsh migrate --tls`), for a like-for-like comparison.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use walkabout_api::{ConsoleChunk, Phase, VmInfo};
use walkabout_bench::{build_walkabout, environment, ratio, round3, stats, walkabout_copy, AgentCli, MigrateSummary};
use walkabout_probe::{echo_target, ProbeOptions, Prober};
use walkabout_testbed::{Agent, AgentSpec, GuestNet, NetPair, TempDir};

/// Walkabout's `--storage copy` against libvirt's way; one JSON document. Needs root.
#[derive(clap::Parser)]
#[command(name = "storage")]
struct Cli {
    /// Size of each guest's disk, MiB.
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// How much of it is written before the migrations, MiB (at most --disk-mib).
    #[arg(long, default_value_t = 1024)]
    fill_mib: u64,
    /// Guest workloads, separated by ';' (a workload itself may hold a ',').
    #[arg(long, default_value = "idle")]
    workload: String,
    /// 'default' (uncapped) and/or a cap in MiB/s.
    #[arg(long, default_value = "default,100")]
    bandwidth: String,
    /// Migrations per cell and side.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The peer gives up on a run after this long, s.
    #[arg(long, default_value_t = 300)]
    give_up_s: u64,
    /// Also write the document to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Bench target/release/walkabout as it is (no cargo build first).
    #[arg(long)]
    no_build: bool,
    /// A walkabout binary to bench as it is.
    #[arg(long, value_name = "PATH")]
    walkabout: Option<PathBuf>,
    /// Instead of the comparison, one guest (first --workload) booting from image:guest
    /// with a --disk-mib data disk on a directory both agents see and a NIC on the hosts'
    /// shared segment hops N times with --storage copy, then N times with --storage
    /// shared, one TCP connection probed through all; checked after every hop.
    #[arg(long, value_name = "N")]
    hops: Option<usize>,
    /// The libvirt way over TLS too (libvirt's `--tls`): both its streams (NBD and
    /// migration) under the test CA, as Walkabout's agents in namespaces run theirs.
    #[arg(long)]
    peer_tls: bool,
}

struct Args {
    disk_mib: u64,
    fill_mib: u64,
    workloads: Vec<String>,
    bandwidths: Vec<Option<u64>>,
    runs: usize,
    give_up_s: u64,
    out: Option<PathBuf>,
    build: bool,
    walkabout: Option<PathBuf>,
    hops: Option<usize>,
    peer_tls: bool,
}

fn parse_args() -> Result<Option<Args>> {
    let c = <Cli as clap::Parser>::parse();
    let mut a = Args {
        disk_mib: c.disk_mib,
        fill_mib: c.fill_mib,
        workloads: c.workload.split(';').map(|w| w.trim().to_string()).collect(),
        bandwidths: walkabout_bench::parse_bandwidths(&c.bandwidth)?,
        runs: c.runs,
        give_up_s: c.give_up_s,
        out: c.out,
        build: !c.no_build,
        walkabout: c.walkabout,
        hops: c.hops,
        peer_tls: c.peer_tls,
    };
    a.fill_mib = a.fill_mib.min(a.disk_mib);
    Ok(Some(a))
}

/// The guest both sides boot: Walkabout's image, as `walkabout image build` reports it.
struct Guest {
    kernel: String,
    initrd: String,
    cmdline_idle: String,
}

fn guest(bin: &Path) -> Result<Guest> {
    let out = Command::new(bin).args(["image", "build", "--output", "json"]).env("WALKABOUT_LOG", "warn").output()?;
    if !out.status.success() {
        bail!("walkabout image build failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("image build JSON")?;
    let s = |k: &str| v[k].as_str().map(String::from).with_context(|| format!("image build: no {k}"));
    Ok(Guest { kernel: s("kernel")?, initrd: s("initrd")?, cmdline_idle: s("cmdline")? })
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// MiB at the start of the disk the guest's disk workload (`disk:<MiB>:...`) owns: they
/// must start blank (anything else there is a corrupt block to the workload).
fn workload_area_mib(wl: &str) -> u64 {
    wl.split(',').find_map(|p| p.strip_prefix("disk:")?.split(':').next()?.parse().ok()).unwrap_or(0)
}

/// MiB written past the guest disk workload's area of `wl` (kept blank: the workload
/// takes any other content there for a corrupt block), at most `fill_mib`.
fn written_mib(disk_mib: u64, fill_mib: u64, wl: &str) -> u64 {
    fill_mib.min(disk_mib.saturating_sub(workload_area_mib(wl)))
}

/// A qcow2 of `disk_mib` whose first `skip_mib` stay blank (the guest disk workload's
/// area) and whose next `fill_mib` are written, each 64 MiB with its own pattern.
fn make_disk(path: &Path, disk_mib: u64, fill_mib: u64, skip_mib: u64) -> Result<()> {
    let p = path.to_str().context("utf-8 path")?;
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, &format!("{disk_mib}M")])?;
    let mut off = skip_mib.min(disk_mib);
    let fill_mib = (off + fill_mib).min(disk_mib);
    while off < fill_mib {
        let len = (fill_mib - off).min(64);
        run("qemu-io", &["-f", "qcow2", "-c", &format!("write -P {} {off}M {len}M", 0x40 + off / 64), p])?;
        off += len;
    }
    Ok(())
}

// ---- a minimal synchronous QMP client for the peer ----

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(30) => bail!("QMP {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qmp { reader: BufReader::new(stream.try_clone()?), writer: stream };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting)?;
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn execute(&mut self, command: &str, args: Value) -> Result<Value> {
        writeln!(self.writer, "{}", json!({"execute": command, "arguments": args}))?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("QMP closed during {command}");
            }
            let v: Value = serde_json::from_str(&line).with_context(|| format!("QMP reply to {command}: {line}"))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QEMU refused {command}: {e}");
            }
            return Ok(v["return"].clone());
        }
    }
}

/// One QEMU of the peer, in a network namespace; killed on drop.
struct PeerQemu {
    child: Child,
    qmp: Qmp,
}

impl Drop for PeerQemu {
    fn drop(&mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        std::thread::sleep(Duration::from_millis(100));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peer_qemu(ns: &str, dir: &Path, name: &str, g: &Guest, workload: &str, disk: &Path, incoming: bool) -> Result<PeerQemu> {
    let sock = dir.join(format!("{name}.qmp"));
    let _ = std::fs::remove_file(&sock);
    let cmdline = g.cmdline_idle.replace("walkabout.workload=idle", &format!("walkabout.workload={workload}"));
    let blockdev =
        json!({"node-name": "disk0", "driver": "qcow2", "file": {"driver": "file", "filename": disk, "node-name": "disk0-file"}});
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "qemu-system-x86_64", "-name", name, "-machine", "q35", "-accel", "tcg,tb-size=128"])
        .args(["-cpu", "qemu64", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-kernel", &g.kernel, "-initrd", &g.initrd, "-append", &cmdline])
        .args(["-serial", &format!("file:{}", dir.join(format!("{name}.console")).display())])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", sock.display())])
        .args(["-blockdev", &blockdev.to_string(), "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev"]);
    if incoming {
        cmd.args(["-S", "-incoming", "defer"]);
    }
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("starting the peer's QEMU")?;
    let qmp = Qmp::connect(&sock)?;
    Ok(PeerQemu { child, qmp })
}

fn wait_console(path: &Path, needle: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{} never showed {needle:?}", path.display())
}

/// The libvirt way's TLS (`virsh migrate --tls`): `tls-creds-x509` directories of two
/// host certificates of the testbed's CA, the source's (client) and the destination's
/// (server, valid at its address), as Walkabout's agents in namespaces get theirs.
struct PeerTls {
    src_dir: PathBuf,
    dst_dir: PathBuf,
}

impl PeerTls {
    fn new(net: &NetPair, dir: &Path) -> Result<PeerTls> {
        let ca = walkabout_testbed::TestCa::shared()?;
        let creds = |name: &str, addr: &str| -> Result<PathBuf> {
            let bundle = walkabout_trust::ca::Bundle::load(&ca.host(name, addr)?)?;
            let out = dir.join(format!("{name}-qemu-tls"));
            walkabout_trust::qemu::write_qemu_creds(&bundle, &out)?;
            Ok(out)
        };
        Ok(PeerTls { src_dir: creds("peer-src", &net.addr_a)?, dst_dir: creds("peer-dst", &net.addr_b)? })
    }

    /// Adds the credentials object `tls0` to a QEMU (`endpoint` server or client).
    fn arm(qmp: &mut Qmp, dir: &Path, endpoint: &str) -> Result<()> {
        let creds = json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": dir, "endpoint": endpoint, "verify-peer": true});
        qmp.execute("object-add", creds).map(drop)
    }
}

/// One run the libvirt way (over TLS with `tls`). The source QEMU runs already; returns
/// the run's record.
fn peer_run(src: &mut PeerQemu, net: &NetPair, dir: &Path, g: &Guest, wl: &str, a: &Args, tls: Option<&PeerTls>) -> Result<Value> {
    let (disk_mib, give_up) = (a.disk_mib, Duration::from_secs(a.give_up_s));
    let target = dir.join("peer-target.qcow2");
    let _ = std::fs::remove_file(&target);
    let started = Instant::now();
    run("qemu-img", &["create", "-q", "-f", "qcow2", target.to_str().context("utf-8")?, &format!("{disk_mib}M")])?;
    let result = (|| -> Result<Value> {
        let mut dst = peer_qemu(&net.b, dir, "peer-dst", g, wl, &target, true)?;
        let nbd = json!({"type": "inet", "data": {"host": net.addr_b, "port": "10810"}});
        let server = json!({"type": "inet", "host": net.addr_b, "port": "10810"});
        let mut nbd_server = json!({ "addr": nbd });
        let mut nbd_client = json!({"driver": "nbd", "node-name": "nbd-disk0", "server": server, "export": "disk0"});
        if let Some(t) = tls {
            PeerTls::arm(&mut dst.qmp, &t.dst_dir, "server")?;
            PeerTls::arm(&mut src.qmp, &t.src_dir, "client")?;
            nbd_server["tls-creds"] = json!("tls0");
            nbd_client["tls-creds"] = json!("tls0");
            dst.qmp.execute("migrate-set-parameters", json!({"tls-creds": "tls0"}))?;
            src.qmp.execute("migrate-set-parameters", json!({"tls-creds": "tls0", "tls-hostname": net.addr_b}))?;
        }
        dst.qmp.execute("nbd-server-start", nbd_server)?;
        dst.qmp.execute("block-export-add", json!({"type": "nbd", "id": "e0", "node-name": "disk0", "name": "disk0", "writable": true}))?;
        src.qmp.execute("blockdev-add", nbd_client)?;
        let prepare_ms = started.elapsed().as_millis() as u64;
        src.qmp.execute("blockdev-mirror", json!({"job-id": "m0", "device": "disk0", "target": "nbd-disk0", "sync": "full"}))?;
        let cleanup_src = |src: &mut PeerQemu| {
            let _ = src.qmp.execute("block-job-cancel", json!({"device": "m0", "force": true}));
            std::thread::sleep(Duration::from_millis(300));
            let _ = src.qmp.execute("blockdev-del", json!({"node-name": "nbd-disk0"}));
        };
        let mut disk_bytes = 0;
        loop {
            let jobs = src.qmp.execute("query-block-jobs", json!({}))?;
            let j = jobs.as_array().and_then(|a| a.first()).cloned().unwrap_or_default();
            disk_bytes = j["offset"].as_u64().unwrap_or(disk_bytes);
            if j["ready"] == true {
                break;
            }
            if started.elapsed() > give_up {
                cleanup_src(src);
                return Ok(json!({"result": "gave-up-in-mirror", "ok": false, "disk_bytes": disk_bytes}));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let disk_ms = started.elapsed().as_millis() as u64 - prepare_ms;
        let uri = format!("tcp:{}:4450", net.addr_b);
        dst.qmp.execute("migrate-incoming", json!({ "uri": uri }))?;
        src.qmp.execute("migrate-set-parameters", json!({"max-bandwidth": 0}))?;
        src.qmp.execute("migrate", json!({ "uri": uri }))?;
        let migrating = Instant::now();
        let info = loop {
            let info = src.qmp.execute("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => break info,
                Some("failed" | "cancelled") => {
                    cleanup_src(src);
                    return Ok(json!({"result": info["status"], "ok": false, "reason": info["error-desc"]}));
                }
                _ => {}
            }
            if started.elapsed() > give_up {
                let _ = src.qmp.execute("migrate_cancel", json!({}));
                std::thread::sleep(Duration::from_millis(500));
                cleanup_src(src);
                let _ = src.qmp.execute("cont", json!({}));
                return Ok(json!({"result": "gave-up", "ok": false}));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let memory_ms = migrating.elapsed().as_millis() as u64;
        let jobs = src.qmp.execute("query-block-jobs", json!({}))?;
        disk_bytes = jobs.as_array().and_then(|a| a.first()).and_then(|j| j["offset"].as_u64()).unwrap_or(disk_bytes);
        src.qmp.execute("block-job-cancel", json!({"device": "m0"}))?;
        dst.qmp.execute("nbd-server-stop", json!({}))?;
        dst.qmp.execute("cont", json!({}))?;
        let total_ms = started.elapsed().as_millis() as u64;
        // The guest runs on at the destination.
        let console = dir.join("peer-dst.console");
        let heartbeats = || std::fs::read_to_string(&console).unwrap_or_default().lines().filter(|l| l.starts_with("hb ")).count();
        let seen = heartbeats();
        std::thread::sleep(Duration::from_secs(2));
        let after = heartbeats();
        // `hb <seq> <ns> <corrupt_pages> [<corrupt_blocks>]`: the destination's last word.
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        let last = text.lines().rev().find(|l| l.starts_with("hb ")).unwrap_or("");
        let field = |i: usize| last.split_whitespace().nth(i).and_then(|w| w.parse::<u64>().ok()).unwrap_or(0);
        let (corrupt_pages, corrupt_blocks) = (field(3), field(4));
        let ram = info["ram"]["transferred"].as_u64().unwrap_or(0);
        // The source's QEMU is done; the next run starts from a fresh source (see caller).
        let _ = src.qmp.execute("blockdev-del", json!({"node-name": "nbd-disk0"}));
        Ok(json!({
            "result": "completed", "ok": after > seen && corrupt_pages == 0 && corrupt_blocks == 0, "total_ms": total_ms,
            "corrupt_pages": corrupt_pages, "corrupt_blocks": corrupt_blocks,
            "downtime_ms": info["downtime"], "memory_bytes": ram, "disk_bytes": disk_bytes,
            "transferred_bytes": ram + disk_bytes, "heartbeats_after_2s": after - seen,
            "timings": {"prepare_ms": prepare_ms, "disk_ms": disk_ms, "memory_ms": memory_ms},
        }))
    })();
    let _ = std::fs::remove_file(&target);
    result
}

fn peer_cell(net: &NetPair, dir: &Path, g: &Guest, wl: &str, a: &Args) -> Result<Value> {
    let disk = dir.join("peer-src.qcow2");
    make_disk(&disk, a.disk_mib, a.fill_mib, workload_area_mib(wl))?;
    let tls = if a.peer_tls { Some(PeerTls::new(net, dir)?) } else { None };
    let mut runs = vec![];
    for r in 0..a.runs {
        let rec = (|| -> Result<Value> {
            let mut src = peer_qemu(&net.a, dir, "peer-src", g, wl, &disk, false)?;
            wait_console(&dir.join("peer-src.console"), "WALKABOUT READY", Duration::from_secs(300))?;
            std::thread::sleep(Duration::from_secs(2));
            peer_run(&mut src, net, dir, g, wl, a, tls.as_ref())
        })()
        .unwrap_or_else(|e| json!({"result": "error", "ok": false, "error": format!("{e:#}")}));
        eprintln!("    peer run {r}: {rec}");
        runs.push(rec);
    }
    let _ = std::fs::remove_file(&disk);
    Ok(summary(runs))
}

// ---- Walkabout ----

fn agent_in(bin: &Path, ns: &str, addr: &str) -> Result<Agent> {
    Ok(Agent::start(AgentSpec::new(bin).at(Some(ns), &format!("{addr}:7701")).env("WALKABOUT_LOG", "warn"))?)
}

/// `walkabout vm create` with one qcow2 disk (through the CLI, which speaks the agent's
/// TLS as the operators' tools do).
fn create_with_disk(agent: &Agent, name: &str, wl: &str, disk: &Path) -> Result<()> {
    let disk = format!("{},format=qcow2", disk.display());
    agent.cli_ok(&["vm", "create", "--name", name, "--memory", "256M", "--vcpus", "1", "--workload", wl, "--disk", &disk])
}

fn wait_heartbeats(agent: &Agent, name: &str, n: u64, limit: Duration) -> Result<VmInfo> {
    let start = Instant::now();
    loop {
        let v: VmInfo = agent.cli(&["vm", "info", name])?;
        if v.guest.heartbeats >= n || start.elapsed() > limit {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn walkabout_cell(bin: &Path, net: &NetPair, dir: &Path, wl: &str, a: &Args) -> Result<Value> {
    let (ha, hb) = (agent_in(bin, &net.a, &net.addr_a)?, agent_in(bin, &net.b, &net.addr_b)?);
    let disk = dir.join("wa-disk.qcow2");
    make_disk(&disk, a.disk_mib, a.fill_mib, workload_area_mib(wl))?;
    let name = "st1";
    create_with_disk(&ha, name, wl, &disk)?;
    wait_heartbeats(&ha, name, 20, Duration::from_secs(120))?;
    let agents = [&ha, &hb];
    let mut holder = 0;
    let mut runs = vec![];
    for r in 0..a.runs {
        let (from, to) = (agents[holder], agents[1 - holder]);
        let before: VmInfo = from.cli(&["vm", "info", name])?;
        let out = from.command(&["migrate", name, "--to", &to.url, "--storage", "copy", "--wait", "--output", "json"]).output()?;
        let s: Option<MigrateSummary> = serde_json::from_slice(&out.stdout).ok();
        let completed = s.as_ref().is_some_and(|s| s.result == Phase::Completed);
        if completed {
            holder = 1 - holder;
        }
        let now: VmInfo = agents[holder].cli(&["vm", "info", name])?;
        let after = wait_heartbeats(agents[holder], name, now.guest.heartbeats + 10, Duration::from_secs(30))?;
        let healthy = after.guest.heartbeats >= now.guest.heartbeats + 10
            && after.guest.corrupt_pages == 0
            && after.guest.corrupt_blocks == 0
            && after.guest.seq_breaks == before.guest.seq_breaks
            && !after.guest.kernel_trouble;
        let rec = match &s {
            Some(s) => json!({
                "result": s.result.to_string(), "ok": completed && healthy, "reason": s.reason,
                "total_ms": s.total_ms, "downtime_ms": s.downtime_ms, "memory_bytes": s.transferred_bytes,
                "disk_bytes": s.disk_transferred_bytes, "transferred_bytes": s.transferred_bytes + s.disk_transferred_bytes,
                "storage": s.storage, "guest_healthy": healthy, "corrupt_pages": after.guest.corrupt_pages,
                "corrupt_blocks": after.guest.corrupt_blocks, "timings": s.timings,
            }),
            None => json!({"result": "no-summary", "ok": false, "stderr": String::from_utf8_lossy(&out.stderr).trim()}),
        };
        eprintln!("    walkabout run {r}: {rec}");
        runs.push(rec);
    }
    let _ = agents[holder].cli_ok(&["vm", "delete", name]);
    drop((ha, hb));
    let _ = std::fs::remove_file(&disk);
    Ok(summary(runs))
}

/// Issue 9's first must-show in one run: a guest booting from the Walkabout root disk
/// (`image:guest`, an overlay) with a `--disk-mib` data disk (`--fill-mib` written past
/// the workload's area) that its workload dirties (memory and disk), and a NIC on the
/// namespace hosts' shared segment, hops `n` times with `--storage copy`, then `n` times
/// with `--storage shared`. One TCP connection from the root namespace to the guest's
/// echo, a request every 10 ms, stays open through all the hops: per hop the storage
/// mode, disk and memory bytes, QEMU's downtime and the longest reply gap (observed
/// downtime); at the end corrupt pages, corrupt blocks and connection failures (resets,
/// closes, silences: the probe reconnects to go on measuring, and each one counts).
fn hops(bin: &Path, net: &NetPair, dir: &Path, wl: &str, n: usize, a: &Args) -> Result<Value> {
    let id = std::process::id() % 1000;
    let seg =
        GuestNet::new(&format!("wsh{id}"), &format!("10.81.{}", id % 250), &[&net.a, &net.b]).context("guest segment (needs root)")?;
    let (ha, hb) = (agent_in(bin, &net.a, &net.addr_a)?, agent_in(bin, &net.b, &net.addr_b)?);
    let disk = dir.join("hops-disk.qcow2");
    make_disk(&disk, a.disk_mib, a.fill_mib, workload_area_mib(wl))?;
    let name = "hop1";
    let address = seg.guest_address(21);
    let nic = format!("bridge={},address={address}", seg.bridge());
    let data = format!("{},format=qcow2", disk.display());
    let boot = Instant::now();
    ha.cli_ok(&[
        "vm",
        "create",
        "--name",
        name,
        "--memory",
        "256M",
        "--workload",
        wl,
        "--disk",
        "image:guest",
        "--disk",
        &data,
        "--nic",
        &nic,
    ])?;
    wait_disk_workload(&ha, name, Duration::from_secs(300))?;
    let first = wait_heartbeats(&ha, name, 20, Duration::from_secs(120))?;
    if !first.guest.is_healthy() {
        bail!("{name} unhealthy before the first hop: {:?}", first.guest);
    }
    let boot_ms = boot.elapsed().as_millis() as u64;
    let target = echo_target(&address).with_context(|| format!("no echo address in {address}"))?;
    let mut probe = connect_probe(target, Duration::from_secs(120))?;
    let agents = [&ha, &hb];
    let mut holder = 0;
    let mut out = vec![];
    let mut probe_failures = vec![];
    for (i, storage) in std::iter::repeat_n("copy", n).chain(std::iter::repeat_n("shared", n)).enumerate() {
        let (from, to) = (agents[holder], agents[1 - holder]);
        probe.start_window();
        let cmd = from.command(&["migrate", name, "--to", &to.url, "--storage", storage, "--wait", "--output", "json"]).output()?;
        let seen = probe.end_window();
        let s: Option<MigrateSummary> = serde_json::from_slice(&cmd.stdout).ok();
        if s.as_ref().is_some_and(|s| s.result == Phase::Completed) {
            holder = 1 - holder;
        }
        let probe_error = seen.as_ref().err().map(|e| e.to_string());
        if let Some(e) = &probe_error {
            // Count it, and reconnect to go on measuring the remaining hops.
            probe_failures.push(json!({"hop": i, "error": e}));
            probe = connect_probe(target, Duration::from_secs(60))?;
        }
        let now: VmInfo = agents[holder].cli(&["vm", "info", name])?;
        let after = wait_heartbeats(agents[holder], name, now.guest.heartbeats + 10, Duration::from_secs(30))?;
        let g = &after.guest;
        let rec = json!({
            "hop": i, "storage_asked": storage, "result": s.as_ref().map(|s| s.result.to_string()),
            "storage": s.as_ref().and_then(|s| s.storage), "reason": s.as_ref().and_then(|s| s.reason.clone()),
            "total_ms": s.as_ref().and_then(|s| s.total_ms), "downtime_ms": s.as_ref().and_then(|s| s.downtime_ms),
            "observed_downtime_ms": seen.as_ref().ok().map(|w| w.max_gap_ms), "probe_replies": seen.as_ref().ok().map(|w| w.replies),
            "probe_error": probe_error,
            "disk_bytes": s.as_ref().map(|s| s.disk_transferred_bytes), "memory_bytes": s.as_ref().map(|s| s.transferred_bytes),
            "heartbeats": g.heartbeats, "seq_breaks": g.seq_breaks, "corrupt_pages": g.corrupt_pages, "corrupt_blocks": g.corrupt_blocks,
            "healthy": g.is_healthy(),
            "stderr": if s.is_none() { json!(String::from_utf8_lossy(&cmd.stderr).trim()) } else { Value::Null },
        });
        eprintln!("  hop {i}: {rec}");
        out.push(rec);
    }
    let end = probe.end_window().err().or(probe.failure());
    if let Some(e) = end {
        probe_failures.push(json!({"hop": null, "error": e.to_string()}));
    }
    let total_replies = probe.replies();
    drop(probe);
    let _ = agents[holder].cli_ok(&["vm", "delete", name]);
    drop((ha, hb));
    drop(seg);
    let _ = std::fs::remove_file(&disk);
    let completed = |st: &str| out.iter().filter(|r| r["storage_asked"] == st && r["result"] == "completed").count();
    let ms = |st: &str, k: &str| {
        let xs: Vec<f64> = out.iter().filter(|r| r["storage_asked"] == st).filter_map(|r| r[k].as_f64()).collect();
        stats(&xs).map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi}))
    };
    // Observed over QEMU's downtime, per hop, where both are known and QEMU's is not 0.
    let ratios = |st: &str| {
        let xs: Vec<f64> = out
            .iter()
            .filter(|r| r["storage_asked"] == st)
            .filter_map(|r| Some(r["observed_downtime_ms"].as_f64()? / r["downtime_ms"].as_f64().filter(|d| *d > 0.0)?))
            .collect();
        stats(&xs).map(|(m, lo, hi)| json!({"median": round3(m), "min": round3(lo), "max": round3(hi)}))
    };
    let mode = |st: &str| {
        json!({
            "completed": completed(st), "total_ms": ms(st, "total_ms"), "downtime_ms": ms(st, "downtime_ms"),
            "observed_downtime_ms": ms(st, "observed_downtime_ms"), "observed_over_qemu_downtime": ratios(st),
            "disk_bytes": ms(st, "disk_bytes"), "memory_bytes": ms(st, "memory_bytes"),
        })
    };
    Ok(json!({
        "workload": wl, "root_disk": "image:guest (qcow2 overlay on the Walkabout root disk, root=/dev/vda)",
        "disk_mib": a.disk_mib, "written_mib": a.fill_mib, "hops_per_mode": n, "order": "copy, then shared",
        "guest_boot_ms": boot_ms,
        "nic": {"segment": seg_text(&address), "probe": "one TCP connection from the root namespace to the guest's echo, a request every 10 ms, through every hop"},
        "copy": mode("copy"), "shared": mode("shared"),
        "max_observed_downtime_ms": out.iter().filter_map(|r| r["observed_downtime_ms"].as_u64()).max(),
        "corrupt_pages_total": out.iter().filter_map(|r| r["corrupt_pages"].as_u64()).max(),
        "corrupt_blocks_total": out.iter().filter_map(|r| r["corrupt_blocks"].as_u64()).max(),
        "connection_failures": probe_failures.len(), "connection_failure_detail": probe_failures,
        "probe_replies_total": total_replies,
        "all_healthy": out.iter().all(|r| r["healthy"] == true),
        "per_hop": out,
    }))
}

fn seg_text(address: &str) -> String {
    format!("guest at {address} on a bridge of one name in each host namespace, joined by veth pairs to one in the root namespace")
}

/// Waits until the guest's disk workload has found its data disk and written it once
/// (`disk dev=/dev/vdb ...` on its console).
fn wait_disk_workload(agent: &Agent, name: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let chunk: ConsoleChunk = agent.cli(&["vm", "console", name])?;
        if chunk.text.lines().any(|l| l.trim().starts_with("disk dev=/dev/vdb")) {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("{name}'s disk workload never started:\n{}", chunk.text);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One TCP connection to the guest's echo, once it answers (the guest configures its
/// address after boot).
fn connect_probe(target: std::net::SocketAddr, limit: Duration) -> Result<Prober> {
    let start = Instant::now();
    loop {
        match Prober::connect(target, ProbeOptions { connect_timeout: Duration::from_secs(3), ..ProbeOptions::default() }) {
            Ok(p) => return Ok(p),
            Err(e) if start.elapsed() > limit => bail!("the guest's echo at {target} never answered: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

// ---- results ----

fn field(runs: &[Value], key: &str) -> Value {
    let xs: Vec<f64> = runs.iter().filter(|r| r["ok"] == true).filter_map(|r| r[key].as_f64()).collect();
    match stats(&xs) {
        Some((m, lo, hi)) => json!({"median": m, "min": lo, "max": hi}),
        None => Value::Null,
    }
}

fn summary(runs: Vec<Value>) -> Value {
    let ok = runs.iter().filter(|r| r["ok"] == true).count();
    // Each completed run's breakdown, as `field` reads runs.
    let timings: Vec<Value> = runs
        .iter()
        .filter(|r| r["ok"] == true)
        .map(|r| {
            let mut t = r["timings"].clone();
            t["ok"] = json!(true);
            t
        })
        .collect();
    json!({
        "timings": {
            "prepare_ms": field(&timings, "prepare_ms"), "disk_ms": field(&timings, "disk_ms"),
            "memory_ms": field(&timings, "memory_ms"),
        },
        "runs": runs.len(), "completed": ok,
        "completion_rate": if runs.is_empty() { Value::Null } else { json!(round3(ok as f64 / runs.len() as f64)) },
        "total_ms": field(&runs, "total_ms"), "downtime_ms": field(&runs, "downtime_ms"),
        "disk_bytes": field(&runs, "disk_bytes"), "transferred_bytes": field(&runs, "transferred_bytes"),
        "per_run": runs,
    })
}

fn compare(wa: &Value, pe: &Value) -> Value {
    let med = |s: &Value, k: &str| s[k]["median"].as_f64();
    json!({
        "completion": {"walkabout": wa["completion_rate"], "libvirt_way": pe["completion_rate"]},
        "total_time_ratio": ratio(med(wa, "total_ms"), med(pe, "total_ms")),
        "downtime_ratio": ratio(med(wa, "downtime_ms"), med(pe, "downtime_ms")),
        "bytes_ratio": ratio(med(wa, "transferred_bytes"), med(pe, "transferred_bytes")),
    })
}

fn main() -> Result<()> {
    let Some(args) = parse_args()? else { return Ok(()) };
    let started = Instant::now();
    let mut env = environment();
    let wbin = match &args.walkabout {
        Some(b) => walkabout_copy(b, false)?,
        None => build_walkabout(args.build)?,
    };
    env["walkabout_binary"] = wbin.provenance.clone();
    let g = guest(&wbin.path)?;
    let scratch = TempDir::new("storage-bench")?;
    if let Some(n) = args.hops {
        let net = NetPair::new(45).context("network namespaces (needs root)")?;
        let wl = args.workloads.first().cloned().unwrap_or_else(|| "idle".into());
        let hops = hops(&wbin.path, &net, scratch.path(), &wl, n, &args)?;
        let doc = json!({"bench": "storage-hops", "environment": env, "elapsed_s": started.elapsed().as_secs(), "hops": hops});
        let text = serde_json::to_string_pretty(&doc)? + "\n";
        if let Some(p) = &args.out {
            std::fs::write(p, &text)?;
        }
        print!("{text}");
        return Ok(());
    }
    let mut cells = vec![];
    for (i, &bw) in args.bandwidths.iter().enumerate() {
        let net = NetPair::new(40 + u8::try_from(i).unwrap_or(0)).context("network namespaces (needs root)")?;
        if let Some(mib) = bw {
            // MiB/s -> kbit/s for tc.
            net.limit_a(&format!("{}kbit", mib * 1024 * 1024 * 8 / 1000)).context("tc tbf")?;
        }
        for wl in &args.workloads {
            let label = format!(
                "{} MiB disk ({} MiB written), {wl}, link {}",
                args.disk_mib,
                written_mib(args.disk_mib, args.fill_mib, wl),
                bw.map(|b| format!("{b} MiB/s")).unwrap_or("unlimited".into())
            );
            eprintln!("[{label}] ({:.0} s in)", started.elapsed().as_secs_f64());
            let wa = walkabout_cell(&wbin.path, &net, scratch.path(), wl, &args).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
            let pe = peer_cell(&net, scratch.path(), &g, wl, &args).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
            let cmp = compare(&wa, &pe);
            eprintln!("  compare: {cmp}");
            cells.push(json!({
                "disk_mib": args.disk_mib, "written_mib": written_mib(args.disk_mib, args.fill_mib, wl), "workload": wl,
                "bandwidth": bw.map(|b| json!(b)).unwrap_or(json!("default")),
                "walkabout": wa, "libvirt_way": pe, "compare": cmp,
            }));
            if let Some(p) = &args.out {
                std::fs::write(p, serde_json::to_string_pretty(&doc(&env, &args, &cells, false, started))? + "\n")?;
            }
        }
    }
    let text = serde_json::to_string_pretty(&doc(&env, &args, &cells, true, started))? + "\n";
    if let Some(p) = &args.out {
        std::fs::write(p, &text)?;
    }
    print!("{text}");
    Ok(())
}

fn doc(env: &Value, a: &Args, cells: &[Value], complete: bool, started: Instant) -> Value {
    json!({
        "bench": "storage",
        "complete": complete,
        "elapsed_s": started.elapsed().as_secs(),
        "environment": env,
        "settings": {
            "runs_per_cell": a.runs, "disk_mib": a.disk_mib, "written_mib": a.fill_mib, "workloads": a.workloads,
            "bandwidth": a.bandwidths.iter().map(|b| b.map(|b| json!(b)).unwrap_or(json!("default"))).collect::<Vec<_>>(),
            "link": "two network namespaces joined by a veth pair; 'default' unlimited, else tc tbf on the source's egress",
            "walkabout": "walkabout migrate --storage copy --wait (mode auto) between two agents; the guest (256 MiB, 1 vCPU, TCG) boots once and hops A->B->A...; checked after each hop",
            "libvirt_way_tls": a.peer_tls,
            "libvirt_way": "over QMP: new target qcow2, destination QEMU -incoming defer, nbd-server-start + block-export-add writable, source blockdev-add nbd + blockdev-mirror sync=full (background), READY, migrate (defaults, max-bandwidth unlimited), block-job-cancel, nbd-server-stop, cont; a fresh source QEMU per run",
            "medians": "over the runs that completed (Walkabout: and the guest stayed healthy, no corrupt page or block; the peer: its heartbeat went on at the destination, no corrupt page or block in its last heartbeat)",
            "disk_content": "the disk's first MiB are the guest disk workload's (left blank), the written MiB follow",
        },
        "cells": cells,
    })
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_flags_and_defaults_are_those_of_the_hand_parser() {
        Cli::command().debug_assert();
        let d = Cli::try_parse_from(["storage"]).expect("defaults");
        assert_eq!(
            (d.disk_mib, d.fill_mib, d.workload.as_str(), d.bandwidth.as_str(), d.runs, d.give_up_s),
            (1024, 1024, "idle", "default,100", 3, 300)
        );
        assert_eq!((d.out, d.no_build, d.walkabout, d.hops, d.peer_tls), (None, false, None, None, false));
        let args = [
            "storage",
            "--disk-mib",
            "64",
            "--fill-mib",
            "32",
            "--workload",
            "idle;dirty:32:8,disk:16:8",
            "--bandwidth",
            "default",
            "--runs",
            "1",
            "--give-up-s",
            "60",
            "--out",
            "o.json",
            "--no-build",
            "--walkabout",
            "/bin/true",
            "--hops",
            "2",
            "--peer-tls",
        ];
        let g = Cli::try_parse_from(args).expect("every flag");
        assert_eq!((g.disk_mib, g.hops, g.peer_tls), (64, Some(2), true));
    }
}
