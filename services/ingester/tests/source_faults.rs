//! Sources that misbehave: each ends in a recorded, explained failure within a bounded time,
//! and the process goes on.

mod support;

use std::time::Duration;

use etl_tests::{streamed_csv, SourceToml, TestDb, TestServer};
use poem::http::StatusCode;
use poem::{endpoint::make_sync, Response, Route};
use support::*;

/// Runs `name` and returns its recorded error; fails the test if the run takes over 30 s.
async fn failed_run(db: &TestDb, toml: &str, name: &str) -> String {
    let ingester = ingester(db, toml);
    let summary = tokio::time::timeout(Duration::from_secs(30), ingester.run_source(name))
        .await
        .expect("the run must end in bounded time")
        .unwrap();
    let run = run_row(db, summary.run_id).await;
    assert_eq!(run.status, "failed", "{run:?}");
    run.error.expect("a failed run says why")
}

/// A REST source (items `{id, n, v}`) with short timeouts and one retry.
fn rest(name: &str, url: &str) -> String {
    SourceToml::rest(name, url)
        .mapping(r#"{ source_id = "/id", name = "/n", value = "/v" }"#)
        .with(r#"http = { attempts = 2, initial_backoff = "10ms", read_timeout = "300ms", connect_timeout = "1s" }"#)
        .to_string()
}

#[tokio::test]
async fn a_source_that_accepts_and_never_answers_times_out() {
    let db = TestDb::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket); // never read, never answered, never closed
        }
    });

    let error = failed_run(&db, &rest("hang", &format!("http://{addr}/items")), "hang").await;

    assert!(
        error.contains("after 2 attempt(s)") && error.contains("timed out"),
        "{error}"
    );
}

#[tokio::test]
async fn a_connection_dropped_mid_body_is_a_failure_not_a_short_page() {
    let db = TestDb::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{\"id\": 1, \"n\": \"a\", \"v\": 1}, {\"id\"")
                .await;
            drop(socket); // 1000 bytes promised, far fewer sent
        }
    });

    let error = failed_run(
        &db,
        &rest("dropped", &format!("http://{addr}/items")),
        "dropped",
    )
    .await;

    assert!(error.contains("reading the body failed"), "{error}");
    assert!(
        raw_ids(&db, "raw_api_data", "dropped").await.is_empty(),
        "nothing half-landed"
    );
}

#[tokio::test]
async fn truncated_json_is_a_failure_that_says_so() {
    let db = TestDb::new().await;
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(|_| {
            Response::builder()
                .content_type("application/json")
                .body(r#"[{"id": 1, "n": "a", "v": 1}, {"id": 2, "n""#)
        }),
    ))
    .await;

    let error = failed_run(&db, &rest("truncated", &server.url("/items")), "truncated").await;

    assert!(error.contains("not valid JSON"), "{error}");
    assert!(raw_ids(&db, "raw_api_data", "truncated").await.is_empty());
}

#[tokio::test]
async fn a_redirect_loop_is_a_failure_that_names_it() {
    let db = TestDb::new().await;
    let server = TestServer::start(Route::new().at(
        "/loop",
        make_sync(|_| {
            Response::builder()
                .status(StatusCode::FOUND)
                .header("location", "/loop")
                .finish()
        }),
    ))
    .await;

    let error = failed_run(&db, &rest("loop", &server.url("/loop")), "loop").await;

    assert!(error.to_lowercase().contains("redirect"), "{error}");
}

#[tokio::test]
async fn an_endless_csv_stops_at_the_size_limit_and_says_why() {
    let db = TestDb::new().await;
    let server = TestServer::start(Route::new().at(
        "/endless.csv",
        make_sync(|_| Response::builder().body(streamed_csv(None, 1_000, Duration::ZERO))),
    ))
    .await;
    let toml = SourceToml::csv("endless", &server.url("/endless.csv"))
        .with(r#"http = { max_file_bytes = 1000000 }"#)
        .to_string();

    let error = failed_run(&db, &toml, "endless").await;

    assert!(
        error.contains("larger than the limit of 1000000 bytes (http.max_file_bytes)"),
        "{error}"
    );
}

/// `body`, one byte every 20 ms: never silent long enough for a read timeout.
fn trickle(body: &'static [u8]) -> poem::Body {
    let bytes = futures_util::stream::unfold(0usize, move |i| async move {
        if i >= body.len() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // the source's pace
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(&body[i..=i])),
            i + 1,
        ))
    });
    poem::Body::from_bytes_stream(bytes)
}

#[tokio::test]
async fn a_csv_that_trickles_byte_by_byte_stops_at_the_response_time_limit() {
    let db = TestDb::new().await;
    let rows: &'static [u8] = (1..=100)
        .fold(String::from("id,name,value\n"), |csv, i| {
            csv + &format!("{i},row {i},{i}\n")
        })
        .leak()
        .as_bytes();
    let server = TestServer::start(Route::new().at(
        "/slow.csv",
        make_sync(move |_| Response::builder().body(trickle(rows))),
    ))
    .await;
    let toml = SourceToml::csv("slow", &server.url("/slow.csv"))
        .with(r#"http = { read_timeout = "1s", max_response_time = "1500ms" }"#)
        .to_string();

    let error = failed_run(&db, &toml, "slow").await;

    assert!(
        error.contains("took longer than 1.5s to arrive (http.max_response_time)"),
        "{error}"
    );
    assert!(raw_ids(&db, "raw_csv_data", "slow").await.is_empty());
}

#[tokio::test]
async fn a_rest_page_that_trickles_byte_by_byte_stops_at_the_response_time_limit() {
    let db = TestDb::new().await;
    let page: &'static [u8] = format!(
        "[{}]",
        (0..200)
            .map(|i| format!(r#"{{"id":{i},"n":"x","v":1}}"#))
            .collect::<Vec<_>>()
            .join(",")
    )
    .leak()
    .as_bytes();
    let server = TestServer::start(Route::new().at(
        "/slow",
        make_sync(move |_| {
            Response::builder()
                .content_type("application/json")
                .body(trickle(page))
        }),
    ))
    .await;
    let toml = rest("slow", &server.url("/slow")).replace(
        "read_timeout = \"300ms\"",
        "read_timeout = \"1s\", max_response_time = \"1500ms\"",
    );

    let error = failed_run(&db, &toml, "slow").await;

    assert!(
        error.contains("took longer than 1.5s, body included (http.max_response_time)"),
        "{error}"
    );
    assert!(error.contains("after 1 attempt"), "not retried: {error}");
    assert!(raw_ids(&db, "raw_api_data", "slow").await.is_empty());
}
