//! Bookkeeping of ingest and normalize runs in `etl_runs`: the one way both services run work
//! as a recorded run ([`Runs::begin`], the work, then [`Run::end`] or [`Run::discard`]).
//!
//! A running run is marked live by a session advisory lock keyed by its id. If the process
//! dies, Postgres drops its sessions and the locks with them, so any replica can tell an
//! interrupted run (unlocked) from one still in progress (locked) and mark only the former
//! failed, without clocks or heartbeats. The locks of all of a process's runs live on one
//! connection of its own ([`Runs`]), not on pooled ones: a run waiting on its source holds no
//! pooled connection, so a process runs more sources at once than its pool has connections.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;
use crate::db::{DbError, Pool};
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
/// processed = inserted + updated + unchanged + rejected (+ deleted, for the normalizer).
/// `deleted`: for an ingest run, raw rows it tombstoned because its snapshot no longer had them
/// (not among the records it saw); for a normalize run, the tombstones it applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub processed: i64,
    pub inserted: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub rejected: i64,
    pub deleted: i64,
}

impl RunCounts {
    pub fn add(&mut self, other: RunCounts) {
        self.processed += other.processed;
        self.inserted += other.inserted;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.rejected += other.rejected;
        self.deleted += other.deleted;
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
    #[error("could not lock the run: {0}")]
    Locks(#[from] DbError),
}

/// Where one service records its runs: the pool for the rows, and the one connection that
/// holds the locks of this process's live runs. Cheap to clone.
#[derive(Clone)]
pub struct Runs {
    pool: Pool,
    service: Service,
    locks: Arc<Mutex<LockSession>>,
}

/// The connection the run locks live on, and which runs it holds, so a new connection (after a
/// database restart) takes them again.
struct LockSession {
    database: DatabaseSettings,
    connection: Option<tokio_postgres::Client>,
    held: BTreeSet<i64>,
}

impl LockSession {
    async fn client(&mut self) -> Result<&tokio_postgres::Client, RunError> {
        if self.connection.as_ref().is_none_or(|c| c.is_closed()) {
            self.connection = None;
            let (client, _driver) = crate::db::connect(&self.database).await?;
            // Runs still going on here: locked again. One may have been reaped as failed in
            // between; it is still recorded by its own end.
            for id in &self.held {
                client.execute("SELECT pg_advisory_lock($1)", &[id]).await?;
            }
            self.connection = Some(client);
        }
        Ok(self.connection.as_ref().expect("just connected"))
    }
}

impl Runs {
    pub fn new(pool: Pool, database: &DatabaseSettings, service: Service) -> Self {
        Self {
            pool,
            service,
            locks: Arc::new(Mutex::new(LockSession {
                database: database.clone(),
                connection: None,
                held: BTreeSet::new(),
            })),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Starts a recorded run over `source`: runs of the service cut off by a crash or an outage
    /// are first marked failed (cheap: a partial index holds only running runs), then a new run
    /// id is locked and its `running` row recorded, and the current span gets its `run_id`.
    pub async fn begin(&self, source: &str) -> Result<Run, RunError> {
        self.reap().await?;
        let run = self.start(source).await?;
        tracing::Span::current().record("run_id", run.id);
        Ok(run)
    }

    /// Records a new `running` run for `source`, locked before its row exists, so no other
    /// session ever sees the row unlocked.
    pub async fn start(&self, source: &str) -> Result<Run, RunError> {
        let mut run = self.reserve(source).await?;
        run.record().await?;
        Ok(run)
    }

    /// A new run id, locked as live but not yet recorded: for work that must first claim
    /// something under that id (a source's lease) and records the run only once it has.
    /// Dropping or [discarding](Run::discard) it leaves no trace.
    pub async fn reserve(&self, source: &str) -> Result<Run, RunError> {
        let id: i64 = {
            let mut locks = self.locks.lock().await;
            let client = locks.client().await?;
            let id = client
                .query_one(
                    "SELECT nextval(pg_get_serial_sequence('etl_runs', 'id'))",
                    &[],
                )
                .await?
                .get(0);
            client
                .execute("SELECT pg_advisory_lock($1)", &[&id])
                .await?;
            locks.held.insert(id);
            id
        };
        Ok(Run {
            id,
            runs: self.clone(),
            source: source.to_owned(),
            started: Instant::now(),
            open: true,
            recorded: false,
        })
    }

    /// Marks failed every `running` run of the service whose process is gone. This process's
    /// own runs are locked again first if their lock connection was lost (a database restart
    /// they rode out), so they are never taken for interrupted here.
    pub async fn reap(&self) -> Result<u64, RunError> {
        {
            let mut locks = self.locks.lock().await;
            if !locks.held.is_empty() {
                locks.client().await?;
            }
        }
        reap_interrupted(&self.pool, self.service).await
    }

    /// Reaps now and every [`REAP_INTERVAL`] until shutdown. Runs are otherwise reaped only
    /// when new work starts: a run whose end could not be recorded (the database went away
    /// mid-run) must not stay `running` while its source stays quiet.
    pub async fn reap_periodically(self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.reap().await {
                tracing::warn!(error = %e, "could not look for interrupted runs");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REAP_INTERVAL) => {}
            }
        }
    }

    async fn unlock(&self, id: i64) -> Result<(), RunError> {
        let mut locks = self.locks.lock().await;
        locks.held.remove(&id);
        if let Some(client) = locks.connection.as_ref().filter(|c| !c.is_closed()) {
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&id])
                .await?;
        }
        Ok(())
    }
}

