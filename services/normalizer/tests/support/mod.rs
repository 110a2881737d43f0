//! Shared pieces of the normalizer tests: raw rows written the way the ingester writes them,
//! normalizers over a fresh database, an apply log, and readers.
#![allow(dead_code)] // each test file uses its own subset

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use etl_normalizer::batch::Hook;
use etl_normalizer::{Application, Normalizer, Settings};
use etl_shared::raw::{self, RawJson, RawTable};
use etl_shared::sources::Sources;
use etl_tests::{SourceToml, TestDb};
use serde_json::Value;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// A REST source `api` (items `{id, title, price, summary}`) and a CSV source `csv`
/// (`{id, name, value, note}`), plus `extra`. Nothing is fetched: the tests write raw rows.
pub fn sources_toml(extra: &[SourceToml]) -> String {
    let mut sources = vec![
        SourceToml::rest("api", "http://127.0.0.1:1/items").mapping(
            r#"{ source_id = "/id", name = "/title", value = "/price", description = "/summary" }"#,
        ),
        SourceToml::csv("csv", "http://127.0.0.1:1/data.csv").mapping(
            r#"{ source_id = "id", name = "name", value = "value", description = "note" }"#,
        ),
    ];
    sources.extend_from_slice(extra);
    etl_tests::sources_toml(&sources)
}

pub fn settings(db: &TestDb, toml: &str) -> Settings {
    Settings {
        database: db.settings(),
        sources: Sources::parse(Path::new("test-sources.toml"), toml).expect("valid sources"),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        poll_interval: Duration::from_secs(3600),
        batch_size: 1000,
        bulk_min_rows: 100_000,
    }
}

pub fn normalizer(settings: &Settings, hook: Option<Hook>) -> Normalizer {
    let pool = etl_shared::db::pool(&settings.database, etl_shared::db::Needs::Session).unwrap();
    Normalizer::with_hook(settings, pool, CancellationToken::new(), hook)
}

/// A daemon running in the background; stopped (and awaited) by [`Daemon::stop`].
pub struct Daemon {
    pub normalizer: Normalizer,
    pub admin: String,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    pub async fn start(settings: Settings) -> Self {
        let normalizer = normalizer(&settings, None);
        let app = Application::build(settings, normalizer.clone())
            .await
            .unwrap();
        let admin = format!("http://{}", app.admin_addr());
        Self {
            normalizer,
            admin,
            task: tokio::spawn(app.run_until_stopped()),
        }
    }

    pub async fn stop(self) {
        self.normalizer.shutdown_token().cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the normalizer stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

/// Writes raw rows through the raw-write protocol the ingester uses (`etl_shared::raw::write`),
/// and NOTIFYs when `notify` is set (tests of missed notifications leave it out).
pub async fn write_raw(
    client: &mut Client,
    table: RawTable,
    source: &str,
    items: &[Value],
    notify: bool,
) {
    write_raw_json(
        client,
        table,
        source,
        &Value::Array(items.to_vec()).to_string(),
        notify,
    )
    .await;
}

/// As [`write_raw`], from the JSON text of an array of items (for numbers serde_json cannot
/// hold); each item's `id` is its source id.
pub async fn write_raw_json(
    client: &mut Client,
    table: RawTable,
    source: &str,
    items: &str,
    notify: bool,
) {
    use serde_json::value::RawValue;
    let items: Vec<&RawValue> = serde_json::from_str(items).unwrap();
    let records: Vec<(String, RawJson)> = items
        .iter()
        .map(|item| {
            // Fields as raw text, so a number out of f64's range elsewhere still parses.
            let fields: HashMap<String, &RawValue> = serde_json::from_str(item.get()).unwrap();
            let id = fields["id"].get();
            let id = serde_json::from_str::<String>(id).unwrap_or_else(|_| id.to_owned());
            (id, RawJson(item.get().to_owned()))
        })
        .collect();
    let tx = client.transaction().await.unwrap();
    raw::write(&tx, table, source, &records, None, raw::Probe::Fingerprints)
        .await
        .unwrap();
    if notify {
        raw::notify(&tx, source).await.unwrap();
    }
    tx.commit().await.unwrap();
}

pub fn api_item(id: u64, title: &str, price: Value) -> Value {
    serde_json::json!({ "id": id.to_string(), "title": title, "price": price, "summary": format!("about {id}") })
}

pub fn api_items(range: std::ops::RangeInclusive<u64>) -> Vec<Value> {
    range
        .map(|i| api_item(i, &format!("item {i}"), Value::from(i as f64 / 2.0)))
        .collect()
}

/// Records every insert and update of `normalized_data` in `apply_log`, in the same
/// transaction: a row applied twice shows up twice, a rolled-back apply not at all.
pub async fn install_apply_log(client: &Client) {
    client
        .batch_execute(
            "CREATE TABLE apply_log (source text, source_id text, op text);
             CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO apply_log VALUES (NEW.source, NEW.source_id, TG_OP); RETURN NEW; END $$;
             CREATE TRIGGER log_apply AFTER INSERT OR UPDATE ON normalized_data
                 FOR EACH ROW EXECUTE FUNCTION log_apply();",
        )
        .await
        .unwrap();
}

/// (applies in total, rows applied other than exactly once).
pub async fn apply_counts(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM apply_log),
                    (SELECT count(*) FROM (SELECT 1 FROM apply_log GROUP BY source, source_id
                                           HAVING count(*) <> 1) twice)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// normalized, rejected (normalize stage) and raw rows of a source; also checks that the
/// checkpoint's maintained `normalized_rows` equals the real count.
pub async fn tallies(client: &Client, source: &str) -> (i64, i64, i64) {
    let counted: Option<i64> = client
        .query_opt(
            "SELECT normalized_rows FROM etl_checkpoint WHERE source = $1",
            &[&source],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM normalized_data WHERE source = $1),
                    (SELECT count(*) FROM etl_rejects WHERE source = $1 AND stage = 'normalize'),
                    coalesce((SELECT raw_rows FROM etl_pending WHERE source = $1), 0)",
            &[&source],
        )
        .await
        .unwrap();
    let normalized: i64 = row.get(0);
    assert_eq!(
        counted.unwrap_or(0),
        normalized,
        "etl_checkpoint.normalized_rows drifted"
    );
    (normalized, row.get(1), row.get(2))
}

/// Whether every raw change of `source` is checkpointed.
pub async fn caught_up(client: &Client, source: &str) -> bool {
    client
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM etl_pending WHERE source = $1 AND pending_changes > 0)",
            &[&source],
        )
        .await
        .unwrap()
        .get(0)
}
