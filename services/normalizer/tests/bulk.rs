//! The bulk path: a backlog past `NORMALIZER_BULK_MIN_ROWS` (and at least half the source's
//! rows) is normalized apart, without search indexes, indexed once, and swapped in whole.

mod support;

use std::collections::HashMap;

use etl_normalizer::batch::{self, BatchOutcome};
use etl_normalizer::mapping::FieldPaths;
use etl_normalizer::replay::{self, Reason, ReplayOutcome};
use etl_shared::raw::RawTable;
use etl_shared::runs::RunCounts;
use etl_tests::TestDb;
use support::*;
use tokio_postgres::Client;

/// The table serving `source` now, and how many search (GIN) indexes it has.
async fn served_partition(client: &Client, source: &str) -> (String, i64) {
    let row = client
        .query_one(
            "SELECT etl_partition_of($1, 'live')::text,
                    (SELECT count(*) FROM etl_search_indexes($1))",
            &[&source],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Per source id: (id, title, updated_at) as served.
async fn served(
    client: &Client,
    source: &str,
) -> HashMap<String, (i64, String, std::time::SystemTime)> {
    client
        .query(
            "SELECT source_id, id, name, updated_at FROM normalized_data WHERE source = $1",
            &[&source],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

#[tokio::test]
async fn a_first_load_past_the_threshold_is_built_apart_and_served_with_its_search_indexes() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let mut settings = settings(&db, &sources_toml(&[]));
    settings.bulk_min_rows = 1_000;
    let normalizer = normalizer(&settings, None);
    let mut items = api_items(1..=3_000);
    items.push(api_item(3_001, "priceless", serde_json::json!("many")));
    write_raw(&mut client, RawTable::Api, "api", &items, false).await;
    // Logs every row written through normalized_data, row by row (the path the bulk one avoids).
    install_apply_log(&client).await;

    let run = normalizer.run_source("api").await.unwrap().summary.unwrap();

    assert_eq!(run.error, None);
    assert_eq!(
        run.counts,
        RunCounts {
            processed: 3_001,
            inserted: 3_000,
            rejected: 1,
            ..RunCounts::default()
        }
    );
    assert_eq!(tallies(&client, "api").await, (3_000, 1, 3_001));
    assert!(caught_up(&client, "api").await);
    assert_eq!(
        apply_counts(&client).await,
        (0, 0),
        "no row went through normalized_data one by one"
    );
    let (_, search_indexes) = served_partition(&client, "api").await;
    assert_eq!(search_indexes, 2, "built in bulk before the swap");
    let left: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM etl_replays) + (SELECT count(*) FROM normalized_build)
                    + (SELECT count(*) FROM etl_partitions WHERE role = 'build')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "nothing of the build is left behind");
    // Searches find what they should through the new indexes.
    let found: i64 = client
        .query_one(
            "SELECT count(*) FROM normalized_data WHERE name ILIKE '%item 12%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let expected = (1..=3_000)
        .filter(|i| format!("item {i}").contains("item 12"))
        .count() as i64;
    assert_eq!(found, expected);

    // A small change afterwards goes the ordinary way, into the same partition.
    let (partition, _) = served_partition(&client, "api").await;
    let changed: Vec<_> = (1..=10)
        .map(|i| api_item(i, "changed", serde_json::json!(1)))
        .collect();
    write_raw(&mut client, RawTable::Api, "api", &changed, false).await;
    let run = normalizer.run_source("api").await.unwrap().summary.unwrap();
    assert_eq!((run.counts.processed, run.counts.updated), (10, 10));
    assert_eq!(served_partition(&client, "api").await.0, partition);
    assert_eq!(apply_counts(&client).await, (10, 0));
}

#[tokio::test]
async fn a_refresh_of_most_rows_is_swapped_in_whole_keeping_ids_and_unchanged_timestamps() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let mut reader = db.client().await;
    let helper = db.client().await;
    let settings = settings(&db, &sources_toml(&[]));
    let normalizer = normalizer(&settings, None);
    write_raw(
        &mut client,
        RawTable::Api,
        "api",
        &api_items(1..=2_000),
        false,
    )
    .await;
    normalizer.run_source("api").await.unwrap();
    let (old_partition, _) = served_partition(&client, "api").await;
    let before = served(&client, "api").await;
    assert_eq!(before.len(), 2_000);

    // 1,500 changed, 450 unchanged, 50 deleted upstream, 600 new.
    let mut refresh: Vec<_> = (1..=1_500)
        .map(|i| api_item(i, &format!("new item {i}"), serde_json::json!(i)))
        .collect();
    refresh.extend(api_items(2_001..=2_600));
    write_raw(&mut client, RawTable::Api, "api", &refresh, false).await;
    client
        .execute(
            "UPDATE raw_api_data SET deleted_at = now(), change_id = nextval('raw_change_id_seq')
             WHERE source = 'api' AND source_id::int > 1950 AND source_id::int <= 2000",
            &[],
        )
        .await
        .unwrap();
    let source = settings.sources.get("api").unwrap();
    assert!(!batch::wants_bulk(&client, source, 2_200).await.unwrap());
    assert!(batch::wants_bulk(&client, source, 1_000).await.unwrap());

    let paths = FieldPaths::for_source(source);
    let run = normalizer.runs().begin("api").await.unwrap();
    replay::begin(&client, "api", &paths.fingerprint(), Reason::Backlog)
        .await
        .unwrap();
    let reason: String = client
        .query_one("SELECT reason FROM etl_replays WHERE source = 'api'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason, "backlog");
    // Ordinary batches stand aside while the build is under way.
    assert_eq!(
        batch::process_batch(&mut reader, source, &paths, run.id, 500, None)
            .await
            .unwrap(),
        BatchOutcome::Busy
    );
    // An ingest run of the source is live (it holds the source's lease) until the build has
    // caught up: the build waits for it instead of serving part of a load.
    let ingest = db.client().await;
    ingest
        .batch_execute(
            "INSERT INTO etl_source_leases (source, run_id) VALUES ('api', 424242);
             SELECT pg_advisory_lock(424242);",
        )
        .await
        .unwrap();
    let mut ingest_ended = false;
    let mut steps = Vec::new();
    let mut ahead = None;
    let counts = loop {
        let step = replay::process_batch(
            &mut client,
            Some(&helper),
            &mut ahead,
            source,
            &paths,
            run.id,
            500,
        )
        .await
        .unwrap();
        steps.push(step);
        if steps.len() == 1 {
            // A record built already changes upstream while the build runs (the first batch
            // holds the oldest changes: the 450 unchanged records).
            let late = [api_item(1_501, "late item 1501", serde_json::json!(1))];
            write_raw(&mut client, RawTable::Api, "api", &late, false).await;
        }
        if let ReplayOutcome::Swapped(counts) = step {
            break counts;
        }
        if step == ReplayOutcome::WaitingForIngest {
            assert!(!ingest_ended, "waits while the ingest runs, not after");
            // The ingest run ends: its process lets go of the run's lock.
            ingest
                .batch_execute("SELECT pg_advisory_unlock(424242)")
                .await
                .unwrap();
            ingest_ended = true;
        }
        assert_eq!(
            served(&reader, "api").await,
            before,
            "the old version is served whole until the swap ({step:?})"
        );
    };

    assert_eq!(
        counts,
        RunCounts {
            processed: 2_550,
            inserted: 600,
            updated: 1_501,
            unchanged: 449,
            rejected: 0,
            deleted: 50,
        }
    );
    let after = served(&client, "api").await;
    assert_eq!(after.len(), 2_550);
    for i in 1..=2_600 {
        let id = i.to_string();
        let (old, new) = (before.get(&id), after.get(&id));
        match i {
            1..=1_500 => {
                let (old, new) = (old.unwrap(), new.unwrap());
                assert_eq!((new.0, new.1.as_str()), (old.0, &*format!("new item {i}")));
                assert!(new.2 > old.2, "updated_at moves for a changed record");
            }
            1_501 => {
                let (old, new) = (old.unwrap(), new.unwrap());
                assert_eq!((new.0, new.1.as_str()), (old.0, "late item 1501"));
            }
            1_502..=1_950 => assert_eq!(new, old, "unchanged: id and updated_at kept"),
            1_951..=2_000 => assert_eq!(new, None, "withdrawn"),
            _ => {
                let new = new.unwrap();
                assert!(before.values().all(|(id, ..)| *id < new.0), "a new id");
            }
        }
    }
    assert_eq!(tallies(&client, "api").await, (2_550, 0, 2_550));
    assert!(caught_up(&client, "api").await);
    let (new_partition, search_indexes) = served_partition(&client, "api").await;
    assert_ne!(
        new_partition, old_partition,
        "swapped, not rewritten in place"
    );
    assert_eq!(search_indexes, 2);
    assert_eq!(
        steps
            .iter()
            .filter(|s| **s == ReplayOutcome::Indexed)
            .count(),
        1,
        "indexed once: {steps:?}"
    );
    let waited = steps
        .iter()
        .position(|s| *s == ReplayOutcome::WaitingForIngest);
    let indexed = steps.iter().position(|s| *s == ReplayOutcome::Indexed);
    assert!(
        waited.is_some() && waited < indexed,
        "caught up, it waited for the ingest before indexing: {steps:?}"
    );
    run.end(normalizer.metrics(), counts, None).await.unwrap();
}
