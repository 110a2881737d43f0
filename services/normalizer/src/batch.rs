//! One batch of one source, in one transaction: claim the source's checkpoint row (`FOR UPDATE
//! SKIP LOCKED`, so replicas never work on a source at once), read the raw rows changed after the
//! checkpoint, classify them (valid or rejected, no database), apply them (upsert the valid ones,
//! record the invalid ones), and advance the checkpoint. The upsert and the checkpoint commit
//! together or not at all: no loss, no double effect.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use etl_shared::raw::RawTable;
use etl_shared::runs::RunCounts;
use etl_shared::sources::{Source, SourceKind};
use tokio_postgres::{Client, Row, Transaction};

use crate::mapping::{
    normalize, Field, FieldPaths, MAX_DESCRIPTION_BYTES, MAX_NAME_CHARS, MAX_VALUE_CHARS,
};

/// Links per batch span: enough for every ingest batch a normalizer batch spans in practice
/// (a batch of 1,000 rows reads from one or two 5,000-row ingest batches).
const MAX_LINKS: usize = 32;

/// A batch stops at this many bytes of field text (4 MiB) (and at `NORMALIZER_BATCH_SIZE` rows), so
/// large records make smaller batches instead of a large process.
pub const BATCH_BYTES: i64 = 4 * 1024 * 1024;

/// Points inside a batch where a test can pause or crash the normalizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    /// The normalized rows are written, the checkpoint is not yet advanced.
    AfterUpsert,
}

/// A test hook: awaited at each [`HookPoint`] with the backend pid of the batch's connection.
pub type Hook =
    Arc<dyn Fn(HookPoint, i32) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What one call of [`process_batch`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Another replica holds the source right now.
    Busy,
    /// Nothing after the checkpoint.
    CaughtUp,
    /// Rows were processed, with this many bytes of field text (see [`next_row_limit`]).
    Processed { counts: RunCounts, text_bytes: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The mapping cannot apply to this source's rows at all (not one bad record): nothing is
    /// normalized or rejected, and the checkpoint stays, so fixing the mapping resumes cleanly.
    #[error("{0}")]
    Mapping(String),
}

/// Whether anything is waiting after the checkpoint (cheap: one index probe).
pub async fn has_work(client: &Client, source: &Source) -> Result<bool, tokio_postgres::Error> {
    let sql = RawTable::of(source.kind).sql().has_pending;
    Ok(client.query_one(sql, &[&source.name]).await?.get(0))
}

/// The newest raw change id of source `$1` (0 when it has none): both raw tables, one index
/// probe each.
#[macro_export]
macro_rules! newest_change_of_1 {
    () => {
        "coalesce(greatest(
             (SELECT max(change_id) FROM raw_api_data WHERE source = $1),
             (SELECT max(change_id) FROM raw_csv_data WHERE source = $1)), 0)"
    };
}

/// Notes that `source`'s mapping cannot apply to its rows as they are now: it is not tried
/// again until a newer raw change arrives (see [`replay::mode`](crate::replay::mode)).
pub async fn stall(
    client: &Client,
    source: &str,
    reason: &str,
) -> Result<(), tokio_postgres::Error> {
    let sql = concat!(
        "UPDATE etl_checkpoint SET stalled_reason = $2, stalled_at = ",
        newest_change_of_1!(),
        " WHERE source = $1"
    );
    client.execute(sql, &[&source, &reason]).await?;
    Ok(())
}

/// Raw rows not yet checkpointed (the lag); counts the index range, so it is for metrics.
pub async fn lag(
    client: &impl tokio_postgres::GenericClient,
    source: &Source,
) -> Result<i64, tokio_postgres::Error> {
    let sql = RawTable::of(source.kind).sql().count_pending;
    Ok(client.query_one(sql, &[&source.name]).await?.get(0))
}

