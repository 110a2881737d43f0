//! The benchmark's data: deterministic rows (the same file and pages on every run), a CSV file
//! on disk and a paginated REST API computed on request, both served over HTTP on 127.0.0.1.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use poem::web::{Data, Query};
use poem::{get, handler, EndpointExt, Response, Route};
use serde::Deserialize;

/// One in this many rows has "special" in its description: the ~1% search of the query bench.
pub const SPECIAL_EVERY: u64 = 100;
/// The search term that matches those rows.
pub const SPECIAL_TERM: &str = "special";
/// Items per REST page.
pub const REST_PAGE_SIZE: u64 = 1_000;

/// Row `i`'s value: a fixed pseudo-random number in [0, 1000) with four decimals.
fn value_of(i: u64) -> f64 {
    let mixed = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ 0x5DEE_CE66;
    (mixed % 10_000_000) as f64 / 10_000.0
}

fn description_of(i: u64) -> String {
    if i.is_multiple_of(SPECIAL_EVERY) {
        format!("{SPECIAL_TERM} offer on item {i}, while it lasts")
    } else {
        format!("description of item {i}, with a comma")
    }
}

/// Writes (once per size) a CSV with a header and `rows` rows; returns its path.
pub fn csv_file(dir: &Path, rows: u64) -> Result<PathBuf> {
    write_csv(dir, rows, 1)
}

/// The same rows as [`csv_file`]'s, each with a new name: what a source's daily refresh that
/// changes every record serves.
pub fn refreshed_csv_file(dir: &Path, rows: u64) -> Result<PathBuf> {
    write_csv(dir, rows, 2)
}

