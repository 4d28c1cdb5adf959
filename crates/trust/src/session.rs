//! Browser sessions of the web console. A browser holds no client certificate, and any
//! local user can reach a loopback port, so the console does not trust the connection:
//! it trusts a session cookie, got once in exchange for a one-time login token.
//!
//! - An operator (or `walkabout up`, or `controller --web-listen` at its start) asks for
//!   a login for a role ([`Sessions::issue`]): a random token, valid once, for a short
//!   while, carried in the console URL it is given (`/login?token=...`, as Jupyter does).
//! - Opening that URL ([`LOGIN_PATH`]) uses the token up and answers a session cookie
//!   (`HttpOnly`, `SameSite=Strict`, `Path=/`) bound to the identity the login was
//!   issued for (its name and role: operator or viewer), then sends the browser to `/`.
//! - Every other request of the console is judged by [`crate::policy`] as that identity:
//!   without a valid session 401; a viewer changing anything 403.
//!
//! Kept in memory only: a controller restart ends every session and voids every token.
//! The cookie's name carries the console's port, so the consoles of several clusters on
//! one machine (one browser, one `127.0.0.1`) do not overwrite each other's session.

use crate::identity::{Identity, Role};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The console's login route: `GET /login?token=...`.
pub const LOGIN_PATH: &str = "/login";

/// The longest a login token may wait to be used.
pub const MAX_LOGIN_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long a session lasts after its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Why a login was refused (one sentence for unknown, used and expired, so a guesser
/// learns nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Unknown, already used or expired.
    #[error(
        "the console login token is not valid (unknown, already used or expired); ask for a new console URL with `walkabout console-url`"
    )]
    InvalidToken,
    /// A console session is for people: operators and viewers.
    #[error("a console login is for an operator or a viewer, not for {0}")]
    Role(Role),
    /// No randomness from the system.
    #[error("cannot make a console login token: no randomness")]
    NoRandom,
}

/// The console's outstanding login tokens and open sessions.
#[derive(Debug)]
pub struct Sessions {
    cookie: String,
    logins: Mutex<HashMap<String, (Identity, Instant)>>,
    sessions: Mutex<HashMap<String, (Identity, Instant)>>,
}

fn random_hex() -> Result<String, SessionError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| SessionError::NoRandom)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sessions {
    /// The sessions of the console served on `port` (its cookie is
    /// `walkabout_session_<port>`).
    pub fn new(port: u16) -> Sessions {
        Sessions { cookie: format!("walkabout_session_{port}"), logins: Mutex::default(), sessions: Mutex::default() }
    }

    /// The session cookie's name.
    pub fn cookie_name(&self) -> &str {
        &self.cookie
    }

    /// A one-time login token for `who` (an operator or a viewer), valid for `ttl` (at
    /// most [`MAX_LOGIN_TTL`]).
    pub fn issue(&self, who: Identity, ttl: Duration) -> Result<String, SessionError> {
        if !matches!(who.role, Role::Operator | Role::Viewer) {
            return Err(SessionError::Role(who.role));
        }
        let token = random_hex()?;
        let now = Instant::now();
        let mut logins = lock(&self.logins);
        logins.retain(|_, (_, exp)| *exp > now);
        logins.insert(token.clone(), (who, now + ttl.min(MAX_LOGIN_TTL)));
        Ok(token)
    }

    /// Uses `token` up: a new session for the identity it was issued for. Returns the
    /// session's id (the cookie's value) and that identity.
    pub fn log_in(&self, token: &str) -> Result<(String, Identity), SessionError> {
        let now = Instant::now();
        let who = {
            let mut logins = lock(&self.logins);
            logins.retain(|_, (_, exp)| *exp > now);
            logins.remove(token).map(|(who, _)| who).ok_or(SessionError::InvalidToken)?
        };
        let id = random_hex()?;
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, (_, exp)| *exp > now);
        sessions.insert(id.clone(), (who.clone(), now + SESSION_TTL));
        Ok((id, who))
    }

    /// The identity of the session whose cookie `headers` carry, if it is open.
    pub fn identity(&self, headers: &axum::http::HeaderMap) -> Option<Identity> {
        let id = headers
            .get_all(axum::http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(self.cookie.as_str())?.strip_prefix('='))?;
        let sessions = lock(&self.sessions);
        sessions.get(id).filter(|(_, exp)| *exp > Instant::now()).map(|(who, _)| who.clone())
    }

    /// The `Set-Cookie` value for session `id`: script-proof, same-site only, the whole
    /// console, for [`SESSION_TTL`]. (Not `Secure`: the console is plain HTTP on loopback.)
    pub fn set_cookie(&self, id: &str) -> String {
        format!("{}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", self.cookie, SESSION_TTL.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{header, HeaderMap, HeaderValue};

    fn who(role: Role) -> Identity {
        Identity { name: "alice".into(), role }
    }

    fn cookie(s: &Sessions, id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = HeaderValue::from_str(&format!("other=1; {}={id}", s.cookie_name())).expect("header");
        h.insert(header::COOKIE, v);
        h
    }

    #[test]
    fn a_login_token_opens_one_session_once() {
        let s = Sessions::new(7780);
        let token = s.issue(who(Role::Viewer), Duration::from_secs(60)).expect("token");

        let (id, got) = s.log_in(&token).expect("first use");
        let again = s.log_in(&token);

        assert_eq!(got, who(Role::Viewer));
        assert_eq!(again, Err(SessionError::InvalidToken));
        assert_eq!(s.identity(&cookie(&s, &id)), Some(who(Role::Viewer)));
        assert_eq!(s.identity(&cookie(&s, "guess")), None);
        assert_eq!(s.identity(&HeaderMap::new()), None);
    }

    #[test]
    fn an_expired_token_is_refused() {
        let s = Sessions::new(1);
        let token = s.issue(who(Role::Operator), Duration::from_millis(1)).expect("token");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(s.log_in(&token), Err(SessionError::InvalidToken));
    }

    #[test]
    fn only_operators_and_viewers_get_a_console_login() {
        let s = Sessions::new(1);
        assert_eq!(s.issue(who(Role::Host), Duration::from_secs(1)), Err(SessionError::Role(Role::Host)));
    }

    #[test]
    fn the_cookie_is_http_only_same_site_strict_and_named_for_the_port() {
        let c = Sessions::new(7780).set_cookie("abc");
        assert!(c.starts_with("walkabout_session_7780=abc;"), "{c}");
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"), "{c}");
    }
}
