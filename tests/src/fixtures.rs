//! Sources for tests, in one place: `[[source]]` tables built from the parts a test cares about,
//! sources files that remove themselves, and the HTTP servers that serve the sources' data.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One `[[source]]` table. Starts from a working source of its kind (CSV columns `id, name,
/// value`; REST items `{id, title, price}` at the top level) and changes only what a test says.
#[derive(Debug, Clone)]
pub struct SourceToml {
    name: String,
    kind: &'static str,
    url: String,
    mapping: String,
    lines: Vec<String>,
}

impl SourceToml {
    pub fn csv(name: &str, url: &str) -> Self {
        Self::new(
            name,
            "csv",
            url,
            r#"{ source_id = "id", name = "name", value = "value" }"#,
        )
    }

    pub fn rest(name: &str, url: &str) -> Self {
        Self::new(
            name,
            "rest",
            url,
            r#"{ source_id = "/id", name = "/title", value = "/price" }"#,
        )
    }

    fn new(name: &str, kind: &'static str, url: &str, mapping: &str) -> Self {
        Self {
            name: name.into(),
            kind,
            url: url.into(),
            mapping: mapping.into(),
            lines: Vec::new(),
        }
    }

    /// Replaces the mapping (an inline TOML table).
    pub fn mapping(mut self, mapping: &str) -> Self {
        self.mapping = mapping.into();
        self
    }

    /// Adds a line to the table, e.g. `schedule = "1h"` or `http = { attempts = 2 }`.
    pub fn with(mut self, line: &str) -> Self {
        self.lines.push(line.into());
        self
    }
}

impl fmt::Display for SourceToml {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[[source]]")?;
        writeln!(f, "name = {:?}", self.name)?;
        writeln!(f, "kind = {:?}", self.kind)?;
        writeln!(f, "url = {:?}", self.url)?;
        writeln!(f, "mapping = {}", self.mapping)?;
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// The text of a sources file holding `sources`.
pub fn sources_toml(sources: &[SourceToml]) -> String {
    sources
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A sources file in the temp folder for services started as processes (`SOURCES_FILE`),
/// removed when the test ends, pass or fail.
pub struct SourcesFile {
    path: PathBuf,
}

impl SourcesFile {
    pub fn new(toml: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "etl-test-sources-{}-{}.toml",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        Self { path }
    }

    pub fn of(sources: &[SourceToml]) -> Self {
        Self::new(&sources_toml(sources))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a `SOURCES_FILE` value.
    pub fn env_value(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for SourcesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An HTTP server on 127.0.0.1 with a free port, serving `endpoint` until the test's runtime
/// ends. Sources in tests are real servers, fetched over real HTTP.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
}

impl TestServer {
    pub async fn start(endpoint: impl poem::Endpoint + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
        tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(endpoint));
        Self { addr }
    }

    /// A server answering every request for `path` (a poem route: `/*path` matches any) with
    /// `body`, the way a static file host would.
    pub async fn serving(path: &str, body: impl Into<bytes::Bytes>) -> Self {
        let body: bytes::Bytes = body.into();
        Self::start(poem::Route::new().at(
            path,
            poem::endpoint::make_sync(move |_| poem::Response::builder().body(body.clone())),
        ))
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A CSV body (`id,name,value`, rows `i,row i,i` from 0) streamed in chunks of `chunk_rows`
/// rows, `pause` apart: `rows` in all, or without end when `None`. For sources that are slow,
/// huge or never finish.
pub fn streamed_csv(rows: Option<u64>, chunk_rows: u64, pause: Duration) -> poem::Body {
    let chunks = futures_util::stream::unfold(0u64, move |n| async move {
        let first = n * chunk_rows;
        if rows.is_some_and(|total| first >= total) {
            return None;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await; // the source's pace, not a synchronization
        }
        let last = rows.map_or(first + chunk_rows, |total| (first + chunk_rows).min(total));
        let mut chunk = if n == 0 {
            String::from("id,name,value\n")
        } else {
            String::new()
        };
        for i in first..last {
            chunk.push_str(&format!("{i},row {i},{i}\n"));
        }
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)), n + 1))
    });
    poem::Body::from_bytes_stream(chunks)
}
