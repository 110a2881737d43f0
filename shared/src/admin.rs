//! The admin HTTP surface every service shares: Kubernetes probes and the metrics endpoint.
//! Each service adds its own routes to the [`Route`] this returns.

use std::time::Duration;

use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{get, handler, IntoResponse, Response, Route};
use serde_json::json;

use crate::db::Pool;
use crate::metrics::PipelineMetrics;

/// `/health/live` and `/health/ready`; needs `.data(pool)` on the final endpoint. Services mount
/// `/metrics` themselves ([`metrics`] serves a [`PipelineMetrics`] as it is).
pub fn probes() -> Route {
    Route::new()
        .at("/health/live", get(live))
        .at("/health/ready", get(ready))
}

#[handler]
fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database answers within two seconds: without it no work can be done.
#[handler]
async fn ready(Data(pool): Data<&Pool>) -> Response {
    match database_answers(pool, Duration::from_secs(2)).await {
        Ok(()) => Json(json!({ "status": "ready", "database": "up" })).into_response(),
        Err(why) => Json(json!({ "status": "unavailable", "database": "down", "detail": why }))
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response(),
    }
}

/// `GET /metrics` for a service whose metrics need nothing but the pool's use refreshed at
/// scrape time; needs `.data(metrics)` and `.data(pool)`.
#[handler]
pub fn metrics(Data(metrics): Data<&PipelineMetrics>, Data(pool): Data<&Pool>) -> Response {
    metrics.update_pool(pool);
    metrics.exposition()
}

/// Whether a pooled connection answers `SELECT 1` within `timeout`.
pub async fn database_answers(pool: &Pool, timeout: Duration) -> Result<(), String> {
    let check = async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", timeout.as_secs())))
}
