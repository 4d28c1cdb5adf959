//! The cluster's trust: one CA per cluster; every process (agent, controller, operator)
//! holds a certificate the CA signed, and the certificate says who it is and what it may
//! do. Servers accept TLS with an optional client certificate at the handshake and refuse
//! a request without one in a middleware (401), or one whose role does not allow it (403).
//!
//! - [`ca`]: creating the CA, issuing certificates, signing a joining host's CSR; the
//!   identity bundle a process holds ([`Bundle`]: its certificate, its key, the CA).
//! - [`identity`]: the name and [`Role`] a certificate carries (CN and a SAN URI
//!   `walkabout://role/<role>`), read back from a peer's certificate.
//! - [`tls`]: rustls server and client configurations from a bundle.
//! - [`policy`]: which role may call which route.
//! - [`qemu`]: the cluster CA as QEMU's TLS credentials (migration and NBD streams).
//! - [`token`]: short-lived, single-use join tokens.
//! - [`session`]: the web console's one-time login tokens and the session cookies they
//!   are exchanged for (an identity with a role, as a certificate carries).
//! - [`serve`]: the listener (TLS, or plain HTTP on loopback when asked) with handshake
//!   and idle timeouts, and the axum middleware that enforces [`policy`] (for the web
//!   console, as the identity of a [`session`]).

pub mod ca;
pub mod identity;
pub mod policy;
pub mod qemu;
pub mod serve;
pub mod session;
pub mod tls;
pub mod token;

pub use ca::{Bundle, Ca};
pub use identity::{Identity, Role};
pub use policy::{Decision, ServerKind};
pub use serve::{IdleLimit, Listener, ListenerOptions, Peer};
pub use session::Sessions;
pub use token::JoinTokens;

/// Errors of the trust crate: every one names the file or thing and the cause.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// A CA directory already holds a CA (never overwritten).
    #[error("{0} already holds a CA (ca.crt); refusing to overwrite it")]
    CaExists(String),
    /// A certificate or key could not be made.
    #[error("cannot make {what}: {reason}")]
    Generate {
        /// What was being made.
        what: String,
        /// Why not.
        reason: String,
    },
    /// A PEM file or certificate is not what it should be.
    #[error("{what}: {reason}")]
    Invalid {
        /// What was read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A name is not usable in a certificate.
    #[error("invalid name {0:?}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadName(String),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, TrustError>;

/// Checks a name (host, user, VM) the way VM names are checked: 1-63 ASCII letters,
/// digits, `-`, `_`, `.`, starting with a letter or digit. No spaces, no control
/// characters, nothing a terminal, a URL or a Prometheus label would interpret.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// The rustls crypto provider every config of this crate uses (ring; no OpenSSL).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_checked_like_vm_names() {
        assert!(super::valid_name("h1"));
        assert!(super::valid_name("site-a.h_2"));
        assert!(!super::valid_name(""));
        assert!(!super::valid_name("h1\nevil 1"));
        assert!(!super::valid_name("-h"));
        assert!(!super::valid_name("h\u{1b}[31m"));
        assert!(!super::valid_name(&"a".repeat(64)));
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever a peer sends as its certificate, reading its identity answers
        /// without panicking (the TLS layer verified the chain; this parses it).
        #[test]
        fn any_der_gives_an_identity_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = crate::Identity::from_der(&bytes);
        }

        /// Any text read as an identity bundle gives a bundle or an error naming it.
        #[test]
        fn any_text_gives_a_bundle_or_an_error(text in ".{0,600}") {
            if let Err(e) = crate::Bundle::from_pem(&text, "x.pem") {
                prop_assert!(e.to_string().contains("x.pem") || e.to_string().contains("certificate"));
            }
        }

        /// A CSR's text never panics the signer, and never gets a certificate unless it
        /// is a CSR.
        #[test]
        fn any_csr_text_is_signed_or_refused(text in ".{0,400}") {
            use std::sync::OnceLock;
            static CA: OnceLock<crate::Ca> = OnceLock::new();
            let ca = CA.get_or_init(|| crate::Ca::generate("fuzz").expect("ca"));
            prop_assert!(ca.sign_csr(&text, "h1", crate::Role::Host).is_err());
        }

        /// The policy decides every method and path without panicking, and nobody
        /// without an identity is let through.
        #[test]
        fn the_policy_never_lets_a_stranger_through(method in "[A-Z]{1,7}", path in "/[ -~]{0,60}") {
            let d = crate::policy::decide(crate::ServerKind::Agent, None, &method, &path);
            prop_assert!(matches!(d, crate::Decision::Unauthenticated(_)));
        }
    }
}
