//! RFC 9457 problem details: the one error shape of every HTTP port (the query API and the
//! services' admin ports), with a stable machine-readable `code`, so clients branch on `code`
//! rather than on English text.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::error::ParseParamError;
use poem_openapi::Object;

/// An error response (`application/problem+json`, RFC 9457).
#[derive(Debug, Clone, Object)]
#[oai(rename = "Problem", example)]
pub struct Problem {
    /// A URI naming the kind of problem: `urn:etl:problem:<code>`.
    #[oai(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    pub code: ProblemCode,
    /// The offending query or path parameter, for `invalid_parameter`.
    #[oai(skip_serializing_if_is_none)]
    pub parameter: Option<String>,
}

impl poem_openapi::types::Example for Problem {
    fn example() -> Self {
        Problem::invalid_parameter(
            "page_size",
            "verification failed. maximum(100, exclusive: false)",
        )
    }
}

/// Stable machine-readable code of a problem: clients branch on it rather than on `title`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poem_openapi::Enum)]
#[oai(rename_all = "snake_case")]
pub enum ProblemCode {
    InvalidParameter,
    InvalidRequest,
    NotFound,
    MethodNotAllowed,
    Timeout,
    Unavailable,
    Internal,
    Unauthorized,
    Forbidden,
    RateLimited,
}

impl ProblemCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemCode::InvalidParameter => "invalid_parameter",
            ProblemCode::InvalidRequest => "invalid_request",
            ProblemCode::NotFound => "not_found",
            ProblemCode::MethodNotAllowed => "method_not_allowed",
            ProblemCode::Timeout => "timeout",
            ProblemCode::Unavailable => "unavailable",
            ProblemCode::Internal => "internal",
            ProblemCode::Unauthorized => "unauthorized",
            ProblemCode::Forbidden => "forbidden",
            ProblemCode::RateLimited => "rate_limited",
        }
    }
}

impl Problem {
    pub fn new(
        status: StatusCode,
        code: ProblemCode,
        title: &str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: format!("urn:etl:problem:{}", code.as_str()),
            title: title.into(),
            status: status.as_u16(),
            detail: detail.into(),
            code,
            parameter: None,
        }
    }

    /// A 400 for parameter `name` (of the query or the path), saying why.
    pub fn invalid_parameter(name: &str, reason: &str) -> Self {
        Self {
            parameter: Some(name.to_owned()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                ProblemCode::InvalidParameter,
                "Invalid parameter",
                format!("parameter `{name}`: {reason}"),
            )
        }
    }

    /// A 400 from a parameter that failed to parse or validate, naming it.
    pub fn from_bad_request(err: poem::Error) -> Self {
        match err.downcast_ref::<ParseParamError>() {
            Some(e) => Self::invalid_parameter(e.name, &e.reason),
            None => Self::new(
                StatusCode::BAD_REQUEST,
                ProblemCode::InvalidRequest,
                "Invalid request",
                err.to_string(),
            ),
        }
    }

    /// Any error that reached the edge of the service (unknown route, wrong method, …).
    pub fn from_error(err: &poem::Error) -> Self {
        let status = err.status();
        match status {
            StatusCode::NOT_FOUND => Self::new(
                status,
                ProblemCode::NotFound,
                "Not found",
                "no such resource; see /openapi.json for the API",
            ),
            StatusCode::METHOD_NOT_ALLOWED => Self::new(
                status,
                ProblemCode::MethodNotAllowed,
                "Method not allowed",
                "this resource does not support that method",
            ),
            s if s.is_client_error() => Self::new(
                s,
                ProblemCode::InvalidRequest,
                "Invalid request",
                err.to_string(),
            ),
            s => {
                tracing::error!(error = %err, "request failed");
                Self::new(
                    s,
                    ProblemCode::Internal,
                    "Internal error",
                    "the request could not be completed",
                )
            }
        }
    }

    pub fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        poem::web::Json(poem_openapi::types::ToJSON::to_json(&self))
            .with_status(status)
            .with_content_type("application/problem+json")
            .into_response()
    }
}
