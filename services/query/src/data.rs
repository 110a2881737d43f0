//! `GET /data`: pages of `normalized_data`. One constant SQL statement per filter combination,
//! every value a bind parameter, so each has a plan that uses its index: the primary key for
//! plain pages, `(source, id)` for a source, the trigram indexes for searches.
//!
//! Pages come two ways through the same statements: by number (`OFFSET`, which walks every
//! earlier row, so deep pages cost their depth) or by [`Cursor`] (`id > last seen`, one index
//! descent at any depth). Ids never change and new records get larger ones, so a walk by cursor
//! neither skips nor repeats a record while others are inserted or updated.

use poem_openapi::types::Example;
use poem_openapi::Object;
use time::OffsetDateTime;
use tokio_postgres::types::Type;
use tokio_postgres::Row;

use crate::reader::{Reader, Snapshot, Statement};

/// Searches count at most this many matches: counting is a heap visit per match, so an exact
/// count of a broad search would cost far more than the page itself (10,000 matches: ~100 ms).
pub const SEARCH_COUNT_CAP: i64 = 1_000;

/// One normalized record: every column of `normalized_data`.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct DataRecord {
    /// Unique, stable, increasing with insertion: the order of pages.
    pub id: i64,
    /// The source it came from.
    pub source: String,
    /// Its id within the source.
    pub source_id: String,
    pub name: String,
    pub value: f64,
    /// Absent when the source gave none.
    #[oai(skip_serializing_if_is_none)]
    pub description: Option<String>,
    /// When it was first normalized.
    pub created_at: OffsetDateTime,
    /// When its name, value or description last changed.
    pub updated_at: OffsetDateTime,
}

/// A page of records.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct DataPage {
    pub data: Vec<DataRecord>,
    /// Records matching the filters, on every page. When `total_exact` is false (a search with
    /// more than 1,000 matches), at least this many.
    pub total: i64,
    /// Whether `total` is exact.
    pub total_exact: bool,
    pub page: u32,
    pub page_size: u32,
    /// Whether a later page has records.
    pub has_more: bool,
    /// Pass as `cursor` to get the next page, at the cost of the first one at any depth, and
    /// without skipping or repeating records inserted or updated meanwhile. Absent on the last
    /// page.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

impl Example for DataRecord {
    fn example() -> Self {
        DataRecord {
            id: 1_042,
            source: "products".into(),
            source_id: "sku-1042".into(),
            name: "Espresso cup".into(),
            value: 12.5,
            description: Some("Porcelain, 80 ml".into()),
            created_at: crate::stats::example_time(),
            updated_at: crate::stats::example_time(),
        }
    }
}

impl Example for DataPage {
    fn example() -> Self {
        DataPage {
            data: vec![DataRecord::example()],
            total: 1_000_000,
            total_exact: true,
            page: 1,
            page_size: 1,
            has_more: true,
            next_cursor: Some(
                Cursor {
                    after_id: 1_042,
                    page: 2,
                }
                .encode(),
            ),
        }
    }
}

/// Where a walk by cursor stands: after which id, and which page of the walk comes next.
/// Clients treat it as opaque; its form is `v1.<page>.<after id>`, which [`CURSOR_PATTERN`]
/// describes exactly, so every cursor the spec allows is one this API can follow (a cursor a
/// client made up just starts after some id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub after_id: i64,
    pub page: u32,
}

/// Every [`Cursor::encode`] output and nothing else: page 1–999,999,999 and an id of at most
/// 18 digits (both fit their types, so any match decodes).
pub const CURSOR_PATTERN: &str = r"^v1\.[1-9][0-9]{0,8}\.(0|[1-9][0-9]{0,17})$";

impl Cursor {
    pub fn encode(self) -> String {
        format!("v1.{}.{}", self.page, self.after_id)
    }

