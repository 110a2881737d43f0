//! HTTP GET with the retry policy every source shares: exponential backoff with jitter on
//! connection errors, timeouts, 5xx, 429 and unreadable bodies, honouring `Retry-After`, and
//! stopping at once on shutdown.

use std::future::Future;
use std::time::{Duration, SystemTime};

use etl_shared::sources::{HttpOptions, Source};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use reqwest::{Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::secrets::{self, Secrets};
use crate::SafeUrl;

/// Redirects followed for one request before it fails (a loop, most likely).
const MAX_REDIRECTS: u32 = 10;

/// How much of an error response's body is read, and how much of it an error quotes.
const ERROR_BODY_BYTES: usize = 4096;
const ERROR_BODY_CHARS: usize = 160;

/// Why a fetch failed. `retryable` says whether trying again could help.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// `body` is the start of the response's body, already cut short and scrubbed of secrets.
    #[error("HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        body: String,
    },
    /// A next-page link or a redirect leads to another origin and `http.follow_cross_origin`
    /// is off.
    #[error(
        "refused to follow {to}: its origin is not that of the source's url \
         (http.follow_cross_origin = false)"
    )]
    CrossOrigin { to: SafeUrl },
    #[error("{0}")]
    Redirect(String),
    #[error("{0}")]
    Transport(String),
    #[error("{0}")]
    Body(String),
    #[error("response body exceeds the limit of {limit} bytes (http.max_page_bytes)")]
    TooLarge { limit: u64 },
    #[error("the response took longer than {limit:?}, body included (http.max_response_time)")]
    TooSlow { limit: Duration },
    #[error("interrupted by shutdown")]
    Shutdown,
    /// The temporary file for a large body could not be written (a full or read-only `TMPDIR`).
    #[error("could not spool the body to a temporary file (TMPDIR): {0}")]
    Spool(String),
    /// A conditional GET answered 304: the source has not changed since the last run.
    #[error("not modified since the last successful run (HTTP 304)")]
    NotModified,
}

impl FetchError {
    fn retryable(&self) -> bool {
        match self {
            FetchError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            FetchError::Transport(_) | FetchError::Body(_) => true,
            // Retrying a source that trickles would multiply the time bound by the attempts.
            FetchError::TooLarge { .. }
            | FetchError::TooSlow { .. }
            | FetchError::Shutdown
            | FetchError::Spool(_)
            | FetchError::NotModified
            | FetchError::CrossOrigin { .. }
            | FetchError::Redirect(_) => false,
        }
    }

    pub fn from_reqwest(e: reqwest::Error) -> Self {
        // The URL is dropped (whoever reports this shows it as a `SafeUrl`); the chain holds
        // the useful part ("connection refused", "operation timed out").
        let e = e.without_url();
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(inner) = source {
            message.push_str(": ");
            message.push_str(&inner.to_string());
            source = inner.source();
        }
        FetchError::Transport(message)
    }
}

/// A failure after all attempts, with the URL (shown without secrets) and how many tries it took.
#[derive(Debug, thiserror::Error)]
#[error(
    "GET {} failed after {attempts} attempt(s): {last}",
    SafeUrl::from(url)
)]
pub struct GaveUp {
    pub url: Url,
    pub attempts: u32,
    #[source]
    pub last: FetchError,
}

/// Fetches for one source: its client (timeouts), headers (secrets) and retry policy.
/// Redirects are followed here rather than by reqwest, which keeps custom headers (an
/// `X-Api-Key`) on a redirect to another host: the headers go only to the origin of the
/// source's `url`.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    headers: HeaderMap,
    /// The origin of the source's `url`: the only one its headers are sent to.
    origin: url::Origin,
    secrets: Secrets,
    options: HttpOptions,
    shutdown: CancellationToken,
    /// The URL fetched conditionally, with the validators the last successful run got for it.
    conditional: Option<(Url, Validators)>,
    /// The validators of this run's response to that URL.
    got: std::sync::Arc<std::sync::Mutex<Option<Validators>>>,
}

/// A response's `ETag` and `Last-Modified`, sent back as `If-None-Match` and
/// `If-Modified-Since` so an unchanged source can answer 304.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl Validators {
    fn of(response: &Response) -> Self {
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            etag: header(reqwest::header::ETAG),
            last_modified: header(reqwest::header::LAST_MODIFIED),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none()
    }
}

