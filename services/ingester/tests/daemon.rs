//! The ingester as operators run it: the daemon with its admin port, the one-shot command for
//! cron jobs, and interrupted runs that must not stay `running` forever.

mod support;

use std::process::Command;
use std::time::Duration;

use etl_ingester::Application;
use etl_shared::runs::{reap_interrupted, Runs, Service};
use etl_tests::{streamed_csv, wait_for, SourceToml, SourcesFile, TestDb, TestServer};
use poem::http::StatusCode;
use poem::{endpoint::make_sync, Request, Response, Route};
use support::*;
use tokio_util::sync::CancellationToken;

async fn good_and_bad_sources() -> (TestServer, String) {
    let server = TestServer::start(
        Route::new()
            .at(
                "/good.csv",
                make_sync(|_: Request| Response::builder().body("id,name,value\n1,a,1\n2,b,2\n")),
            )
            .at(
                "/bad.csv",
                make_sync(|_: Request| {
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body("maintenance")
                }),
            ),
    )
    .await;
    let toml = etl_tests::sources_toml(&[
        SourceToml::csv("good", &server.url("/good.csv")).with(r#"schedule = "1h""#),
        SourceToml::csv("bad", &server.url("/bad.csv"))
            .with(r#"schedule = "1h""#)
            .with(r#"http = { attempts = 2, initial_backoff = "10ms" }"#),
    ]);
    (server, toml)
}

/// Finished runs of a source: (status, error).
async fn finished_runs(db: &TestDb, source: &str) -> Vec<(String, Option<String>)> {
    db.client()
        .await
        .query(
            "SELECT status, error_message FROM etl_runs
             WHERE service = 'ingester' AND source = $1 AND status <> 'running' ORDER BY id",
            &[&source],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn the_daemon_runs_every_source_and_one_failing_source_does_not_stop_another() {
    let db = TestDb::new().await;
    let (_server, toml) = good_and_bad_sources().await;
    let shutdown = CancellationToken::new();
    let token = etl_tests::AdminTokenFile::new();
    let app = Application::build(settings_with_token(&db, &toml, &token), shutdown.clone())
        .await
        .unwrap();
    let admin = format!("http://{}", app.admin_addr());
    let daemon = tokio::spawn(app.run_until_stopped());

    let deadline = Duration::from_secs(20);
    wait_for("both sources to finish a run", deadline, || async {
        let done = !finished_runs(&db, "good").await.is_empty()
            && !finished_runs(&db, "bad").await.is_empty();
        done.then_some(())
    })
    .await;
    assert_eq!(
        finished_runs(&db, "good").await,
        [("success".to_string(), None)]
    );
    let bad = finished_runs(&db, "bad").await;
    assert_eq!(bad[0].0, "failed");
    assert!(bad[0].1.as_deref().unwrap().contains("HTTP 503"), "{bad:?}");

    let http = reqwest::Client::new();
    let live = http
        .get(format!("{admin}/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let ready = http
        .get(format!("{admin}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"etl_ingest_rows_total{source="good",outcome="inserted"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"etl_ingest_runs_total{source="bad",status="failed"} 1"#),
        "{metrics}"
    );

    // Triggering needs the admin token, and runs the source now instead of in an hour.
    for refused in [
        http.post(format!("{admin}/sources/good/run")),
        http.post(format!("{admin}/sources/good/run"))
            .bearer_auth("test-admin-not-the-token"),
        http.post(format!("{admin}/sources/good/run"))
            .header("authorization", &token.token),
    ] {
        let refused = refused.send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            refused.headers()["www-authenticate"],
            "Bearer realm=\"etl-admin\""
        );
    }
    assert_eq!(
        finished_runs(&db, "good").await.len(),
        1,
        "a refused trigger runs nothing"
    );
    let triggered = http
        .post(format!("{admin}/sources/good/run"))
        .bearer_auth(&token.token)
        .send()
        .await
        .unwrap();
    assert_eq!(triggered.status(), StatusCode::ACCEPTED);
    wait_for("the triggered run", deadline, || async {
        (finished_runs(&db, "good").await.len() == 2).then_some(())
    })
    .await;
    let unknown = http
        .post(format!("{admin}/sources/nope/run"))
        .bearer_auth(&token.token)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        unknown.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value = serde_json::from_str(&unknown.text().await.unwrap()).unwrap();
    assert_eq!(
        (problem["code"].as_str(), problem["status"].as_u64()),
        (Some("not_found"), Some(404)),
        "the same problem shape, with a stable code, as the query API: {problem}"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .expect("the daemon stops on shutdown")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_one_shot_command_exits_non_zero_when_a_run_fails() {
    let db = TestDb::new().await;
    let (_server, toml) = good_and_bad_sources().await;
    let file = SourcesFile::new(&toml);
    let ingest = |source: &str| {
        let db_url = db.url.clone();
        let file = file.env_value();
        let source = source.to_owned();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_etl-ingester"))
                .args(["ingest", "--source", &source])
                .env("DATABASE_URL", db_url)
                .env("SOURCES_FILE", file)
                .output()
                .unwrap()
        })
    };

    let good = ingest("good").await.unwrap();
    let bad = ingest("bad").await.unwrap();

    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(String::from_utf8_lossy(&good.stdout).starts_with("good: ok"));
    assert_eq!(bad.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert!(
        stdout.contains("bad: FAILED") && stdout.contains("HTTP 503"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_missing_secret_stops_the_ingester_at_start_naming_the_variable() {
    let file = SourcesFile::of(&[SourceToml::rest("private", "http://127.0.0.1:1/x").with(
        r#"headers.Authorization = { env = "PRIVATE_API_TOKEN_FOR_TEST", prefix = "Bearer " }"#,
    )]);

    let output = Command::new(env!("CARGO_BIN_EXE_etl-ingester"))
        .args(["ingest"])
        .env("DATABASE_URL", "postgres://u@127.0.0.1:1/db")
        .env("SOURCES_FILE", file.path())
        .env_remove("PRIVATE_API_TOKEN_FOR_TEST")
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("PRIVATE_API_TOKEN_FOR_TEST, which is not set"),
        "{stderr}"
    );
}

#[tokio::test]
async fn runs_of_dead_processes_are_marked_failed_but_live_ones_are_left_alone() {
    let db = TestDb::new().await;
    let pool = etl_shared::db::pool(&db.settings(), etl_shared::db::Needs::Session).unwrap();
    // A run whose process died: the row says running, but no session holds its lock.
    let dead: i64 = db
        .client()
        .await
        .query_one(
            "INSERT INTO etl_runs (service, source) VALUES ('ingester', 'x') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let runs = Runs::new(pool.clone(), &db.settings(), Service::Ingester);
    let live = runs.start("y").await.unwrap();

    let reaped = reap_interrupted(&pool, Service::Ingester).await.unwrap();

    assert_eq!(reaped, 1);
    let dead_run = run_row(&db, dead).await;
    assert_eq!(dead_run.status, "failed");
    assert!(dead_run.error.unwrap().starts_with("interrupted"));
    assert_eq!(run_row(&db, live.id).await.status, "running");
    let live_id = live.id;
    let metrics = etl_shared::metrics::PipelineMetrics::new("etl_ingest", "ingest");
    live.end(&metrics, Default::default(), None).await.unwrap();
    assert_eq!(run_row(&db, live_id).await.status, "success");
    assert_eq!(
        reap_interrupted(&pool, Service::Ingester).await.unwrap(),
        0,
        "an ended run is left as it ended"
    );
}

#[tokio::test]
async fn shutdown_stops_a_streaming_run_between_batches_and_records_it_as_failed() {
    let db = TestDb::new().await;
    // An endless CSV: header, then 500 rows per chunk, forever.
    let server = TestServer::start(Route::new().at(
        "/endless.csv",
        make_sync(|_: Request| {
            Response::builder().body(streamed_csv(None, 500, Duration::from_millis(2)))
        }),
    ))
    .await;
    let toml = SourceToml::csv("endless", &server.url("/endless.csv")).to_string();
    let shutdown = CancellationToken::new();
    let app = Application::build(settings(&db, &toml), shutdown.clone())
        .await
        .unwrap();
    let daemon = tokio::spawn(app.run_until_stopped());
    let client = db.client().await;
    wait_for("a first batch to land", Duration::from_secs(20), || async {
        let landed: i64 = client
            .query_one("SELECT count(*) FROM raw_csv_data", &[])
            .await
            .unwrap()
            .get(0);
        (landed > 0).then_some(())
    })
    .await;

    shutdown.cancel();

    tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .expect("the daemon stops promptly")
        .unwrap()
        .unwrap();
    let runs = finished_runs(&db, "endless").await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].0, "failed");
    assert!(
        runs[0]
            .1
            .as_deref()
            .unwrap()
            .starts_with("interrupted by shutdown"),
        "{runs:?}"
    );
    let landed: i64 = client
        .query_one("SELECT count(*) FROM raw_csv_data", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        landed % etl_ingester::land::BATCH_ROWS as i64,
        0,
        "only whole batches landed"
    );
}

#[tokio::test]
async fn twelve_slow_sources_all_succeed_with_a_pool_of_five() {
    const SOURCES: usize = 12;
    const ROWS: u64 = 1_000;
    let db = TestDb::new().await;
    // Each file takes about 1.5 s to arrive: a run that held a pooled connection while it
    // waited would keep the sixth run waiting past the 1 s pool timeout.
    let server = TestServer::start(Route::new().at(
        "/:file",
        make_sync(|_| {
            Response::builder().body(streamed_csv(Some(ROWS), 200, Duration::from_millis(300)))
        }),
    ))
    .await;
    let sources: Vec<SourceToml> = (0..SOURCES)
        .map(|i| SourceToml::csv(&format!("slow{i}"), &server.url(&format!("/slow{i}.csv"))))
        .collect();
    let file = SourcesFile::of(&sources);
    let db_url = db.url.clone();
    let path = file.env_value();

    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_etl-ingester"))
            .arg("ingest")
            .env("DATABASE_URL", db_url)
            .env("SOURCES_FILE", path)
            .env("DATABASE_POOL_MAX_SIZE", "5")
            .env("DATABASE_CONNECT_TIMEOUT_SECS", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches(": ok (run").count(), SOURCES, "{stdout}");
    let landed: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM raw_csv_data", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(landed, SOURCES as i64 * ROWS as i64);
}

#[tokio::test]
async fn a_second_run_of_a_source_waits_for_the_first_to_end() {
    let db = TestDb::new().await;
    // About 0.6 s to arrive, so the two runs would overlap if both went ahead.
    let server = TestServer::start(Route::new().at(
        "/slow.csv",
        make_sync(|_| {
            Response::builder().body(streamed_csv(Some(100), 50, Duration::from_millis(300)))
        }),
    ))
    .await;
    let toml = SourceToml::csv("slow", &server.url("/slow.csv")).to_string();
    let ingester = ingester(&db, &toml);

    let (first, second) = tokio::join!(ingester.run_source("slow"), ingester.run_source("slow"));

    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!((first.error, second.error), (None, None));
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT min(ended_at) <= max(started_at), count(*) FROM etl_runs
             WHERE service = 'ingester' AND source = 'slow'",
            &[],
        )
        .await
        .unwrap();
    let (in_turn, runs): (bool, i64) = (row.get(0), row.get(1));
    assert_eq!(runs, 2);
    assert!(in_turn, "the second run started before the first ended");
}

#[tokio::test]
async fn history_past_the_retention_is_pruned_but_the_latest_runs_and_current_rejects_stay() {
    let db = TestDb::new().await;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let serving = up.clone();
    let server = TestServer::start(Route::new().at(
        "/data.csv",
        make_sync(move |_| {
            if serving.load(std::sync::atomic::Ordering::SeqCst) {
                Response::builder().body("id,name,value\n1,a,1\n2,b\n")
            } else {
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .finish()
            }
        }),
    ))
    .await;
    let toml = SourceToml::csv("aging", &server.url("/data.csv"))
        .with("http = { attempts = 1 }")
        .to_string();
    let ingester = ingester(&db, &toml);
    for _ in 0..3 {
        assert_eq!(ingester.run_source("aging").await.unwrap().error, None);
    }
    up.store(false, std::sync::atomic::Ordering::SeqCst);
    let failed = ingester.run_source("aging").await.unwrap();
    assert!(failed.error.is_some());
    let client = db.client().await;
    // What a failed run leaves when it landed a batch before failing: a reject of its own.
    client
        .execute(
            "INSERT INTO etl_rejects (run_id, stage, source, line, reason, raw)
             VALUES ($1, 'ingest', 'aging', 9, 'from a batch before the failure', '')",
            &[&failed.run_id],
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "UPDATE etl_runs SET started_at = started_at - interval '40 days',
                                 ended_at = ended_at - interval '40 days';
             UPDATE etl_rejects SET created_at = created_at - interval '40 days';
             INSERT INTO etl_requests (source, action, requested_by, requested_at, taken_at)
             VALUES ('aging', 'run', 'ops', now() - interval '40 days', now() - interval '40 days'),
                    ('aging', 'run', 'ops', now() - interval '1 day', now() - interval '1 day'),
                    ('aging', 'replay', 'ops', now() - interval '40 days', NULL)",
        )
        .await
        .unwrap();

    let pruned = etl_shared::runs::prune_history(ingester.pool(), 30)
        .await
        .unwrap();

    // Kept: the latest run (the failed one) and the latest successful one, whose reject is the
    // source's current one; gone: the two runs before, and the failed run's reject.
    assert_eq!((pruned.runs, pruned.rejects), (2, 1));
    let row = client
        .query_one(
            "SELECT (SELECT array_agg(status ORDER BY id) FROM etl_runs),
                    (SELECT array_agg(line) FROM etl_rejects)",
            &[],
        )
        .await
        .unwrap();
    let (statuses, lines): (Vec<String>, Vec<i64>) = (row.get(0), row.get(1));
    assert_eq!(statuses, ["success", "failed"]);
    assert_eq!(lines, [3], "the current reject (line 3) stays");
    let requests: Vec<(bool, bool)> = client
        .query(
            "SELECT requested_at > now() - interval '2 days', taken_at IS NULL
             FROM etl_requests ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        requests,
        [(true, false), (false, true)],
        "the old taken request goes; a recent one and one never taken stay"
    );

    let again = etl_shared::runs::prune_history(ingester.pool(), 30)
        .await
        .unwrap();
    assert_eq!((again.runs, again.rejects), (0, 0));
}

#[tokio::test]
async fn without_an_admin_token_file_the_admin_port_takes_no_action_and_a_short_token_stops_the_start(
) {
    let db = TestDb::new().await;
    let (_server, toml) = good_and_bad_sources().await;
    let shutdown = CancellationToken::new();
    let app = Application::build(settings(&db, &toml), shutdown.clone())
        .await
        .unwrap();
    let admin = format!("http://{}", app.admin_addr());
    let daemon = tokio::spawn(app.run_until_stopped());
    let http = reqwest::Client::new();
    let refused = http
        .post(format!("{admin}/sources/good/run"))
        .bearer_auth("anything-at-all-long-enough")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let problem: serde_json::Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    assert_eq!(problem["code"], "forbidden", "{problem}");
    for open in ["/health/live", "/metrics"] {
        let response = http.get(format!("{admin}{open}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{open} needs no token");
    }
    shutdown.cancel();
    daemon.await.unwrap().unwrap();

    let short = tempfile_with("short\n");
    let env =
        etl_shared::config::Env::from_pairs([("ADMIN_TOKEN_FILE", short.display().to_string())]);
    let error = etl_shared::admin::AdminToken::from_env(&env)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("ADMIN_TOKEN_FILE") && error.contains("at least 16"),
        "{error}"
    );
    std::fs::remove_file(short).unwrap();
}

/// A file under the temporary folder holding `text`.
fn tempfile_with(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("etl-test-{}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}
