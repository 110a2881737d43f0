//! Connection poolers: the query service works through PgBouncer in transaction mode (its
//! read-only and timeout settings travel per transaction, `DATABASE_URL`'s own `options` stay),
//! while the ingester and normalizer, which keep session state, refuse transaction pooling at
//! start with the reason and run behind a pooler in session mode.

use std::time::Duration;

use etl_query::reader::{pool, Reader, Sessions, Snapshot, Statement};
use etl_shared::db::{check_at_start, Found, Needs};
use etl_shared::DatabaseSettings;
use etl_tests::{free_local_addr, wait_for, PgBouncer, ServiceProcess, SourcesFile, TestDb};

const DEADLINE: Duration = Duration::from_secs(30);

async fn seed(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "SELECT etl_ensure_partition('even'), etl_ensure_partition('odd');
             INSERT INTO normalized_data (source, source_id, name, value)
                 SELECT CASE WHEN i % 2 = 0 THEN 'even' ELSE 'odd' END, i::text, 'item ' || i, i
                 FROM generate_series(1, 100) i;
             INSERT INTO etl_checkpoint (source, normalized_rows)
                 SELECT source, count(*) FROM normalized_data GROUP BY source;",
        )
        .await
        .unwrap();
}

async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or_default())
}

fn start_query(database_url: String) -> (ServiceProcess, String) {
    let addr = free_local_addr();
    let service = ServiceProcess::start(
        "etl-query",
        &[
            ("DATABASE_URL", database_url),
            ("QUERY_ADDR", addr.to_string()),
            ("QUERY_STATS_MAX_AGE_SECS", "0".into()),
            ("QUERY_STATEMENT_TIMEOUT_MS", "300".into()),
        ],
    );
    (service, format!("http://{addr}"))
}

