//! `GET /runs` and `GET /rejects`: what the pipeline did, and each record it could not take
//! with why, newest first. Paged like `/data`, by number or by cursor (here: before the last id
//! seen, on the primary key or the `(source, id)` indexes of V13), so an operator can find in
//! Swagger UI why a row was rejected.

use base64::Engine;
use poem_openapi::types::Example;
use poem_openapi::{Enum, Object};
use time::OffsetDateTime;
use tokio_postgres::types::Type;
use tokio_postgres::Row;

use crate::data::{After, Cursor, QueryError, Start};
use crate::reader::{Reader, Snapshot, Statement};
use crate::sql::Sql;
use crate::stats::{one_of, run_columns, run_of, wire_name, RunInfo, RunStatus, Service};

/// Rejected records are shown up to this many bytes each (`raw_truncated` says when cut), so
/// that a page of them stays small whatever was rejected.
pub const RAW_SHOWN_BYTES: i32 = 64 * 1024;

/// A page of runs, newest first.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct RunPage {
    pub data: Vec<RunInfo>,
    pub page: u32,
    pub page_size: u32,
    /// Whether a later page has runs.
    pub has_more: bool,
    /// Pass as `cursor` for the next page. Absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

/// A page of rejected records, newest first.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct RejectPage {
    pub data: Vec<Reject>,
    pub page: u32,
    pub page_size: u32,
    /// Whether a later page has rejects.
    pub has_more: bool,
    /// Pass as `cursor` for the next page. Absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

/// A record the ingester could not land (`ingest`) or the normalizer could not normalize
/// (`normalize`), with why and its exact bytes. `position` says where it was in the source.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct Reject {
    pub id: i64,
    /// The run that rejected it; absent once that run's history is gone.
    #[oai(skip_serializing_if_is_none)]
    pub run_id: Option<i64>,
    pub stage: Stage,
    pub source: String,
    /// Known once the record got far enough to have one (always at `normalize`).
    #[oai(skip_serializing_if_is_none)]
    pub source_id: Option<String>,
    // No doc comment: poem-openapi would wrap the `$ref` in an `allOf` to carry it.
    pub position: RejectPosition,
    /// Why it was rejected.
    pub reason: String,
    pub rejected_at: OffsetDateTime,
    /// The record as received: as text when it is valid UTF-8 (`raw_encoding` `utf8`), else
    /// base64 (`base64`); its first 64 KiB only when `raw_truncated`.
    pub raw: String,
    pub raw_encoding: RawEncoding,
    /// The record's whole size in bytes.
    pub raw_bytes: i64,
    pub raw_truncated: bool,
}

/// Where a rejected record was: its CSV line, its REST page and item index, or (at
/// `normalize`) the id of its raw row; only what applies is present.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct RejectPosition {
    #[oai(skip_serializing_if_is_none)]
    pub line: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub page: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub item: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub raw_id: Option<i64>,
}

/// Where a record was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Stage {
    Ingest,
    Normalize,
}

/// How `raw` holds the record's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum RawEncoding {
    Utf8,
    Base64,
}

/// Which page, of at most how many.
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    pub start: Start,
    pub page_size: u32,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilters {
    pub source: Option<String>,
    pub service: Option<Service>,
    pub status: Option<RunStatus>,
}

#[derive(Debug, Clone, Default)]
pub struct RejectFilters {
    pub source: Option<String>,
    pub stage: Option<Stage>,
}

pub async fn runs(
    reader: &Reader,
    paging: Paging,
    filters: &RunFilters,
) -> Result<RunPage, QueryError> {
    let service = filters.service.map(wire_name);
    let status = filters.status.map(wire_name);
    let mut sql = Sql::new(concat!(
        "SELECT ",
        run_columns!(),
        " FROM etl_runs WHERE true"
    ));
    if let Some(source) = &filters.source {
        sql.push(" AND source = ").bind(source, Type::TEXT);
    }
    if let Some(service) = &service {
        sql.push(" AND service = ").bind(service, Type::TEXT);
    }
    if let Some(status) = &status {
        sql.push(" AND status = ").bind(status, Type::TEXT);
    }
    let (rows, page) = newest_first(reader, sql, paging).await?;
    let data = rows.iter().map(run_of).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = page.next_cursor(data.last().map(|r| r.run_id));
    Ok(RunPage {
        data,
        page: page.number,
        page_size: paging.page_size,
        has_more: page.has_more,
        next_cursor,
    })
}

