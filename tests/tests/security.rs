//! Security checks over the whole code base and the running binaries: SQL is never built from
//! strings at run time, and secrets (source API tokens, the database password) never reach the
//! logs or the API, and the API serves nothing but reads of normalized data, stats and health.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etl_tests::{SourceToml, SourcesFile, TestDb, TestServer};
use poem::http::StatusCode;
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
                    .status(StatusCode::UNAUTHORIZED)
                    .body("no")
            }
        }),
    ))
    .await;
    let sources = SourcesFile::of(&[SourceToml::rest("private", &server.url("/items"))
        .mapping(r#"{ source_id = "/id", name = "/t", value = "/v" }"#)
        .with(r#"headers.Authorization = { env = "PRIVATE_TOKEN", prefix = "Bearer " }"#)]);

    let (succeeded, logs) =
        ingest_at_trace(&url_with_password, &sources, &[("PRIVATE_TOKEN", TOKEN)]).await;
    assert!(succeeded, "the authorized run succeeds:\n{logs}");
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
    let (served, mut query) = everything_served(&url_with_password).await;
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

/// `etl-ingester ingest` at trace level with `env`: whether it succeeded, and all it printed.
async fn ingest_at_trace(
    database_url: &str,
    sources: &SourcesFile,
    env: &[(&str, &str)],
) -> (bool, String) {
    let mut command = Command::new(bin("etl-ingester"));
    command
        .args(["ingest"])
        .env("DATABASE_URL", database_url)
        .env("SOURCES_FILE", sources.env_value())
        .env("RUST_LOG", "trace")
        .envs(env.iter().copied());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), logs)
}

/// All the query service serves where a run or its error could show, and the service (to
/// stop it and read its log).
async fn everything_served(database_url: &str) -> (String, etl_tests::ServiceProcess) {
    let addr = etl_tests::free_local_addr();
    let query = etl_tests::ServiceProcess::start(
        "etl-query",
        &[
            ("DATABASE_URL", database_url.to_owned()),
            ("QUERY_ADDR", addr.to_string()),
        ],
    );
    let served = etl_tests::wait_for("the query service", Duration::from_secs(30), || async {
        let mut all = String::new();
        for path in [
            "/stats", "/data", "/runs", "/rejects", "/health", "/metrics",
        ] {
            let response = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
            all += &response.text().await.ok()?;
        }
        Some(all)
    })
    .await;
    (served, query)
}

/// What a source's server received: the path and the `X-Api-Key` header of each request.
type Received = Arc<Mutex<Vec<(String, Option<String>)>>>;

fn received(log: &Received, req: &Request) -> bool {
    let key = req
        .headers()
        .get("x-api-key")
        .map(|v| v.to_str().unwrap().to_owned());
    let authorized = key.as_deref() == Some(HEADER_SECRET);
    log.lock().unwrap().push((req.uri().path().to_owned(), key));
    authorized
}

/// An endpoint that records each request in `log` and answers `respond(keyed)`, `keyed` saying
/// whether the request carried the source's key.
fn recording(
    log: &Received,
    respond: impl Fn(bool) -> Response + Send + Sync + 'static,
) -> impl poem::Endpoint {
    let log = log.clone();
    make_sync(move |req: Request| respond(received(&log, &req)))
}

const HEADER_SECRET: &str = "hdr-3c9e1f-secret";
const QUERY_SECRET: &str = "qry-8d2a7b-secret";
const BODY_SECRET: &str = "body-51f0ce-secret";

fn json(body: String) -> Response {
    Response::builder()
        .content_type("application/json")
        .body(body)
}

fn redirect(to: String) -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header("location", to)
        .finish()
}

/// A source's header secret goes only to the origin of its `url`, on its pages and its
/// redirects; a link to another origin is followed without it, or refused with
/// `follow_cross_origin = false`; and no error, however the upstream echoes what it was sent,
/// shows a secret of the header, the URL's query or the upstream's body beyond its start.
#[tokio::test]
async fn secrets_stay_with_their_origin_and_out_of_every_error() {
    let db = TestDb::new().await;
    let elsewhere: Received = Default::default();
    let other = TestServer::start(
        Route::new()
            .at(
                "/page2",
                recording(&elsewhere, |_| {
                    json(r#"{"items": [{"id": 2, "title": "b", "price": 2}], "next": null}"#.into())
                }),
            )
            .at(
                "/moved",
                recording(&elsewhere, |_| {
                    json(r#"{"items": [{"id": 3, "title": "c", "price": 3}]}"#.into())
                }),
            ),
    )
    .await;
    let at_home: Received = Default::default();
    let (page2, moved) = (other.url("/page2"), other.url("/moved"));
    // Every path of the source's own origin answers 401 without the key.
    let unauthorized = || {
        Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .finish()
    };
    let home = TestServer::start(
        Route::new()
            .at(
                "/page1",
                recording(&at_home, move |keyed| match keyed {
                    true => json(format!(
                        r#"{{"items": [{{"id": 1, "title": "a", "price": 1}}], "next": "{page2}"}}"#
                    )),
                    false => unauthorized(),
                }),
            )
            .at(
                "/hop1",
                recording(&at_home, move |keyed| match keyed {
                    true => redirect("/hop2".into()),
                    false => unauthorized(),
                }),
            )
            .at(
                "/hop2",
                recording(&at_home, move |keyed| match keyed {
                    true => redirect(moved.clone()),
                    false => unauthorized(),
                }),
            )
            .at(
                "/denied",
                make_sync(|req: Request| {
                    let sent = req.headers().get("x-api-key").unwrap().to_str().unwrap();
                    let query = req.uri().query().unwrap_or_default().to_owned();
                    let padding = "x".repeat(400);
                    Response::builder()
                        .status(StatusCode::UNAUTHORIZED)
                        .body(format!(
                            "{{\"echo\": \"your token {sent} is invalid\", \"query\": \"{query}\",\r\n\u{1b}[31m\"padding\": \"{padding}\", \"ref\": \"{BODY_SECRET}\"}}"
                        ))
                }),
            ),
    )
    .await;
    let key = r#"headers.X-Api-Key = { env = "SOURCE_KEY" }"#;
    let paged =
        r#"rest = { items = "/items", pagination = { style = "next_url", pointer = "/next" } }"#;
    let with_query = |path: &str| format!("{}?api_key={QUERY_SECRET}", home.url(path));
    let sources = SourcesFile::of(&[
        SourceToml::rest("paged", &with_query("/page1"))
            .with(key)
            .with(paged),
        SourceToml::rest("redirected", &with_query("/hop1"))
            .with(key)
            .with(r#"rest = { items = "/items" }"#),
        SourceToml::rest("strict", &with_query("/page1"))
            .with(key)
            .with(paged)
            .with("http = { follow_cross_origin = false }"),
        SourceToml::rest("denied", &with_query("/denied"))
            .with(key)
            .with("http = { attempts = 1 }"),
    ]);
    let (succeeded, logs) =
        ingest_at_trace(&db.url, &sources, &[("SOURCE_KEY", HEADER_SECRET)]).await;
    assert!(!succeeded, "two of the sources fail:\n{logs}");

    let client = db.client().await;
    let runs: Vec<(String, String, Option<String>, i64)> = client
        .query(
            "SELECT source, status, error_message, records_processed FROM etl_runs \
             WHERE service = 'ingester' ORDER BY source",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let run = |name: &str| {
        runs.iter()
            .find(|r| r.0 == name)
            .unwrap_or_else(|| panic!("no run of {name}: {runs:?}"))
    };
    // Pages and redirects at home carried the key (else they answered 401); elsewhere, none did.
    assert_eq!(run("paged").1, "success", "{runs:?}\n{logs}");
    assert_eq!(run("paged").3, 2, "both pages landed");
    assert_eq!(run("redirected").1, "success", "{runs:?}\n{logs}");
    assert_eq!(run("redirected").3, 1);
    let home_paths: Vec<String> = at_home
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.0.clone())
        .collect();
    for path in ["/page1", "/hop1", "/hop2"] {
        assert!(
            home_paths.iter().any(|p| p == path),
            "{path} was asked: {home_paths:?}"
        );
    }
    let elsewhere = elsewhere.lock().unwrap().clone();
    assert!(
        elsewhere.iter().any(|r| r.0 == "/page2") && elsewhere.iter().any(|r| r.0 == "/moved"),
        "the other origin was read, by next link and by redirect: {elsewhere:?}"
    );
    assert!(
        elsewhere.iter().all(|r| r.1.is_none()),
        "the key went to another origin: {elsewhere:?}"
    );

    let strict = run("strict");
    assert_eq!(strict.1, "failed");
    let strict_error = strict.2.as_deref().unwrap();
    assert!(
        strict_error.contains("follow_cross_origin") && strict_error.contains("/page2"),
        "the refusal says why and where: {strict_error}"
    );
    let denied = run("denied");
    assert_eq!(denied.1, "failed");
    let denied_error = denied.2.as_deref().unwrap();
    assert!(
        denied_error.contains("HTTP 401")
            && denied_error.contains("your token [redacted] is invalid"),
        "the error quotes the start of the body, scrubbed: {denied_error}"
    );
    assert!(
        !denied_error.chars().any(char::is_control),
        "no control characters: {denied_error:?}"
    );
    assert!(
        denied_error.len() < 400,
        "the body is quoted short: {denied_error}"
    );

    let (served, mut query) = everything_served(&db.url).await;
    assert!(
        served.contains("denied"),
        "/stats shows the sources: {served}"
    );
    assert_eq!(query.stop().await, Some(0));
    for (place, text) in [
        ("the ingester's logs", logs.as_str()),
        ("etl_runs", &format!("{runs:?}")),
        ("the query service's answers", &served),
        ("the query service's log", &query.log()),
    ] {
        for secret in [HEADER_SECRET, QUERY_SECRET, BODY_SECRET] {
            assert!(!text.contains(secret), "{secret} reached {place}:\n{text}");
        }
    }
}

/// Reads, and one write: the console's actions, which only record a request (for an admin
/// key: `console::run_now_and_replay_are_taken_by_the_services_for_an_admin_key_only`).
#[test]
fn every_api_operation_is_a_read_but_the_admin_keys_actions() {
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
            ("/sources/{source}/{action}", vec!["post"]),
            ("/stats", vec!["get"]),
        ],
        "every operation is a read (of normalized data, the pipeline's history, stats or \
         health) or the console's actions"
    );
}
