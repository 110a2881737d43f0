//! Database faults under the real binaries: the connection to Postgres is cut in the middle of an
//! ingest (through a TCP proxy, since the server itself is shared by the suite). Every service
//! keeps running and reconnects by itself, `/health` says 503 during the outage and 200 after,
//! the interrupted run is recorded as failed and retried, and the final data is exact.

use std::net::SocketAddr;
use std::time::Duration;

use etl_tests::{streamed_csv, wait_for, ServiceProcess, TcpProxy, TestDb, TestServer};
use poem::{endpoint::make_sync, Response, Route};

const ROWS: u64 = 40_000;
const DEADLINE: Duration = Duration::from_secs(90);

/// A CSV of `ROWS` rows, streamed in 1,000-row chunks 15 ms apart, so an ingest lasts long
/// enough to be interrupted.
async fn slow_csv_server() -> TestServer {
    TestServer::start(Route::new().at(
        "/slow.csv",
        make_sync(|_| {
            Response::builder().body(streamed_csv(Some(ROWS), 1_000, Duration::from_millis(15)))
        }),
    ))
    .await
}

async fn http_status(url: &str) -> Option<u16> {
    reqwest::get(url).await.ok().map(|r| r.status().as_u16())
}

#[tokio::test]
async fn services_ride_out_a_database_outage_mid_ingest_and_end_exact() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let proxy = TcpProxy::to_database(&db.url).await;
    let server = slow_csv_server().await;
    let sources = std::env::temp_dir().join(format!("sources-faults-{}.toml", db.name));
    std::fs::write(
        &sources,
        format!(
            r#"
            [[source]]
            name = "slow"
            kind = "csv"
            url = "{}"
            schedule = "1h"
            mapping = {{ source_id = "id", name = "name", value = "value" }}
            "#,
            server.url("/slow.csv")
        ),
    )
    .unwrap();
    let query_addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let env = |extra: (&'static str, String)| {
        vec![
            ("DATABASE_URL", proxy.url_for(&db.url)),
            ("DATABASE_CONNECT_TIMEOUT_SECS", "1".to_string()),
            ("SOURCES_FILE", sources.display().to_string()),
            extra,
        ]
    };
    let mut services = vec![
        ServiceProcess::start(
            "etl-ingester",
            &env(("INGESTER_ADMIN_ADDR", "127.0.0.1:0".into())),
        ),
        ServiceProcess::start(
            "etl-normalizer",
            &env(("NORMALIZER_ADMIN_ADDR", "127.0.0.1:0".into())),
        ),
        ServiceProcess::start("etl-query", &env(("QUERY_ADDR", query_addr.to_string()))),
    ];
    let health = format!("http://{query_addr}/health");

    // Cut the database off once the ingest has landed something but is still streaming.
    wait_for("the ingest to be under way", DEADLINE, || async {
        let landed: i64 = client
            .query_one("SELECT count(*) FROM raw_csv_data", &[])
            .await
            .unwrap()
            .get(0);
        (landed > 0 && (landed as u64) < ROWS).then_some(())
    })
    .await;
    proxy.cut();
    wait_for("/health to report the outage", DEADLINE, || async {
        (http_status(&health).await == Some(503)).then_some(())
    })
    .await;
    for service in &mut services {
        assert!(
            service.child.try_wait().unwrap().is_none(),
            "{} exited during the outage:\n{}",
            service.name,
            service.log_tail()
        );
    }

    proxy.restore();
    wait_for("/health to recover", DEADLINE, || async {
        (http_status(&health).await == Some(200)).then_some(())
    })
    .await;
    // The ingester retries on its own (no restart, no trigger) and the normalizer catches up.
    wait_for("every row to be ingested and normalized", DEADLINE, || async {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM raw_csv_data), (SELECT count(*) FROM normalized_data),
                        (SELECT count(*) FROM etl_runs WHERE service = 'ingester' AND status = 'success')",
                &[],
            )
            .await
            .unwrap();
        let (raw, normalized, ok): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        (raw == ROWS as i64 && normalized == ROWS as i64 && ok >= 1).then_some(())
    })
    .await;

    let runs: Vec<(String, Option<String>)> = client
        .query(
            "SELECT status, error_message FROM etl_runs WHERE service = 'ingester' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        runs.first().map(|r| r.0.as_str()),
        Some("failed"),
        "the interrupted run: {runs:?}"
    );
    assert!(
        runs.first().unwrap().1.is_some(),
        "with its reason: {runs:?}"
    );
    assert_eq!(
        runs.last().map(|r| r.0.as_str()),
        Some("success"),
        "{runs:?}"
    );
    assert!(
        runs.iter().all(|r| r.0 != "running"),
        "nothing is left running: {runs:?}"
    );
    let exact = client
        .query_one(
            "SELECT count(DISTINCT source_id), count(*) FROM normalized_data",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (exact.get::<_, i64>(0), exact.get::<_, i64>(1)),
        (ROWS as i64, ROWS as i64)
    );

    for service in &mut services {
        let code = service.stop().await;
        assert_eq!(code, Some(0), "{}:\n{}", service.name, service.log_tail());
    }
    std::fs::remove_file(sources).unwrap();
}
