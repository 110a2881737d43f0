//! `GET /data`: pages of `normalized_data`. One constant SQL statement per filter combination,
//! every value a bind parameter, so each has a plan that uses its index: the primary key for
//! plain pages, `(source, id)` for a source, the trigram indexes for searches.

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
}

#[derive(Debug, Clone)]
pub struct DataQuery {
    pub page: u32,
    pub page_size: u32,
    pub source: Option<String>,
    pub search: Option<String>,
}

pub async fn list(reader: &Reader, query: &DataQuery) -> Result<DataPage, QueryError> {
    let limit = i64::from(query.page_size) + 1; // one extra row tells whether there is more
    let offset = i64::from(query.page - 1) * i64::from(query.page_size);
    let pattern = query.search.as_deref().map(like_pattern);
    let cap = SEARCH_COUNT_CAP + 1;
    let (int, text) = (Type::INT8, Type::TEXT);
    let (page, count) = match (&query.source, &pattern) {
        (None, None) => (
            Statement::new(PAGE_ALL, vec![(&limit, int.clone()), (&offset, int)]),
            Statement::new(COUNT_ALL, vec![]),
        ),
        (Some(source), None) => (
            Statement::new(
                PAGE_SOURCE,
                vec![
                    (&limit, int.clone()),
                    (&offset, int),
                    (source, text.clone()),
                ],
            ),
            Statement::new(COUNT_SOURCE, vec![(source, text)]),
        ),
        (None, Some(pattern)) => (
            Statement::new(
                PAGE_SEARCH,
                vec![
                    (&limit, int.clone()),
                    (&offset, int.clone()),
                    (pattern, text.clone()),
                ],
            ),
            Statement::new(COUNT_SEARCH, vec![(pattern, text), (&cap, int)]),
        ),
        (Some(source), Some(pattern)) => (
            Statement::new(
                PAGE_SOURCE_SEARCH,
                vec![
                    (&limit, int.clone()),
                    (&offset, int.clone()),
                    (source, text.clone()),
                    (pattern, text.clone()),
                ],
            ),
            Statement::new(
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
    let data = rows
        .iter()
        .take(query.page_size as usize)
        .map(record)
        .collect();
    Ok(DataPage {
        data,
        total,
        total_exact,
        page: query.page,
        page_size: query.page_size,
        has_more,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("query failed: {0}")]
    Db(#[from] tokio_postgres::Error),
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

macro_rules! page_sql {
    ($where:literal) => {
        concat!(
            "SELECT id, source, source_id, name, value, description, created_at, updated_at
             FROM normalized_data ",
            $where,
            " ORDER BY id LIMIT $1 OFFSET $2"
        )
    };
}

const PAGE_ALL: &str = page_sql!("");
const PAGE_SOURCE: &str = page_sql!("WHERE source = $3");
const PAGE_SEARCH: &str = page_sql!("WHERE (name ILIKE $3 OR description ILIKE $3)");
const PAGE_SOURCE_SEARCH: &str =
    page_sql!("WHERE source = $3 AND (name ILIKE $4 OR description ILIKE $4)");

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

    const COLUMNS: &str = "id, source, source_id, name, value, description, created_at, updated_at";

    #[test]
    fn every_statement_selects_every_column() {
        for sql in [PAGE_ALL, PAGE_SOURCE, PAGE_SEARCH, PAGE_SOURCE_SEARCH] {
            assert!(sql.contains(COLUMNS), "{sql}");
        }
    }
}