/// A run in progress; its lock is held (by [`Runs`]) until it ends.
pub struct Run {
    pub id: i64,
    runs: Runs,
    source: String,
    started: Instant,
    /// Not yet ended or discarded.
    open: bool,
    /// Its `running` row exists.
    recorded: bool,
}

impl Run {
    /// Writes the run's `running` row (for a run from [`Runs::reserve`]); its clock starts now.
    pub async fn record(&mut self) -> Result<(), RunError> {
        self.runs
            .pool
            .get()
            .await?
            .execute(
                "INSERT INTO etl_runs (id, service, source) OVERRIDING SYSTEM VALUE
                 VALUES ($1, $2, $3)",
                &[&self.id, &self.runs.service.as_str(), &self.source],
            )
            .await?;
        self.recorded = true;
        self.started = Instant::now();
        Ok(())
    }

    /// Ends the run: records its outcome (and releases its lock), counts it in `metrics`, logs
    /// it, and says what it did.
    pub async fn end(
        mut self,
        metrics: &PipelineMetrics,
        counts: RunCounts,
        error: Option<String>,
    ) -> Result<RunSummary, RunError> {
        let service = self.runs.service;
        let seconds = self.started.elapsed().as_secs_f64();
        self.finish(counts, error.as_deref()).await?;
        metrics.record_run(&self.source, error.is_none(), seconds);
        match &error {
            None => tracing::info!(service = service.as_str(), ?counts, "run succeeded"),
            Some(e) => {
                tracing::warn!(service = service.as_str(), ?counts, error = %e, "run failed")
            }
        }
        Ok(RunSummary {
            source: std::mem::take(&mut self.source),
            run_id: self.id,
            counts,
            error,
        })
    }

    /// Records the outcome, then releases the lock. If the outcome cannot be written (the
    /// database went away), the lock is let go all the same (when the run is dropped) and the
    /// run is left for [`reap_interrupted`].
    async fn finish(&mut self, counts: RunCounts, error: Option<&str>) -> Result<(), RunError> {
        let status = if error.is_some() { "failed" } else { "success" };
        let elapsed = self.started.elapsed().as_secs_f64();
        self.runs
            .pool
            .get()
            .await?
            .execute(
                "UPDATE etl_runs SET status = $2, error_message = $3, ended_at = now(),
                     duration_seconds = $4, records_processed = $5, records_inserted = $6,
                     records_updated = $7, records_unchanged = $8, records_rejected = $9,
                     records_deleted = $10
                 WHERE id = $1",
                &[
                    &self.id,
                    &status,
                    &error,
                    &elapsed,
                    &counts.processed,
                    &counts.inserted,
                    &counts.updated,
                    &counts.unchanged,
                    &counts.rejected,
                    &counts.deleted,
                ],
            )
            .await?;
        self.open = false;
        self.runs.unlock(self.id).await
    }

