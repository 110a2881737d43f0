//! REST sources over real HTTP: every pagination style ends exactly at the last page, items are
//! found by pointer, flaky sources are retried, failing ones are recorded as failed runs.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etl_tests::{SourceToml, TestDb, TestServer};
use poem::http::StatusCode;
use poem::{endpoint::make_sync, Request, Response, Route};
use serde_json::json;
use support::*;

const TOTAL: u64 = 25;

fn page_of(start: u64, len: u64) -> Vec<serde_json::Value> {
    let end = (start + len - 1).min(TOTAL);
    if start > end {
        return vec![];
    }
    items(start..=end)
}

/// A REST source with `rest` as its `rest` options, retried quickly.
fn source(name: &str, url: &str, rest: &str) -> String {
    SourceToml::rest(name, url)
        .with(r#"http = { attempts = 3, initial_backoff = "10ms", max_backoff = "2s", read_timeout = "5s" }"#)
        .with(&format!("rest = {rest}"))
        .to_string()
}

/// Ingests `toml`'s source `name` and checks all 25 items landed and the run succeeded.
async fn ingest_all_25(db: &TestDb, toml: &str, name: &str) {
    let summary = ingester(db, toml).run_source(name).await.unwrap();
    assert_eq!(summary.error, None);
    assert_eq!(raw_ids(db, "raw_api_data", name).await, numbers(1..=TOTAL));
    let run = run_row(db, summary.run_id).await;
    assert_eq!(
        (run.status.as_str(), run.processed, run.inserted),
        ("success", 25, 25)
    );
}

#[tokio::test]
async fn page_number_pagination_stops_at_the_short_last_page() {
    let db = TestDb::new().await;
    let log = RequestLog::default();
    let seen = log.clone();
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(move |req: Request| {
            seen.record(&req);
            let p = params(&req);
            let page: u64 = p["page"].parse().unwrap();
            let size: u64 = p["per_page"].parse().unwrap();
            json_response(json!({ "data": page_of((page - 1) * size + 1, size) }))
        }),
    ))
    .await;
    let toml = source(
        "paged",
        &server.url("/items?api=v1"),
        r#"{ items = "/data", pagination = { style = "page", size = 10, size_param = "per_page" } }"#,
    );

    ingest_all_25(&db, &toml, "paged").await;

    assert_eq!(
        log.queries(),
        [
            "api=v1&page=1&per_page=10",
            "api=v1&page=2&per_page=10",
            "api=v1&page=3&per_page=10"
        ]
    );
}

#[tokio::test]
async fn offset_pagination_stops_at_the_first_page_that_is_not_full() {
    let db = TestDb::new().await;
    let log = RequestLog::default();
    let seen = log.clone();
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(move |req: Request| {
            seen.record(&req);
            let p = params(&req);
            let offset: u64 = p["offset"].parse().unwrap();
            let limit: u64 = p["limit"].parse().unwrap();
            json_response(json!({ "results": page_of(offset + 1, limit) }))
        }),
    ))
    .await;
    let toml = source(
        "offsets",
        &server.url("/items"),
        r#"{ items = "/results", pagination = { style = "offset", limit = 10 } }"#,
    );

    ingest_all_25(&db, &toml, "offsets").await;

    assert_eq!(
        log.queries(),
        [
            "offset=0&limit=10",
            "offset=10&limit=10",
            "offset=20&limit=10"
        ]
    );
}

#[tokio::test]
async fn next_url_in_the_body_is_followed_until_it_is_null() {
    let db = TestDb::new().await;
    let log = RequestLog::default();
    let seen = log.clone();
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(move |req: Request| {
            seen.record(&req);
            let p: u64 = params(&req).get("p").map_or(1, |v| v.parse().unwrap());
            let next = (p * 10 < TOTAL).then(|| format!("/items?p={}", p + 1));
            json_response(
                json!({ "items": page_of((p - 1) * 10 + 1, 10), "links": { "next": next } }),
            )
        }),
    ))
    .await;
    let toml = source(
        "linked",
        &server.url("/items"),
        r#"{ items = "/items", pagination = { style = "next_url", pointer = "/links/next" } }"#,
    );

    ingest_all_25(&db, &toml, "linked").await;

    assert_eq!(log.queries(), ["", "p=2", "p=3"]);
}

