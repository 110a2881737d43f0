//! The committed bad-input corpus (`tests/corpus/`): each file is served over HTTP, ingested and
//! normalized by the services' own code on a fresh database, and must produce exactly what
//! `tests/corpus/expected.toml` says: which records land, which are rejected and why, whether
//! the run fails and why. Nothing may panic, and raw = normalized + normalize rejects always.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etl_shared::sources::Sources;
use etl_tests::{SourceToml, TestDb, TestServer};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    file: String,
    /// Why the ingest run fails (a substring), or absent when it succeeds.
    #[serde(default)]
    run_error: Option<String>,
    /// Raw records landed.
    raw: i64,
    /// Ingest rejects' reasons (substrings), in source order.
    #[serde(default)]
    ingest_rejects: Vec<String>,
    /// Normalized records.
    normalized: i64,
    /// Normalize rejects' reasons (substrings), in source order.
    #[serde(default)]
    normalize_rejects: Vec<String>,
    /// Normalized (source_id → value) pairs that must hold, e.g. which duplicate won.
    #[serde(default)]
    values: std::collections::BTreeMap<String, f64>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn expected() -> Expected {
    let path = corpus_dir().join("expected.toml");
    toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The source `corpus` of `kind`, its fields named as in the corpus files, tried once.
fn sources_toml(kind: &str, url: &str) -> String {
    let source = match kind {
        "csv" => SourceToml::csv("corpus", url).mapping(
            r#"{ source_id = "id", name = "name", value = "value", description = "description" }"#,
        ),
        _ => SourceToml::rest("corpus", url)
            .mapping(
                r#"{ source_id = "/id", name = "/name", value = "/value", description = "/description" }"#,
            )
            .with(r#"rest = { items = "/items" }"#),
    };
    source
        .with(r#"http = { attempts = 1, read_timeout = "5s" }"#)
        .to_string()
}

/// What one corpus file produced.
#[derive(Debug, PartialEq)]
struct Outcome {
    run_error: Option<String>,
    raw: i64,
    ingest_rejects: Vec<String>,
    normalized: i64,
    normalize_rejects: Vec<String>,
    values: std::collections::BTreeMap<String, f64>,
}

async fn run_case(file: &str) -> Outcome {
    let db = TestDb::new().await;
    let body = std::fs::read(corpus_dir().join(file)).unwrap();
    let server = TestServer::serving("/*path", body).await;
    let kind = if file.starts_with("csv/") {
        "csv"
    } else {
        "rest"
    };
    let sources = Sources::parse(
        Path::new("corpus.toml"),
        &sources_toml(kind, &server.url("/f")),
    )
    .unwrap();
    let pool = etl_shared::db::pool(&db.settings(), etl_shared::db::Needs::Session).unwrap();

    let ingester = etl_ingester::Ingester::new(
        &etl_ingester::Settings {
            database: db.settings(),
            sources: sources.clone(),
            headers: Default::default(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            retention_days: 30,
            admin_token: Default::default(),
        },
        pool.clone(),
        CancellationToken::new(),
    );
    let summary = ingester.run_source("corpus").await.unwrap();
    let normalizer = etl_normalizer::Normalizer::new(
        &etl_normalizer::Settings {
            database: db.settings(),
            sources,
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            poll_interval: Duration::from_secs(3600),
            batch_size: 1000,
            bulk_min_rows: 100_000,
        },
        pool,
        CancellationToken::new(),
    );
    normalizer.run_source("corpus").await.unwrap();

    let client = db.client().await;
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let raw =
        count("SELECT (SELECT count(*) FROM raw_csv_data) + (SELECT count(*) FROM raw_api_data)")
            .await;
    let normalized = count("SELECT count(*) FROM normalized_data").await;
    let reasons = |stage: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT reason FROM etl_rejects WHERE stage = $1
                     ORDER BY line NULLS LAST, page NULLS LAST, item NULLS LAST, id",
                    &[&stage],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    let values = client
        .query("SELECT source_id, value FROM normalized_data", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, f64>(1)))
        .collect();
    let ingest_rejects = reasons("ingest").await;
    let normalize_rejects = reasons("normalize").await;
    Outcome {
        run_error: summary.error,
        raw,
        ingest_rejects,
        normalized,
        normalize_rejects,
        values,
    }
}

fn matches(actual: &[String], expected: &[String]) -> bool {
    actual.len() == expected.len()
        && actual
            .iter()
            .zip(expected)
            .all(|(a, e)| a.contains(e.as_str()))
}

#[tokio::test]
async fn every_corpus_file_lands_or_is_rejected_exactly_as_expected() {
    let expected = expected();
    let listed: BTreeSet<String> = expected.case.iter().map(|c| c.file.clone()).collect();
    let mut on_disk = BTreeSet::new();
    for kind in ["csv", "json"] {
        for entry in std::fs::read_dir(corpus_dir().join(kind)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            on_disk.insert(format!("{kind}/{name}"));
        }
    }
    assert_eq!(
        listed, on_disk,
        "every corpus file needs exactly one case in expected.toml"
    );

    let mut failures = Vec::new();
    for case in &expected.case {
        let outcome = run_case(&case.file).await;
        let run_error_ok = match (&outcome.run_error, &case.run_error) {
            (None, None) => true,
            (Some(actual), Some(expected)) => actual.contains(expected.as_str()),
            _ => false,
        };
        let ok = run_error_ok
            && outcome.raw == case.raw
            && outcome.normalized == case.normalized
            && matches(&outcome.ingest_rejects, &case.ingest_rejects)
            && matches(&outcome.normalize_rejects, &case.normalize_rejects)
            && case
                .values
                .iter()
                .all(|(id, v)| outcome.values.get(id) == Some(v))
            && outcome.raw == outcome.normalized + outcome.normalize_rejects.len() as i64;
        if !ok {
            failures.push(format!(
                "{}:\n  expected {case:?}\n  actual   {outcome:?}",
                case.file
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
