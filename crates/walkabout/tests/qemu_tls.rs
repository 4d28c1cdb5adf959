//! QEMU's own streams under the cluster CA, with real guests between two TLS agents:
//! the memory stream (with multifd channels) and the NBD disk copy are TLS, the
//! destination admits only the host that asked for the migration, and a stranger
//! connecting first to the destination's ports (plain bytes, an untrusted certificate,
//! another host's certificate of the same CA) is refused while the migration goes on to
//! complete with no corrupt page nor block. A guest checkpointed right after its TLS
//! hops, restored on the other agent from that checkpoint, migrates over TLS again.

mod common;

use common::{assert_healthy, bin, guest_image, AgentProc};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use walkabout_api::{CheckpointMethod, CheckpointRequest, Phase, RestoreReply, StorageMode, VmState};
use walkabout_testbed::{listening, Agent, AgentSpec, DiskGuest, TestCa};
use walkabout_trust::{Bundle, Role};

/// Two agents on loopback serving TLS with host certificates of this process's shared
/// CA (the test's own client speaks as its operator).
fn tls_pair(names: [&str; 2]) -> (AgentProc, AgentProc, &'static TestCa) {
    guest_image();
    let ca = TestCa::shared().expect("the shared CA");
    let start = |name: &str| {
        let id = ca.host(name, "127.0.0.1").expect("a host identity");
        AgentProc(Agent::start(AgentSpec::new(bin()).tls(&id, &ca.operator())).expect("a TLS agent"))
    };
    let (a, b) = (start(names[0]), start(names[1]));
    assert!(a.url.starts_with("https://") && b.url.starts_with("https://"), "{} {}", a.url, b.url);
    (a, b, ca)
}

/// A budget for a loaded CI machine (TCG guests, 2 cores shared): these tests are about
/// who may connect, not about speed (bench/migrate --tls measures TLS's cost).
const PATIENT: &[&str] = &["--budget-per-gib", "240s"];

/// Waits for `more` heartbeats; the guest saw no corrupt page nor block and never broke.
fn runs_clean(agent: &AgentProc, vm: &str, more: u64) {
    let seen = agent.info(vm).guest.heartbeats;
    let v = agent.wait_heartbeats(vm, seen + more);
    assert_eq!((v.guest.corrupt_pages, v.guest.corrupt_blocks), (0, 0), "{v:?}");
    assert_healthy(&v);
}

/// Migrates `vm` from `from` to `to` over TLS with two multifd channels; the record
/// says so and the guest runs clean there.
fn tls_hop(from: &AgentProc, to: &AgentProc, vm: &str) {
    let m = from.migrate(vm, to, &[&["--multifd-channels", "2"], PATIENT].concat());
    assert_eq!(m.result, Phase::Completed, "{m:?}");
    let rec = from.migrations().into_iter().find(|r| r.id == m.id).expect("the record");
    assert!(rec.tls, "the record says the streams were plain: {rec:?}");
    assert_eq!(rec.strategy.as_ref().map(|s| s.multifd_channels), Some(2), "{rec:?}");
    runs_clean(to, vm, 5);
}

#[test]
fn a_dirtying_guest_hops_there_and_back_over_tls_with_multifd_and_the_records_say_so() {
    let (a, b, _ca) = tls_pair(["qm1", "qm2"]);
    a.create(&["--name", "tls1", "--memory", "256M", "--workload", "dirty:64:16"]);
    runs_clean(&a, "tls1", 5);
    // Back again: the VM that came in (its QEMU a TLS server) leaves as a TLS client.
    tls_hop(&a, &b, "tls1");
    tls_hop(&b, &a, "tls1");

    // Checkpointed right after a TLS hop (its QEMU still holds the hop's TLS
    // parameters, which a mapped-ram file refuses), shipped to b, restored there, and
    // over TLS again from the restored VM (whose QEMU loaded a mapped-ram file).
    let since = Instant::now();
    let req = CheckpointRequest { method: Some(CheckpointMethod::Live), ship_to: Some(b.url.clone()) };
    let ck = a
        .call(|c| async move { c.with_timeout(Duration::from_secs(300)).checkpoint("tls1", &req).await })
        .unwrap_or_else(|e| panic!("a checkpoint of tls1 after its TLS hop: {e}"));
    a.cli(&["vm", "delete", "tls1"]);
    let r: RestoreReply = b.cli_as(&["vm", "restore", &ck.id]);
    assert_eq!(r.checkpoint.id, ck.id, "{r:?}");
    runs_clean(&b, "tls1", 5);
    tls_hop(&b, &a, "tls1");
    let v = a.info("tls1");
    let at = ck.guest.last_seq.expect("the checkpoint's heartbeat");
    assert!(v.guest.last_seq.is_some_and(|s| s > at + 5), "the heartbeat did not go on from {at}: {:?}", v.guest);
    assert_eq!(v.guest.seq_breaks, ck.guest.seq_breaks, "a break in the heartbeat after the restore: {:?}", v.guest);
    eprintln!("checkpoint after TLS hops, restore, TLS hop again: {:.1} s", since.elapsed().as_secs_f64());
}