    /// `None` for anything [`CURSOR_PATTERN`] does not match.
    pub fn decode(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("v1.")?;
        let (page, after_id) = rest.split_once('.')?;
        let canonical = |digits: &str, max: usize| {
            !digits.is_empty()
                && digits.len() <= max
                && digits.bytes().all(|b| b.is_ascii_digit())
                && (digits == "0" || !digits.starts_with('0'))
        };
        if !canonical(page, 9) || !canonical(after_id, 18) || page == "0" {
            return None;
        }
        Some(Self {
            after_id: after_id.parse().ok()?,
            page: page.parse().ok()?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct DataQuery {
    /// Where the page starts: a page number, or after a cursor's id.
    pub start: Start,
    pub page_size: u32,
    pub source: Option<String>,
    pub search: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub enum Start {
    Page(u32),
    After(Cursor),
}

pub async fn list(reader: &Reader, query: &DataQuery) -> Result<DataPage, QueryError> {
    let limit = i64::from(query.page_size) + 1; // one extra row tells whether there is more
                                                // Ids start at 1: `id > 0` leaves a numbered page to its offset.
    let (page_number, after_id, offset) = match query.start {
        Start::Page(page) => (page, 0, i64::from(page - 1) * i64::from(query.page_size)),
        Start::After(cursor) => (cursor.page, cursor.after_id, 0),
    };
    let pattern = query.search.as_deref().map(like_pattern);
    let cap = SEARCH_COUNT_CAP + 1;
    let (int, text) = (Type::INT8, Type::TEXT);
    let (page, count) = match (&query.source, &pattern) {
        (None, None) => (
            Statement::new(
                PAGE_ALL,
                vec![
                    (&limit, int.clone()),
                    (&after_id, int.clone()),
                    (&offset, int),
                ],
            ),
            Statement::new(COUNT_ALL, vec![]),
        ),
        (Some(source), None) => (
            Statement::new(
                PAGE_SOURCE,
                vec![
                    (&limit, int.clone()),
                    (&after_id, int.clone()),
                    (&offset, int),
                    (source, text.clone()),
                ],
            ),
            Statement::new(COUNT_SOURCE, vec![(source, text)]),
        ),
        (None, Some(pattern)) => (
            Statement::per_values(
                PAGE_SEARCH,
                vec![
                    (&limit, int.clone()),
                    (&after_id, int.clone()),
                    (&offset, int.clone()),
                    (pattern, text.clone()),
                ],
            ),
            Statement::per_values(COUNT_SEARCH, vec![(pattern, text), (&cap, int)]),
        ),
        (Some(source), Some(pattern)) => (
            Statement::per_values(
                PAGE_SOURCE_SEARCH,
                vec![
                    (&limit, int.clone()),
                    (&after_id, int.clone()),
                    (&offset, int.clone()),
                    (source, text.clone()),
                    (pattern, text.clone()),
                ],
            ),
            Statement::per_values(
                COUNT_SOURCE_SEARCH,
                vec![(source, text.clone()), (pattern, text), (&cap, int)],
            ),
        ),
    };
    let mut answers = reader
        .read(Snapshot::PerStatement, &[page, count])
        .await?
        .into_iter();
    let (rows, counted) = (
        answers.next().unwrap_or_default(),
        answers.next().unwrap_or_default(),
    );
    let counted: i64 = counted.first().map_or(0, |row| row.get(0));
    let (total, total_exact) = if pattern.is_some() {
        (counted.min(SEARCH_COUNT_CAP), counted <= SEARCH_COUNT_CAP)
    } else {
        (counted, true)
    };
    let has_more = rows.len() as i64 > i64::from(query.page_size);
    let data: Vec<DataRecord> = rows
        .iter()
        .take(query.page_size as usize)
        .map(record)
        .collect();
    let next_cursor = match data.last() {
        Some(last) if has_more => Some(
            Cursor {
                after_id: last.id,
                page: page_number.saturating_add(1),
            }
            .encode(),
        ),
        _ => None,
    };
    Ok(DataPage {
        data,
        total,
        total_exact,
        page: page_number,
        page_size: query.page_size,
        has_more,
        next_cursor,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("query failed: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// A column whose CHECK constraint lists its values held another: the schema and this
    /// service disagree (a migration this version does not know).
    #[error("column {column} holds {value:?}, which this version does not know")]
    UnknownValue { column: String, value: String },
}

fn record(row: &Row) -> DataRecord {
    DataRecord {
        id: row.get(0),
        source: row.get(1),
        source_id: row.get(2),
        name: row.get(3),
        value: row.get(4),
        description: row.get(5),
        created_at: row.get(6),
        updated_at: row.get(7),
    }
}

/// `search` as an `ILIKE` pattern matching it anywhere, with `\`, `%` and `_` taken literally.
pub fn like_pattern(search: &str) -> String {
    let mut pattern = String::with_capacity(search.len() + 2);
    pattern.push('%');
    for c in search.chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// `$1` the limit, `$2` the id a page starts after, `$3` the offset, then the filters'.
macro_rules! page_sql {
    ($filter:literal) => {
        concat!(
            "SELECT id, source, source_id, name, value, description, created_at, updated_at
             FROM normalized_data WHERE id > $2",
            $filter,
            " ORDER BY id LIMIT $1 OFFSET $3"
        )
    };
}

const PAGE_ALL: &str = page_sql!("");
const PAGE_SOURCE: &str = page_sql!(" AND source = $4");
const PAGE_SEARCH: &str = page_sql!(" AND (name ILIKE $4 OR description ILIKE $4)");
const PAGE_SOURCE_SEARCH: &str =
    page_sql!(" AND source = $4 AND (name ILIKE $5 OR description ILIKE $5)");

/// Exact and O(sources): the normalizer keeps `normalized_rows` in the batch transaction.
const COUNT_ALL: &str = "SELECT coalesce(sum(normalized_rows), 0)::bigint FROM etl_checkpoint";
const COUNT_SOURCE: &str =
    "SELECT coalesce(sum(normalized_rows), 0)::bigint FROM etl_checkpoint WHERE source = $1";
const COUNT_SEARCH: &str = "SELECT count(*) FROM (SELECT 1 FROM normalized_data
     WHERE name ILIKE $1 OR description ILIKE $1 LIMIT $2) capped";
const COUNT_SOURCE_SEARCH: &str = "SELECT count(*) FROM (SELECT 1 FROM normalized_data
     WHERE source = $1 AND (name ILIKE $2 OR description ILIKE $2) LIMIT $3) capped";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_take_wildcards_and_backslashes_literally() {
        assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
        assert_eq!(like_pattern("plain"), "%plain%");
    }

    #[test]
    fn cursors_round_trip_and_anything_else_is_refused() {
        let cursor = Cursor {
            after_id: 900_000_000_000_000_001,
            page: 999_999_999,
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        let first = Cursor {
            after_id: 0,
            page: 1,
        };
        assert_eq!(Cursor::decode("v1.1.0"), Some(first));
        for bad in [
            "",
            "v1",
            "v1.",
            "v1.2",
            "v1.2.",
            "v2.2.10",
            "v1.0.10",
            "v1.02.10",
            "v1.2.010",
            "v1.2.ten",
            "v1.-2.10",
            "v1.2.10.3",
            "v1.1234567890.1",
            "v1.2.1234567890123456789",
            " v1.2.10",
            "v1.2.10 ",
            "v1.+2.10",
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad:?}");
        }
    }

    /// The pattern the spec publishes and the decoder agree: the spec carries
    /// [`CURSOR_PATTERN`], and strings on either side of each of its bounds decode or not as
    /// the pattern says.
    #[test]
    fn the_published_pattern_describes_exactly_what_decodes() {
        // The attribute on the parameter cannot name the constant: the committed spec
        // (checked against the served one by a test) must carry the same text.
        let spec: serde_json::Value =
            serde_json::from_str(include_str!("../openapi.json")).unwrap();
        let cursor = spec["paths"]["/data"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "cursor")
            .unwrap();
        assert_eq!(cursor["schema"]["pattern"], CURSOR_PATTERN);
        for (text, matches_pattern) in [
            ("v1.1.0", true),
            ("v1.2.10", true),
            ("v1.999999999.999999999999999999", true),
            ("v1.0.1", false),
            ("v1.1.01", false),
            ("v1.1.", false),
            ("v1.1234567890.1", false),
            ("v1.1.1234567890123456789", false),
        ] {
            assert_eq!(Cursor::decode(text).is_some(), matches_pattern, "{text}");
        }
    }

    const COLUMNS: &str = "id, source, source_id, name, value, description, created_at, updated_at";

    #[test]
    fn every_statement_selects_every_column() {
        for sql in [PAGE_ALL, PAGE_SOURCE, PAGE_SEARCH, PAGE_SOURCE_SEARCH] {
            assert!(sql.contains(COLUMNS), "{sql}");
        }
    }
}
