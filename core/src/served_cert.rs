//! A listener's certificate that can be replaced while the listener runs: a rustls
//! certificate resolver over the current certificate chain and key. Each new handshake
//! reads the current pair; a handshake that already happened keeps the pair it got, so
//! open connections are never dropped by a reload. A new pair replaces the old one only
//! once it parsed and its key was proved to match its certificate; otherwise the old one
//! stays served and the caller gets a [`CertError`] naming the file.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::CertError;

/// What is served now.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The leaf certificate's notAfter, Unix seconds.
    not_after: i64,
}

/// A checked pair, not yet served ([`ServedCert::prepare`]).
pub struct PreparedPair(Loaded);

/// The certificate and key a listener serves; see the module docs.
#[derive(Debug)]
pub struct ServedCert {
    current: RwLock<Loaded>,
}

impl ServedCert {
    /// Loads the pair at `cert` (PEM chain, leaf first) and `key` (PEM private key).
    pub fn load(cert: &Path, key: &Path) -> Result<ServedCert, CertError> {
        Ok(ServedCert {
            current: RwLock::new(read_pair(cert, key)?),
        })
    }

    /// Replaces the served pair with the one at `cert`/`key`, or keeps the old one and
    /// says why not. Returns the new leaf's notAfter (Unix seconds).
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<i64, CertError> {
        Ok(self.install(Self::prepare(cert, key)?))
    }

    /// Reads and checks the pair at `cert`/`key` without serving it yet (a reload that
    /// must check everything before it changes anything).
    pub fn prepare(cert: &Path, key: &Path) -> Result<PreparedPair, CertError> {
        read_pair(cert, key).map(PreparedPair)
    }

    /// Serves `pair` from the next handshake on; returns its leaf's notAfter (Unix seconds).
    pub fn install(&self, pair: PreparedPair) -> i64 {
        let not_after = pair.0.not_after;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = pair.0;
        not_after
    }

    /// The served leaf certificate's notAfter, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.current.read().unwrap_or_else(|p| p.into_inner()).not_after
    }
}

impl ResolvesServerCert for ServedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).key.clone())
    }
}

/// Reads and checks one pair: both files parse, the chain is not empty, the key is one the
/// process's crypto provider can sign with, and it belongs to the leaf certificate.
fn read_pair(cert: &Path, key: &Path) -> Result<Loaded, CertError> {
    let bad = |k: &'static str, f: &Path, m: String| CertError {
        key: k,
        file: f.display().to_string(),
        message: m,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("tls_cert_file", cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls_cert_file", cert, e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(bad("tls_cert_file", cert, "no certificate in the file".into()));
    };
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| bad("tls_cert_file", cert, format!("not an X.509 certificate: {e}")))?
        .1
        .validity()
        .not_after
        .timestamp();
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("tls_key_file", key, e.to_string()))?;
    let signer = crate::cluster_tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| bad("tls_key_file", key, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        bad(
            "tls_key_file",
            key,
            format!("the key does not belong to the certificate in {}: {e}", cert.display()),
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, String) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&c, ck.cert.pem()).unwrap();
        std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
        (c, k, ck.cert.pem())
    }

    fn served_leaf(s: &ServedCert) -> Vec<u8> {
        s.current.read().unwrap().key.cert[0].to_vec()
    }

    /// Property: a pair that does not parse or whose key belongs to another certificate
    /// never replaces the served one; a good pair does, at once.
    #[test]
    fn a_bad_pair_never_replaces_the_served_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1, _) = pair(dir.path(), "one");
        let (c2, k2, _) = pair(dir.path(), "two");
        let s = ServedCert::load(&c1, &k1).unwrap();
        let first = served_leaf(&s);
        let e = s.reload(&c2, &k1).unwrap_err();
        assert_eq!(e.key, "tls_key_file", "{e}");
        assert!(e.to_string().contains("does not belong"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem").unwrap();
        assert_eq!(s.reload(&garbage, &k1).unwrap_err().key, "tls_cert_file");
        assert_eq!(s.reload(&c1, &garbage).unwrap_err().key, "tls_key_file");
        assert_eq!(served_leaf(&s), first, "the old pair stays served");
        s.reload(&c2, &k2).unwrap();
        assert_ne!(served_leaf(&s), first, "a good pair is served at once");
        assert!(s.not_after() > 0);
    }
}
