//! Writers yield to readers: while two or more query-service backends are running statements,
//! each normalize batch is followed by a pause as long as the batch; while the API is idle or
//! only polled, none. And a run that changed rows leaves the search indexes nothing pending.

mod support;

use etl_shared::raw::RawTable;
use etl_tests::{counter_value, BusyReader, TestDb};
use support::*;

const YIELD: &str = "etl_normalize_yield_seconds_total";

#[tokio::test]
async fn batches_pause_while_the_query_service_is_busy_and_not_while_it_is_idle_or_polled() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let mut settings = settings(&db, &sources_toml(&[]));
    settings.batch_size = 10;
    let normalizer = normalizer(&settings, None);

    write_raw(&mut client, RawTable::Api, "api", &api_items(1..=30), false).await;
    let idle = normalizer.run_source("api").await.unwrap();
    assert_eq!(idle.summary.unwrap().counts.processed, 30);
    assert_eq!(
        counter_value(&normalizer.metrics().encode(), YIELD),
        0.0,
        "nobody reading: no pause"
    );

    // One request at a time is a client polling: no pause either.
    let poller = BusyReader::start(&db.url).await;
    let more = api_items(31..=45);
    write_raw(&mut client, RawTable::Api, "api", &more, false).await;
    normalizer.run_source("api").await.unwrap();
    assert_eq!(counter_value(&normalizer.metrics().encode(), YIELD), 0.0);

    let second = BusyReader::start(&db.url).await;
    let more = api_items(46..=75);
    write_raw(&mut client, RawTable::Api, "api", &more, false).await;
    let busy = normalizer.run_source("api").await.unwrap();
    drop((poller, second));

    assert_eq!(
        busy.summary.unwrap().counts.processed,
        30,
        "paced, not stopped"
    );
    assert!(
        counter_value(&normalizer.metrics().encode(), YIELD) > 0.0,
        "batches paused for the busy reader:\n{}",
        normalizer.metrics().encode()
    );
}

/// Pages the search index `index` holds in its pending list (cleaning them; 0 when empty).
async fn pending_pages(client: &tokio_postgres::Client, index: &str) -> i64 {
    client
        .query_one(
            "SELECT gin_clean_pending_list($1::text::regclass)",
            &[&index],
        )
        .await
        .unwrap()
        .get(0)
}

/// The search indexes of `source`'s partition of normalized_data.
async fn search_indexes(client: &tokio_postgres::Client, source: &str) -> Vec<String> {
    let rows = client
        .query("SELECT i::text FROM etl_search_indexes($1) i", &[&source])
        .await
        .unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

#[tokio::test]
async fn a_run_that_changed_rows_leaves_the_search_indexes_nothing_pending() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let settings = settings(&db, &sources_toml(&[]));
    let normalizer = normalizer(&settings, None);
    // As any writer leaves them: new entries wait in the pending lists.
    client
        .batch_execute(
            "SELECT etl_ensure_partition('api');
             INSERT INTO normalized_data (source, source_id, name, value, description)
             SELECT 'api', 'old' || g, 'old ' || g, g, 'about ' || g
             FROM generate_series(1, 200) g",
        )
        .await
        .unwrap();
    let indexes = search_indexes(&client, "api").await;
    assert_eq!(indexes.len(), 2, "{indexes:?}");
    for index in &indexes {
        assert!(pending_pages(&client, index).await > 0, "{index}");
    }

    let items = api_items(1..=200);
    write_raw(&mut client, RawTable::Api, "api", &items, false).await;
    normalizer.run_source("api").await.unwrap();

    for index in &indexes {
        assert_eq!(pending_pages(&client, index).await, 0, "{index}");
    }
}
