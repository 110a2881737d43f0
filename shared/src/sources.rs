//! The sources file: which sources exist, how to fetch each, and how its records map onto
//! `normalized_data`. The ingester and the normalizer read the same file (a ConfigMap in
//! Kubernetes), so both always agree on names and mappings. Secrets never live here: a header
//! names the environment variable that holds its value.
//!
//! ```toml
//! [[source]]
//! name = "products"
//! kind = "rest"
//! url = "https://api.example.com/products"
//! schedule = "5m"
//! headers.Authorization = { env = "PRODUCTS_TOKEN", prefix = "Bearer " }
//! mapping = { source_id = "/id", name = "/title", value = "/price", description = "/summary" }
//! rest = { items = "/data", pagination = { style = "page", param = "page", size_param = "per_page", size = 100 } }
//!
//! [[source]]
//! name = "sensors"
//! kind = "csv"
//! url = "https://example.com/sensors.csv.gz"
//! mapping = { source_id = "sensor_id", name = "label", value = "reading" }
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    #[error("cannot read sources file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sources file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("sources file {path}: source `{source_name}`: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        source_name: String,
        field: String,
        message: String,
    },
}

/// Which raw table a source lands in, and how it is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Rest,
    Csv,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Rest => "rest",
            SourceKind::Csv => "csv",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesFile {
    #[serde(default)]
    source: Vec<Source>,
}

/// One source. Field docs are the user documentation of the file format.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Unique, 1–63 characters of `a-z 0-9 _ -`: it keys raw and normalized rows and metrics.
    pub name: String,
    /// `rest` (paginated JSON) or `csv` (a CSV file, optionally gzipped).
    pub kind: SourceKind,
    /// `http` or `https` URL: the first page of a REST source, or the CSV file.
    pub url: String,
    /// How often the ingester daemon runs this source (`30s`, `5m`, `1h`); default `15m`.
    #[serde(default = "default_schedule", deserialize_with = "human_duration")]
    pub schedule: Duration,
    /// Request headers whose values come from environment variables (API keys, tokens).
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderValueFrom>,
    /// Where each normalized field comes from: JSON pointers (`/id`) for REST items, column
    /// names for CSV.
    pub mapping: Mapping,
    /// What a record that disappears upstream becomes: `keep` (the default: it stays), or
    /// `snapshot` for a source whose every run is the whole of it (a CSV file, a REST
    /// collection): after a successful run, the rows it did not see are deleted.
    #[serde(default)]
    pub deletes: Deletes,
    /// Timeouts and retries for this source's HTTP requests.
    #[serde(default)]
    pub http: HttpOptions,
    /// REST-only options (required shape of the response and pagination).
    #[serde(default)]
    pub rest: Option<RestOptions>,
    /// CSV-only options (dialect).
    #[serde(default)]
    pub csv: Option<CsvOptions>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueFrom {
    /// The environment variable holding the value; the ingester fails at start if it is unset.
    pub env: String,
    /// Put before the value, e.g. `Bearer `.
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// What identifies a record within its source: one column or pointer, a list of them
    /// (a composite key), or `{ row = true }` (its position).
    pub source_id: SourceKey,
    pub name: String,
    pub value: String,
    #[serde(default)]
    pub description: Option<String>,
}

impl Mapping {
    /// Every column or pointer the mapping reads, with the field that names it
    /// (`mapping.source_id` once per key part; `mapping.description` only when set).
    pub fn targets(&self) -> impl Iterator<Item = (&'static str, &String)> {
        self.source_id
            .fields()
            .iter()
            .map(|part| ("mapping.source_id", part))
            .chain(
                [
                    ("mapping.name", Some(&self.name)),
                    ("mapping.value", Some(&self.value)),
                    ("mapping.description", self.description.as_ref()),
                ]
                .into_iter()
                .filter_map(|(field, target)| Some((field, target?))),
            )
    }
}

/// `deletes`: what becomes of records that disappear upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deletes {
    /// They stay, as last seen.
    #[default]
    Keep,
    /// Each successful run is the whole source: raw rows it did not see are tombstoned and
    /// their normalized rows withdrawn. A failed or stopped run deletes nothing.
    Snapshot,
}