/// Whether `source`'s backlog should take the bulk path (a replay, see
/// [`replay`](crate::replay)): at least `min_rows` raw changes pending, and at least half as
/// many as the rows the source serves. Rebuilding every row apart, with the search indexes
/// built once at the end, then costs less than applying the changes one by one through those
/// indexes (which ran at about 40% of the bulk rate). Counts at most what it needs to know.
pub async fn wants_bulk(
    client: &Client,
    source: &Source,
    min_rows: i64,
) -> Result<bool, tokio_postgres::Error> {
    let served: i64 = client
        .query_opt(
            "SELECT normalized_rows FROM etl_checkpoint WHERE source = $1",
            &[&source.name],
        )
        .await?
        .map_or(0, |row| row.get(0));
    let needed = min_rows.max((served + 1) / 2);
    let sql = RawTable::of(source.kind).sql().count_pending_upto;
    let pending: i64 = client
        .query_one(sql, &[&source.name, &needed])
        .await?
        .get(0);
    Ok(pending >= needed)
}

/// How many rows to ask for next: as many as fit in [`BATCH_BYTES`] at the last batch's bytes
/// per row, within 1 and `batch_size`. Postgres measures every row it considers, so asking for
/// far more rows than the byte bound lets through would make it read (and detoast) them all
/// for nothing, batch after batch.
pub fn next_row_limit(batch_size: i64, rows: i64, text_bytes: i64) -> i64 {
    if rows <= 0 || text_bytes <= 0 {
        return batch_size;
    }
    let per_row = (text_bytes / rows).max(1);
    (BATCH_BYTES / per_row).clamp(1, batch_size)
}

/// One batch, as the module header says: claim, read, classify, apply, advance, commit.
pub async fn process_batch(
    client: &mut Client,
    source: &Source,
    paths: &FieldPaths,
    run_id: i64,
    batch_size: i64,
    hook: Option<&Hook>,
) -> Result<BatchOutcome, BatchError> {
    let table = RawTable::of(source.kind);
    ensure_checkpoint(client, &source.name).await?;
    let tx = client.transaction().await?;
    let Some(checkpoint) = claim_unless_replaying(&tx, &source.name).await? else {
        return Ok(BatchOutcome::Busy);
    };
    let rows = read(&tx, table, &source.name, paths, checkpoint, batch_size).await?;
    if rows.is_empty() {
        return Ok(BatchOutcome::CaughtUp);
    }
    let text_bytes = text_bytes(&rows);
    link_to_ingest_batches(&rows);
    let batch = classify(source.kind, paths, checkpoint, rows)?;
    let applied = apply(&tx, table, &source.name, run_id, &batch).await?;
    if let Some(hook) = hook {
        let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        hook(HookPoint::AfterUpsert, pid).await;
    }
    advance(&tx, &source.name, &batch, &applied).await?;
    tx.commit().await?;
    Ok(BatchOutcome::Processed {
        counts: batch.counts(&applied),
        text_bytes,
    })
}

/// The source's checkpoint row and its partition of normalized_data exist (committed on their
/// own, so replicas can lock the row and write the partition).
async fn ensure_checkpoint(client: &Client, source: &str) -> Result<(), tokio_postgres::Error> {
    client
        .query(
            "WITH c AS (
                 INSERT INTO etl_checkpoint (source) VALUES ($1) ON CONFLICT (source) DO NOTHING
             )
             SELECT etl_ensure_partition($1)",
            &[&source],
        )
        .await?;
    Ok(())
}

/// As [`claim`], and `None` too when a replay of the source is under way: the replay has the
/// source from then on (it builds from the served version as it was when it began, which is
/// therefore left alone), and the caller's next run will be the replay's.
async fn claim_unless_replaying(
    tx: &Transaction<'_>,
    source: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(tx
        .query_opt(
            "SELECT c.last_processed_id FROM etl_checkpoint c
             WHERE c.source = $1 AND NOT EXISTS (SELECT 1 FROM etl_replays r WHERE r.source = $1)
             FOR UPDATE OF c SKIP LOCKED",
            &[&source],
        )
        .await?
        .map(|row| row.get(0)))
}

