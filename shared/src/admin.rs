//! The admin HTTP surface every service shares: Kubernetes probes, the metrics endpoint, and
//! the bearer token that guards actions (see [`AdminToken`]). Each service adds its own routes
//! to the [`Route`] this returns.

use std::path::PathBuf;
use std::time::Duration;

use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{get, handler, Endpoint, IntoResponse, Request, Response, Route};
use serde_json::json;

use crate::config::{ConfigError, Env};
use crate::db::Pool;
use crate::metrics::PipelineMetrics;
use crate::problem::{Problem, ProblemCode};

/// The token an admin port's actions (a POST such as `/sources/{name}/run`) need, as
/// `Authorization: Bearer <token>`, from the file `ADMIN_TOKEN_FILE` names. The file is read
/// again at each action, so a rotated Secret takes effect without a restart. Without the
/// variable, actions are refused (403): an admin port reachable by the whole cluster must not
/// let anyone in it trigger work. Probes and `/metrics` need no token.
#[derive(Debug, Clone, Default)]
pub struct AdminToken {
    file: Option<PathBuf>,
}

/// A token shorter than this is refused: it would be guessable.
const MIN_TOKEN_BYTES: usize = 16;

impl AdminToken {
    pub const VAR: &'static str = "ADMIN_TOKEN_FILE";

    /// Reads `ADMIN_TOKEN_FILE`; a file that is missing, empty or holds a short token stops the
    /// service at start, naming the variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let file = env.get(Self::VAR)?.map(PathBuf::from);
        if let Some(path) = &file {
            read_token(path).map_err(|reason| ConfigError::Invalid {
                var: Self::VAR.into(),
                reason,
            })?;
        }
        Ok(Self { file })
    }

    /// Calls `ep` when the request carries the token; else a 401 (no or a wrong token) or a
    /// 403 (no token configured) problem.
    pub async fn check<E: Endpoint>(&self, ep: E, req: Request) -> poem::Result<Response> {
        let Some(path) = &self.file else {
            return Ok(Problem::new(
                StatusCode::FORBIDDEN,
                ProblemCode::Forbidden,
                "Admin actions are off",
                "this service has no ADMIN_TOKEN_FILE, so it takes no actions",
            )
            .into_response());
        };
        let expected = match read_token(path) {
            Ok(token) => token,
            Err(reason) => {
                tracing::error!(%reason, "admin token unreadable: refusing actions");
                return Ok(Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProblemCode::Unavailable,
                    "Admin token unreadable",
                    "the service cannot read its ADMIN_TOKEN_FILE; see its log",
                )
                .into_response());
            }
        };
        // Digests compared, so the time taken says nothing of the token's bytes.
        let digest = |t: &str| ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
        let presented = crate::bearer::credential(req.headers());
        if presented.is_some_and(|p| digest(p).as_ref() == digest(&expected).as_ref()) {
            return ep.call(req).await.map(IntoResponse::into_response);
        }
        Ok(crate::bearer::unauthorized(
            "Bearer realm=\"etl-admin\"",
            "admin actions need `Authorization: Bearer <the token of ADMIN_TOKEN_FILE>`",
        ))
    }
}

/// The token in `path`, trimmed; why not when it is unusable.
fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_BYTES || token.chars().any(char::is_whitespace) {
        return Err(format!(
            "{} must hold one token of at least {MIN_TOKEN_BYTES} characters, without spaces",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

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