/// `mapping.source_id`: how a record's id within its source is made.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SourceKeyToml")]
pub enum SourceKey {
    /// The values of these columns (CSV) or JSON pointers (REST), in order: one is the id as
    /// it is; two or more are joined by [`SourceKey::compose`].
    Fields(Vec<String>),
    /// The record's position in its source, from 1: the n-th row after the header, the n-th
    /// item of the run. Positional: a file whose rows move re-keys them.
    Row,
}

/// The ways `mapping.source_id` may be written in TOML.
#[derive(Deserialize)]
#[serde(untagged)]
enum SourceKeyToml {
    One(String),
    Many(Vec<String>),
    Position { row: bool },
}

impl TryFrom<SourceKeyToml> for SourceKey {
    type Error = String;

    fn try_from(toml: SourceKeyToml) -> Result<Self, String> {
        match toml {
            SourceKeyToml::One(field) => Ok(Self::Fields(vec![field])),
            SourceKeyToml::Many(fields) if fields.is_empty() => {
                Err("a list of key parts must name at least one".into())
            }
            SourceKeyToml::Many(fields) => Ok(Self::Fields(fields)),
            SourceKeyToml::Position { row: true } => Ok(Self::Row),
            SourceKeyToml::Position { row: false } => {
                Err("`{ row = false }`: name the key's columns or pointers instead".into())
            }
        }
    }
}

impl SourceKey {
    /// The separator of a composite key's parts.
    pub const SEPARATOR: char = '|';

    /// A composite id from its parts: joined with `|`, and within each part `\` and `|`
    /// written `\\` and `\|`, so that no two lists of parts give the same id
    /// (`["a|b", "c"]` is `a\|b|c`, `["a", "b|c"]` is `a|b\|c`). One part is the id as it is.
    pub fn compose<S: AsRef<str>>(parts: &[S]) -> String {
        if let [one] = parts {
            return one.as_ref().to_owned();
        }
        let mut id = String::with_capacity(parts.iter().map(|p| p.as_ref().len() + 1).sum());
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                id.push(Self::SEPARATOR);
            }
            for c in part.as_ref().chars() {
                if c == '\\' || c == Self::SEPARATOR {
                    id.push('\\');
                }
                id.push(c);
            }
        }
        id
    }

    /// The columns or pointers the key reads (none for a positional key).
    pub fn fields(&self) -> &[String] {
        match self {
            Self::Fields(fields) => fields,
            Self::Row => &[],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    /// Time allowed to open the connection (TCP and TLS).
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "human_duration"
    )]
    pub connect_timeout: Duration,
    /// Longest silence while waiting for response bytes; a stalled source fails instead of hanging.
    #[serde(default = "default_read_timeout", deserialize_with = "human_duration")]
    pub read_timeout: Duration,
    /// Tries per request (the first included) on connection errors, 5xx, 429 and bad bodies.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// First backoff; doubles per retry, with jitter, up to `max_backoff`.
    #[serde(
        default = "default_initial_backoff",
        deserialize_with = "human_duration"
    )]
    pub initial_backoff: Duration,
    /// Cap on one wait, including a server's `Retry-After`.
    #[serde(default = "default_max_backoff", deserialize_with = "human_duration")]
    pub max_backoff: Duration,
    /// Largest REST page body accepted, in bytes (a page over 1 MiB is spooled to a temporary
    /// file while it is read, so this bounds disk, not memory).
    #[serde(default = "default_max_page_bytes")]
    pub max_page_bytes: u64,
    /// Largest CSV file accepted, in bytes after decompression: a run reading more stops and
    /// fails, so a runaway or hostile source cannot fill the database.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Largest single record (a CSV row, a REST item), in bytes: a larger one is rejected with
    /// its position and the first bytes it had, so no record can take the process's memory.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: u64,
    /// Longest one response may take, body included (for a CSV, the whole file): a source that
    /// trickles bytes, never silent long enough for `read_timeout`, still ends.
    #[serde(
        default = "default_max_response_time",
        deserialize_with = "human_duration"
    )]
    pub max_response_time: Duration,
    /// Whether a next-page link or a redirect to another origin (scheme, host, port) than
    /// `url`'s is followed. Either way the source's headers (its secrets) go only to `url`'s
    /// origin; `false` refuses such a link instead, for a source that must never be read from
    /// anywhere else. The default follows: APIs hand out CDN and pre-signed download links, and
    /// what goes there carries nothing of ours.
    #[serde(default = "default_follow_cross_origin")]
    pub follow_cross_origin: bool,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            read_timeout: default_read_timeout(),
            attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            max_page_bytes: default_max_page_bytes(),
            max_file_bytes: default_max_file_bytes(),
            max_record_bytes: default_max_record_bytes(),
            max_response_time: default_max_response_time(),
            follow_cross_origin: default_follow_cross_origin(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestOptions {
    /// JSON pointer to the array of items in each page; empty when the body itself is the array.
    #[serde(default)]
    pub items: String,
    #[serde(default)]
    pub pagination: Pagination,
    /// Stop (and fail the run) after this many pages, so a looping API cannot run forever.
    #[serde(default = "default_max_pages")]
    pub max_pages: u32,
    /// Fetch only what changed since the last successful run (see [`Incremental`]).
    #[serde(default)]
    pub incremental: Option<Incremental>,
}

/// `rest.incremental`: the largest value at `pointer` among the items of the last successful
/// run, less `lag`, is sent as query parameter `param` (`?updated_since=…`). Values are RFC 3339
/// timestamps (the lag is subtracted as a duration) or numbers (epoch seconds, less the lag's
/// seconds); others compare as text and are sent as they are.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incremental {
    pub param: String,
    pub pointer: String,
    /// Re-read this far back, for records the API made visible late (default `0s`).
    #[serde(default, deserialize_with = "human_duration")]
    pub lag: Duration,
}

