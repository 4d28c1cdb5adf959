//! The cluster CA: created once (`walkabout ca init`), it signs every certificate of the
//! cluster. A certificate is issued with its key (operators, the controller itself, a
//! testbed's hosts) or signed from a joining host's CSR (the key never leaves the host).
//! Every process holds one [`Bundle`]: its certificate, its private key and the CA's
//! certificate, in one PEM file written readable by its owner only.

use crate::identity::{Identity, Role};
use crate::{Result, TrustError};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// File name of the CA's certificate in its directory.
pub const CA_CERT: &str = "ca.crt";
/// File name of the CA's private key in its directory (mode 0600).
pub const CA_KEY: &str = "ca.key";

/// How long a certificate the CA issues is valid.
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// How long the CA itself is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);

fn generate_err(what: &str, e: impl std::fmt::Display) -> TrustError {
    TrustError::Generate { what: what.into(), reason: e.to_string() }
}

fn io_err(path: &Path, source: std::io::Error) -> TrustError {
    TrustError::Io { path: path.display().to_string(), source }
}

/// A random serial number (positive, 16 bytes).
fn serial() -> Result<SerialNumber> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| generate_err("a serial number", "no randomness"))?;
    b[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&b))
}

/// Parses each of `sans` as an IP address or a DNS name.
fn san_entries(sans: &[String]) -> Result<Vec<SanType>> {
    sans.iter()
        .map(|s| match s.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => s
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| TrustError::Invalid { what: format!("address {s:?}"), reason: format!("not an IP or DNS name: {e}") }),
        })
        .collect()
}

/// The parameters of a leaf certificate for `name` with `role`, valid for `sans` (IP
/// addresses or DNS names the holder serves at; may be empty for a client only).
fn leaf_params(name: &str, role: Role, sans: Vec<SanType>) -> Result<CertificateParams> {
    if !crate::valid_name(name) {
        return Err(TrustError::BadName(name.into()));
    }
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name.push(DnType::OrganizationName, "walkabout");
    let uri = role.uri().try_into().map_err(|e| generate_err("a role URI", e))?;
    p.subject_alt_names = std::iter::once(SanType::URI(uri)).chain(sans).collect();
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + LEAF_VALIDITY;
    p.serial_number = Some(serial()?);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// Writes `data` to `path` readable by its owner only (0600), whole or not at all.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// The cluster's certificate authority: its certificate and its private key.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA for the cluster `cluster` (its name goes into the CA's common name).
    pub fn generate(cluster: &str) -> Result<Ca> {
        let key = KeyPair::generate().map_err(|e| generate_err("the CA key", e))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, format!("walkabout CA {cluster}"));
        p.distinguished_name.push(DnType::OrganizationName, "walkabout");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::hours(1);
        p.not_after = now + CA_VALIDITY;
        p.serial_number = Some(serial()?);
        let cert = p.self_signed(&key).map_err(|e| generate_err("the CA certificate", e))?;
        let cert_pem = cert.pem();
        Ok(Ca { cert, key, cert_pem })
    }

    /// Creates a CA in `dir` (`ca.crt`, and `ca.key` readable by its owner only). Refuses
    /// a directory that already holds one.
    pub fn init(dir: &Path, cluster: &str) -> Result<Ca> {
        if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
            return Err(TrustError::CaExists(dir.display().to_string()));
        }
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let ca = Ca::generate(cluster)?;
        write_private(&dir.join(CA_KEY), ca.key.serialize_pem().as_bytes())?;
        write_private(&dir.join(CA_CERT), ca.cert_pem.as_bytes())?;
        Ok(ca)
    }

    /// The CA kept in `dir` by [`Ca::init`].
    pub fn load(dir: &Path) -> Result<Ca> {
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        let cert_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?)
            .map_err(|e| TrustError::Invalid { what: key_path.display().to_string(), reason: e.to_string() })?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|e| TrustError::Invalid { what: cert_path.display().to_string(), reason: e.to_string() })?;
        // Same subject and key as the file's certificate: what it signs chains to it.
        let cert = params.self_signed(&key).map_err(|e| generate_err("the CA certificate", e))?;
        Ok(Ca { cert, key, cert_pem })
    }

    /// The CA's certificate (PEM), what every process trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new key and a certificate for `name` with `role`, valid at `sans` (IP addresses
    /// or DNS names), as a bundle.
    pub fn issue(&self, name: &str, role: Role, sans: &[String]) -> Result<Bundle> {
        let key = KeyPair::generate().map_err(|e| generate_err(&format!("a key for {name}"), e))?;
        let params = leaf_params(name, role, san_entries(sans)?)?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(|e| generate_err(&format!("a certificate for {name}"), e))?;
        Ok(Bundle { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem: self.cert_pem.clone() })
    }

    /// Signs a CSR (PEM) for `name` with `role`: the certificate (PEM). Only the CSR's
    /// key and its IP/DNS names are taken; the name and role are the CA's to give.
    pub fn sign_csr(&self, csr_pem: &str, name: &str, role: Role) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| TrustError::Invalid { what: format!("the CSR of {name}"), reason: e.to_string() })?;
        let sans: Vec<SanType> =
            csr.params.subject_alt_names.into_iter().filter(|s| matches!(s, SanType::IpAddress(_) | SanType::DnsName(_))).collect();
        let params = leaf_params(name, role, sans)?;
        let signed = CertificateSigningRequestParams { params, public_key: csr.public_key }
            .signed_by(&self.cert, &self.key)
            .map_err(|e| generate_err(&format!("a certificate for {name}"), e))?;
        Ok(signed.pem())
    }
}

