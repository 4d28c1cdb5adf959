//! Who a certificate belongs to: its common name and its role, carried as a SAN URI
//! `walkabout://role/<role>`. A certificate without exactly one such URI has no identity.

use crate::{Result, TrustError};
use std::fmt;

/// The URI prefix of a role in a certificate's subject alternative names.
pub const ROLE_URI_PREFIX: &str = "walkabout://role/";

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// An operator who may read everything and change nothing.
    Viewer,
    /// An operator who may read and change everything.
    Operator,
    /// An agent: serves its host and talks to other agents (migrations, host to host).
    Host,
    /// The controller: drives agents and its own games.
    Controller,
}

impl Role {
    /// The role's name as written in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Host => "host",
            Role::Controller => "controller",
        }
    }

    /// The SAN URI that carries this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "host" => Ok(Role::Host),
            "controller" => Ok(Role::Controller),
            _ => Err(format!("unknown role {s:?}: viewer, operator, host or controller")),
        }
    }
}

/// A verified peer: the name and role its certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The certificate's common name (a user or host name).
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

impl Identity {
    /// The identity a DER certificate carries. The chain must have been verified
    /// already (the TLS handshake does); this only reads the name and the role.
    pub fn from_der(der: &[u8]) -> Result<Identity> {
        use x509_parser::prelude::*;
        let bad = |reason: String| TrustError::Invalid { what: "peer certificate".into(), reason };
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| bad("no common name".into()))?
            .to_string();
        if !crate::valid_name(&name) {
            return Err(bad(format!("common name {name:?} is not a valid name")));
        }
        let mut roles = vec![];
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let GeneralName::URI(u) = n {
                    if let Some(r) = u.strip_prefix(ROLE_URI_PREFIX) {
                        roles.push(r.parse::<Role>().map_err(bad)?);
                    }
                }
            }
        }
        match roles.as_slice() {
            [role] => Ok(Identity { name, role: *role }),
            [] => Err(bad(format!("{name} carries no role ({ROLE_URI_PREFIX}...)"))),
            _ => Err(bad(format!("{name} carries {} roles; exactly one is allowed", roles.len()))),
        }
    }
}
