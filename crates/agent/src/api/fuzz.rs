//! Property tests of the agent's HTTP API in-process (issue 11, "inputs fuzzed"): a real
//! agent with no VMs (its QEMU is only asked its version and machine types; no guest
//! boots) behind its router, driven with `tower::ServiceExt::oneshot`. A body that is
//! not the route's request (bytes that are not JSON, JSON of another shape) is a 4xx
//! with an [`ErrorBody`], never a 5xx or a panic; so is every POST to a VM, migration
//! or incoming migration that does not exist.

use crate::vms::{Agent, AgentConfig};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use tower::ServiceExt;
use walkabout_api::{CommitRequest, ErrorBody, IncomingRequest, MigrationRequest, RecoverRequest, VmSpec};

/// Whether a value is a route's request.
type IsRequest = fn(&Value) -> bool;

/// The routes that read a JSON body, and whether a value is that route's request.
const BODY_ROUTES: &[(&str, IsRequest)] = &[
    ("/v1/vms", |v| serde_json::from_value::<VmSpec>(v.clone()).is_ok()),
    ("/v1/migrations", |v| serde_json::from_value::<MigrationRequest>(v.clone()).is_ok()),
    ("/v1/incoming", |v| serde_json::from_value::<IncomingRequest>(v.clone()).is_ok()),
    ("/v1/incoming/nosuch/commit", |v| serde_json::from_value::<CommitRequest>(v.clone()).is_ok()),
    ("/v1/incoming/nosuch/recover", |v| serde_json::from_value::<RecoverRequest>(v.clone()).is_ok()),
];

struct Setup {
    rt: tokio::runtime::Runtime,
    dir: std::path::PathBuf,
    router: axum::Router,
}

