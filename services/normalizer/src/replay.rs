//! Replay: re-normalizing a source from its raw rows when its mapping changed, on demand
//! (`etl-normalizer replay --source NAME`), or because its backlog is large enough that
//! building it apart is faster (the bulk path), without readers ever seeing a mix of versions.
//!
//! The new version is built apart, in the source's partition of `normalized_build` (a plain
//! table with only its keys, no search indexes) and in `etl_rejects_replay`, batch by batch
//! through the raw rows in change-id order, under the same claim on the checkpoint row as
//! ordinary batches (so replicas never work on a source at once, and a killed replay resumes
//! where its last batch committed). Each record keeps the id, `created_at` and, when unchanged,
//! the `updated_at` it has in the served version. Once the build has caught up, its search
//! indexes are built in bulk (one transaction), and then one transaction swaps it in as the
//! source's partition of `normalized_data` (see migration V11), replaces the rejects, and moves
//! the checkpoint to where the replay got, with the new mapping's fingerprint. Until that commit
//! `/data` serves the previous version whole. A mapping that cannot apply stops the replay with
//! its reason (one failed run), and the previous version stays served until the mapping changes
//! again or a replay is asked for.

use etl_shared::raw::RawTable;
use etl_shared::runs::RunCounts;
use etl_shared::sources::Source;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Transaction};

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
            begin(client, source, fingerprint, Reason::Mapping).await?;
            Mode::Replaying
        }
    })
}

/// Why a source is re-normalized from its raw rows (`etl_replays.reason`, `/stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its mapping changed.
    Mapping,
    /// `etl-normalizer replay --source NAME`.
    Requested,
    /// Its backlog is large enough for the bulk path (`NORMALIZER_BULK_MIN_ROWS`).
    Backlog,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Mapping => "mapping",
            Reason::Requested => "requested",
            Reason::Backlog => "backlog",
        }
    }
}

/// Starts a replay of `source` to `fingerprint` from its first raw row, dropping what a replay
/// to another mapping had built; a requested one also restarts one to this mapping. One
/// statement, so a replay never exists without its build partition.
pub async fn begin(
    client: &Client,
    source: &str,
    fingerprint: &str,
    reason: Reason,
) -> Result<(), tokio_postgres::Error> {
    let restarted = client
        .query(
            "WITH restarted AS (
                 INSERT INTO etl_replays (source, fingerprint, reason) VALUES ($1, $2, $4)
                 ON CONFLICT (source) DO UPDATE
                 SET fingerprint = EXCLUDED.fingerprint, reason = EXCLUDED.reason, position = 0,
                     processed = 0, started_at = now(), error = NULL
                 WHERE $3 OR etl_replays.fingerprint <> EXCLUDED.fingerprint
                 RETURNING source
             )
             SELECT etl_begin_build(source) FROM restarted",
            &[
                &source,
                &fingerprint,
                &(reason == Reason::Requested),
                &reason.as_str(),
            ],
        )
        .await?;
    if !restarted.is_empty() {
        tracing::info!(
            source,
            reason = reason.as_str(),
            "replay started: the source is re-normalized from its raw rows"
        );
    }
    Ok(())
}

