//! Landing semantics: re-ingesting unchanged data writes nothing, wakes nobody and sends only
//! ids and fingerprints, a changed record updates exactly its row, and concurrent ingests neither lose nor duplicate rows nor
//! let change ids become visible out of order.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etl_ingester::Ingester;
use etl_shared::config::{DatabaseSettings, Env};
use etl_shared::RAW_READY_CHANNEL;
use etl_tests::{counter_value, BusyReader, Listener, SourceToml, TcpProxy, TestDb, TestServer};
use poem::{endpoint::make_sync, Request, Response, Route};
use support::*;
use tokio_util::sync::CancellationToken;

/// A CSV server whose body the test can change between runs.
async fn mutable_csv(initial: String) -> (TestServer, Arc<Mutex<String>>) {
    let body = Arc::new(Mutex::new(initial));
    let served = body.clone();
    let server = TestServer::start(Route::new().at(
        "/data.csv",
        make_sync(move |_: Request| Response::builder().body(served.lock().unwrap().clone())),
    ))
    .await;
    (server, body)
}

fn rows(n: u64, tag: &str) -> String {
    let mut csv = String::from("id,name,value\n");
    for i in 1..=n {
        csv.push_str(&format!("{i},{tag} {i},{i}.5\n"));
    }
    csv
}

/// The source every test here ingests, named `items`.
fn items_source(url: &str) -> String {
    SourceToml::csv("items", url).to_string()
}