impl Setup {
    /// An agent on a scratch directory (TCG named, so no calibration; a kernel named,
    /// so no guest image is built).
    fn new(tag: &str) -> Setup {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap_or_else(|e| panic!("runtime: {e}"));
        let dir = std::env::temp_dir().join(format!("wa-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = AgentConfig::new(dir.clone());
        config.accel = walkabout_qemu::AccelRequest::Tcg;
        config.capacity_mib = Some(1024);
        config.kernel = Some(dir.join("no-kernel"));
        let agent = rt.block_on(Agent::start(config)).unwrap_or_else(|e| panic!("agent: {e}"));
        Setup { rt, dir, router: super::router(agent) }
    }

    fn send(&self, path: &str, body: Vec<u8>, json: bool) -> (StatusCode, Vec<u8>) {
        self.send_as("POST", path, body, json)
    }

    /// `method` `path` with `body` (a JSON content type when `json`): the status and body.
    fn send_as(&self, method: &str, path: &str, body: Vec<u8>, json: bool) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(path);
        if json {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Body::from(body)).unwrap_or_else(|e| panic!("request: {e}"));
        self.rt.block_on(async {
            let resp = self.router.clone().oneshot(req).await.unwrap_or_else(|e| match e {});
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap_or_else(|e| panic!("body: {e}"));
            (status, bytes.to_vec())
        })
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn not_json_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80).prop_filter("not JSON", |b| serde_json::from_slice::<Value>(b).is_err()),
        ("[a-z_]{1,10}", "[ -~]{0,20}", any::<prop::sample::Index>()).prop_map(|(k, v, cut)| {
            let full = serde_json::json!({ k: v }).to_string();
            full.as_bytes()[..cut.index(full.len())].to_vec()
        }),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        prop_oneof![Just("vm1"), Just("auto"), Just("copy"), Just("127.0.0.1"), Just("http://127.0.0.1:1")].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        let key = prop_oneof![
            "[a-z_]{0,8}",
            prop_oneof![
                Just("name"),
                Just("memory_mib"),
                Just("vcpus"),
                Just("vm"),
                Just("destination"),
                Just("mode"),
                Just("spec"),
                Just("listen_host"),
                Just("postcopy_ready"),
                Just("cpu_features"),
                Just("guest"),
                Just("disks"),
                Just("kernel"),
            ]
            .prop_map(String::from),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn refused(status: StatusCode, reply: &[u8], what: &str) -> Result<(), TestCaseError> {
    prop_assert!(status.is_client_error(), "{}: {} {}", what, status, String::from_utf8_lossy(reply));
    let e = serde_json::from_slice::<ErrorBody>(reply).map_err(|e| {
        TestCaseError::fail(format!("{what}: {status} with a body that is not an ErrorBody ({e}): {}", String::from_utf8_lossy(reply)))
    })?;
    prop_assert!(!e.error.is_empty());
    Ok(())
}

/// Both properties share one agent (starting one asks QEMU twice).
#[test]
fn bodies_that_are_not_the_routes_request_are_4xx_error_bodies() {
    let s = Setup::new("fuzz-api");
    let mut runner = TestRunner::new(Config { cases: 96, ..Config::default() });
    let routes: Vec<usize> = (0..BODY_ROUTES.len()).collect();
    let result = runner.run(&(proptest::sample::select(routes.clone()), not_json_body(), any::<bool>()), |(r, body, json)| {
        let path = BODY_ROUTES[r].0;
        let what = format!("POST {path} {:?}", String::from_utf8_lossy(&body));
        // The commit's body is optional: without a JSON content type it is no body.
        prop_assume!(json || !path.ends_with("/commit"));
        let (status, reply) = s.send(path, body, json);
        refused(status, &reply, &what)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let mut runner = TestRunner::new(Config { cases: 96, ..Config::default() });
    let result = runner.run(&(proptest::sample::select(routes), json_value()), |(r, v)| {
        let (path, is_request) = BODY_ROUTES[r];
        prop_assume!(!is_request(&v));
        let (status, reply) = s.send(path, v.to_string().into_bytes(), true);
        refused(status, &reply, &format!("POST {path} {v}"))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Every POST route of the agent, on things that do not exist, with any JSON that is
    // no request: refused, never a 5xx.
    let posts: Vec<(&str, String)> = super::ROUTES
        .iter()
        .filter(|(m, _)| matches!(*m, "POST" | "PUT"))
        .map(|(m, p)| (*m, p.replace("{name}", "nosuch").replace("{id}", "nosuch").replace("{vm}", "nosuch").replace("{file}", "nosuch")))
        .collect();
    let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
    let result = runner.run(&(proptest::sample::select(posts), json_value()), |((method, path), v)| {
        prop_assume!(BODY_ROUTES.iter().all(|(_, is_request)| !is_request(&v)));
        let (status, reply) = s.send_as(method, &path, v.to_string().into_bytes(), true);
        refused(status, &reply, &format!("{method} {path} {v}"))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The minimal input the property found: `POST /v1/incoming/{name}/commit` with a JSON
/// content type and an empty (or malformed) body was axum's plain-text 400, not an
/// [`ErrorBody`].
#[test]
fn a_commit_with_a_malformed_body_is_an_error_body() {
    let s = Setup::new("commit-body");
    for body in [&b""[..], b"{", b"[1]"] {
        let (status, reply) = s.send("/v1/incoming/nosuch/commit", body.to_vec(), true);
        let e: ErrorBody = serde_json::from_slice(&reply).unwrap_or_else(|e| panic!("{status}: {e}: {}", String::from_utf8_lossy(&reply)));
        assert_eq!((status, e.kind), (StatusCode::UNPROCESSABLE_ENTITY, walkabout_api::ErrorKind::InvalidRequest), "{}", e.error);
    }
}

/// The tunnel route (`GET /v1/incoming/{name}/tunnel/{stream}`) with any stream name,
/// with or without the upgrade, for VMs with no relayed migration here: a 4xx
/// [`ErrorBody`] every time, never an upgrade.
#[test]
fn a_tunnel_to_nothing_is_refused_with_an_error_body() {
    let s = Setup::new("fuzz-tunnel");
    let mut runner = TestRunner::new(Config { cases: 48, ..Config::default() });
    let stream = prop_oneof![Just("memory".to_string()), Just("nbd".to_string()), "[a-z0-9%._-]{1,12}"];
    let result = runner.run(&("[a-z0-9]{1,8}", stream, any::<bool>()), |(vm, stream, upgrade)| {
        let path = format!("/v1/incoming/{vm}/tunnel/{stream}");
        let mut req = Request::builder().method("GET").uri(&path);
        if upgrade {
            req = req.header("connection", "upgrade").header("upgrade", walkabout_api::TUNNEL_PROTOCOL);
        }
        let req = req.body(Body::empty()).unwrap_or_else(|e| panic!("request: {e}"));
        let (status, reply) = s.rt.block_on(async {
            let resp = s.router.clone().oneshot(req).await.unwrap_or_else(|e| match e {});
            let status = resp.status();
            (status, axum::body::to_bytes(resp.into_body(), 1 << 20).await.map(|b| b.to_vec()).unwrap_or_default())
        });
        refused(status, &reply, &format!("GET {path} upgrade={upgrade}"))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Paths axum refuses before any handler runs (a segment that is not UTF-8 once
/// percent-decoded, a route that does not exist, a method a route lacks) are 4xx
/// replies with an [`ErrorBody`] too. The first was found by the tunnel property above
/// (`/v1/incoming/a/tunnel/%a0` answered axum's plain text).
#[test]
fn what_axum_refuses_itself_is_an_error_body() {
    let s = Setup::new("fuzz-axum");
    for (method, path) in [
        ("GET", "/v1/incoming/a/tunnel/%a0"),
        ("GET", "/v1/vms/%ff%fe"),
        ("POST", "/v1/vms/%c3/pause"),
        ("GET", "/v1/no-such-route"),
        ("DELETE", "/v1/host"),
    ] {
        let (status, reply) = s.send_as(method, path, vec![], false);
        if let Err(e) = refused(status, &reply, &format!("{method} {path}")) {
            panic!("{e}");
        }
    }
}
