//! `GET /data`: pages of `normalized_data`, and one record by its key. Every statement is
//! made of constant SQL text only ([`Sql`]), one text per combination of filters and order,
//! every value a bind parameter; each order walks its index: the primary key for `id` (a
//! source's partition's for a source), `(updated_at, id)` for `-updated_at` and `(value, id)`
//! for `value` and `-value` (V12), and the trigram indexes narrow searches.
//!
//! Pages come two ways through the same statements: by number (`OFFSET`, which walks every
//! earlier row, so deep pages cost their depth) or by [`Cursor`] (after the last row seen, in
//! the page's order: one index descent at any depth). In `id` order a walk by cursor neither
//! skips nor repeats a record while others are inserted or updated (ids never change, and new
//! records get larger ones); in the other orders a record whose key changes during the walk
//! moves to its new place, which the walk may have passed.

use poem_openapi::types::Example;
use poem_openapi::{Enum, Object};
use time::OffsetDateTime;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

use crate::caching;
use crate::reader::{Reader, Snapshot, Statement};
use crate::sql::Sql;

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
                    page: 2,
                    after_id: 1_042,
                    after: After::Id,
                }
                .encode(),
            ),
        }
    }
}

/// The order of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Enum)]
pub enum Sort {
    /// Insertion order, oldest first.
    #[default]
    #[oai(rename = "id")]
    Id,
    /// Last changed first.
    #[oai(rename = "-updated_at")]
    NewestFirst,
    /// Smallest value first.
    #[oai(rename = "value")]
    ValueAscending,
    /// Largest value first.
    #[oai(rename = "-value")]
    ValueDescending,
}

impl Sort {
    /// The `ORDER BY` clause of this order, which its index serves.
    pub fn order_by(self) -> &'static str {
        match self {
            Sort::Id => " ORDER BY id",
            Sort::NewestFirst => " ORDER BY updated_at DESC, id DESC",
            Sort::ValueAscending => " ORDER BY value, id",
            Sort::ValueDescending => " ORDER BY value DESC, id DESC",
        }
    }
}

/// Where a walk by cursor stands: which page comes next, and the order key of the last row
/// seen (its id, and the sorted column's value in the other orders). Clients treat it as
/// opaque; its forms are `v1.<page>.<id>` (order `id`), `v1u.<page>.<id>.<microseconds since
/// 1970>` (`-updated_at`), and `v1a.` / `v1d.<page>.<id>.<the value's 64 bits in hex>`
/// (`value` / `-value`), which [`CURSOR_PATTERN`] describes exactly, so every cursor the spec
/// allows is one this API can follow (one a client made up just starts after some row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub page: u32,
    pub after_id: i64,
    pub after: After,
}

/// The sorted column's value of the last row a cursor saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Id,
    UpdatedAt {
        micros: i64,
    },
    /// Bits, so that every value round-trips exactly.
    Value {
        bits: u64,
        descending: bool,
    },
}

/// Every [`Cursor::encode`] output and nothing else: page 1–999,999,999, an id of at most 18
/// digits, microseconds of at most 18 digits either side of 1970, a value as 16 hex digits (all
/// fit their types, so any match decodes).
pub const CURSOR_PATTERN: &str = r"^v1(\.[1-9][0-9]{0,8}\.(0|[1-9][0-9]{0,17})|u\.[1-9][0-9]{0,8}\.(0|[1-9][0-9]{0,17})\.(0|-?[1-9][0-9]{0,17})|[ad]\.[1-9][0-9]{0,8}\.(0|[1-9][0-9]{0,17})\.[0-9a-f]{16})$";

impl Cursor {
    pub fn encode(self) -> String {
        let Cursor { page, after_id, .. } = self;
        match self.after {
            After::Id => format!("v1.{page}.{after_id}"),
            After::UpdatedAt { micros } => format!("v1u.{page}.{after_id}.{micros}"),
            After::Value { bits, descending } => {
                let tag = if descending { 'd' } else { 'a' };
                format!("v1{tag}.{page}.{after_id}.{bits:016x}")
            }
        }
    }

