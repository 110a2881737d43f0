//! A normalize run over real raw rows: the mapping and validation, rejects with reasons,
//! idempotency, and the per-source invariant raw rows = normalized + rejected.

mod support;

use serde_json::{json, Value};
use support::*;

use etl_shared::raw::{self, RawJson, RawTable};
use etl_tests::{SourceToml, TestDb};

#[tokio::test]
async fn valid_rows_of_both_kinds_are_normalized_and_the_checkpoint_advances() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    write_raw(
        &mut client,
        RawTable::Api,
        "api",
        &api_items(1..=2500),
        false,
    )
    .await;
    let csv = [
        json!({"id": "a", "name": "Alpha", "value": "1.25", "note": "first"}),
        json!({"id": "b", "name": "Beta", "value": " -3e2 ", "note": ""}),
    ];
    write_raw(&mut client, RawTable::Csv, "csv", &csv, false).await;
    let normalizer = normalizer(&settings(&db, &sources_toml(&[])), None);

    let api = normalizer.run_source("api").await.unwrap().summary.unwrap();
    let csv = normalizer.run_source("csv").await.unwrap().summary.unwrap();

    assert_eq!(
        (api.counts.processed, api.counts.inserted, api.error),
        (2500, 2500, None)
    );
    assert_eq!((csv.counts.processed, csv.counts.inserted), (2, 2));
    let row = client
        .query_one(
            "SELECT name, value, description FROM normalized_data WHERE source = 'api' AND source_id = '7'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, f64>(1),
            row.get::<_, Option<String>>(2)
        ),
        ("item 7".into(), 3.5, Some("about 7".into()))
    );
    let beta = client
        .query_one(
            "SELECT value, description FROM normalized_data WHERE source_id = 'b'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (beta.get::<_, f64>(0), beta.get::<_, Option<String>>(1)),
        (-300.0, None)
    );
    assert!(caught_up(&client, "api").await && caught_up(&client, "csv").await);
    let total: i64 = client
        .query_one(
            "SELECT total_processed FROM etl_checkpoint WHERE source = 'api'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 2500);
    // Nothing more to do: no run is recorded for an idle one.
    assert!(normalizer
        .run_source("api")
        .await
        .unwrap()
        .summary
        .is_none());
}

