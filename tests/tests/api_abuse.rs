//! The query API under abuse, as the real binary: schemathesis (property-based requests from
//! the served spec), oversized query strings, many clients that send half a request and stall,
//! and requests in flight when SIGTERM arrives. Every answer is clean: no 5xx, nothing that
//! contradicts the spec, and the service keeps serving everyone else.

use std::time::Duration;

use etl_tests::{wait_for, ServiceProcess, TestDb};
use tokio::io::AsyncWriteExt;

const DEADLINE: Duration = Duration::from_secs(60);

/// The query service over a database with a few records of two sources.
async fn query_service(db: &TestDb) -> (ServiceProcess, String) {
    query_service_with(db, &[]).await
}

/// [`query_service`] with `extra` variables.
async fn query_service_with(db: &TestDb, extra: &[(&str, String)]) -> (ServiceProcess, String) {
    db.client()
        .await
        .batch_execute(
            "SELECT etl_ensure_partition('even'), etl_ensure_partition('odd');
             INSERT INTO normalized_data (source, source_id, name, value, description)
             SELECT CASE WHEN g % 2 = 0 THEN 'even' ELSE 'odd' END, g::text, 'item ' || g, g / 3.0,
                    CASE WHEN g % 5 = 0 THEN NULL ELSE 'about item ' || g END
             FROM generate_series(1, 250) g;
             INSERT INTO etl_checkpoint (source, normalized_rows)
             SELECT source, count(*) FROM normalized_data GROUP BY source;",
        )
        .await
        .unwrap();
    let addr = etl_tests::free_local_addr();
    let mut vars = vec![
        ("DATABASE_URL", db.url.clone()),
        ("QUERY_ADDR", addr.to_string()),
    ];
    vars.extend(extra.iter().cloned());
    let service = ServiceProcess::start("etl-query", &vars);
    let base = format!("http://{addr}");
    wait_for("the query service to answer", DEADLINE, || async {
        let ok = reqwest::get(format!("{base}/health/live")).await.ok()?;
        ok.status().is_success().then_some(())
    })
    .await;
    (service, base)
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_response_outside_the_spec() {
    let python = std::env::var("ETL_PYTHON").expect(
        "ETL_PYTHON is not set: run the suite with `cargo xtask test`, which installs schemathesis",
    );
    let schemathesis = std::path::Path::new(&python).with_file_name("schemathesis");
    let db = TestDb::new().await;
    // With API keys on: schemathesis sends the key, and checks that requests without it or
    // with a wrong one are refused (its `ignored_auth` check).
    let (key, entry) = etl_query::access::new_key("schemathesis", false);
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), entry).unwrap();
    let (mut service, base) = query_service_with(
        &db,
        &[("QUERY_API_KEYS_FILE", keys.path().display().to_string())],
    )
    .await;

    let output = tokio::process::Command::new(&schemathesis)
        .args(["run", &format!("{base}/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args([
            "--checks",
            "all",
            "--max-examples",
            "60",
            "--seed",
            "20261127",
        ])
        .args(["--request-timeout", "10", "--workers", "2"])
        .env("NO_COLOR", "1")
        // It keeps a cache in its working folder: not in the source tree.
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", schemathesis.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{report}"
    );
    // Every operation of the committed spec was tested, with a fair number of requests.
    let spec: serde_json::Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../services/query/openapi.json"
    )))
    .unwrap();
    let operations: usize = spec["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|methods| methods.as_object().unwrap().len())
        .sum();
    assert!(operations >= 6, "{operations} operations in the spec");
    assert!(
        report.contains(&format!("Tested: {operations}")),
        "{report}"
    );
    let generated: u32 = report
        .lines()
        .find_map(|l| l.trim().split_once(" generated, "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no test case count in:\n{report}"));
    assert!(
        generated >= 100,
        "only {generated} requests generated:\n{report}"
    );
    // It got past the key: most of /data's answers were 200s.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let answered = |status: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("etl_http_requests_total{") && l.contains("route=\"/data\""))
            .filter(|l| l.contains(&format!("status=\"{status}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        answered("200") > answered("401"),
        "200: {}, 401: {}\n{metrics}",
        answered("200"),
        answered("401")
    );
    assert!(
        answered("401") > 0.0,
        "the checks without a key were refused"
    );
    assert_eq!(service.stop().await, Some(0), "{}", service.log_tail());
}

#[tokio::test]
async fn oversized_query_strings_get_a_client_error_and_the_service_goes_on() {
    let db = TestDb::new().await;
    let (mut service, base) = query_service(&db).await;
    let http = reqwest::Client::new();

    for size in [201, 10_000, 100_000, 1_000_000] {
        let url = format!("{base}/data?search={}", "a".repeat(size));
        match http.get(&url).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                assert!(
                    (400..500).contains(&status),
                    "a {size}-byte search got {status}"
                );
            }
            // Past the server's request-head limit hyper may answer and close, or close at
            // once; either way nothing is served and nothing breaks.
            Err(e) => assert!(size >= 100_000, "a {size}-byte search failed: {e}"),
        }
    }
    let response = http
        .get(format!("{base}/data?search=x"))
        .send()
        .await
        .unwrap();
    let problem = http
        .get(format!("{base}/data?search={}", "b".repeat(201)))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let problem: serde_json::Value = serde_json::from_slice(&problem).unwrap();
    assert_eq!(problem["code"], "invalid_parameter", "{problem}");
    assert_eq!(response.status(), 200, "the service still answers");
    assert_eq!(service.stop().await, Some(0), "{}", service.log_tail());
}

#[tokio::test]
async fn many_stalled_clients_do_not_keep_others_from_being_served() {
    let db = TestDb::new().await;
    let (mut service, base) = query_service(&db).await;
    let addr = base.trim_start_matches("http://").to_owned();

    // 300 connections, each with half a request head, then silence.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /data?page=1 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        stalled.push(stream);
    }
    let http = reqwest::Client::new();
    let mut served = 0;
    for page in 1..=50 {
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            http.get(format!("{base}/data?page={page}&page_size=5"))
                .send(),
        )
        .await
        .expect("served despite the stalled clients")
        .unwrap();
        assert_eq!(response.status(), 200);
        served += 1;
    }
    assert_eq!(served, 50);
    drop(stalled);
    assert_eq!(service.stop().await, Some(0), "{}", service.log_tail());
}

