//! `etl-ingester purge --source NAME`: removes what a source left in the database (raw and
//! normalized rows, the normalizer's checkpoint, rejects, its lease, fetch state and any replay
//! in progress), for a source taken out of the sources file. Its runs stay, as history. One
//! transaction, taken in the order the writers take their locks: the source's lease (refused
//! while a run holds it), the raw write lock (so no batch lands half before, half after), the
//! normalizer's checkpoint row (waits for a batch in progress).

use etl_shared::raw::RAW_WRITE_LOCK_CLASS;
use etl_shared::Pool;

/// What a purge removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    pub raw_rows: u64,
    pub normalized_rows: u64,
    pub rejects: u64,
    pub checkpoint: bool,
    /// Runs of the source, kept.
    pub runs_kept: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("unknown source {0:?}: the database holds nothing of it (no rows, rejects or runs)")]
    Unknown(String),
    #[error("run {holder} is ingesting {name:?} now; purge it once that run has ended")]
    Busy { name: String, holder: i64 },
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("the purge failed and removed nothing: {0}")]
    Db(#[from] tokio_postgres::Error),
}

pub async fn purge(pool: &Pool, source: &str) -> Result<Purged, PurgeError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let holder: Option<i64> = tx
        .query_opt(
            "SELECT run_id FROM etl_source_leases
             WHERE source = $1 AND run_id IS NOT NULL AND NOT pg_try_advisory_xact_lock(run_id)
             FOR UPDATE",
            &[&source],
        )
        .await?
        .map(|row| row.get(0));
    if let Some(holder) = holder {
        return Err(PurgeError::Busy {
            name: source.to_owned(),
            holder,
        });
    }
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&RAW_WRITE_LOCK_CLASS, &source],
    )
    .await?;
    let checkpoint = tx
        .execute("DELETE FROM etl_checkpoint WHERE source = $1", &[&source])
        .await?
        == 1;
    let mut purged = Purged {
        checkpoint,
        ..Purged::default()
    };
    for delete in [
        "DELETE FROM raw_api_data WHERE source = $1",
        "DELETE FROM raw_csv_data WHERE source = $1",
    ] {
        purged.raw_rows += tx.execute(delete, &[&source]).await?;
    }
    purged.normalized_rows = tx
        .execute("DELETE FROM normalized_data WHERE source = $1", &[&source])
        .await?;
    purged.rejects = tx
        .execute("DELETE FROM etl_rejects WHERE source = $1", &[&source])
        .await?;
    let mut state_rows = 0;
    for state in [
        "DELETE FROM etl_source_leases WHERE source = $1",
        "DELETE FROM etl_source_state WHERE source = $1",
        "DELETE FROM etl_replays WHERE source = $1",
        "DELETE FROM etl_rejects_replay WHERE source = $1",
        // What the console showed of it and asked for it.
        "DELETE FROM etl_source_config WHERE source = $1",
        "DELETE FROM etl_requests WHERE source = $1",
    ] {
        state_rows += tx.execute(state, &[&source]).await?;
    }
    // A version being built (a replay or the bulk path) goes with its table.
    let built: bool = tx
        .query_one("SELECT etl_drop_build($1)", &[&source])
        .await?
        .get(0);
    state_rows += u64::from(built);
    purged.runs_kept = tx
        .query_one(
            "SELECT count(*) FROM etl_runs WHERE source = $1",
            &[&source],
        )
        .await?
        .get(0);
    if purged == Purged::default() && state_rows == 0 {
        return Err(PurgeError::Unknown(source.to_owned()));
    }
    tx.commit().await?;
    Ok(purged)
}