impl Fetcher {
    /// `headers` are the resolved secret values (see [`resolve_headers`]); `secrets` what
    /// errors are scrubbed of.
    pub fn new(
        source: &Source,
        headers: HeaderMap,
        secrets: Secrets,
        shutdown: CancellationToken,
    ) -> Result<Self, ClientError> {
        let options = source.http.clone();
        let client = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .user_agent(concat!("etl-ingester/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError(etl_shared::error_chain(&e)))?;
        let origin = Url::parse(&source.url)
            .map_err(|e| ClientError(format!("bad url: {e}")))?
            .origin();
        Ok(Self {
            client,
            headers,
            origin,
            secrets,
            options,
            shutdown,
            conditional: None,
            got: Default::default(),
        })
    }

    /// GETs of `url` become conditional on `validators` (the last successful run's; none on a
    /// first run), and this run's validators for it are kept ([`validators`](Self::validators)).
    pub fn conditional(mut self, url: Url, validators: Validators) -> Self {
        self.conditional = Some((url, validators));
        self
    }

    /// The validators of this run's response to the conditional URL, if it had any.
    pub fn validators(&self) -> Option<Validators> {
        self.got.lock().expect("never poisoned").clone()
    }

    /// GETs `url` until `read` accepts a successful response or the attempts run out. `read`
    /// consumes the body; its errors are retried like transport errors (a truncated body is
    /// usually a dropped connection).
    pub async fn get<T, F, Fut>(&self, url: &Url, read: F) -> Result<T, GaveUp>
    where
        F: Fn(Response) -> Fut,
        Fut: Future<Output = Result<T, FetchError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let limit = self.options.max_response_time;
            let outcome = tokio::select! {
                outcome = tokio::time::timeout(limit, self.attempt(url, &read)) => {
                    outcome.unwrap_or(Err(FetchError::TooSlow { limit }))
                }
                _ = self.shutdown.cancelled() => Err(FetchError::Shutdown),
            };
            let error = match outcome {
                Ok(value) => return Ok(value),
                Err(e) => self.scrubbed(e),
            };
            if !error.retryable() || attempt >= self.options.attempts {
                return Err(GaveUp {
                    url: url.clone(),
                    attempts: attempt,
                    last: error,
                });
            }
            let wait = self.backoff(attempt, &error);
            tracing::warn!(url = %SafeUrl::from(url), attempt, error = %error, wait_ms = wait.as_millis() as u64, "retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => {
                    return Err(GaveUp { url: url.clone(), attempts: attempt, last: FetchError::Shutdown });
                }
            }
        }
    }

    async fn attempt<T, F, Fut>(&self, url: &Url, read: &F) -> Result<T, FetchError>
    where
        F: Fn(Response) -> Fut,
        Fut: Future<Output = Result<T, FetchError>>,
    {
        let conditional = self.conditional.as_ref().filter(|(at, _)| at == url);
        let mut at = url.clone();
        let mut redirects = 0;
        let response = loop {
            if at.origin() != self.origin && !self.options.follow_cross_origin {
                return Err(FetchError::CrossOrigin {
                    to: SafeUrl::from(&at),
                });
            }
            let mut request = self.client.get(at.clone());
            if at.origin() == self.origin {
                request = request.headers(self.headers.clone());
            }
            if let Some((_, validators)) = conditional {
                if let Some(etag) = &validators.etag {
                    request = request.header(reqwest::header::IF_NONE_MATCH, etag);
                }
                if let Some(since) = &validators.last_modified {
                    request = request.header(reqwest::header::IF_MODIFIED_SINCE, since);
                }
            }
            let response = request.send().await.map_err(FetchError::from_reqwest)?;
            let Some(location) = redirect_target(&response) else {
                break response;
            };
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(FetchError::Redirect(format!(
                    "stopped after {MAX_REDIRECTS} redirects (a redirect loop?)"
                )));
            }
            at = at
                .join(&location)
                .ok()
                .filter(|next| matches!(next.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    FetchError::Redirect(format!(
                        "HTTP {} redirects to {:?}, which is not an http(s) URL",
                        response.status(),
                        secrets::snippet(&location, ERROR_BODY_CHARS)
                    ))
                })?;
        };
        let status = response.status();
        if conditional.is_some() {
            if status == StatusCode::NOT_MODIFIED {
                return Err(FetchError::NotModified);
            }
            *self.got.lock().expect("never poisoned") = Some(Validators::of(&response));
        }
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = error_body(response).await;
            return Err(FetchError::Status {
                status,
                retry_after,
                body,
            });
        }
        read(response).await
    }

    /// `error` without the source's secrets (an upstream body may echo them).
    fn scrubbed(&self, error: FetchError) -> FetchError {
        match error {
            FetchError::Status {
                status,
                retry_after,
                body,
            } => FetchError::Status {
                status,
                retry_after,
                body: self.secrets.scrub(&body),
            },
            FetchError::Transport(m) => FetchError::Transport(self.secrets.scrub(&m)),
            FetchError::Body(m) => FetchError::Body(self.secrets.scrub(&m)),
            FetchError::Redirect(m) => FetchError::Redirect(self.secrets.scrub(&m)),
            other => other,
        }
    }

    /// Exponential from `initial_backoff`, half fixed and half random (so replicas retrying
    /// together spread out), capped at `max_backoff`; a server's `Retry-After` wins, within the
    /// same cap.
    fn backoff(&self, attempt: u32, error: &FetchError) -> Duration {
        let cap = self.options.max_backoff;
        if let FetchError::Status {
            retry_after: Some(wait),
            ..
        } = error
        {
            return (*wait).min(cap);
        }
        let exponential = self
            .options
            .initial_backoff
            .saturating_mul(1 << (attempt - 1).min(20))
            .min(cap);
        let half = exponential / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Whether shutdown was requested: streaming loops stop at the next record.
    pub fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    pub fn max_page_bytes(&self) -> u64 {
        self.options.max_page_bytes
    }

    pub fn max_record_bytes(&self) -> u64 {
        self.options.max_record_bytes
    }

    pub fn max_file_bytes(&self) -> u64 {
        self.options.max_file_bytes
    }

    /// For bodies streamed after [`get`](Self::get) returns (CSV files).
    pub fn max_response_time(&self) -> Duration {
        self.options.max_response_time
    }
}

