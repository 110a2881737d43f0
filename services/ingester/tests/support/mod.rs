//! Shared pieces of the ingester tests: an ingester over a fresh database and a sources file,
//! and readers for what it wrote.
#![allow(dead_code)] // each test file uses its own subset

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use etl_ingester::{Ingester, Settings};
use etl_shared::sources::Sources;
use etl_tests::TestDb;
use poem::{Request, Response};
use tokio_util::sync::CancellationToken;

pub fn settings(db: &TestDb, sources_toml: &str) -> Settings {
    let sources =
        Sources::parse(Path::new("test-sources.toml"), sources_toml).expect("valid sources");
    let headers = sources
        .sources
        .iter()
        .map(|s| {
            let resolved = etl_ingester::http::resolve_headers(s, |var| std::env::var(var).ok())
                .expect("headers resolve");
            (s.name.clone(), resolved)
        })
        .collect();
    Settings {
        database: db.settings(),
        sources,
        headers,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        retention_days: 30,
        admin_token: etl_shared::admin::AdminToken::default(),
    }
}

/// [`settings`] whose admin actions need the token of `token`.
pub fn settings_with_token(
    db: &TestDb,
    sources_toml: &str,
    token: &etl_tests::AdminTokenFile,
) -> Settings {
    let env = etl_shared::config::Env::from_pairs([("ADMIN_TOKEN_FILE", token.env_value())]);
    Settings {
        admin_token: etl_shared::admin::AdminToken::from_env(&env).expect("a usable token"),
        ..settings(db, sources_toml)
    }
}

pub fn ingester(db: &TestDb, sources_toml: &str) -> Ingester {
    let settings = settings(db, sources_toml);
    let pool = etl_shared::db::pool(&settings.database, etl_shared::db::Needs::Session).unwrap();
    Ingester::new(&settings, pool, CancellationToken::new())
}

/// A row of `etl_runs`.
#[derive(Debug)]
pub struct RunRow {
    pub status: String,
    pub error: Option<String>,
    pub processed: i64,
    pub inserted: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub rejected: i64,
}

pub async fn run_row(db: &TestDb, run_id: i64) -> RunRow {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status, error_message, records_processed, records_inserted, records_updated,
                    records_unchanged, records_rejected
             FROM etl_runs WHERE id = $1",
            &[&run_id],
        )
        .await
        .unwrap();
    RunRow {
        status: row.get(0),
        error: row.get(1),
        processed: row.get(2),
        inserted: row.get(3),
        updated: row.get(4),
        unchanged: row.get(5),
        rejected: row.get(6),
    }
}

/// `source_id`s in a raw table for a source, sorted as numbers where they are numbers.
pub async fn raw_ids(db: &TestDb, table: &str, source: &str) -> Vec<String> {
    let sql = format!("SELECT source_id FROM {table} WHERE source = $1");
    let mut ids: Vec<String> = db
        .client()
        .await
        .query(&sql, &[&source])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.sort_by_key(|id| (id.parse::<i64>().unwrap_or(i64::MAX), id.clone()));
    ids
}

/// Rejects of a source: (line, page, item, reason, raw bytes), in order of position.
pub async fn rejects(
    db: &TestDb,
    source: &str,
) -> Vec<(Option<i64>, Option<i64>, Option<i64>, String, Vec<u8>)> {
    db.client()
        .await
        .query(
            "SELECT line, page, item, reason, raw FROM etl_rejects WHERE source = $1
             ORDER BY line, page, item",
            &[&source],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// The query string of each request a test server received, in order.
#[derive(Clone, Default)]
pub struct RequestLog(Arc<Mutex<Vec<String>>>);

impl RequestLog {
    pub fn record(&self, req: &Request) {
        self.0
            .lock()
            .unwrap()
            .push(req.uri().query().unwrap_or("").to_owned());
    }

    pub fn queries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

pub fn params(req: &Request) -> HashMap<String, String> {
    req.params::<HashMap<String, String>>().unwrap_or_default()
}

pub fn json_response(body: serde_json::Value) -> Response {
    Response::builder()
        .content_type("application/json")
        .body(body.to_string())
}

/// Items 1..=n as a typical API returns them.
pub fn items(range: std::ops::RangeInclusive<u64>) -> Vec<serde_json::Value> {
    range
        .map(|i| serde_json::json!({ "id": i, "title": format!("item {i}"), "price": i as f64 * 1.5 }))
        .collect()
}

pub fn numbers(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}
