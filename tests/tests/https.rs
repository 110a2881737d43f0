//! The query service over HTTPS (`QUERY_TLS_CERT_FILE`, `QUERY_TLS_KEY_FILE`), run as the
//! real binary with a CA and certificates made here: it answers HTTPS only, picks a renewed
//! certificate up without a restart, keeps serving the last good one when the files are
//! broken, and refuses to start with half the configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etl_tests::{free_local_addr, wait_for, ServiceProcess, TestDb};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

const DEADLINE: Duration = Duration::from_secs(30);

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Not rcgen's default name, which the leaf has too: OpenSSL takes a leaf whose issuer is
        // its own name for self-signed.
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "etl test CA");
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A certificate for 127.0.0.1 and localhost: (PEM, DER, key PEM).
    fn server_cert(&self) -> (String, Vec<u8>, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), cert.der().to_vec(), key.serialize_pem())
    }
}

/// Writes `contents` to `path` the way a renewal does: whole, by renaming a finished file.
fn replace(path: &Path, contents: &str) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, contents).unwrap();
    std::fs::rename(&fresh, path).unwrap();
}

/// A client that trusts `ca` only. Each check makes a new one: a client's cached TLS session
/// would be resumed, and a resumed session presents no certificate at all.
fn client(ca: &Ca) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.issuer.pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .tls_info(true)
        .build()
        .unwrap()
}

/// The certificate the server presented to this request.
fn served_cert(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("a TLS connection")
        .to_vec()
}

struct TlsDir(PathBuf);

impl Drop for TlsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn the_query_service_serves_https_and_picks_up_a_renewed_certificate_without_a_restart() {
    let db = TestDb::new().await;
    let ca = Ca::new();
    let dir = TlsDir(std::env::temp_dir().join(format!(
        "etl-https-test-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (cert_path, key_path) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
    let (first_pem, first_der, first_key) = ca.server_cert();
    replace(&cert_path, &first_pem);
    replace(&key_path, &first_key);

    let addr = free_local_addr();
    let mut query = ServiceProcess::start(
        "etl-query",
        &[
            ("DATABASE_URL", db.url.clone()),
            ("QUERY_ADDR", addr.to_string()),
            ("QUERY_TLS_CERT_FILE", cert_path.display().to_string()),
            ("QUERY_TLS_KEY_FILE", key_path.display().to_string()),
        ],
    );
    let url = format!("https://127.0.0.1:{}/health", addr.port());
    let served = wait_for("the service over HTTPS", DEADLINE, || async {
        let response = client(&ca).get(&url).send().await.ok()?;
        assert_eq!(response.status(), 200);
        Some(served_cert(&response))
    })
    .await;
    assert_eq!(served, first_der);
    let plain = reqwest::get(format!("http://{addr}/health")).await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP is not served on the HTTPS port"
    );

    // Renewed: a new key and certificate, written over the old files.
    let (second_pem, second_der, second_key) = ca.server_cert();
    replace(&key_path, &second_key);
    replace(&cert_path, &second_pem);
    wait_for("the renewed certificate", DEADLINE, || async {
        let response = client(&ca).get(&url).send().await.ok()?;
        (served_cert(&response) == second_der).then_some(())
    })
    .await;

    // Broken files do not take HTTPS down: the last good certificate stays.
    replace(&cert_path, "-----BEGIN CERTIFICATE-----\nnot base64\n");
    // (The files are looked at when a handshake comes, at most once a second.)
    wait_for("the failed reload to be logged", DEADLINE, || async {
        let _ = client(&ca).get(&url).send().await;
        query
            .log()
            .contains("still serving the previous certificate")
            .then_some(())
    })
    .await;
    let response = client(&ca).get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_cert(&response), second_der);
    assert_eq!(query.stop().await, Some(0), "{}", query.log_tail());
    assert!(
        query.log().contains("TLS certificate reloaded"),
        "{}",
        query.log_tail()
    );

    // Half the configuration, or a pair that does not load, stops the start with the reason.
    for (env, says) in [
        (
            vec![("QUERY_TLS_CERT_FILE", cert_path.display().to_string())],
            "QUERY_TLS_KEY_FILE",
        ),
        (
            vec![
                ("QUERY_TLS_CERT_FILE", cert_path.display().to_string()),
                ("QUERY_TLS_KEY_FILE", key_path.display().to_string()),
            ],
            "tls.crt",
        ),
    ] {
        let output = tokio::process::Command::new(etl_tests::service_binary("etl-query"))
            .env("DATABASE_URL", &db.url)
            .env("QUERY_ADDR", "127.0.0.1:0")
            .envs(env)
            .output()
            .await
            .unwrap();
        let logs = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{logs}");
        assert!(logs.contains(says), "the error names {says}: {logs}");
    }
}
