//! Why an ingest run failed. Each variant carries its context (URL, page, line) as fields, so
//! the message in `etl_runs.error_message` is built in one place and callers can match on the
//! kind of failure. The source's name is not repeated here: the run row and the span carry it.

use std::fmt;
use std::io;

use etl_shared::runs::RunError;
use url::Url;

use crate::http::GaveUp;
use crate::land::LandError;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("unknown source `{0}`")]
    UnknownSource(String),
    #[error(transparent)]
    Fetch(Box<GaveUp>),
    #[error(transparent)]
    Land(#[from] LandError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("could not build the HTTP client: {0}")]
    Client(String),
    #[error(
        "the database restarted during the run and may have lost rows it had acknowledged; \
         the run is repeated to land them again"
    )]
    DatabaseRestarted,
    #[error("run {holder} is still ingesting this source after a wait of {waited:?}")]
    Busy {
        holder: i64,
        waited: std::time::Duration,
    },
    #[error(transparent)]
    Claim(#[from] crate::lease::ClaimError),
}

impl From<GaveUp> for IngestError {
    fn from(e: GaveUp) -> Self {
        // Boxed: a URL and a response body make this variant several times larger than the rest.
        IngestError::Fetch(Box::new(e))
    }
}

/// The source's data (or its configuration against it) cannot be read to the end.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("bad url: {0}")]
    BadUrl(#[from] url::ParseError),
    #[error(
        "stopped after {max_pages} pages (rest.max_pages) with more still announced; \
         the API may be looping"
    )]
    TooManyPages { max_pages: u32 },
    #[error("pagination loop: page {page} points back to {url}, which was already fetched")]
    PaginationLoop { page: u32, url: SafeUrl },
    /// A page arrived but its items or its next link cannot be found where configured.
    #[error("page {page} ({url}): {why}")]
    Page {
        page: u32,
        url: SafeUrl,
        why: String,
    },
    #[error("the header is over the limit of {limit} bytes (http.max_record_bytes)")]
    HeaderTooLarge { limit: u64 },
    #[error("the header's column {column} is not valid UTF-8")]
    HeaderNotUtf8 { column: usize },
    #[error("the header names column {name:?} twice; rows could not be mapped unambiguously")]
    DuplicateColumn { name: String },
    #[error("the header has no column {column:?} ({field}); it has: {}", columns.join(", "))]
    MissingColumn {
        column: String,
        field: &'static str,
        columns: Vec<String>,
    },
    #[error("reading {url} failed: {error}")]
    Read { url: SafeUrl, error: io::Error },
    #[error("reading CSV from {url} failed{}: {error}", near_line(*line))]
    Csv {
        url: SafeUrl,
        line: Option<u64>,
        error: csv_async::Error,
    },
    /// Rows queued since the last batch are dropped, not half-written; the next run reads again.
    #[error("interrupted by shutdown{}", at_line(*line))]
    Interrupted { line: Option<u64> },
}

fn near_line(line: Option<u64>) -> String {
    line.map(|l| format!(" near line {l}")).unwrap_or_default()
}

fn at_line(line: Option<u64>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// A URL as errors, logs and `etl_runs` may show it: no user or password, no fragment, and
/// every query value masked, since API keys often travel there. Query names stay, so the
/// message still says which parameters were sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeUrl(Url);

impl From<&Url> for SafeUrl {
    fn from(url: &Url) -> Self {
        Self(url.clone())
    }
}

impl fmt::Display for SafeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        // Both fail only for URLs that cannot have credentials (e.g. `data:`), which is fine.
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        shown.set_fragment(None);
        let query = shown.query().map(|query| {
            query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) => format!("{name}=***"),
                    None if pair.is_empty() => String::new(),
                    None => "***".to_owned(),
                })
                .collect::<Vec<_>>()
                .join("&")
        });
        shown.set_query(None);
        match query {
            Some(query) => write!(f, "{shown}?{query}"),
            None => write!(f, "{shown}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SafeUrl;
    use url::Url;

    fn shown(url: &str) -> String {
        SafeUrl::from(&Url::parse(url).unwrap()).to_string()
    }

    #[test]
    fn credentials_fragments_and_query_values_are_not_shown() {
        assert_eq!(
            shown("https://user:hunter2@api.example/items?api_key=s3cret&page=2#frag"),
            "https://api.example/items?api_key=***&page=***"
        );
        assert_eq!(
            shown("http://127.0.0.1:8080/p?token"),
            "http://127.0.0.1:8080/p?***"
        );
    }

    #[test]
    fn a_url_without_secrets_is_shown_as_it_is() {
        assert_eq!(
            shown("http://127.0.0.1:8080/data/page2.json"),
            "http://127.0.0.1:8080/data/page2.json"
        );
    }
}
