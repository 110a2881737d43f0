//! Hostile and odd input: every record either lands or is rejected with a reason, the run ends,
//! and nothing panics. The inputs are generated here (deterministically) rather than committed,
//! since some are megabytes.

mod support;

use etl_tests::{SourceToml, TestDb, TestServer};
use support::*;

async fn serve(body: Vec<u8>) -> TestServer {
    TestServer::serving("/:file", body).await
}

/// REST items `{id, n, v}`.
const REST_MAPPING: &str = r#"{ source_id = "/id", name = "/n", value = "/v" }"#;

#[tokio::test]
async fn nul_bytes_huge_fields_mixed_line_endings_and_odd_numbers_land_or_are_rejected() {
    let db = TestDb::new().await;
    let mut body = b"id,name,value\r\n".to_vec();
    body.extend_from_slice(b"1,crlf line,1\r\n");
    body.extend_from_slice(b"2,lf line,2\n");
    body.extend_from_slice(b"3,cr line,3\r");
    body.extend_from_slice(b"4,nul\0inside,4\n");
    body.extend_from_slice(format!("5,{},5\n", "x".repeat(10 * 1024 * 1024)).as_bytes());
    body.extend_from_slice(b"6,thousands,\"1,234.5\"\n");
    body.extend_from_slice(b"7,exponent,6.02e23\n");
    body.extend_from_slice(b"8,last,8\n");
    let server = serve(body).await;

    let summary = ingester(
        &db,
        &SourceToml::csv("odd", &server.url("/odd.csv")).to_string(),
    )
    .run_source("odd")
    .await
    .unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(
        raw_ids(&db, "raw_csv_data", "odd").await,
        ["1", "2", "3", "5", "6", "7", "8"]
    );
    let rejects = rejects(&db, "odd").await;
    assert_eq!(rejects.len(), 1);
    assert!(rejects[0].3.contains("NUL"), "{:?}", rejects[0].3);
    assert_eq!(rejects[0].4, b"4,nul\0inside,4", "the exact bytes are kept");
    let long: i64 = db
        .client()
        .await
        .query_one(
            "SELECT length(data->>'name')::bigint FROM raw_csv_data WHERE source_id = '5'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(long, 10 * 1024 * 1024, "a 10 MB field lands whole");
}

#[tokio::test]
async fn ten_thousand_columns_land_as_one_object() {
    let db = TestDb::new().await;
    let mut header = String::from("id,name,value");
    let mut row = String::from("1,wide,1");
    for i in 0..10_000 {
        header.push_str(&format!(",c{i}"));
        row.push_str(&format!(",{i}"));
    }
    let server = serve(format!("{header}\n{row}\n").into_bytes()).await;

    let summary = ingester(
        &db,
        &SourceToml::csv("wide", &server.url("/wide.csv")).to_string(),
    )
    .run_source("wide")
    .await
    .unwrap();

    assert_eq!(summary.error, None);
    let keys: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM raw_csv_data, jsonb_object_keys(data)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 10_003);
}

#[tokio::test]
async fn an_item_too_deep_for_postgres_is_rejected_alone_with_postgres_s_reason() {
    let db = TestDb::new().await;
    // Far past Postgres's parser stack (max_stack_depth): refused with SQLSTATE 54001.
    let levels = 300_000;
    let abyss = format!(
        "{{\"id\": 2, \"n\": {}1{}, \"v\": 2}}",
        "[".repeat(levels),
        "]".repeat(levels)
    );
    let body = format!(
        "[{{\"id\": 1, \"n\": \"a\", \"v\": 1}}, {abyss}, {{\"id\": 3, \"n\": \"c\", \"v\": 3}}]"
    );
    let server = serve(body.into_bytes()).await;
    let toml = SourceToml::rest("abyss", &server.url("/abyss.json"))
        .mapping(REST_MAPPING)
        .to_string();

    let summary = ingester(&db, &toml).run_source("abyss").await.unwrap();

    assert_eq!(summary.error, None, "one record cannot fail the run");
    assert_eq!(raw_ids(&db, "raw_api_data", "abyss").await, ["1", "3"]);
    let rejects = rejects(&db, "abyss").await;
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert!(
        rejects[0].3.contains("Postgres refused the record")
            && rejects[0].3.contains("stack depth"),
        "{:?}",
        rejects[0].3
    );
    assert!(
        rejects[0].4 == abyss.as_bytes(),
        "the item's exact bytes are kept"
    );
}

#[tokio::test]
async fn ten_thousand_levels_of_nesting_land_without_overflowing_the_stack() {
    let db = TestDb::new().await;
    let deep = format!(
        "[{{\"id\": 1, \"n\": {}1{}}}]",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let server = serve(deep.into_bytes()).await;
    let toml = SourceToml::rest("deep", &server.url("/deep.json"))
        .mapping(REST_MAPPING)
        .to_string();

    let summary = ingester(&db, &toml).run_source("deep").await.unwrap();

    // Only the path to the id is parsed; the rest is kept as raw JSON for the normalizer, which
    // rejects `n` as an array.
    assert_eq!(summary.error, None);
    assert_eq!(raw_ids(&db, "raw_api_data", "deep").await, ["1"]);
}

#[tokio::test]
async fn duplicate_keys_and_wrong_types_land_raw_for_the_normalizer_to_judge() {
    let db = TestDb::new().await;
    let body = r#"[
        {"id": 1, "n": "first", "n": "second", "v": 1},
        {"id": 2, "n": ["not", "a", "string"], "v": {"not": "a number"}},
        {"id": 3.5, "n": true, "v": null},
        {"id": -4, "n": 12, "v": "1e3"}
    ]"#;
    let server = serve(body.as_bytes().to_vec()).await;
    let toml = SourceToml::rest("types", &server.url("/types.json"))
        .mapping(REST_MAPPING)
        .to_string();

    let summary = ingester(&db, &toml).run_source("types").await.unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(
        raw_ids(&db, "raw_api_data", "types").await,
        ["-4", "1", "2", "3.5"]
    );
    let name: String = db
        .client()
        .await
        .query_one(
            "SELECT data->>'n' FROM raw_api_data WHERE source_id = '1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        name, "second",
        "with duplicate keys, the last one wins (jsonb semantics)"
    );
}

#[tokio::test]
async fn a_record_postgres_cannot_store_is_rejected_alone_and_its_batch_lands() {
    let db = TestDb::new().await;
    // jsonb keeps numbers as `numeric`, which stops at 131,072 digits: 1e200000 is valid JSON
    // that Postgres refuses, so the batch fails and is landed record by record.
    let body = r#"[{"id": 1, "n": "a", "v": 1}, {"id": 2, "n": "b", "v": 1e200000}, {"id": 3, "n": "c", "v": 3}]"#;
    let server = serve(body.as_bytes().to_vec()).await;
    let toml = SourceToml::rest("huge", &server.url("/huge.json"))
        .mapping(REST_MAPPING)
        .to_string();

    let summary = ingester(&db, &toml).run_source("huge").await.unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(raw_ids(&db, "raw_api_data", "huge").await, ["1", "3"]);
    let rejects = rejects(&db, "huge").await;
    assert_eq!(rejects.len(), 1);
    assert!(
        rejects[0].3.starts_with("Postgres refused the record:"),
        "{}",
        rejects[0].3
    );
    assert_eq!(rejects[0].2, Some(1), "item 1 of the page");
    let run = run_row(&db, summary.run_id).await;
    assert_eq!((run.processed, run.inserted, run.rejected), (3, 2, 1));
}
