//! Networks that keep their connections: a VM with a NIC and a static address hops
//! between two hosts with network stacks of their own (namespaces), each with its own
//! bridge of the same name joined into one segment that the root namespace reaches.
//! One TCP connection from the root namespace to the guest's echo, a request every
//! 10 ms, lives through every hop: never reset; the longest gap between replies (the
//! observed downtime) is reported beside QEMU's figure. A disk-booting guest writing its
//! data disk keeps that connection through hops with `--storage shared` and `--storage
//! copy` alike, with no corrupt page or block.

mod common;

use common::{assert_healthy, AgentProc};
use std::process::Command;
use std::time::{Duration, Instant};
use walkabout_api::{Phase, StorageMode, VmInfo};
use walkabout_probe::{echo_target, ProbeOptions, Prober};
use walkabout_testbed::{GuestNet, NetPair};

/// Hops: the ten (about a minute under TCG after the boot).
const HOPS: usize = 10;

fn hosts(net: &NetPair) -> (AgentProc, AgentProc) {
    let a = AgentProc::start_at(Some(&net.a), &format!("{}:7701", net.addr_a), &[]);
    let b = AgentProc::start_at(Some(&net.b), &format!("{}:7701", net.addr_b), &[]);
    (a, b)
}

/// The guests' segment for `net`'s two hosts, named for this process.
fn segment(net: &NetPair) -> GuestNet {
    let id = std::process::id() % 1000;
    GuestNet::new(&format!("wg{id}"), &format!("10.78.{}", id % 250), &[&net.a, &net.b]).expect("guest segment (needs root)")
}

/// The links enslaved to `bridge` in namespace `ns`.
fn ports(ns: &str, bridge: &str) -> Vec<String> {
    let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", "master", bridge]).output().expect("ip link");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split(": ").nth(1)?.split('@').next().map(String::from)).collect()
}

