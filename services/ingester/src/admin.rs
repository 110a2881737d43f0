//! The ingester's admin HTTP port: probes for Kubernetes, Prometheus metrics, and a way to run a
//! source now instead of waiting for its schedule.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use poem::http::StatusCode;
use poem::web::{Data, Json, Path};
use poem::{get, handler, post, Endpoint, EndpointExt, IntoResponse, Response, Route};
use serde_json::json;
use tokio::sync::Notify;

use crate::Ingester;

/// One wake-up per source; a trigger while a run is in progress queues exactly one more run.
pub type Triggers = HashMap<String, Arc<Notify>>;

pub fn routes(ingester: Ingester, triggers: Arc<Triggers>) -> impl Endpoint {
    Route::new()
        .at("/health/live", get(live))
        .at("/health/ready", get(ready))
        .at("/metrics", get(metrics))
        .at("/sources/:name/run", post(trigger))
        .data(ingester)
        .data(triggers)
}

#[handler]
fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database answers within two seconds: without it no run can land anything.
#[handler]
async fn ready(Data(ingester): Data<&Ingester>) -> Response {
    let check = async {
        let client = ingester.pool().get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(_)) => Json(json!({ "status": "ready", "database": "up" })).into_response(),
        Ok(Err(e)) => unavailable(&e),
        Err(_) => unavailable("no answer within 2 s"),
    }
}

fn unavailable(why: &str) -> Response {
    Json(json!({ "status": "unavailable", "database": "down", "detail": why }))
        .with_status(StatusCode::SERVICE_UNAVAILABLE)
        .into_response()
}

#[handler]
fn metrics(Data(ingester): Data<&Ingester>) -> Response {
    Response::builder()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(ingester.metrics().encode())
}

#[handler]
fn trigger(Path(name): Path<String>, Data(triggers): Data<&Arc<Triggers>>) -> Response {
    match triggers.get(&name) {
        Some(notify) => {
            notify.notify_one();
            Json(json!({ "source": name, "status": "queued" }))
                .with_status(StatusCode::ACCEPTED)
                .into_response()
        }
        None => Json(json!({
            "type": "about:blank",
            "title": "Unknown source",
            "status": 404,
            "detail": format!("no source named {name:?} in the sources file"),
        }))
        .with_status(StatusCode::NOT_FOUND)
        .with_content_type("application/problem+json")
        .into_response(),
    }
}
