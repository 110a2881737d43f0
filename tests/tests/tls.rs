//! TLS to Postgres: a private cluster that accepts TLS only (`hostssl` in pg_hba, plaintext
//! rejected), with a CA and server certificate made here. Each `sslmode` does what libpq's
//! documentation says, the three services and the normalizer's LISTEN connection work over
//! verified TLS, and a wrong CA or host name stops a service at start with the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etl_shared::db;
use etl_shared::DatabaseSettings;
use etl_tests::{service_binary, wait_for, Pipeline, SourceToml, SourcesFile, TestServer};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use xtask::pg::{Cluster, PgBinaries, Placement, ServerConfig};

const DEADLINE: Duration = Duration::from_secs(60);

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// A server certificate for `names` and its key, both PEM.
    fn server_cert(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Files the clients read (CA certificates), removed when the test ends.
struct ClientFiles(PathBuf);

impl ClientFiles {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "etl-tls-test-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for ClientFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TLS-only cluster whose certificate names `localhost` only (not `127.0.0.1`), signed by
/// `ca`, with the schema migrated over verified TLS.
async fn tls_only_cluster(ca: &Ca, ca_file: &Path) -> Cluster {
    let (cert, key) = ca.server_cert(&["localhost"]);
    let server = ServerConfig {
        settings: "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n".into(),
        files: vec![
            ("server.crt".into(), cert.into_bytes()),
            ("server.key".into(), key.into_bytes()),
        ],
        hba: Some(
            "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n".into(),
        ),
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pg-faults");
    let cluster = tokio::task::spawn_blocking(move || {
        xtask::pg::reap_stale(&dir);
        Cluster::start_configured(&PgBinaries::find()?, &dir, Placement::Preferred, &server)
    })
    .await
    .unwrap()
    .expect("a TLS-only cluster starts");
    let url = url(&cluster, "localhost", "verify-full", Some(ca_file));
    let settings = DatabaseSettings::from_url(&url).unwrap();
    etl_shared::migrate(&settings)
        .await
        .expect("migrations run over verified TLS");
    cluster
}

fn url(cluster: &Cluster, host: &str, sslmode: &str, ca: Option<&Path>) -> String {
    let mut url = format!(
        "postgres://postgres@{host}:{}/postgres?sslmode={sslmode}",
        cluster.port
    );
    if let Some(ca) = ca {
        url.push_str(&format!("&sslrootcert={}", ca.display()));
    }
    url
}

/// Connects as a service would; `Ok(true)` when the session is encrypted.
async fn connect(url: &str) -> Result<bool, String> {
    let settings = DatabaseSettings::from_url(url).map_err(|e| e.to_string())?;
    let (client, _driver) = db::connect(&settings)
        .await
        .map_err(|e| etl_shared::error_chain(&e))?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| etl_shared::error_chain(&e))?;
    Ok(row.get(0))
}

#[tokio::test]
async fn each_sslmode_does_what_libpq_documents_against_a_tls_only_server() {
    let files = ClientFiles::new();
    let ca = Ca::new("etl test CA");
    let ca_file = files.write("ca.pem", &ca.issuer.pem());
    let other_ca_file = files.write("other-ca.pem", &Ca::new("another CA").issuer.pem());
    let cluster = tls_only_cluster(&ca, &ca_file).await;
    let ip = "127.0.0.1";

    let plaintext = connect(&url(&cluster, ip, "disable", None)).await;
    let refused = plaintext.expect_err("the server takes TLS only");
    assert!(refused.contains("no encryption"), "{refused}");

    // prefer tries TLS first; require insists on it; neither checks the certificate.
    assert_eq!(connect(&url(&cluster, ip, "prefer", None)).await, Ok(true));
    assert_eq!(connect(&url(&cluster, ip, "require", None)).await, Ok(true));
    // verify-ca checks the chain only, so the IP (not in the certificate) is fine.
    assert_eq!(
        connect(&url(&cluster, ip, "verify-ca", Some(&ca_file))).await,
        Ok(true)
    );
    assert_eq!(
        connect(&url(&cluster, "localhost", "verify-full", Some(&ca_file))).await,
        Ok(true)
    );

    let wrong_host = connect(&url(&cluster, ip, "verify-full", Some(&ca_file)))
        .await
        .expect_err("the certificate names localhost, not the IP");
    assert!(
        wrong_host.contains("does not name the host connected to"),
        "{wrong_host}"
    );
    for mode in ["verify-ca", "verify-full", "require"] {
        // require with sslrootcert checks the chain, as libpq does.
        let wrong_ca = connect(&url(&cluster, "localhost", mode, Some(&other_ca_file)))
            .await
            .expect_err("signed by another CA");
        assert!(
            wrong_ca.contains(&format!(
                "not signed by the CA in sslrootcert ({})",
                other_ca_file.display()
            )),
            "{mode}: {wrong_ca}"
        );
    }
    let bad_mode = connect(&url(&cluster, ip, "verify_full", None))
        .await
        .expect_err("a typo in sslmode");
    assert!(
        bad_mode.contains("DATABASE_URL") && bad_mode.contains("verify-full"),
        "{bad_mode}"
    );
    let missing_ca = connect(&url(
        &cluster,
        ip,
        "verify-full",
        Some(Path::new("/nonexistent.pem")),
    ))
    .await
    .expect_err("a CA file that is not there");
    assert!(
        missing_ca.contains("sslrootcert /nonexistent.pem"),
        "{missing_ca}"
    );
    cluster.stop().unwrap();
}

#[tokio::test]
async fn the_three_services_and_the_listen_connection_run_over_verified_tls() {
    let files = ClientFiles::new();
    let ca = Ca::new("etl test CA");
    let ca_file = files.write("ca.pem", &ca.issuer.pem());
    let cluster = tls_only_cluster(&ca, &ca_file).await;
    let database_url = url(&cluster, "localhost", "verify-full", Some(&ca_file));
    // The services get TLS the way the Helm chart passes it: libpq's variables beside a URL
    // that says nothing about TLS.
    let plain_url = format!("postgres://postgres@localhost:{}/postgres", cluster.port);
    let source = TestServer::serving("/rows.csv", "id,name,value\n1,a,1\n2,b,2\n3,c,3\n").await;
    let sources = SourcesFile::of(&[
        SourceToml::csv("rows", &source.url("/rows.csv")).with(r#"schedule = "1h""#)
    ]);
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", plain_url),
        ("PGSSLMODE", "verify-full".into()),
        ("PGSSLROOTCERT", ca_file.display().to_string()),
        ("SOURCES_FILE", sources.env_value()),
        ("QUERY_STATS_MAX_AGE_SECS", "0".into()),
    ]);
    let api = pipeline.api();

    // Rows landed by the ingester reach the API through the normalizer, woken by NOTIFY.
    wait_for("the rows to be served", DEADLINE, || async {
        let body = reqwest::get(format!("{api}/data"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let body: serde_json::Value = serde_json::from_str(&body).ok()?;
        (body["total"] == 3).then_some(())
    })
    .await;
    pipeline.assert_running();

    let settings = DatabaseSettings::from_url(&database_url).unwrap();
    let (client, _driver) = db::connect(&settings).await.unwrap();
    let sessions: Vec<(String, bool)> = client
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name LIKE 'etl-%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for name in ["etl-normalizer-listen", "etl-query"] {
        assert!(
            sessions.iter().any(|(n, _)| n == name),
            "{name} holds a session: {sessions:?}"
        );
    }
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    let runs: i64 = client
        .query_one(
            "SELECT count(*) FROM etl_runs WHERE status = 'success' AND service = 'ingester'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 1, "the ingester recorded its run over TLS");

    pipeline.stop().await;
    drop(client);
    cluster.stop().unwrap();
}

#[tokio::test]
async fn a_service_given_the_wrong_ca_stops_at_start_and_says_which_check_failed() {
    let files = ClientFiles::new();
    let ca = Ca::new("etl test CA");
    let ca_file = files.write("ca.pem", &ca.issuer.pem());
    let other_ca_file = files.write("other-ca.pem", &Ca::new("another CA").issuer.pem());
    let cluster = tls_only_cluster(&ca, &ca_file).await;
    let sources = SourcesFile::new("");

    for (service, url, expected) in [
        (
            "etl-query",
            url(&cluster, "localhost", "verify-full", Some(&other_ca_file)),
            format!(
                "not signed by the CA in sslrootcert ({})",
                other_ca_file.display()
            ),
        ),
        (
            "etl-normalizer",
            url(&cluster, "127.0.0.1", "verify-full", Some(&ca_file)),
            "does not name the host connected to".to_owned(),
        ),
        (
            "etl-ingester",
            url(&cluster, "localhost", "verify-ca", Some(&other_ca_file)),
            "not signed by the CA in sslrootcert".to_owned(),
        ),
    ] {
        let output = tokio::process::Command::new(service_binary(service))
            .env("DATABASE_URL", &url)
            .env("SOURCES_FILE", sources.path())
            .env("QUERY_ADDR", "127.0.0.1:0")
            .env("INGESTER_ADMIN_ADDR", "127.0.0.1:0")
            .env("NORMALIZER_ADMIN_ADDR", "127.0.0.1:0")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(DEADLINE, output)
            .await
            .unwrap_or_else(|_| panic!("{service} kept running with a certificate it cannot trust"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "{service}: {stdout}{stderr}");
        assert!(
            stderr.contains(&expected) || stdout.contains(&expected),
            "{service} says why: {stdout}{stderr}"
        );
    }
    cluster.stop().unwrap();
}
