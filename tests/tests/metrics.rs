//! `/metrics` of every service, scraped after a known amount of work: the counters moved by
//! exactly the rows processed, the pool gauges are there, and `/stats` tells the same counts.

use std::net::SocketAddr;
use std::time::Duration;

use etl_tests::{wait_for, Pipeline, SourceToml, SourcesFile, TestDb, TestServer};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// Ten rows: two the ingester rejects (wrong field counts), one the normalizer rejects.
const CSV: &str = "id,name,value\n1,a,1\n2,b,2\n3,c,3\n4,d,4\n5,e,5\n6,f,abc\n7,g,7\n\
                   8,too,many,fields\n9,h\n10,i,10\n";

async fn scrape(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `name{labels}` (labels exactly as encoded), or `None`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn counters_move_by_exactly_the_rows_processed_and_stats_agree() {
    let db = TestDb::new().await;
    let source = TestServer::serving("/m.csv", CSV).await;
    let sources =
        SourcesFile::of(&[SourceToml::csv("m", &source.url("/m.csv")).with(r#"schedule = "1h""#)]);
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
        ("QUERY_STATS_MAX_AGE_SECS", "0".to_string()),
    ]);
    let (ingester_addr, normalizer_addr, query_addr) = (
        pipeline.ingester_admin,
        pipeline.normalizer_admin,
        pipeline.query_addr,
    );
    let client = db.client().await;
    wait_for("the source to be ingested and normalized", DEADLINE, || async {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM normalized_data),
                        (SELECT count(*) FROM etl_rejects WHERE stage = 'normalize'),
                        (SELECT count(*) FROM etl_runs WHERE service = 'ingester' AND status = 'success')",
                &[],
            )
            .await
            .unwrap();
        let done = (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)) == (7, 1, 1);
        done.then_some(())
    })
    .await;
    let data = format!("http://{query_addr}/data?source=m");
    for _ in 0..3 {
        assert_eq!(reqwest::get(&data).await.unwrap().status(), 200);
    }
    let stats: Value = serde_json::from_str(
        &reqwest::get(format!("http://{query_addr}/stats"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    // A run is counted just after its end is recorded in etl_runs: wait for the counter.
    let ingester = wait_for("the ingest run to be counted", DEADLINE, || async {
        let m = scrape(ingester_addr).await;
        (sample(&m, r#"etl_ingest_runs_total{source="m",status="success"}"#) == Some(1.0))
            .then_some(m)
    })
    .await;
    let normalizer = wait_for(
        "the normalizer's last batch to be counted",
        DEADLINE,
        || async {
            let m = scrape(normalizer_addr).await;
            (sample(&m, r#"etl_normalize_rows_read_total{source="m"}"#) == Some(8.0)).then_some(m)
        },
    )
    .await;
    let query = scrape(query_addr).await;

    let ingest = |series: &str| sample(&ingester, series);
    assert_eq!(
        ingest(r#"etl_ingest_rows_read_total{source="m"}"#),
        Some(10.0),
        "{ingester}"
    );
    assert_eq!(
        ingest(r#"etl_ingest_rows_total{source="m",outcome="inserted"}"#),
        Some(8.0)
    );
    assert_eq!(
        ingest(r#"etl_ingest_rows_total{source="m",outcome="rejected"}"#),
        Some(2.0)
    );
    assert_eq!(
        ingest(r#"etl_ingest_runs_total{source="m",status="success"}"#),
        Some(1.0)
    );
    let normalize = |series: &str| sample(&normalizer, series);
    assert_eq!(
        normalize(r#"etl_normalize_rows_total{source="m",outcome="inserted"}"#),
        Some(7.0),
        "{normalizer}"
    );
    assert_eq!(
        normalize(r#"etl_normalize_rows_total{source="m",outcome="rejected"}"#),
        Some(1.0)
    );
    assert_eq!(
        normalize(r#"etl_normalize_lag_rows{source="m"}"#),
        Some(0.0)
    );
    assert!(
        normalize("etl_normalize_listen_reconnects_total").is_some(),
        "{normalizer}"
    );
    assert_eq!(
        sample(
            &query,
            r#"etl_http_requests_total{route="/data",method="GET",status="200"}"#
        ),
        Some(3.0),
        "{query}"
    );
    for (service, metrics) in [
        ("ingester", &ingester),
        ("normalizer", &normalizer),
        ("query", &query),
    ] {
        assert!(
            sample(metrics, "etl_db_pool_max_connections").is_some_and(|n| n >= 1.0),
            "{service}: {metrics}"
        );
        assert!(
            sample(metrics, r#"etl_db_pool_connections{state="idle"}"#).is_some(),
            "{service}"
        );
        assert!(
            metrics.contains("_seconds_bucket"),
            "{service} has latency histograms"
        );
    }

    // /stats says what the counters say.
    let m = stats["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "m")
        .unwrap_or_else(|| panic!("{stats}"));
    assert_eq!(
        m["raw_records"].as_f64(),
        ingest(r#"etl_ingest_rows_total{source="m",outcome="inserted"}"#)
    );
    assert_eq!(
        m["rejected_at_ingest"].as_f64(),
        ingest(r#"etl_ingest_rows_total{source="m",outcome="rejected"}"#)
    );
    assert_eq!(
        m["records"].as_f64(),
        normalize(r#"etl_normalize_rows_total{source="m",outcome="inserted"}"#)
    );
    assert_eq!(
        m["rejected_at_normalize"].as_f64(),
        normalize(r#"etl_normalize_rows_total{source="m",outcome="rejected"}"#)
    );

    pipeline.stop().await;
}
