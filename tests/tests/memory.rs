//! Memory that no single record can blow: the services, as processes with a pod's worth of
//! memory in mind, stay under 64 MiB of peak resident memory (VmHWM) whatever the records
//! look like. The sources are generated as they are served, so the test process stays small.

use std::time::Duration;

use etl_tests::{wait_for, Pipeline, SourceToml, SourcesFile, TestDb, TestServer};
use poem::{endpoint::make_sync, Response, Route};

const LIMIT_KIB: u64 = 64 * 1024;
const DEADLINE: Duration = Duration::from_secs(110);

/// A CSV (`id,name,value,description`) of `rows` rows made by `row`, produced as it is sent.
fn generated_csv(rows: u64, row: fn(u64) -> String) -> poem::Body {
    let chunks = futures_util::stream::unfold(0u64, move |i| async move {
        if i > rows {
            return None;
        }
        let chunk = if i == 0 {
            String::from("id,name,value,description\n")
        } else {
            row(i)
        };
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)), i + 1))
    });
    poem::Body::from_bytes_stream(chunks)
}

async fn serve(rows: u64, row: fn(u64) -> String) -> TestServer {
    TestServer::start(Route::new().at(
        "/big.csv",
        make_sync(move |_| Response::builder().body(generated_csv(rows, row))),
    ))
    .await
}

fn start(db: &TestDb, sources: &SourcesFile) -> Pipeline {
    Pipeline::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
    ])
}

fn source(server: &TestServer) -> SourceToml {
    SourceToml::csv("big", &server.url("/big.csv"))
        .mapping(
            r#"{ source_id = "id", name = "name", value = "value", description = "description" }"#,
        )
        .with(r#"schedule = "1h""#)
}

/// (normalized, rejected at normalize) once the normalizer has been through every raw row.
async fn wait_until_normalized(db: &TestDb, rows: i64) -> (i64, i64) {
    let client = db.client().await;
    wait_for(
        "every row to be normalized or rejected",
        DEADLINE,
        || async {
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM normalized_data),
                        (SELECT count(*) FROM etl_rejects WHERE stage = 'normalize'),
                        (SELECT coalesce(sum(pending_changes), 0)::bigint FROM etl_pending),
                        (SELECT count(*) FROM raw_csv_data)",
                    &[],
                )
                .await
                .ok()?;
            let (normalized, rejected, pending, raw): (i64, i64, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            (raw == rows && pending == 0 && normalized + rejected == rows)
                .then_some((normalized, rejected))
        },
    )
    .await
}

fn peaks(pipeline: &Pipeline) -> Vec<(&'static str, u64)> {
    pipeline
        .services
        .iter()
        .filter(|s| s.name != "etl-query")
        .map(|s| (s.name, s.peak_rss_kib()))
        .collect()
}

#[tokio::test]
async fn five_thousand_rows_with_60_kib_descriptions_pass_through_in_under_64_mib() {
    let db = TestDb::new().await;
    let server = serve(5_000, |i| {
        format!("{i},row {i},{i},{}\n", "d".repeat(60 * 1024))
    })
    .await;
    let sources = SourcesFile::of(&[source(&server)]);
    let mut pipeline = start(&db, &sources);

    let (normalized, rejected) = wait_until_normalized(&db, 5_000).await;

    assert_eq!((normalized, rejected), (5_000, 0), "every row is valid");
    let peaks = peaks(&pipeline);
    pipeline.stop().await;
    eprintln!("peak memory: {peaks:?}");
    for (service, kib) in peaks {
        assert!(
            kib < LIMIT_KIB,
            "{service} peaked at {kib} KiB for 300 MB of rows"
        );
    }
}

#[tokio::test]
async fn forty_rows_with_a_10_mb_name_are_rejected_for_their_length_in_under_64_mib() {
    let db = TestDb::new().await;
    let server = serve(40, |i| format!("{i},{},{i},\n", "n".repeat(10_000_000))).await;
    let sources = SourcesFile::of(&[source(&server)]);
    let mut pipeline = start(&db, &sources);

    let (normalized, rejected) = wait_until_normalized(&db, 40).await;

    assert_eq!((normalized, rejected), (0, 40));
    let reasons: Vec<String> = db
        .client()
        .await
        .query(
            "SELECT DISTINCT reason FROM etl_rejects WHERE stage = 'normalize'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        reasons,
        ["name: 10000000 characters long; at most 1000 are accepted"]
    );
    let peaks = peaks(&pipeline);
    pipeline.stop().await;
    eprintln!("peak memory: {peaks:?}");
    for (service, kib) in peaks {
        assert!(
            kib < LIMIT_KIB,
            "{service} peaked at {kib} KiB for 10 MB names"
        );
    }
}

