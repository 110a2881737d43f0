//! Bookkeeping of ingest and normalize runs in `etl_runs`: the one way both services run work
//! as a recorded run ([`Run::begin`], the work on the run's connection, then [`Run::end`] or
//! [`Run::discard`]).
//!
//! A running run holds a session advisory lock keyed by its id on the connection it works on.
//! If the process dies, Postgres drops the connection and the lock with it, so any replica can
//! tell an interrupted run (unlocked) from one still in progress (locked) and mark only the
//! former failed, without clocks or heartbeats.

use std::time::{Duration, Instant};

use deadpool_postgres::Object;
use tokio_util::sync::CancellationToken;

use crate::db::Pool;
use crate::metrics::PipelineMetrics;

/// Which service a run belongs to (the `etl_runs.service` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Ingester,
    Normalizer,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Ingester => "ingester",
            Service::Normalizer => "normalizer",
        }
    }
}

/// What a run did, in records. `processed` counts every record seen; the rest partition it:
/// processed = inserted + updated + unchanged + rejected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub processed: i64,
    pub inserted: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub rejected: i64,
}

impl RunCounts {
    pub fn add(&mut self, other: RunCounts) {
        self.processed += other.processed;
        self.inserted += other.inserted;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.rejected += other.rejected;
    }
}

/// What one run of a service over one source did: a row of `etl_runs`.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub source: String,
    pub run_id: i64,
    pub counts: RunCounts,
    /// Why the run failed; `None` on success.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("could not record the run: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// A run in progress. Owns the connection that holds its lock; the run's own work may use it.
pub struct Run {
    pub id: i64,
    service: Service,
    source: String,
    started: Instant,
    client: Option<Object>,
}

impl Run {
    /// Starts a recorded run of `service` over `source`: runs of the service cut off by a crash
    /// or an outage are first marked failed (cheap: a partial index holds only running runs),
    /// then a `running` row is recorded and locked, and the current span gets its `run_id`.
    pub async fn begin(pool: &Pool, service: Service, source: &str) -> Result<Self, RunError> {
        reap_interrupted(pool, service).await?;
        let run = Self::start(pool, service, source).await?;
        tracing::Span::current().record("run_id", run.id);
        Ok(run)
    }

    /// Ends the run: records its outcome (and releases its lock), counts it in `metrics`, logs
    /// it, and says what it did.
    pub async fn end(
        self,
        pool: &Pool,
        metrics: &PipelineMetrics,
        counts: RunCounts,
        error: Option<String>,
    ) -> Result<RunSummary, RunError> {
        let (run_id, service, source) = (self.id, self.service, self.source.clone());
        let seconds = self.started.elapsed().as_secs_f64();
        self.finish(pool, counts, error.clone().map_or(Ok(()), Err))
            .await?;
        metrics.record_run(&source, error.is_none(), seconds);
        match &error {
            None => tracing::info!(service = service.as_str(), ?counts, "run succeeded"),
            Some(e) => {
                tracing::warn!(service = service.as_str(), ?counts, error = %e, "run failed")
            }
        }
        Ok(RunSummary {
            source,
            run_id,
            counts,
            error,
        })
    }

    /// Records a new `running` run for `source` and locks it.
    pub async fn start(pool: &Pool, service: Service, source: &str) -> Result<Self, RunError> {
        let mut client = pool.get().await?;
        // Insert and lock in one transaction: no other session can see the row unlocked.
        let tx = client.transaction().await?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO etl_runs (service, source) VALUES ($1, $2) RETURNING id",
                &[&service.as_str(), &source],
            )
            .await?
            .get(0);
        tx.execute("SELECT pg_advisory_lock($1)", &[&id]).await?;
        tx.commit().await?;
        Ok(Self {
            id,
            service,
            source: source.to_owned(),
            started: Instant::now(),
            client: Some(client),
        })
    }

    /// The connection this run holds (and its lock lives on), for the run's own work.
    pub fn client_mut(&mut self) -> &mut tokio_postgres::Client {
        self.client.as_mut().expect("connection held until finish")
    }

    /// Records the outcome and releases the lock. If the run's own connection broke (say the
    /// database restarted), the outcome is written over a fresh one; if that fails too, the run
    /// is left for [`reap_interrupted`].
    pub async fn finish(
        mut self,
        pool: &Pool,
        counts: RunCounts,
        outcome: Result<(), String>,
    ) -> Result<(), RunError> {
        let client = self.client.take().expect("finish runs once");
        let (status, error) = match &outcome {
            Ok(()) => ("success", None),
            Err(e) => ("failed", Some(e.as_str())),
        };
        let elapsed = self.started.elapsed().as_secs_f64();
        const SQL: &str = "UPDATE etl_runs SET status = $2, error_message = $3, ended_at = now(),
                 duration_seconds = $4, records_processed = $5, records_inserted = $6,
                 records_updated = $7, records_unchanged = $8, records_rejected = $9
             WHERE id = $1";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
            &self.id,
            &status,
            &error,
            &elapsed,
            &counts.processed,
            &counts.inserted,
            &counts.updated,
            &counts.unchanged,
            &counts.rejected,
        ];
        match client.execute(SQL, &params).await {
            Ok(_) => {
                client
                    .execute("SELECT pg_advisory_unlock($1)", &[&self.id])
                    .await?;
                Ok(())
            }
            Err(first) => {
                // Close the broken connection (and any lock on it) rather than pool it.
                drop(Object::take(client));
                let fresh = pool.get().await.map_err(|_| first)?;
                fresh.execute(SQL, &params).await?;
                Ok(())
            }
        }
    }
}

impl Run {
    /// Removes a run that turned out to have nothing to do (another replica took the work), so
    /// `etl_runs` holds only runs that did something or failed.
    pub async fn discard(mut self) -> Result<(), RunError> {
        let client = self.client.take().expect("discard runs once");
        client
            .execute("DELETE FROM etl_runs WHERE id = $1", &[&self.id])
            .await?;
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&self.id])
            .await?;
        Ok(())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Not finished (a panic, or the task was aborted): close the connection instead of
        // returning it to the pool with the lock still held, so the run can be reaped.
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

/// Marks failed every `running` run of `service` whose process is gone (its lock is free).
/// Returns how many it marked.
pub async fn reap_interrupted(pool: &Pool, service: Service) -> Result<u64, RunError> {
    let client = pool.get().await?;
    let reaped = client
        .execute(
            "UPDATE etl_runs
             SET status = 'failed', ended_at = now(),
                 duration_seconds = extract(epoch FROM now() - started_at),
                 error_message = 'interrupted: the process running it stopped before the run finished'
             WHERE service = $1 AND status = 'running' AND pg_try_advisory_xact_lock(id)",
            &[&service.as_str()],
        )
        .await?;
    if reaped > 0 {
        tracing::warn!(
            service = service.as_str(),
            reaped,
            "marked interrupted runs as failed"
        );
    }
    Ok(reaped)
}

/// How often [`reap_periodically`] looks for runs left `running` by a dead process.
pub const REAP_INTERVAL: Duration = Duration::from_secs(60);

/// Reaps interrupted runs of `service` now and every [`REAP_INTERVAL`] until shutdown. Runs
/// are otherwise reaped only when new work starts: a run whose end could not be recorded (the
/// database went away mid-run) must not stay `running` while its source stays quiet.
pub async fn reap_periodically(pool: Pool, service: Service, shutdown: CancellationToken) {
    loop {
        if let Err(e) = reap_interrupted(&pool, service).await {
            tracing::warn!(error = %e, "could not look for interrupted runs");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REAP_INTERVAL) => {}
        }
    }
}
