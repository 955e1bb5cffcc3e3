//! Cluster-channel TLS material: the active node's per-term ECDSA P-521 key and self-signed
//! certificate, and the rustls configurations both ends use.
//!
//! Each time a node becomes active it generates a fresh P-521 key (p521 crate) and a
//! self-signed, non-CA certificate (rcgen; CN and DNS SAN `fw-<uuid>`, EKU serverAuth +
//! clientAuth, valid from now-30 s). Both ends of the channel pin that exact certificate:
//! the active's listener requires it as the client certificate, standbys require it as the
//! server certificate and present it (with the advertised key) as their client certificate.
//! TLS 1.2 only (Vault's cluster channel minimum; TLS 1.0/1.1 and 1.3 are refused).

use std::sync::Arc;

use p521::elliptic_curve::sec1::ToEncodedPoint;
use p521::pkcs8::EncodePrivateKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::advert::{Advertisement, ClusterKeyParams};

/// ALPN protocols on the cluster channel: Vault's request-forwarding protocol name, then
/// h2 and HTTP/1.1 for our own forwarding and heartbeats.
pub const ALPN: [&[u8]; 3] = [b"req_fw_sb-act_v1", b"h2", b"http/1.1"];
/// Backdating of `not_before`, so small clock skew between nodes does not reject a fresh
/// certificate (Vault uses 30 s).
const NOT_BEFORE_SKEW: time::Duration = time::Duration::seconds(30);
/// Certificate lifetime. The key lives for one term only; the validity window is not what
/// limits it (pinning and replacement on each term are), so it is long, like Vault's.
const VALIDITY: time::Duration = time::Duration::days(365 * 30);

/// Cluster TLS failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClusterTlsError {
    #[error("generating the cluster key/certificate failed: {0}")]
    Generate(String),
    #[error("advertised cluster key is invalid: {0}")]
    BadKey(String),
    #[error("building the TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// The TLS SNI / DNS name for the term whose lock value is `uuid`.
pub fn server_name(uuid: &str) -> String {
    format!("fw-{uuid}")
}

/// The process-wide crypto provider: aws-lc-rs (ring cannot do P-521). Installed as the
/// default once; every config below is built on it explicitly.
pub fn provider() -> Arc<CryptoProvider> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// One term's cluster identity.
pub struct ClusterIdentity {
    pub uuid: String,
    pub cert_der: Vec<u8>,
    key_pkcs8: Zeroizing<Vec<u8>>,
    pub params: ClusterKeyParams,
}

impl std::fmt::Debug for ClusterIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterIdentity")
            .field("uuid", &self.uuid)
            .finish_non_exhaustive()
    }
}

fn key_from_scalar(d: &[u8]) -> Result<(Zeroizing<Vec<u8>>, ClusterKeyParams), ClusterTlsError> {
    let sk = p521::SecretKey::from_slice(d).map_err(|e| ClusterTlsError::BadKey(e.to_string()))?;
    params_and_der(&sk)
}

fn params_and_der(sk: &p521::SecretKey) -> Result<(Zeroizing<Vec<u8>>, ClusterKeyParams), ClusterTlsError> {
    let point = sk.public_key().to_encoded_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        return Err(ClusterTlsError::Generate("public key is the identity".into()));
    };
    let der = sk
        .to_pkcs8_der()
        .map_err(|e| ClusterTlsError::Generate(e.to_string()))?;
    let mut scalar = sk.to_bytes();
    let params = ClusterKeyParams {
        kind: "p521".into(),
        x: x.to_vec(),
        y: y.to_vec(),
        d: Zeroizing::new(scalar.to_vec()),
    };
    zeroize::Zeroize::zeroize(scalar.as_mut_slice());
    Ok((Zeroizing::new(der.as_bytes().to_vec()), params))
}