/// A new private key (PEM) and a CSR (PEM) for `name`, valid at `sans`: what a joining
/// host sends; the key stays with it.
pub fn csr(name: &str, sans: &[String]) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(|e| generate_err(&format!("a key for {name}"), e))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.subject_alt_names = san_entries(sans)?;
    let req = p.serialize_request(&key).map_err(|e| generate_err(&format!("a CSR for {name}"), e))?;
    let pem = req.pem().map_err(|e| generate_err(&format!("a CSR for {name}"), e))?;
    Ok((key.serialize_pem(), pem))
}

/// What a process holds: its certificate, its private key and the CA's certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The process's certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// The cluster CA's certificate (PEM).
    pub ca_pem: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl Bundle {
    /// The bundle as one PEM file: the certificate, the CA's certificate, the key.
    pub fn to_pem(&self) -> String {
        format!("{}{}{}", ensure_nl(&self.cert_pem), ensure_nl(&self.ca_pem), ensure_nl(&self.key_pem))
    }

    /// Reads a bundle written by [`Bundle::to_pem`]; `what` names it in errors.
    pub fn from_pem(pem: &str, what: &str) -> Result<Bundle> {
        let bad = |reason: &str| TrustError::Invalid { what: what.into(), reason: reason.into() };
        let mut certs = vec![];
        let mut key = None;
        for item in rustls_pemfile::read_all(&mut pem.as_bytes()) {
            match item.map_err(|e| bad(&format!("not PEM: {e}")))? {
                rustls_pemfile::Item::X509Certificate(c) => certs.push(c),
                rustls_pemfile::Item::Pkcs8Key(_) | rustls_pemfile::Item::Sec1Key(_) | rustls_pemfile::Item::Pkcs1Key(_) => {
                    key = Some(());
                }
                _ => {}
            }
        }
        if certs.len() != 2 || key.is_none() {
            return Err(bad("expected a certificate, the CA's certificate and a private key (walkabout user add / host join)"));
        }
        // Re-split the text so each part keeps its exact PEM.
        let blocks = pem_blocks(pem);
        let certs: Vec<&String> = blocks.iter().filter(|b| b.contains("BEGIN CERTIFICATE")).collect();
        let key = blocks.iter().find(|b| b.contains("PRIVATE KEY")).ok_or_else(|| bad("no private key"))?;
        let (Some(cert), Some(ca)) = (certs.first(), certs.get(1)) else {
            return Err(bad("expected two certificates"));
        };
        let b = Bundle { cert_pem: (*cert).clone(), key_pem: key.clone(), ca_pem: (*ca).clone() };
        b.identity().map_err(|e| bad(&e.to_string()))?;
        Ok(b)
    }

    /// Reads the bundle file at `path`.
    pub fn load(path: &Path) -> Result<Bundle> {
        Bundle::from_pem(&read(path)?, &path.display().to_string())
    }

    /// Writes the bundle to `path`, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        write_private(path, self.to_pem().as_bytes())
    }

    /// The identity the bundle's certificate carries.
    pub fn identity(&self) -> Result<Identity> {
        let der = first_der(&self.cert_pem, "the bundle's certificate")?;
        Identity::from_der(&der)
    }
}

/// The DER of the first certificate in `pem`.
pub(crate) fn first_der(pem: &str, what: &str) -> Result<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .and_then(|c| c.ok())
        .map(|c| c.to_vec())
        .ok_or_else(|| TrustError::Invalid { what: what.into(), reason: "no certificate in it".into() })
}

fn ensure_nl(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// The `-----BEGIN ...-----` to `-----END ...-----` blocks of a PEM text, in order.
fn pem_blocks(pem: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur: Option<String> = None;
    for line in pem.lines() {
        if line.starts_with("-----BEGIN ") {
            cur = Some(String::new());
        }
        if let Some(c) = cur.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
        if line.starts_with("-----END ") {
            out.extend(cur.take());
        }
    }
    out
}

/// Where the files of a CA directory are.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(CA_CERT), dir.join(CA_KEY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_bundle_carries_its_name_and_role_and_round_trips_as_one_file() {
        let ca = Ca::generate("t").expect("ca");
        let b = ca.issue("alice", Role::Viewer, &[]).expect("issue");
        assert_eq!(b.identity().expect("id"), Identity { name: "alice".into(), role: Role::Viewer });
        let back = Bundle::from_pem(&b.to_pem(), "alice.pem").expect("parse");
        assert_eq!(back, b);
    }

    #[test]
    fn a_csr_cannot_choose_its_role() {
        let ca = Ca::generate("t").expect("ca");
        let (_key, csr) = csr("h1", &["127.0.0.1".into()]).expect("csr");
        let cert = ca.sign_csr(&csr, "h1", Role::Host).expect("sign");
        let id = Identity::from_der(&first_der(&cert, "cert").expect("der")).expect("id");
        assert_eq!(id, Identity { name: "h1".into(), role: Role::Host });
    }

    #[test]
    fn init_refuses_to_overwrite_a_ca_and_load_signs_what_chains() {
        let dir = std::env::temp_dir().join(format!("walkabout-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::init(&dir, "t").expect("init");
        assert!(matches!(Ca::init(&dir, "t"), Err(TrustError::CaExists(_))));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(CA_KEY)).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = Ca::load(&dir).expect("load");
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let b = loaded.issue("bob", Role::Operator, &[]).expect("issue");
        assert_eq!(b.ca_pem, ca.cert_pem());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_name_is_refused() {
        let ca = Ca::generate("t").expect("ca");
        assert!(matches!(ca.issue("bad\nname", Role::Operator, &[]), Err(TrustError::BadName(_))));
    }
}