/// Locks the source's checkpoint for this transaction and returns it; `None` when another
/// replica holds it (`SKIP LOCKED`: replicas never wait on each other).
pub(crate) async fn claim(
    tx: &Transaction<'_>,
    source: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(tx
        .query_opt(
            "SELECT last_processed_id FROM etl_checkpoint WHERE source = $1 FOR UPDATE SKIP LOCKED",
            &[&source],
        )
        .await?
        .map(|row| row.get(0)))
}

/// One raw row as the batch reads it: the mapped fields already picked out by Postgres.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub raw_id: i64,
    pub source_id: String,
    pub change_id: i64,
    pub name: Field,
    pub value: Field,
    pub description: Field,
    /// The `traceparent` of the ingest batch that wrote the row.
    pub trace_context: Option<String>,
    /// A tombstone: the record was deleted upstream.
    pub deleted: bool,
}

impl RawRow {
    /// Bytes of text this row brought into the process (what [`BATCH_BYTES`] bounds).
    fn text_bytes(&self) -> usize {
        let text = |f: &Field| f.text.as_ref().map_or(0, String::len);
        self.source_id.len() + text(&self.name) + text(&self.value) + text(&self.description)
    }

    /// In the column order of [`RawStatements::read_after`](etl_shared::raw::RawStatements).
    fn from_row(row: &Row) -> Self {
        let field = |i: usize| {
            let length = |i: usize| row.get::<_, Option<i32>>(i).unwrap_or(0).max(0) as usize;
            Field::measured(row.get(i), row.get(i + 1), length(i + 2), length(i + 3))
        };
        Self {
            raw_id: row.get(0),
            source_id: row.get(1),
            change_id: row.get(2),
            name: field(3),
            value: field(7),
            description: field(11),
            trace_context: row.get(15),
            deleted: row.get(16),
        }
    }
}

/// Makes the read walk the raw table's `(source, change_id)` index in order, whatever the
/// statistics say. While a first load lands, the table grows faster than autovacuum analyzes
/// it (once a minute at most): planned from a stale sample, the read collected every row after
/// the checkpoint in a bitmap and sorted them to keep the first batch, 1 to 2.3 s per batch of
/// 5,000 on a 1M-row load instead of 18 ms. For the rest of the caller's transaction (its own
/// statements use no bitmap scans anyway).
const READ_IN_CHANGE_ORDER: &str = "SET LOCAL enable_bitmapscan = off";

/// The raw rows changed after `checkpoint`, oldest change first, at most `batch_size`, in the
/// caller's transaction.
pub(crate) async fn read(
    tx: &impl tokio_postgres::GenericClient,
    table: RawTable,
    source: &str,
    paths: &FieldPaths,
    checkpoint: i64,
    batch_size: i64,
) -> Result<Vec<RawRow>, tokio_postgres::Error> {
    // Each field cut just past its limit: enough to tell it is too long, and no more.
    let cut = |limit: usize| (limit + 1) as i32;
    tx.batch_execute(READ_IN_CHANGE_ORDER).await?;
    let rows = tx
        .query(
            table.sql().read_after,
            &[
                &source,
                &checkpoint,
                &batch_size,
                &paths.name,
                &paths.value,
                &paths.description,
                &cut(MAX_NAME_CHARS),
                &cut(MAX_VALUE_CHARS),
                &cut(MAX_DESCRIPTION_BYTES),
                &BATCH_BYTES,
            ],
        )
        .await?;
    Ok(rows.iter().map(RawRow::from_row).collect())
}

/// Bytes of field text `rows` brought into the process.
pub(crate) fn text_bytes(rows: &[RawRow]) -> i64 {
    rows.iter().map(RawRow::text_bytes).sum::<usize>() as i64
}

/// Links the batch's span to the ingest batches that wrote its rows (a few distinct ones).
fn link_to_ingest_batches(rows: &[RawRow]) {
    let mut causes: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.trace_context.as_deref())
        .collect();
    causes.sort_unstable();
    causes.dedup();
    for cause in causes.iter().take(MAX_LINKS) {
        etl_shared::telemetry::link_current_span_to(cause);
    }
    tracing::Span::current().record("rows", rows.len());
}

