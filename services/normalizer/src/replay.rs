//! Replay: re-normalizing a source from its raw rows when its mapping changed (or on demand,
//! `etl-normalizer replay --source NAME`), without readers ever seeing a mix of versions.
//!
//! The new version is built apart, in `normalized_replay` and `etl_rejects_replay`, batch by
//! batch through the raw rows in change-id order, under the same claim on the checkpoint row as
//! ordinary batches (so replicas never work on a source at once, and a killed replay resumes
//! where its last batch committed). Once it has caught up, one transaction swaps it in: rows
//! the new version lacks are deleted, the others upserted (ids of unchanged records kept), the
//! rejects replaced, and the checkpoint moved to where the replay got, with the new mapping's
//! fingerprint. Until that commit `/data` serves the previous version whole. A mapping that
//! cannot apply stops the replay with its reason (one failed run), and the previous version
//! stays served until the mapping changes again or a replay is asked for.

use etl_shared::raw::RawTable;
use etl_shared::runs::RunCounts;
use etl_shared::sources::Source;
use tokio_postgres::{Client, Transaction};

use crate::batch::{self, BatchError, Classified};
use crate::mapping::FieldPaths;
use crate::newest_change_of_1;

/// How a source is to be normalized now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Its rows are of the current mapping: ordinary batches after the checkpoint.
    Current,
    /// A replay to the current mapping is under way.
    Replaying,
    /// The mapping cannot apply (a replay to it stopped, or ordinary batches did) and nothing
    /// changed since: nothing to try.
    Stalled,
}

/// Decides the mode of `source` for mapping `fingerprint`: the first time a source is seen its
/// fingerprint is recorded (its rows were made with it); a changed one starts a replay. Reads
/// without locking (replicas never wait on each other's batches); writes only on a change.
pub async fn mode(
    client: &Client,
    source: &str,
    fingerprint: &str,
) -> Result<Mode, tokio_postgres::Error> {
    let row = client
        .query_one(
            concat!(
                "SELECT c.mapping_fingerprint, r.fingerprint, r.error IS NOT NULL,
                        coalesce(c.stalled_at >= ",
                newest_change_of_1!(),
                ", false)
                 FROM (SELECT $1::text AS source) s
                 LEFT JOIN etl_checkpoint c ON c.source = s.source
                 LEFT JOIN etl_replays r ON r.source = s.source"
            ),
            &[&source],
        )
        .await?;
    let (made_with, replaying, failed, stalled): (
        Option<String>,
        Option<String>,
        Option<bool>,
        bool,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3));
    Ok(match (made_with.as_deref(), replaying.as_deref()) {
        (_, Some(replay)) if replay == fingerprint && failed == Some(true) => Mode::Stalled,
        (_, Some(replay)) if replay == fingerprint => Mode::Replaying,
        // A mapping that could not apply to the rows is not tried again until a newer raw
        // change arrives: one failed run, not one per poll.
        (Some(made), None) if made == fingerprint && stalled => Mode::Stalled,
        (Some(made), None) if made == fingerprint => Mode::Current,
        (Some(made), Some(_)) if made == fingerprint => {
            // A replay to a mapping since reverted: the rows are of the current one already.
            forget(client, source).await?;
            Mode::Current
        }
        (None, _) => {
            client
                .execute(
                    "INSERT INTO etl_checkpoint (source, mapping_fingerprint) VALUES ($1, $2)
                     ON CONFLICT (source) DO UPDATE
                     SET mapping_fingerprint = EXCLUDED.mapping_fingerprint
                     WHERE etl_checkpoint.mapping_fingerprint IS NULL",
                    &[&source, &fingerprint],
                )
                .await?;
            Mode::Current
        }
        _ => {
            begin(client, source, fingerprint, false).await?;
            Mode::Replaying
        }
    })
}

