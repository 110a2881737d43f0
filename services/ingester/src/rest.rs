//! REST sources: GET JSON pages, follow the configured pagination to the end, and land every
//! item of every page. Items are kept byte-for-byte as the API sent them (no float rounding,
//! no reordered keys): only the path to the items and to each `source_id` is parsed.

use std::collections::{HashMap, HashSet};

use etl_shared::sources::{Pagination, Source, SourceKey};
use serde_json::value::RawValue;
use url::Url;

use crate::fetch_page;
use crate::http::Fetcher;
use crate::land::{Lander, Position};
use crate::page_scan::{self, PageScanner, Scanned};
use crate::{IngestError, SafeUrl, SourceError};

/// Lands every item of every page. With `rest.incremental`, `since` (from the last successful
/// run) goes out as its query parameter, and `max_seen` ends as the largest value this run saw.
pub async fn ingest(
    source: &Source,
    fetcher: &Fetcher,
    lander: &mut Lander,
    since: Option<&str>,
    max_seen: &mut Option<String>,
) -> Result<(), IngestError> {
    let rest = source.rest_options();
    let mut base = Url::parse(&source.url).map_err(SourceError::BadUrl)?;
    let incremental = rest.incremental.as_ref();
    if let (Some(incremental), Some(since)) = (incremental, since) {
        base = with_query(&base, &incremental.param, since);
    }
    let mut seen = IncrementalMax {
        pointer: incremental.map(|i| i.pointer.as_str()),
        max: max_seen,
    };
    let limit = fetcher.max_page_bytes();
    let max_record = fetcher.max_record_bytes();
    let capture = match &rest.pagination {
        Pagination::NextUrl { pointer } | Pagination::Cursor { pointer, .. } => {
            Some(pointer.as_str())
        }
        _ => None,
    };
    let mut next = first_url(&base, &rest.pagination);
    let mut requested = HashSet::new();
    let mut page_no: u32 = 0;
    // Items of the run so far, for positional keys.
    let mut items: u64 = 0;

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
            .get(&url, |response| fetch_page::read(response, limit))
            .await?;
        let link_next = page.link_next.clone();
        // The page is read once, item by item: its items land as the scanner finds them.
        let mut scanner = PageScanner::new(&rest.items, capture, max_record);
        let mut chunks = page.chunks();
        let mut found = Vec::new();
        loop {
            let chunk = chunks.next().await.map_err(|e| {
                page_error(
                    page_no,
                    &url,
                    format!("reading the spooled page back failed: {e}"),
                )
            })?;
            let Some(chunk) = chunk else { break };
            scanner.feed(chunk, &mut found);
            for scanned in found.drain(..) {
                items += 1;
                land_item(
                    lander,
                    page_no,
                    scanned,
                    (&source.mapping.source_id, items),
                    max_record,
                    &mut seen,
                )
                .await?;
            }
        }
        let end = scanner
            .finish(&rest.items)
            .map_err(|why| page_error(page_no, &url, why))?;
        let captured = match (capture, end.captured) {
            (Some(pointer), Some(Err(len))) => {
                return Err(page_error(
                    page_no,
                    &url,
                    format!(
                        "the value at {pointer} is {len} bytes: too long for a link or a cursor"
                    ),
                )
                .into())
            }
            (_, Some(Ok(raw))) => Some(raw),
            _ => None,
        };
        next = next_url(
            &base,
            &url,
            &rest.pagination,
            captured.as_deref(),
            link_next.as_deref(),
            page_no,
            end.items,
        )
        .map_err(|why| page_error(page_no, &url, why))?;
    }
    Ok(())
}

/// Lands one item of page `page_no`: as a record with its id, or as a reject saying why not.
async fn land_item(
    lander: &mut Lander,
    page_no: u32,
    scanned: Scanned,
    (key, ordinal): (&SourceKey, u64),
    max_record: u64,
    seen: &mut IncrementalMax<'_>,
) -> Result<(), IngestError> {
    let position = |index: u64| Position {
        page: Some(page_no.into()),
        item: Some(index as i64),
        ..Position::default()
    };
    match scanned {
        Scanned::Oversized { index, len, prefix } => {
            let reason = format!(
                "the item is {len} bytes, over the limit of {max_record} bytes \
                 (http.max_record_bytes); its first {} bytes are kept",
                prefix.len()
            );
            lander.land(position(index), Err(reason), || prefix).await?;
        }
        Scanned::Item { index, bytes } => {
            // The page was checked to be UTF-8 JSON as a whole, so each item is too.
            let text = String::from_utf8(bytes).expect("checked with the page");
            let item: &RawValue = serde_json::from_str(&text).expect("checked with the page");
            let id = id_of(item, key, ordinal);
            seen.note(item);
            lander.land_verbatim(position(index), id, text).await?;
        }
    }
    Ok(())
}

/// The largest value at `rest.incremental.pointer` among a run's items.
struct IncrementalMax<'a> {
    pointer: Option<&'a str>,
    max: &'a mut Option<String>,
}

impl IncrementalMax<'_> {
    fn note(&mut self, item: &RawValue) {
        let Some(pointer) = self.pointer else { return };
        let Ok(Some(raw)) = json_pointer(item, pointer) else {
            return;
        };
        let Ok(value) = scalar_text(raw) else { return };
        if self.max.as_deref().is_none_or(|max| later(max, &value)) {
            *self.max = Some(value);
        }
    }
}

/// Whether incremental value `b` comes after `a`: as RFC 3339 timestamps, else as numbers,
/// else as text.
fn later(a: &str, b: &str) -> bool {
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;
    if let (Ok(a), Ok(b)) = (
        OffsetDateTime::parse(a, &Rfc3339),
        OffsetDateTime::parse(b, &Rfc3339),
    ) {
        return b > a;
    }
    if let (Ok(a), Ok(b)) = (a.parse::<f64>(), b.parse::<f64>()) {
        return b > a;
    }
    b > a
}