/// A batch sorted into what normalizes and what does not, with how far it reaches.
#[derive(Debug, Default, PartialEq)]
pub struct Classified {
    pub valid: Valid,
    pub invalid: Invalid,
    /// Records deleted upstream, to withdraw.
    pub deleted: Vec<String>,
    /// The checkpoint once this batch is applied.
    pub last_change_id: i64,
    /// Raw rows read.
    pub processed: i64,
}

/// Valid records, as the columns of the upsert.
#[derive(Debug, Default, PartialEq)]
pub struct Valid {
    pub source_ids: Vec<String>,
    pub names: Vec<String>,
    pub values: Vec<f64>,
    pub descriptions: Vec<Option<String>>,
}

/// Records that cannot be normalized, and why.
#[derive(Debug, Default, PartialEq)]
pub struct Invalid {
    pub source_ids: Vec<String>,
    pub raw_ids: Vec<i64>,
    pub reasons: Vec<String>,
}

/// What [`apply`] changed in `normalized_data`.
#[derive(Debug, Clone, Copy, Default)]
struct Applied {
    inserted: i64,
    updated: i64,
    /// Normalized rows removed because their record's newest version is invalid or a
    /// tombstone.
    withdrawn: i64,
}

impl Classified {
    fn counts(&self, applied: &Applied) -> RunCounts {
        let normalized = self.valid.source_ids.len() as i64;
        RunCounts {
            processed: self.processed,
            inserted: applied.inserted,
            updated: applied.updated,
            unchanged: normalized - applied.inserted - applied.updated,
            rejected: self.invalid.source_ids.len() as i64,
            deleted: self.deleted.len() as i64,
        }
    }
}

/// Sorts raw rows into valid and invalid records (pure: no database). A CSV mapping that names
/// a column the rows lack fails the whole batch, since no record of it could be right.
pub fn classify(
    kind: SourceKind,
    paths: &FieldPaths,
    checkpoint: i64,
    rows: Vec<RawRow>,
) -> Result<Classified, BatchError> {
    let mut batch = Classified {
        last_change_id: checkpoint,
        processed: rows.len() as i64,
        ..Classified::default()
    };
    for row in rows {
        batch.last_change_id = batch.last_change_id.max(row.change_id);
        if row.deleted {
            batch.deleted.push(row.source_id);
            continue;
        }
        if kind == SourceKind::Csv {
            check_csv_columns(paths, &row.name, &row.value, &row.description)?;
        }
        match normalize(paths, row.name, row.value, row.description) {
            Ok(n) => {
                batch.valid.source_ids.push(row.source_id);
                batch.valid.names.push(n.name);
                batch.valid.values.push(n.value);
                batch.valid.descriptions.push(n.description);
            }
            Err(reason) => {
                batch.invalid.source_ids.push(row.source_id);
                batch.invalid.raw_ids.push(row.raw_id);
                batch.invalid.reasons.push(reason);
            }
        }
    }
    Ok(batch)
}

