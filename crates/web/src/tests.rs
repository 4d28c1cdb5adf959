//! The console's files: every file a page or module refers to is served, nothing comes
//! from elsewhere, and the page is served with its policy beside the API it is given.

use super::*;
use axum::body::{to_bytes, Body};
use axum::http::Request;
use tower::ServiceExt;

/// Relative references of one file: `href="..."`/`src="..."` in HTML, `from './x.js'`
/// and `import './x.js'` in modules, resolved to asset paths (inline `data:` URLs are
/// not references).
fn references(a: &Asset) -> Vec<String> {
    let mut out = vec![];
    let dir = a.path.rsplit_once('/').map(|(d, _)| format!("{d}/")).unwrap_or_default();
    for (open, close) in [("href=\"", '"'), ("src=\"", '"'), ("from '", '\''), ("import '", '\'')] {
        let mut rest = a.body;
        while let Some(i) = rest.find(open) {
            rest = &rest[i + open.len()..];
            let Some(end) = rest.find(close) else { break };
            let target = &rest[..end];
            rest = &rest[end..];
            if target.starts_with("data:") {
                continue;
            }
            let path = if let Some(p) = target.strip_prefix("ui/") {
                p.to_string()
            } else if let Some(p) = target.strip_prefix("./") {
                format!("{dir}{p}")
            } else {
                target.to_string()
            };
            out.push(path);
        }
    }
    out
}

#[test]
fn every_file_the_page_and_its_modules_refer_to_is_embedded() {
    let missing: Vec<String> = ASSETS
        .iter()
        .flat_map(|a| references(a).into_iter().map(move |r| format!("{} -> {r}", a.path)))
        .filter(|r| {
            let target = r.split(" -> ").nth(1).unwrap_or_default();
            asset(target).is_none()
        })
        .collect();
    assert!(missing.is_empty(), "referenced but not embedded: {missing:?}");
}

#[test]
fn every_embedded_module_is_reachable_from_the_page() {
    let mut seen = vec!["index.html".to_string()];
    let mut i = 0;
    while i < seen.len() {
        if let Some(a) = asset(&seen[i]) {
            for r in references(a) {
                if !seen.contains(&r) {
                    seen.push(r);
                }
            }
        }
        i += 1;
    }
    let unused: Vec<&str> = ASSETS.iter().map(|a| a.path).filter(|p| !seen.iter().any(|s| s == p)).collect();
    assert!(unused.is_empty(), "embedded but never loaded: {unused:?}");
}

#[test]
fn nothing_is_loaded_from_another_origin() {
    for a in ASSETS {
        for r in references(a) {
            assert!(!r.contains("//") && !r.starts_with('/'), "{} loads {r}: only relative URLs of this origin", a.path);
        }
        assert!(!a.body.contains("fetch('http") && !a.body.contains("fetch(\"http"), "{} fetches an absolute URL", a.path);
    }
}

async fn get(app: Router, path: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    let r = app.oneshot(Request::get(path).body(Body::empty()).expect("a request")).await.expect("a response");
    let status = r.status();
    let headers = r.headers().clone();
    let body = to_bytes(r.into_body(), 1 << 20).await.expect("a body");
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_page_is_served_at_the_root_under_a_same_origin_policy() {
    let (status, headers, body) = get(console(Router::new()), "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("<script type=\"module\" src=\"ui/js/main.js\">"), "{body}");
    assert_eq!(headers.get(header::CONTENT_SECURITY_POLICY).and_then(|v| v.to_str().ok()), Some(CONTENT_SECURITY_POLICY));
    assert!(CONTENT_SECURITY_POLICY.starts_with("default-src 'self'"));
}

#[tokio::test]
async fn modules_are_served_as_javascript_and_unknown_files_are_not_found() {
    let (status, headers, body) = get(assets(), "/ui/js/main.js").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()), Some(JS));
    assert!(body.contains("import"), "{body}");
    let (status, _, _) = get(assets(), "/ui/js/nope.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_api_router_given_is_served_beside_the_page() {
    let api = Router::new().route("/v1/cluster", get_route());
    let (status, _, body) = get(console(api), "/v1/cluster").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "{}");
}

fn get_route() -> axum::routing::MethodRouter {
    axum::routing::get(|| async { "{}" })
}
