//! Trust, end to end: a real agent and controller serving mutual TLS with a CA made for
//! this test. Every documented route refuses a request without a client certificate
//! (401); a viewer changes nothing (403); a host certificate only reaches host-to-host
//! routes; the stolen-VM attempt (an unauthenticated `POST /v1/migrations` naming a fake
//! destination) fails and the VM keeps running; a host joins with a single-use token;
//! every change is in the controller's event log with who made it, and an agent's own
//! changes in its audit (`GET /v1/audit`). `walkabout ca init`
//! and `walkabout user add`, run as the CLI, make credentials a controller takes.

mod common;

use common::{bin, block_on, guest_image};
use reqwest::Method;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use walkabout_api::{AgentClient, ClientOptions, ControllerClient, Subject, VmSpec, VmState};
use walkabout_testbed::{Agent, AgentSpec, Controller, ControllerSpec, TestCa};
use walkabout_trust::{Bundle, Role};

/// A TLS cluster of one agent and a controller, with an operator, a viewer and a
/// second host's identity.
struct TlsCluster {
    ca: TestCa,
    agent: Agent,
    ctl: Controller,
    operator: PathBuf,
    viewer: PathBuf,
    other_host: PathBuf,
}

fn start() -> TlsCluster {
    guest_image();
    let ca = TestCa::new().expect("a CA");
    let operator = ca.user("alice", Role::Operator).expect("operator");
    let viewer = ca.user("victor", Role::Viewer).expect("viewer");
    let host = ca.host("h1", "127.0.0.1").expect("host h1");
    let other_host = ca.host("h2", "127.0.0.1").expect("host h2");
    let agent = Agent::start(AgentSpec::new(bin()).tls(&host, &operator)).expect("a TLS agent");
    let ctl = Controller::start(ControllerSpec::new(bin(), &[&agent]).tls(ca.dir(), &operator)).expect("a TLS controller");
    assert!(agent.url.starts_with("https://") && ctl.url.starts_with("https://"), "{} {}", agent.url, ctl.url);
    TlsCluster { ca, agent, ctl, operator, viewer, other_host }
}

fn tls_of(identity: Option<&PathBuf>, ca: &TestCa) -> Arc<rustls::ClientConfig> {
    match identity {
        Some(p) => walkabout_trust::tls::client_config(&Bundle::load(p).expect("identity")).expect("client config"),
        None => walkabout_trust::tls::anonymous_client_config(ca.ca().cert_pem()).expect("anonymous config"),
    }
}

fn raw_client(identity: Option<&PathBuf>, ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(rustls::ClientConfig::clone(&tls_of(identity, ca)))
        .timeout(Duration::from_secs(20))
        .build()
        .expect("a client")
}

/// Every documented `(METHOD, path)` of a document, its parameters filled with `x`.
fn routes(documented: Vec<(String, String)>) -> Vec<(Method, String)> {
    documented
        .into_iter()
        .map(|(m, p)| {
            let path: String = p.split('/').map(|s| if s.starts_with('{') { "x" } else { s }).collect::<Vec<_>>().join("/");
            (Method::from_bytes(m.as_bytes()).expect("a method"), path)
        })
        .collect()
}

/// The status of `method url+path` sent by `client` with an empty JSON body.
async fn status(client: &reqwest::Client, base: &str, method: &Method, path: &str) -> u16 {
    let mut req = client.request(method.clone(), format!("{base}{path}"));
    if *method != Method::GET {
        req = req.header("content-type", "application/json").body("{}");
    }
    match req.send().await {
        Ok(r) => r.status().as_u16(),
        Err(e) => panic!("{method} {base}{path}: {e}"),
    }
}

fn is_change(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD)
}