/// Upserts the valid records (a record valid again is no longer a reject), records the invalid
/// ones as the current rejects and withdraws their normalized rows.
async fn apply(
    tx: &Transaction<'_>,
    table: RawTable,
    source: &str,
    run_id: i64,
    batch: &Classified,
) -> Result<Applied, tokio_postgres::Error> {
    let mut applied = Applied::default();
    let (valid, invalid) = (&batch.valid, &batch.invalid);
    if !batch.deleted.is_empty() {
        applied.withdrawn += tx
            .execute(
                "DELETE FROM normalized_data WHERE source = $1 AND source_id = ANY($2)",
                &[&source, &batch.deleted],
            )
            .await? as i64;
        tx.execute(
            "DELETE FROM etl_rejects WHERE stage = 'normalize' AND source = $1 AND source_id = ANY($2)",
            &[&source, &batch.deleted],
        )
        .await?;
    }
    if !valid.source_ids.is_empty() {
        let row = tx
            .query_one(
                UPSERT_NORMALIZED,
                &[
                    &source,
                    &valid.source_ids,
                    &valid.names,
                    &valid.values,
                    &valid.descriptions,
                ],
            )
            .await?;
        (applied.inserted, applied.updated) = (row.get(0), row.get(1));
        tx.execute(
            "DELETE FROM etl_rejects WHERE stage = 'normalize' AND source = $1 AND source_id = ANY($2)",
            &[&source, &valid.source_ids],
        )
        .await?;
    }
    if !invalid.source_ids.is_empty() {
        tx.execute(
            table.sql().reject_normalize,
            &[
                &run_id,
                &source,
                &invalid.source_ids,
                &invalid.raw_ids,
                &invalid.reasons,
            ],
        )
        .await?;
        // The newest raw version is the truth: a record whose new version is invalid is
        // withdrawn, so raw rows = normalized + rejected holds per source.
        applied.withdrawn += tx
            .execute(
                "DELETE FROM normalized_data WHERE source = $1 AND source_id = ANY($2)",
                &[&source, &invalid.source_ids],
            )
            .await? as i64;
    }
    Ok(applied)
}

/// Moves the checkpoint past the batch, in the batch's transaction; `normalized_rows` stays
/// exact because it moves with the rows.
async fn advance(
    tx: &Transaction<'_>,
    source: &str,
    batch: &Classified,
    applied: &Applied,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE etl_checkpoint SET last_processed_id = $2, last_processed_at = now(),
             total_processed = total_processed + $3, normalized_rows = normalized_rows + $4,
             updated_at = now(), stalled_at = NULL, stalled_reason = NULL
         WHERE source = $1",
        &[
            &source,
            &batch.last_change_id,
            &batch.processed,
            &(applied.inserted - applied.withdrawn),
        ],
    )
    .await?;
    Ok(())
}

/// A CSV row holds every column of its file's header; a mapped column missing from a row means
/// the mapping names a column the source does not have.
fn check_csv_columns(
    paths: &FieldPaths,
    name: &Field,
    value: &Field,
    description: &Field,
) -> Result<(), BatchError> {
    let [name_at, value_at, description_at] = &paths.labels;
    let mut missing = Vec::new();
    if name.kind.is_none() {
        missing.push(format!("mapping.name = {name_at:?}"));
    }
    if value.kind.is_none() {
        missing.push(format!("mapping.value = {value_at:?}"));
    }
    if paths.description.is_some() && description.kind.is_none() {
        missing.push(format!("mapping.description = {description_at:?}"));
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(BatchError::Mapping(format!(
        "the mapping names columns the ingested rows do not have ({}); fix the sources file or re-ingest; nothing was normalized",
        missing.join(", ")
    )))
}

/// Writes only what changed: an unchanged record is not touched, and `updated_at` moves only
/// when name, value or description really changed. Returns (inserted, updated): the records
/// that did not exist before (counted in the statement's snapshot, which the insert does not
/// change; `xmax` cannot tell on a partitioned table), and the rest of those written.
const UPSERT_NORMALIZED: &str = "WITH existing AS (
        SELECT count(*) AS records FROM normalized_data WHERE source = $1 AND source_id = ANY($2)
    ), upserted AS (
        INSERT INTO normalized_data AS n (source, source_id, name, value, description)
        SELECT $1, * FROM unnest($2::text[], $3::text[], $4::float8[], $5::text[])
        ON CONFLICT (source, source_id) DO UPDATE
            SET name = EXCLUDED.name, value = EXCLUDED.value,
                description = EXCLUDED.description, updated_at = now()
            WHERE (n.name, n.value, n.description)
                IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.value, EXCLUDED.description)
        RETURNING 1
    ), inserted AS (
        SELECT cardinality($2::text[]) - (SELECT records FROM existing) AS records
    )
    SELECT records, (SELECT count(*) FROM upserted) - records FROM inserted";

