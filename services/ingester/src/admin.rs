//! The ingester's admin HTTP port: the shared probes and metrics, plus a way to run a source now
//! instead of waiting for its schedule.

use std::collections::HashMap;
use std::sync::Arc;

use etl_shared::problem::{Problem, ProblemCode};
use poem::http::StatusCode;
use poem::web::{Data, Json, Path};
use poem::{get, handler, post, Endpoint, EndpointExt, IntoResponse, Response};
use serde_json::json;
use tokio::sync::Notify;

use crate::Ingester;

/// One wake-up per source; a trigger while a run is in progress queues exactly one more run.
pub type Triggers = HashMap<String, Arc<Notify>>;

pub fn routes(ingester: Ingester, triggers: Arc<Triggers>) -> impl Endpoint {
    etl_shared::admin::probes()
        .at("/metrics", get(etl_shared::admin::metrics))
        .at("/sources/:name/run", post(trigger))
        .data(ingester.pool().clone())
        .data(ingester.metrics().clone())
        .data(triggers)
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
        None => Problem::new(
            StatusCode::NOT_FOUND,
            ProblemCode::NotFound,
            "Unknown source",
            format!("no source named {name:?} in the sources file"),
        )
        .into_response(),
    }
}
