//! rustls configurations from a [`Bundle`]: a server that asks for (but does not
//! require) a client certificate signed by the cluster CA, so that the middleware can
//! answer 401 with a sentence rather than a failed handshake; and a client that trusts
//! only the cluster CA and presents its own certificate.

use crate::ca::Bundle;
use crate::{Result, TrustError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

fn invalid(what: &str, e: impl std::fmt::Display) -> TrustError {
    TrustError::Invalid { what: what.into(), reason: e.to_string() }
}

/// The CA's certificate(s) as a root store.
pub fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.map_err(|e| invalid("the CA certificate", e))?).map_err(|e| invalid("the CA certificate", e))?;
    }
    if roots.is_empty() {
        return Err(invalid("the CA certificate", "no certificate in it"));
    }
    Ok(Arc::new(roots))
}

fn chain_and_key(b: &Bundle) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = rustls_pemfile::certs(&mut b.cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid("the certificate", e))?;
    let key = rustls_pemfile::private_key(&mut b.key_pem.as_bytes())
        .map_err(|e| invalid("the private key", e))?
        .ok_or_else(|| invalid("the private key", "none in the bundle"))?;
    Ok((chain, key))
}

/// A server config presenting the bundle's certificate and verifying any client
/// certificate against the bundle's CA; a client without one still completes the
/// handshake (the middleware refuses its requests with 401).
pub fn server_config(b: &Bundle) -> Result<Arc<rustls::ServerConfig>> {
    let provider = crate::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&b.ca_pem)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| invalid("the client verifier", e))?;
    let (chain, key) = chain_and_key(b)?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("the TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| invalid("the server certificate", e))?;
    Ok(Arc::new(config))
}

/// A client config trusting only the bundle's CA and presenting the bundle's
/// certificate.
pub fn client_config(b: &Bundle) -> Result<Arc<rustls::ClientConfig>> {
    let (chain, key) = chain_and_key(b)?;
    let config = rustls::ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("the TLS versions", e))?
        .with_root_certificates(roots(&b.ca_pem)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| invalid("the client certificate", e))?;
    Ok(Arc::new(config))
}

/// A client config trusting only `ca_pem` and presenting no certificate: a host that
/// has not joined yet, a test acting as a stranger.
pub fn anonymous_client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    let config = rustls::ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("the TLS versions", e))?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