#[test]
fn every_route_refuses_strangers_and_viewers_change_nothing() {
    let c = start();
    let servers = [
        (c.agent.url.clone(), walkabout_api::openapi::routes(&walkabout_api::openapi::agent()), "agent"),
        (c.ctl.url.clone(), walkabout_api::openapi::routes(&walkabout_api::openapi::controller()), "controller"),
    ];
    block_on(None, || async {
        let stranger = raw_client(None, &c.ca);
        let viewer = raw_client(Some(&c.viewer), &c.ca);
        let host = raw_client(Some(&c.other_host), &c.ca);
        let mut wrong = vec![];
        for (base, doc, what) in &servers {
            let routes = routes(doc.clone());
            assert!(routes.len() > 10, "{what}: {routes:?}");
            for (m, p) in &routes {
                let s = status(&stranger, base, m, p).await;
                if s != 401 {
                    wrong.push(format!("{what} {m} {p} without credentials: {s} (want 401)"));
                }
                let s = status(&viewer, base, m, p).await;
                if is_change(m) && s != 403 {
                    wrong.push(format!("{what} {m} {p} as a viewer: {s} (want 403)"));
                }
                if !is_change(m) && matches!(s, 401 | 403) {
                    wrong.push(format!("{what} {m} {p} as a viewer: {s} (a viewer reads)"));
                }
                // Host to host: migrations in, replicas of checkpoints (but not forwarding
                // one, which sends a VM's memory where the caller says), reading the host.
                let forward = p.starts_with("/v1/replicas/") && p.ends_with("/forward");
                let host_route = *what == "agent"
                    && !forward
                    && (p.starts_with("/v1/incoming") || p.starts_with("/v1/replicas") || (!is_change(m) && p.starts_with("/v1/host")));
                let s = status(&host, base, m, p).await;
                if !host_route && s != 403 {
                    wrong.push(format!("{what} {m} {p} with a host certificate: {s} (want 403)"));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    });
}

#[test]
fn plain_http_to_a_tls_server_gets_nothing() {
    let c = start();
    let plain = c.agent.url.replacen("https://", "http://", 1);
    let r = block_on(None, || async {
        reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client").get(format!("{plain}/v1/vms")).send().await
    });
    assert!(r.as_ref().map(|r| !r.status().is_success()).unwrap_or(true), "{r:?}");
}

#[test]
fn the_stolen_vm_attempt_fails_and_the_vm_keeps_running() {
    let c = start();
    let opts = ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(120) };
    let op = AgentClient::with_tls(&c.agent.url, opts, tls_of(Some(&c.operator), &c.ca)).expect("operator client");
    block_on(None, || async {
        op.create_vm(&VmSpec::new("prize", 128)).await.expect("create a VM");
        let started = Instant::now();
        while op.vm("prize").await.expect("the VM").record.state != VmState::Running {
            assert!(started.elapsed() < Duration::from_secs(120), "the VM never ran");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let theft = serde_json::json!({"vm": "prize", "destination": "http://127.0.0.1:9"});
        for (who, identity) in [("a stranger", None), ("a viewer", Some(&c.viewer)), ("another host", Some(&c.other_host))] {
            let r =
                raw_client(identity, &c.ca).post(format!("{}/v1/migrations", c.agent.url)).json(&theft).send().await.expect("an answer");
            let want = if identity.is_none() { 401 } else { 403 };
            assert_eq!(r.status().as_u16(), want, "{who}: {:?}", r.text().await);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(op.vm("prize").await.expect("the VM").record.state, VmState::Running);
        assert!(op.migrations().await.expect("migrations").is_empty(), "a migration was started");
        op.delete_vm("prize").await.expect("delete");
        // The agent recorded each change with who made it; the refused attempts changed
        // nothing and are not among them.
        let changes: Vec<String> = op.audit().await.expect("the agent's audit").into_iter().map(|e| e.message).collect();
        assert_eq!(
            changes,
            ["alice (operator): POST /v1/vms -> 201", "alice (operator): DELETE /v1/vms/prize -> 204"],
            "the agent's record of changes"
        );
    });
}

#[test]
fn a_host_joins_once_with_its_token_and_changes_are_recorded_with_who() {
    let c = start();
    let dir = walkabout_testbed::TempDir::new("join").expect("dir");
    let op = c.operator.to_str().expect("utf8");
    let token = common::json(&["host", "token", "h9", "--controller", &c.ctl.url, "--identity", op]);
    let token = token["token"].as_str().expect("a token").to_string();
    let ca_cert = c.ca.dir().join("ca.crt");
    let out = dir.path().join("h9.pem");
    let join = |out: &std::path::Path| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["host", "join", "h9", "--controller", &c.ctl.url, "--token", &token, "--address", "127.0.0.1", "--ca-cert"])
            .arg(&ca_cert)
            .arg("--out")
            .arg(out)
            .env("WALKABOUT_LOG", "warn");
        cmd.output().expect("run walkabout")
    };
    let first = join(&out);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let id = Bundle::load(&out).expect("the identity").identity().expect("its identity");
    assert_eq!((id.name.as_str(), id.role), ("h9", Role::Host));
    let again = join(&dir.path().join("again.pem"));
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not valid"), "{again:?}");

    let opts = ClientOptions::default();
    let ctl = ControllerClient::with_tls(&c.ctl.url, opts, tls_of(Some(&c.operator), &c.ca)).expect("client");
    block_on(None, || async {
        ctl.propose(&walkabout_api::Goal::Rebalance).await.expect("a dry run");
        let mut events = ctl.events(Some(0)).await.expect("events");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = vec![];
        while Instant::now() < deadline {
            let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), events.next()).await else { break };
            let ev = ev.expect("an event");
            if ev.subject == Subject::Audit {
                seen.push(ev.message.clone());
                if ev.name == "alice" && ev.message.contains("POST /v1/plans") {
                    assert!(seen.iter().any(|m| m.contains("h9 joined")), "{seen:?}");
                    return;
                }
            }
        }
        panic!("no audit event for alice's POST /v1/plans: {seen:?}");
    });
}

