//! QEMU's own streams (live migration, NBD) under the cluster CA. QEMU reads its TLS
//! credentials from files (`tls-creds-x509`: a directory of PEM files), so a host's
//! bundle is written out for it: the CA, and the host's certificate and key both as the
//! server's (a destination) and the client's (a source). The key files are readable by
//! their owner only, in a directory only its owner may enter.
//!
//! QEMU authorizes a peer by the Distinguished Name of its client certificate
//! (`authz-simple`'s `identity`); [`qemu_dn`] is that name for an identity this CA
//! issued.

use crate::ca::Bundle;
use crate::{Result, TrustError};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The files of a `tls-creds-x509` directory QEMU reads: the CA, the host's certificate
/// and key as a server and as a client, and the Diffie-Hellman group of a server.
pub const FILES: [&str; 6] = ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem", "dh-params.pem"];

/// The ffdhe2048 group of RFC 7919 (PKCS#3), QEMU's `dh-params.pem`. Without the file a
/// server endpoint generates 2048-bit parameters at `object-add`: measured here 2.6 s
/// against 0.04 s with the file (a TLS `qemu-nbd` until it listens), and over 10 s on
/// a loaded machine, in every incoming migration's preparation.
/// A published group is as safe (and TLS 1.3 uses ECDHE anyway).
pub const DH_PARAMS_PEM: &str = "\
-----BEGIN DH PARAMETERS-----\n\
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz\n\
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a\n\
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7\n\
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi\n\
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD\n\
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==\n\
-----END DH PARAMETERS-----\n\
";

/// The Distinguished Name QEMU (gnutls) reports for the certificate this CA issued to
/// `name`, whatever its role: the identity an `authz-simple` object must name to let
/// that peer in. Every leaf certificate carries `CN=<name>, O=walkabout`
/// (`ca::leaf_params`); gnutls prints it in that order.
pub fn qemu_dn(name: &str) -> String {
    format!("CN={name},O=walkabout")
}

fn io_err(path: &Path, source: std::io::Error) -> TrustError {
    TrustError::Io { path: path.display().to_string(), source }
}

/// Writes `bundle` into `dir` as QEMU's x509 credentials ([`FILES`]): the directory is
/// made (or set) to mode 0700 and every file 0600. Files already holding the same
/// bytes are left alone, so concurrent migrations of one agent do not race on them.
pub fn write_qemu_creds(bundle: &Bundle, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))?;
    let dh = DH_PARAMS_PEM.to_string();
    let contents = [&bundle.ca_pem, &bundle.cert_pem, &bundle.key_pem, &bundle.cert_pem, &bundle.key_pem, &dh];
    for (name, text) in FILES.iter().zip(contents) {
        let path = dir.join(name);
        let same = std::fs::read(&path).is_ok_and(|old| old == text.as_bytes());
        let private = std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o077 == 0);
        if !(same && private) {
            write_unique(&path, text.as_bytes())?;
        }
    }
    Ok(())
}

/// Writes `data` to `path` (0600) through a temporary file of this call's own, renamed
/// over it: a reader sees the old file or the new one, whole.
fn write_unique(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, Role};

    #[test]
    fn the_creds_directory_is_private_and_holds_the_bundle_for_both_ends() {
        let ca = Ca::generate("t").expect("ca");
        let b = ca.issue("h1", Role::Host, &["127.0.0.1".into()]).expect("issue");
        let dir = std::env::temp_dir().join(format!("wa-qemu-creds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_qemu_creds(&b, &dir).expect("write");
        write_qemu_creds(&b, &dir).expect("write again, unchanged");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in FILES {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("read");
        assert_eq!(read("ca-cert.pem"), b.ca_pem);
        assert_eq!(read("server-cert.pem"), b.cert_pem);
        assert_eq!(read("client-key.pem"), b.key_pem);
        assert!(read("dh-params.pem").starts_with("-----BEGIN DH PARAMETERS-----\n"));
        let left: Vec<_> = std::fs::read_dir(&dir).expect("ls").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(left.len(), FILES.len(), "no temporary file left: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_dn_qemu_checks_is_the_subject_of_the_certificate_the_ca_issued() {
        use x509_parser::prelude::*;
        let ca = Ca::generate("t").expect("ca");
        let b = ca.issue("h7", Role::Host, &[]).expect("issue");
        let der = crate::ca::first_der(&b.cert_pem, "cert").expect("der");
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        // Attributes in the certificate's order, as gnutls prints them (`CN=..,O=..`).
        let parts: Vec<String> = cert
            .subject()
            .iter_attributes()
            .map(|a| {
                let key = if a.attr_type().to_id_string() == "2.5.4.3" { "CN" } else { "O" };
                format!("{key}={}", a.as_str().expect("text"))
            })
            .collect();
        assert_eq!(parts.join(","), qemu_dn("h7"));
    }
}
