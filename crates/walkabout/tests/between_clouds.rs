//! Migration between clouds (issue 11): two sites as separate subnets joined only
//! through a router that NATs (nftables), each host reachable from the other site only
//! at one published port (its agent's, DNAT'd). A disk-backed VM with the disk
//! workload moves from site A to site B with `--storage copy` and `relay`: the memory
//! stream and the NBD disk copy both go through the destination agent's one mutual-TLS
//! port (QEMU's own TLS inside), and the guest saw no corrupt page nor block. Then a
//! relayed post-copy whose sites are cut apart during post-copy and joined again
//! recovers and completes (in the same test: it shares the sites, agents and boot time).

mod common;

use common::{assert_healthy, bin, block_on, guest_image, AgentProc};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use walkabout_api::{MigrationRequest, Mode, Phase, StorageMode, VmSpec, VmState};
use walkabout_testbed::{listening, Agent, AgentSpec, DiskGuest, TestCa, TwoSites};
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

/// Also carries the relayed post-copy recovery ([`relayed_postcopy_recovers_from_a_cut`])
/// on the same sites and agents, its guest booting beside this one (a guest's boot under
/// TCG is most of either's cost).
#[test]
fn a_disk_backed_vm_moves_between_sites_through_the_nat_router_over_one_tls_port() {
    let net = TwoSites::new(1).expect("two sites and a NAT router (needs root and nft)");
    let (a, b) = site_agents(&net);
    // The router publishes B's agent and nothing else of B to site A.
    assert!(connects_from(&net.a, &net.b_from_a), "site A cannot reach B's published port {}", net.b_from_a);
    assert!(!connects_from(&net.a, &net.listen_b()), "site A reaches B's agent directly at {}", net.listen_b());

    // 128 MiB whose last 96 MiB are written: the copy has that much to carry through
    // the relay, which keeps B's listeners open long enough to try them from site A.
    let guest = DiskGuest::new("between-clouds", 128, 32).expect("a written disk");
    let spec = guest.spec("bc1");
    a.call(|c| async move { c.create_vm(&spec).await }).expect("create bc1");
    let postcopy_guest = postcopy_guest(&a);
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

    relayed_postcopy_recovers_from_a_cut(&net, &a, &b, postcopy_guest);
}

/// Creates at site A the guest [`relayed_postcopy_recovers_from_a_cut`] moves: 256 MiB,
/// rewriting 64 MiB at 32 MiB/s. Returns its name.
fn postcopy_guest(a: &AgentProc) -> &'static str {
    let mut spec = VmSpec::new("bc2", 256);
    spec.workload = "dirty:64:32".into();
    a.call(|c| async move { c.create_vm(&spec).await }).expect("create bc2");
    "bc2"
}

/// Guest `vm` moves from site A to site B in post-copy through the relay, over a
/// 200 Mbit/s link. The sites are cut apart during post-copy and joined again: the
/// source pauses post-copy, re-establishes its stream through the relay (B listens anew
/// on loopback and points the VM's tunnel there) and completes, the guest whole at B.
fn relayed_postcopy_recovers_from_a_cut(net: &TwoSites, a: &AgentProc, b: &AgentProc, vm: &'static str) {
    net.limit_a("200mbit").expect("tc tbf on site A's link");
    let seen = a.info(vm).guest.heartbeats;
    a.wait_heartbeats(vm, seen + 5);
    let mut req = MigrationRequest {
        budget_per_gib_ms: Some(240_000),
        ..MigrationRequest::new(vm, format!("https://{}", net.b_from_a), Mode::Postcopy)
    };
    req.tuning.relay = true;
    req.tuning.recovery_budget_ms = Some(60_000);
    let id = a.call(|c| async move { c.start_migration(&req).await }).expect("start the post-copy migration").id;
    a.wait_postcopy(&id, 8 << 20);
    net.cut().expect("cut the sites apart");
    let start = Instant::now();
    let paused = loop {
        let m = a.migration(&id);
        if m.progress.postcopy_paused_since_ms.is_some() {
            break m;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "post-copy not reported paused within 10 s of the cut: {m:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(paused.progress.qemu_status, "postcopy-paused", "{paused:?}");
    net.restore().expect("join the sites again");
    net.unlimit_a().expect("lift the rate limit");

    let m = a.wait_final(&id);
    assert_eq!(m.phase, Phase::Completed, "{m:?}");
    assert!(m.tls && m.tuning.relay, "the record says the streams were plain or direct: {m:?}");
    assert_eq!(m.postcopy_pauses.len(), 1, "{m:?}");
    assert!(m.postcopy_pauses[0].resumed_at_ms.is_some(), "{m:?}");
    assert_eq!(b.info(vm).record.state, VmState::Running);
    assert!(a.try_info(vm).is_none(), "{vm} is still known at its source");
    let seen = b.info(vm).guest.heartbeats;
    let v = b.wait_heartbeats(vm, seen + 10);
    assert_eq!(v.guest.corrupt_pages, 0, "{v:?}");
    assert_healthy(&v);
    b.call(|c| async move { c.delete_vm(vm).await }).expect("delete");
}