fn write_csv(dir: &Path, rows: u64, version: u32) -> Result<PathBuf> {
    let path = dir.join(format!("items-{rows}.v{version}.csv"));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    let partial = path.with_extension("partial");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&partial)?);
    writeln!(out, "id,name,value,description")?;
    for i in 1..=rows {
        let suffix = if version == 1 { "" } else { " refreshed" };
        writeln!(
            out,
            "{i},item {i}{suffix},{:.4},\"{}\"",
            value_of(i),
            description_of(i)
        )?;
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// The items of REST page `page` (from 1) of an API with `total` items.
fn rest_page(total: u64, page: u64) -> serde_json::Value {
    let start = (page.max(1) - 1) * REST_PAGE_SIZE + 1;
    let end = (start + REST_PAGE_SIZE - 1).min(total);
    let items: Vec<_> = (start..=end)
        .map(|i| {
            serde_json::json!({
                "sku": format!("r{i}"),
                "title": format!("rest item {i}"),
                "price": { "amount": value_of(i), "currency": "EUR" },
                "details": { "summary": description_of(i), "tags": ["bench", "rest"] },
            })
        })
        .collect();
    serde_json::json!({ "data": items, "page": page })
}

#[derive(Deserialize)]
struct PageQuery {
    page: Option<u64>,
}

struct Served {
    files: Vec<(String, bytes::Bytes)>,
    /// What `GET /files/<name>` serves instead once [`DataServer::refresh`] is called.
    refreshed: Vec<(String, bytes::Bytes)>,
    is_refreshed: std::sync::atomic::AtomicBool,
    /// Every REST page, rendered up front so the benchmark measures the ingester, not this
    /// server's JSON encoding; the last one is the empty page after the end.
    pages: Vec<bytes::Bytes>,
}

#[handler]
fn api_page(Query(q): Query<PageQuery>, Data(served): Data<&Arc<Served>>) -> Response {
    let last = served.pages.len() - 1;
    let index = usize::try_from(q.page.unwrap_or(1).max(1) - 1).map_or(last, |i| i.min(last));
    Response::builder()
        .content_type("application/json")
        .body(served.pages[index].clone())
}

#[handler]
fn csv_file_endpoint(
    poem::web::Path(name): poem::web::Path<String>,
    Data(served): Data<&Arc<Served>>,
) -> Response {
    let refreshed = served
        .is_refreshed
        .load(std::sync::atomic::Ordering::SeqCst);
    let files = if refreshed {
        served.refreshed.iter().chain(&served.files)
    } else {
        [].iter().chain(&served.files)
    };
    match files.into_iter().find(|(n, _)| *n == name) {
        Some((_, bytes)) => Response::builder()
            .content_type("text/csv")
            .body(bytes.clone()),
        None => Response::builder()
            .status(poem::http::StatusCode::NOT_FOUND)
            .finish(),
    }
}

/// The benchmark's source server.
pub struct DataServer {
    pub addr: SocketAddr,
    served: Arc<Served>,
}

impl DataServer {
    /// From now on, each file given a refreshed version serves that version at its old URL.
    pub fn refresh(&self) {
        self.served
            .is_refreshed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn file_name(path: &Path) -> Result<String> {
    Ok(path
        .file_name()
        .and_then(|n| n.to_str())
        .context("a CSV file name")?
        .to_owned())
}

fn read(path: &Path) -> Result<bytes::Bytes> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes::Bytes::from(bytes))
}

/// Serves `GET /files/<name>` for each CSV (held in memory, so disk reads are not measured) and
/// `GET /api/items?page=N` with `rest_items` items in pages of [`REST_PAGE_SIZE`]. `refreshed`
/// pairs a file with the version it serves after [`DataServer::refresh`].
pub async fn serve(
    csv_files: &[PathBuf],
    refreshed: &[(PathBuf, PathBuf)],
    rest_items: u64,
) -> Result<DataServer> {
    let mut files = Vec::new();
    for path in csv_files {
        files.push((file_name(path)?, read(path)?));
    }
    let refreshed = refreshed
        .iter()
        .map(|(old, new)| Ok((file_name(old)?, read(new)?)))
        .collect::<Result<Vec<_>>>()?;
    let page_count = rest_items.div_ceil(REST_PAGE_SIZE) + 1;
    let pages = (1..=page_count)
        .map(|page| {
            let page = serde_json::to_vec(&rest_page(rest_items, page))?;
            Ok(bytes::Bytes::from(page))
        })
        .collect::<Result<_>>()?;
    let served = Arc::new(Served {
        files,
        refreshed,
        is_refreshed: std::sync::atomic::AtomicBool::new(false),
        pages,
    });
    let app = Route::new()
        .at("/api/items", get(api_page))
        .at("/files/:name", get(csv_file_endpoint))
        .data(served.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener)?;
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
    Ok(DataServer { addr, served })
}

/// The sources file for the services: `csv_sources` as (source name, file) and, when named, the
/// REST source.
pub fn sources_toml(
    server: SocketAddr,
    csv_sources: &[(&str, &Path)],
    rest: Option<&str>,
) -> String {
    let mut toml = String::new();
    for (name, path) in csv_sources {
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        toml += &format!(
            "[[source]]\nname = \"{name}\"\nkind = \"csv\"\nurl = \"http://{server}/files/{file}\"\n\
             schedule = \"24h\"\nmapping = {{ source_id = \"id\", name = \"name\", value = \"value\", description = \"description\" }}\n\n"
        );
    }
    let Some(rest) = rest else { return toml };
    toml += &format!(
        "[[source]]\nname = \"{rest}\"\nkind = \"rest\"\nurl = \"http://{server}/api/items\"\nschedule = \"24h\"\n\
         mapping = {{ source_id = \"/sku\", name = \"/title\", value = \"/price/amount\", description = \"/details/summary\" }}\n\
         rest = {{ items = \"/data\", pagination = {{ style = \"page\", size = {REST_PAGE_SIZE} }} }}\n"
    );
    toml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_deterministic_and_one_in_a_hundred_is_special() {
        assert_eq!(value_of(7), value_of(7));
        assert!((0.0..1000.0).contains(&value_of(123_456)));
        let special = (1..=10_000)
            .filter(|i| description_of(*i).contains(SPECIAL_TERM))
            .count();
        assert_eq!(special, 100);
    }

    #[test]
    fn the_last_rest_page_is_short_and_the_one_after_is_empty() {
        let last = rest_page(2_500, 3);
        assert_eq!(last["data"].as_array().unwrap().len(), 500);
        assert_eq!(last["data"][0]["sku"], "r2001");
        assert!(rest_page(2_500, 4)["data"].as_array().unwrap().is_empty());
    }
}