/// Moves what the trigram indexes of `source`'s partition hold in their pending lists into the
/// indexes proper, once a run that changed rows has caught up. GIN indexes take new entries into an unsorted pending
/// list that every search scans whole, until the list outgrows `gin_pending_list_limit` (4 MB)
/// or VACUUM comes by: after a load, searches paid for up to two such lists until autovacuum
/// ran (the bench's query mix right after a refresh of 20,000 rows: p99 6.7× the one at rest).
/// Only the indexes' owner may do this (the role that ran the migrations); for another role,
/// the lists wait for VACUUM as before.
pub async fn clean_search_pending_lists(client: &tokio_postgres::Client, source: &str) {
    if let Err(e) = client
        .execute(
            "SELECT gin_clean_pending_list(i) FROM etl_search_indexes($1) i",
            &[&source],
        )
        .await
    {
        tracing::debug!(error = %e, "could not clean the search indexes' pending lists");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> FieldPaths {
        FieldPaths {
            name: vec!["name".into()],
            value: vec!["value".into()],
            description: Some(vec!["note".into()]),
            labels: ["name".into(), "value".into(), "note".into()],
        }
    }

    fn field(kind: &str, text: &str) -> Field {
        Field::new(Some(kind.into()), Some(text.into()))
    }

    fn row(raw_id: i64, change_id: i64, name: Field, value: Field) -> RawRow {
        RawRow {
            raw_id,
            source_id: format!("id{raw_id}"),
            change_id,
            name,
            value,
            description: field("string", ""),
            trace_context: None,
            deleted: false,
        }
    }

    #[test]
    fn the_next_batch_asks_for_as_many_rows_as_fit_in_the_byte_bound() {
        assert_eq!(
            next_row_limit(5_000, 5_000, 500_000),
            5_000,
            "small rows: the row limit"
        );
        assert_eq!(next_row_limit(5_000, 60, 60 * 61_440), BATCH_BYTES / 61_440);
        assert_eq!(next_row_limit(5_000, 1, 50_000_000), 1, "at least one row");
        assert_eq!(next_row_limit(5_000, 0, 0), 5_000);
    }

    #[test]
    fn rows_are_sorted_into_valid_and_rejected_and_the_checkpoint_reaches_the_newest_change() {
        let rows = vec![
            row(1, 12, field("string", "a"), field("string", "1.5")),
            row(2, 15, field("string", "b"), field("string", "many")),
            row(3, 11, field("string", ""), field("number", "3")),
        ];

        let batch = classify(SourceKind::Rest, &paths(), 10, rows).unwrap();

        assert_eq!(batch.processed, 3);
        assert_eq!(batch.last_change_id, 15);
        assert_eq!(batch.valid.source_ids, ["id1"]);
        assert_eq!(batch.valid.values, [1.5]);
        assert_eq!(
            batch.valid.descriptions,
            [None],
            "an empty note is no description"
        );
        assert_eq!(batch.invalid.source_ids, ["id2", "id3"]);
        assert_eq!(batch.invalid.raw_ids, [2, 3]);
        assert!(
            batch.invalid.reasons[0].starts_with("value:"),
            "{:?}",
            batch.invalid
        );
        assert_eq!(batch.invalid.reasons[1], "name: empty at name");
    }

    #[test]
    fn a_csv_mapping_naming_a_missing_column_fails_the_batch_but_a_missing_json_field_is_a_reject()
    {
        let missing = || row(1, 2, Field::default(), field("string", "1"));

        let csv = classify(SourceKind::Csv, &paths(), 0, vec![missing()]);
        let rest = classify(SourceKind::Rest, &paths(), 0, vec![missing()]).unwrap();

        assert!(
            matches!(&csv, Err(BatchError::Mapping(m)) if m.contains("mapping.name = \"name\"")),
            "{csv:?}"
        );
        assert_eq!(rest.invalid.reasons, ["name: nothing at name"]);
    }
}
