//! A bounded loopback load test: 64 clients on `/data` and `/stats` for 30 s while an ingest
//! and the normalizer run, all as the real binaries. Every request must succeed; the figures
//! (requests, p50, p99) are printed, not asserted: speed is measured by `cargo xtask bench`.

use std::time::{Duration, Instant};

use etl_tests::{streamed_csv, wait_for, Pipeline, SourceToml, SourcesFile, TestDb, TestServer};
use poem::{endpoint::make_sync, Response, Route};

const CLIENTS: usize = 64;
const LOAD: Duration = Duration::from_secs(30);
/// Streamed over ~20 s, so ingest and normalize run under the whole load.
const ROWS: u64 = 200_000;
const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn sixty_four_clients_for_thirty_seconds_during_ingest_and_normalize_see_no_error() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let server = TestServer::start(Route::new().at(
        "/rows.csv",
        make_sync(|_| {
            Response::builder().body(streamed_csv(Some(ROWS), 1_000, Duration::from_millis(100)))
        }),
    ))
    .await;
    let sources = SourcesFile::of(&[
        SourceToml::csv("rows", &server.url("/rows.csv")).with(r#"schedule = "1h""#)
    ]);
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
        // /stats recomputed every second, so the load also hits its aggregate.
        ("QUERY_STATS_MAX_AGE_SECS", "1".to_string()),
    ]);
    let base = pipeline.api();
    wait_for("the ingest to be under way", DEADLINE, || async {
        let raw: i64 = client
            .query_one("SELECT count(*) FROM raw_csv_data", &[])
            .await
            .unwrap()
            .get(0);
        let up = reqwest::get(format!("{base}/health")).await.ok()?;
        (raw > 0 && up.status() == 200).then_some(())
    })
    .await;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut latencies, mut errors) = (Vec::new(), Vec::new());
            let mut n = 0u64;
            while started.elapsed() < LOAD {
                n += 1;
                let path = match (c as u64 + n) % 4 {
                    0 => "/stats".to_owned(),
                    1 => format!("/data?page={}&page_size=20", 1 + n % 50),
                    2 => "/data?source=rows&search=row%201234".to_owned(),
                    _ => "/data?page=1&page_size=100".to_owned(),
                };
                let sent = Instant::now();
                match http.get(format!("{base}{path}")).send().await {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(_) => latencies.push(sent.elapsed()),
                        Err(e) => errors.push(format!("{path}: body: {e}")),
                    },
                    Ok(r) => errors.push(format!("{path}: HTTP {}", r.status())),
                    Err(e) => errors.push(format!("{path}: {e}")),
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), Vec::new());
    for task in tasks {
        let (l, e) = task.await.unwrap();
        latencies.extend(l);
        errors.extend(e);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let raw_during: i64 = client
        .query_one("SELECT count(*) FROM raw_csv_data", &[])
        .await
        .unwrap()
        .get(0);
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    eprintln!(
        "load: {CLIENTS} clients, {elapsed:.1} s: {} requests ({:.0}/s), p50 {:.1} ms, p99 {:.1} ms, \
         max {:.1} ms, errors {}; {raw_during} of {ROWS} rows landed by the end",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        at(0.5),
        at(0.99),
        at(1.0),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(!latencies.is_empty());

    wait_for("every row to be ingested and normalized", DEADLINE, || async {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM raw_csv_data), (SELECT count(*) FROM normalized_data)",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0) == ROWS as i64 && row.get::<_, i64>(1) == ROWS as i64).then_some(())
    })
    .await;
    pipeline.stop().await;
}
