//! The query API through real HTTP against real Postgres: pagination math, literal search,
//! problem+json errors, health during an outage, CORS, metrics, and the committed spec.

use std::time::Duration;

use etl_query::{Application, Settings};
use etl_shared::config::Env;
use etl_tests::{wait_for, TcpProxy, TestDb};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

struct App {
    base: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl App {
    async fn start(database_url: &str, extra: &[(&str, &str)]) -> Self {
        let mut vars = vec![
            ("DATABASE_URL", database_url),
            ("QUERY_ADDR", "127.0.0.1:0"),
            ("QUERY_STATS_MAX_AGE_SECS", "0"),
        ];
        vars.extend_from_slice(extra);
        let settings = Settings::from_env(&Env::from_pairs(vars)).unwrap();
        let shutdown = CancellationToken::new();
        let app = Application::build(settings, shutdown.clone())
            .await
            .unwrap();
        let base = format!("http://{}", app.addr());
        tokio::spawn(app.run_until_stopped());
        Self {
            base,
            http: reqwest::Client::new(),
            shutdown,
        }
    }

    async fn get(&self, path_and_query: &str) -> (u16, String, Value) {
        let response = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.text().await.unwrap();
        (
            status,
            content_type,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `rows` of (source, name, description), inserted in order, with the counts the normalizer
/// would keep.
async fn seed(db: &TestDb, rows: &[(&str, &str, Option<&str>)]) {
    let client = db.client().await;
    for (i, (source, name, description)) in rows.iter().enumerate() {
        client
            .execute("SELECT etl_ensure_partition($1)", &[source])
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO normalized_data (source, source_id, name, value, description)
                 VALUES ($1, $2, $3, $4, $5)",
                &[source, &i.to_string(), name, &(i as f64), description],
            )
            .await
            .unwrap();
    }
    client
        .execute(
            "INSERT INTO etl_checkpoint (source, normalized_rows)
             SELECT source, count(*) FROM normalized_data GROUP BY source
             ON CONFLICT (source) DO UPDATE SET normalized_rows = EXCLUDED.normalized_rows",
            &[],
        )
        .await
        .unwrap();
}

fn ids(page: &Value) -> Vec<i64> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn pages_end_exactly_at_the_last_record_and_totals_follow_the_filters() {
    let db = TestDb::new().await;
    let mut rows = vec![("a", "alpha", None); 15];
    rows.extend(vec![("b", "beta", Some("second source")); 10]);
    seed(&db, &rows).await;
    let app = App::start(&db.url, &[]).await;

    let (status, _, first) = app.get("/data?page_size=10").await;
    assert_eq!(status, 200);
    assert_eq!(
        (first["total"].as_i64(), first["has_more"].as_bool()),
        (Some(25), Some(true))
    );
    assert_eq!(
        (first["page"].as_i64(), first["page_size"].as_i64()),
        (Some(1), Some(10))
    );
    let (_, _, last) = app.get("/data?page=3&page_size=10").await;
    assert_eq!(ids(&last).len(), 5);
    assert_eq!(last["has_more"], false);
    let (_, _, past) = app.get("/data?page=4&page_size=10").await;
    assert_eq!(
        (
            ids(&past).len(),
            past["has_more"].as_bool(),
            past["total"].as_i64()
        ),
        (0, Some(false), Some(25))
    );

    // An exactly full last page says there is no more.
    let (_, _, exact) = app.get("/data?source=b&page=2&page_size=5").await;
    assert_eq!(
        (
            ids(&exact).len(),
            exact["has_more"].as_bool(),
            exact["total"].as_i64()
        ),
        (5, Some(false), Some(10))
    );
    assert!(exact["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["source"] == "b"));

    // Pages are disjoint and in id order; every column is there.
    let mut all = Vec::new();
    for page in 1..=3 {
        all.extend(ids(&app
            .get(&format!("/data?page={page}&page_size=10"))
            .await
            .2));
    }
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((all.len(), sorted), (25, all.clone()));
    let record = &first["data"][0];
    for column in [
        "id",
        "source",
        "source_id",
        "name",
        "value",
        "created_at",
        "updated_at",
    ] {
        assert!(
            record.get(column).is_some(),
            "{column} missing from {record}"
        );
    }
    assert!(
        record.get("description").is_none(),
        "absent descriptions are omitted"
    );
    assert_eq!(exact["data"][0]["description"], "second source");

    let response = app
        .http
        .get(format!("{}/data?source=a", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-total-count"], "15");
}

#[tokio::test]
async fn a_walk_by_cursor_sees_every_record_once_while_others_are_inserted_updated_and_deleted() {
    let db = TestDb::new().await;
    let mut rows = vec![("a", "alpha", None); 20];
    rows.extend(vec![("b", "beta", Some("other")); 13]);
    seed(&db, &rows).await;
    let app = App::start(&db.url, &[]).await;
    let writer = db.client().await;
    let original: Vec<i64> = writer
        .query("SELECT id FROM normalized_data ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let (mut walked, mut pages) = (Vec::new(), Vec::new());
    let mut url = "/data?page_size=7".to_owned();
    loop {
        let (status, _, page) = app.get(&url).await;
        assert_eq!(status, 200, "{page}");
        pages.push(page["page"].as_i64().unwrap());
        let seen = ids(&page);
        // Between pages: a record already walked is deleted (with OFFSET, every later page
        // would shift by one and skip a record), one not yet walked is updated, one is added.
        writer
            .batch_execute(&format!(
                "DELETE FROM normalized_data WHERE id = {};
                 UPDATE normalized_data SET name = 'changed', updated_at = now()
                 WHERE id = (SELECT max(id) FROM normalized_data);
                 INSERT INTO normalized_data (source, source_id, name, value)
                 VALUES ('a', 'late-{}', 'late', 0);",
                seen[0],
                pages.len()
            ))
            .await
            .unwrap();
        walked.extend(seen);
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                assert_eq!(page["has_more"], true);
                url = format!("/data?page_size=7&cursor={cursor}");
            }
            None => {
                assert_eq!(page["has_more"], false);
                break;
            }
        }
    }
    let mut in_order = walked.clone();
    in_order.sort();
    in_order.dedup();
    assert_eq!(in_order, walked, "in id order, no record twice");
    assert!(
        original.iter().all(|id| walked.contains(id)),
        "every record present at the start was walked: {original:?} vs {walked:?}"
    );
    let numbered: Vec<i64> = (1..=pages.len() as i64).collect();
    assert_eq!(pages, numbered, "page counts the pages of the walk");

    // Filters go with the cursor; a cursor only follows a page of the same walk.
    let (_, _, first_b) = app.get("/data?source=b&page_size=5").await;
    let cursor = first_b["next_cursor"].as_str().unwrap();
    let (_, _, second_b) = app
        .get(&format!("/data?source=b&page_size=5&cursor={cursor}"))
        .await;
    assert!(second_b["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["source"] == "b"));
    assert!(ids(&second_b)[0] > *ids(&first_b).last().unwrap());

    for query in [
        "cursor=bm90IG1pbmU",
        "cursor=%25%25",
        "cursor=v1.0.5",
        "cursor=v1.2.05",
    ] {
        let (status, content_type, problem) = app.get(&format!("/data?{query}")).await;
        assert_eq!(
            (status, content_type.as_str(), problem["parameter"].as_str()),
            (400, "application/problem+json", Some("cursor")),
            "{query}: {problem}"
        );
    }
    // With a cursor, page is ignored.
    let (_, _, with_page) = app
        .get(&format!(
            "/data?source=b&page_size=5&page=3&cursor={cursor}"
        ))
        .await;
    assert_eq!(ids(&with_page), ids(&second_b));
}

#[tokio::test]
async fn search_is_a_case_insensitive_literal_substring_whatever_the_characters() {
    let db = TestDb::new().await;
    let names = [
        "100% cotton",
        "1000 cotton",
        "snake_case",
        "snakeXcase",
        "back\\slash",
        "O'Brien",
        "Naïve Café ✓",
        "Robert'); DROP TABLE students;--",
        "plain",
    ];
    let rows: Vec<(&str, &str, Option<&str>)> = names.iter().map(|n| ("s", *n, None)).collect();
    seed(&db, &rows).await;
    let app = App::start(&db.url, &[]).await;
    let found = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(found(&search(&app, "%").await), ["100% cotton"]);
    assert_eq!(found(&search(&app, "_").await), ["snake_case"]);
    assert_eq!(found(&search(&app, "\\").await), ["back\\slash"]);
    assert_eq!(
        found(&search(&app, "'").await),
        ["O'Brien", "Robert'); DROP TABLE students;--"]
    );
    assert_eq!(found(&search(&app, "CAFÉ").await), ["Naïve Café ✓"]);
    assert_eq!(found(&search(&app, "✓").await), ["Naïve Café ✓"]);
    for injection in [
        "' OR '1'='1",
        "1; SELECT pg_sleep(10)",
        "\") OR 1=1 --",
        "%' --",
    ] {
        let page = search(&app, injection).await;
        assert_eq!(page["total"], 0, "{injection}");
    }
    assert_eq!(
        found(&search(&app, "drop table").await),
        ["Robert'); DROP TABLE students;--"]
    );
    assert_eq!(search(&app, "cotton").await["total"], 2);
    let (_, _, all) = app.get("/data?page_size=100").await;
    assert_eq!(all["total"], names.len() as i64, "nothing was dropped");
}

async fn search(app: &App, term: &str) -> Value {
    let url = format!("/data?page_size=100&search={}", urlencode(term));
    let (status, _, page) = app.get(&url).await;
    assert_eq!(status, 200, "search {term:?}: {page}");
    page
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn one_record_by_its_source_and_source_id_and_a_404_problem_when_absent() {
    let db = TestDb::new().await;
    seed(
        &db,
        &[("shop", "cup", Some("porcelain")), ("shop", "mug", None)],
    )
    .await;
    let awkward = "a/b c?d#é%";
    db.client()
        .await
        .execute(
            "UPDATE normalized_data SET source_id = $1 WHERE name = 'mug'",
            &[&awkward],
        )
        .await
        .unwrap();
    let app = App::start(&db.url, &[]).await;
    let (_, _, listed) = app.get("/data?source=shop").await;

    let (status, content_type, cup) = app.get("/data/shop/0").await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "application/json"),
        "{cup}"
    );
    assert_eq!(cup, listed["data"][0]);
    let (status, _, mug) = app.get(&format!("/data/shop/{}", urlencode(awkward))).await;
    assert_eq!(status, 200, "{mug}");
    assert_eq!(
        (&mug["source_id"], &mug["name"]),
        (&Value::from(awkward), &Value::from("mug"))
    );
    assert_eq!(mug, listed["data"][1]);

    for absent in ["/data/shop/2", "/data/elsewhere/0", "/data/shop/a%2Fb"] {
        let (status, content_type, problem) = app.get(absent).await;
        assert_eq!(
            (status, content_type.as_str()),
            (404, "application/problem+json"),
            "{absent}: {problem}"
        );
        assert_eq!(problem["code"], "not_found", "{absent}");
    }
    let too_long = "x".repeat(1001);
    let (status, _, problem) = app.get(&format!("/data/shop/{too_long}")).await;
    assert_eq!(
        (status, &problem["parameter"]),
        (400, &Value::from("source_id")),
        "{problem}"
    );
}

/// Every record of `path` (a query ending in `&`), walked by cursor `page_size` at a time:
/// (source_id, value, updated_at) in the order served.
async fn walk(app: &App, path: &str, page_size: usize) -> Vec<(String, f64, String)> {
    let (mut seen, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let url = match &cursor {
            None => format!("{path}page_size={page_size}"),
            Some(c) => format!("{path}page_size={page_size}&cursor={c}"),
        };
        let (status, _, page) = app.get(&url).await;
        assert_eq!(status, 200, "{url}: {page}");
        for r in page["data"].as_array().unwrap() {
            seen.push((
                r["source_id"].as_str().unwrap().to_owned(),
                r["value"].as_f64().unwrap(),
                r["updated_at"].as_str().unwrap().to_owned(),
            ));
        }
        assert!(seen.len() <= 100, "the walk does not end: {url}");
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return seen,
        }
    }
}

fn source_ids(records: &[(String, f64, String)]) -> Vec<&str> {
    records.iter().map(|(id, _, _)| id.as_str()).collect()
}

#[tokio::test]
async fn filters_by_time_and_value_and_each_order_pages_by_number_and_by_cursor_alike() {
    let db = TestDb::new().await;
    let rows: Vec<(&str, &str, Option<&str>)> = (0..12).map(|_| ("s", "thing", None)).collect();
    seed(&db, &rows).await;
    // Values with ties and negatives; record i changed at 2026-01-(12 - i % 4), so times tie
    // too. Source ids are 0..11 in id order.
    db.client()
        .await
        .batch_execute(
            "UPDATE normalized_data SET
                 value = (ARRAY[5, -1.5, 5, 0, 12.25, -1.5, 7, 5, 0, 3, 12.25, 99])[source_id::int + 1],
                 updated_at = timestamptz '2026-01-12T00:00:00Z' - (source_id::int % 4) * interval '1 day'",
        )
        .await
        .unwrap();
    let app = App::start(&db.url, &[]).await;
    let all = walk(&app, "/data?", 5).await;
    let value_of = |id: &str| all.iter().find(|r| r.0 == id).unwrap().1;
    let by = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // Ranges are inclusive; counting them is exact below the cap.
    let (status, _, page) = app.get("/data?min_value=0&max_value=5&page_size=100").await;
    assert_eq!(status, 200, "{page}");
    let in_range: Vec<String> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(in_range, by(&["0", "2", "3", "7", "8", "9"]));
    assert_eq!(
        (&page["total"], &page["total_exact"]),
        (&Value::from(6), &Value::from(true))
    );
    let since = walk(&app, "/data?updated_since=2026-01-11T00:00:00%2B00:00&", 2).await;
    assert_eq!(source_ids(&since), ["0", "1", "4", "5", "8", "9"]);
    let (_, _, empty) = app.get("/data?min_value=6&max_value=5").await;
    assert_eq!(
        (&empty["total"], empty["data"].as_array().unwrap().len()),
        (&Value::from(0), 0)
    );

    // Each order, ties by id: by cursor (3 at a time) and in one page alike.
    let mut ascending: Vec<&str> = source_ids(&all);
    ascending.sort_by(|a, b| {
        value_of(a)
            .total_cmp(&value_of(b))
            .then(a.parse::<i32>().unwrap().cmp(&b.parse().unwrap()))
    });
    let mut descending = ascending.clone();
    descending.sort_by(|a, b| {
        value_of(b)
            .total_cmp(&value_of(a))
            .then(b.parse::<i32>().unwrap().cmp(&a.parse().unwrap()))
    });
    let newest: Vec<&str> = ["8", "4", "0", "9", "5", "1", "10", "6", "2", "11", "7", "3"].to_vec();
    for (sort, expected) in [
        ("value", &ascending),
        ("-value", &descending),
        ("-updated_at", &newest),
    ] {
        let walked = walk(&app, &format!("/data?sort={}&", urlencode(sort)), 3).await;
        assert_eq!(source_ids(&walked), *expected, "sort={sort} by cursor");
        let (_, _, page) = app
            .get(&format!("/data?sort={}&page_size=100", urlencode(sort)))
            .await;
        let paged: Vec<&str> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["source_id"].as_str().unwrap())
            .collect();
        assert_eq!(paged, *expected, "sort={sort} in one page");
        let (_, _, second) = app
            .get(&format!(
                "/data?sort={}&page_size=5&page=2",
                urlencode(sort)
            ))
            .await;
        let numbered: Vec<&str> = second["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["source_id"].as_str().unwrap())
            .collect();
        assert_eq!(numbered, expected[5..10], "sort={sort} page 2");
    }

    // Filters and orders together; a cursor keeps its order whatever `sort` says.
    let filtered = walk(
        &app,
        "/data?sort=-value&min_value=0&updated_since=2026-01-10T00:00:00Z&source=s&",
        2,
    )
    .await;
    let expected: Vec<&str> = descending
        .iter()
        .copied()
        .filter(|id| value_of(id) >= 0.0 && id.parse::<i32>().unwrap() % 4 != 3)
        .collect();
    assert_eq!(source_ids(&filtered), expected);
    let (_, _, first) = app.get("/data?sort=value&page_size=4").await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, _, next) = app
        .get(&format!("/data?sort=id&page_size=4&cursor={cursor}"))
        .await;
    let after: Vec<&str> = next["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source_id"].as_str().unwrap())
        .collect();
    assert_eq!(after, ascending[4..8]);
    assert_eq!(next["page"], 2);
}

#[tokio::test]
async fn runs_and_rejects_page_newest_first_with_filters_and_show_every_record_faithfully() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO etl_runs (service, source, status, ended_at, records_processed, error_message)
             SELECT CASE WHEN g % 2 = 0 THEN 'ingester' ELSE 'normalizer' END,
                    CASE WHEN g % 3 = 0 THEN 'a' ELSE 'b' END,
                    CASE WHEN g % 5 = 0 THEN 'failed' ELSE 'success' END, now(), g,
                    CASE WHEN g % 5 = 0 THEN 'HTTP 500 at page ' || g END
             FROM generate_series(1, 30) g;
             INSERT INTO etl_runs (service, source) VALUES ('ingester', 'a');
             INSERT INTO etl_rejects (run_id, stage, source, line, reason, raw)
             VALUES (1, 'ingest', 'a', 4, 'expected 3 fields, found 4', convert_to('2,b,é,extra', 'UTF8')),
                    (1, 'ingest', 'a', 5, 'not UTF-8', '\\x66ff6f00'),
                    (2, 'ingest', 'b', 6, 'too long', convert_to(repeat('é', 40000), 'UTF8'));
             INSERT INTO etl_rejects (run_id, stage, source, source_id, raw_id, reason, raw)
             VALUES (3, 'normalize', 'a', 'k<script>', 17, 'value: nothing at /price', convert_to('{\"id\": \"k<script>\"}', 'UTF8'));",
        )
        .await
        .unwrap();
    let app = App::start(&db.url, &[]).await;

    // Newest first, by number and by cursor alike; filters combine.
    let (status, _, first) = app.get("/runs?page_size=4").await;
    assert_eq!(status, 200, "{first}");
    let run_ids = |page: &Value| -> Vec<i64> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["run_id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(run_ids(&first), [31, 30, 29, 28]);
    assert_eq!(first["data"][0]["status"], "running");
    let (_, _, by_cursor) = app
        .get(&format!(
            "/runs?page_size=4&cursor={}",
            first["next_cursor"].as_str().unwrap()
        ))
        .await;
    let (_, _, by_number) = app.get("/runs?page_size=4&page=2").await;
    assert_eq!(
        (run_ids(&by_cursor), by_cursor["page"].clone()),
        (vec![27, 26, 25, 24], 2.into())
    );
    assert_eq!(run_ids(&by_cursor), run_ids(&by_number));
    let (_, _, failed) = app
        .get("/runs?source=a&service=normalizer&status=failed")
        .await;
    assert_eq!(run_ids(&failed), [15]);
    assert_eq!(failed["data"][0]["error_message"], "HTTP 500 at page 15");
    assert_eq!(
        (&failed["has_more"], failed.get("next_cursor")),
        (&false.into(), None)
    );
    let (status, _, problem) = app.get("/runs?status=exploded").await;
    assert_eq!(
        (status, &problem["parameter"]),
        (400, &Value::from("status")),
        "{problem}"
    );

    // Rejects: text when UTF-8, base64 otherwise, cut at 64 KiB without splitting a character.
    let (status, _, rejects) = app.get("/rejects?source=a").await;
    assert_eq!(status, 200, "{rejects}");
    let a = rejects["data"].as_array().unwrap();
    assert_eq!(a.len(), 3, "{rejects}");
    assert_eq!(
        (
            &a[0]["stage"],
            &a[0]["source_id"],
            &a[0]["position"]["raw_id"]
        ),
        (&"normalize".into(), &"k<script>".into(), &17.into())
    );
    assert_eq!(a[0]["raw"], "{\"id\": \"k<script>\"}");
    assert_eq!(
        (&a[1]["raw"], &a[1]["raw_encoding"], &a[1]["raw_bytes"]),
        (&"Zv9vAA==".into(), &"base64".into(), &4.into())
    );
    assert_eq!(
        (&a[2]["raw"], &a[2]["raw_encoding"]),
        (&"2,b,é,extra".into(), &"utf8".into())
    );
    assert_eq!(
        (&a[2]["position"]["line"], &a[2]["run_id"], &a[2]["reason"]),
        (&4.into(), &1.into(), &"expected 3 fields, found 4".into())
    );
    assert_eq!(a[2]["raw_truncated"], false);
    let (_, _, long) = app.get("/rejects?source=b&stage=ingest").await;
    let long = &long["data"][0];
    assert_eq!(
        (&long["raw_bytes"], &long["raw_truncated"]),
        (&80_000.into(), &true.into())
    );
    assert_eq!(
        long["raw"].as_str().unwrap(),
        "é".repeat(32_768),
        "whole characters up to 64 KiB"
    );
    let (_, _, normalize) = app.get("/rejects?stage=normalize").await;
    assert_eq!(normalize["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn exports_hold_what_pages_hold_as_ndjson_and_as_quoted_csv() {
    let db = TestDb::new().await;
    seed(
        &db,
        &[
            ("s", "plain", None),
            ("s", "comma, \"quoted\"", Some("two\nlines, and \r\n too")),
            ("s", "<script>alert(1)</script>", Some("é ✓ \\ \u{1}")),
            ("t", "other source", Some("")),
            ("s", "last", Some("\"")),
        ],
    )
    .await;
    let app = App::start(&db.url, &[]).await;
    let (_, _, page) = app.get("/data?source=s&page_size=100&sort=-value").await;
    let records = page["data"].as_array().unwrap();
    assert_eq!(records.len(), 4);

    let export = |query: &'static str| {
        let http = app.http.clone();
        let url = format!("{}/data/export?{query}", app.base);
        async move {
            let response = http.get(url).send().await.unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            (status, headers, response.text().await.unwrap())
        }
    };
    let (status, headers, ndjson) = export("source=s&sort=-value").await;
    assert_eq!(status, 200, "{ndjson}");
    assert_eq!(headers["content-type"], "application/x-ndjson");
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename=\"records.ndjson\""
    );
    let lines: Vec<Value> = ndjson
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(&lines, records, "the export is the pages' records");

    let (status, headers, csv) = export("format=csv&source=s&sort=-value").await;
    assert_eq!(
        (status, &headers["content-type"]),
        (
            200,
            &"text/csv".parse::<reqwest::header::HeaderValue>().unwrap()
        )
    );
    let mut reader = csv_async::AsyncReaderBuilder::new().create_reader(csv.as_bytes());
    let header = reader.headers().await.unwrap().clone();
    assert_eq!(
        header.iter().collect::<Vec<_>>(),
        [
            "id",
            "source",
            "source_id",
            "name",
            "value",
            "description",
            "created_at",
            "updated_at"
        ]
    );
    let rows: Vec<csv_async::StringRecord> =
        futures_util::StreamExt::collect::<Vec<_>>(reader.records())
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    assert_eq!(rows.len(), records.len(), "{csv}");
    for (row, record) in rows.iter().zip(records) {
        for (i, column) in header.iter().enumerate() {
            let expected = match &record[column] {
                Value::String(text) => text.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            let got = row.get(i).unwrap();
            if column == "value" {
                assert_eq!(
                    got.parse::<f64>().unwrap(),
                    record["value"].as_f64().unwrap()
                );
            } else {
                assert_eq!(got, expected, "{column} of {record}");
            }
        }
    }
    // Filters apply as on pages; nothing matches, nothing but the header is sent.
    let (_, _, none) = export("format=csv&min_value=100").await;
    assert_eq!(
        none,
        "id,source,source_id,name,value,description,created_at,updated_at\n"
    );
    let (status, _, problem) = export("format=xml").await;
    assert_eq!(status, 400, "{problem}");
}

#[tokio::test]
async fn two_exports_run_at_once_a_third_is_told_when_to_retry_and_a_dropped_one_frees_its_place() {
    let db = TestDb::new().await;
    // Some 24 MB of records: more than loopback buffers hold, so an export its client does
    // not read stays running.
    db.seed_large_records("big", 20000).await;
    let app = App::start(&db.url, &[]).await;
    let url = format!("{}/data/export", app.base);
    let first = app.http.get(&url).send().await.unwrap();
    let second = app.http.get(&url).send().await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = app.http.get(&url).send().await.unwrap();
    assert_eq!(third.status(), 503);
    assert_eq!(third.headers()["retry-after"], "5");
    assert_eq!(third.headers()["content-type"], "application/problem+json");
    // Pages go on beside the exports.
    let (status, _, _) = app.get("/data?page_size=1").await;
    assert_eq!(status, 200);

    drop(first);
    let lines = wait_for(
        "a dropped export to free its place",
        Duration::from_secs(20),
        || async {
            let response = app.http.get(&url).send().await.ok()?;
            (response.status() == 200).then_some(response)
        },
    )
    .await
    .text()
    .await
    .unwrap()
    .lines()
    .count();
    assert_eq!(lines, 20_000, "an export in full");
    drop(second);
}

/// `GET path` with `headers`: status, response headers, body bytes as sent (not decoded).
async fn raw_get(
    app: &App,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let http = reqwest::Client::builder().no_gzip().build().unwrap();
    let mut request = http.get(format!("{}{path}", app.base));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    (status, headers, response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn pages_and_records_revalidate_by_etag_until_the_normalizer_or_a_swap_changes_the_data() {
    let db = TestDb::new().await;
    seed(&db, &[("s", "first", None), ("s", "second", None)]).await;
    let app = App::start(&db.url, &[]).await;
    let etag = |headers: &reqwest::header::HeaderMap| headers["etag"].to_str().unwrap().to_owned();

    let (status, headers, _) = raw_get(&app, "/data?source=s", &[]).await;
    assert_eq!(
        (status, &headers["cache-control"]),
        (
            200,
            &"no-cache".parse::<reqwest::header::HeaderValue>().unwrap()
        )
    );
    let tag = etag(&headers);
    assert!(tag.starts_with("W/\"d"), "{tag}");
    let (status, headers, body) = raw_get(&app, "/data?source=s", &[("if-none-match", &tag)]).await;
    assert_eq!((status, body.len(), etag(&headers)), (304, 0, tag.clone()));
    let (status, _, _) = raw_get(&app, "/data/s/0", &[("if-none-match", &tag)]).await;
    assert_eq!(status, 304, "a record shares the data's version");
    let (status, _, _) =
        raw_get(&app, "/data?source=s", &[("if-none-match", "W/\"dother\"")]).await;
    assert_eq!(status, 200);

    // What the normalizer does in one transaction: a row and its source's checkpoint.
    db.client()
        .await
        .batch_execute(
            "UPDATE normalized_data SET name = 'changed', updated_at = now() WHERE source_id = '0';
             UPDATE etl_checkpoint SET last_processed_id = last_processed_id + 1,
                 total_processed = total_processed + 1, updated_at = now() WHERE source = 's';",
        )
        .await
        .unwrap();
    let (status, headers, body) = raw_get(&app, "/data?source=s", &[("if-none-match", &tag)]).await;
    assert_eq!(status, 200, "a changed page is sent again");
    assert!(String::from_utf8(body).unwrap().contains("changed"));
    let changed = etag(&headers);
    assert_ne!(changed, tag);

    // A bulk build or a replay swaps the served partition: a new version, checkpoint or not.
    db.client()
        .await
        .batch_execute(
            "SELECT etl_begin_build('s');
             INSERT INTO normalized_build (id, source, source_id, name, value)
                 SELECT id, source, source_id, 'rebuilt', value FROM normalized_data WHERE source = 's';
             SELECT etl_swap_build('s');",
        )
        .await
        .unwrap();
    let (status, headers, body) = raw_get(&app, "/data/s/1", &[("if-none-match", &changed)]).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8(body).unwrap().contains("rebuilt"));
    assert_ne!(etag(&headers), changed);
}

#[tokio::test]
async fn stats_say_how_long_they_stay_fresh_and_revalidate_to_304_meanwhile() {
    let db = TestDb::new().await;
    seed(&db, &[("s", "x", None)]).await;
    let app = App::start(&db.url, &[("QUERY_STATS_MAX_AGE_SECS", "60")]).await;
    let (status, headers, _) = raw_get(&app, "/stats", &[]).await;
    assert_eq!(status, 200);
    let max_age: u64 = headers["cache-control"]
        .to_str()
        .unwrap()
        .strip_prefix("max-age=")
        .unwrap()
        .parse()
        .unwrap();
    assert!((55..=60).contains(&max_age), "{max_age}");
    let tag = headers["etag"].to_str().unwrap().to_owned();
    let (status, headers, body) = raw_get(&app, "/stats", &[("if-none-match", &tag)]).await;
    assert_eq!((status, body.len()), (304, 0));
    assert_eq!(headers["etag"], tag.as_str());
    let (status, headers, _) = raw_get(&app, "/health", &[]).await;
    assert_eq!(
        (status, &headers["cache-control"]),
        (
            200,
            &"no-store".parse::<reqwest::header::HeaderValue>().unwrap()
        )
    );
}

#[tokio::test]
async fn answers_come_compressed_with_brotli_or_gzip_when_asked_and_plain_otherwise() {
    use tokio::io::AsyncReadExt;
    let db = TestDb::new().await;
    let rows: Vec<(&str, &str, Option<&str>)> = (0..50)
        .map(|_| {
            (
                "s",
                "a name that repeats",
                Some("and a description that repeats"),
            )
        })
        .collect();
    seed(&db, &rows).await;
    let app = App::start(&db.url, &[]).await;
    let (_, plain_headers, plain) = raw_get(&app, "/data?page_size=50", &[]).await;
    assert!(plain_headers.get("content-encoding").is_none());
    assert_eq!(plain_headers["vary"], "accept-encoding");
    let (_, _, plain_export) = raw_get(&app, "/data/export", &[]).await;

    for (asked, coding) in [
        ("gzip", "gzip"),
        ("gzip, deflate, br", "br"),
        ("br;q=0.2, gzip", "gzip"),
    ] {
        for (path, expected) in [
            ("/data?page_size=50", &plain),
            ("/data/export", &plain_export),
        ] {
            let (status, headers, body) = raw_get(&app, path, &[("accept-encoding", asked)]).await;
            assert_eq!(status, 200);
            assert_eq!(headers["content-encoding"], coding, "{asked} {path}");
            assert!(
                body.len() < expected.len() / 3,
                "{path}: {} of {} bytes",
                body.len(),
                expected.len()
            );
            let mut decoded = Vec::new();
            match coding {
                "gzip" => async_compression::tokio::bufread::GzipDecoder::new(&body[..])
                    .read_to_end(&mut decoded)
                    .await
                    .unwrap(),
                _ => async_compression::tokio::bufread::BrotliDecoder::new(&body[..])
                    .read_to_end(&mut decoded)
                    .await
                    .unwrap(),
            };
            let (decoded, expected): (Value, Value) = if path.contains("export") {
                (
                    Value::from(String::from_utf8(decoded).unwrap()),
                    Value::from(String::from_utf8(expected.clone()).unwrap()),
                )
            } else {
                (
                    serde_json::from_slice(&decoded).unwrap(),
                    serde_json::from_slice(expected).unwrap(),
                )
            };
            assert_eq!(decoded, expected, "{asked} {path}");
        }
    }
    // Nothing to compress in a 304.
    let (_, headers, _) = raw_get(&app, "/data", &[]).await;
    let tag = headers["etag"].to_str().unwrap().to_owned();
    let (status, headers, body) = raw_get(
        &app,
        "/data",
        &[("if-none-match", &tag), ("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!((status, body.len()), (304, 0));
    assert!(headers.get("content-encoding").is_none());
}

/// A keys file for clients `names`, from `etl-query api-key`: the keys, and the file.
fn api_keys(names: &[&str]) -> (Vec<String>, tempfile::NamedTempFile) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let mut keys = Vec::new();
    for name in names {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_etl-query"))
            .args(["api-key", name])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        keys.push(String::from_utf8(output.stdout).unwrap().trim().to_owned());
        let stderr = String::from_utf8(output.stderr).unwrap();
        let entry = &stderr[stderr.find("[[keys]]").unwrap()..];
        std::io::Write::write_all(&mut file, format!("{entry}\n").as_bytes()).unwrap();
    }
    (keys, file)
}

#[tokio::test]
async fn with_keys_configured_only_probes_spec_and_metrics_answer_without_one() {
    let db = TestDb::new().await;
    seed(&db, &[("s", "x", None)]).await;
    let (keys, file) = api_keys(&["dashboard", "etl-cli"]);
    let app = App::start(
        &db.url,
        &[("QUERY_API_KEYS_FILE", file.path().to_str().unwrap())],
    )
    .await;
    let bearer = |key: &str| format!("Bearer {key}");

    for path in [
        "/data",
        "/data/s/0",
        "/data/export",
        "/stats",
        "/runs",
        "/rejects",
    ] {
        let (status, headers, body) = raw_get(&app, path, &[]).await;
        let problem: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, &problem["code"]),
            (401, &Value::from("unauthorized")),
            "{path}"
        );
        assert_eq!(headers["www-authenticate"], "Bearer realm=\"etl-query\"");
        assert_eq!(headers["content-type"], "application/problem+json");
        let (status, headers, _) =
            raw_get(&app, path, &[("authorization", "Bearer etlq_not-a-key")]).await;
        assert_eq!(status, 401, "{path}");
        assert!(headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
        for key in &keys {
            let (status, _, _) = raw_get(&app, path, &[("authorization", &bearer(key))]).await;
            assert_eq!(status, 200, "{path} with a key");
        }
    }
    let (status, _, _) = raw_get(&app, "/data", &[("authorization", &keys[0])]).await;
    assert_eq!(status, 401, "a key without its scheme is not one");
    for open in [
        "/health",
        "/health/live",
        "/health/ready",
        "/openapi.json",
        "/openapi.yaml",
        "/docs",
        "/metrics",
        "/console",
    ] {
        let (status, _, _) = raw_get(&app, open, &[]).await;
        assert_eq!(status, 200, "{open} answers without a key");
    }
    let (_, _, page) = raw_get(&app, "/console", &[]).await;
    assert!(
        String::from_utf8_lossy(&page).contains(r#"<meta name="etl-api-keys" content="required">"#),
        "the console's page says a key is needed, so it asks before its first request"
    );
    // The keys file holds digests, not keys.
    let text = std::fs::read_to_string(file.path()).unwrap();
    assert!(
        keys.iter().all(|key| !text.contains(key.as_str())),
        "{text}"
    );
}

#[tokio::test]
async fn each_key_gets_its_rate_and_a_429_with_retry_after_beyond_it() {
    let db = TestDb::new().await;
    let (keys, file) = api_keys(&["busy", "calm"]);
    let app = App::start(
        &db.url,
        &[
            ("QUERY_API_KEYS_FILE", file.path().to_str().unwrap()),
            ("QUERY_RATE_LIMIT_PER_SECOND", "5"),
        ],
    )
    .await;
    let busy = format!("Bearer {}", keys[0]);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..30 {
        let (status, headers, body) =
            raw_get(&app, "/data?page_size=1", &[("authorization", &busy)]).await;
        if status == 429 {
            let problem: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(problem["code"], "rate_limited");
            retry_after = Some(
                headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        }
        statuses.push(status);
    }
    let served = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        statuses.contains(&429),
        "30 quick requests at 5 per second: {statuses:?}"
    );
    assert!(served >= 5, "a second's worth at once: {statuses:?}");
    assert_eq!(retry_after, Some(1));
    let calm = format!("Bearer {}", keys[1]);
    let (status, _, _) = raw_get(&app, "/data?page_size=1", &[("authorization", &calm)]).await;
    assert_eq!(status, 200, "another key has its own rate");
    let (status, _, _) = raw_get(&app, "/health", &[]).await;
    assert_eq!(status, 200, "probes are not limited");
}

#[tokio::test]
async fn a_rate_limit_without_keys_or_a_malformed_keys_file_stops_the_service_at_start() {
    let db = TestDb::new().await;
    let settings = |pairs: Vec<(&str, &str)>| {
        let mut all = vec![("DATABASE_URL", db.url.as_str())];
        all.extend(pairs);
        Settings::from_env(&Env::from_pairs(all))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let error = settings(vec![("QUERY_RATE_LIMIT_PER_SECOND", "5")]);
    assert!(
        error.contains("QUERY_RATE_LIMIT_PER_SECOND") && error.contains("QUERY_API_KEYS_FILE"),
        "{error}"
    );
    let error = settings(vec![("QUERY_API_KEYS_FILE", "/nonexistent/keys.toml")]);
    assert!(
        error.contains("QUERY_API_KEYS_FILE") && error.contains("/nonexistent/keys.toml"),
        "{error}"
    );
    let mut bad = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut bad,
        b"[[keys]]\nname = \"x\"\nsha256 = \"plain-key\"\n",
    )
    .unwrap();
    let error = settings(vec![("QUERY_API_KEYS_FILE", bad.path().to_str().unwrap())]);
    assert!(error.contains("not 64 hex digits"), "{error}");
}

#[tokio::test]
async fn bad_parameters_unknown_routes_and_wrong_methods_get_problem_json() {
    let db = TestDb::new().await;
    let app = App::start(&db.url, &[]).await;

    for (query, parameter) in [
        ("page=0", "page"),
        ("page_size=101", "page_size"),
        ("page_size=abc", "page_size"),
        ("page=-1", "page"),
        ("source=", "source"),
        // Found by schemathesis: Postgres refuses NUL in text, which once came back as a 503.
        ("source=a%00b", "source"),
        ("search=%00", "search"),
    ] {
        let (status, content_type, body) = app.get(&format!("/data?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(content_type, "application/problem+json", "{query}");
        assert_eq!(body["code"], "invalid_parameter", "{query}");
        assert_eq!(body["parameter"], parameter, "{query}");
        assert_eq!(body["status"], 400);
        assert!(
            body["detail"].as_str().unwrap().contains(parameter),
            "{body}"
        );
    }

    let (status, content_type, body) = app.get("/nowhere").await;
    assert_eq!(
        (status, content_type.as_str()),
        (404, "application/problem+json")
    );
    assert_eq!(body["code"], "not_found");

    let response = app
        .http
        .post(format!("{}/data", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(response.headers()["allow"], "GET, HEAD");
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["code"], "method_not_allowed");

    // What the Allow header promises holds: HEAD answers like GET, without a body.
    let head = app
        .http
        .head(format!("{}/data", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert!(head.text().await.unwrap().is_empty());
}

#[tokio::test]
async fn health_is_503_while_the_database_is_unreachable_and_200_when_it_is_back() {
    let db = TestDb::new().await;
    let proxy = TcpProxy::to_database(&db.url).await;
    let app = App::start(
        &proxy.url_for(&db.url),
        &[("DATABASE_CONNECT_TIMEOUT_SECS", "1")],
    )
    .await;
    let (status, _, body) = app.get("/health").await;
    assert_eq!((status, body["database"].as_str()), (200, Some("up")));

    proxy.cut();
    let (status, _, body) = app.get("/health").await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        serde_json::json!({ "status": "unavailable", "database": "down" })
    );
    let (status, content_type, problem) = app.get("/data").await;
    assert_eq!(
        (status, content_type.as_str()),
        (503, "application/problem+json")
    );
    assert_eq!(problem["code"], "unavailable");
    assert_eq!(
        app.get("/health/live").await.0,
        200,
        "liveness does not depend on the database"
    );

    proxy.restore();
    wait_for("health to recover", Duration::from_secs(20), || async {
        (app.get("/health").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(app.get("/data").await.0, 200);
}

#[tokio::test]
async fn stats_report_counts_ranges_checkpoints_and_latest_runs_per_source() {
    let db = TestDb::new().await;
    seed(&db, &[("a", "x", None), ("a", "y", None), ("b", "z", None)]).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO raw_csv_data (source, source_id, data) VALUES ('a', '0', '{}'), ('a', '1', '{}'), ('a', '9', '{}');
             UPDATE etl_checkpoint SET last_processed_id = (SELECT min(change_id) FROM raw_csv_data), total_processed = 1
                 WHERE source = 'a';
             INSERT INTO etl_rejects (stage, source, source_id, reason, raw) VALUES ('normalize', 'a', '9', 'name: nothing at name', '\\x7b7d');
             INSERT INTO etl_rejects (stage, source, line, reason, raw) VALUES ('ingest', 'a', 4, 'expected 3 fields', '\\x78');
             INSERT INTO etl_runs (service, source, status, started_at, ended_at, duration_seconds, records_processed, error_message)
                 VALUES ('ingester', 'a', 'failed', now() - interval '1 hour', now() - interval '1 hour', 1.5, 3, 'old failure'),
                        ('ingester', 'a', 'success', now(), now(), 0.5, 4, NULL);",
        )
        .await
        .unwrap();
    let app = App::start(&db.url, &[]).await;

    let (status, _, stats) = app.get("/stats").await;

    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["total_records"], 3);
    let a = &stats["sources"][0];
    assert_eq!(a["source"], "a");
    assert_eq!(
        (a["records"].as_i64(), a["raw_records"].as_i64()),
        (Some(2), Some(3))
    );
    assert_eq!(
        (
            a["rejected_at_ingest"].as_i64(),
            a["rejected_at_normalize"].as_i64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(
        (
            a["value_min"].as_f64(),
            a["value_max"].as_f64(),
            a["value_avg"].as_f64()
        ),
        (Some(0.0), Some(1.0), Some(0.5))
    );
    assert_eq!(a["checkpoint"]["lag"], 2);
    assert_eq!(
        a["last_ingest"]["status"], "success",
        "the latest run, not the first"
    );
    assert_eq!(a["last_ingest"]["records_processed"], 4);
    assert!(a.get("last_normalize").is_none());
    assert_eq!(stats["sources"][1]["source"], "b");
}

#[tokio::test]
async fn cors_answers_listed_origins_only_and_nothing_when_unconfigured() {
    let db = TestDb::new().await;
    let open = App::start(
        &db.url,
        &[("QUERY_CORS_ORIGINS", "https://app.example.test")],
    )
    .await;
    let closed = App::start(&db.url, &[]).await;
    let ask = |app: &App, origin: &str| {
        app.http
            .get(format!("{}/data", app.base))
            .header("origin", origin)
            .send()
    };

    let allowed = ask(&open, "https://app.example.test").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.test"
    );
    let exposed = allowed.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("x-total-count"), "{exposed}");
    let other = ask(&open, "https://evil.example.test").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let unconfigured = ask(&closed, "https://app.example.test").await.unwrap();
    assert!(unconfigured
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_with_every_label_bounded() {
    let db = TestDb::new().await;
    seed(&db, &[("s", "x", None)]).await;
    let app = App::start(&db.url, &[]).await;
    app.get("/data").await;
    app.get("/data?page=0").await;
    app.get("/data?page=0").await;
    app.get("/data/s/0").await;
    app.get("/data/s/nothing").await;
    app.get("/runs").await;
    app.get("/no/such/thing").await;
    app.get("/data/a/b/c").await;
    // A scanner's made-up methods and paths: one series, not one per guess.
    for guess in ["PROPFIND", "BREW", "X-SCAN-1", "X-SCAN-2"] {
        let method = reqwest::Method::from_bytes(guess.as_bytes()).unwrap();
        app.http
            .request(method, format!("{}/guess-{guess}", app.base))
            .send()
            .await
            .unwrap();
    }

    let (_, _, metrics) = app.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();

    for line in [
        r#"etl_http_requests_total{route="/data",method="GET",status="200"} 1"#,
        r#"etl_http_requests_total{route="/data",method="GET",status="400"} 2"#,
        r#"etl_http_requests_total{route="/data/{source}/{source_id}",method="GET",status="200"} 1"#,
        r#"etl_http_requests_total{route="/data/{source}/{source_id}",method="GET",status="404"} 1"#,
        r#"etl_http_requests_total{route="/runs",method="GET",status="200"} 1"#,
        r#"etl_http_requests_total{route="other",method="GET",status="404"} 2"#,
        r#"etl_http_requests_total{route="other",method="other",status="404"} 4"#,
        r#"etl_http_request_duration_seconds_count{route="/data"} 3"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    assert!(
        !metrics.contains("PROPFIND") && !metrics.contains("guess"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_served_spec_is_the_committed_one_and_swagger_ui_is_served() {
    let db = TestDb::new().await;
    let app = App::start(&db.url, &[]).await;
    let committed: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();

    let (_, _, served) = app.get("/openapi.json").await;

    assert!(
        served == committed,
        "the API changed: run `cargo run -p etl-query -- spec > services/query/openapi.json` and review the diff"
    );
    let yaml = app
        .http
        .get(format!("{}/openapi.yaml", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(yaml.status(), 200);
    assert!(yaml.text().await.unwrap().contains("operationId: listData"));
    let docs = app
        .http
        .get(format!("{}/docs", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(
        html.contains("swagger") && !html.contains("unpkg.com") && !html.contains("cdn"),
        "assets must be bundled"
    );
    for operation in [
        "listData",
        "getStats",
        "getHealth",
        "getReadiness",
        "getLiveness",
    ] {
        assert!(
            served
                .to_string()
                .contains(&format!("\"operationId\":\"{operation}\"")),
            "{operation}"
        );
    }
}

/// The console's page, script and style come from the binary, each with a policy that lets
/// the page run its own script only and reach this service only; its script puts what the
/// API says in as text, never as markup.
#[tokio::test]
async fn the_console_is_served_from_the_binary_under_a_strict_content_security_policy() {
    let db = TestDb::new().await;
    let app = App::start(&db.url, &[]).await;
    let mut bodies = Vec::new();
    for (path, content_type) in [
        ("/console", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
        ("/console/favicon.svg", "image/svg+xml"),
    ] {
        let (status, headers, body) = raw_get(&app, path, &[]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(headers["content-type"], content_type, "{path}");
        let policy = headers["content-security-policy"].to_str().unwrap();
        assert!(
            policy.contains("default-src 'none'") && policy.contains("script-src 'self'"),
            "{path}: {policy}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff");
        bodies.push(String::from_utf8(body.to_vec()).unwrap());
    }
    let (page, script) = (&bodies[0], &bodies[1]);
    assert!(page.contains(r#"<script src="/console/console.js" defer></script>"#));
    assert!(page.contains(r#"href="/console/console.css""#));
    assert!(page.contains(r#"href="/console/favicon.svg""#));
    assert!(
        page.contains(r#"<meta name="etl-api-keys" content="optional">"#),
        "without a keys file the page reads without asking for a key"
    );
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "no inline script or style, which the policy would block"
    );
    for unsafe_sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(
            !script.contains(unsafe_sink),
            "the script uses {unsafe_sink}"
        );
    }
}