pub async fn rejects(
    reader: &Reader,
    paging: Paging,
    filters: &RejectFilters,
) -> Result<RejectPage, QueryError> {
    let stage = filters.stage.map(wire_name);
    let shown = RAW_SHOWN_BYTES;
    let mut sql = Sql::new(
        "SELECT id, run_id, stage, source, source_id, line, page, item, raw_id, reason,
             created_at, length(raw)::bigint, substring(raw FROM 1 FOR ",
    );
    sql.bind(&shown, Type::INT4)
        .push(") FROM etl_rejects WHERE true");
    if let Some(source) = &filters.source {
        sql.push(" AND source = ").bind(source, Type::TEXT);
    }
    if let Some(stage) = &stage {
        sql.push(" AND stage = ").bind(stage, Type::TEXT);
    }
    let (rows, page) = newest_first(reader, sql, paging).await?;
    let data = rows.iter().map(reject_of).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = page.next_cursor(data.last().map(|r| r.id));
    Ok(RejectPage {
        data,
        page: page.number,
        page_size: paging.page_size,
        has_more: page.has_more,
        next_cursor,
    })
}

/// Where a page stands once read.
struct PageRead {
    number: u32,
    has_more: bool,
}

impl PageRead {
    fn next_cursor(&self, last_id: Option<i64>) -> Option<String> {
        let last_id = last_id.filter(|_| self.has_more)?;
        Some(
            Cursor {
                page: self.number.saturating_add(1),
                after_id: last_id,
                after: After::Id,
            }
            .encode(),
        )
    }
}

/// The page `paging` asks for of `sql` (a `SELECT … WHERE …` whose first column is `id`),
/// newest first: its rows, at most `page_size`.
async fn newest_first(
    reader: &Reader,
    mut sql: Sql<'_>,
    paging: Paging,
) -> Result<(Vec<Row>, PageRead), QueryError> {
    let limit = i64::from(paging.page_size) + 1; // one extra row tells whether there is more
    let (number, offset, before) = match paging.start {
        Start::Page(page) => (
            page,
            i64::from(page - 1) * i64::from(paging.page_size),
            None,
        ),
        Start::After(cursor) => (cursor.page, 0, Some(cursor.after_id)),
    };
    if let Some(before) = &before {
        sql.push(" AND id < ").bind(before, Type::INT8);
    }
    sql.push(" ORDER BY id DESC LIMIT ")
        .bind(&limit, Type::INT8);
    if before.is_none() {
        sql.push(" OFFSET ").bind(&offset, Type::INT8);
    }
    let mut rows = reader
        .read(
            Snapshot::PerStatement,
            &[Statement::new(sql.text, sql.params)],
        )
        .await?
        .pop()
        .unwrap_or_default();
    let has_more = rows.len() as i64 > i64::from(paging.page_size);
    rows.truncate(paging.page_size as usize);
    Ok((rows, PageRead { number, has_more }))
}

fn reject_of(row: &Row) -> Result<Reject, QueryError> {
    let raw_bytes: i64 = row.try_get(11)?;
    let shown: Vec<u8> = row.try_get(12)?;
    let raw_truncated = raw_bytes > shown.len() as i64;
    let (raw, raw_encoding) = shown_raw(shown, raw_truncated);
    Ok(Reject {
        id: row.try_get(0)?,
        run_id: row.try_get(1)?,
        stage: one_of(row, 2)?,
        source: row.try_get(3)?,
        source_id: row.try_get(4)?,
        position: RejectPosition {
            line: row.try_get(5)?,
            page: row.try_get(6)?,
            item: row.try_get(7)?,
            raw_id: row.try_get(8)?,
        },
        reason: row.try_get(9)?,
        rejected_at: row.try_get(10)?,
        raw,
        raw_encoding,
        raw_bytes,
        raw_truncated,
    })
}

/// `bytes` as text when they are UTF-8 (when `truncated`, a character the cut split is left
/// out), else base64.
fn shown_raw(mut bytes: Vec<u8>, truncated: bool) -> (String, RawEncoding) {
    if let Err(e) = std::str::from_utf8(&bytes) {
        // Cut inside a character (at most 3 bytes of it) and valid before: text up to the cut.
        if truncated && e.error_len().is_none() && bytes.len() - e.valid_up_to() < 4 {
            bytes.truncate(e.valid_up_to());
        }
    }
    match String::from_utf8(bytes) {
        Ok(text) => (text, RawEncoding::Utf8),
        Err(e) => (
            base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
            RawEncoding::Base64,
        ),
    }
}

impl Example for RunPage {
    fn example() -> Self {
        RunPage {
            data: vec![RunInfo::example()],
            page: 1,
            page_size: 1,
            has_more: true,
            next_cursor: Some("v1.2.42".into()),
        }
    }
}

impl Example for RejectPage {
    fn example() -> Self {
        RejectPage {
            data: vec![Reject::example()],
            page: 1,
            page_size: 1,
            has_more: false,
            next_cursor: None,
        }
    }
}

impl Example for Reject {
    fn example() -> Self {
        Reject {
            id: 7,
            run_id: Some(42),
            stage: Stage::Ingest,
            source: "products".into(),
            source_id: None,
            position: RejectPosition::example(),
            reason: "value: \"twelve\" is not a number".into(),
            rejected_at: crate::stats::example_time(),
            raw: "sku-7,Espresso cup,twelve,Porcelain".into(),
            raw_encoding: RawEncoding::Utf8,
            raw_bytes: 35,
            raw_truncated: false,
        }
    }
}

impl Example for RejectPosition {
    fn example() -> Self {
        RejectPosition {
            line: Some(8),
            page: None,
            item: None,
            raw_id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_records_show_as_text_when_utf8_and_as_base64_otherwise() {
        assert_eq!(
            shown_raw("é,\u{0}\"x\"".as_bytes().to_vec(), false),
            ("é,\u{0}\"x\"".to_owned(), RawEncoding::Utf8)
        );
        assert_eq!(
            shown_raw(vec![0x66, 0xff, 0x6f], false),
            ("Zv9v".to_owned(), RawEncoding::Base64)
        );
        // A cut inside a character leaves it out; a bad byte before the cut does not.
        let cut = "abé".as_bytes()[..3].to_vec();
        assert_eq!(
            shown_raw(cut.clone(), true),
            ("ab".to_owned(), RawEncoding::Utf8)
        );
        assert_eq!(shown_raw(cut, false).1, RawEncoding::Base64);
        assert_eq!(shown_raw(vec![0xff, 0xc3], true).1, RawEncoding::Base64);
    }
}
