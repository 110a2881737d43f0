//! REST sources: GET JSON pages, follow the configured pagination to the end, and land every
//! item of every page. Items are kept byte-for-byte as the API sent them (no float rounding,
//! no reordered keys): only the path to the items and to each `source_id` is parsed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use etl_shared::sources::{Pagination, Source};
use reqwest::header::LINK;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use crate::http::{read_body_limited, Body, FetchError, Fetcher};
use crate::land::{Lander, Position, KEPT_PREFIX_BYTES};
use crate::{IngestError, SafeUrl, SourceError};

/// One fetched page: its body (valid JSON, held once: items are read from it in place), the
/// `Link: rel="next"` target, if any, and its share of the process's page budget.
struct Page {
    body: Body,
    link_next: Option<String>,
    _reserved: OwnedSemaphorePermit,
}

impl Page {
    fn json(&self) -> &RawValue {
        let text = std::str::from_utf8(&self.body).expect("validated when read");
        serde_json::from_str(text).expect("validated when read")
    }
}

/// How many bytes of REST pages the whole process holds at once, across all its sources: a
/// page reserves its size (from `Content-Length`, else `http.max_page_bytes`, at most all of
/// it) before its body is read, and gives it back once its items are landed.
pub const PAGE_BYTES_IN_FLIGHT: u32 = 32 * 1024 * 1024;

/// The process-wide page budget (see [`PAGE_BYTES_IN_FLIGHT`]).
pub fn page_budget() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(PAGE_BYTES_IN_FLIGHT as usize))
}

pub async fn ingest(
    source: &Source,
    fetcher: &Fetcher,
    budget: &Arc<Semaphore>,
    lander: &mut Lander,
) -> Result<(), IngestError> {
    let rest = source.rest_options();
    let base = Url::parse(&source.url).map_err(SourceError::BadUrl)?;
    let limit = fetcher.max_page_bytes();
    let max_record = fetcher.max_record_bytes();
    let mut next = first_url(&base, &rest.pagination);
    let mut requested = HashSet::new();
    let mut page_no: u32 = 0;

    while let Some(url) = next.take() {
        page_no += 1;
        if page_no > rest.max_pages {
            return Err(SourceError::TooManyPages {
                max_pages: rest.max_pages,
            }
            .into());
        }
        if !requested.insert(url.clone()) {
            return Err(SourceError::PaginationLoop {
                page: page_no,
                url: SafeUrl::from(&url),
            }
            .into());
        }
        let page = fetcher
            .get(&url, |response| read_page(response, limit, budget.clone()))
            .await?;
        // Parsed (in place) once here, for the items and for the next page's pointer.
        let json = page.json();
        let items =
            locate_items(json, &rest.items).map_err(|why| page_error(page_no, &url, why))?;
        let count = items.len() as u64;
        for (index, item) in items.into_iter().enumerate() {
            let position = Position {
                page: Some(page_no.into()),
                item: Some(index as i64),
                ..Position::default()
            };
            let bytes = item.get().as_bytes();
            if bytes.len() as u64 > max_record {
                let kept = &bytes[..KEPT_PREFIX_BYTES.min(max_record as usize)];
                let reason = format!(
                    "the item is {} bytes, over the limit of {max_record} bytes \
                     (http.max_record_bytes); its first {} bytes are kept",
                    bytes.len(),
                    kept.len()
                );
                lander.land(position, Err(reason), || kept.to_vec()).await?;
                continue;
            }
            let parsed =
                source_id_of(item, &source.mapping.source_id).map(|id| (id, item.get().to_owned()));
            lander.land(position, parsed, || bytes.to_vec()).await?;
        }
        let link_next = page.link_next.as_deref();
        next = next_url(
            &base,
            &url,
            &rest.pagination,
            json,
            link_next,
            page_no,
            count,
        )
        .map_err(|why| page_error(page_no, &url, why))?;
    }
    Ok(())
}

fn page_error(page: u32, url: &Url, why: String) -> SourceError {
    SourceError::Page {
        page,
        url: SafeUrl::from(url),
        why,
    }
}

