//! The web console's logins: an operator asks the controller for a console URL carrying
//! a one-time login token for a role (`walkabout console-url --role viewer`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a console session may do: an operator changes things, a viewer only looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleRole {
    /// Reads and changes everything.
    #[default]
    Operator,
    /// Reads everything, changes nothing (403).
    Viewer,
}

spelled!(ConsoleRole, "unknown console role {:?}: operator or viewer", { Operator => "operator", Viewer => "viewer" });

/// `POST /v1/console/logins`: a login for the web console.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct ConsoleLoginRequest {
    /// The session's role (default operator; a viewer may ask for nothing).
    #[serde(default)]
    pub role: ConsoleRole,
    /// How long the token may wait to be used, in seconds (default 600, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
}

/// A console URL with a one-time login token: opening it once gives a browser a session
/// cookie of the role; a second use is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConsoleLogin {
    /// The URL to open (`http://127.0.0.1:PORT/login?token=...`).
    pub url: String,
    /// The session's role.
    pub role: ConsoleRole,
    /// When the token expires unused, ms since the epoch.
    pub expires_at_ms: u64,
}
