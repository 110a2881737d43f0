//! Writers yield to readers: while two or more query-service backends are running statements,
//! each normalize batch is followed by a pause as long as the batch; while the API is idle or
//! only polled, none.

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