async fn wait_until_healthy(api: &str) {
    wait_for("the query API to answer", DEADLINE, || async {
        let response = reqwest::get(format!("{api}/health")).await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
}

/// A page blocked behind a lock is cut at the service's 300 ms statement timeout and answered
/// as a timeout, and the next request is served normally.
async fn assert_statement_timeout_applies(db: &TestDb, api: &str) {
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE normalized_data IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let (status, body) = get_json(&format!("{api}/data")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("timeout")),
        "{body}"
    );
    lock.rollback().await.unwrap();
    let (status, body) = get_json(&format!("{api}/data")).await;
    assert_eq!(
        (status, &body["total"]),
        (200, &serde_json::json!(100)),
        "{body}"
    );
}

/// A reader for `url` as the query service makes one: a write is refused, the statement
/// timeout is the configured one.
async fn assert_reads_are_read_only_with_the_timeout(url: &str, expected: Found) {
    let settings = DatabaseSettings::from_url(url).unwrap();
    let found = check_at_start(&settings, Needs::Transactions)
        .await
        .unwrap();
    assert_eq!(
        std::mem::discriminant(&found),
        std::mem::discriminant(&expected),
        "{found:?}"
    );
    let sessions = Sessions::from_found(&found);
    let timeout = Duration::from_secs(5);
    let reader = Reader::new(
        pool(&settings, sessions, timeout).unwrap(),
        timeout,
        sessions,
    );

    let write = reader
        .read(
            Snapshot::PerStatement,
            &[Statement::new(
                "INSERT INTO etl_checkpoint (source) VALUES ('x')",
                vec![],
            )],
        )
        .await
        .expect_err("a write inside a read");
    let error = etl_shared::error_chain(&write);
    assert!(error.contains("read-only transaction"), "{error}");
    let timeout: String = reader
        .read(
            Snapshot::PerStatement,
            &[Statement::new("SHOW statement_timeout", vec![])],
        )
        .await
        .unwrap()[0][0]
        .get(0);
    assert_eq!(timeout, "5s");
}

#[tokio::test]
async fn the_query_api_answers_through_pgbouncer_in_transaction_mode() {
    let db = TestDb::new().await;
    seed(&db).await;
    let bouncer = PgBouncer::start(&db.url, "transaction").await;
    let (mut query, api) = start_query(bouncer.url_for(&db.url));
    wait_until_healthy(&api).await;

    // Many requests at once over PgBouncer's three server connections: each request's
    // transaction may land on any of them.
    let requests = (0..60).map(|i| {
        let url = match i % 4 {
            0 => format!("{api}/data?page_size=10&page={}", i % 10 + 1),
            1 => format!("{api}/data?source=even&page_size=5"),
            2 => format!("{api}/data?search=item%201"),
            _ => format!("{api}/stats"),
        };
        async move { (url.clone(), get_json(&url).await) }
    });
    for (url, (status, body)) in futures_util::future::join_all(requests).await {
        assert_eq!(status, 200, "{url}: {body}\n{}", bouncer.log());
        if url.contains("source=even") {
            assert_eq!(body["total"], 50, "{url}");
        } else if url.contains("/data?page_size=10") {
            assert_eq!(body["total"], 100, "{url}");
            assert_eq!(body["data"].as_array().unwrap().len(), 10, "{url}");
        } else if url.ends_with("/stats") {
            let records: i64 = body["sources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["records"].as_i64().unwrap())
                .sum();
            assert_eq!(records, 100, "{url}");
        }
    }

    // The statement timeout applies through the pooler.
    assert_statement_timeout_applies(&db, &api).await;

    assert_eq!(query.stop().await, Some(0), "{}", query.log_tail());
}

#[tokio::test]
async fn reads_are_read_only_with_the_timeout_through_pgbouncer_and_on_own_sessions() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::start(&db.url, "transaction").await;
    assert_reads_are_read_only_with_the_timeout(
        &bouncer.url_for(&db.url),
        Found::TransactionPooler(String::new()),
    )
    .await;
    assert_reads_are_read_only_with_the_timeout(&db.url, Found::OwnSessions).await;
}

#[tokio::test]
async fn the_statement_timeout_applies_on_a_direct_connection_too() {
    let db = TestDb::new().await;
    seed(&db).await;
    let (mut query, api) = start_query(db.url.clone());
    wait_until_healthy(&api).await;

    assert_statement_timeout_applies(&db, &api).await;

    assert_eq!(query.stop().await, Some(0), "{}", query.log_tail());
}

#[tokio::test]
async fn options_in_database_url_stay_in_force_for_the_query_service() {
    let db = TestDb::new().await;
    seed(&db).await;
    // A schema ahead of `public` in the search path, holding a table of the same name: only
    // an `options` that reached the server makes the API read it.
    db.client()
        .await
        .batch_execute(
            "CREATE SCHEMA shadow;
             CREATE TABLE shadow.normalized_data (LIKE public.normalized_data INCLUDING ALL);
             INSERT INTO shadow.normalized_data (source, source_id, name, value)
                 VALUES ('from-options', '1', 'shadowed', 1);",
        )
        .await
        .unwrap();
    let url = format!("{}?options=-c%20search_path%3Dshadow%2Cpublic", db.url);
    let (mut query, api) = start_query(url);
    wait_until_healthy(&api).await;

    let (status, body) = get_json(&format!("{api}/data?source=from-options")).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["name"], "shadowed", "{body}");
    assert_eq!(query.stop().await, Some(0), "{}", query.log_tail());
}

#[tokio::test]
async fn the_ingester_and_normalizer_refuse_transaction_pooling_and_run_behind_session_pooling() {
    let db = TestDb::new().await;
    let sources = SourcesFile::new("");
    let transaction = PgBouncer::start(&db.url, "transaction").await;
    let session = PgBouncer::start(&db.url, "session").await;
    let env = |url: String| {
        vec![
            ("DATABASE_URL", url),
            ("SOURCES_FILE", sources.env_value()),
            ("INGESTER_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ("NORMALIZER_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ]
    };

    // The normalizer's marker is its LISTEN connection subscribing.
    for (service, up) in [
        ("etl-ingester", "ingester started"),
        ("etl-normalizer", "listening"),
    ] {
        let mut refused = ServiceProcess::start(service, &env(transaction.url_for(&db.url)));
        let status = tokio::time::timeout(DEADLINE, refused.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{service} ran behind transaction pooling"))
            .unwrap();
        assert_eq!(status.code(), Some(1), "{}", refused.log());
        assert!(
            refused
                .log()
                .contains("pooler in transaction or statement mode"),
            "{service} says why: {}",
            refused.log()
        );

        let mut running = ServiceProcess::start(service, &env(session.url_for(&db.url)));
        wait_for("the service to be up", DEADLINE, || async {
            running.log().contains(up).then_some(())
        })
        .await;
        assert!(
            running.child.try_wait().unwrap().is_none(),
            "{service} stopped behind session pooling: {}",
            running.log()
        );
        assert_eq!(running.stop().await, Some(0), "{}", running.log_tail());
    }
}