/// (source_id, change_id, xmin) of every raw row: xmin moves on any write to the row.
async fn row_versions(db: &TestDb) -> Vec<(String, i64, String)> {
    db.client()
        .await
        .query(
            "SELECT source_id, change_id, xmin::text FROM raw_csv_data ORDER BY source_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn reingesting_unchanged_data_writes_nothing_and_sends_no_notification() {
    let db = TestDb::new().await;
    let (server, _) = mutable_csv(rows(100, "item")).await;
    let ingester = ingester(&db, &items_source(&server.url("/data.csv")));
    let mut listener = Listener::start(&db.url, RAW_READY_CHANNEL).await;
    ingester.run_source("items").await.unwrap();
    assert_eq!(
        listener.drain().await,
        ["items"],
        "one NOTIFY per changed batch"
    );
    let before = row_versions(&db).await;

    let again = ingester.run_source("items").await.unwrap();

    assert_eq!(row_versions(&db).await, before, "no row was rewritten");
    assert!(
        listener.drain().await.is_empty(),
        "nothing to normalize, so no notification"
    );
    let run = run_row(&db, again.run_id).await;
    assert_eq!(
        (run.processed, run.inserted, run.updated, run.unchanged),
        (100, 0, 0, 100)
    );
}

/// `n` rows, each with about 1 KiB of notes.
fn wide_rows(n: u64) -> String {
    let mut csv = String::from("id,name,value,notes\n");
    let notes = "n".repeat(1000);
    for i in 1..=n {
        csv.push_str(&format!("{i},item {i},{i}.5,{notes} {i}\n"));
    }
    csv
}

/// An ingester whose every database byte goes through `proxy`, which counts them.
fn ingester_through(db: &TestDb, proxy: &TcpProxy, sources_toml: &str) -> Ingester {
    let mut settings = settings(db, sources_toml);
    let url = proxy.url_for(&db.url);
    settings.database =
        DatabaseSettings::from_env(&Env::from_pairs([("DATABASE_URL", url)])).unwrap();
    let pool = etl_shared::db::pool(&settings.database, etl_shared::db::Needs::Session).unwrap();
    Ingester::new(&settings, pool, CancellationToken::new())
}

/// Bytes `run` sent the database.
async fn bytes_sent<F: std::future::Future>(proxy: &TcpProxy, run: F) -> (u64, F::Output) {
    let before = proxy.bytes_to_server();
    let output = run.await;
    (proxy.bytes_to_server() - before, output)
}

async fn fingerprints(db: &TestDb) -> Vec<(String, i64, Option<Vec<u8>>)> {
    db.client()
        .await
        .query(
            "SELECT source_id, change_id, fingerprint FROM raw_csv_data ORDER BY source_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn an_unchanged_record_costs_its_id_and_fingerprint_on_the_wire_not_its_data() {
    let db = TestDb::new().await;
    let (server, body) = mutable_csv(wide_rows(2_000)).await;
    let proxy = TcpProxy::to_database(&db.url).await;
    let ingester = ingester_through(&db, &proxy, &items_source(&server.url("/data.csv")));

    let (first_bytes, first) = bytes_sent(&proxy, ingester.run_source("items")).await;
    let (again_bytes, again) = bytes_sent(&proxy, ingester.run_source("items")).await;
    *body.lock().unwrap() = wide_rows(2_000).replacen("7,item 7,", "7,renamed,", 1);
    let (changed_bytes, changed) = bytes_sent(&proxy, ingester.run_source("items")).await;

    assert!(
        first_bytes > 2_000 * 1_000,
        "the first run sends the data: {first_bytes} bytes"
    );
    let run = run_row(&db, again.unwrap().run_id).await;
    assert_eq!((run.inserted, run.updated, run.unchanged), (0, 0, 2_000));
    assert!(
        again_bytes * 20 < first_bytes,
        "an unchanged re-run sends ids and fingerprints only: {again_bytes} bytes, against {first_bytes}"
    );
    let run = run_row(&db, changed.unwrap().run_id).await;
    assert_eq!((run.inserted, run.updated, run.unchanged), (0, 1, 1_999));
    assert!(
        changed_bytes * 20 < first_bytes && changed_bytes > again_bytes + 1_000,
        "one changed record is sent whole, the rest as fingerprints: {changed_bytes} bytes"
    );
    let stored = db
        .client()
        .await
        .query_one(
            "SELECT data->>'name' FROM raw_csv_data WHERE source_id = '7'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(stored.get::<_, String>(0), "renamed");
    assert!(first.unwrap().error.is_none());
}

#[tokio::test]
async fn rows_landed_before_fingerprints_get_one_on_their_next_run_without_a_change() {
    let db = TestDb::new().await;
    let (server, _) = mutable_csv(wide_rows(300)).await;
    let proxy = TcpProxy::to_database(&db.url).await;
    let ingester = ingester_through(&db, &proxy, &items_source(&server.url("/data.csv")));
    let (first_bytes, _) = bytes_sent(&proxy, ingester.run_source("items")).await;
    let landed = fingerprints(&db).await;
    assert!(landed
        .iter()
        .all(|(_, _, f)| f.as_ref().is_some_and(|f| f.len() == 16)));
    // As rows landed by a release before fingerprints are.
    db.client()
        .await
        .batch_execute("UPDATE raw_csv_data SET fingerprint = NULL")
        .await
        .unwrap();
    let mut listener = Listener::start(&db.url, RAW_READY_CHANNEL).await;

    let (refill_bytes, refill) = bytes_sent(&proxy, ingester.run_source("items")).await;
    let (after_bytes, _) = bytes_sent(&proxy, ingester.run_source("items")).await;

    let run = run_row(&db, refill.unwrap().run_id).await;
    assert_eq!((run.inserted, run.updated, run.unchanged), (0, 0, 300));
    assert_eq!(
        fingerprints(&db).await,
        landed,
        "the same fingerprints, no new change ids"
    );
    assert!(listener.drain().await.is_empty(), "nothing to normalize");
    assert!(
        refill_bytes > first_bytes / 2,
        "sent whole once: {refill_bytes}"
    );
    assert!(
        after_bytes * 10 < first_bytes,
        "then as fingerprints: {after_bytes}"
    );
}

#[tokio::test]
async fn batches_pause_while_the_query_service_is_busy_and_not_while_it_is_idle() {
    const YIELD: &str = "etl_ingest_yield_seconds_total";
    let db = TestDb::new().await;
    let (server, body) = mutable_csv(rows(6_000, "item")).await;
    let ingester = ingester(&db, &items_source(&server.url("/data.csv")));
    ingester.run_source("items").await.unwrap();
    assert_eq!(counter_value(&ingester.metrics().encode(), YIELD), 0.0);

    let readers = (
        BusyReader::start(&db.url).await,
        BusyReader::start(&db.url).await,
    );
    *body.lock().unwrap() = rows(6_000, "renamed");
    let busy = ingester.run_source("items").await.unwrap();
    drop(readers);

    let run = run_row(&db, busy.run_id).await;
    assert_eq!(
        (run.updated, run.error),
        (6_000, None),
        "paced, not stopped"
    );
    assert!(counter_value(&ingester.metrics().encode(), YIELD) > 0.0);
}

#[tokio::test]
async fn changing_one_record_updates_exactly_that_raw_row() {
    let db = TestDb::new().await;
    let (server, body) = mutable_csv(rows(50, "item")).await;
    let ingester = ingester(&db, &items_source(&server.url("/data.csv")));
    ingester.run_source("items").await.unwrap();
    let before = row_versions(&db).await;
    *body.lock().unwrap() = rows(50, "item").replace("7,item 7,7.5", "7,renamed,7.5");
    let mut listener = Listener::start(&db.url, RAW_READY_CHANNEL).await;

    let summary = ingester.run_source("items").await.unwrap();

    let after = row_versions(&db).await;
    let changed: Vec<&str> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a)
        .map(|(_, a)| a.0.as_str())
        .collect();
    assert_eq!(changed, ["7"]);
    let old = before.iter().find(|r| r.0 == "7").unwrap();
    let new = after.iter().find(|r| r.0 == "7").unwrap();
    assert!(
        new.1 > old.1,
        "its change id moved forward, so the normalizer sees it"
    );
    assert_eq!(listener.drain().await, ["items"]);
    let run = run_row(&db, summary.run_id).await;
    assert_eq!((run.inserted, run.updated, run.unchanged), (0, 1, 49));
}

#[tokio::test]
async fn concurrent_ingests_of_one_source_lose_and_duplicate_nothing() {
    let db = TestDb::new().await;
    // 12,000 rows: several batches per run, so the runs' batches interleave.
    let (server, _) = mutable_csv(rows(12_000, "item")).await;
    let ingester = ingester(&db, &items_source(&server.url("/data.csv")));

    let runs = (0..4).map(|_| ingester.run_source("items"));
    let summaries = futures_util::future::join_all(runs).await;

    let mut inserted = 0;
    for summary in summaries {
        let summary = summary.unwrap();
        assert_eq!(summary.error, None);
        let run = run_row(&db, summary.run_id).await;
        assert_eq!(run.processed, 12_000);
        assert_eq!(run.processed, run.inserted + run.updated + run.unchanged);
        inserted += run.inserted;
    }
    assert_eq!(inserted, 12_000, "each row inserted by exactly one run");
    let (rows, distinct): (i64, i64) = {
        let row = db
            .client()
            .await
            .query_one(
                "SELECT count(*), count(DISTINCT source_id) FROM raw_csv_data",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((rows, distinct), (12_000, 12_000));
}

/// Invariant 2 of the design: a reader that checkpoints "highest change id seen" must never
/// miss a row, even while many writers commit concurrently. Each request gets a different block
/// of ids, so concurrent runs write disjoint rows and nothing but the per-source lock orders
/// their change ids.
#[tokio::test]
async fn a_reader_checkpointing_the_highest_change_id_misses_nothing_under_concurrent_writers() {
    const WRITERS: u64 = 4;
    const BLOCK: u64 = 6_000;
    let db = TestDb::new().await;
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = requests.clone();
    let server = TestServer::start(Route::new().at(
        "/data.csv",
        make_sync(move |_: Request| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let first = (n % WRITERS) * BLOCK + 1;
            let mut csv = String::from("id,name,value\n");
            for i in first..first + BLOCK {
                csv.push_str(&format!("{i},round {} item {i},1\n", n / WRITERS));
            }
            Response::builder().body(csv)
        }),
    ))
    .await;
    let ingester = ingester(&db, &items_source(&server.url("/data.csv")));

    let reader_db = db.url.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let reader_stop = stop.clone();
    let reader = tokio::spawn(async move {
        let client = etl_tests::connect(&reader_db).await;
        let mut checkpoint = 0i64;
        let mut seen = std::collections::HashSet::new();
        loop {
            let done = reader_stop.is_cancelled();
            let rows = client
                .query(
                    "SELECT change_id FROM raw_csv_data WHERE source = 'items' AND change_id > $1
                     ORDER BY change_id",
                    &[&checkpoint],
                )
                .await
                .unwrap();
            for row in rows {
                let id: i64 = row.get(0);
                seen.insert(id);
                checkpoint = checkpoint.max(id);
            }
            if done {
                return seen;
            }
        }
    });

    for _round in 0..3 {
        let runs = (0..WRITERS).map(|_| ingester.run_source("items"));
        for summary in futures_util::future::join_all(runs).await {
            assert_eq!(summary.unwrap().error, None);
        }
    }
    stop.cancel();
    let seen = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();

    let versions = row_versions(&db).await;
    assert_eq!(versions.len() as u64, WRITERS * BLOCK);
    let missed = versions
        .iter()
        .filter(|(_, id, _)| !seen.contains(id))
        .count();
    assert_eq!(missed, 0, "the reader skipped {missed} committed change(s)");
}
