//! Clients generated from the committed spec by three generators, each driven against the
//! running service on the same 23 records: they page through `/data` by number and by cursor,
//! read `/stats` and get a typed problem back for a bad request. The Python client does it
//! over HTTPS, trusting a CA made here.
//! - Python (openapi-python-client) and TypeScript (@hey-api/openapi-ts, type-checked by
//!   `tsc`): `cargo xtask test` generates them and says where through the environment.
//! - Rust (progenitor): the `etl-query-client` crate, generated when it is compiled.

use std::process::Command;

use etl_query::{Application, Settings};
use etl_query_client::types::{DataRecord, Problem, ProblemCode};
use etl_shared::config::Env;
use etl_tests::TestDb;
use tokio_util::sync::CancellationToken;

/// The records every client walks.
const RECORDS: usize = 23;

/// A set by `cargo xtask test`, or the reason to run the suite through it.
fn from_xtask(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run the suite with `cargo xtask test`, which validates the spec \
             and generates the Python and TypeScript clients"
        )
    })
}

/// A client's API key, and the keys file that lets it in (kept until dropped).
fn api_key() -> (String, tempfile::NamedTempFile) {
    let (key, entry) = etl_query::access::new_key("generated client", false);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), entry).unwrap();
    (key, file)
}

/// A CA (its PEM) and, in `dir`, a certificate it signed for 127.0.0.1 with its key.
fn https_files(dir: &std::path::Path) -> (String, etl_query::tls::TlsFiles) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Not rcgen's default name, which the leaf has too: OpenSSL takes a leaf whose issuer is
    // its own name for self-signed.
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "etl test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let files = etl_query::tls::TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    (ca.pem(), files)
}

/// The query service over [`RECORDS`] records of source `gen`, requiring the key of `keys`,
/// over HTTPS when `tls` says so; its base URL.
async fn serve_records(
    db: &TestDb,
    keys: &tempfile::NamedTempFile,
    shutdown: &CancellationToken,
    tls: Option<etl_query::tls::TlsFiles>,
) -> String {
    db.client()
        .await
        .batch_execute(
            "SELECT etl_ensure_partition('gen');
             INSERT INTO normalized_data (source, source_id, name, value, description)
             SELECT 'gen', g::text, 'item ' || g, g, CASE WHEN g % 2 = 0 THEN 'even' END
             FROM generate_series(1, 23) g;
             INSERT INTO etl_checkpoint (source, normalized_rows) VALUES ('gen', 23);",
        )
        .await
        .unwrap();
    let keys = keys.path().to_str().unwrap();
    let mut settings = Settings::from_env(&Env::from_pairs([
        ("DATABASE_URL", db.url.as_str()),
        ("QUERY_ADDR", "127.0.0.1:0"),
        ("QUERY_API_KEYS_FILE", keys),
    ]))
    .unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    settings.tls = tls;
    let app = Application::build(settings, shutdown.clone())
        .await
        .unwrap();
    let base = format!("{scheme}://{}", app.addr());
    tokio::spawn(app.run_until_stopped());
    base
}

/// Runs a client's smoke script; its one line of output.
async fn run_script(mut command: Command) -> String {
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.trim().to_owned()
}

