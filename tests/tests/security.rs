//! Security checks over the whole code base and the running binaries: SQL is never built from
//! strings at run time, and secrets (source API tokens, the database password) never reach the
//! logs or the API, and the API serves nothing but reads of normalized data, stats and health.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use etl_tests::{SourceToml, SourcesFile, TestDb, TestServer};
use poem::{endpoint::make_sync, Request, Response, Route};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

const SQL_WORDS: [&str; 9] = [
    "SELECT ", "INSERT ", "UPDATE ", "DELETE ", "LISTEN ", "NOTIFY ", " FROM ", " WHERE ",
    "CREATE ",
];

/// Every `format!` in the services' and the shared library's production code whose template looks
/// like SQL. Statements must be constant text (`const`, `concat!` of literals) with bind
/// parameters; the only exception is marked `// sql: constant` on the line before.
#[test]
fn no_production_code_builds_sql_with_format() {
    let root = workspace();
    let mut files = Vec::new();
    for dir in [
        "shared/src",
        "services/ingester/src",
        "services/normalizer/src",
        "services/query/src",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(
        files.len() > 20,
        "found only {} files: is the layout different?",
        files.len()
    );
    let mut offenders = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let production = text.split("#[cfg(test)]").next().unwrap();
        let lines: Vec<&str> = production.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(at) = line.find("format!(") else {
                continue;
            };
            // The template may start on the next line.
            let template = format!("{} {}", &line[at..], lines.get(i + 1).unwrap_or(&""));
            let looks_like_sql = SQL_WORDS.iter().any(|w| template.contains(w));
            let allowed = i > 0 && lines[i - 1].contains("// sql: constant");
            if looks_like_sql && !allowed {
                offenders.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "SQL built with format!:\n{}",
        offenders.join("\n")
    );
}

fn bin(name: &str) -> PathBuf {
    PathBuf::from(std::env::var("ETL_BIN_DIR").expect("run through `cargo xtask test`")).join(name)
}

#[tokio::test]
async fn secrets_never_reach_the_logs_even_at_trace_level() {
    const TOKEN: &str = "tok-7f3a9c1e-never-log-me";
    const DB_PASSWORD: &str = "pw-5b2d8e-never-log-me";
    let db = TestDb::new().await;
    // The test cluster trusts local connections, so any password works: it only has to be there.
    let url_with_password =
        db.url
            .replacen("://postgres@", &format!("://postgres:{DB_PASSWORD}@"), 1);
    assert_ne!(
        url_with_password, db.url,
        "the URL should carry a password now"
    );
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(|req: Request| {
            let authorized = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                == Some(&format!("Bearer {TOKEN}") as &str);
            if authorized {
                Response::builder()
                    .content_type("application/json")
                    .body(r#"[{"id": 1, "t": "x", "v": 1}]"#)
            } else {
                Response::builder()
                    .status(poem::http::StatusCode::UNAUTHORIZED)
                    .body("no")
            }
        }),
    ))
    .await;
    let sources = SourcesFile::of(&[SourceToml::rest("private", &server.url("/items"))
        .mapping(r#"{ source_id = "/id", name = "/t", value = "/v" }"#)
        .with(r#"headers.Authorization = { env = "PRIVATE_TOKEN", prefix = "Bearer " }"#)]);

    let output = tokio::task::spawn_blocking({
        let (url, sources) = (url_with_password.clone(), sources.env_value());
        move || {
            Command::new(bin("etl-ingester"))
                .args(["ingest"])
                .env("DATABASE_URL", url)
                .env("SOURCES_FILE", sources)
                .env("PRIVATE_TOKEN", TOKEN)
                .env("RUST_LOG", "trace")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();

    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the authorized run succeeds:\n{logs}"
    );
    assert!(
        logs.len() > 1_000,
        "trace logging was on, so there is plenty of output"
    );
    assert!(!logs.contains(TOKEN), "the API token leaked into the logs");
    assert!(
        !logs.contains(DB_PASSWORD),
        "the database password leaked into the logs"
    );

    // Nor does either reach what the API serves.
    let client = db.client().await;
    let stored: i64 = client
        .query_one(
            "SELECT count(*) FROM etl_runs WHERE error_message LIKE '%never-log-me%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    let addr = etl_tests::free_local_addr();
    let mut query = etl_tests::ServiceProcess::start(
        "etl-query",
        &[
            ("DATABASE_URL", url_with_password.clone()),
            ("QUERY_ADDR", addr.to_string()),
        ],
    );
    let served = etl_tests::wait_for("the query service", Duration::from_secs(30), || async {
        let mut all = String::new();
        for path in ["/stats", "/data", "/health", "/metrics"] {
            let response = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
            all += &response.text().await.ok()?;
        }
        Some(all)
    })
    .await;
    assert!(
        served.contains("private"),
        "/stats shows the source: {served}"
    );
    assert!(
        !served.contains("never-log-me"),
        "a secret reached the API: {served}"
    );
    assert_eq!(query.stop().await, Some(0));
    assert!(!query.log_tail().contains("never-log-me"));
}

#[test]
fn every_api_operation_is_a_read_of_data_history_stats_or_health() {
    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace().join("services/query/openapi.json")).unwrap(),
    )
    .unwrap();
    let mut paths: Vec<(&str, Vec<&str>)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            (
                path.as_str(),
                item.as_object()
                    .unwrap()
                    .keys()
                    .map(String::as_str)
                    .collect(),
            )
        })
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            ("/data", vec!["get"]),
            ("/data/export", vec!["get"]),
            ("/data/{source}/{source_id}", vec!["get"]),
            ("/health", vec!["get"]),
            ("/health/live", vec!["get"]),
            ("/health/ready", vec!["get"]),
            ("/rejects", vec!["get"]),
            ("/runs", vec!["get"]),
            ("/stats", vec!["get"]),
        ],
        "every operation is a read: of normalized data, the pipeline's history, stats or health"
    );
}
