//! The HTTP API and its OpenAPI description: every operation has an `operationId`, a summary,
//! tags, bounded parameters, and every response documented, errors included.

use std::time::Duration;

use poem::http::StatusCode;
use poem::Body;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::{Binary, Json};
use poem_openapi::types::Example;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, ResponseContent, Tags};

use crate::actions::{self, ActionName, ActionRequest};
use crate::caching;
use crate::data::{self, After, Cursor, DataPage, DataQuery, DataRecord, Filters, Sort, Start};
use crate::export::{ExportError, Exports, Format};
use crate::history::{self, Paging, RejectFilters, RejectPage, RunFilters, RunPage, Stage};
use crate::problem;
use crate::reader::Reader;
use crate::stats::{RunStatus, Service};
use crate::stats::{Stats, StatsCache};
use etl_shared::problem::{Problem, ProblemCode};
use time::OffsetDateTime;

#[derive(Tags)]
enum Tag {
    /// Normalized records.
    Data,
    /// Pipeline statistics.
    Stats,
    /// What the pipeline did: its runs, and the records it rejected.
    History,
    /// Actions on a source, for admin keys only: run it now, replay it.
    Actions,
    /// Liveness and readiness.
    Health,
}

pub struct Api {
    pub reader: Reader,
    pub stats: StatsCache,
    pub exports: Exports,
}

/// Service and database status.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Health {
    pub status: HealthStatus,
    pub database: DatabaseStatus,
}

impl Example for Health {
    fn example() -> Self {
        Health {
            status: HealthStatus::Ok,
            database: DatabaseStatus::Up,
        }
    }
}

/// `ok` when the database answers, else `unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
    Unavailable,
}

/// Whether the database answered within 2 seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum DatabaseStatus {
    Up,
    Down,
}

/// The process serves requests (the database is not checked).
#[derive(Debug, Object)]
#[oai(example)]
pub struct Liveness {
    pub status: LiveStatus,
}

impl Example for Liveness {
    fn example() -> Self {
        Liveness {
            status: LiveStatus::Ok,
        }
    }
}

/// Always `ok`: a process that cannot answer gives no answer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum LiveStatus {
    Ok,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_data_request")]
enum DataResponse {
    /// A page of records. `X-Total-Count` repeats `total`.
    #[oai(status = 200, content_type = "application/json")]
    Ok(
        Json<DataPage>,
        #[oai(header = "X-Total-Count")] i64,
        #[oai(header = "ETag")] String,
        #[oai(header = "Cache-Control")] String,
    ),
    /// The data has not changed since the page whose `ETag` came as `If-None-Match`.
    #[oai(status = 304)]
    NotModified(
        #[oai(header = "ETag")] String,
        #[oai(header = "Cache-Control")] String,
    ),
    /// A parameter is missing its bounds or malformed; `parameter` names it.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// Another client error, answered before the operation runs: no or an unknown API key
    /// (401, `unauthorized`, with `WWW-Authenticate`), the key's rate limit (429,
    /// `rate_limited`, with `Retry-After`), a method the resource does not allow (405), …;
    /// `code` says which.
    #[oai(status_range = "4XX", content_type = "application/problem+json")]
    #[allow(dead_code)] // in the spec for clients; the edge answers these (see `routes`)
    ClientError(StatusCode, Json<Problem>),
    /// The database did not answer in time (503, `timeout` or `unavailable`), or another
    /// server problem; `code` says which.
    #[oai(status_range = "5XX", content_type = "application/problem+json")]
    ServerError(StatusCode, Json<Problem>),
}

fn bad_data_request(err: poem::Error) -> DataResponse {
    DataResponse::BadRequest(Json(Problem::from_bad_request(err)))
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_record_request")]
enum RecordResponse {
    /// The record.
    #[oai(status = 200, content_type = "application/json")]
    Ok(
        Json<DataRecord>,
        #[oai(header = "ETag")] String,
        #[oai(header = "Cache-Control")] String,
    ),
    /// The data has not changed since the answer whose `ETag` came as `If-None-Match`.
    #[oai(status = 304)]
    NotModified(
        #[oai(header = "ETag")] String,
        #[oai(header = "Cache-Control")] String,
    ),
    /// A parameter is malformed; `parameter` names it.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// The source has no record with that id (`code` is `not_found`).
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Problem>),
    /// Another client error, answered before the operation runs: no or an unknown API key
    /// (401, `unauthorized`, with `WWW-Authenticate`), the key's rate limit (429,
    /// `rate_limited`, with `Retry-After`), a method the resource does not allow (405), …;
    /// `code` says which.
    #[oai(status_range = "4XX", content_type = "application/problem+json")]
    #[allow(dead_code)] // in the spec for clients; the edge answers these (see `routes`)
    ClientError(StatusCode, Json<Problem>),
    /// The database did not answer in time (503, `timeout` or `unavailable`), or another
    /// server problem; `code` says which.
    #[oai(status_range = "5XX", content_type = "application/problem+json")]
    ServerError(StatusCode, Json<Problem>),
}