#[tokio::test]
async fn requests_in_flight_at_sigterm_are_answered_whole_and_the_exit_is_clean() {
    let db = TestDb::new().await;
    let (mut service, base) = query_service(&db).await;

    // Eight clients ask continuously; SIGTERM arrives once each has had answers.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for c in 0..8 {
        let (base, tx) = (base.clone(), tx.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut answers = 0u32;
            loop {
                let url = format!("{base}/data?page={}&page_size=20", 1 + (answers + c) % 10);
                let Ok(response) = http.get(&url).send().await else {
                    return answers; // refused: the service has stopped listening
                };
                let status = response.status().as_u16();
                let body = response.bytes().await;
                let whole = body
                    .as_ref()
                    .is_ok_and(|b| serde_json::from_slice::<serde_json::Value>(b).is_ok());
                assert!(status == 200 && whole, "status {status}, body {body:?}");
                answers += 1;
                let _ = tx.send(());
            }
        }));
    }
    drop(tx);
    for _ in 0..80 {
        rx.recv().await.expect("clients are answered");
    }
    service.signal("-TERM").await;
    let code = tokio::time::timeout(Duration::from_secs(20), service.child.wait())
        .await
        .expect("the service stops within 20 s of SIGTERM")
        .unwrap()
        .code();
    assert_eq!(code, Some(0), "{}", service.log_tail());
    for client in clients {
        let answers = client
            .await
            .expect("no client saw a broken or failed answer");
        assert!(answers > 0);
    }
}
