//! The console's actions: "run now" and "replay" a source. The query service only records
//! the request (`etl_requests`); an ingester or a normalizer takes it within about a second
//! (`etl_shared::console`). Only an API key marked `admin = true` may ask: without keys
//! configured, actions are refused, never open.

use etl_shared::console::{self, Action};
use etl_shared::problem::{Problem, ProblemCode};
use poem::http::StatusCode;
use poem_openapi::types::Example;
use poem_openapi::{Enum, Object};

use crate::access::Caller;
use crate::reader::Reader;

/// An action, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum ActionName {
    Run,
    Replay,
}

impl From<ActionName> for Action {
    fn from(name: ActionName) -> Self {
        match name {
            ActionName::Run => Action::Run,
            ActionName::Replay => Action::Replay,
        }
    }
}

/// A recorded request: which service takes it and when is in `/runs` soon after.
#[derive(Debug, Object)]
#[oai(example)]
pub struct ActionRequest {
    /// The request's id (`etl_requests.id`).
    pub request_id: i64,
    pub source: String,
    pub action: ActionName,
    /// Who asked: the API key's name.
    pub requested_by: String,
}

impl Example for ActionRequest {
    fn example() -> Self {
        Self {
            request_id: 42,
            source: "products".into(),
            action: ActionName::Run,
            requested_by: "ops".into(),
        }
    }
}

/// Why an action was not recorded.
#[derive(Debug)]
pub enum Refused {
    /// No admin key: 403 `forbidden`.
    NotAdmin,
    /// No ingester has published a source of that name: 404 `not_found`.
    UnknownSource(String),
    Database(tokio_postgres::Error),
    Pool(deadpool_postgres::PoolError),
}

impl Refused {
    /// The problem answered for it.
    pub fn problem(&self) -> (StatusCode, Problem) {
        match self {
            Refused::NotAdmin => (
                StatusCode::FORBIDDEN,
                Problem::new(
                    StatusCode::FORBIDDEN,
                    ProblemCode::Forbidden,
                    "Admin key needed",
                    "actions need an API key marked `admin = true` in QUERY_API_KEYS_FILE \
                     (`etl-query api-key NAME --admin`)",
                ),
            ),
            Refused::UnknownSource(source) => (
                StatusCode::NOT_FOUND,
                Problem::new(
                    StatusCode::NOT_FOUND,
                    ProblemCode::NotFound,
                    "Unknown source",
                    format!("no ingester runs a source named {source:?}"),
                ),
            ),
            Refused::Database(e) => {
                let (status, problem) = crate::problem::server_error(e);
                (status, problem.0)
            }
            Refused::Pool(e) => {
                let (status, problem) = crate::problem::server_error(e);
                (status, problem.0)
            }
        }
    }
}

/// Records that `caller` asks for `action` on `source`.
pub async fn ask(
    reader: &Reader,
    caller: Option<&Caller>,
    source: &str,
    action: ActionName,
) -> Result<ActionRequest, Refused> {
    let caller = caller.filter(|c| c.admin).ok_or(Refused::NotAdmin)?;
    let mut client = reader.pool().get().await.map_err(Refused::Pool)?;
    // The service's sessions are read-only by default: this one transaction writes.
    let tx = client
        .build_transaction()
        .read_only(false)
        .start()
        .await
        .map_err(Refused::Database)?;
    let known = tx
        .query_opt(
            "SELECT 1 FROM etl_source_config WHERE source = $1",
            &[&source],
        )
        .await
        .map_err(Refused::Database)?
        .is_some();
    if !known {
        return Err(Refused::UnknownSource(source.to_owned()));
    }
    let request_id = console::ask(&*tx, source, action.into(), &caller.name)
        .await
        .map_err(Refused::Database)?;
    tx.commit().await.map_err(Refused::Database)?;
    tracing::info!(
        source,
        action = Action::from(action).as_str(),
        by = &*caller.name,
        request_id,
        "action asked for"
    );
    Ok(ActionRequest {
        request_id,
        source: source.to_owned(),
        action,
        requested_by: caller.name.to_string(),
    })
}
