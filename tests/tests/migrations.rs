//! The schema: every table and constraint the services rely on exists, and migrating is safe to
//! repeat and to run from several processes at once.

use etl_shared::migrate::embedded_migrations;
use etl_tests::TestDb;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

const TABLES: [&str; 6] = [
    "raw_api_data",
    "raw_csv_data",
    "normalized_data",
    "etl_checkpoint",
    "etl_runs",
    "etl_rejects",
];

async fn columns(client: &Client, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Column lists of the UNIQUE and PRIMARY KEY constraints of `table`, e.g. `["source,source_id"]`.
async fn unique_keys(client: &Client, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT string_agg(a.attname, ',' ORDER BY k.ord)
             FROM pg_constraint c
             CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
             WHERE c.conrelid = $1::text::regclass AND c.contype IN ('u', 'p')
             GROUP BY c.oid ORDER BY 1",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn sql_state(client: &Client, sql: &str) -> Option<SqlState> {
    client.batch_execute(sql).await.err().map(|e| {
        e.code()
            .cloned()
            .expect("a database error, not a connection error")
    })
}

/// The columns of `normalized_data`, and of `normalized_build`, which builds its partitions.
const NORMALIZED_COLUMNS: &[&str] = &[
    "id",
    "source",
    "source_id",
    "name",
    "value",
    "description",
    "created_at",
    "updated_at",
];

#[tokio::test]
async fn migrations_create_every_table_with_the_columns_the_services_use() {
    let db = TestDb::new().await;
    let client = db.client().await;

    let expected: [(&str, &[&str]); 15] = [
        (
            "raw_api_data",
            &[
                "id",
                "source",
                "source_id",
                "data",
                "ingested_at",
                "change_id",
                "changed_at",
                "trace_context",
                "deleted_at",
                "fingerprint",
            ],
        ),
        (
            "raw_csv_data",
            &[
                "id",
                "source",
                "source_id",
                "data",
                "ingested_at",
                "change_id",
                "changed_at",
                "trace_context",
                "deleted_at",
                "fingerprint",
            ],
        ),
        ("normalized_data", NORMALIZED_COLUMNS),
        (
            "etl_checkpoint",
            &[
                "source",
                "last_processed_id",
                "last_processed_at",
                "total_processed",
                "updated_at",
                "normalized_rows",
                "mapping_fingerprint",
                "stalled_at",
                "stalled_reason",
            ],
        ),
        (
            "etl_runs",
            &[
                "id",
                "service",
                "source",
                "started_at",
                "ended_at",
                "duration_seconds",
                "records_processed",
                "records_inserted",
                "records_updated",
                "records_unchanged",
                "records_rejected",
                "status",
                "error_message",
                "created_at",
                "records_deleted",
            ],
        ),
        (
            "etl_rejects",
            &[
                "id",
                "run_id",
                "stage",
                "source",
                "source_id",
                "line",
                "page",
                "item",
                "raw_id",
                "reason",
                "raw",
                "created_at",
            ],
        ),
        (
            "etl_source_leases",
            &["source", "run_id", "acquired_at", "succeeded_at"],
        ),
        ("etl_run_seen", &["run_id", "source_id"]),
        (
            "etl_source_state",
            &[
                "source",
                "url",
                "etag",
                "last_modified",
                "incremental",
                "updated_at",
            ],
        ),
        (
            "etl_replays",
            &[
                "source",
                "fingerprint",
                "position",
                "processed",
                "started_at",
                "error",
                "reason",
            ],
        ),
        ("normalized_build", NORMALIZED_COLUMNS),
        ("etl_partitions", &["source", "role", "relid"]),
        (
            "etl_rejects_replay",
            &["source", "source_id", "raw_id", "reason"],
        ),
        (
            "etl_source_config",
            &[
                "source",
                "kind",
                "schedule_seconds",
                "url",
                "mapping",
                "updated_at",
            ],
        ),
        (
            "etl_requests",
            &[
                "id",
                "source",
                "action",
                "requested_by",
                "requested_at",
                "taken_at",
            ],
        ),
    ];
    for (table, cols) in expected {
        assert_eq!(columns(&client, table).await, cols, "columns of {table}");
    }
}

#[tokio::test]
async fn raw_and_normalized_tables_are_unique_per_source_and_source_id() {
    let db = TestDb::new().await;
    let client = db.client().await;

    for table in ["raw_api_data", "raw_csv_data", "normalized_data"] {
        let keys = unique_keys(&client, table).await;
        assert!(
            keys.contains(&"source,source_id".to_string()),
            "{table}: {keys:?}"
        );
        assert!(
            !keys.iter().any(|k| k == "source_id"),
            "{table} must not key on source_id alone"
        );
    }
    assert_eq!(unique_keys(&client, "etl_checkpoint").await, ["source"]);

    // The same id from two sources is two records; the same id twice in one source is refused.
    client
        .batch_execute(
            "INSERT INTO raw_csv_data (source, source_id, data) VALUES ('a', '1', '{}'), ('b', '1', '{}')",
        )
        .await
        .unwrap();
    assert_eq!(
        sql_state(
            &client,
            "INSERT INTO raw_csv_data (source, source_id, data) VALUES ('a', '1', '{}')"
        )
        .await,
        Some(SqlState::UNIQUE_VIOLATION)
    );
}

#[tokio::test]
async fn normalized_values_may_repeat_but_must_be_finite_and_named() {
    let db = TestDb::new().await;
    let client = db.client().await;

    client
        .batch_execute(
            "SELECT etl_ensure_partition('s');
             INSERT INTO normalized_data (source, source_id, name, value)
             VALUES ('s', '1', 'one', 42), ('s', '2', 'two', 42)",
        )
        .await
        .expect("the seed's `value UNIQUE` was a drawing slip: values repeat");

    for bad in ["'NaN'", "'Infinity'", "'-Infinity'"] {
        let sql = format!(
            "INSERT INTO normalized_data (source, source_id, name, value) VALUES ('s', 'x', 'n', {bad})"
        );
        assert_eq!(
            sql_state(&client, &sql).await,
            Some(SqlState::CHECK_VIOLATION),
            "{bad}"
        );
    }
    assert_eq!(
        sql_state(
            &client,
            "INSERT INTO normalized_data (source, source_id, name, value) VALUES ('s', 'y', '', 1)"
        )
        .await,
        Some(SqlState::CHECK_VIOLATION)
    );
}

#[tokio::test]
async fn raw_changes_get_increasing_change_ids() {
    let db = TestDb::new().await;
    let client = db.client().await;

    let ids: Vec<i64> = client
        .query(
            "INSERT INTO raw_api_data (source, source_id, data)
             SELECT 'api', g::text, '{}' FROM generate_series(1, 3) g RETURNING change_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let csv: i64 = client
        .query_one(
            "INSERT INTO raw_csv_data (source, source_id, data) VALUES ('csv', '1', '{}') RETURNING change_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(csv > ids[2], "one sequence across both raw tables");
}

#[tokio::test]
async fn etl_pending_counts_raw_rows_and_the_changes_after_each_checkpoint() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO raw_api_data (source, source_id, data)
                 SELECT 'api', g::text, '{}' FROM generate_series(1, 5) g;
             INSERT INTO raw_csv_data (source, source_id, data)
                 SELECT 'csv', g::text, '{}' FROM generate_series(1, 3) g;
             INSERT INTO etl_checkpoint (source, last_processed_id)
                 SELECT 'api', change_id FROM raw_api_data WHERE source_id = '2';
             INSERT INTO etl_checkpoint (source) VALUES ('gone');",
        )
        .await
        .unwrap();

    let pending: Vec<(String, i64, i64)> = client
        .query(
            "SELECT source, raw_rows, pending_changes FROM etl_pending ORDER BY source",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();

    assert_eq!(
        pending,
        [("api".into(), 5, 3), ("csv".into(), 3, 3)],
        "after the checkpoint, or everything before the first batch; no row for a source without raw rows"
    );
}

#[tokio::test]
async fn runs_and_rejects_refuse_inconsistent_rows() {
    let db = TestDb::new().await;
    let client = db.client().await;

    let cases = [
        ("unknown service", "INSERT INTO etl_runs (service, source) VALUES ('cron', 's')"),
        ("unknown status", "INSERT INTO etl_runs (service, source, status) VALUES ('ingester', 's', 'done')"),
        (
            "finished without an end",
            "INSERT INTO etl_runs (service, source, status) VALUES ('ingester', 's', 'success')",
        ),
        (
            "failed without an error",
            "INSERT INTO etl_runs (service, source, status, ended_at) VALUES ('ingester', 's', 'failed', now())",
        ),
        (
            "unknown stage",
            "INSERT INTO etl_rejects (stage, source, reason, raw) VALUES ('load', 's', 'r', '\\x00')",
        ),
        (
            "reject without a reason",
            "INSERT INTO etl_rejects (stage, source, reason, raw) VALUES ('ingest', 's', '', '\\x00')",
        ),
    ];
    for (what, sql) in cases {
        assert_eq!(
            sql_state(&client, sql).await,
            Some(SqlState::CHECK_VIOLATION),
            "{what}"
        );
    }

    // A normalize-stage reject is the current state of one raw record: one per (source, source_id).
    client
        .batch_execute(
            "INSERT INTO etl_rejects (stage, source, source_id, reason, raw)
             VALUES ('normalize', 's', '1', 'no name', '\\x7b7d')",
        )
        .await
        .unwrap();
    assert_eq!(
        sql_state(
            &client,
            "INSERT INTO etl_rejects (stage, source, source_id, reason, raw)
             VALUES ('normalize', 's', '1', 'no name', '\\x7b7d')"
        )
        .await,
        Some(SqlState::UNIQUE_VIOLATION)
    );
    // Rejected bytes are kept exactly, NUL and invalid UTF-8 included.
    client
        .batch_execute(
            "INSERT INTO etl_rejects (stage, source, line, reason, raw)
             VALUES ('ingest', 's', 7, 'ragged row', '\\x00ff0a')",
        )
        .await
        .unwrap();
    let raw: Vec<u8> = client
        .query_one("SELECT raw FROM etl_rejects WHERE line = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(raw, [0x00, 0xff, 0x0a]);
}

#[tokio::test]
async fn migrating_an_up_to_date_database_again_changes_nothing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let history = "SELECT count(*) FROM refinery_schema_history";
    let before: i64 = client.query_one(history, &[]).await.unwrap().get(0);
    assert_eq!(before as usize, embedded_migrations().len());

    let report = etl_shared::migrate(&db.settings()).await.unwrap();

    assert!(
        report.applied.is_empty(),
        "applied again: {:?}",
        report.applied
    );
    let after: i64 = client.query_one(history, &[]).await.unwrap().get(0);
    assert_eq!(after, before);
}

#[tokio::test]
async fn concurrent_migrations_of_an_empty_database_all_succeed_and_apply_once() {
    let db = TestDb::empty().await;
    let settings = db.settings();

    let runs = (0..6).map(|_| {
        let settings = settings.clone();
        tokio::spawn(async move { etl_shared::migrate(&settings).await })
    });
    let reports: Vec<_> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .map(|joined| joined.unwrap().expect("every concurrent migrate succeeds"))
        .collect();

    let applied: usize = reports.iter().map(|r| r.applied.len()).sum();
    assert_eq!(
        applied,
        embedded_migrations().len(),
        "each migration applied exactly once"
    );
    let client = db.client().await;
    for table in TABLES {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .unwrap()
            .get(0);
        assert!(exists, "{table} missing");
    }
}

/// Applies the migration files of `versions`, as plain SQL (from 1: what a database of an
/// earlier release holds).
async fn migrate_files(client: &Client, versions: std::ops::RangeInclusive<u32>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let mut files: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let version = name.strip_prefix('V')?.split("__").next()?.parse().ok()?;
            Some((version, path))
        })
        .filter(|(version, _)| versions.contains(version))
        .collect();
    files.sort();
    assert_eq!(files.len(), versions.count(), "{files:?}");
    for (_, path) in files {
        let sql = std::fs::read_to_string(&path).unwrap();
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    }
}