    /// `None` for anything [`CURSOR_PATTERN`] does not match.
    pub fn decode(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("v1")?;
        let (tag, rest) = match rest.as_bytes().first()? {
            b'.' => (None, rest),
            &tag => (Some(tag), rest.get(1..)?),
        };
        let mut parts = rest.strip_prefix('.')?.split('.');
        let (page, after_id) = (parts.next()?, parts.next()?);
        let key = parts.next();
        if parts.next().is_some() || !canonical(page, 9) || page == "0" || !canonical(after_id, 18)
        {
            return None;
        }
        let after = match (tag, key) {
            (None, None) => After::Id,
            (Some(b'u'), Some(micros)) => {
                let digits = micros.strip_prefix('-').unwrap_or(micros);
                if !canonical(digits, 18) || micros == "-0" {
                    return None;
                }
                After::UpdatedAt {
                    micros: micros.parse().ok()?,
                }
            }
            (Some(tag @ (b'a' | b'd')), Some(bits)) => {
                let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
                if bits.len() != 16 || !bits.bytes().all(hex) {
                    return None;
                }
                After::Value {
                    bits: u64::from_str_radix(bits, 16).ok()?,
                    descending: tag == b'd',
                }
            }
            _ => return None,
        };
        Some(Self {
            page: page.parse().ok()?,
            after_id: after_id.parse().ok()?,
            after,
        })
    }

    /// The order this cursor walks.
    pub fn sort(&self) -> Sort {
        match self.after {
            After::Id => Sort::Id,
            After::UpdatedAt { .. } => Sort::NewestFirst,
            After::Value {
                descending: false, ..
            } => Sort::ValueAscending,
            After::Value {
                descending: true, ..
            } => Sort::ValueDescending,
        }
    }

    /// The cursor after `record` in order `sort`.
    fn after(record: &DataRecord, sort: Sort, page: u32) -> Self {
        let after = match sort {
            Sort::Id => After::Id,
            Sort::NewestFirst => After::UpdatedAt {
                micros: (record.updated_at.unix_timestamp_nanos() / 1_000) as i64,
            },
            Sort::ValueAscending | Sort::ValueDescending => After::Value {
                bits: record.value.to_bits(),
                descending: sort == Sort::ValueDescending,
            },
        };
        Self {
            page,
            after_id: record.id,
            after,
        }
    }
}

/// Decimal digits, at most `max` of them, without a leading zero (but for 0 itself).
fn canonical(digits: &str, max: usize) -> bool {
    !digits.is_empty()
        && digits.len() <= max
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
}

/// What a page holds: the records matching every filter given.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub source: Option<String>,
    pub search: Option<String>,
    pub updated_since: Option<OffsetDateTime>,
    pub min_value: Option<f64>,
    pub max_value: Option<f64>,
}

