//! Database faults under the real binaries, in the middle of an ingest and in the middle of a
//! normalize pass: the connection cut (through a TCP proxy), the server restarted with a fast
//! and with an immediate (crash) shutdown (a private cluster, since the suite's server is
//! shared), and every service's connections killed with `pg_terminate_backend`. Every service
//! keeps running and reconnects by itself, `/health` says 503 during an outage and 200 after,
//! interrupted runs are recorded as failed and retried, and the final data is exact.

use std::path::Path;
use std::time::Duration;

use etl_tests::{
    streamed_csv, wait_for, Pipeline, SourceToml, SourcesFile, TcpProxy, TestDb, TestServer,
};
use poem::{endpoint::make_sync, Response, Route};
use xtask::pg::{Cluster, PgBinaries, ShutdownMode};

const ROWS: u64 = 40_000;
const DEADLINE: Duration = Duration::from_secs(90);

/// What goes wrong with the database.
enum Fault {
    /// The connection cut by a proxy; the server stays up.
    ProxyCut,
    /// The server stopped with `mode`, then started again.
    Restart(ShutdownMode),
    /// Every connection of the three services killed with `pg_terminate_backend`.
    Terminate,
}

/// When it goes wrong.
#[derive(Clone, Copy, PartialEq)]
enum During {
    /// An ingest run has landed some batches and is still streaming.
    Ingest,
    /// The normalizer has normalized some rows and not all.
    Normalize,
}

/// Where the services' database lives for one scenario.
enum Database {
    Shared(TestDb),
    Private(Cluster),
}

impl Database {
    fn url(&self) -> String {
        match self {
            Database::Shared(db) => db.url.clone(),
            Database::Private(cluster) => cluster.url(),
        }
    }
}

async fn private_cluster() -> Cluster {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pg-faults");
    let cluster = tokio::task::spawn_blocking(move || {
        xtask::pg::reap_stale(&dir);
        Cluster::start(&PgBinaries::find()?, &dir)
    })
    .await
    .unwrap()
    .expect("a private cluster starts");
    let settings = etl_shared::DatabaseSettings::from_url(&cluster.url()).unwrap();
    etl_shared::migrate(&settings).await.unwrap();
    cluster
}

async fn http_status(url: &str) -> Option<u16> {
    reqwest::get(url).await.ok().map(|r| r.status().as_u16())
}

/// (raw, normalized, distinct normalized ids), or `None` while the database is unreachable.
async fn counts(url: &str) -> Option<(i64, i64, i64)> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM raw_csv_data), (SELECT count(*) FROM normalized_data),
                    (SELECT count(DISTINCT source_id) FROM normalized_data)",
            &[],
        )
        .await
        .ok()?;
    Some((row.get(0), row.get(1), row.get(2)))
}