#[tokio::test]
async fn bad_records_are_rejected_with_the_field_and_reason_while_good_ones_land() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let bad: Vec<(&str, Value)> = vec![
        ("no-name", json!({"id": "no-name", "price": 1})),
        ("abc", json!({"id": "abc", "title": "t", "price": "abc"})),
        ("nan", json!({"id": "nan", "title": "t", "price": "NaN"})),
        ("empty", json!({"id": "empty", "title": "t", "price": ""})),
        (
            "nested",
            json!({"id": "nested", "title": "t", "price": {"amount": 1}}),
        ),
        (
            "long",
            json!({"id": "long", "title": "t", "price": 1, "summary": "d".repeat(1024 * 1024)}),
        ),
    ];
    let mut items: Vec<Value> = bad.iter().map(|(_, v)| v.clone()).collect();
    items.extend(api_items(1..=3));
    write_raw(&mut client, RawTable::Api, "api", &items, false).await;
    let huge = r#"[{"id": "huge", "title": "t", "price": 1e999}]"#;
    write_raw_json(&mut client, RawTable::Api, "api", huge, false).await;
    let normalizer = normalizer(&settings(&db, &sources_toml(&[])), None);

    let run = normalizer.run_source("api").await.unwrap().summary.unwrap();

    assert_eq!(run.error, None, "bad records do not fail the run");
    assert_eq!(
        (
            run.counts.processed,
            run.counts.inserted,
            run.counts.rejected
        ),
        (10, 3, 7)
    );
    let rejects: Vec<(String, String)> = client
        .query(
            "SELECT source_id, reason FROM etl_rejects WHERE stage = 'normalize' ORDER BY source_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [
        ("abc", r#"value: "abc" at /price is not a number"#),
        ("empty", "value: empty at /price"),
        // Postgres stores the number exactly: 1 and 999 zeros.
        ("huge", "value: 100000000000000000000000… (1000 characters) at /price is out of range for a double"),
        ("long", "description: 1048576 bytes long; at most 65536 are accepted"),
        ("nan", r#"value: "NaN" at /price is not a number"#),
        ("nested", "value: an object at /price; expected a number"),
        ("no-name", "name: nothing at /title"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(rejects, expected);
    let raw: Vec<u8> = client
        .query_one("SELECT raw FROM etl_rejects WHERE source_id = 'abc'", &[])
        .await
        .unwrap()
        .get(0);
    let raw: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(raw["price"], "abc", "the reject keeps the raw record");
    assert_eq!(
        tallies(&client, "api").await,
        (3, 7, 10),
        "raw = normalized + rejected"
    );
}

#[tokio::test]
async fn reprocessing_unchanged_rows_writes_nothing_and_a_changed_row_moves_updated_at() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    install_apply_log(&client).await;
    write_raw(&mut client, RawTable::Api, "api", &api_items(1..=20), false).await;
    let normalizer = normalizer(&settings(&db, &sources_toml(&[])), None);
    normalizer.run_source("api").await.unwrap();
    let versions =
        "SELECT source_id, xmin::text, updated_at::text FROM normalized_data ORDER BY source_id";
    let before: Vec<(String, String, String)> = client
        .query(versions, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();

    // Replay everything from the start, as after a lost checkpoint.
    client
        .execute("UPDATE etl_checkpoint SET last_processed_id = 0", &[])
        .await
        .unwrap();
    let replay = normalizer.run_source("api").await.unwrap().summary.unwrap();

    assert_eq!(
        (
            replay.counts.unchanged,
            replay.counts.inserted,
            replay.counts.updated
        ),
        (20, 0, 0)
    );
    let after_replay: Vec<(String, String, String)> = client
        .query(versions, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(after_replay, before, "no normalized row was rewritten");

    write_raw(
        &mut client,
        RawTable::Api,
        "api",
        &[api_item(5, "renamed", json!(9))],
        false,
    )
    .await;
    let change = normalizer.run_source("api").await.unwrap().summary.unwrap();

    assert_eq!((change.counts.processed, change.counts.updated), (1, 1));
    let row = client
        .query_one(
            "SELECT name, value, updated_at > created_at FROM normalized_data WHERE source_id = '5'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, f64>(1),
            row.get::<_, bool>(2)
        ),
        ("renamed".into(), 9.0, true)
    );
    assert_eq!(
        apply_counts(&client).await,
        (21, 1),
        "20 inserts and exactly one update"
    );
}

#[tokio::test]
async fn a_fixed_record_replaces_its_reject_and_a_broken_one_is_withdrawn() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    write_raw(
        &mut client,
        RawTable::Api,
        "api",
        &[json!({"id": "1", "title": "t", "price": "oops"})],
        false,
    )
    .await;
    write_raw(&mut client, RawTable::Api, "api", &api_items(2..=2), false).await;
    let normalizer = normalizer(&settings(&db, &sources_toml(&[])), None);
    normalizer.run_source("api").await.unwrap();
    assert_eq!(tallies(&client, "api").await, (1, 1, 2));

    write_raw(
        &mut client,
        RawTable::Api,
        "api",
        &[api_item(1, "fixed", json!(1))],
        false,
    )
    .await;
    write_raw(
        &mut client,
        RawTable::Api,
        "api",
        &[json!({"id": "2", "title": "t", "price": null})],
        false,
    )
    .await;
    normalizer.run_source("api").await.unwrap();

    assert_eq!(
        tallies(&client, "api").await,
        (1, 1, 2),
        "raw = normalized + rejected, still"
    );
    let normalized: String = client
        .query_one("SELECT source_id FROM normalized_data", &[])
        .await
        .unwrap()
        .get(0);
    let rejected: String = client
        .query_one(
            "SELECT source_id FROM etl_rejects WHERE stage = 'normalize'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!((normalized.as_str(), rejected.as_str()), ("1", "2"));
}

#[tokio::test]
async fn a_mapping_that_names_a_missing_column_fails_its_run_and_other_sources_go_on() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let extra = [SourceToml::csv("renamed", "http://127.0.0.1:1/r.csv")
        .mapping(r#"{ source_id = "id", name = "name", value = "amount" }"#)];
    write_raw(
        &mut client,
        RawTable::Csv,
        "renamed",
        &[json!({"id": "1", "name": "n", "value": "1"})],
        false,
    )
    .await;
    write_raw(
        &mut client,
        RawTable::Csv,
        "csv",
        &[json!({"id": "1", "name": "n", "value": "1", "note": ""})],
        false,
    )
    .await;
    let normalizer = normalizer(&settings(&db, &sources_toml(&extra)), None);

    let broken = normalizer
        .run_source("renamed")
        .await
        .unwrap()
        .summary
        .unwrap();
    let fine = normalizer.run_source("csv").await.unwrap().summary.unwrap();

    let error = broken.error.expect("the run fails");
    assert!(error.contains(r#"mapping.value = "amount""#), "{error}");
    let status: String = client
        .query_one(
            "SELECT status FROM etl_runs WHERE id = $1",
            &[&broken.run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "failed");
    assert_eq!(
        tallies(&client, "renamed").await,
        (0, 0, 1),
        "nothing normalized or rejected"
    );
    assert!(
        !caught_up(&client, "renamed").await,
        "the checkpoint stays for after the fix"
    );
    assert_eq!((fine.error, fine.counts.inserted), (None, 1));
}

/// Invariant 2 with the global change-id sequence: a transaction that drew its ids first but
/// commits last is still normalized, because checkpoints are per source and writers of one
/// source are serialized.
#[tokio::test]
async fn a_raw_transaction_that_took_its_position_earlier_but_commits_later_is_normalized() {
    let db = TestDb::new().await;
    let mut slow = db.client().await;
    let mut fast = db.client().await;
    let normalizer = normalizer(&settings(&db, &sources_toml(&[])), None);

    // The slow writer takes the lock and its change ids, and does not commit yet.
    let tx = slow.transaction().await.unwrap();
    let slow_row = (
        "slow".to_owned(),
        RawJson(json!({"id": "slow", "name": "s", "value": "1", "note": ""}).to_string()),
    );
    raw::write(
        &tx,
        RawTable::Csv,
        "csv",
        &[slow_row],
        None,
        raw::Probe::Fingerprints,
    )
    .await
    .unwrap();
    let early: i64 = tx
        .query_one(
            "SELECT change_id FROM raw_csv_data WHERE source = 'csv' AND source_id = 'slow'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Another source commits later ids first, and is normalized.
    write_raw(&mut fast, RawTable::Api, "api", &api_items(1..=3), true).await;
    normalizer.run_source("api").await.unwrap();
    normalizer.run_source("csv").await.unwrap();
    // A second writer of the same source waits for the first: it cannot commit before it.
    let writer_db = db.url.clone();
    let second = tokio::spawn(async move {
        let mut client = etl_tests::connect(&writer_db).await;
        write_raw(
            &mut client,
            RawTable::Csv,
            "csv",
            &[json!({"id": "next", "name": "n", "value": "2", "note": ""})],
            true,
        )
        .await;
    });
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), async {
            while !second.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .is_err(),
        "the second writer of the source must wait for the first"
    );

    tx.commit().await.unwrap();
    second.await.unwrap();
    normalizer.run_source("csv").await.unwrap();

    let ids: Vec<String> = fast
        .query(
            "SELECT source_id FROM normalized_data WHERE source = 'csv' ORDER BY source_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, ["next", "slow"]);
    let api_max: i64 = fast
        .query_one("SELECT max(change_id) FROM raw_api_data", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        early < api_max,
        "the slow transaction really drew its id first"
    );
}

#[tokio::test]
async fn a_changed_mapping_that_cannot_apply_fails_one_run_and_leaves_the_old_version_served() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let rows: Vec<serde_json::Value> = (1..=20)
        .map(|i| serde_json::json!({ "id": i.to_string(), "name": format!("n{i}"), "value": i.to_string(), "note": "" }))
        .collect();
    write_raw(&mut client, RawTable::Csv, "csv", &rows, false).await;
    let before = normalizer(&settings(&db, &sources_toml(&[])), None);
    before.run_source("csv").await.unwrap();
    // The sources file now names a column the rows do not have.
    let remapped = sources_toml(&[]).replace(r#"name = "name""#, r#"name = "title""#);
    let after = normalizer(&settings(&db, &remapped), None);

    let first = after.run_source("csv").await.unwrap();
    let polls = [
        after.run_source("csv").await.unwrap(),
        after.run_source("csv").await.unwrap(),
    ];

    let error = first
        .summary
        .and_then(|s| s.error)
        .expect("a failed replay run");
    assert!(error.contains("mapping.name = \"title\""), "{error}");
    assert!(
        polls.iter().all(|p| p.summary.is_none()),
        "later polls record no more failed runs"
    );
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM normalized_data WHERE source = 'csv' AND name LIKE 'n%'),
                    (SELECT error FROM etl_replays WHERE source = 'csv'),
                    (SELECT count(*) FROM etl_runs WHERE service = 'normalizer' AND status = 'failed')",
            &[],
        )
        .await
        .unwrap();
    let (served, reason, failed): (i64, Option<String>, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(served, 20, "the previous version stays served");
    assert!(
        reason.is_some_and(|r| r.contains("title")),
        "the reason is kept for /stats"
    );
    assert_eq!(failed, 1);

    // Fixed in the file: the replay runs again and swaps in.
    let fixed = normalizer(
        &settings(
            &db,
            &sources_toml(&[]).replace(r#"name = "name""#, r#"name = "value""#),
        ),
        None,
    );
    let replayed = fixed.run_source("csv").await.unwrap();
    assert_eq!(replayed.summary.and_then(|s| s.error), None);
    let renamed: i64 = client
        .query_one(
            "SELECT count(*) FROM normalized_data WHERE source = 'csv' AND name = value::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(renamed, 20, "the new version is served");
}

#[tokio::test]
async fn rows_the_mapping_cannot_read_fail_one_run_not_one_per_poll_until_new_rows_arrive() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    // The file's header changed upstream: rows 3 and 4 came with `title` instead of `name`.
    let row = |i: u32, column: &str| json!({ "id": i.to_string(), column: format!("n{i}"), "value": "1", "note": "" });
    let rows = [
        row(1, "name"),
        row(2, "name"),
        row(3, "title"),
        row(4, "title"),
    ];
    write_raw(&mut client, RawTable::Csv, "csv", &rows, false).await;
    let normalizer = normalizer(&settings(&db, &sources_toml(&[])), None);

    let first = normalizer.run_source("csv").await.unwrap();
    let polls = [
        normalizer.run_source("csv").await.unwrap(),
        normalizer.run_source("csv").await.unwrap(),
    ];

    let error = first.summary.and_then(|s| s.error).expect("a failed run");
    assert!(error.contains("mapping.name = \"name\""), "{error}");
    assert!(
        polls.iter().all(|p| p.summary.is_none()),
        "no failed run per poll"
    );
    // Re-ingested in the new shape's fix: the rows arrive again, and the source goes on.
    write_raw(
        &mut client,
        RawTable::Csv,
        "csv",
        &[row(3, "name"), row(4, "name")],
        false,
    )
    .await;
    let resumed = normalizer.run_source("csv").await.unwrap();
    assert_eq!(resumed.summary.and_then(|s| s.error), None);
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM normalized_data WHERE source = 'csv'),
                    (SELECT count(*) FROM etl_runs WHERE service = 'normalizer' AND status = 'failed'),
                    (SELECT stalled_reason FROM etl_checkpoint WHERE source = 'csv')",
            &[],
        )
        .await
        .unwrap();
    let (normalized, failed, stalled): (i64, i64, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!((normalized, failed, stalled), (4, 1, None));
}