/// A stranger sends plain bytes (a forged stream header) to `port`: QEMU must close the
/// connection without taking it for the stream.
fn plain_stranger_is_dropped(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(b"QEVM\x00\x00\x00\x03 not a TLS record, nor a stream of ours\r\n\r\n");
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed() < Duration::from_secs(10),
            // NBD greets in plain text before its STARTTLS; keep reading to the close.
            Ok(_) => continue,
        }
    }
}

/// A TLS client with `config` at `port`: the common name of the certificate the server
/// presented (if the handshake got that far), and whether the server then closed the
/// connection without a byte of stream.
fn tls_stranger(config: Arc<rustls::ClientConfig>, port: u16) -> (Option<String>, bool) {
    let Ok(sock) = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2)) else {
        return (None, false);
    };
    let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let Ok(conn) = rustls::ClientConnection::new(config, name) else { return (None, false) };
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let _ = tls.write_all(b"hello");
    let mut buf = [0u8; 64];
    let closed = matches!(tls.read(&mut buf), Ok(0) | Err(_));
    let cn = tls.conn.peer_certificates().and_then(|c| c.first()).and_then(|c| walkabout_trust::Identity::from_der(c).ok()).map(|i| i.name);
    (cn, closed)
}

#[test]
fn strangers_at_the_destination_are_refused_and_the_tls_disk_copy_completes() {
    let (a, b, ca) = tls_pair(["qt1", "qt2"]);
    // 256 MiB whose last 192 MiB are written: the mirror has that much to copy before
    // memory moves, which leaves the destination's ports open for the strangers.
    let guest = DiskGuest::new("qemu-tls", 256, 64).expect("a written disk");
    let spec = guest.spec("tls2");
    a.call(|c| async move { c.create_vm(&spec).await }).expect("create tls2");
    runs_clean(&a, "tls2", 5);

    // Strangers: another host of the same CA (signed, but not the source asked for),
    // and a certificate of a CA nobody here trusts.
    let other = Bundle::load(&ca.host("qt3", "127.0.0.1").expect("qt3")).expect("qt3 bundle");
    let other_host = walkabout_trust::tls::client_config(&other).expect("qt3 config");
    let foreign_ca = walkabout_trust::Ca::generate("elsewhere").expect("a foreign CA");
    let foreign = foreign_ca.issue("qt2", Role::Host, &["127.0.0.1".into()]).expect("a forged qt2");
    let foreign = Bundle { ca_pem: ca.ca().cert_pem().to_string(), ..foreign };
    let untrusted = walkabout_trust::tls::client_config(&foreign).expect("forged config");

    let id = a.start_migration("tls2", &b, &[&["--storage", "copy"], PATIENT].concat());
    // The destination's QEMU listens for the disks (NBD) and the memory stream while
    // the mirror copies the disk: the strangers come first to every port it listens on.
    let start = Instant::now();
    let ports = loop {
        let incoming = b.try_info("tls2").filter(|v| v.record.state == VmState::Incoming);
        let ports: Vec<u16> = incoming.and_then(|v| v.record.pid).map(listening).unwrap_or_default().iter().map(|a| a.port()).collect();
        if ports.len() >= 2 {
            break ports;
        }
        let m = a.migration(&id);
        assert!(!m.phase.is_final() && start.elapsed() < Duration::from_secs(60), "no incoming ports seen: {ports:?} {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut presented = vec![];
    for &port in &ports {
        assert!(plain_stranger_is_dropped(port), "port {port}: a plain stranger was not dropped");
        let (cn, closed) = tls_stranger(other_host.clone(), port);
        assert!(closed, "port {port}: another host of the CA was let in");
        presented.extend(cn);
        let (_, closed) = tls_stranger(untrusted.clone(), port);
        assert!(closed, "port {port}: an untrusted certificate was let in");
    }
    // The memory port is TLS from its first byte, under the destination's identity.
    assert!(presented.iter().any(|n| n == "qt2"), "no port presented the destination's certificate: {presented:?} on {ports:?}");
    let m = a.wait_final(&id);
    assert_eq!((m.phase, m.storage), (Phase::Completed, Some(StorageMode::Copy)), "{m:?}");
    assert!(m.tls, "the record says the streams were plain: {m:?}");
    assert!(m.disk.transferred_bytes >= 192 << 20, "{m:?}");
    runs_clean(&b, "tls2", 10);
    b.call(|c| async move { c.delete_vm("tls2").await }).expect("delete");
}