/// Every run of `service` as (status, error), oldest first.
async fn runs(url: &str, service: &str) -> Vec<(String, Option<String>)> {
    let client = etl_tests::connect(url).await;
    client
        .query(
            "SELECT status, error_message FROM etl_runs WHERE service = $1 ORDER BY id",
            &[&service],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn scenario(fault: Fault, during: During) {
    let mut database = match fault {
        Fault::Restart(_) => Database::Private(private_cluster().await),
        _ => Database::Shared(TestDb::new().await),
    };
    let url = database.url();
    let proxy = match fault {
        Fault::ProxyCut => Some(TcpProxy::to_database(&url).await),
        _ => None,
    };
    // For an ingest to interrupt, a slow source (1,000 rows every 15 ms); for a normalize
    // pass, a fast one and small normalizer batches.
    let pause = match during {
        During::Ingest => Duration::from_millis(15),
        During::Normalize => Duration::ZERO,
    };
    let server = TestServer::start(Route::new().at(
        "/rows.csv",
        make_sync(move |_| Response::builder().body(streamed_csv(Some(ROWS), 1_000, pause))),
    ))
    .await;
    let sources = SourcesFile::of(&[
        SourceToml::csv("rows", &server.url("/rows.csv")).with(r#"schedule = "1h""#)
    ]);
    let service_url = proxy.as_ref().map_or(url.clone(), |p| p.url_for(&url));
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", service_url),
        ("DATABASE_CONNECT_TIMEOUT_SECS", "1".to_string()),
        ("SOURCES_FILE", sources.env_value()),
        ("NORMALIZER_BATCH_SIZE", "200".to_string()),
    ]);
    let query_addr = pipeline.query_addr;
    let health = format!("http://{query_addr}/health");
    wait_for("the query service to be healthy", DEADLINE, || async {
        (http_status(&health).await == Some(200)).then_some(())
    })
    .await;

    wait_for("the moment to strike", DEADLINE, || async {
        let (raw, normalized, _) = counts(&url).await?;
        let now = match during {
            During::Ingest => raw > 0 && (raw as u64) < ROWS,
            During::Normalize => normalized > 0 && (normalized as u64) < ROWS,
        };
        now.then_some(())
    })
    .await;
    match &fault {
        Fault::ProxyCut => proxy.as_ref().unwrap().cut(),
        Fault::Restart(mode) => {
            let Database::Private(cluster) = &mut database else {
                unreachable!()
            };
            cluster.halt(*mode).expect("the server stops");
        }
        Fault::Terminate => {
            // Only when every service holds a connection (a pool may be between connections
            // for a moment), checked and killed in one statement.
            let admin = etl_tests::connect(&url).await;
            let killed: Vec<String> = wait_for(
                "a connection of every service to kill",
                DEADLINE,
                || async {
                    // A request makes sure the query service's pool holds a connection.
                    http_status(&health).await;
                    let killed: Vec<String> = admin
                        .query(
                            "WITH targets AS (
                                 SELECT pid, application_name FROM pg_stat_activity
                                 WHERE datname = current_database() AND application_name LIKE 'etl-%'),
                             every AS (
                                 SELECT count(DISTINCT application_name) = 4 AS ready FROM targets)
                             SELECT DISTINCT application_name FROM targets, every
                             WHERE every.ready AND pg_terminate_backend(pid)
                             ORDER BY 1",
                            &[],
                        )
                        .await
                        .unwrap()
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    (!killed.is_empty()).then_some(killed)
                },
            )
            .await;
            assert_eq!(
                killed,
                [
                    "etl-ingester",
                    "etl-normalizer",
                    "etl-normalizer-listen",
                    "etl-query"
                ],
                "a connection of every service was killed, the normalizer's LISTEN one too"
            );
        }
    }
    if !matches!(fault, Fault::Terminate) {
        wait_for("/health to report the outage", DEADLINE, || async {
            (http_status(&health).await == Some(503)).then_some(())
        })
        .await;
        pipeline.assert_running();
        match &mut database {
            Database::Private(cluster) => cluster.resume().expect("the server starts again"),
            Database::Shared(_) => proxy.as_ref().unwrap().restore(),
        }
    }

    wait_for("/health to recover", DEADLINE, || async {
        (http_status(&health).await == Some(200)).then_some(())
    })
    .await;
    // The ingester retries on its own (no restart, no trigger) and the normalizer catches up.
    // A run records its end only after its last batch has committed (the normalizer looks for
    // one more batch first), so the data can be complete while its run is still open: wait
    // for every run to have ended too.
    wait_for(
        "every row to be ingested and normalized, and every run to have ended",
        DEADLINE,
        || async {
            let (raw, normalized, _) = counts(&url).await?;
            let ingests = runs(&url, "ingester").await;
            let normalizes = runs(&url, "normalizer").await;
            let ended =
                |history: &[(String, Option<String>)]| history.iter().all(|r| r.0 != "running");
            (raw == ROWS as i64
                && normalized == ROWS as i64
                && ingests.iter().any(|r| r.0 == "success")
                && ended(&ingests)
                && ended(&normalizes))
            .then_some(())
        },
    )
    .await;
    let (_, normalized, distinct) = counts(&url).await.unwrap();
    assert_eq!(
        (normalized, distinct),
        (ROWS as i64, ROWS as i64),
        "no duplicates"
    );

    // A run in flight either rode the fault out (a run holds a pooled connection only while it
    // writes a batch) or is recorded failed with its reason; the last runs succeeded.
    for service in ["ingester", "normalizer"] {
        let history = runs(&url, service).await;
        assert!(
            history.iter().all(|r| r.0 != "failed" || r.1.is_some()),
            "every failed {service} run says why: {history:?}"
        );
        assert_eq!(
            history.last().map(|r| r.0.as_str()),
            Some("success"),
            "{history:?}"
        );
    }
    assert_eq!(
        http_status(&format!("http://{query_addr}/data?source=rows")).await,
        Some(200)
    );
    if matches!(fault, Fault::Terminate) {
        // The listener says why its connection ended, not just that it did.
        let normalizer = pipeline
            .services
            .iter()
            .find(|s| s.name == "etl-normalizer")
            .unwrap()
            .log();
        assert!(
            normalizer
                .lines()
                .any(|l| l.contains("LISTEN connection lost")
                    && l.contains("terminating connection due to administrator command")),
            "{normalizer}"
        );
    }

    pipeline.stop().await;
}

#[tokio::test]
async fn a_connection_cut_mid_ingest_is_ridden_out_and_the_data_ends_exact() {
    scenario(Fault::ProxyCut, During::Ingest).await;
}

#[tokio::test]
async fn a_fast_postgres_restart_mid_ingest_is_ridden_out_and_the_data_ends_exact() {
    scenario(Fault::Restart(ShutdownMode::Fast), During::Ingest).await;
}

#[tokio::test]
async fn an_immediate_postgres_restart_mid_ingest_is_ridden_out_and_the_data_ends_exact() {
    scenario(Fault::Restart(ShutdownMode::Immediate), During::Ingest).await;
}

#[tokio::test]
async fn a_fast_postgres_restart_mid_normalize_is_ridden_out_and_the_data_ends_exact() {
    scenario(Fault::Restart(ShutdownMode::Fast), During::Normalize).await;
}

#[tokio::test]
async fn an_immediate_postgres_restart_mid_normalize_is_ridden_out_and_the_data_ends_exact() {
    scenario(Fault::Restart(ShutdownMode::Immediate), During::Normalize).await;
}

#[tokio::test]
async fn connections_terminated_under_every_service_mid_ingest_are_replaced() {
    scenario(Fault::Terminate, During::Ingest).await;
}

#[tokio::test]
async fn connections_terminated_under_every_service_mid_normalize_are_replaced() {
    scenario(Fault::Terminate, During::Normalize).await;
}
