//! HTTPS served by the query service itself, for clients that must not speak plain HTTP even
//! inside the cluster: `QUERY_TLS_CERT_FILE` (PEM chain, leaf first) and `QUERY_TLS_KEY_FILE`
//! (PEM private key). rustls on ring, like every other TLS in the project.
//!
//! A renewed certificate (cert-manager rewriting its Secret, certbot, a rotated file) is
//! picked up without a restart: at most once a second a handshake looks at both files'
//! modification times and sizes, and loads them again when they changed. A pair that does not
//! load (half written, a key that does not match) keeps the certificate served so far, and
//! says so in the log.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use etl_shared::config::{ConfigError, Env};
use poem::http::uri::Scheme;
use poem::listener::{Acceptor, TcpAcceptor};
use poem::web::{LocalAddr, RemoteAddr};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub const CERT_FILE_VAR: &str = "QUERY_TLS_CERT_FILE";
pub const KEY_FILE_VAR: &str = "QUERY_TLS_KEY_FILE";

/// How often a handshake may look whether the files changed.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A client that opens a connection and never finishes its handshake is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the certificate and its key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Both variables, or neither (plain HTTP); one alone is an error.
    pub fn from_env(env: &Env) -> Result<Option<Self>, ConfigError> {
        match (env.get(CERT_FILE_VAR)?, env.get(KEY_FILE_VAR)?) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: cert.into(),
                key: key.into(),
            })),
            (Some(_), None) => Err(ConfigError::Missing {
                var: KEY_FILE_VAR.into(),
                hint: format!(" ({CERT_FILE_VAR} is set: HTTPS needs the key too)"),
            }),
            (None, Some(_)) => Err(ConfigError::Missing {
                var: CERT_FILE_VAR.into(),
                hint: format!(" ({KEY_FILE_VAR} is set: HTTPS needs the certificate too)"),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("the key in {key} does not fit the certificate in {cert}: {reason}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS setup failed: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate and key `files` hold, checked to belong together.
fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    };
    let cert_pem = read(&files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Read {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| TlsError::Key {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        })
}

/// What tells that a file changed: its modification time and size.
type Stamp = [Option<(SystemTime, u64)>; 2];

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.cert, &files.key].map(|path| {
        std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
}

/// Serves the certificate last loaded, loading the files again when they change.
#[derive(Debug)]
struct ReloadingCert {
    files: TlsFiles,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    checked: Instant,
}

impl ReloadingCert {
    fn refreshed(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().expect("never held across a panic");
        if current.checked.elapsed() >= RELOAD_CHECK_INTERVAL {
            current.checked = Instant::now();
            let now = stamp(&self.files);
            if now != current.stamp {
                // Taken as seen either way: a pair that fails waits for the next change.
                current.stamp = now;
                match load(&self.files) {
                    Ok(key) => {
                        current.key = key;
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "the TLS files changed but do not load; still serving the previous certificate"
                    ),
                }
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.refreshed())
    }
}

/// Accepts TCP connections and serves them over TLS. The handshake happens on the
/// connection's own task (in [`Handshaking`]), so a slow client never holds up the others.
pub struct TlsAcceptor {
    inner: TcpAcceptor,
    tls: tokio_rustls::TlsAcceptor,
}

impl TlsAcceptor {
    /// Loads `files` (a pair that does not load stops the start) and wraps `inner`.
    pub fn new(inner: TcpAcceptor, files: TlsFiles) -> Result<Self, TlsError> {
        let key = load(&files)?;
        let resolver = ReloadingCert {
            current: Mutex::new(Current {
                key,
                stamp: stamp(&files),
                checked: Instant::now(),
            }),
            files,
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            inner,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

impl Acceptor for TlsAcceptor {
    type Io = Handshaking;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let (stream, local, remote, _) = self.inner.accept().await?;
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(stream));
        let handshake = Box::pin(async move {
            handshake.await.unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the TLS handshake took too long",
                ))
            })
        });
        Ok((
            Handshaking::Pending(handshake),
            local,
            remote,
            Scheme::HTTPS,
        ))
    }
}

type Handshake =
    Pin<Box<dyn Future<Output = io::Result<tokio_rustls::server::TlsStream<TcpStream>>> + Send>>;

/// A connection whose TLS handshake completes on its first read or write.
pub enum Handshaking {
    Pending(Handshake),
    Ready(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Failed,
}

impl Handshaking {
    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<&mut tokio_rustls::server::TlsStream<TcpStream>>> {
        if let Handshaking::Pending(handshake) = self {
            match handshake.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(stream)) => *self = Handshaking::Ready(Box::new(stream)),
                Poll::Ready(Err(e)) => {
                    *self = Handshaking::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        match self {
            Handshaking::Ready(stream) => Poll::Ready(Ok(stream)),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake failed",
            ))),
        }
    }
}

impl AsyncRead for Handshaking {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_read(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Handshaking {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_write(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_flush(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_shutdown(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}