impl ClusterIdentity {
    /// A fresh P-521 key and self-signed non-CA certificate for the term `uuid`.
    pub fn generate(uuid: &str) -> Result<ClusterIdentity, ClusterTlsError> {
        let sk = p521::SecretKey::random(&mut rand::rngs::OsRng);
        let (key_pkcs8, params) = params_and_der(&sk)?;
        let gen = |e: rcgen::Error| ClusterTlsError::Generate(e.to_string());
        let pkcs8 = PrivatePkcs8KeyDer::from(key_pkcs8.as_slice());
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ECDSA_P521_SHA512).map_err(gen)?;
        let name = server_name(uuid);
        let mut cp = rcgen::CertificateParams::new(vec![name.clone()]).map_err(gen)?;
        cp.distinguished_name = rcgen::DistinguishedName::new();
        cp.distinguished_name.push(rcgen::DnType::CommonName, name);
        cp.is_ca = rcgen::IsCa::ExplicitNoCa;
        cp.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyAgreement,
        ];
        cp.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        cp.not_before = now - NOT_BEFORE_SKEW;
        cp.not_after = now + VALIDITY;
        let cert = cp.self_signed(&kp).map_err(gen)?;
        Ok(ClusterIdentity {
            uuid: uuid.to_string(),
            cert_der: cert.der().to_vec(),
            key_pkcs8,
            params,
        })
    }

    /// Rebuilds the identity a standby uses from an advertisement (`uuid` = lock value).
    pub fn from_advertisement(uuid: &str, adv: &Advertisement) -> Result<ClusterIdentity, ClusterTlsError> {
        let p = adv
            .cluster_key_params
            .as_ref()
            .ok_or_else(|| ClusterTlsError::BadKey("no key params".into()))?;
        if p.kind != "p521" {
            return Err(ClusterTlsError::BadKey(format!("unsupported key type {:?}", p.kind)));
        }
        let (key_pkcs8, params) = key_from_scalar(&p.d)?;
        if params.x != p.x || params.y != p.y {
            return Err(ClusterTlsError::BadKey(
                "public point does not match the private scalar".into(),
            ));
        }
        Ok(ClusterIdentity {
            uuid: uuid.to_string(),
            cert_der: adv.cluster_cert.clone(),
            key_pkcs8,
            params,
        })
    }

    pub fn server_name(&self) -> String {
        server_name(&self.uuid)
    }

    /// The private key, PKCS#8 DER (kept in memory only).
    pub fn key_pkcs8(&self) -> &[u8] {
        &self.key_pkcs8
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.to_vec()))
    }

    fn cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    /// The active's cluster listener: TLS 1.2, this cert, client cert required and equal to it.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, ClusterTlsError> {
        let provider = provider();
        let verifier = Arc::new(PinnedCert::new(self.cert(), &provider));
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert()], self.key_der())?;
        cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// A standby's client: TLS 1.2, presents this cert/key, accepts only this server cert.
    /// `alpn` picks the protocol to offer (`h2` or `http/1.1`).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, ClusterTlsError> {
        let provider = provider();
        let verifier = Arc::new(PinnedCert::new(self.cert(), &provider));
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.cert()], self.key_der())?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// Accepts exactly one certificate (byte-equal, compared in constant time) and checks the
/// handshake signature with it. This is the whole trust model of the cluster channel: the
/// certificate is only known to holders of the barrier key, through the advertisement.
#[derive(Debug)]
pub struct PinnedCert {
    cert: CertificateDer<'static>,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedCert {
    pub fn new(cert: CertificateDer<'static>, provider: &CryptoProvider) -> PinnedCert {
        PinnedCert {
            cert,
            algs: provider.signature_verification_algorithms,
        }
    }

    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let same = presented.len() == self.cert.len() && bool::from(presented.as_ref().ct_eq(self.cert.as_ref()));
        if same {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated cert is a non-CA leaf named `fw-<uuid>` with both EKUs, and the key
    /// params round-trip through an advertisement into the same identity.
    #[test]
    fn generate_and_rebuild_from_advertisement() {
        let id = ClusterIdentity::generate("abc").unwrap();
        assert_eq!(id.params.kind, "p521");
        assert_eq!(id.params.d.len(), 66, "P-521 scalar is 66 bytes");
        let adv = Advertisement {
            redirect_addr: "http://127.0.0.1:8200".into(),
            cluster_addr: "https://127.0.0.1:8201".into(),
            cluster_cert: id.cert_der.clone(),
            cluster_key_params: Some(id.params.clone()),
        };
        let back = ClusterIdentity::from_advertisement("abc", &adv).unwrap();
        assert_eq!(back.key_pkcs8(), id.key_pkcs8());
        // A tampered public point is refused.
        let mut bad = adv.clone();
        if let Some(p) = bad.cluster_key_params.as_mut() {
            p.x[0] ^= 1;
        }
        assert!(ClusterIdentity::from_advertisement("abc", &bad).is_err());
        // Non-CA leaf with both EKUs and the fw-<uuid> name.
        let (_, cert) = x509_parser::parse_x509_certificate(&id.cert_der).unwrap();
        let bc = cert.basic_constraints().unwrap();
        assert!(bc.is_none_or(|b| !b.value.ca), "leaf must not be a CA");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(cn, "fw-abc");
        assert!(id.server_config().is_ok());
        assert!(id.client_config(&[b"h2"]).is_ok());
    }
}
