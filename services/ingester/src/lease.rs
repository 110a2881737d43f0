//! One ingest run per source at a time, across processes and replicas (`etl_source_leases`,
//! migration V5). A run claims its source under its run id before it fetches anything, and
//! holds it until it ends; the claim is good while the run is live (its process holds the run's
//! advisory lock), so a crashed holder frees the source without clocks or heartbeats. Every
//! batch the run writes checks, in its transaction, that the claim is still its own, so a run
//! whose claim was taken over (its process lost its lock connection) cannot land stale data.

use std::time::Duration;

use etl_shared::Pool;
use tokio_postgres::GenericClient;

use crate::state::SourceState;

/// What came of trying to claim a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The run holds the source until [`release`].
    Held,
    /// Another live run holds it.
    Busy { holder: i64 },
    /// Its last successful run started less than the schedule ago (a scheduled run only).
    NotDue { since: Duration },
}

/// Claims `source` for `run_id` if no live run holds it and, when `due_after` is given, its
/// last successful run started at least that long ago (or it never had one).
pub async fn try_claim(
    pool: &Pool,
    source: &str,
    run_id: i64,
    due_after: Option<Duration>,
) -> Result<Claim, ClaimError> {
    let client = pool.get().await?;
    let due_after = due_after.map(|d| d.as_secs_f64());
    // The outer SELECT reads the row as it was before the claim: whom it lost to.
    let row = client
        .query_one(
            "WITH claimed AS (
                 INSERT INTO etl_source_leases AS l (source, run_id) VALUES ($1, $2)
                 ON CONFLICT (source) DO UPDATE SET run_id = EXCLUDED.run_id, acquired_at = now()
                 WHERE (l.run_id IS NULL OR pg_try_advisory_xact_lock(l.run_id))
                   AND ($3::float8 IS NULL OR l.succeeded_at IS NULL
                        OR l.succeeded_at <= now() - make_interval(secs => $3))
                 RETURNING run_id
             )
             SELECT EXISTS (SELECT 1 FROM claimed),
                    l.run_id,
                    extract(epoch FROM now() - l.succeeded_at)::float8,
                    ($3::float8 IS NULL OR l.succeeded_at IS NULL
                        OR l.succeeded_at <= now() - make_interval(secs => $3))
             FROM (SELECT 1) AS one LEFT JOIN etl_source_leases l ON l.source = $1",
            &[&source, &run_id, &due_after],
        )
        .await?;
    let (won, holder, since, due): (bool, Option<i64>, Option<f64>, Option<bool>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    Ok(match (won, holder) {
        (true, _) => Claim::Held,
        (false, Some(holder)) if due.unwrap_or(true) => Claim::Busy { holder },
        (false, _) => Claim::NotDue {
            since: Duration::from_secs_f64(since.unwrap_or(0.0).max(0.0)),
        },
    })
}

/// Claims `source` for `run_id`, waiting while another run holds it, for at most `wait`.
pub async fn claim_within(
    pool: &Pool,
    source: &str,
    run_id: i64,
    wait: Duration,
) -> Result<Claim, ClaimError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(50);
    loop {
        let claim = try_claim(pool, source, run_id, None).await?;
        if claim == Claim::Held || tokio::time::Instant::now() + pause > deadline {
            return Ok(claim);
        }
        // The holder's end is not announced: look again, less often as the wait grows.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Lets go of `source` at the end of `run_id`. A run that succeeded marks the source fresh
/// (its start is when the next scheduled run falls due) and, when it read the source whole,
/// makes its rejects the source's ingest rejects: those of earlier runs are superseded.
pub async fn release(
    pool: &Pool,
    source: &str,
    run_id: i64,
    outcome: Outcome,
    learnt: Option<&SourceState>,
) -> Result<(), ClaimError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let succeeded = outcome != Outcome::Failed;
    let held = tx
        .execute(
            "UPDATE etl_source_leases
             SET run_id = NULL,
                 succeeded_at = CASE WHEN $3 THEN acquired_at ELSE succeeded_at END
             WHERE source = $1 AND run_id = $2",
            &[&source, &run_id, &succeeded],
        )
        .await?;
    if let (1, true, Some(learnt)) = (held, succeeded, learnt) {
        crate::state::save(&tx, source, learnt).await?;
    }
    if held == 1 && outcome == Outcome::Complete {
        tx.execute(
            "DELETE FROM etl_rejects
             WHERE stage = 'ingest' AND source = $1 AND run_id IS DISTINCT FROM $2",
            &[&source, &run_id],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// How a run that held its source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It read the whole source and landed all of it.
    Complete,
    /// It landed what it read, but that was not the whole source (an incremental fetch), or
    /// nothing at all (a 304): earlier rejects may still be current.
    Partial,
    Failed,
}

/// Whether `run_id` still holds `source`; taken inside a batch's transaction, it also keeps the
/// claim from being taken over until that transaction ends.
pub async fn still_held(
    client: &impl GenericClient,
    source: &str,
    run_id: i64,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT 1 FROM etl_source_leases WHERE source = $1 AND run_id = $2 FOR SHARE",
            &[&source, &run_id],
        )
        .await?;
    Ok(row.is_some())
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("no database connection to claim the source: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("claiming the source failed: {0}")]
    Db(#[from] tokio_postgres::Error),
}