    /// Removes a run that turned out to have nothing to do (another replica took the work), so
    /// `etl_runs` holds only runs that did something or failed.
    pub async fn discard(mut self) -> Result<(), RunError> {
        if self.recorded {
            self.runs
                .pool
                .get()
                .await?
                .execute("DELETE FROM etl_runs WHERE id = $1", &[&self.id])
                .await?;
        }
        self.open = false;
        self.runs.unlock(self.id).await
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Not ended (a panic, or the task was aborted): let go of the lock so the run is reaped
        // as interrupted.
        if self.open {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (runs, id) = (self.runs.clone(), self.id);
                runtime.spawn(async move {
                    let _ = runs.unlock(id).await;
                });
            }
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

/// How often [`Runs::reap_periodically`] looks for runs left `running` by a dead process.
pub const REAP_INTERVAL: Duration = Duration::from_secs(60);

/// What [`prune_history`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub runs: u64,
    pub rejects: u64,
}

/// Removes history older than `days`: ingest rejects of runs other than their source's latest
/// successful one (those are what the source's rejects are now), then runs that ended before
/// then, except each service's latest run of each source and runs whose rejects are kept.
/// Normalize rejects are the current state of raw rows, not history: they stay. Taken console
/// requests older than `days` go too.
pub async fn prune_history(pool: &Pool, days: u32) -> Result<Pruned, RunError> {
    let client = pool.get().await?;
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    let rejects = client
        .execute(
            "DELETE FROM etl_rejects j
             WHERE j.stage = 'ingest' AND j.created_at < now() - make_interval(days => $1)
               AND j.run_id IS DISTINCT FROM (
                   SELECT r.id FROM etl_runs r
                   WHERE r.service = 'ingester' AND r.source = j.source AND r.status = 'success'
                   ORDER BY r.started_at DESC LIMIT 1)",
            &[&days],
        )
        .await?;
    let runs = client
        .execute(
            "DELETE FROM etl_runs r
             WHERE r.status <> 'running' AND r.ended_at < now() - make_interval(days => $1)
               AND r.started_at < (SELECT max(l.started_at) FROM etl_runs l
                                   WHERE l.service = r.service AND l.source = r.source)
               AND NOT EXISTS (SELECT 1 FROM etl_rejects j WHERE j.run_id = r.id)",
            &[&days],
        )
        .await?;
    // The console's requests, once taken: history like the runs they started.
    client
        .execute(
            "DELETE FROM etl_requests
             WHERE taken_at < now() - make_interval(days => $1)",
            &[&days],
        )
        .await?;
    // What snapshot runs that died mid-way had seen (a run that ends forgets its own).
    client
        .execute(
            "DELETE FROM etl_run_seen s WHERE NOT EXISTS
                 (SELECT 1 FROM etl_runs r WHERE r.id = s.run_id AND r.status = 'running')",
            &[],
        )
        .await?;
    Ok(Pruned { runs, rejects })
}

/// How often the ingester daemon prunes history (and once at start).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Prunes history older than `days` now and every [`PRUNE_INTERVAL`] until shutdown.
pub async fn prune_periodically(pool: Pool, days: u32, shutdown: CancellationToken) {
    loop {
        match prune_history(&pool, days).await {
            Ok(pruned) if pruned != Pruned::default() => {
                tracing::info!(
                    runs = pruned.runs,
                    rejects = pruned.rejects,
                    days,
                    "pruned history"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not prune history"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
    }
}