#[test]
fn an_incoming_migration_listens_where_the_agent_says_not_where_the_request_says() {
    let c = start();
    let opts = ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(60) };
    let peer = AgentClient::with_tls(&c.agent.url, opts, tls_of(Some(&c.other_host), &c.ca)).expect("a peer's client");
    block_on(None, || async {
        let req = walkabout_api::IncomingRequest {
            spec: VmSpec::new("inbound", 128),
            postcopy_ready: false,
            cpu_features: vec![],
            listen_host: "0.0.0.0".into(),
            postcopy_preempt: false,
            multifd_channels: 0,
            compression: walkabout_api::Compression::None,
            storage: walkabout_api::StorageMode::Auto,
            disks: vec![],
            marker: None,
            lease_ms: None,
            relay: false,
        };
        let reply = peer.prepare_incoming(&req).await.expect("prepared");
        peer.abort_incoming("inbound").await.expect("aborted");
        assert!(reply.uri.starts_with("tcp:127.0.0.1:"), "{}", reply.uri);
    });
}

#[test]
fn a_vm_migrates_between_two_tls_agents_whose_certificates_are_their_only_credentials() {
    guest_image();
    let ca = TestCa::new().expect("a CA");
    let operator = ca.user("alice", Role::Operator).expect("operator");
    let h1 = Agent::start(AgentSpec::new(bin()).tls(&ca.host("h1", "127.0.0.1").expect("h1"), &operator)).expect("h1");
    let h2 = Agent::start(AgentSpec::new(bin()).tls(&ca.host("h2", "127.0.0.1").expect("h2"), &operator)).expect("h2");
    let opts = ClientOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(120) };
    let tls = tls_of(Some(&operator), &ca);
    let src = AgentClient::with_tls(&h1.url, opts, tls.clone()).expect("h1 client");
    let dst = AgentClient::with_tls(&h2.url, opts, tls).expect("h2 client");
    block_on(None, || async {
        src.create_vm(&VmSpec::new("mover", 128)).await.expect("create");
        let req = walkabout_api::MigrationRequest::new("mover", h2.url.clone(), walkabout_api::Mode::Auto);
        let rec = src.start_migration(&req).await.expect("start");
        let started = Instant::now();
        let rec = loop {
            let r = src.migration(&rec.id).await.expect("the migration");
            if r.phase.is_final() {
                break r;
            }
            assert!(started.elapsed() < Duration::from_secs(240), "still {:?}", r.phase);
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(rec.phase, walkabout_api::Phase::Completed, "{rec:?}");
        assert!(rec.tls, "QEMU's stream between two agents under a CA was plain: {rec:?}");
        assert_eq!(dst.vm("mover").await.expect("at h2").record.state, VmState::Running);
        dst.delete_vm("mover").await.expect("delete");
    });
}