#[tokio::test]
async fn link_header_rel_next_is_followed_and_a_top_level_array_is_the_item_list() {
    let db = TestDb::new().await;
    let log = RequestLog::default();
    let seen = log.clone();
    let addr = Arc::new(Mutex::new(String::new()));
    let base = addr.clone();
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(move |req: Request| {
            seen.record(&req);
            let p: u64 = params(&req).get("p").map_or(1, |v| v.parse().unwrap());
            let mut response = json_response(json!(page_of((p - 1) * 10 + 1, 10)));
            let mut links = vec![format!(
                "<{}/items?p=1>; rel=\"first\"",
                base.lock().unwrap()
            )];
            if p * 10 < TOTAL {
                links.push(format!(
                    "<{}/items?p={}>; rel=\"next\"",
                    base.lock().unwrap(),
                    p + 1
                ));
            }
            response
                .headers_mut()
                .insert("link", links.join(", ").parse().unwrap());
            response
        }),
    ))
    .await;
    *addr.lock().unwrap() = server.url("");
    let toml = source(
        "headers",
        &server.url("/items"),
        r#"{ pagination = { style = "link_header" } }"#,
    );

    ingest_all_25(&db, &toml, "headers").await;

    assert_eq!(log.queries(), ["", "p=2", "p=3"]);
}

#[tokio::test]
async fn cursor_tokens_are_sent_back_until_none_is_returned_with_items_at_a_nested_pointer() {
    let db = TestDb::new().await;
    let log = RequestLog::default();
    let seen = log.clone();
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(move |req: Request| {
            seen.record(&req);
            // Opaque tokens: "c<page>" encoded so they do not look like numbers.
            let p: u64 = params(&req)
                .get("after")
                .map_or(1, |t| t.trim_start_matches("tok-").parse().unwrap());
            let next = (p * 10 < TOTAL).then(|| format!("tok-{}", p + 1));
            json_response(json!({
                "data": { "entries": page_of((p - 1) * 10 + 1, 10) },
                "meta": { "next_cursor": next }
            }))
        }),
    ))
    .await;
    let toml = source(
        "cursored",
        &server.url("/items?x=1"),
        r#"{ items = "/data/entries", pagination = { style = "cursor", param = "after", pointer = "/meta/next_cursor" } }"#,
    );

    ingest_all_25(&db, &toml, "cursored").await;

    assert_eq!(log.queries(), ["x=1", "x=1&after=tok-2", "x=1&after=tok-3"]);
}

#[tokio::test]
async fn a_cursor_that_repeats_is_a_failed_run_that_names_the_loop_without_query_values() {
    let db = TestDb::new().await;
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(|_: Request| json_response(json!({ "data": page_of(1, 10), "next": "same" }))),
    ))
    .await;
    let toml = source(
        "looping",
        &server.url("/items?api_key=hunter2"),
        r#"{ items = "/data", pagination = { style = "cursor", param = "c", pointer = "/next" } }"#,
    );

    let summary = ingester(&db, &toml).run_source("looping").await.unwrap();

    let error = summary.error.expect("the run fails");
    assert!(error.contains("pagination loop"), "{error}");
    assert!(
        error.contains("/items?api_key=***&c=***, which was already fetched"),
        "the looping URL is named, its query values are not: {error}"
    );
    assert!(!error.contains("hunter2"), "{error}");
    let run = run_row(&db, summary.run_id).await;
    assert_eq!(run.status, "failed");
    assert_eq!(run.error.as_deref(), Some(error.as_str()));
    assert_eq!(
        run.inserted, 10,
        "pages landed before the loop was seen stay landed"
    );
}

#[tokio::test]
async fn a_source_that_fails_twice_then_answers_succeeds() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(move |_: Request| {
            if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body("boom")
            } else {
                json_response(json!(page_of(1, 25)))
            }
        }),
    ))
    .await;
    let toml = source("flaky", &server.url("/items"), "{}");

    ingest_all_25(&db, &toml, "flaky").await;

    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_429_is_retried_after_the_retry_after_delay() {
    let db = TestDb::new().await;
    let times = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let log = times.clone();
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(move |_: Request| {
            let mut times = log.lock().unwrap();
            times.push(Instant::now());
            if times.len() == 1 {
                Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header("retry-after", "1")
                    .body("slow down")
            } else {
                json_response(json!(page_of(1, 25)))
            }
        }),
    ))
    .await;
    let toml = source("limited", &server.url("/items"), "{}");

    ingest_all_25(&db, &toml, "limited").await;

    let times = times.lock().unwrap();
    assert_eq!(times.len(), 2);
    // The backoff here is 10 ms, so only Retry-After explains a full second.
    assert!(
        times[1] - times[0] >= Duration::from_secs(1),
        "{:?}",
        times[1] - times[0]
    );
}

