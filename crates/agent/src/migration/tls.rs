//! QEMU's streams of a migration under the cluster CA: the memory stream with every
//! channel QEMU opens for it (multifd, post-copy's preempt channel, a recovered
//! post-copy's new stream) and the NBD disk copy.
//!
//! Both ends add their objects over QMP for each migration (`object-add`), because the
//! destination's one admitted peer is known only then: it is the host whose certificate
//! made the `/v1/incoming` request, never a name a request body carries.
//!
//! - Destination: `tls-creds-x509` (endpoint server, `verify-peer`) and `authz-simple`
//!   naming that host's Distinguished Name; migration parameters `tls-creds` and
//!   `tls-authz`, and the same two on `nbd-server-start`. A stranger connecting first
//!   (plain bytes, an unknown certificate, another host's) fails its handshake or the
//!   authorization; QEMU drops that connection and keeps listening for the real one.
//! - Source: `tls-creds-x509` (endpoint client, `verify-peer`: the destination must show
//!   a certificate of the CA valid at the address it is reached at); parameters
//!   `tls-creds` and `tls-hostname`, and the same on the NBD client's `blockdev-add`.
//!
//! A cluster without a CA (`--insecure-loopback`) keeps plain streams, and says so.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use walkabout_migrate::MigrationQmp;
use walkabout_qemu::QmpError;

/// The id of the destination's credentials object (endpoint server). A VM that came in
/// keeps it; it leaves again with [`CREDS_OUT`].
pub(crate) const CREDS_IN: &str = "wa-tls-in";
/// The id of the source's credentials object (endpoint client).
pub(crate) const CREDS_OUT: &str = "wa-tls-out";
/// The id of the destination's authorization object.
pub(crate) const AUTHZ_ID: &str = "wa-authz";

/// How one end's QEMU secures its streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamTls {
    /// Plain: a cluster without a CA.
    Plain,
    /// TLS with the credentials in this directory (see `walkabout_trust::qemu`).
    Tls(PathBuf),
}

impl StreamTls {
    /// True for TLS.
    pub(crate) fn on(&self) -> bool {
        matches!(self, StreamTls::Tls(_))
    }
}

/// Errors arming QEMU's TLS.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// QEMU refused an object or a parameter.
    #[error("cannot set up TLS for QEMU's streams: {0}")]
    Qemu(#[from] QmpError),
    /// The incoming request came without an identity to admit.
    #[error("refused: the incoming migration request carries no host certificate, so no source can be admitted to QEMU's TLS stream")]
    NoPeer,
    /// The two ends disagree on TLS.
    #[error("{0}")]
    Mismatch(String),
}

fn creds(id: &str, dir: &Path, endpoint: &str) -> Value {
    json!({"qom-type": "tls-creds-x509", "id": id, "dir": dir.display().to_string(), "endpoint": endpoint, "verify-peer": true})
}

/// The host part of a QEMU URI `tcp:HOST:PORT` (brackets of an IPv6 address removed).
pub(crate) fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("tcp:")?;
    let (host, _port) = rest.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

/// Destination: credentials as a server and an authorization admitting `peer_dn`
/// alone, as the memory stream's parameters. Call before `nbd-server-start` and
/// `migrate-incoming` (whose listeners then require both).
pub(crate) async fn arm_incoming(qmp: &impl MigrationQmp, dir: &Path, peer_dn: &str) -> Result<(), TlsError> {
    qmp.execute("object-add", Some(creds(CREDS_IN, dir, "server"))).await?;
    qmp.execute("object-add", Some(json!({"qom-type": "authz-simple", "id": AUTHZ_ID, "identity": peer_dn}))).await?;
    qmp.execute("migrate-set-parameters", Some(json!({"tls-creds": CREDS_IN, "tls-authz": AUTHZ_ID}))).await?;
    Ok(())
}

/// Source: credentials as a client, checking the destination's certificate against
/// `hostname` (the address its reply named), as the memory stream's parameters. The
/// VM's QEMU keeps the object from an earlier migration out of this host (one that
/// failed: the VM stayed); it is added once.
pub(crate) async fn arm_outgoing(qmp: &impl MigrationQmp, dir: &Path, hostname: &str) -> Result<(), TlsError> {
    let objects = qmp.execute("qom-list", Some(json!({"path": "/objects"}))).await?;
    let present = objects.as_array().is_some_and(|a| a.iter().any(|o| o["name"] == CREDS_OUT));
    if !present {
        qmp.execute("object-add", Some(creds(CREDS_OUT, dir, "client"))).await?;
    }
    qmp.execute("migrate-set-parameters", Some(json!({"tls-creds": CREDS_OUT, "tls-hostname": hostname}))).await?;
    Ok(())
}

/// The source's check of the destination's answer: both ends must agree, and a source
/// under a CA never sends plain.
pub(crate) fn agree(vm: &str, destination: &str, ours: &StreamTls, theirs: bool) -> Result<(), TlsError> {
    match (ours.on(), theirs) {
        (true, false) => Err(TlsError::Mismatch(format!(
            "refused to migrate {vm} to {destination}: it would receive QEMU's streams in plain text (it runs without a CA) \
             while this host runs under the cluster CA"
        ))),
        (false, true) => Err(TlsError::Mismatch(format!(
            "cannot migrate {vm} to {destination}: it expects QEMU's streams over TLS, and this host has no identity under the cluster CA"
        ))),
        _ => Ok(()),
    }
}

/// The NBD server's TLS arguments at the destination (merged into `nbd-server-start`).
pub(crate) fn nbd_server_args(tls: bool) -> Value {
    match tls {
        true => json!({"tls-creds": CREDS_IN, "tls-authz": AUTHZ_ID}),
        false => json!({}),
    }
}

/// The NBD client's TLS arguments at the source (merged into its `blockdev-add`).
pub(crate) fn nbd_client_args(tls: bool, hostname: &str) -> Value {
    match tls {
        true => json!({"tls-creds": CREDS_OUT, "tls-hostname": hostname}),
        false => json!({}),
    }
}

/// Copies the keys of `extra` (an object) into `v` (an object).
pub(crate) fn merge(mut v: Value, extra: Value) -> Value {
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_a_uri_is_what_the_destination_certificate_is_checked_against() {
        assert_eq!(uri_host("tcp:10.0.0.2:4444"), Some("10.0.0.2"));
        assert_eq!(uri_host("tcp:[::1]:4444"), Some("::1"));
        assert_eq!(uri_host("unix:/x"), None);
    }

    #[test]
    fn a_source_under_the_ca_never_sends_plain() {
        let tls = StreamTls::Tls("/x".into());
        let err = agree("vm1", "https://h2", &tls, false).expect_err("refused");
        assert!(err.to_string().contains("plain text"), "{err}");
        assert!(agree("vm1", "https://h2", &StreamTls::Plain, true).is_err());
        assert!(agree("vm1", "https://h2", &tls, true).is_ok());
        assert!(agree("vm1", "http://h2", &StreamTls::Plain, false).is_ok());
    }
}
