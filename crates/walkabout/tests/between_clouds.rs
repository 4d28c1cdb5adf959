//! Migration between clouds (issue 11): two sites as separate subnets joined only
//! through a router that NATs (nftables), each host reachable from the other site only
//! at one published port (its agent's, DNAT'd). A disk-backed VM with the disk
//! workload moves from site A to site B with `--storage copy` and `relay`: the memory
//! stream and the NBD disk copy both go through the destination agent's one mutual-TLS
//! port (QEMU's own TLS inside), and the guest saw no corrupt page nor block.

mod common;

use common::{assert_healthy, bin, block_on, guest_image, AgentProc};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use walkabout_api::{MigrationRequest, Mode, Phase, StorageMode, VmSpec, VmState};
use walkabout_testbed::{Agent, AgentSpec, TestCa, TwoSites};
use walkabout_trust::Role;

/// Host A in site A, host B in site B, each with a host certificate valid at its own
/// address and at the router address the other site reaches it by.
fn site_agents(net: &TwoSites) -> (AgentProc, AgentProc) {
    guest_image();
    let ca = TestCa::shared().expect("the shared CA");
    let id_a = ca.identity("site-a", Role::Host, &[&net.addr_a, net.router_b()]).expect("site-a identity");
    let id_b = ca.identity("site-b", Role::Host, &[&net.addr_b, net.router_a()]).expect("site-b identity");
    let start = |ns: &str, listen: &str, id: &Path| {
        AgentProc(Agent::start(AgentSpec::new(bin()).at(Some(ns), listen).tls(id, &ca.operator())).expect("a site's agent"))
    };
    (start(&net.a, &net.listen_a(), &id_a), start(&net.b, &net.listen_b(), &id_b))
}

/// Whether a TCP connection from namespace `ns` to `addr` opens within a second.
fn connects_from(ns: &str, addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().expect("an address");
    block_on(Some(ns), move || async move { TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() })
}

/// The TCP sockets process `pid` listens on, as its own network namespace lists them.
fn listening(pid: i32) -> Vec<SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| l.to_string_lossy().strip_prefix("socket:[").map(|s| s.trim_end_matches(']').to_string()))
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            let (ip, port) = local.split_once(':')?;
            let ip = std::net::Ipv4Addr::from(u32::from_be(u32::from_str_radix(ip, 16).ok()?));
            let port = u16::from_str_radix(port, 16).ok()?;
            (*state == "0A" && inodes.iter().any(|i| i == inode)).then_some(SocketAddr::from((ip, port)))
        })
        .collect()
}

/// A qcow2 of 128 MiB whose last 96 MiB are written (the guest's disk workload owns
/// the first 32 MiB): the copy has that much to carry through the relay, which keeps the
/// destination's listeners open long enough to try them from the other site.
fn written_image(path: &Path) {
    let p = path.to_str().expect("utf-8 path");
    for (prog, args) in
        [("qemu-img", vec!["create", "-q", "-f", "qcow2", p, "128M"]), ("qemu-io", vec!["-f", "qcow2", "-c", "write -P 7 32M 96M", p])]
    {
        let out = std::process::Command::new(prog).args(&args).output().expect(prog);
        assert!(out.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn a_disk_backed_vm_moves_between_sites_through_the_nat_router_over_one_tls_port() {
    let net = TwoSites::new(1).expect("two sites and a NAT router (needs root and nft)");
    let (a, b) = site_agents(&net);
    // The router publishes B's agent and nothing else of B to site A.
    assert!(connects_from(&net.a, &net.b_from_a), "site A cannot reach B's published port {}", net.b_from_a);
    assert!(!connects_from(&net.a, &net.listen_b()), "site A reaches B's agent directly at {}", net.listen_b());

    let scratch = std::env::temp_dir().join(format!("wa-between-clouds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch");
    let disk = scratch.join("disk.qcow2");
    written_image(&disk);
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "name": "bc1", "memory_mib": 256, "workload": "dirty:32:8,disk:32:8",
        "disks": [{"path": disk, "format": "qcow2"}],
    }))
    .expect("spec");
    a.call(|c| async move { c.create_vm(&spec).await }).expect("create bc1");
    let seen = a.info("bc1").guest.heartbeats;
    a.wait_heartbeats("bc1", seen + 5);

    let mut req = MigrationRequest {
        storage: StorageMode::Copy,
        // A loaded CI machine (TCG guests on 2 shared cores): this is about the path.
        budget_per_gib_ms: Some(240_000),
        ..MigrationRequest::new("bc1", format!("https://{}", net.b_from_a), Mode::Auto)
    };
    req.tuning.relay = true;
    let id = a.call(|c| async move { c.start_migration(&req).await }).expect("start the migration").id;

    // While the disk copies: B's QEMU listens on loopback only (memory and NBD), and
    // site A reaches none of its ports, neither at B's address nor at the router's.
    let start = Instant::now();
    let ports = loop {
        let incoming = b.try_info("bc1").filter(|v| v.record.state == VmState::Incoming);
        let ports = incoming.and_then(|v| v.record.pid).map(listening).unwrap_or_default();
        if ports.len() >= 2 {
            break ports;
        }
        let m = a.migration(&id);
        assert!(!m.phase.is_final() && start.elapsed() < Duration::from_secs(60), "no incoming listeners seen: {ports:?} {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    for p in &ports {
        assert!(p.ip().is_loopback(), "B's QEMU listens at {p}, not on loopback only: {ports:?}");
        for addr in [format!("{}:{}", net.addr_b, p.port()), format!("{}:{}", net.router_a(), p.port())] {
            assert!(!connects_from(&net.a, &addr), "site A reaches B's QEMU at {addr}");
        }
    }

    let m = a.wait_final(&id);
    assert_eq!((m.phase, m.storage), (Phase::Completed, Some(StorageMode::Copy)), "{m:?}");
    assert!(m.tls && m.tuning.relay, "the record says the streams were plain or direct: {m:?}");
    assert!(m.disk.transferred_bytes >= 96 << 20, "{m:?}");
    let seen = b.info("bc1").guest.heartbeats;
    let v = b.wait_heartbeats("bc1", seen + 10);
    assert_eq!((v.guest.corrupt_pages, v.guest.corrupt_blocks), (0, 0), "{v:?}");
    assert_healthy(&v);
    assert!(a.try_info("bc1").is_none(), "the VM is still known at its source");
    b.call(|c| async move { c.delete_vm("bc1").await }).expect("delete");
    let _ = std::fs::remove_dir_all(&scratch);
}