/// The value a run sends as its incremental parameter: the largest the last successful run
/// saw, less `lag` (a timestamp moves back by it; a number, taken as epoch seconds, by its
/// seconds; other text is sent as it is).
pub fn incremental_from(seen: &str, lag: std::time::Duration) -> String {
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;
    if let Ok(at) = OffsetDateTime::parse(seen, &Rfc3339) {
        if let Ok(back) = (at - lag).format(&Rfc3339) {
            return back;
        }
    }
    if let Ok(n) = seen.parse::<i64>() {
        return n.saturating_sub(lag.as_secs() as i64).to_string();
    }
    if let Ok(x) = seen.parse::<f64>() {
        return (x - lag.as_secs_f64()).to_string();
    }
    seen.to_owned()
}

fn page_error(page: u32, url: &Url, why: String) -> SourceError {
    SourceError::Page {
        page,
        url: SafeUrl::from(url),
        why,
    }
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
    captured: Option<&[u8]>,
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
        Pagination::NextUrl { pointer } => match scalar_at(captured, pointer)? {
            Some(link) => join(&link),
            None => Ok(None),
        },
        Pagination::LinkHeader => match link_next {
            Some(link) => join(link),
            None => Ok(None),
        },
        Pagination::Cursor { param, pointer } => {
            Ok(scalar_at(captured, pointer)?.map(|token| with_query(base, param, &token)))
        }
    }
}

/// The string or number found at `pointer` (`captured`), as text; `None` when absent, null or
/// empty (the end).
fn scalar_at(captured: Option<&[u8]>, pointer: &str) -> Result<Option<String>, String> {
    let Some(raw) = captured else {
        return Ok(None);
    };
    let text = std::str::from_utf8(raw).expect("checked with the page");
    let raw: &RawValue = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match scalar_text(raw) {
        Ok(text) if text.is_empty() => Ok(None),
        Ok(text) => Ok(Some(text)),
        Err("null") => Ok(None),
        Err(kind) => Err(format!("expected a string at {pointer}, found {kind}")),
    }
}

/// The item's id: the values at the key's pointers (joined when there are several), or its
/// position in the run.
fn id_of(item: &RawValue, key: &SourceKey, ordinal: u64) -> Result<String, String> {
    match key {
        SourceKey::Row => Ok(ordinal.to_string()),
        SourceKey::Fields(pointers) => {
            let parts = pointers
                .iter()
                .map(|pointer| {
                    let what = if pointers.len() > 1 {
                        "source_id part"
                    } else {
                        "source_id"
                    };
                    source_id_of(item, pointer, what)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(SourceKey::compose(&parts))
        }
    }
}

/// The id part at `pointer`; `what` names it in errors (`source_id`, or `source_id part`).
fn source_id_of(item: &RawValue, pointer: &str, what: &str) -> Result<String, String> {
    let raw = json_pointer(item, pointer)
        .map_err(|e| format!("item is not valid JSON: {e}"))?
        .ok_or_else(|| format!("no {what}: nothing at {pointer} (mapping.source_id)"))?;
    match scalar_text(raw) {
        Ok(id) if id.trim().is_empty() => Err(format!("{what} at {pointer} is empty")),
        Ok(id) => Ok(id),
        Err(kind) => Err(format!(
            "{what} at {pointer} is {kind}; expected a string or a number"
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
    page_scan::kind_of(raw.get().as_bytes()[0])
}

/// RFC 6901 JSON pointer over raw JSON, parsing only the containers on the path.
fn json_pointer<'a>(
    root: &'a RawValue,
    pointer: &str,
) -> Result<Option<&'a RawValue>, serde_json::Error> {
    let mut current = root;
    for token in page_scan::tokens(pointer) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn ids_are_found_at_nested_pointers_with_escaped_tokens() {
        let item = raw(r#"{"data":{"a/b":[{"id":7},{"id":"x"}]}}"#);
        assert_eq!(
            source_id_of(&item, "/data/a~1b/0/id", "source_id").unwrap(),
            "7"
        );
        assert_eq!(
            source_id_of(&item, "/data/a~1b/1/id", "source_id").unwrap(),
            "x"
        );
    }

    #[test]
    fn ids_that_are_not_strings_or_numbers_are_explained() {
        let item = raw(r#"{"id":null,"o":{"k":1}}"#);
        assert!(source_id_of(&item, "/id", "source_id")
            .unwrap_err()
            .contains("null"));
        assert!(source_id_of(&item, "/o", "source_id")
            .unwrap_err()
            .contains("an object"));
        assert!(source_id_of(&item, "/missing", "source_id")
            .unwrap_err()
            .contains("nothing at /missing"));
        assert_eq!(
            source_id_of(&raw("12345678901234567890123"), "", "source_id").unwrap(),
            "12345678901234567890123"
        );
    }

    #[test]
    fn the_incremental_value_moves_back_by_the_lag_and_compares_by_its_kind() {
        let lag = std::time::Duration::from_secs(300);
        assert_eq!(
            incremental_from("2026-01-01T00:10:00Z", lag),
            "2026-01-01T00:05:00Z"
        );
        assert_eq!(
            incremental_from("2026-01-01T00:02:00+01:00", lag),
            "2025-12-31T23:57:00+01:00"
        );
        assert_eq!(incremental_from("1767225600", lag), "1767225300");
        assert_eq!(incremental_from("v41", lag), "v41");
        assert!(later("2026-01-01T00:00:00Z", "2026-01-01T00:00:01+00:00"));
        assert!(later("9", "10"), "numbers compare as numbers");
        assert!(!later("2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00Z"));
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
