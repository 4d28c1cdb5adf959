//! The API contract held against real servers: every `(method, path)` of the agent's and
//! the controller's OpenAPI documents is served by a running process — asked about a VM,
//! migration, plan or walk that does not exist (and, for a body, with `{}`), it answers
//! with a status its document lists and with success or the API's JSON `ErrorBody`,
//! never the router's bare 404 or 405 — and `GET /v1/openapi.json` is exactly the
//! document `walkabout-api` generates.

mod common;

use common::{block_on, AgentProc, ControllerProc};
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;
use walkabout_api::{openapi, ErrorBody};

/// One request's answer as seen on the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

/// `path` with every `{param}` replaced by a name nothing on a fresh server has.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c + 1);
        out.push_str(match &rest[open..close] {
            "{name}" => "no-such-name",
            "{id}" => "no-such-id",
            _ => "no-such-thing",
        });
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// The statuses a document lists for `method path`.
fn documented(doc: &Value, method: &str, path: &str) -> Vec<u16> {
    doc["paths"][path][method.to_lowercase()]["responses"]
        .as_object()
        .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether the document gives `method path` a request body.
fn has_body(doc: &Value, method: &str, path: &str) -> bool {
    doc["paths"][path][method.to_lowercase()].get("requestBody").is_some()
}

/// Sends `method path` to `base` (with `{}` as the body when `body`); an event stream's
/// body is not read (it does not end).
async fn ask(http: &reqwest::Client, base: &str, method: &str, path: &str, body: bool) -> Answer {
    let method = Method::from_bytes(method.as_bytes()).unwrap_or_else(|e| panic!("method {method}: {e}"));
    let mut req = http.request(method.clone(), format!("{base}{path}"));
    if body {
        req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body("{}");
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {base}{path}: {e}"));
    let status = resp.status().as_u16();
    let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = if content_type.starts_with("text/event-stream") {
        String::new()
    } else {
        resp.text().await.unwrap_or_else(|e| panic!("{method} {base}{path}: reading the body: {e}"))
    };
    Answer { status, content_type, body }
}

/// Asks `base` every route of document `json` (its `routes`) and returns how many were
/// asked and what is wrong with the answers.
fn breaches(base: &str, json: &Value, routes: Vec<(String, String)>) -> (usize, Vec<String>) {
    let base = base.to_string();
    let answers: Vec<(String, String, Answer)> = block_on(None, move || async move {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("an HTTP client");
        let mut out = vec![];
        for (method, path) in routes {
            let body = has_body(json, &method, &path);
            let answer = ask(&http, &base, &method, &concrete(&path), body).await;
            out.push((method, path, answer));
        }
        out
    });
    let mut wrong = vec![];
    for (method, path, a) in &answers {
        let listed = documented(json, method, path);
        if !listed.contains(&a.status) {
            wrong.push(format!("{method} {path}: HTTP {} is not among the documented {listed:?}: {a:?}", a.status));
        }
        if (200..300).contains(&a.status) {
            if a.content_type.starts_with("application/json") {
                if let Err(e) = serde_json::from_str::<Value>(&a.body) {
                    wrong.push(format!("{method} {path}: success with a body that is not JSON ({e}): {a:?}"));
                }
            } else if a.status != 204 && a.content_type.is_empty() {
                wrong.push(format!("{method} {path}: success without a content type: {a:?}"));
            }
        } else {
            match serde_json::from_str::<ErrorBody>(&a.body) {
                Ok(e) if !e.error.is_empty() => {}
                Ok(e) => wrong.push(format!("{method} {path}: an ErrorBody without a sentence: {e:?}")),
                Err(e) => wrong.push(format!("{method} {path}: HTTP {} without the API's ErrorBody ({e}): {a:?}", a.status)),
            }
        }
    }
    (answers.len(), wrong)
}

#[test]
fn every_documented_agent_route_is_served_and_the_served_document_is_the_generated_one() {
    let agent = AgentProc::start(&[]);
    let doc = openapi::agent();
    let json = serde_json::to_value(&doc).expect("the document as JSON");

    let (asked, wrong) = breaches(&agent.url, &json, openapi::routes(&doc));
    let served = agent.call(|c| async move { c.openapi().await }).expect("GET /v1/openapi.json");

    assert!(asked >= 20, "the agent's document lists only {asked} routes");
    assert!(wrong.is_empty(), "the agent breaks its documented contract:\n{}", wrong.join("\n"));
    assert_eq!(served, json, "the agent serves another document");
    assert!(agent.vms().is_empty(), "probing created a VM");
}

#[test]
fn every_documented_controller_route_is_served_and_the_served_document_is_the_generated_one() {
    let agent = AgentProc::start(&[]);
    let ctl = ControllerProc::start(&[&agent], &[]);
    let doc = openapi::controller();
    let json = serde_json::to_value(&doc).expect("the document as JSON");

    let (asked, wrong) = breaches(&ctl.url, &json, openapi::routes(&doc));
    let served = ctl.call(|c| async move { c.openapi().await }).expect("GET /v1/openapi.json");

    assert!(asked >= 25, "the controller's document lists only {asked} routes");
    assert!(wrong.is_empty(), "the controller breaks its documented contract:\n{}", wrong.join("\n"));
    assert_eq!(served, json, "the controller serves another document");
    assert_eq!(ctl.hosts().len(), 1, "probing changed the cluster's hosts");
    assert!(agent.vms().is_empty(), "probing created a VM");
}
