//! A cluster CA for a test cluster: created in a temporary directory (or a given one),
//! issuing host identities (valid at the addresses the hosts listen on) and operator
//! identities, each written as a bundle file the daemons and the CLI take with
//! `--identity`.

use crate::error::{Result, TestbedError};
use crate::files::TempDir;
use std::path::{Path, PathBuf};
use walkabout_trust::{Ca, Role};

/// A test cluster's CA and the identity files it issued.
#[derive(Debug)]
pub struct TestCa {
    ca: Ca,
    dir: PathBuf,
    _tmp: Option<TempDir>,
}

fn trust_err(what: &str, e: walkabout_trust::TrustError) -> TestbedError {
    TestbedError::io(what.to_string(), std::io::Error::other(e.to_string()))
}

impl TestCa {
    /// A new CA in a temporary directory removed on drop.
    pub fn new() -> Result<TestCa> {
        let tmp = TempDir::new("ca")?;
        let mut ca = TestCa::in_dir(tmp.path())?;
        ca._tmp = Some(tmp);
        Ok(ca)
    }

    /// A new CA in `dir` (`ca.crt`, `ca.key`; identities beside them).
    pub fn in_dir(dir: &Path) -> Result<TestCa> {
        let ca = Ca::init(dir, "test").map_err(|e| trust_err("creating a test CA", e))?;
        Ok(TestCa { ca, dir: dir.to_path_buf(), _tmp: None })
    }

    /// The CA's directory (what `walkabout controller --ca-dir` takes).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA itself.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Issues `name` with `role`, valid at `addrs`, written to `DIR/NAME.pem`.
    pub fn identity(&self, name: &str, role: Role, addrs: &[&str]) -> Result<PathBuf> {
        let sans: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let b = self.ca.issue(name, role, &sans).map_err(|e| trust_err(&format!("issuing {name}"), e))?;
        let path = self.dir.join(format!("{name}.pem"));
        b.save(&path).map_err(|e| trust_err(&format!("writing {}", path.display()), e))?;
        Ok(path)
    }

    /// A host identity for `name` listening at IP `addr`.
    pub fn host(&self, name: &str, addr: &str) -> Result<PathBuf> {
        self.identity(name, Role::Host, &[addr, "localhost"])
    }

    /// The CA this process shares among the agents it starts in network namespaces
    /// without an identity of their own (plain HTTP is for loopback only), created on
    /// first use with an operator identity that becomes this process's client TLS
    /// (`walkabout_api::client::set_process_tls`). Its files stay in /tmp for the
    /// process's life.
    pub fn shared() -> Result<&'static TestCa> {
        static SHARED: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = INIT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(ca) = SHARED.get() {
            return Ok(ca);
        }
        let dir = std::env::temp_dir().join(format!("wa-shared-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = TestCa::in_dir(&dir)?;
        let op = ca.user("operator", Role::Operator)?;
        let bundle = walkabout_trust::Bundle::load(&op).map_err(|e| trust_err("reading the shared operator", e))?;
        let tls = walkabout_trust::tls::client_config(&bundle).map_err(|e| trust_err("the shared operator's TLS", e))?;
        walkabout_api::client::set_process_tls(tls);
        Ok(SHARED.get_or_init(|| ca))
    }

    /// The shared CA's operator identity (see [`TestCa::shared`]).
    pub fn operator(&self) -> PathBuf {
        self.dir.join("operator.pem")
    }

    /// An operator (`Role::Operator`) or viewer identity.
    pub fn user(&self, name: &str, role: Role) -> Result<PathBuf> {
        self.identity(name, role, &[])
    }
}