impl Default for RestOptions {
    fn default() -> Self {
        Self {
            items: String::new(),
            pagination: Pagination::default(),
            max_pages: default_max_pages(),
            incremental: None,
        }
    }
}

/// How to get from one page to the next. Page and offset styles stop at the first page with
/// fewer items than `size`/`limit` (or none); the others stop when there is no next link.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "style", rename_all = "snake_case", deny_unknown_fields)]
pub enum Pagination {
    /// One request, no pagination.
    #[default]
    None,
    /// `?page=1&per_page=100`, `page=2`, …
    Page {
        #[serde(default = "default_page_param")]
        param: String,
        #[serde(default = "one")]
        start: u64,
        /// Query parameter for the page size; omitted from the request when unset.
        #[serde(default)]
        size_param: Option<String>,
        size: u64,
    },
    /// `?offset=0&limit=100`, `offset=100`, …
    Offset {
        #[serde(default = "default_offset_param")]
        offset_param: String,
        #[serde(default = "default_limit_param")]
        limit_param: String,
        limit: u64,
    },
    /// The body holds the next page's URL (absolute or relative) at a JSON pointer.
    NextUrl { pointer: String },
    /// RFC 8288 `Link: <…>; rel="next"` response header.
    LinkHeader,
    /// The body holds an opaque token at `pointer`, sent back as query parameter `param`.
    Cursor { param: String, pointer: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// One ASCII character; default `,`.
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// One ASCII character; default `"`.
    #[serde(default = "default_quote")]
    pub quote: char,
    /// Decompress gzip even without `Content-Encoding: gzip`. Default: when the URL path ends
    /// in `.gz`.
    #[serde(default)]
    pub gzip: Option<bool>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            delimiter: default_delimiter(),
            quote: default_quote(),
            gzip: None,
        }
    }
}

impl Source {
    pub fn rest_options(&self) -> RestOptions {
        self.rest.clone().unwrap_or_default()
    }

    pub fn csv_options(&self) -> CsvOptions {
        self.csv.clone().unwrap_or_default()
    }
}

/// All sources, validated: names unique and well-formed, URLs parse, mappings fit the kind.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub path: PathBuf,
    pub sources: Vec<Source>,
}

impl Sources {
    pub const FILE_VAR: &'static str = "SOURCES_FILE";

