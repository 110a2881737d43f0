//! TLS to Postgres, configured the way libpq is: `sslmode` and `sslrootcert` in the connection
//! URL. rustls (with ring) rather than OpenSSL, so the binaries need no system TLS library.
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | never | – |
//! | `prefer` (default) | if the server offers it | no |
//! | `require` | always, or the connection fails | no; as `verify-ca` when `sslrootcert` is set (libpq does the same) |
//! | `verify-ca` | always | signed by a trusted CA |
//! | `verify-full` | always | signed by a trusted CA and names the host connected to |
//!
//! Trusted CAs are the PEM certificates in `sslrootcert`, or the system's roots without it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How much TLS a connection insists on (libpq's `sslmode`, `allow` aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Result<Self, TlsError> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(TlsError::Mode(format!(
                "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What the driver does with the server's answer to the TLS request.
    pub fn driver_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            Self::Disable => Driver::Disable,
            Self::Prefer => Driver::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => Driver::Require,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Mode(String),
    #[error("sslrootcert {path}: {reason}")]
    RootCert { path: PathBuf, reason: String },
    #[error("sslmode={mode} needs trusted CAs, and none were found in the system's store ({reason}); set sslrootcert to the CA's PEM file")]
    NoSystemRoots { mode: &'static str, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS setup: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// The TLS part of the database settings, and the connector built from it once at start.
#[derive(Clone)]
pub struct Tls {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub connector: MakeRustlsConnect,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the CA file (or the system's roots) now, so a bad path fails at start.
    pub fn new(mode: SslMode, root_cert: Option<PathBuf>) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let checks = match (mode, &root_cert) {
            (SslMode::Disable, _) => Checks::None, // never used: the driver does not ask for TLS
            (SslMode::Prefer, _) | (SslMode::Require, None) => Checks::None,
            (SslMode::Require | SslMode::VerifyCa, Some(_)) | (SslMode::VerifyCa, None) => {
                Checks::Chain
            }
            (SslMode::VerifyFull, _) => Checks::Full,
        };
        let config = match checks {
            Checks::Full => builder.with_webpki_verifier(webpki_verifier(
                mode,
                root_cert.as_deref(),
                &provider,
            )?),
            Checks::None | Checks::Chain => {
                let chain = match checks {
                    Checks::Chain => Some(webpki_verifier(mode, root_cert.as_deref(), &provider)?),
                    _ => None,
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NameNotChecked {
                        chain,
                        algorithms: provider.signature_verification_algorithms,
                    }))
            }
        }
        .with_no_client_auth();
        Ok(Self {
            mode,
            root_cert,
            connector: MakeRustlsConnect::new(config),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checks {
    None,
    Chain,
    Full,
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let error = |reason: String| TlsError::RootCert {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| error(e.to_string()))? {
        let cert = cert.map_err(|e| error(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| error(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(error("holds no PEM certificate".into()));
    }
    Ok(roots)
}

fn system_roots(mode: SslMode) -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let reason = found
            .errors
            .first()
            .map_or_else(|| "it is empty".to_owned(), ToString::to_string);
        return Err(TlsError::NoSystemRoots {
            mode: mode.as_str(),
            reason,
        });
    }
    Ok(roots)
}

/// The standard check (chain to a trusted CA, then the host name), against `sslrootcert` or
/// the system's roots.
fn webpki_verifier(
    mode: SslMode,
    root_cert: Option<&Path>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let roots = Arc::new(match root_cert {
        Some(path) => roots_from_file(path)?,
        None => system_roots(mode)?,
    });
    Ok(WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?)
}

/// The modes that do not compare the host name. `verify-ca` (`chain` set): the chain must lead
/// to a trusted CA; webpki checks the chain before the name, so a name mismatch means the chain
/// was good. `prefer` and `require` without a CA (`chain` unset): any certificate is taken
/// (libpq's behaviour; it protects against passive listeners only). Either way the handshake's
/// signatures are checked, so the server must hold the key of the certificate it shows.
#[derive(Debug)]
struct NameNotChecked {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NameNotChecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL's query (the driver knows
/// neither `verify-*` nor `sslrootcert`) and returns the rest for the driver. Other URLs
/// (key=value strings) pass through untouched.
pub fn split_url(url: &str) -> (String, Option<String>, Option<String>) {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return (url.to_owned(), None, None);
    };
    let (mut mode, mut root_cert, mut kept) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(key).as_str() {
            "sslmode" => mode = Some(percent_decode(value)),
            "sslrootcert" => root_cert = Some(percent_decode(value)),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, mode, root_cert)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a connection failed, in words for the TLS cases a misconfiguration causes; `None` when
/// the failure is not about TLS.
pub fn explain(error: &(dyn std::error::Error + 'static), tls: &Tls) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(rustls::Error::InvalidCertificate(cert)) = e.downcast_ref::<rustls::Error>() {
            let trusted = match &tls.root_cert {
                Some(path) => format!("the CA in sslrootcert ({})", path.display()),
                None => "any CA in the system's store".to_owned(),
            };
            return Some(match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the server's certificate is not signed by {trusted} (sslmode={})",
                    tls.mode.as_str()
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => format!(
                    "the server's certificate does not name the host connected to \
                     (sslmode=verify-full compares them; the certificate's names: {cert:?})"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the server's certificate has expired".to_owned()
                }
                other => format!("the server's certificate was refused: {other:?}"),
            });
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(text) = explain(inner, tls) {
                    return Some(text);
                }
            }
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url_and_the_rest_kept() {
        assert_eq!(
            split_url("postgres://u:p@h:5/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&options=-c%20x%3D1"),
            (
                "postgres://u:p@h:5/db?options=-c%20x%3D1".to_owned(),
                Some("verify-full".to_owned()),
                Some("/etc/ca.pem".to_owned())
            )
        );
        assert_eq!(
            split_url("postgres://h/db?sslmode=disable"),
            (
                "postgres://h/db".to_owned(),
                Some("disable".to_owned()),
                None
            )
        );
        assert_eq!(
            split_url("host=h dbname=d"),
            ("host=h dbname=d".to_owned(), None, None)
        );
    }

    #[test]
    fn an_unknown_sslmode_is_refused_naming_the_choices() {
        let err = SslMode::parse("verify_full").unwrap_err().to_string();
        assert!(err.contains("verify-full"), "{err}");
    }

    #[test]
    fn a_missing_ca_file_is_an_error_naming_it() {
        let err = Tls::new(SslMode::VerifyFull, Some("/nonexistent/ca.pem".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslrootcert /nonexistent/ca.pem"), "{err}");
    }
}