#[tokio::test]
async fn upgrading_to_one_partition_per_source_keeps_every_record_and_its_id() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    migrate_files(&client, 1..=10).await;
    client
        .batch_execute(
            "INSERT INTO normalized_data (source, source_id, name, value, description)
             SELECT CASE WHEN g % 3 = 0 THEN 'a' ELSE 'b''s' END, g::text, 'item ' || g, g,
                    CASE WHEN g % 2 = 0 THEN 'even' END
             FROM generate_series(1, 300) g;
             DELETE FROM normalized_data WHERE id % 7 = 0;",
        )
        .await
        .unwrap();
    let records = "SELECT id, source, source_id, name, value, description, created_at, updated_at
                   FROM normalized_data ORDER BY id";
    let snapshot = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| {
                format!(
                    "{} {} {} {} {} {:?} {:?} {:?}",
                    r.get::<_, i64>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                    r.get::<_, f64>(4),
                    r.get::<_, Option<String>>(5),
                    r.get::<_, std::time::SystemTime>(6),
                    r.get::<_, std::time::SystemTime>(7),
                )
            })
            .collect::<Vec<_>>()
    };
    let before = snapshot(client.query(records, &[]).await.unwrap());

    migrate_files(&client, 11..=11).await;

    assert_eq!(snapshot(client.query(records, &[]).await.unwrap()), before);
    let partitions: Vec<(String, i64)> = client
        .query(
            "SELECT p.source, (SELECT count(*) FROM normalized_data n WHERE n.source = p.source)
             FROM etl_partitions p WHERE p.role = 'live' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(partitions, [("a".into(), 86), ("b's".into(), 172)]);
    let new_id: i64 = client
        .query_one(
            "INSERT INTO normalized_data (source, source_id, name, value)
             VALUES ('a', 'new', 'new', 0) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(new_id, 301, "ids go on after the last one V10 gave");
}
