//! One batch of one source, in one transaction: claim the source's checkpoint row (`FOR UPDATE
//! SKIP LOCKED`, so replicas never work on a source at once), read the raw rows changed after the
//! checkpoint, upsert the valid ones, record the invalid ones, and advance the checkpoint. The
//! upsert and the checkpoint commit together or not at all: no loss, no double effect.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use etl_shared::raw::RawTable;
use etl_shared::runs::RunCounts;
use etl_shared::sources::{Source, SourceKind};
use tokio_postgres::Client;

use crate::mapping::{normalize, Field, FieldPaths};

/// Links per batch span: enough for every ingest batch a normalizer batch spans in practice
/// (a batch of 1,000 rows reads from one or two 5,000-row ingest batches).
const MAX_LINKS: usize = 32;

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
    /// Rows were processed; `full` means there may be more.
    Processed { counts: RunCounts, full: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
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

/// Raw rows not yet checkpointed (the lag); counts the index range, so it is for metrics.
pub async fn lag(client: &Client, source: &Source) -> Result<i64, tokio_postgres::Error> {
    let sql = RawTable::of(source.kind).sql().count_pending;
    Ok(client.query_one(sql, &[&source.name]).await?.get(0))
}

pub async fn process_batch(
    client: &mut Client,
    source: &Source,
    paths: &FieldPaths,
    run_id: i64,
    batch_size: i64,
    hook: Option<&Hook>,
) -> Result<BatchOutcome, PassError> {
    let sql = RawTable::of(source.kind).sql();
    client
        .execute(
            "INSERT INTO etl_checkpoint (source) VALUES ($1) ON CONFLICT (source) DO NOTHING",
            &[&source.name],
        )
        .await?;
    let tx = client.transaction().await?;
    let Some(claimed) = tx
        .query_opt(
            "SELECT last_processed_id FROM etl_checkpoint WHERE source = $1 FOR UPDATE SKIP LOCKED",
            &[&source.name],
        )
        .await?
    else {
        return Ok(BatchOutcome::Busy);
    };
    let checkpoint: i64 = claimed.get(0);
    let rows = tx
        .query(
            sql.read_after,
            &[
                &source.name,
                &checkpoint,
                &batch_size,
                &paths.name,
                &paths.value,
                &paths.description,
            ],
        )
        .await?;
    if rows.is_empty() {
        return Ok(BatchOutcome::CaughtUp);
    }

    // Link this batch's span to the ingest batches that wrote its rows (a few distinct ones).
    let mut causes: Vec<&str> = rows.iter().filter_map(|r| r.get(9)).collect();
    causes.sort_unstable();
    causes.dedup();
    for cause in causes.iter().take(MAX_LINKS) {
        etl_shared::telemetry::link_current_span_to(cause);
    }
    tracing::Span::current().record("rows", rows.len());

    let mut valid = Valid::default();
    let mut invalid = Invalid::default();
    let mut last_change_id = checkpoint;
    for row in &rows {
        let raw_id: i64 = row.get(0);
        let source_id: String = row.get(1);
        last_change_id = last_change_id.max(row.get::<_, i64>(2));
        let field = |i: usize| Field::new(row.get(i), row.get(i + 1));
        let (name, value, description) = (field(3), field(5), field(7));
        if source.kind == SourceKind::Csv {
            check_csv_columns(paths, &name, &value, &description)?;
        }
        match normalize(paths, name, value, description) {
            Ok(n) => {
                valid.source_ids.push(source_id);
                valid.names.push(n.name);
                valid.values.push(n.value);
                valid.descriptions.push(n.description);
            }
            Err(reason) => {
                invalid.source_ids.push(source_id);
                invalid.raw_ids.push(raw_id);
                invalid.reasons.push(reason);
            }
        }
    }

    let (inserted, updated) = if valid.source_ids.is_empty() {
        (0, 0)
    } else {
        let row = tx
            .query_one(
                UPSERT_NORMALIZED,
                &[
                    &source.name,
                    &valid.source_ids,
                    &valid.names,
                    &valid.values,
                    &valid.descriptions,
                ],
            )
            .await?;
        // A record that was rejected before and is valid now is no longer a reject.
        tx.execute(
            "DELETE FROM etl_rejects WHERE stage = 'normalize' AND source = $1 AND source_id = ANY($2)",
            &[&source.name, &valid.source_ids],
        )
        .await?;
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    let mut withdrawn = 0i64;
    if !invalid.source_ids.is_empty() {
        tx.execute(
            sql.reject_normalize,
            &[
                &run_id,
                &source.name,
                &invalid.source_ids,
                &invalid.raw_ids,
                &invalid.reasons,
            ],
        )
        .await?;
        // The newest raw version is the truth: a record whose new version is invalid is
        // withdrawn, so raw rows = normalized + rejected holds per source.
        withdrawn = tx
            .execute(
                "DELETE FROM normalized_data WHERE source = $1 AND source_id = ANY($2)",
                &[&source.name, &invalid.source_ids],
            )
            .await? as i64;
    }

    if let Some(hook) = hook {
        let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        hook(HookPoint::AfterUpsert, pid).await;
    }

    let processed = rows.len() as i64;
    // normalized_rows stays exact because it moves in the same transaction as the rows.
    tx.execute(
        "UPDATE etl_checkpoint SET last_processed_id = $2, last_processed_at = now(),
             total_processed = total_processed + $3, normalized_rows = normalized_rows + $4,
             updated_at = now()
         WHERE source = $1",
        &[
            &source.name,
            &last_change_id,
            &processed,
            &(inserted - withdrawn),
        ],
    )
    .await?;
    tx.commit().await?;

    let normalized = valid.source_ids.len() as i64;
    Ok(BatchOutcome::Processed {
        counts: RunCounts {
            processed,
            inserted,
            updated,
            unchanged: normalized - inserted - updated,
            rejected: invalid.source_ids.len() as i64,
        },
        full: processed >= batch_size,
    })
}

/// A CSV row holds every column of its file's header; a mapped column missing from a row means
/// the mapping names a column the source does not have.
fn check_csv_columns(
    paths: &FieldPaths,
    name: &Field,
    value: &Field,
    description: &Field,
) -> Result<(), PassError> {
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
    Err(PassError::Mapping(format!(
        "the mapping names columns the ingested rows do not have ({}); fix the sources file or re-ingest; nothing was normalized",
        missing.join(", ")
    )))
}

#[derive(Default)]
struct Valid {
    source_ids: Vec<String>,
    names: Vec<String>,
    values: Vec<f64>,
    descriptions: Vec<Option<String>>,
}

#[derive(Default)]
struct Invalid {
    source_ids: Vec<String>,
    raw_ids: Vec<i64>,
    reasons: Vec<String>,
}

/// Writes only what changed: an unchanged record is not touched, and `updated_at` moves only
/// when name, value or description really changed. Returns (inserted, updated).
const UPSERT_NORMALIZED: &str = "WITH upserted AS (
        INSERT INTO normalized_data AS n (source, source_id, name, value, description)
        SELECT $1, * FROM unnest($2::text[], $3::text[], $4::float8[], $5::text[])
        ON CONFLICT (source, source_id) DO UPDATE
            SET name = EXCLUDED.name, value = EXCLUDED.value,
                description = EXCLUDED.description, updated_at = now()
            WHERE (n.name, n.value, n.description)
                IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.value, EXCLUDED.description)
        RETURNING (n.xmax = 0) AS inserted
    )
    SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM upserted";