fn bad_record_request(err: poem::Error) -> RecordResponse {
    RecordResponse::BadRequest(Json(Problem::from_bad_request(err)))
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_export_request")]
enum ExportResponse {
    /// The records, streamed; `Content-Disposition` names a file for them.
    #[oai(status = 200)]
    Ok(
        ExportBody,
        #[oai(header = "Content-Disposition")] String,
        #[oai(header = "Cache-Control")] String,
    ),
    /// A parameter is malformed; `parameter` names it.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// Two exports are running already: try again after `Retry-After` seconds.
    #[oai(status = 503, content_type = "application/problem+json")]
    Busy(Json<Problem>, #[oai(header = "Retry-After")] u32),
    /// Another client error, answered before the operation runs: no or an unknown API key
    /// (401, `unauthorized`, with `WWW-Authenticate`), the key's rate limit (429,
    /// `rate_limited`, with `Retry-After`), a method the resource does not allow (405), …;
    /// `code` says which.
    #[oai(status_range = "4XX", content_type = "application/problem+json")]
    #[allow(dead_code)] // in the spec for clients; the edge answers these (see `routes`)
    ClientError(StatusCode, Json<Problem>),
    /// The database did not answer in time (503, `timeout` or `unavailable`), or another
    /// server problem; `code` says which.
    #[oai(status_range = "5XX", content_type = "application/problem+json")]
    ServerError(StatusCode, Json<Problem>),
}

/// An export's body, in the format asked for.
#[derive(ResponseContent)]
enum ExportBody {
    #[oai(content_type = "application/x-ndjson")]
    Ndjson(Binary<Body>),
    #[oai(content_type = "text/csv")]
    Csv(Binary<Body>),
}

fn bad_export_request(err: poem::Error) -> ExportResponse {
    ExportResponse::BadRequest(Json(Problem::from_bad_request(err)))
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_action_request")]
enum ActionResponse {
    /// The request is recorded; an ingester (`run`) or a normalizer (`replay`) takes it within
    /// about a second, and its run then shows in `/runs`.
    #[oai(status = 202, content_type = "application/json")]
    Accepted(Json<ActionRequest>),
    /// A parameter is malformed; `parameter` names it.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// Not an admin key (403, `forbidden`; also when no keys are configured), no ingester
    /// runs that source (404, `not_found`), no or an unknown key (401, `unauthorized`), the
    /// key's rate limit (429, `rate_limited`), …; `code` says which.
    #[oai(status_range = "4XX", content_type = "application/problem+json")]
    ClientError(StatusCode, Json<Problem>),
    /// The database did not answer in time (503, `timeout` or `unavailable`), or another
    /// server problem; `code` says which.
    #[oai(status_range = "5XX", content_type = "application/problem+json")]
    ServerError(StatusCode, Json<Problem>),
}

fn bad_action_request(err: poem::Error) -> ActionResponse {
    // poem-openapi names path parameters by position (`param1`) in its message.
    let problem = if err.to_string().contains("ActionName") {
        Problem::invalid_parameter("action", "must be `run` or `replay`")
    } else {
        Problem::from_bad_request(err)
    };
    ActionResponse::BadRequest(Json(problem))
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_runs_request")]
enum RunsResponse {
    /// A page of runs, newest first.
    #[oai(status = 200, content_type = "application/json")]
    Ok(Json<RunPage>, #[oai(header = "Cache-Control")] String),
    /// A parameter is malformed; `parameter` names it.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// Another client error, answered before the operation runs: no or an unknown API key
    /// (401, `unauthorized`, with `WWW-Authenticate`), the key's rate limit (429,
    /// `rate_limited`, with `Retry-After`), a method the resource does not allow (405), …;
    /// `code` says which.
    #[oai(status_range = "4XX", content_type = "application/problem+json")]
    #[allow(dead_code)] // in the spec for clients; the edge answers these (see `routes`)
    ClientError(StatusCode, Json<Problem>),
    /// The database did not answer in time (503, `timeout` or `unavailable`), or another
    /// server problem; `code` says which.
    #[oai(status_range = "5XX", content_type = "application/problem+json")]
    ServerError(StatusCode, Json<Problem>),
}

fn bad_runs_request(err: poem::Error) -> RunsResponse {
    RunsResponse::BadRequest(Json(Problem::from_bad_request(err)))
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_rejects_request")]
enum RejectsResponse {
    /// A page of rejected records, newest first.
    #[oai(status = 200, content_type = "application/json")]
    Ok(Json<RejectPage>, #[oai(header = "Cache-Control")] String),
    /// A parameter is malformed; `parameter` names it.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// Another client error, answered before the operation runs: no or an unknown API key
    /// (401, `unauthorized`, with `WWW-Authenticate`), the key's rate limit (429,
    /// `rate_limited`, with `Retry-After`), a method the resource does not allow (405), …;
    /// `code` says which.
    #[oai(status_range = "4XX", content_type = "application/problem+json")]
    #[allow(dead_code)] // in the spec for clients; the edge answers these (see `routes`)
    ClientError(StatusCode, Json<Problem>),
    /// The database did not answer in time (503, `timeout` or `unavailable`), or another
    /// server problem; `code` says which.
    #[oai(status_range = "5XX", content_type = "application/problem+json")]
    ServerError(StatusCode, Json<Problem>),
}

fn bad_rejects_request(err: poem::Error) -> RejectsResponse {
    RejectsResponse::BadRequest(Json(Problem::from_bad_request(err)))
}

/// Page number or cursor of `/runs` and `/rejects`: the cursor's form is `/data`'s in `id`
/// order (its id is the last one seen, the page goes on below it).
fn history_start(page: u32, cursor: Option<&str>) -> Result<Start, Problem> {
    match cursor.map(Cursor::decode) {
        None => Ok(Start::Page(page)),
        Some(Some(cursor)) if cursor.after == After::Id => Ok(Start::After(cursor)),
        // The spec's pattern lets only decodable cursors of this form through.
        Some(_) => Err(Problem::invalid_parameter(
            "cursor",
            "is not a next_cursor this API returned",
        )),
    }
}

#[derive(ApiResponse)]
enum StatsResponse {
    /// Statistics per source, at most `max_age_seconds` old; `Cache-Control` says for how
    /// much longer these are the latest.
    #[oai(status = 200, content_type = "application/json")]
    Ok(
        Json<Stats>,
        #[oai(header = "ETag")] String,
        #[oai(header = "Cache-Control")] String,
    ),
    /// The snapshot whose `ETag` came as `If-None-Match` is still the latest.
    #[oai(status = 304)]
    NotModified(
        #[oai(header = "ETag")] String,
        #[oai(header = "Cache-Control")] String,
    ),
    /// Another client error, answered before the operation runs: no or an unknown API key
    /// (401, `unauthorized`, with `WWW-Authenticate`), the key's rate limit (429,
    /// `rate_limited`, with `Retry-After`), a method the resource does not allow (405), …;
    /// `code` says which.
    #[oai(status_range = "4XX", content_type = "application/problem+json")]
    #[allow(dead_code)] // in the spec for clients; the edge answers these (see `routes`)
    ClientError(StatusCode, Json<Problem>),
    /// The database did not answer in time (503, `timeout` or `unavailable`), or another
    /// server problem; `code` says which.
    #[oai(status_range = "5XX", content_type = "application/problem+json")]
    ServerError(StatusCode, Json<Problem>),
}

#[derive(ApiResponse)]
enum HealthResponse {
    /// The service and its database are up.
    #[oai(status = 200, content_type = "application/json")]
    Ok(Json<Health>, #[oai(header = "Cache-Control")] String),
    /// The database did not answer within 2 seconds.
    #[oai(status = 503, content_type = "application/json")]
    Unavailable(Json<Health>, #[oai(header = "Cache-Control")] String),
}

#[derive(ApiResponse)]
enum LiveResponse {
    /// The process is up (the database is not checked).
    #[oai(status = 200, content_type = "application/json")]
    Ok(Json<Liveness>, #[oai(header = "Cache-Control")] String),
}

const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

#[OpenApi]
impl Api {
    /// List normalized records
    ///
    /// Records in a stable order (by `id`), optionally of one source and matching a search.
    /// `total` counts every matching record; for searches, counting stops at 1,000 and
    /// `total_exact` is then false.
    ///
    /// Two ways to page: by `page` number, or by following `next_cursor` (pass it back as
    /// `cursor`, with the same filters). A page number costs its depth; a cursor costs the same
    /// at any depth and never skips or repeats a record while records are inserted or updated.
    #[oai(
        path = "/data",
        method = "get",
        operation_id = "listData",
        tag = "Tag::Data"
    )]
    // poem-openapi takes each query parameter as an argument of its own.
    #[allow(clippy::too_many_arguments)]
    async fn list_data(
        &self,
        /// Page number, from 1.
        #[oai(
            default = "default_page",
            validator(minimum(value = "1"), maximum(value = "1000000"))
        )]
        page: Query<u32>,
        /// Records per page.
        #[oai(
            default = "default_page_size",
            validator(minimum(value = "1"), maximum(value = "100"))
        )]
        page_size: Query<u32>,
        // Postgres text cannot hold NUL, so no record can match one: the patterns refuse it
        // with a 400 naming the parameter instead of letting the database refuse the query.
        /// Only records of this source (exact match).
        #[oai(validator(min_length = 1, max_length = 63, pattern = r"^[^\x00]*$"))]
        source: Query<Option<String>>,
        /// Case-insensitive substring of `name` or `description`; `%`, `_` and `\` match
        /// themselves.
        #[oai(validator(min_length = 1, max_length = 200, pattern = r"^[^\x00]*$"))]
        search: Query<Option<String>>,
        /// Only records changed at or after this instant (RFC 3339).
        updated_since: Query<Option<OffsetDateTime>>,
        /// Only records whose `value` is at least this.
        min_value: Query<Option<f64>>,
        /// Only records whose `value` is at most this.
        max_value: Query<Option<f64>>,
        /// The order: `id` (insertion, the default), `-updated_at` (last changed first),
        /// `value` or `-value`; ties in the other orders go by `id`.
        // No `default` attribute: poem-openapi would wrap the enum's `$ref` in an `allOf`.
        sort: Query<Option<Sort>>,
        /// The `ETag` of an earlier answer: 304 if the data has not changed since.
        #[oai(name = "If-None-Match")]
        if_none_match: Header<Option<String>>,
        /// The `next_cursor` of the previous page, to walk by cursor; it carries its order, so
        /// `page` and `sort` are then ignored.
        #[oai(validator(
            max_length = 52,
            pattern = r"^v1(\.[1-9][0-9]{0,8}\.(0|[1-9][0-9]{0,17})|u\.[1-9][0-9]{0,8}\.(0|[1-9][0-9]{0,17})\.(0|-?[1-9][0-9]{0,17})|[ad]\.[1-9][0-9]{0,8}\.(0|[1-9][0-9]{0,17})\.[0-9a-f]{16})$"
        ))]
        cursor: Query<Option<String>>,
    ) -> DataResponse {
        let start = match cursor.0.as_deref().map(Cursor::decode) {
            None => Start::Page(page.0),
            Some(Some(cursor)) => Start::After(cursor),
            // The spec's pattern lets only decodable cursors through.
            Some(None) => {
                return DataResponse::BadRequest(Json(Problem::invalid_parameter(
                    "cursor",
                    "is not a next_cursor this API returned",
                )));
            }
        };
        let query = DataQuery {
            start,
            page_size: page_size.0,
            filters: Filters {
                source: source.0,
                search: search.0,
                updated_since: updated_since.0,
                min_value: min_value.0,
                max_value: max_value.0,
            },
            sort: sort.0.unwrap_or_default(),
        };
        if if_none_match.0.is_some() {
            match data::version(&self.reader).await {
                Ok(version) => {
                    let tag = caching::data_tag(&version);
                    if caching::none_match(if_none_match.0.as_deref(), &tag) {
                        return DataResponse::NotModified(tag, caching::REVALIDATE.into());
                    }
                }
                Err(e) => {
                    let (status, problem) = problem::server_error(&e);
                    return DataResponse::ServerError(status, problem);
                }
            }
        }
        match data::list(&self.reader, &query).await {
            Ok((page, version)) => {
                let total = page.total;
                let tag = caching::data_tag(&version);
                DataResponse::Ok(Json(page), total, tag, caching::REVALIDATE.into())
            }
            Err(e) => {
                let (status, problem) = problem::server_error(&e);
                DataResponse::ServerError(status, problem)
            }
        }
    }

    /// Export records
    ///
    /// Every record matching the filters of `/data`, in its order, streamed in one consistent
    /// snapshot: `ndjson` (the default; one record per line, shaped like `/data`'s) or `csv`
    /// (a header line, then RFC 4180 lines). At most two exports run at once.
    #[oai(
        path = "/data/export",
        method = "get",
        operation_id = "exportData",
        tag = "Tag::Data"
    )]
    #[allow(clippy::too_many_arguments)] // one argument per query parameter
    async fn export_data(
        &self,
        /// `ndjson` (the default) or `csv`.
        format: Query<Option<Format>>,
        /// Only records of this source (exact match).
        #[oai(validator(min_length = 1, max_length = 63, pattern = r"^[^\x00]*$"))]
        source: Query<Option<String>>,
        /// Case-insensitive substring of `name` or `description`; `%`, `_` and `\` match
        /// themselves.
        #[oai(validator(min_length = 1, max_length = 200, pattern = r"^[^\x00]*$"))]
        search: Query<Option<String>>,
        /// Only records changed at or after this instant (RFC 3339).
        updated_since: Query<Option<OffsetDateTime>>,
        /// Only records whose `value` is at least this.
        min_value: Query<Option<f64>>,
        /// Only records whose `value` is at most this.
        max_value: Query<Option<f64>>,
        /// The order, as for `/data` (default `id`).
        sort: Query<Option<Sort>>,
    ) -> ExportResponse {
        let format = format.0.unwrap_or(Format::Ndjson);
        let query = DataQuery {
            start: Start::Page(1),
            page_size: 1,
            filters: Filters {
                source: source.0,
                search: search.0,
                updated_since: updated_since.0,
                min_value: min_value.0,
                max_value: max_value.0,
            },
            sort: sort.0.unwrap_or_default(),
        };
        match self.exports.start(&self.reader, &query, format).await {
            Ok(chunks) => {
                let body = Binary(Body::from_bytes_stream(chunks));
                let (body, file) = match format {
                    Format::Ndjson => (ExportBody::Ndjson(body), "records.ndjson"),
                    Format::Csv => (ExportBody::Csv(body), "records.csv"),
                };
                ExportResponse::Ok(
                    body,
                    format!("attachment; filename=\"{file}\""),
                    caching::NO_STORE.into(),
                )
            }
            Err(ExportError::Busy) => ExportResponse::Busy(
                Json(Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProblemCode::Unavailable,
                    "Exports busy",
                    "two exports are running already; try again shortly",
                )),
                5,
            ),
            Err(ExportError::Query(e)) => {
                let (status, problem) = problem::server_error(&e);
                ExportResponse::ServerError(status, problem)
            }
        }
    }

    /// Get one record
    ///
    /// The record `source_id` of `source`: its key, which a source's records keep across
    /// updates (unlike nothing else, `id` stays too).
    #[oai(
        path = "/data/:source/:source_id",
        method = "get",
        operation_id = "getRecord",
        tag = "Tag::Data"
    )]
    async fn get_record(
        &self,
        /// The record's source.
        #[oai(validator(min_length = 1, max_length = 63, pattern = r"^[^\x00]*$"))]
        source: Path<String>,
        /// The record's id within its source (URL-encoded: `/` is `%2F`).
        #[oai(validator(min_length = 1, max_length = 1000, pattern = r"^[^\x00]*$"))]
        source_id: Path<String>,
        /// The `ETag` of an earlier answer: 304 if the data has not changed since.
        #[oai(name = "If-None-Match")]
        if_none_match: Header<Option<String>>,
    ) -> RecordResponse {
        match data::get(&self.reader, &source.0, &source_id.0).await {
            Ok((Some(record), version)) => {
                let tag = caching::data_tag(&version);
                if caching::none_match(if_none_match.0.as_deref(), &tag) {
                    RecordResponse::NotModified(tag, caching::REVALIDATE.into())
                } else {
                    RecordResponse::Ok(Json(record), tag, caching::REVALIDATE.into())
                }
            }
            Ok((None, _)) => RecordResponse::NotFound(Json(Problem::new(
                StatusCode::NOT_FOUND,
                ProblemCode::NotFound,
                "Record not found",
                "the source has no record with that source_id",
            ))),
            Err(e) => {
                let (status, problem) = problem::server_error(&e);
                RecordResponse::ServerError(status, problem)
            }
        }
    }

    /// Ask for an action on a source
    ///
    /// `run`: ingest the source now, as its schedule would (an ingester takes the request);
    /// `replay`: re-normalize it from its raw rows to its current mapping (a normalizer does).
    /// Needs an API key marked `admin = true`; without keys configured, actions are refused.
    #[oai(
        path = "/sources/:source/:action",
        method = "post",
        operation_id = "askAction",
        tag = "Tag::Actions"
    )]
    async fn ask_action(
        &self,
        req: &poem::Request,
        /// The source, as the sources file names it.
        #[oai(validator(min_length = 1, max_length = 63, pattern = r"^[a-z0-9_-]+$"))]
        source: Path<String>,
        /// What to do.
        action: Path<ActionName>,
    ) -> ActionResponse {
        let caller = req.extensions().get::<crate::access::Caller>();
        match actions::ask(&self.reader, caller, &source.0, action.0).await {
            Ok(request) => ActionResponse::Accepted(Json(request)),
            Err(refused) => {
                let (status, problem) = refused.problem();
                if status.is_client_error() {
                    ActionResponse::ClientError(status, Json(problem))
                } else {
                    ActionResponse::ServerError(status, Json(problem))
                }
            }
        }
    }

    /// List runs
    ///
    /// Every ingest and normalize run, newest first, with its counts and, for a failed one,
    /// why. Page by `page` number or by following `next_cursor`.
    #[oai(
        path = "/runs",
        method = "get",
        operation_id = "listRuns",
        tag = "Tag::History"
    )]
    async fn list_runs(
        &self,
        /// Page number, from 1.
        #[oai(
            default = "default_page",
            validator(minimum(value = "1"), maximum(value = "1000000"))
        )]
        page: Query<u32>,
        /// Runs per page.
        #[oai(
            default = "default_page_size",
            validator(minimum(value = "1"), maximum(value = "100"))
        )]
        page_size: Query<u32>,
        /// Only runs of this source (exact match).
        #[oai(validator(min_length = 1, max_length = 63, pattern = r"^[^\x00]*$"))]
        source: Query<Option<String>>,
        /// Only runs of this service.
        service: Query<Option<Service>>,
        /// Only runs in this state.
        status: Query<Option<RunStatus>>,
        /// The `next_cursor` of the previous page; `page` is then ignored.
        #[oai(validator(
            max_length = 32,
            pattern = r"^v1\.[1-9][0-9]{0,8}\.(0|[1-9][0-9]{0,17})$"
        ))]
        cursor: Query<Option<String>>,
    ) -> RunsResponse {
        let start = match history_start(page.0, cursor.0.as_deref()) {
            Ok(start) => start,
            Err(problem) => return RunsResponse::BadRequest(Json(problem)),
        };
        let paging = Paging {
            start,
            page_size: page_size.0,
        };
        let filters = RunFilters {
            source: source.0,
            service: service.0,
            status: status.0,
        };
        match history::runs(&self.reader, paging, &filters).await {
            Ok(runs) => RunsResponse::Ok(Json(runs), caching::REVALIDATE.into()),
            Err(e) => {
                let (status, problem) = problem::server_error(&e);
                RunsResponse::ServerError(status, problem)
            }
        }
    }

    /// List rejected records
    ///
    /// Every record the ingester could not land or the normalizer could not normalize,
    /// newest first: why (`reason`), where it was (`position`), the run that rejected it and
    /// its bytes. Page by `page` number or by following `next_cursor`.
    #[oai(
        path = "/rejects",
        method = "get",
        operation_id = "listRejects",
        tag = "Tag::History"
    )]
    async fn list_rejects(
        &self,
        /// Page number, from 1.
        #[oai(
            default = "default_page",
            validator(minimum(value = "1"), maximum(value = "1000000"))
        )]
        page: Query<u32>,
        /// Rejected records per page.
        #[oai(
            default = "default_page_size",
            validator(minimum(value = "1"), maximum(value = "100"))
        )]
        page_size: Query<u32>,
        /// Only rejects of this source (exact match).
        #[oai(validator(min_length = 1, max_length = 63, pattern = r"^[^\x00]*$"))]
        source: Query<Option<String>>,
        /// Only rejects of this stage.
        stage: Query<Option<Stage>>,
        /// The `next_cursor` of the previous page; `page` is then ignored.
        #[oai(validator(
            max_length = 32,
            pattern = r"^v1\.[1-9][0-9]{0,8}\.(0|[1-9][0-9]{0,17})$"
        ))]
        cursor: Query<Option<String>>,
    ) -> RejectsResponse {
        let start = match history_start(page.0, cursor.0.as_deref()) {
            Ok(start) => start,
            Err(problem) => return RejectsResponse::BadRequest(Json(problem)),
        };
        let paging = Paging {
            start,
            page_size: page_size.0,
        };
        let filters = RejectFilters {
            source: source.0,
            stage: stage.0,
        };
        match history::rejects(&self.reader, paging, &filters).await {
            Ok(rejects) => RejectsResponse::Ok(Json(rejects), caching::REVALIDATE.into()),
            Err(e) => {
                let (status, problem) = problem::server_error(&e);
                RejectsResponse::ServerError(status, problem)
            }
        }
    }

    /// Pipeline statistics
    ///
    /// Per source: records, raw and rejected counts, value range, the normalizer's checkpoint
    /// and lag, and the latest run of each service. Computed at most once every
    /// `max_age_seconds`, so it is cheap to poll.
    #[oai(
        path = "/stats",
        method = "get",
        operation_id = "getStats",
        tag = "Tag::Stats"
    )]
    async fn stats(
        &self,
        /// The `ETag` of an earlier answer: 304 while its snapshot is still the latest.
        #[oai(name = "If-None-Match")]
        if_none_match: Header<Option<String>>,
    ) -> StatsResponse {
        match self.stats.get(&self.reader).await {
            Ok(stats) => {
                let tag = caching::stats_tag(stats.generated_at);
                let age = (OffsetDateTime::now_utc() - stats.generated_at)
                    .try_into()
                    .unwrap_or_default();
                let fresh_for = caching::max_age(
                    std::time::Duration::from_secs(stats.max_age_seconds.into()),
                    age,
                );
                if caching::none_match(if_none_match.0.as_deref(), &tag) {
                    StatsResponse::NotModified(tag, fresh_for)
                } else {
                    StatsResponse::Ok(Json(stats), tag, fresh_for)
                }
            }
            Err(e) => {
                let (status, problem) = problem::server_error(&e);
                StatsResponse::ServerError(status, problem)
            }
        }
    }

    /// Service and database health
    #[oai(
        path = "/health",
        method = "get",
        operation_id = "getHealth",
        tag = "Tag::Health"
    )]
    async fn health(&self) -> HealthResponse {
        self.ready().await
    }

    /// Readiness probe
    ///
    /// Like `/health`: 503 while the database does not answer.
    #[oai(
        path = "/health/ready",
        method = "get",
        operation_id = "getReadiness",
        tag = "Tag::Health"
    )]
    async fn ready(&self) -> HealthResponse {
        match etl_shared::admin::database_answers(self.reader.pool(), HEALTH_TIMEOUT).await {
            Ok(()) => HealthResponse::Ok(
                Json(Health {
                    status: HealthStatus::Ok,
                    database: DatabaseStatus::Up,
                }),
                caching::NO_STORE.into(),
            ),
            Err(why) => {
                tracing::warn!(%why, "health check: database unavailable");
                HealthResponse::Unavailable(
                    Json(Health {
                        status: HealthStatus::Unavailable,
                        database: DatabaseStatus::Down,
                    }),
                    caching::NO_STORE.into(),
                )
            }
        }
    }

    /// Liveness probe
    ///
    /// 200 while the process serves requests; does not touch the database.
    #[oai(
        path = "/health/live",
        method = "get",
        operation_id = "getLiveness",
        tag = "Tag::Health"
    )]
    async fn live(&self) -> LiveResponse {
        LiveResponse::Ok(
            Json(Liveness {
                status: LiveStatus::Ok,
            }),
            caching::NO_STORE.into(),
        )
    }
}

fn default_page() -> u32 {
    1
}

fn default_page_size() -> u32 {
    10
}