/// Connects to the guest's echo once it answers (the guest configures its address after
/// boot).
fn connect(target: std::net::SocketAddr) -> Prober {
    let start = Instant::now();
    loop {
        match Prober::connect(target, ProbeOptions { connect_timeout: Duration::from_secs(3), ..ProbeOptions::default() }) {
            Ok(p) => return p,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(120), "the guest's echo at {target} never answered: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_vm_keeps_its_mac_address_and_tcp_connection_across_hops_between_namespace_hosts() {
    let net = NetPair::new(7).expect("network namespaces (needs root)");
    let seg = segment(&net);
    let (a, b) = hosts(&net);
    let address = seg.guest_address(12);
    let nic = format!("bridge={},address={address}", seg.bridge());
    a.create(&["--name", "nic1", "--memory", "256M", "--workload", "dirty:32:8", "--nic", &nic]);
    let mac = a.info("nic1").record.spec.nics[0].mac.clone().expect("the agent pins a MAC");
    let target = echo_target(&address).expect("an echo address");
    let probe = connect(target);

    let mut hops = vec![];
    for hop in 0..HOPS {
        let (src, dst) = if hop % 2 == 0 { (&a, &b) } else { (&b, &a) };
        probe.start_window();
        let m = src.migrate("nic1", dst, &["--probe", &target.to_string()]);
        assert_eq!(m.result, Phase::Completed, "hop {hop}: {m:?}");
        let seen = probe.end_window().unwrap_or_else(|e| panic!("hop {hop}: the root namespace's connection broke: {e}"));
        // The CLI (in the source's namespace) probed the guest through the hop as well.
        assert_eq!(m.probe_error, None, "hop {hop}: {m:?}");
        assert!(m.observed_downtime_ms.is_some(), "hop {hop}: no observed downtime reported: {m:?}");
        assert!(seen.replies > 0, "hop {hop}: {seen:?}");
        let v = dst.info("nic1");
        assert_eq!(v.record.spec.nics[0].mac.as_deref(), Some(mac.as_str()), "hop {hop}: the MAC changed");
        assert_eq!(v.record.spec.nics[0].address.as_deref(), Some(address.as_str()));
        // The source let its tap go; the destination's is on its bridge.
        let (src_ns, dst_ns) = (src.netns().expect("ns"), dst.netns().expect("ns"));
        assert_eq!(ports(src_ns, seg.bridge()), vec!["uplink".to_string()], "hop {hop}: a tap left at the source");
        assert_eq!(ports(dst_ns, seg.bridge()).len(), 2, "hop {hop}: no tap at the destination: {:?}", ports(dst_ns, seg.bridge()));
        let health = dst.wait_heartbeats("nic1", v.guest.heartbeats + 5);
        assert_healthy(&health);
        eprintln!(
            "hop {}: QEMU downtime {:?} ms, observed {} ms (CLI's probe {:?} ms), {} replies",
            hop + 1,
            m.downtime_ms,
            seen.max_gap_ms,
            m.observed_downtime_ms,
            seen.replies
        );
        hops.push((m.downtime_ms.unwrap_or(0), seen.max_gap_ms));
    }
    assert_eq!(probe.failure(), None, "the connection from the root namespace failed");
    assert_eq!(hops.len(), HOPS);
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let (qemu, seen) = (median(hops.iter().map(|h| h.0).collect()), median(hops.iter().map(|h| h.1).collect()));
    eprintln!("{HOPS} hops: median QEMU downtime {qemu} ms, median observed {seen} ms");
}

#[test]
fn a_nic_on_a_bridge_the_host_lacks_is_refused_with_the_cause_and_nothing_starts() {
    let a = AgentProc::start(&[]);
    let err = a.cli_fails(&["vm", "create", "--name", "nonet", "--memory", "128M", "--nic", "bridge=wa-nobr0"]);
    assert!(
        err.contains("bridge \\\"wa-nobr0\\\" does not exist on this host")
            || err.contains("bridge \"wa-nobr0\" does not exist on this host"),
        "{err}"
    );
    assert!(a.qemu_pids().is_empty(), "a QEMU was started");
    assert!(a.try_info("nonet").is_none(), "the VM was recorded");
}

#[test]
fn a_migration_to_a_host_without_the_bridge_fails_with_the_cause_and_the_vm_stays() {
    let net = NetPair::new(8).expect("network namespaces (needs root)");
    let id = std::process::id() % 1000;
    // Only host A has the guests' bridge.
    let seg = GuestNet::new(&format!("wh{id}"), &format!("10.79.{}", id % 250), &[&net.a]).expect("guest segment (needs root)");
    let (a, b) = hosts(&net);
    a.create(&["--name", "nic2", "--memory", "256M", "--nic", &format!("bridge={}", seg.bridge())]);
    let m = a.migrate("nic2", &b, &[]);
    assert_eq!(m.result, Phase::Failed, "{m:?}");
    let why = m.reason.clone().unwrap_or_default();
    assert!(why.contains(&format!("bridge \"{}\" does not exist on this host", seg.bridge())), "{m:?}");
    assert!(b.qemu_pids().is_empty(), "a QEMU was started at the destination");
    let v = a.info("nic2");
    assert_eq!(v.record.state, walkabout_api::VmState::Running, "{v:?}");
    let at_a = ports(&net.a, seg.bridge());
    assert!(at_a.iter().any(|p| p.starts_with("wk")), "the VM's tap should stay at the source: {at_a:?}");
}

/// Waits for `more` heartbeats and asserts the guest found no corrupt page or block (its
/// disk workload re-reads and verifies every block it wrote) and never broke.
fn runs_clean(agent: &AgentProc, vm: &str, more: u64) -> VmInfo {
    let seen = agent.info(vm).guest.heartbeats;
    let v = agent.wait_heartbeats(vm, seen + more);
    assert_eq!((v.guest.corrupt_blocks, v.guest.corrupt_pages), (0, 0), "{v:?}");
    assert_healthy(&v);
    v
}

/// Waits until the guest's disk workload has found its data disk and written it once
/// (`disk dev=... blocks=...` on its console: slow under TCG on a loaded machine).
fn writes_its_disk(agent: &AgentProc, vm: &str) {
    let start = Instant::now();
    loop {
        let text = agent.call(|c| async move { c.console(vm, 0).await }).map(|c| c.text).unwrap_or_default();
        if text.lines().any(|l| l.trim().starts_with("disk dev=/dev/vdb")) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "{vm}'s disk workload never started:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 9's first must-show, lean for CI (the 1 GiB, 10 + 10 hop run is
/// `bench/src/bin/storage.rs --hops`): a guest booting from the Walkabout root disk
/// (an overlay, `image:guest`) and writing a data disk hops twice with `--storage
/// shared`, then twice with `--storage copy`, while one TCP connection from the root
/// namespace to its echo stays open through all four hops: never reset, a reply gap
/// (observed downtime) reported for each hop, no corrupt page or block.
#[test]
fn a_disk_booting_guest_keeps_its_tcp_connection_through_shared_and_copy_storage_hops() {
    let net = NetPair::new(9).expect("network namespaces (needs root)");
    let id = std::process::id() % 1000;
    let seg = GuestNet::new(&format!("ws{id}"), &format!("10.80.{}", id % 250), &[&net.a, &net.b]).expect("guest segment (needs root)");
    let (a, b) = hosts(&net);
    let address = seg.guest_address(13);
    let nic = format!("bridge={},address={address}", seg.bridge());
    let args = ["--name", "sd1", "--memory", "256M", "--workload", "dirty:32:8,disk:16:4", "--disk", "image:guest", "--disk", "size=32M"];
    a.create(&[&args[..], &["--nic", &nic]].concat());
    writes_its_disk(&a, "sd1");
    runs_clean(&a, "sd1", 5);
    let target = echo_target(&address).expect("an echo address");
    let probe = connect(target);

    let mut hosts = [&a, &b];
    for (hop, mode) in [StorageMode::Shared, StorageMode::Shared, StorageMode::Copy, StorageMode::Copy].into_iter().enumerate() {
        let (src, dst) = (hosts[0], hosts[1]);
        probe.start_window();
        let m = src.migrate("sd1", dst, &["--storage", &mode.to_string(), "--probe", &target.to_string()]);
        let seen = probe.end_window().unwrap_or_else(|e| panic!("hop {hop} ({mode}): the root namespace's connection broke: {e}"));

        assert_eq!((m.result, m.storage), (Phase::Completed, Some(mode)), "hop {hop}: {m:?}");
        match mode {
            StorageMode::Shared => assert_eq!(m.disk_transferred_bytes, 0, "hop {hop}: a shared hop copied disk bytes: {m:?}"),
            _ => assert!(m.disk_transferred_bytes > 0, "hop {hop}: a copy hop copied no disk bytes: {m:?}"),
        }
        assert_eq!(m.probe_error, None, "hop {hop}: {m:?}");
        assert!(m.observed_downtime_ms.is_some(), "hop {hop}: no observed downtime reported: {m:?}");
        assert!(seen.replies > 0, "hop {hop}: {seen:?}");
        runs_clean(dst, "sd1", 3);
        eprintln!(
            "hop {} ({mode}): QEMU downtime {:?} ms, observed {} ms (CLI's probe {:?} ms), disk {} bytes",
            hop + 1,
            m.downtime_ms,
            seen.max_gap_ms,
            m.observed_downtime_ms,
            m.disk_transferred_bytes
        );
        hosts.swap(0, 1);
    }
    assert_eq!(probe.failure(), None, "the connection from the root namespace failed");
    runs_clean(hosts[0], "sd1", 5);
}