async fn read_page(
    response: reqwest::Response,
    limit: u64,
    budget: Arc<Semaphore>,
) -> Result<Page, FetchError> {
    let size = response.content_length().unwrap_or(limit).min(limit);
    let reserved = budget
        .acquire_many_owned(size.min(u64::from(PAGE_BYTES_IN_FLIGHT)).max(1) as u32)
        .await
        .expect("the page budget is never closed");
    let link_next = response
        .headers()
        .get_all(LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(link_rel_next);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let bytes = read_body_limited(response, limit).await?;
    let invalid = |e: &dyn std::fmt::Display, len: usize| {
        FetchError::Body(format!(
            "the body is not valid JSON ({e}; content-type {content_type}, {len} bytes)"
        ))
    };
    let len = bytes.len();
    let text = std::str::from_utf8(&bytes).map_err(|e| invalid(&e, len))?;
    serde_json::from_str::<&RawValue>(text).map_err(|e| invalid(&e, len))?;
    Ok(Page {
        body: bytes,
        link_next,
        _reserved: reserved,
    })
}

fn first_url(base: &Url, pagination: &Pagination) -> Option<Url> {
    Some(match pagination {
        Pagination::Page {
            param,
            start,
            size_param,
            size,
        } => {
            let mut url = with_query(base, param, &start.to_string());
            if let Some(size_param) = size_param {
                url = with_query(&url, size_param, &size.to_string());
            }
            url
        }
        Pagination::Offset {
            offset_param,
            limit_param,
            limit,
        } => with_query(
            &with_query(base, offset_param, "0"),
            limit_param,
            &limit.to_string(),
        ),
        _ => base.clone(),
    })
}

/// Where the page after `current` is, or `None` after the last page.
fn next_url(
    base: &Url,
    current: &Url,
    pagination: &Pagination,
    json: &RawValue,
    link_next: Option<&str>,
    page_no: u32,
    count: u64,
) -> Result<Option<Url>, String> {
    let join = |link: &str| {
        current
            .join(link)
            .map(Some)
            .map_err(|e| format!("next page link {link:?} is not a URL: {e}"))
    };
    match pagination {
        Pagination::None => Ok(None),
        Pagination::Page {
            param, start, size, ..
        } => Ok((count >= *size)
            .then(|| with_query(current, param, &(start + u64::from(page_no)).to_string()))),
        Pagination::Offset {
            offset_param,
            limit,
            ..
        } => {
            let offset: u64 = query_value(current, offset_param)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Ok((count >= *limit)
                .then(|| with_query(current, offset_param, &(offset + count).to_string())))
        }
        Pagination::NextUrl { pointer } => match scalar_at(json, pointer)? {
            Some(link) => join(&link),
            None => Ok(None),
        },
        Pagination::LinkHeader => match link_next {
            Some(link) => join(link),
            None => Ok(None),
        },
        Pagination::Cursor { param, pointer } => {
            Ok(scalar_at(json, pointer)?.map(|token| with_query(base, param, &token)))
        }
    }
}

/// A string or number at `pointer`, as text; `None` when absent, null or empty (the end).
fn scalar_at(body: &RawValue, pointer: &str) -> Result<Option<String>, String> {
    match json_pointer(body, pointer).map_err(|e| e.to_string())? {
        None => Ok(None),
        Some(raw) => match scalar_text(raw) {
            Ok(text) if text.is_empty() => Ok(None),
            Ok(text) => Ok(Some(text)),
            Err("null") => Ok(None),
            Err(kind) => Err(format!("expected a string at {pointer}, found {kind}")),
        },
    }
}

fn locate_items<'a>(body: &'a RawValue, pointer: &str) -> Result<Vec<&'a RawValue>, String> {
    let at = if pointer.is_empty() {
        "the top level"
    } else {
        pointer
    };
    let raw = json_pointer(body, pointer)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no item array at {at} (rest.items)"))?;
    serde_json::from_str::<Vec<&RawValue>>(raw.get()).map_err(|_| {
        format!(
            "expected an array of items at {at} (rest.items), found {}",
            kind_of(raw)
        )
    })
}

fn source_id_of(item: &RawValue, pointer: &str) -> Result<String, String> {
    let raw = json_pointer(item, pointer)
        .map_err(|e| format!("item is not valid JSON: {e}"))?
        .ok_or_else(|| format!("no source_id: nothing at {pointer} (mapping.source_id)"))?;
    match scalar_text(raw) {
        Ok(id) if id.trim().is_empty() => Err(format!("source_id at {pointer} is empty")),
        Ok(id) => Ok(id),
        Err(kind) => Err(format!(
            "source_id at {pointer} is {kind}; expected a string or a number"
        )),
    }
}