/// Starts a replay of `source` to `fingerprint` from its first raw row, dropping what a replay
/// to another mapping had built. `again`: also restart one to this mapping (on demand).
pub async fn begin(
    client: &Client,
    source: &str,
    fingerprint: &str,
    again: bool,
) -> Result<(), tokio_postgres::Error> {
    let restarted = client
        .execute(
            "INSERT INTO etl_replays (source, fingerprint) VALUES ($1, $2)
             ON CONFLICT (source) DO UPDATE
             SET fingerprint = EXCLUDED.fingerprint, position = 0, processed = 0,
                 started_at = now(), error = NULL
             WHERE $3 OR etl_replays.fingerprint <> EXCLUDED.fingerprint",
            &[&source, &fingerprint, &again],
        )
        .await?;
    if restarted == 1 {
        clear_shadow(client, source).await?;
        tracing::info!(
            source,
            "replay started: the source is re-normalized from its raw rows"
        );
    }
    Ok(())
}

async fn forget(client: &Client, source: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute("DELETE FROM etl_replays WHERE source = $1", &[&source])
        .await?;
    clear_shadow(client, source).await
}

async fn clear_shadow(
    client: &impl tokio_postgres::GenericClient,
    source: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM normalized_replay WHERE source = $1",
            &[&source],
        )
        .await?;
    client
        .execute(
            "DELETE FROM etl_rejects_replay WHERE source = $1",
            &[&source],
        )
        .await?;
    Ok(())
}

/// What one replay batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Another replica holds the source.
    Busy,
    /// Raw rows were built into the new version.
    Built { rows: i64, text_bytes: i64 },
    /// The new version replaced the old: what changed for readers.
    Swapped(RunCounts),
}

/// One replay batch of `source`: build the next raw rows into the new version, or, when none
/// are left, swap it in.
pub async fn process_batch(
    client: &mut Client,
    source: &Source,
    paths: &FieldPaths,
    run_id: i64,
    batch_size: i64,
) -> Result<ReplayOutcome, BatchError> {
    let name = source.name.as_str();
    let table = RawTable::of(source.kind);
    let tx = client.transaction().await?;
    if batch::claim(&tx, name).await?.is_none() {
        return Ok(ReplayOutcome::Busy);
    }
    let Some(row) = tx
        .query_opt(
            "SELECT position, fingerprint FROM etl_replays WHERE source = $1 AND error IS NULL",
            &[&name],
        )
        .await?
    else {
        return Ok(ReplayOutcome::Swapped(RunCounts::default()));
    };
    let (position, fingerprint): (i64, String) = (row.get(0), row.get(1));
    let rows = batch::read(&tx, table, name, paths, position, batch_size).await?;
    if rows.is_empty() {
        let counts = swap(&tx, table, name, run_id, position, &fingerprint).await?;
        tx.commit().await?;
        tracing::info!(source = name, ?counts, "replay swapped in");
        return Ok(ReplayOutcome::Swapped(counts));
    }
    let text_bytes = batch::text_bytes(&rows);
    let built = match batch::classify(source.kind, paths, position, rows) {
        Ok(built) => built,
        Err(e) => {
            drop(tx);
            let reason = e.to_string();
            client
                .execute(
                    "UPDATE etl_replays SET error = $2 WHERE source = $1",
                    &[&name, &reason],
                )
                .await?;
            return Err(e);
        }
    };
    build(&tx, name, &built).await?;
    tx.execute(
        "UPDATE etl_replays SET position = $2, processed = processed + $3 WHERE source = $1",
        &[&name, &built.last_change_id, &built.processed],
    )
    .await?;
    tx.commit().await?;
    Ok(ReplayOutcome::Built {
        rows: built.processed,
        text_bytes,
    })
}