#[tokio::test]
async fn the_generated_python_client_pages_through_data_and_reads_stats_over_https() {
    let (python, client_dir) = (from_xtask("ETL_PYTHON"), from_xtask("ETL_PY_CLIENT_DIR"));
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let (key, keys) = api_key();
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = https_files(dir.path());
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca).unwrap();
    let base = serve_records(&db, &keys, &shutdown, Some(tls)).await;
    assert!(base.starts_with("https://"), "{base}");
    let mut command = Command::new(python);
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/client_smoke.py"
        ))
        .arg(base)
        .arg(RECORDS.to_string())
        .arg(&key)
        .arg(&ca_file)
        .env("PYTHONPATH", client_dir);
    assert_eq!(
        run_script(command).await,
        "paged 23 records over 4 pages, by cursor over 4; stats total 23"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn the_generated_typescript_client_pages_through_data_and_reads_stats() {
    let (node, script) = (from_xtask("ETL_NODE"), from_xtask("ETL_TS_CLIENT_SMOKE"));
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let (key, keys) = api_key();
    let base = serve_records(&db, &keys, &shutdown, None).await;
    let mut command = Command::new(node);
    command
        .arg(script)
        .arg(base)
        .arg(RECORDS.to_string())
        .arg(&key);
    assert_eq!(
        run_script(command).await,
        "paged 23 records over 4 pages, by cursor over 4; stats total 23; \
         problem invalid_parameter names page_size"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn the_generated_rust_client_pages_through_data_and_reads_stats() {
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let (key, keys) = api_key();
    let base = serve_records(&db, &keys, &shutdown, None).await;
    // progenitor leaves authentication to the reqwest client it is given.
    let with_key = |key: &str| {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap()
    };
    let refused = etl_query_client::Client::new_with_client(&base, with_key("etlq_wrong"))
        .list_data()
        .send()
        .await
        .unwrap_err();
    assert_eq!(refused.status().map(|s| s.as_u16()), Some(401));
    let client = etl_query_client::Client::new_with_client(&base, with_key(&key));

    let mut by_page: Vec<DataRecord> = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        let page = client
            .list_data()
            .page(pages)
            .page_size(7)
            .send()
            .await
            .unwrap()
            .into_inner();
        assert_eq!((page.total, page.total_exact), (RECORDS as i64, true));
        by_page.extend(page.data);
        if !page.has_more {
            break;
        }
    }
    let ids: Vec<&str> = by_page.iter().map(|r| r.source_id.as_str()).collect();
    assert_eq!(ids.len(), RECORDS);

    let (mut walked, mut cursor, mut walked_pages) = (Vec::new(), None, 0);
    loop {
        let mut request = client.list_data().page_size(7);
        if let Some(cursor) = cursor.take() {
            request = request.cursor(cursor);
        }
        let page = request.send().await.unwrap().into_inner();
        walked_pages += 1;
        assert_eq!(page.page, walked_pages);
        walked.extend(page.data.into_iter().map(|r| r.source_id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(walked, ids);
    assert_eq!((pages, walked_pages), (4, 4));

    let stats = client.get_stats().send().await.unwrap().into_inner();
    assert_eq!(stats.total_records, RECORDS as i64);

    // One record by its key, and the largest values first.
    let record = client
        .get_record()
        .source("gen")
        .source_id("12")
        .send()
        .await
        .unwrap()
        .into_inner();
    assert_eq!((record.name.as_str(), record.value), ("item 12", 12.0));
    let absent = client
        .get_record()
        .source("gen")
        .source_id("24")
        .send()
        .await
        .unwrap_err();
    assert_eq!(absent.status().map(|s| s.as_u16()), Some(404));
    let largest = client
        .list_data()
        .sort(etl_query_client::types::Sort::Value)
        .min_value(20.0)
        .send()
        .await
        .unwrap()
        .into_inner();
    let values: Vec<f64> = largest.data.iter().map(|r| r.value).collect();
    assert_eq!(values, [20.0, 21.0, 22.0, 23.0]);

    // Problems come as `application/problem+json`, which progenitor hands over as bytes: the
    // generated `Problem` type reads them.
    let refused = client.list_data().page_size(101).send().await.unwrap_err();
    assert_eq!(refused.status().map(|s| s.as_u16()), Some(400));
    let etl_query_client::Error::ErrorResponse(response) = refused else {
        panic!("not an error response: {refused}");
    };
    let body = read_all(response.into_inner()).await;
    let problem: Problem = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem.code, ProblemCode::InvalidParameter);
    assert_eq!(problem.parameter.as_deref(), Some("page_size"));
    shutdown.cancel();
}

async fn read_all(mut stream: etl_query_client::ByteStream) -> Vec<u8> {
    use futures_util::StreamExt;
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    body
}