/// A JSON string's value, or a number's text exactly as written; otherwise the kind found.
fn scalar_text(raw: &RawValue) -> Result<String, &'static str> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(text).map_err(|_| "an invalid string"),
        Some(b'-' | b'0'..=b'9') => Ok(text.to_owned()),
        _ => Err(kind_of(raw)),
    }
}

fn kind_of(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// RFC 6901 JSON pointer over raw JSON, parsing only the containers on the path.
fn json_pointer<'a>(
    root: &'a RawValue,
    pointer: &str,
) -> Result<Option<&'a RawValue>, serde_json::Error> {
    if pointer.is_empty() {
        return Ok(Some(root));
    }
    let mut current = root;
    for token in pointer[1..].split('/') {
        let token = token.replace("~1", "/").replace("~0", "~");
        let next = match current.get().as_bytes().first() {
            Some(b'{') => {
                let object: HashMap<String, &'a RawValue> = serde_json::from_str(current.get())?;
                object.get(&token).copied()
            }
            Some(b'[') => {
                let array: Vec<&'a RawValue> = serde_json::from_str(current.get())?;
                token
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| array.get(i).copied())
            }
            _ => None,
        };
        match next {
            Some(value) => current = value,
            None => return Ok(None),
        }
    }
    Ok(Some(current))
}

/// `url` with query parameter `name` set to `value`: replaced where it stands, else appended.
fn with_query(url: &Url, name: &str, value: &str) -> Url {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    match pairs.iter_mut().find(|(k, _)| k == name) {
        Some(pair) => pair.1 = value.to_owned(),
        None => pairs.push((name.to_owned(), value.to_owned())),
    }
    let mut out = url.clone();
    out.query_pairs_mut().clear().extend_pairs(pairs);
    out
}

fn query_value(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The target of `rel="next"` in one `Link` header value (RFC 8288), which may hold several
/// comma-separated links.
fn link_rel_next(header: &str) -> Option<String> {
    let mut rest = header;
    while let Some(open) = rest.find('<') {
        let close = open + rest[open..].find('>')?;
        let target = &rest[open + 1..close];
        let params_end = rest[close..].find('<').map_or(rest.len(), |i| close + i);
        let params = &rest[close + 1..params_end];
        let is_next = params.split(';').any(|p| {
            let p = p.trim().trim_end_matches(',').trim();
            p.strip_prefix("rel=").is_some_and(|v| {
                v.trim_matches('"')
                    .split_ascii_whitespace()
                    .any(|r| r.eq_ignore_ascii_case("next"))
            })
        });
        if is_next {
            return Some(target.to_owned());
        }
        rest = &rest[params_end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn link_headers_yield_the_next_target_only() {
        let header =
            r#"<https://a.test/x?page=1>; rel="prev", <https://a.test/x?page=3>; rel="next""#;
        assert_eq!(
            link_rel_next(header).as_deref(),
            Some("https://a.test/x?page=3")
        );
        assert_eq!(
            link_rel_next(r#"</p2>; rel="last next""#).as_deref(),
            Some("/p2")
        );
        assert_eq!(link_rel_next(r#"<https://a.test/x>; rel="prev""#), None);
    }

    #[test]
    fn pointers_find_nested_items_and_escape_tokens() {
        let body = raw(r#"{"data":{"a/b":[{"id":7},{"id":"x"}]}}"#);
        let items = locate_items(&body, "/data/a~1b").unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(source_id_of(items[0], "/id").unwrap(), "7");
        assert_eq!(source_id_of(items[1], "/id").unwrap(), "x");
        assert!(locate_items(&body, "/nothing")
            .unwrap_err()
            .contains("no item array"));
    }

    #[test]
    fn ids_that_are_not_strings_or_numbers_are_explained() {
        let item = raw(r#"{"id":null,"o":{"k":1}}"#);
        assert!(source_id_of(&item, "/id").unwrap_err().contains("null"));
        assert!(source_id_of(&item, "/o").unwrap_err().contains("an object"));
        assert!(source_id_of(&item, "/missing")
            .unwrap_err()
            .contains("nothing at /missing"));
        assert_eq!(
            source_id_of(&raw("12345678901234567890123"), "").unwrap(),
            "12345678901234567890123"
        );
    }

    #[test]
    fn query_parameters_are_replaced_not_repeated() {
        let url = Url::parse("http://h/x?a=1&page=1").unwrap();
        assert_eq!(
            with_query(&url, "page", "2").as_str(),
            "http://h/x?a=1&page=2"
        );
    }
}