async fn forget(client: &Client, source: &str) -> Result<(), tokio_postgres::Error> {
    client
        .query(
            "WITH gone AS (DELETE FROM etl_replays WHERE source = $1) SELECT etl_drop_build($1)",
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
    /// The new version, complete, got its search indexes; the swap comes next.
    Indexed,
    /// Every raw row is built, but an ingest run of the source is still landing more: the
    /// caller tries again shortly.
    WaitingForIngest,
    /// The new version replaced the old: what changed for readers.
    Swapped(RunCounts),
}

/// Raw rows read ahead (those after change id `after`) for the next replay batch.
#[derive(Debug, Default)]
pub struct ReadAhead {
    after: i64,
    rows: Vec<batch::RawRow>,
}

/// One replay batch of `source`: build the next raw rows into the new version, or, when none
/// are left, index it and then swap it in. `helper`, a second connection, reads the next
/// batch into `ahead` while this one is written, and builds one of the two search indexes at
/// the same time as `client` builds the other, when the query service is not busy.
pub async fn process_batch(
    client: &mut Client,
    helper: Option<&Client>,
    ahead: &mut Option<ReadAhead>,
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
    let rows = match ahead.take() {
        Some(read) if read.after == position => read.rows,
        _ => batch::read(&tx, table, name, paths, position, batch_size).await?,
    };
    if rows.is_empty() {
        // Caught up with a load still landing (a big file mid-ingest): finishing now would
        // serve part of it and leave the rest to row-by-row batches, so wait for its end.
        if ingest_running(&tx, name).await? {
            return Ok(ReplayOutcome::WaitingForIngest);
        }
        if index(&tx, helper, name).await? {
            tx.commit().await?;
            return Ok(ReplayOutcome::Indexed);
        }
        let counts = match swap(&tx, table, name, run_id, position, &fingerprint).await {
            Ok(counts) => counts,
            // Readers held normalized_data longer than the swap waits (SWAP_LOCK_TIMEOUT):
            // the version built stays, and the next run swaps it in.
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                tracing::info!(
                    source = name,
                    "replay swap waited too long for readers; will retry"
                );
                return Ok(ReplayOutcome::Busy);
            }
            Err(e) => return Err(e.into()),
        };
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
    let next = built.last_change_id;
    let write = async {
        build(&tx, name, &built).await?;
        tx.execute(
            "UPDATE etl_replays SET position = $2, processed = processed + $3 WHERE source = $1",
            &[&name, &built.last_change_id, &built.processed],
        )
        .await?;
        tx.commit().await
    };
    match helper {
        // The next batch is read on the helper while this one is written: the two take a
        // core each, where one connection would do them one after the other. Nothing is
        // written without the claim: the rows read ahead are used only if the position is
        // still where this batch leaves it.
        Some(helper) => {
            let read_ahead = async {
                helper.batch_execute("BEGIN READ ONLY").await?;
                let rows = batch::read(helper, table, name, paths, next, batch_size).await;
                // Never back to the pool inside a transaction.
                let end = if rows.is_ok() { "COMMIT" } else { "ROLLBACK" };
                helper.batch_execute(end).await?;
                rows
            };
            let (written, read) = tokio::join!(write, read_ahead);
            written?;
            *ahead = Some(ReadAhead {
                after: next,
                rows: read?,
            });
        }
        None => write.await?,
    }
    Ok(ReplayOutcome::Built {
        rows: built.processed,
        text_bytes,
    })
}

/// Whether an ingest run of `source` is live: it holds the source's lease (see migration V5).
async fn ingest_running(tx: &Transaction<'_>, source: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM etl_source_leases WHERE source = $1
                 AND run_id IS NOT NULL AND NOT pg_try_advisory_xact_lock(run_id))",
            &[&source],
        )
        .await?
        .get(0))
}

/// Builds the search and order indexes of the complete version of `source` (under the caller's
/// claim, so no other replica builds them at once) and analyzes it; false when it had them
/// already. With a helper connection and readers not busy, two at a time: the caller's
/// connection takes one search and one order index, the helper the other two.
async fn index(
    tx: &Transaction<'_>,
    helper: Option<&Client>,
    source: &str,
) -> Result<bool, tokio_postgres::Error> {
    const INDEX: &str = "SELECT etl_index_build($1, $2)";
    /// Each side's indexes, the longest (a search index) first.
    const SIDES: [[&str; 2]; 2] = [["name", "updated_at"], ["description", "value"]];
    async fn build_all(
        client: &impl GenericClient,
        source: &str,
        columns: &[&str],
    ) -> Result<bool, tokio_postgres::Error> {
        let mut built = false;
        for column in columns {
            built |= client
                .query_one(INDEX, &[&source, column])
                .await?
                .get::<_, bool>(0);
        }
        Ok(built)
    }
    let readers_busy =
        etl_shared::pacing::busy_readers(tx).await? >= etl_shared::pacing::BUSY_READERS;
    let built = match helper {
        Some(helper) if !readers_busy => {
            let (mine, helpers) = tokio::join!(
                build_all(tx, source, &SIDES[0]),
                build_all(helper, source, &SIDES[1])
            );
            mine? | helpers?
        }
        _ => build_all(tx, source, SIDES.as_flattened()).await?,
    };
    if !built {
        return Ok(false);
    }
    tx.execute("SELECT etl_analyze_build($1)", &[&source])
        .await?;
    Ok(true)
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
        let columns: [&(dyn ToSql + Sync); 5] = [
            &source,
            &valid.source_ids,
            &valid.names,
            &valid.values,
            &valid.descriptions,
        ];
        // Records are mostly new to the build (each raw row is read once, unless it changes
        // while the build runs), and a plain insert costs 40% less than an upsert; a batch
        // that meets a record already built is written again as an upsert.
        tx.batch_execute("SAVEPOINT build_plain").await?;
        match tx.execute(BUILD_NEW, &columns).await {
            Ok(_) => tx.batch_execute("RELEASE SAVEPOINT build_plain").await?,
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT build_plain")
                    .await?;
                tx.execute(BUILD_UPSERT, &columns).await?;
            }
            Err(e) => return Err(e),
        }
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
            "DELETE FROM normalized_build WHERE source = $1 AND source_id = ANY($2)",
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

