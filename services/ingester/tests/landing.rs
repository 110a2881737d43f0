//! Landing semantics: re-ingesting unchanged data writes nothing and wakes nobody, a changed
//! record updates exactly its row, and concurrent ingests neither lose nor duplicate rows nor
//! let change ids become visible out of order.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etl_shared::RAW_READY_CHANNEL;
use etl_tests::{Listener, SourceToml, TestDb, TestServer};
use poem::{endpoint::make_sync, Request, Response, Route};
use support::*;

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
