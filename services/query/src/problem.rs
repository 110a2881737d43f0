//! Problems particular to the query API; the shape itself is [`etl_shared::problem::Problem`].

use etl_shared::problem::{Problem, ProblemCode};
use poem::http::StatusCode;
use poem_openapi::payload::Json;

/// A database failure: logged in full, answered with an opaque 500 or, for timeouts, a 503.
pub fn from_db_error(err: &(dyn std::error::Error + 'static)) -> Problem {
    let timed_out = std::iter::successors(Some(err), |e| e.source()).any(|e| {
        e.downcast_ref::<tokio_postgres::Error>()
            .and_then(|pg| pg.code())
            .is_some_and(|c| *c == tokio_postgres::error::SqlState::QUERY_CANCELED)
    });
    if timed_out {
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ProblemCode::Timeout,
            "Query timed out",
            "the query took longer than the statement timeout; narrow it with `source` or `search`",
        );
    }
    tracing::error!(error = %etl_shared::error_chain(err), "database error");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ProblemCode::Unavailable,
        "Database unavailable",
        "the database could not answer; try again shortly",
    )
}

/// [`from_db_error`] with its status, for a response's `5XX` problem.
pub fn server_error(err: &(dyn std::error::Error + 'static)) -> (StatusCode, Json<Problem>) {
    let problem = from_db_error(err);
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(problem))
}
