//! Joining a host to the cluster: an operator asks the controller for a short-lived
//! token for one host name (`POST /v1/join-tokens`); the host sends its CSR with the
//! token in `Authorization: Bearer` (`POST /v1/join`) and gets its certificate.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/join-tokens`: a token for one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenRequest {
    /// The host name the token is for (validated like VM names).
    pub host: String,
    /// How long the token is valid, in seconds (default 600, at most 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
}

/// A join token: single use, for one host, until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    /// The secret, to pass to `walkabout host join --token`.
    pub token: String,
    /// The host it is for.
    pub host: String,
    /// When it expires, ms since the epoch.
    pub expires_ms: u64,
}

/// `POST /v1/join` (with `Authorization: Bearer TOKEN`): a host's CSR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinRequest {
    /// The host name (the token's).
    pub host: String,
    /// A PKCS#10 certificate signing request, PEM; its IP addresses and DNS names become
    /// the certificate's (the name and role are the controller's to give).
    pub csr_pem: String,
}

/// The answer to a join: the host's certificate and the cluster CA's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinReply {
    /// The host's certificate (PEM), role `host`.
    pub cert_pem: String,
    /// The cluster CA's certificate (PEM).
    pub ca_pem: String,
}