/// `walkabout ARGS` (the CLI itself), logging warnings only.
fn walkabout(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin()).args(args).env("WALKABOUT_LOG", "warn").output().expect("run walkabout")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn ca_init_and_user_add_make_credentials_a_controller_takes_by_role() {
    use std::os::unix::fs::PermissionsExt;
    let dir = walkabout_testbed::TempDir::new("cli-ca").expect("dir");
    let ca_dir = dir.path().join("ca");
    let ca = ca_dir.to_str().expect("utf8");
    let (alice, victor) = (dir.path().join("alice.pem"), dir.path().join("victor.pem"));
    let (alice_s, victor_s) = (alice.to_str().expect("utf8"), victor.to_str().expect("utf8"));

    let init = walkabout(&["ca", "init", "--dir", ca, "--cluster", "testers"]);
    let ca_cert = std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap_or_default();
    let key_mode = std::fs::metadata(ca_dir.join("ca.key")).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o777);
    let again = walkabout(&["ca", "init", "--dir", ca]);
    let operator = walkabout(&["user", "add", "alice", "--role", "operator", "--ca-dir", ca, "--out", alice_s]);
    let viewer = walkabout(&["user", "add", "victor", "--role", "viewer", "--ca-dir", ca, "--out", victor_s]);
    let over = walkabout(&["user", "add", "alice", "--role", "viewer", "--ca-dir", ca, "--out", alice_s]);
    let bad_name = walkabout(&["user", "add", "al ice", "--role", "viewer", "--ca-dir", ca, "--out", "/dev/null/x.pem"]);

    assert!(init.status.success() && String::from_utf8_lossy(&init.stdout).contains("cluster CA created in"), "{init:?}");
    assert!(ca_cert.contains("BEGIN CERTIFICATE"), "{ca_cert}");
    assert_eq!(key_mode & 0o077, 0, "ca.key is readable by others: {key_mode:o}");
    assert!(!again.status.success() && stderr(&again).contains("refusing to overwrite"), "{again:?}");
    assert!(operator.status.success() && viewer.status.success(), "{operator:?} {viewer:?}");
    let a = Bundle::load(&alice).expect("alice's credentials");
    let v = Bundle::load(&victor).expect("victor's credentials");
    let (a_id, v_id) = (a.identity().expect("alice"), v.identity().expect("victor"));
    assert_eq!((a_id.name.as_str(), a_id.role, v_id.name.as_str(), v_id.role), ("alice", Role::Operator, "victor", Role::Viewer));
    assert_eq!((a.ca_pem.trim(), v.ca_pem.trim()), (ca_cert.trim(), ca_cert.trim()));
    assert!(!over.status.success() && stderr(&over).contains("refusing to overwrite"), "{over:?}");
    assert!(Bundle::load(&alice).expect("alice's, still").identity().expect("alice").role == Role::Operator);
    assert!(!bad_name.status.success() && stderr(&bad_name).contains("invalid name"), "{bad_name:?}");

    // A controller serving with that CA (and a host whose agent is gone): the operator
    // changes, the viewer only reads.
    let mut spec = ControllerSpec::new(bin(), &[]).tls(&ca_dir, &alice);
    spec.agents.push("h9=https://127.0.0.1:9".into());
    let ctl = Controller::start(spec).expect("a controller with the new CA");
    let as_user = |id: &str, args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--controller", &ctl.url, "--identity", id]);
        walkabout(&a)
    };
    let token = as_user(alice_s, &["host", "token", "h7", "--output", "json"]);
    let listed = as_user(victor_s, &["host", "list", "--output", "json"]);
    let refused = as_user(victor_s, &["host", "token", "h8"]);
    let not_removed = as_user(victor_s, &["host", "remove", "h9"]);
    let removed = as_user(alice_s, &["host", "remove", "h9"]);
    let listed_after = as_user(victor_s, &["host", "list", "--output", "json"]);
    let removed_again = as_user(alice_s, &["host", "remove", "h9"]);
    let hosts = |o: &std::process::Output| -> Vec<String> {
        let hosts: Vec<walkabout_api::Host> = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"));
        hosts.into_iter().map(|h| h.name).collect()
    };
    assert!(token.status.success() && String::from_utf8_lossy(&token.stdout).contains("\"token\""), "{token:?}");
    assert!(!refused.status.success() && stderr(&refused).contains("victor (viewer) may only read"), "{refused:?}");
    assert_eq!(hosts(&listed), ["h9"]);
    assert!(!not_removed.status.success() && stderr(&not_removed).contains("victor (viewer) may only read"), "{not_removed:?}");
    assert!(removed.status.success() && String::from_utf8_lossy(&removed.stdout).contains("host h9 removed"), "{removed:?}");
    assert_eq!(hosts(&listed_after), Vec::<String>::new());
    assert!(!removed_again.status.success() && stderr(&removed_again).contains("h9"), "{removed_again:?}");
}