/// Writes a classified batch into the version being built.
async fn build(
    tx: &Transaction<'_>,
    source: &str,
    batch: &Classified,
) -> Result<(), tokio_postgres::Error> {
    let (valid, invalid) = (&batch.valid, &batch.invalid);
    let gone: Vec<&String> = invalid.source_ids.iter().chain(&batch.deleted).collect();
    let not_rejected: Vec<&String> = valid.source_ids.iter().chain(&batch.deleted).collect();
    if !valid.source_ids.is_empty() {
        tx.execute(
            "INSERT INTO normalized_replay (source, source_id, name, value, description)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::float8[], $5::text[])
             ON CONFLICT (source, source_id) DO UPDATE
             SET name = EXCLUDED.name, value = EXCLUDED.value, description = EXCLUDED.description",
            &[
                &source,
                &valid.source_ids,
                &valid.names,
                &valid.values,
                &valid.descriptions,
            ],
        )
        .await?;
    }
    if !invalid.source_ids.is_empty() {
        tx.execute(
            "INSERT INTO etl_rejects_replay (source, source_id, raw_id, reason)
             SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::text[])
             ON CONFLICT (source, source_id) DO UPDATE
             SET raw_id = EXCLUDED.raw_id, reason = EXCLUDED.reason",
            &[
                &source,
                &invalid.source_ids,
                &invalid.raw_ids,
                &invalid.reasons,
            ],
        )
        .await?;
    }
    if !gone.is_empty() {
        tx.execute(
            "DELETE FROM normalized_replay WHERE source = $1 AND source_id = ANY($2)",
            &[&source, &gone],
        )
        .await?;
    }
    if !not_rejected.is_empty() {
        tx.execute(
            "DELETE FROM etl_rejects_replay WHERE source = $1 AND source_id = ANY($2)",
            &[&source, &not_rejected],
        )
        .await?;
    }
    Ok(())
}

/// The version built replaces the served one, in the caller's transaction.
async fn swap(
    tx: &Transaction<'_>,
    table: RawTable,
    source: &str,
    run_id: i64,
    position: i64,
    fingerprint: &str,
) -> Result<RunCounts, tokio_postgres::Error> {
    let withdrawn = tx
        .execute(
            "DELETE FROM normalized_data n WHERE n.source = $1 AND NOT EXISTS
                 (SELECT 1 FROM normalized_replay r WHERE r.source = $1 AND r.source_id = n.source_id)",
            &[&source],
        )
        .await? as i64;
    let row = tx
        .query_one(
            "WITH upserted AS (
                 INSERT INTO normalized_data AS n (source, source_id, name, value, description)
                 SELECT source, source_id, name, value, description FROM normalized_replay
                 WHERE source = $1
                 ON CONFLICT (source, source_id) DO UPDATE
                     SET name = EXCLUDED.name, value = EXCLUDED.value,
                         description = EXCLUDED.description, updated_at = now()
                     WHERE (n.name, n.value, n.description)
                         IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.value, EXCLUDED.description)
                 RETURNING (n.xmax = 0) AS inserted
             )
             SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted),
                    (SELECT count(*) FROM normalized_replay WHERE source = $1),
                    (SELECT count(*) FROM etl_rejects_replay WHERE source = $1)
             FROM upserted",
            &[&source],
        )
        .await?;
    let (inserted, updated, rows, rejected): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    tx.execute(
        "DELETE FROM etl_rejects WHERE stage = 'normalize' AND source = $1",
        &[&source],
    )
    .await?;
    tx.execute(table.sql().reject_replayed, &[&source, &run_id])
        .await?;
    tx.execute(
        "UPDATE etl_checkpoint
         SET last_processed_id = $2, last_processed_at = now(), normalized_rows = $3,
             total_processed = total_processed + $3 + $4, mapping_fingerprint = $5,
             updated_at = now(), stalled_at = NULL, stalled_reason = NULL
         WHERE source = $1",
        &[&source, &position, &rows, &rejected, &fingerprint],
    )
    .await?;
    tx.execute("DELETE FROM etl_replays WHERE source = $1", &[&source])
        .await?;
    clear_shadow(tx, source).await?;
    Ok(RunCounts {
        processed: rows + rejected,
        inserted,
        updated,
        unchanged: rows - inserted - updated,
        rejected,
        deleted: withdrawn,
    })
}
