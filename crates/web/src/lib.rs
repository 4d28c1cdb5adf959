//! The web console: the cluster live, migrations as they run, drag-and-drop placement,
//! drains, plans, games (Scotland Yard played and stopped, the Towers of Hanoi planned)
//! and history, in a browser.
//!
//! The front end is a handful of plain ES modules and one style sheet (`ui/`), embedded
//! in the binary with `include_str!`: no build step, no Node, nothing fetched from
//! elsewhere at run time (the Content-Security-Policy allows this origin only). The page
//! speaks only the controller's public API (`docs/api/controller.json`) and its event
//! stream, by relative URLs: [`console`] serves the assets at `/` and the API router it
//! is given beside them, on one origin, so no CORS is needed and the session cookie
//! (`HttpOnly`, `SameSite=Strict`) travels with every request of the page as it is.
//! Sessions are the guard's business, not the page's: the controller serves this router
//! with `walkabout_trust::serve::serve_console`, which opens a session for a one-time
//! login token (`/login?token=...`) and judges every request as the session's identity
//! (none: 401; a viewer changing anything: 403, its reason shown by the page).

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file of the front end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asset {
    /// Its path under `/ui/` (`js/main.js`), or `index.html`.
    pub(crate) path: &'static str,
    /// Its `Content-Type`.
    pub(crate) content_type: &'static str,
    /// Its text.
    pub(crate) body: &'static str,
}

macro_rules! asset {
    ($path:literal, $ty:expr) => {
        Asset { path: $path, content_type: $ty, body: include_str!(concat!("../ui/", $path)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the front end.
pub(crate) const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("js/main.js", JS),
    asset!("js/api.js", JS),
    asset!("js/dom.js", JS),
    asset!("js/format.js", JS),
    asset!("js/store.js", JS),
    asset!("js/board.js", JS),
    asset!("js/card.js", JS),
    asset!("js/progress.js", JS),
    asset!("js/drag.js", JS),
    asset!("js/plan.js", JS),
    asset!("js/ops.js", JS),
    asset!("js/history.js", JS),
    asset!("js/games.js", JS),
];

/// What the page may load: this origin only (scripts, styles, the API, the event
/// stream), and inline `data:` images; nothing from elsewhere, no inline script.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

/// The embedded file at `path` (`index.html`, `js/main.js`...).
pub(crate) fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

fn serve(a: &Asset) -> Response {
    let mut r = (StatusCode::OK, a.body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.content_type));
    // The binary is the version: revalidate, so a new binary's page is never mixed with
    // an old one's modules.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    r
}

async fn index() -> Response {
    asset("index.html").map_or_else(|| StatusCode::NOT_FOUND.into_response(), serve)
}

async fn file(Path(path): Path<String>) -> Response {
    match asset(&path) {
        Some(a) if a.path != "index.html" => serve(a),
        _ => (StatusCode::NOT_FOUND, format!("no console file {path}")).into_response(),
    }
}

/// The console's own routes: the page at `/` and its files under `/ui/`.
pub fn assets() -> Router {
    Router::new().route("/", get(index)).route("/ui/{*path}", get(file))
}

/// The console beside `api` (the controller's router): the page at `/`, its files under
/// `/ui/`, and every API route as `api` serves it, on one origin.
pub fn console(api: Router) -> Router {
    assets().merge(api)
}

#[cfg(test)]
mod tests;
