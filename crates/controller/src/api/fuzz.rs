//! Property tests of the controller's HTTP API in-process (issue 11, "inputs fuzzed"):
//! its router over fake agents (`crate::fake`), driven with `tower::ServiceExt::oneshot`
//! (no network, no QEMU). A body that is not the route's JSON is a 4xx with an
//! [`ErrorBody`]; any JSON body to any POST/PUT route is never a 500 nor a panic, and
//! every refusal is an [`ErrorBody`].

use crate::fake::{open, temp, Fake};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use tower::ServiceExt;
use walkabout_api::ErrorBody;

/// The routes that read a JSON body.
const BODY_ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/hosts"),
    ("POST", "/v1/vms"),
    ("POST", "/v1/vms/a/move"),
    ("POST", "/v1/plans"),
    ("PUT", "/v1/balance"),
    ("POST", "/v1/walks"),
    ("POST", "/v1/games/musical-chairs"),
    ("POST", "/v1/games/scotland-yard"),
    ("POST", "/v1/games/x/move"),
    ("POST", "/v1/join-tokens"),
    ("POST", "/v1/join"),
];

/// A controller over two fake hosts with one VM, and its router.
struct Setup {
    rt: tokio::runtime::Runtime,
    dir: std::path::PathBuf,
    router: axum::Router,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap_or_else(|e| panic!("runtime: {e}"));
        let dir = temp(tag);
        let router = rt.block_on(async {
            let fake = Fake::new(&[("h1", 4096), ("h2", 4096)], &[("a", 256, "h1")]);
            super::router(open(&dir, &fake, &["h1", "h2"]).await)
        });
        Setup { rt, dir, router }
    }

    /// Sends one request; the status and the body's bytes.
    fn send(&self, method: &str, path: &str, body: Vec<u8>, json: bool, bearer: bool) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(path);
        if json {
            req = req.header("content-type", "application/json");
        }
        if bearer {
            req = req.header("authorization", "Bearer not-a-token");
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

/// A body that is no route's JSON: bytes that are not JSON, a JSON scalar, or a JSON
/// object cut short.
fn not_json_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80).prop_filter("not JSON", |b| serde_json::from_slice::<Value>(b).is_err()),
        prop_oneof![Just("null"), Just("true"), Just("0"), Just("-1"), Just("\"x\""), Just("1e400")].prop_map(|s| s.as_bytes().to_vec()),
        ("[a-z_]{1,10}", "[ -~]{0,20}", any::<prop::sample::Index>()).prop_map(|(k, v, cut)| {
            let full = serde_json::json!({ k: v }).to_string();
            full.as_bytes()[..cut.index(full.len())].to_vec()
        }),
    ]
}

/// Arbitrary JSON with the request types' field names as likely keys.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..100_000).prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("h1"),
            Just("h2"),
            Just("a"),
            Just("http://h1"),
            Just("drain"),
            Just("rebalance"),
            Just("place"),
            Just("automatic")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 16, 6, |inner| {
        let key = prop_oneof![
            "[a-z_]{0,8}",
            prop_oneof![
                Just("url"),
                Just("name"),
                Just("memory_mib"),
                Just("vcpus"),
                Just("host"),
                Just("to"),
                Just("goal"),
                Just("vm"),
                Just("level"),
                Just("threshold"),
                Just("hysteresis"),
                Just("max_moves"),
                Just("duration_ms"),
                Just("parallel"),
                Just("groups"),
                Just("ttl_s"),
                Just("csr_pem"),
                Just("disks"),
                Just("gentle"),
            ]
            .prop_map(String::from),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn error_body(status: StatusCode, body: &[u8], what: &str) -> Result<ErrorBody, TestCaseError> {
    serde_json::from_slice::<ErrorBody>(body).map_err(|e| {
        TestCaseError::fail(format!("{what}: {status} with a body that is not an ErrorBody ({e}): {}", String::from_utf8_lossy(body)))
    })
}

#[test]
fn a_body_that_is_not_the_routes_json_is_a_4xx_error_body() {
    let s = Setup::new("fuzz-not-json");
    let mut runner = TestRunner::new(Config { cases: 96, ..Config::default() });
    let result = runner.run(
        &(proptest::sample::select(BODY_ROUTES), not_json_body(), any::<bool>(), any::<bool>()),
        |((method, path), body, json, bearer)| {
            let what = format!("{method} {path} {:?}", String::from_utf8_lossy(&body));
            let (status, reply) = s.send(method, path, body, json, bearer);
            prop_assert!(status.is_client_error(), "{}: {}", what, status);
            let e = error_body(status, &reply, &what)?;
            prop_assert!(!e.error.is_empty());
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn any_json_to_any_post_or_put_route_is_never_a_500() {
    let s = Setup::new("fuzz-any-json");
    let routes: Vec<(&str, String)> = super::ROUTES
        .iter()
        .filter(|(m, _)| matches!(*m, "POST" | "PUT"))
        .map(|(m, p)| (*m, p.replace("{name}", "a").replace("{id}", "x")))
        .collect();
    let mut runner = TestRunner::new(Config { cases: 96, ..Config::default() });
    let result = runner.run(&(proptest::sample::select(routes), json_value(), any::<bool>()), |((method, path), v, bearer)| {
        let what = format!("{method} {path} {v}");
        let (status, reply) = s.send(method, &path, v.to_string().into_bytes(), true, bearer);
        prop_assert!(status != StatusCode::INTERNAL_SERVER_ERROR, "{}: {}", what, String::from_utf8_lossy(&reply));
        if !status.is_success() {
            error_body(status, &reply, &what)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn any_hanoi_plan_query_is_a_plan_or_an_error_body() {
    let s = Setup::new("fuzz-hanoi");
    let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
    let levels = prop_oneof!["[0-9]{0,12}", "-?[0-9]{1,3}", "[a-zA-Z0-9=._~-]{0,8}", (0u32..=12).prop_map(|n| n.to_string())];
    let result = runner.run(&levels, |levels| {
        let path = format!("/v1/games/hanoi/plan?levels={levels}");
        let (status, reply) = s.send("GET", &path, vec![], false, false);
        match status {
            StatusCode::OK => {
                let plan: walkabout_api::HanoiPlan = serde_json::from_slice(&reply)
                    .map_err(|e| TestCaseError::fail(format!("{path}: 200 with a body that is no HanoiPlan: {e}")))?;
                prop_assert_eq!(plan.steps.len() + 1, 1usize << plan.levels, "{}", path);
            }
            _ => {
                prop_assert!(status.is_client_error(), "{}: {}", path, status);
                error_body(status, &reply, &path)?;
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Paths axum refuses before any handler runs (a segment that is not UTF-8 once
/// percent-decoded, a route that does not exist, a method a route lacks) are 4xx
/// replies with an [`ErrorBody`], on the games' and joins' routes too.
#[test]
fn what_axum_refuses_itself_is_an_error_body() {
    let s = Setup::new("fuzz-axum");
    for (method, path) in
        [("GET", "/v1/hosts/%a0"), ("POST", "/v1/walks/%ff/stop"), ("GET", "/v1/no-such-route"), ("DELETE", "/v1/cluster")]
    {
        let (status, reply) = s.send(method, path, vec![], false, false);
        assert!(status.is_client_error(), "{method} {path}: {status}");
        if let Err(e) = error_body(status, &reply, &format!("{method} {path}")) {
            panic!("{e}");
        }
    }
}