/// The client for a source's requests could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(String);

/// Where a redirect response sends the client: `Location` of a 301, 302, 303, 307 or 308.
fn redirect_target(response: &Response) -> Option<String> {
    let redirects = matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308);
    if !redirects {
        return None;
    }
    let location = response.headers().get(LOCATION)?;
    Some(String::from_utf8_lossy(location.as_bytes()).into_owned())
}

/// The start of an error response's body, as an error may quote it: at most
/// `ERROR_BODY_BYTES` are read (a hostile body may be endless), and a short, single-line
/// snippet of them kept.
async fn error_body(mut response: Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(ERROR_BODY_BYTES);
    secrets::snippet(&String::from_utf8_lossy(&bytes), ERROR_BODY_CHARS)
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A response body kept for reading again: in memory when small, else spooled to an unnamed
/// temporary file (in `TMPDIR`, gone when dropped), so that a large page costs disk, not
/// memory, while it is checked and then read item by item.
pub enum Body {
    Memory(Vec<u8>),
    Spooled { file: tokio::fs::File, len: u64 },
}

impl Body {
    pub fn bytes(&self) -> u64 {
        match self {
            Body::Memory(bytes) => bytes.len() as u64,
            Body::Spooled { len, .. } => *len,
        }
    }
}

/// Bodies larger than this are spooled to a temporary file.
pub const SPOOL_BODY_BYTES: u64 = 1024 * 1024;

/// Reads the whole body, failing once it passes `limit` bytes.
pub async fn read_body_limited(mut response: Response, limit: u64) -> Result<Body, FetchError> {
    let declared = response.content_length();
    if declared.is_some_and(|n| n > limit) {
        return Err(FetchError::TooLarge { limit });
    }
    let mut memory = Vec::with_capacity(declared.unwrap_or(0).min(SPOOL_BODY_BYTES) as usize);
    let mut spool: Option<(tokio::fs::File, u64)> = None;
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        FetchError::Body(format!(
            "reading the body failed: {}",
            FetchError::from_reqwest(e)
        ))
    })? {
        let read = spool.as_ref().map_or(memory.len() as u64, |(_, n)| *n) + chunk.len() as u64;
        if read > limit {
            return Err(FetchError::TooLarge { limit });
        }
        match &mut spool {
            Some((file, len)) => {
                file.write_all(&chunk).await.map_err(spool_error)?;
                *len = read;
            }
            None if read > SPOOL_BODY_BYTES => {
                let mut file =
                    tokio::fs::File::from_std(tempfile::tempfile().map_err(spool_error)?);
                file.write_all(&memory).await.map_err(spool_error)?;
                file.write_all(&chunk).await.map_err(spool_error)?;
                memory = Vec::new();
                spool = Some((file, read));
            }
            None => memory.extend_from_slice(&chunk),
        }
    }
    Ok(match spool {
        Some((mut file, len)) => {
            file.flush().await.map_err(spool_error)?;
            Body::Spooled { file, len }
        }
        None => Body::Memory(memory),
    })
}

fn spool_error(e: std::io::Error) -> FetchError {
    FetchError::Spool(e.to_string())
}

/// A header value resolved from the environment, or the variable that is missing.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("source `{source_name}`: header {header} needs environment variable {var}, which is not set")]
    Missing {
        source_name: String,
        header: String,
        var: String,
    },
    #[error("source `{source_name}`: header {header}: {reason}")]
    Invalid {
        source_name: String,
        header: String,
        reason: String,
    },
}

/// Builds a source's headers from the environment, marking every value sensitive so it never
/// shows in debug output.
pub fn resolve_headers(
    source: &Source,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<HeaderMap, HeaderError> {
    let mut headers = HeaderMap::new();
    for (name, from) in &source.headers {
        let invalid = |reason: String| HeaderError::Invalid {
            source_name: source.name.clone(),
            header: name.clone(),
            reason,
        };
        let secret =
            lookup(&from.env)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| HeaderError::Missing {
                    source_name: source.name.clone(),
                    header: name.clone(),
                    var: from.env.clone(),
                })?;
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid("not a valid header name".into()))?;
        let mut value =
            HeaderValue::from_str(&format!("{}{secret}", from.prefix)).map_err(|_| {
                invalid(format!(
                    "the value of {} is not a valid header value",
                    from.env
                ))
            })?;
        value.set_sensitive(true);
        headers.insert(header, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        let parsed = parse_retry_after(&in_a_minute).unwrap();
        assert!(
            parsed > Duration::from_secs(55) && parsed <= Duration::from_secs(60),
            "{parsed:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