#[tokio::test]
async fn an_unterminated_quote_before_300_mb_fails_the_run_in_under_64_mib() {
    const FILLER_CHUNKS: u64 = 4_800; // of 64 KiB: 300 MiB after the open quote
    let db = TestDb::new().await;
    let server = TestServer::start(Route::new().at(
        "/big.csv",
        make_sync(|_| {
            let chunks = futures_util::stream::unfold(0u64, |i| async move {
                let chunk = match i {
                    0 => "id,name,value,description\n1,a,1,x\n2,b,2,y\n3,\"never closed,3,z\n"
                        .to_owned(),
                    i if i <= FILLER_CHUNKS => "9,i,9,z\n".repeat(8 * 1024),
                    _ => return None,
                };
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)), i + 1))
            });
            Response::builder().body(poem::Body::from_bytes_stream(chunks))
        }),
    ))
    .await;
    let sources = SourcesFile::of(&[source(&server)]);
    let mut pipeline = start(&db, &sources);
    let client = db.client().await;

    let error: String = wait_for("the ingest run to fail", DEADLINE, || async {
        client
            .query_opt(
                "SELECT error_message FROM etl_runs WHERE service = 'ingester' AND status = 'failed'",
                &[],
            )
            .await
            .ok()?
            .map(|r| r.get(0))
    })
    .await;

    assert!(
        error.contains("the quoted field opened on line 4 is never closed"),
        "{error}"
    );
    let landed: i64 = client
        .query_one("SELECT count(*) FROM raw_csv_data", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(landed, 2, "the rows before the open quote landed");
    let ingester = &pipeline.services[0];
    assert_eq!(ingester.name, "etl-ingester");
    let kib = ingester.peak_rss_kib();
    pipeline.stop().await;
    eprintln!("peak memory: ingester {kib} KiB");
    assert!(kib < LIMIT_KIB, "the ingester peaked at {kib} KiB");
}

#[tokio::test]
async fn four_rest_sources_with_30_mb_pages_at_once_land_in_under_64_mib() {
    const ITEMS: usize = 30_000; // of about 1 KB: a 30 MB page per source
    let db = TestDb::new().await;
    let items: Vec<serde_json::Value> = (0..ITEMS)
        .map(|i| serde_json::json!({ "id": i, "title": format!("item {i}"), "price": i, "pad": "p".repeat(1_000) }))
        .collect();
    let page = bytes::Bytes::from(serde_json::to_vec(&items).unwrap());
    assert!(page.len() > 30_000_000);
    let server = TestServer::serving("/*page", page).await;
    let sources = SourcesFile::of(
        &(0..4)
            .map(|i| {
                SourceToml::rest(&format!("api{i}"), &server.url(&format!("/p{i}.json")))
                    .with(r#"schedule = "1h""#)
            })
            .collect::<Vec<_>>(),
    );
    let mut pipeline = start(&db, &sources);
    let client = db.client().await;

    wait_for("the four runs to succeed", DEADLINE, || async {
        let done: i64 = client
            .query_one(
                "SELECT count(*) FROM etl_runs WHERE service = 'ingester' AND status = 'success'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (done == 4).then_some(())
    })
    .await;

    let landed: i64 = client
        .query_one("SELECT count(*) FROM raw_api_data", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(landed, 4 * ITEMS as i64);
    let ingester = &pipeline.services[0];
    let kib = ingester.peak_rss_kib();
    pipeline.stop().await;
    eprintln!("peak memory: ingester {kib} KiB");
    // Pages are spooled to disk and read item by item: no page is ever in memory whole.
    assert!(
        kib < LIMIT_KIB,
        "the ingester peaked at {kib} KiB: a page held in memory?"
    );
}

#[tokio::test]
async fn exporting_300_mb_of_records_raises_the_query_services_peak_memory_by_under_16_mib() {
    let db = TestDb::new().await;
    // 250,000 records of 1.2 KB: some 300 MB as NDJSON.
    db.seed_large_records("big", 250000).await;
    let addr = etl_tests::free_local_addr();
    let mut query = etl_tests::ServiceProcess::start(
        "etl-query",
        &[
            ("DATABASE_URL", db.url.clone()),
            ("QUERY_ADDR", addr.to_string()),
        ],
    );
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    wait_for("the query service", DEADLINE, || async {
        let page = http
            .get(format!("{base}/data?page_size=100"))
            .send()
            .await
            .ok()?;
        page.status().is_success().then_some(())
    })
    .await;
    let before = query.peak_rss_kib();

    let mut export = http
        .get(format!("{base}/data/export"))
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    let (mut bytes, mut lines) = (0usize, 0usize);
    while let Some(chunk) = export.chunk().await.unwrap() {
        bytes += chunk.len();
        lines += chunk.iter().filter(|&&b| b == b'\n').count();
    }
    let after = query.peak_rss_kib();
    eprintln!("exported {bytes} bytes; query peak memory {before} KiB before, {after} KiB after");
    assert_eq!(lines, 250_000);
    assert!(bytes > 300_000_000, "{bytes} bytes");
    assert!(
        after - before < 16 * 1024,
        "the export raised the peak from {before} KiB to {after} KiB"
    );
    assert_eq!(query.stop().await, Some(0), "{}", query.log_tail());
}