#[tokio::test]
async fn a_source_that_keeps_failing_is_a_failed_run_with_the_error() {
    let db = TestDb::new().await;
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(|_: Request| {
            Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body("upstream is down")
        }),
    ))
    .await;
    let toml = source("down", &server.url("/items"), "{}");

    let summary = ingester(&db, &toml).run_source("down").await.unwrap();

    let run = run_row(&db, summary.run_id).await;
    assert_eq!(run.status, "failed");
    let error = run.error.unwrap();
    assert!(error.contains("after 3 attempt(s)"), "{error}");
    assert!(
        error.contains("HTTP 502") && error.contains("upstream is down"),
        "{error}"
    );
}

#[tokio::test]
async fn html_with_status_200_is_a_failed_run_that_says_the_body_is_not_json() {
    let db = TestDb::new().await;
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(|_: Request| {
            Response::builder()
                .content_type("text/html")
                .body("<html><body>Maintenance</body></html>")
        }),
    ))
    .await;
    let toml = source("html", &server.url("/items"), "{}");

    let summary = ingester(&db, &toml).run_source("html").await.unwrap();

    let error = summary.error.unwrap();
    assert!(
        error.contains("not valid JSON") && error.contains("text/html"),
        "{error}"
    );
}

#[tokio::test]
async fn items_without_a_usable_id_are_rejected_with_a_reason_and_the_rest_land() {
    let db = TestDb::new().await;
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(|_: Request| {
            json_response(json!([
                { "id": 1, "title": "a" },
                { "title": "no id" },
                { "id": null },
                { "id": { "nested": true } },
                { "id": "" },
                { "id": "x\u{0000}y" },
                { "id": "2", "title": "b" },
            ]))
        }),
    ))
    .await;
    let toml = source("partial", &server.url("/items"), "{}");

    let summary = ingester(&db, &toml).run_source("partial").await.unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(raw_ids(&db, "raw_api_data", "partial").await, ["1", "2"]);
    let rejects = rejects(&db, "partial").await;
    let reasons: Vec<(Option<i64>, &str)> = rejects.iter().map(|r| (r.2, r.3.as_str())).collect();
    assert_eq!(
        reasons,
        [
            (Some(1), "no source_id: nothing at /id (mapping.source_id)"),
            (
                Some(2),
                "source_id at /id is null; expected a string or a number"
            ),
            (
                Some(3),
                "source_id at /id is an object; expected a string or a number"
            ),
            (Some(4), "source_id at /id is empty"),
            (
                Some(5),
                "contains a NUL character (\\u0000), which Postgres cannot store"
            ),
        ]
    );
    assert_eq!(
        rejects[0].4, br#"{"title":"no id"}"#,
        "the raw item is kept as sent"
    );
    let run = run_row(&db, summary.run_id).await;
    assert_eq!((run.processed, run.inserted, run.rejected), (7, 2, 5));
}

#[tokio::test]
async fn an_item_over_max_record_bytes_is_rejected_with_its_position_and_first_bytes() {
    let db = TestDb::new().await;
    let huge = json!({ "id": 2, "title": "x".repeat(5_000), "price": 2 });
    let page = json!([
        { "id": 1, "title": "a", "price": 1 },
        huge,
        { "id": 3, "title": "c", "price": 3 }
    ]);
    let server = TestServer::serving("/items", page.to_string()).await;
    let toml = SourceToml::rest("big", &server.url("/items"))
        .with("http = { attempts = 1, max_record_bytes = 1000 }")
        .to_string();

    let summary = ingester(&db, &toml).run_source("big").await.unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(raw_ids(&db, "raw_api_data", "big").await, ["1", "3"]);
    let rejects = rejects(&db, "big").await;
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    let (_, page_no, item, reason, raw) = &rejects[0];
    assert_eq!((*page_no, *item), (Some(1), Some(1)));
    assert!(
        reason.starts_with("the item is ")
            && reason.contains("over the limit of 1000 bytes (http.max_record_bytes)"),
        "{reason}"
    );
    assert_eq!(raw.len(), 1000, "at most the limit is kept");
}

