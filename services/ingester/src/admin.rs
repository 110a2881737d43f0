//! The ingester's admin HTTP port: the shared probes and metrics, plus a way to run a source now
//! instead of waiting for its schedule.

use std::collections::HashMap;
use std::sync::Arc;

use etl_shared::admin::AdminToken;
use etl_shared::problem::{Problem, ProblemCode};
use poem::http::StatusCode;
use poem::web::{Data, Json, Path};
use poem::{get, handler, post, Endpoint, EndpointExt, IntoResponse, Response};
use serde_json::json;
use tokio::sync::Notify;

use crate::Ingester;

/// One wake-up per source; a trigger while a run is in progress queues exactly one more run.
pub type Triggers = HashMap<String, Arc<Notify>>;

/// The probes and `/metrics`, open; `POST /sources/{name}/run`, behind the admin token.
pub fn routes(ingester: Ingester, triggers: Arc<Triggers>, token: AdminToken) -> impl Endpoint {
    let guarded = post(trigger).around(move |ep, req| {
        let token = token.clone();
        async move { token.check(ep, req).await }
    });
    etl_shared::admin::probes()
        .at("/metrics", get(etl_shared::admin::metrics))
        .at("/sources/:name/run", guarded)
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