/// Writes records into the version being built, each with the id and `created_at` it has in
/// the served version (new ones get new ids), and with its served `updated_at` when its fields
/// are unchanged: readers' cursors and timestamps survive the swap.
macro_rules! build_insert {
    ($on_conflict:literal) => {
        concat!(
            "INSERT INTO normalized_build AS b
                 (id, source, source_id, name, value, description, created_at, updated_at)
             SELECT coalesce(o.id, nextval('normalized_id_seq')), $1, u.source_id, u.name,
                    u.value, u.description, coalesce(o.created_at, now()),
                    CASE WHEN (o.name, o.value, o.description)
                              IS NOT DISTINCT FROM (u.name, u.value, u.description)
                         THEN o.updated_at ELSE now() END
             FROM unnest($2::text[], $3::text[], $4::float8[], $5::text[])
                  AS u (source_id, name, value, description)
             LEFT JOIN normalized_data o ON o.source = $1 AND o.source_id = u.source_id",
            $on_conflict
        )
    };
}

/// Records not yet in the build.
const BUILD_NEW: &str = build_insert!("");

/// Records that may be in the build already (built, then changed upstream while it ran).
const BUILD_UPSERT: &str = build_insert!(
    " ON CONFLICT (source, source_id) DO UPDATE
      SET name = EXCLUDED.name, value = EXCLUDED.value, description = EXCLUDED.description,
          updated_at = EXCLUDED.updated_at"
);

/// How long the swap waits for readers to let go of normalized_data. While it waits, new
/// statements on the table queue behind it; past this, it gives up and is tried again.
const SWAP_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '2s'";

/// The version built replaces the served one, in the caller's transaction.
async fn swap(
    tx: &Transaction<'_>,
    table: RawTable,
    source: &str,
    run_id: i64,
    position: i64,
    fingerprint: &str,
) -> Result<RunCounts, tokio_postgres::Error> {
    // What changes for readers, against the served version (left alone since the replay
    // began: ordinary batches stop while one is under way), walked from the served side: a
    // first load's is empty or small.
    let row = tx
        .query_one(
            "SELECT (SELECT count(*) FROM normalized_build WHERE source = $1),
                    count(*), count(b.source_id),
                    count(*) FILTER (WHERE (o.name, o.value, o.description)
                        IS DISTINCT FROM (b.name, b.value, b.description)
                        AND b.source_id IS NOT NULL),
                    (SELECT count(*) FROM etl_rejects_replay WHERE source = $1)
             FROM normalized_data o
             LEFT JOIN normalized_build b ON b.source = $1 AND b.source_id = o.source_id
             WHERE o.source = $1",
            &[&source],
        )
        .await?;
    let (rows, served, kept, updated, rejected): (i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let (inserted, withdrawn) = (rows - kept, served - kept);
    tx.batch_execute(SWAP_LOCK_TIMEOUT).await?;
    tx.execute("SELECT etl_swap_build($1)", &[&source]).await?;
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
    tx.execute(
        "DELETE FROM etl_rejects_replay WHERE source = $1",
        &[&source],
    )
    .await?;
    Ok(RunCounts {
        processed: rows + rejected,
        inserted,
        updated,
        unchanged: rows - inserted - updated,
        rejected,
        deleted: withdrawn,
    })
}