#[tokio::test]
async fn a_composite_key_joins_its_pointers_and_a_missing_part_is_a_reject_naming_it() {
    let db = TestDb::new().await;
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(|_| {
            json_response(json!([
                { "region": "eu", "id": 7, "name": "a", "value": 1 },
                { "region": "us", "id": 7, "name": "b", "value": 2 },
                { "region": "a|b", "id": "c", "name": "c", "value": 3 },
                { "id": 8, "name": "d", "value": 4 },
            ]))
        }),
    ))
    .await;
    let toml = SourceToml::rest("regional", &server.url("/items"))
        .mapping(r#"{ source_id = ["/region", "/id"], name = "/name", value = "/value" }"#)
        .to_string();

    let summary = ingester(&db, &toml).run_source("regional").await.unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(
        raw_ids(&db, "raw_api_data", "regional").await,
        ["a\\|b|c", "eu|7", "us|7"]
    );
    let rejects = rejects(&db, "regional").await;
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(
        (rejects[0].2, rejects[0].3.as_str()),
        (
            Some(3),
            "no source_id part: nothing at /region (mapping.source_id)"
        )
    );
}

#[tokio::test]
async fn an_incremental_source_asks_for_changes_since_its_last_success_less_the_lag() {
    let db = TestDb::new().await;
    let log = RequestLog::default();
    let seen = log.clone();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fail = failing.clone();
    let items = Arc::new(Mutex::new(vec![
        json!({ "id": 1, "name": "a", "value": 1, "updatedAt": "2026-01-01T00:10:00Z" }),
        json!({ "id": 2, "name": "b", "value": 2, "updatedAt": "2026-01-01T00:30:00Z" }),
        json!({ "id": 3, "name": "c", "value": 3, "updatedAt": "2026-01-01T00:20:00Z" }),
    ]));
    let served = items.clone();
    let server = TestServer::start(Route::new().at(
        "/items",
        make_sync(move |req: Request| {
            seen.record(&req);
            if fail.load(Ordering::SeqCst) {
                return Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .finish();
            }
            let since = params(&req)
                .get("updated_since")
                .cloned()
                .unwrap_or_default();
            let changed: Vec<_> = served
                .lock()
                .unwrap()
                .iter()
                .filter(|i| i["updatedAt"].as_str().unwrap() >= since.as_str())
                .cloned()
                .collect();
            json_response(json!(changed))
        }),
    ))
    .await;
    let toml = SourceToml::rest("changes", &server.url("/items"))
        .with("http = { attempts = 1 }")
        .with(r#"rest = { incremental = { param = "updated_since", pointer = "/updatedAt", lag = "5m" } }"#)
        .to_string();
    let ingester = ingester(&db, &toml);

    let first = ingester.run_source("changes").await.unwrap();
    items
        .lock()
        .unwrap()
        .push(json!({ "id": 4, "name": "d", "value": 4, "updatedAt": "2026-01-01T00:40:00Z" }));
    let second = ingester.run_source("changes").await.unwrap();
    failing.store(true, Ordering::SeqCst);
    let failed = ingester.run_source("changes").await.unwrap();
    failing.store(false, Ordering::SeqCst);
    let after_failure = ingester.run_source("changes").await.unwrap();

    assert_eq!((first.error, second.error), (None, None));
    assert!(failed.error.is_some());
    assert_eq!(after_failure.error, None);
    assert_eq!(
        log.queries(),
        [
            "",
            // The largest updatedAt of the first run (00:30), less the 5-minute lag.
            "updated_since=2026-01-01T00%3A25%3A00Z",
            "updated_since=2026-01-01T00%3A35%3A00Z",
            // A failed run moves nothing: the same question again.
            "updated_since=2026-01-01T00%3A35%3A00Z",
        ]
    );
    // The second run got item 2 again (inside the lag) and item 4: one unchanged, one new.
    let run = run_row(&db, second.run_id).await;
    assert_eq!((run.processed, run.inserted, run.unchanged), (2, 1, 1));
    assert_eq!(
        raw_ids(&db, "raw_api_data", "changes").await,
        ["1", "2", "3", "4"]
    );
}