    pub fn load(path: &Path) -> Result<Self, SourcesError> {
        let text = std::fs::read_to_string(path).map_err(|source| SourcesError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text` as if read from `path` (which only labels errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, SourcesError> {
        let file: SourcesFile = toml::from_str(text).map_err(|e| SourcesError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let sources = Self {
            path: path.to_owned(),
            sources: file.source,
        };
        sources.validate()?;
        Ok(sources)
    }

    pub fn get(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name == name)
    }

    fn validate(&self) -> Result<(), SourcesError> {
        let mut names = HashSet::new();
        for source in &self.sources {
            let invalid = |field: &str, message: String| SourcesError::Invalid {
                path: self.path.clone(),
                source_name: source.name.clone(),
                field: field.into(),
                message,
            };
            validate_name(&source.name).map_err(|m| invalid("name", m))?;
            if !names.insert(source.name.as_str()) {
                return Err(invalid("name", "defined more than once".into()));
            }
            match url::Url::parse(&source.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(u) => {
                    return Err(invalid(
                        "url",
                        format!("scheme `{}` is not http or https", u.scheme()),
                    ))
                }
                Err(e) => return Err(invalid("url", format!("not a URL: {e}"))),
            }
            if source.schedule < Duration::from_secs(1) {
                return Err(invalid("schedule", "must be at least 1s".into()));
            }
            for (header, from) in &source.headers {
                if from.env.is_empty() {
                    return Err(invalid(
                        &format!("headers.{header}.env"),
                        "must name a variable".into(),
                    ));
                }
            }
            let http = &source.http;
            if http.attempts == 0 {
                return Err(invalid("http.attempts", "must be at least 1".into()));
            }
            if http.initial_backoff > http.max_backoff {
                return Err(invalid(
                    "http.initial_backoff",
                    "must not exceed http.max_backoff".into(),
                ));
            }
            validate_mapping(source).map_err(|(field, m)| invalid(&field, m))?;
            match source.kind {
                SourceKind::Rest => {
                    if source.csv.is_some() {
                        return Err(invalid("csv", "only for kind = \"csv\"".into()));
                    }
                    let rest = source.rest_options();
                    validate_rest(&rest).map_err(|(field, m)| invalid(&field, m))?;
                    if rest.incremental.is_some() && source.deletes == Deletes::Snapshot {
                        return Err(invalid(
                            "deletes",
                            "\"snapshot\" needs every run to fetch the whole source; \
                             rest.incremental fetches only what changed"
                                .into(),
                        ));
                    }
                }
                SourceKind::Csv => {
                    if source.rest.is_some() {
                        return Err(invalid("rest", "only for kind = \"rest\"".into()));
                    }
                    let csv = source.csv_options();
                    for (field, c) in [("csv.delimiter", csv.delimiter), ("csv.quote", csv.quote)] {
                        if !c.is_ascii() || c == '\n' || c == '\r' {
                            return Err(invalid(
                                field,
                                format!(
                                    "{c:?} must be one ASCII character other than a line break"
                                ),
                            ));
                        }
                    }
                    if csv.delimiter == csv.quote {
                        return Err(invalid(
                            "csv.quote",
                            "must differ from csv.delimiter".into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1–63 characters of a-z, 0-9, `_` and `-`"
        ))
    }
}

fn validate_mapping(source: &Source) -> Result<(), (String, String)> {
    let m = &source.mapping;
    let key = m.source_id.fields();
    let mut seen = HashSet::new();
    if let Some(twice) = key.iter().find(|part| !seen.insert(part.as_str())) {
        return Err((
            "mapping.source_id".into(),
            format!("{twice:?} is named twice"),
        ));
    }
    for (field, target) in m.targets() {
        match source.kind {
            SourceKind::Rest if !target.starts_with('/') => {
                return Err((
                    field.into(),
                    format!("{target:?} must be a JSON pointer such as \"/id\""),
                ))
            }
            SourceKind::Csv if target.is_empty() => {
                return Err((field.into(), "must name a CSV column".into()))
            }
            _ => {}
        }
    }
    Ok(())
}

fn validate_rest(rest: &RestOptions) -> Result<(), (String, String)> {
    if !rest.items.is_empty() && !rest.items.starts_with('/') {
        return Err((
            "rest.items".into(),
            format!(
                "{:?} must be a JSON pointer such as \"/data\", or empty for a top-level array",
                rest.items
            ),
        ));
    }
    if rest.max_pages == 0 {
        return Err(("rest.max_pages".into(), "must be at least 1".into()));
    }
    if let Some(incremental) = &rest.incremental {
        if incremental.param.is_empty() {
            return Err((
                "rest.incremental.param".into(),
                "must name a query parameter".into(),
            ));
        }
        if !incremental.pointer.starts_with('/') {
            return Err((
                "rest.incremental.pointer".into(),
                format!("{:?} must be a JSON pointer", incremental.pointer),
            ));
        }
    }
    let field = "rest.pagination";
    match &rest.pagination {
        Pagination::Page { size: 0, .. } => {
            Err((format!("{field}.size"), "must be at least 1".into()))
        }
        Pagination::Offset { limit: 0, .. } => {
            Err((format!("{field}.limit"), "must be at least 1".into()))
        }
        Pagination::NextUrl { pointer } | Pagination::Cursor { pointer, .. }
            if !pointer.starts_with('/') =>
        {
            Err((
                format!("{field}.pointer"),
                format!("{pointer:?} must be a JSON pointer"),
            ))
        }
        Pagination::Cursor { param, .. } if param.is_empty() => Err((
            format!("{field}.param"),
            "must name a query parameter".into(),
        )),
        _ => Ok(()),
    }
}

fn human_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration like \"30s\" or \"5m\": {e}"
        ))
    })
}

fn default_schedule() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_attempts() -> u32 {
    5
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_max_page_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_file_bytes() -> u64 {
    16 * 1024 * 1024 * 1024
}
fn default_max_record_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_max_response_time() -> Duration {
    Duration::from_secs(3600)
}
fn default_follow_cross_origin() -> bool {
    true
}
fn default_max_pages() -> u32 {
    10_000
}
fn default_page_param() -> String {
    "page".into()
}
fn default_offset_param() -> String {
    "offset".into()
}
fn default_limit_param() -> String {
    "limit".into()
}
fn one() -> u64 {
    1
}
fn default_delimiter() -> char {
    ','
}
fn default_quote() -> char {
    '"'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Sources, SourcesError> {
        Sources::parse(Path::new("sources.toml"), text)
    }

    const GOOD: &str = r#"
        [[source]]
        name = "products"
        kind = "rest"
        url = "http://127.0.0.1:1/items"
        schedule = "5m"
        headers.Authorization = { env = "PRODUCTS_TOKEN", prefix = "Bearer " }
        mapping = { source_id = "/id", name = "/title", value = "/price" }
        rest = { items = "/data", pagination = { style = "page", size = 50, size_param = "per_page" } }

        [[source]]
        name = "sensors"
        kind = "csv"
        url = "http://127.0.0.1:1/s.csv.gz"
        mapping = { source_id = "id", name = "label", value = "reading", description = "note" }
        csv = { delimiter = ";" }
    "#;

    #[test]
    fn a_valid_file_parses_with_defaults_filled_in() {
        let sources = parse(GOOD).unwrap();
        let products = sources.get("products").unwrap();
        assert_eq!(products.schedule, Duration::from_secs(300));
        assert_eq!(products.headers["Authorization"].env, "PRODUCTS_TOKEN");
        assert_eq!(
            products.rest_options().pagination,
            Pagination::Page {
                param: "page".into(),
                start: 1,
                size_param: Some("per_page".into()),
                size: 50
            }
        );
        let sensors = sources.get("sensors").unwrap();
        assert_eq!(sensors.csv_options().delimiter, ';');
        assert_eq!(sensors.schedule, Duration::from_secs(900));
        assert_eq!(sensors.http.attempts, 5);
    }

    #[test]
    fn source_id_is_one_field_a_list_of_them_or_the_row() {
        let key = |text: &str| {
            parse(&GOOD.replace("source_id = \"id\"", &format!("source_id = {text}")))
                .map(|s| s.get("sensors").unwrap().mapping.source_id.clone())
        };
        assert_eq!(key("\"id\"").unwrap(), SourceKey::Fields(vec!["id".into()]));
        assert_eq!(
            key("[\"Species\", \"Sample Number\"]").unwrap(),
            SourceKey::Fields(vec!["Species".into(), "Sample Number".into()])
        );
        assert_eq!(key("{ row = true }").unwrap(), SourceKey::Row);
        for bad in ["[]", "{ row = false }", "[\"a\", \"a\"]", "7"] {
            let err = key(bad).unwrap_err().to_string();
            assert!(err.contains("source_id"), "{bad}: {err}");
        }
    }

    #[test]
    fn incremental_fetches_cannot_be_snapshots() {
        let text = GOOD.replace(
            "rest = { items = \"/data\",",
            "deletes = \"snapshot\"\nrest = { incremental = { param = \"since\", pointer = \"/at\" }, items = \"/data\",",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("`deletes`") && err.contains("incremental"),
            "{err}"
        );
        let fine = parse(&text.replace("deletes = \"snapshot\"\n", "")).unwrap();
        let incremental = fine
            .get("products")
            .unwrap()
            .rest_options()
            .incremental
            .unwrap();
        assert_eq!(
            (incremental.param.as_str(), incremental.lag),
            ("since", Duration::ZERO)
        );
    }

    #[test]
    fn composite_ids_are_unambiguous() {
        assert_eq!(SourceKey::compose(&["7"]), "7");
        assert_eq!(SourceKey::compose(&["Adelie", "12"]), "Adelie|12");
        let ids = [
            SourceKey::compose(&["a|b", "c"]),
            SourceKey::compose(&["a", "b|c"]),
            SourceKey::compose(&["a\\", "|c"]),
            SourceKey::compose(&["a\\|", "c"]),
            SourceKey::compose(&["a", "b", "c"]),
        ];
        assert_eq!(ids[0], "a\\|b|c");
        let distinct: HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_key_named() {
        let err = parse(&GOOD.replace("schedule = \"5m\"", "schedule = \"5m\"\nshedule = 3"))
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("sources.toml") && message.contains("shedule"),
            "{message}"
        );
    }

    #[test]
    fn bad_values_name_the_file_source_and_field() {
        let cases = [
            (
                "url = \"http://127.0.0.1:1/items\"",
                "url = \"ftp://x/y\"",
                "products",
                "url",
            ),
            (
                "name = \"products\"",
                "name = \"Products!\"",
                "Products!",
                "name",
            ),
            (
                "source_id = \"/id\"",
                "source_id = \"id\"",
                "products",
                "mapping.source_id",
            ),
            ("size = 50", "size = 0", "products", "rest.pagination.size"),
            (
                "delimiter = \";\"",
                "delimiter = \"é\"",
                "sensors",
                "csv.delimiter",
            ),
            (
                "name = \"sensors\"",
                "name = \"products\"",
                "products",
                "name",
            ),
        ];
        for (from, to, source, field) in cases {
            let err = parse(&GOOD.replace(from, to)).unwrap_err();
            match &err {
                SourcesError::Invalid {
                    source_name,
                    field: f,
                    ..
                } => {
                    assert_eq!((source_name.as_str(), f.as_str()), (source, field), "{err}")
                }
                other => panic!("{to}: expected a field error, got {other}"),
            }
            assert!(
                err.to_string()
                    .starts_with("sources file sources.toml: source"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_bad_duration_says_what_a_good_one_looks_like() {
        let err = parse(&GOOD.replace("\"5m\"", "\"often\"")).unwrap_err();
        assert!(err.to_string().contains("not a duration like"), "{err}");
    }

    #[test]
    fn options_of_the_other_kind_are_refused() {
        let text = GOOD.replace("csv = { delimiter = \";\" }", "rest = { items = \"/x\" }");
        let err = parse(&text).unwrap_err();
        assert!(
            matches!(err, SourcesError::Invalid { ref field, .. } if field == "rest"),
            "{err}"
        );
    }
}
