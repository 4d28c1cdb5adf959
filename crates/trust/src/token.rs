//! Join tokens: short-lived, single-use secrets the controller hands an operator
//! (`walkabout host token`) for one host name; the joining host presents one with its
//! CSR and gets a host certificate. Kept in memory only: a controller restart voids them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest a token may live.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// The controller's outstanding join tokens.
#[derive(Debug, Default)]
pub struct JoinTokens {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// Why a token was refused (the same sentence for every cause but the name, so a
/// guesser learns nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Unknown, used or expired.
    #[error("the join token is not valid (unknown, already used or expired)")]
    Invalid,
    /// Valid for another host.
    #[error("the join token was issued for another host than {0}")]
    WrongHost(String),
    /// No randomness from the system.
    #[error("cannot make a join token: no randomness")]
    NoRandom,
}

impl JoinTokens {
    /// A new token for `host`, valid for `ttl` (at most [`MAX_TTL`]).
    pub fn issue(&self, host: &str, ttl: Duration) -> Result<String, TokenError> {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 24];
        ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| TokenError::NoRandom)?;
        let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let mut t = self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        t.retain(|_, (_, exp)| *exp > now);
        t.insert(token.clone(), (host.to_string(), now + ttl.min(MAX_TTL)));
        Ok(token)
    }

    /// Uses up `token` for `host`: valid once, before it expires, for that host only.
    pub fn redeem(&self, token: &str, host: &str) -> Result<(), TokenError> {
        let mut t = self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        t.retain(|_, (_, exp)| *exp > now);
        match t.get(token) {
            None => Err(TokenError::Invalid),
            Some((h, _)) if h != host => Err(TokenError::WrongHost(host.to_string())),
            Some(_) => {
                t.remove(token);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_used_once_for_its_host_only() {
        let t = JoinTokens::default();
        let tok = t.issue("h1", Duration::from_secs(60)).expect("token");
        assert_eq!(t.redeem(&tok, "h2"), Err(TokenError::WrongHost("h2".into())));
        assert_eq!(t.redeem(&tok, "h1"), Ok(()));
        assert_eq!(t.redeem(&tok, "h1"), Err(TokenError::Invalid));
        assert_eq!(t.redeem("guess", "h1"), Err(TokenError::Invalid));
    }

    #[test]
    fn an_expired_token_is_refused() {
        let t = JoinTokens::default();
        let tok = t.issue("h1", Duration::from_millis(1)).expect("token");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(t.redeem(&tok, "h1"), Err(TokenError::Invalid));
    }
}