impl Filters {
    /// Whether counting the matches needs a scan (else `etl_checkpoint` has the count).
    fn need_a_scan_to_count(&self) -> bool {
        self.search.is_some()
            || self.updated_since.is_some()
            || self.min_value.is_some()
            || self.max_value.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct DataQuery {
    /// Where the page starts: a page number, or after a cursor's row.
    pub start: Start,
    pub page_size: u32,
    pub filters: Filters,
    /// A cursor's own order wins (the API refuses a cursor of another order).
    pub sort: Sort,
}

#[derive(Debug, Clone, Copy)]
pub enum Start {
    Page(u32),
    After(Cursor),
}

/// A page, and the data version it is at least as new as (see [`caching::DATA_VERSION`]).
pub async fn list(reader: &Reader, query: &DataQuery) -> Result<(DataPage, String), QueryError> {
    let limit = i64::from(query.page_size) + 1; // one extra row tells whether there is more
    let (page_number, offset, cursor) = match query.start {
        Start::Page(page) => (page, i64::from(page - 1) * i64::from(query.page_size), None),
        Start::After(cursor) => (cursor.page, 0, Some(cursor)),
    };
    let sort = cursor.as_ref().map_or(query.sort, Cursor::sort);
    let filters = &query.filters;
    let pattern = filters.search.as_deref().map(like_pattern);
    // The cursor's key, in the type of the column it follows.
    let (after_updated, after_value) = match cursor.map(|c| c.after) {
        Some(After::UpdatedAt { micros }) => (Some(timestamp_of_micros(micros)), None),
        Some(After::Value { bits, .. }) => (None, Some(f64::from_bits(bits))),
        _ => (None, None),
    };
    let after_id = cursor.map(|c| c.after_id);

    let mut page = Sql::new(SELECT_RECORDS);
    page.filters(filters, pattern.as_ref());
    if let Some(after_id) = &after_id {
        // After the cursor's row in the page's order (the cursor's own): its key, then its id.
        let keyed: Option<(&'static str, &(dyn ToSql + Sync), Type)> =
            match (&after_updated, &after_value) {
                (Some(at), _) => Some((" AND (updated_at, id) < (", at, Type::TIMESTAMPTZ)),
                (_, Some(value)) if sort == Sort::ValueAscending => {
                    Some((" AND (value, id) > (", value, Type::FLOAT8))
                }
                (_, Some(value)) => Some((" AND (value, id) < (", value, Type::FLOAT8)),
                (None, None) => None,
            };
        match keyed {
            None => page.push(" AND id > ").bind(after_id, Type::INT8),
            Some((clause, key, ty)) => page
                .push(clause)
                .bind(key, ty)
                .push(", ")
                .bind(after_id, Type::INT8)
                .push(")"),
        };
    }
    page.push(sort.order_by());
    page.push(" LIMIT ").bind(&limit, Type::INT8);
    if cursor.is_none() {
        page.push(" OFFSET ").bind(&offset, Type::INT8);
    }

    let cap = SEARCH_COUNT_CAP + 1;
    let scan_to_count = filters.need_a_scan_to_count();
    let count = if scan_to_count {
        let mut count = Sql::new("SELECT count(*) FROM (SELECT 1 FROM normalized_data WHERE true");
        count.filters(filters, pattern.as_ref());
        count
            .push(" LIMIT ")
            .bind(&cap, Type::INT8)
            .push(") capped");
        count
    } else {
        match &filters.source {
            None => Sql::new(COUNT_ALL),
            Some(source) => {
                let mut count = Sql::new(COUNT_SOURCE);
                count.param(source, Type::TEXT); // its $1
                count
            }
        }
    };
    // Plain and per-source pages have one best plan; ranges and searches have one per value.
    let [page, count] = [page, count].map(|sql| match scan_to_count {
        false => Statement::new(sql.text, sql.params),
        true => Statement::per_values(sql.text, sql.params),
    });
    // The version before the page: statements run in order, so the page is at least as new
    // as it, and a client revalidating with its tag never keeps a page older than the tag
    // says. A count from the checkpoints comes with the version, in the same statement.
    let (version, rows, counted) = if scan_to_count {
        let version = Statement::new(caching::DATA_VERSION, vec![]);
        let mut answers = reader
            .read(Snapshot::PerStatement, &[version, page, count])
            .await?
            .into_iter();
        let version = version_of(answers.next());
        let rows = answers.next().unwrap_or_default();
        let counted: i64 = answers
            .next()
            .and_then(|rows| rows.first().map(|row| row.get(0)))
            .unwrap_or(0);
        (version, rows, counted)
    } else {
        let mut answers = reader
            .read(Snapshot::PerStatement, &[count, page])
            .await?
            .into_iter();
        let (counted, version) = answers
            .next()
            .and_then(|rows| rows.first().map(|row| (row.get(0), row.get(1))))
            .unwrap_or_default();
        (version, answers.next().unwrap_or_default(), counted)
    };
    let (total, total_exact) = if scan_to_count {
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
        Some(last) if has_more => {
            Some(Cursor::after(last, sort, page_number.saturating_add(1)).encode())
        }
        _ => None,
    };
    let page = DataPage {
        data,
        total,
        total_exact,
        page: page_number,
        page_size: query.page_size,
        has_more,
        next_cursor,
    };
    Ok((page, version))
}

/// The current data version (see [`caching::DATA_VERSION`]): one small statement, to answer a
/// revalidation without reading the page.
pub async fn version(reader: &Reader) -> Result<String, QueryError> {
    let version = Statement::new(caching::DATA_VERSION, vec![]);
    let mut answers = reader.read(Snapshot::PerStatement, &[version]).await?;
    Ok(version_of(answers.pop()))
}

fn version_of(rows: Option<Vec<Row>>) -> String {
    rows.and_then(|rows| rows.first().map(|row| row.get(0)))
        .unwrap_or_default()
}

/// The record `source_id` of `source`, if there is one, and the data version it is at least
/// as new as.
pub async fn get(
    reader: &Reader,
    source: &str,
    source_id: &str,
) -> Result<(Option<DataRecord>, String), QueryError> {
    let source = source.to_owned();
    let source_id = source_id.to_owned();
    let version = Statement::new(caching::DATA_VERSION, vec![]);
    let one = Statement::new(
        RECORD,
        vec![(&source, Type::TEXT), (&source_id, Type::TEXT)],
    );
    let mut answers = reader
        .read(Snapshot::PerStatement, &[version, one])
        .await?
        .into_iter();
    let version = version_of(answers.next());
    let record = answers.next().and_then(|rows| rows.first().map(record));
    Ok((record, version))
}

/// `micros` since 1970 as a timestamp, clamped to what `time` represents (years ±9999): a
/// cursor a client made up with a key beyond that starts where the clamped one would.
fn timestamp_of_micros(micros: i64) -> OffsetDateTime {
    let (min, max) = (
        time::macros::datetime!(-9999-01-01 00:00:00 UTC),
        time::macros::datetime!(9999-12-31 23:59:59.999999 UTC),
    );
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).unwrap_or(if micros < 0 {
        min
    } else {
        max
    })
}

/// The filters of `GET /data` (and of its export).
impl<'a> Sql<'a> {
    /// ` AND …` for each filter given; `pattern` is the search's.
    pub(crate) fn filters(
        &mut self,
        filters: &'a Filters,
        pattern: Option<&'a String>,
    ) -> &mut Self {
        if let Some(source) = &filters.source {
            self.push(" AND source = ").bind(source, Type::TEXT);
        }
        if let Some(pattern) = pattern {
            let p = self.param(pattern, Type::TEXT);
            self.push(" AND (name ILIKE ")
                .push(p)
                .push(" OR description ILIKE ")
                .push(p)
                .push(")");
        }
        if let Some(since) = &filters.updated_since {
            self.push(" AND updated_at >= ")
                .bind(since, Type::TIMESTAMPTZ);
        }
        if let Some(min) = &filters.min_value {
            self.push(" AND value >= ").bind(min, Type::FLOAT8);
        }
        if let Some(max) = &filters.max_value {
            self.push(" AND value <= ").bind(max, Type::FLOAT8);
        }
        self
    }
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

pub(crate) fn record(row: &Row) -> DataRecord {
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

/// Every column [`record`] reads, in its order, of the records the filters that follow select:
/// the head of every read of records (pages, one record, exports).
macro_rules! select_records {
    () => {
        "SELECT id, source, source_id, name, value, description, created_at, updated_at
         FROM normalized_data WHERE true"
    };
}

pub(crate) const SELECT_RECORDS: &str = select_records!();

const RECORD: &str = concat!(select_records!(), " AND source = $1 AND source_id = $2");

/// Exact and O(sources): the normalizer keeps `normalized_rows` in the batch transaction. With
/// the data version, read in the same pass over the checkpoints.
const COUNT_ALL: &str = concat!(
    "SELECT coalesce(sum(c.normalized_rows), 0)::bigint, ",
    caching::data_version!(),
    caching::versioned_from!()
);
/// [`COUNT_ALL`] of source `$1`.
const COUNT_SOURCE: &str = concat!(
    "SELECT coalesce(sum(c.normalized_rows) FILTER (WHERE source = $1), 0)::bigint, ",
    caching::data_version!(),
    caching::versioned_from!()
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_take_wildcards_and_backslashes_literally() {
        assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
        assert_eq!(like_pattern("plain"), "%plain%");
    }

    fn cursor(page: u32, after_id: i64, after: After) -> Cursor {
        Cursor {
            page,
            after_id,
            after,
        }
    }

    #[test]
    fn cursors_round_trip_in_every_order_and_anything_else_is_refused() {
        for c in [
            cursor(999_999_999, 900_000_000_000_000_001, After::Id),
            cursor(1, 0, After::Id),
            cursor(
                2,
                7,
                After::UpdatedAt {
                    micros: 1_764_581_400_000_001,
                },
            ),
            cursor(
                2,
                7,
                After::UpdatedAt {
                    micros: -86_400_000_000,
                },
            ),
            cursor(2, 7, After::UpdatedAt { micros: 0 }),
            cursor(
                3,
                9,
                After::Value {
                    bits: (-12.5f64).to_bits(),
                    descending: false,
                },
            ),
            cursor(
                3,
                9,
                After::Value {
                    bits: 0,
                    descending: true,
                },
            ),
        ] {
            assert_eq!(Cursor::decode(&c.encode()), Some(c), "{}", c.encode());
        }
        assert_eq!(Cursor::decode("v1.1.0"), Some(cursor(1, 0, After::Id)));
        assert_eq!(
            Cursor::decode("v1d.4.10.c029000000000000").map(|c| (c.sort(), c.after)),
            Some((
                Sort::ValueDescending,
                After::Value {
                    bits: (-12.5f64).to_bits(),
                    descending: true
                }
            ))
        );
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
            "v1u.2.10",
            "v1u.2.10.-0",
            "v1u.2.10.01",
            "v1u.2.10.1234567890123456789",
            "v1a.2.10.c02900000000000",
            "v1a.2.10.C029000000000000",
            "v1d.2.10.c0290000000000000",
            "v1x.2.10.5",
            "v1u2.10.5",
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
            ("v1u.2.10.-999999999999999999", true),
            ("v1u.2.10.999999999999999999", true),
            ("v1a.2.10.ffffffffffffffff", true),
            ("v1d.2.10.0000000000000000", true),
            ("v1.0.1", false),
            ("v1.1.01", false),
            ("v1.1.", false),
            ("v1.1234567890.1", false),
            ("v1.1.1234567890123456789", false),
            ("v1u.2.10.-0", false),
            ("v1u.2.10", false),
            ("v1a.2.10.fffffffffffffff", false),
            ("v1.2.10.5", false),
        ] {
            assert_eq!(Cursor::decode(text).is_some(), matches_pattern, "{text}");
        }
    }

    #[test]
    fn keys_beyond_what_time_holds_are_clamped_not_refused() {
        assert_eq!(timestamp_of_micros(999_999_999_999_999_999).year(), 9999);
        assert_eq!(timestamp_of_micros(-999_999_999_999_999_999).year(), -9999);
        assert_eq!(timestamp_of_micros(0), OffsetDateTime::UNIX_EPOCH);
    }

    #[test]
    fn every_read_of_records_selects_every_column_in_the_order_record_reads_them() {
        const COLUMNS: &str =
            "SELECT id, source, source_id, name, value, description, created_at, updated_at";
        for sql in [SELECT_RECORDS, RECORD] {
            assert!(sql.starts_with(COLUMNS), "{sql}");
        }
    }

    #[test]
    fn statements_are_constant_pieces_with_one_placeholder_per_value() {
        let filters = Filters {
            source: Some("s".into()),
            search: Some("x".into()),
            updated_since: Some(OffsetDateTime::UNIX_EPOCH),
            min_value: Some(1.0),
            max_value: Some(2.0),
        };
        let pattern = "%x%".to_owned();
        let mut sql = Sql::new("SELECT 1 FROM normalized_data WHERE true");
        sql.filters(&filters, Some(&pattern));
        assert_eq!(
            sql.text,
            "SELECT 1 FROM normalized_data WHERE true AND source = $1 \
             AND (name ILIKE $2 OR description ILIKE $2) AND updated_at >= $3 \
             AND value >= $4 AND value <= $5"
        );
        assert_eq!(sql.params.len(), 5);
    }
}
