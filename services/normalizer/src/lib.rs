//! The normalizer service: turns raw rows into `normalized_data`, exactly once in effect, however
//! many replicas run and whatever crashes.
//!
//! Wake-ups come from `LISTEN` (a hint), from start-up and reconnects, and from a slow poll (the
//! safety net); the work itself always starts from the checkpoint in the database, so a missed
//! notification only delays a record, never loses it.

pub mod admin;
pub mod batch;
pub mod daemon;
pub mod listen;
pub mod mapping;
pub mod replay;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etl_shared::config::{ConfigError, DatabaseSettings, Env};
use etl_shared::metrics::{PipelineMetrics, SourceLabels};
use etl_shared::runs::{RunCounts, RunError, RunSummary, Runs, Service};
use etl_shared::sources::{Source, Sources, SourcesError};
use etl_shared::Pool;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use daemon::Application;
use tokio_postgres::Client;

use crate::batch::{BatchError, BatchOutcome, Hook};
use crate::mapping::FieldPaths;

/// How often a run of ordinary batches looks whether its backlog now wants the bulk path.
const BULK_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How often a replay that has built every raw row looks again while an ingest run of its
/// source is still landing rows.
const INGEST_WAIT: Duration = Duration::from_millis(200);

/// Everything the normalizer reads from its environment, validated at start-up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub sources: Sources,
    /// Where `/health/*` and `/metrics` are served.
    pub admin_addr: SocketAddr,
    /// The safety net: every source is checked this often even if no notification arrives.
    pub poll_interval: Duration,
    /// Raw rows per transaction: bounds memory and lock time, amortizes round trips.
    pub batch_size: i64,
    /// A backlog of at least this many raw changes (and at least half the source's rows) takes
    /// the bulk path: the source is rebuilt apart and its search indexes built once.
    pub bulk_min_rows: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sources(#[from] SourcesError),
}

impl Settings {
    /// Reads `DATABASE_*`, `SOURCES_FILE`, `NORMALIZER_ADMIN_ADDR` (default `0.0.0.0:8082`),
    /// `NORMALIZER_POLL_INTERVAL_SECS` (1–3600, default 30), `NORMALIZER_BATCH_SIZE`
    /// (1–100000, default 5000) and `NORMALIZER_BULK_MIN_ROWS` (1–10^12, default 100000).
    pub fn from_env(env: &Env) -> Result<Self, SettingsError> {
        let database = DatabaseSettings::from_env(env)?;
        let path: PathBuf = env
            .required(Sources::FILE_VAR, "path of the sources file (TOML)")?
            .into();
        Ok(Self {
            database,
            sources: Sources::load(&path)?,
            admin_addr: env
                .parse("NORMALIZER_ADMIN_ADDR")?
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8082))),
            poll_interval: Duration::from_secs(env.parse_in_range(
                "NORMALIZER_POLL_INTERVAL_SECS",
                1..=3600,
                30,
            )?),
            batch_size: env.parse_in_range("NORMALIZER_BATCH_SIZE", 1..=100_000, 5_000)? as i64,
            bulk_min_rows: env.parse_in_range(
                "NORMALIZER_BULK_MIN_ROWS",
                1..=1_000_000_000_000,
                100_000,
            )? as i64,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NormalizeError {
    #[error("unknown source `{0}`")]
    UnknownSource(String),
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{0}")]
    Replay(String),
}

/// How a normalize run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The run it recorded; `None` when it found nothing to do.
    pub summary: Option<RunSummary>,
    /// It stopped because another replica held the source: there may be more to do, so the
    /// caller should try again shortly (this is what spreads a backlog over replicas).
    pub busy: bool,
}

/// Normalizes sources. Cheap to clone; clones share the pool, metrics and shutdown signal.
#[derive(Clone)]
pub struct Normalizer {
    inner: Arc<Inner>,
}

/// Scrapes read the lag from the database at most this often (see
/// [`Normalizer::refresh_lag_cached`]).
pub const LAG_MAX_AGE: Duration = Duration::from_secs(5);

/// Each statement of a lag refresh may take this long.
const SCRAPE_STATEMENT_TIMEOUT: &str = "SET LOCAL statement_timeout = '2s'";

struct Inner {
    pool: Pool,
    /// When the lag gauges were last read from the database.
    lag_refreshed: std::sync::Mutex<Option<Instant>>,
    runs: Runs,
    sources: Sources,
    paths: HashMap<String, FieldPaths>,
    replay: Family<SourceLabels, Gauge>,
    /// Per source, its mapping's fingerprint ([`FieldPaths::fingerprint`]).
    fingerprints: HashMap<String, String>,
    batch_size: i64,
    bulk_min_rows: i64,
    metrics: PipelineMetrics,
    lag: Family<SourceLabels, Gauge>,
    reconnects: Counter,
    shutdown: CancellationToken,
    hook: Option<Hook>,
}

impl Normalizer {
    pub fn new(settings: &Settings, pool: Pool, shutdown: CancellationToken) -> Self {
        Self::with_hook(settings, pool, shutdown, None)
    }

    /// As [`new`](Self::new), with a hook called inside each batch (tests use it to crash the
    /// normalizer between the upsert and the checkpoint).
    pub fn with_hook(
        settings: &Settings,
        pool: Pool,
        shutdown: CancellationToken,
        hook: Option<Hook>,
    ) -> Self {
        let metrics = PipelineMetrics::new("etl_normalize", "normalize");
        let lag = Family::<SourceLabels, Gauge>::default();
        metrics.register(
            "etl_normalize_lag_rows",
            "Raw changes not yet normalized, per source",
            lag.clone(),
        );
        let replay = Family::<SourceLabels, Gauge>::default();
        metrics.register(
            "etl_normalize_replay_rows",
            "Raw rows built into the new version by a replay under way, per source (0: none)",
            replay.clone(),
        );
        let reconnects = Counter::default();
        metrics.register(
            "etl_normalize_listen_reconnects",
            "Times the LISTEN connection was re-established",
            reconnects.clone(),
        );
        let paths = settings
            .sources
            .sources
            .iter()
            .map(|s| (s.name.clone(), FieldPaths::for_source(s)))
            .collect::<HashMap<_, _>>();
        let fingerprints = paths
            .iter()
            .map(|(name, paths)| (name.clone(), paths.fingerprint()))
            .collect();
        Self {
            inner: Arc::new(Inner {
                lag_refreshed: std::sync::Mutex::new(None),
                runs: Runs::new(pool.clone(), &settings.database, Service::Normalizer),
                pool,
                sources: settings.sources.clone(),
                paths,
                fingerprints,
                batch_size: settings.batch_size,
                bulk_min_rows: settings.bulk_min_rows,
                metrics,
                lag,
                replay,
                reconnects,
                shutdown,
                hook,
            }),
        }
    }

    pub fn runs(&self) -> &etl_shared::runs::Runs {
        &self.inner.runs
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    pub fn sources(&self) -> &Sources {
        &self.inner.sources
    }

    pub fn metrics(&self) -> &PipelineMetrics {
        &self.inner.metrics
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    pub(crate) fn count_reconnect(&self) {
        self.inner.reconnects.inc();
    }

    /// Refreshes the per-source lag and replay gauges from the database, each statement
    /// bounded by [`SCRAPE_STATEMENT_TIMEOUT`].
    pub async fn refresh_lag(&self) -> Result<(), NormalizeError> {
        let mut client = self.inner.pool.get().await?;
        // Counting pending changes scans them: bounded, so a scrape cannot pile up queries.
        let tx = client.transaction().await?;
        tx.batch_execute(SCRAPE_STATEMENT_TIMEOUT).await?;
        let replays: HashMap<String, i64> = tx
            .query("SELECT source, processed FROM etl_replays", &[])
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for source in &self.inner.sources.sources {
            let lag = batch::lag(&*tx, source).await?;
            let labels = SourceLabels {
                source: source.name.clone(),
            };
            self.inner.lag.get_or_create(&labels).set(lag);
            let replayed = replays.get(&source.name).copied().unwrap_or(0);
            self.inner.replay.get_or_create(&labels).set(replayed);
        }
        tx.commit().await?;
        *self
            .inner
            .lag_refreshed
            .lock()
            .expect("never held across a panic") = Some(Instant::now());
        Ok(())
    }

    /// [`refresh_lag`](Self::refresh_lag) unless it ran less than [`LAG_MAX_AGE`] ago: what a
    /// scrape of `/metrics` calls, so frequent scrapes (several Prometheus replicas, a
    /// dashboard) count the pending changes at most once per interval.
    pub async fn refresh_lag_cached(&self) -> Result<(), NormalizeError> {
        let fresh = self
            .inner
            .lag_refreshed
            .lock()
            .expect("never held across a panic")
            .is_some_and(|at| at.elapsed() < LAG_MAX_AGE);
        if fresh {
            return Ok(());
        }
        self.refresh_lag().await
    }

    /// One normalize run of `name`: everything after its checkpoint, batch by batch, until
    /// caught up (or another replica holds the source). Recorded in `etl_runs`, and traced, only
    /// when it found something to do: an idle normalizer's polls export no span.
    pub async fn run_source(&self, name: &str) -> Result<RunOutcome, NormalizeError> {
        let inner = &self.inner;
        let source = inner
            .sources
            .get(name)
            .ok_or_else(|| NormalizeError::UnknownSource(name.into()))?;
        let idle = RunOutcome {
            summary: None,
            busy: false,
        };
        // One pooled connection for the run's batches (a normalize run never waits on anything
        // but the database).
        let client = inner.pool.get().await?;
        let replaying = match replay::mode(&client, name, &inner.fingerprints[name]).await? {
            replay::Mode::Current => false,
            replay::Mode::Replaying => true,
            // One failed run said why; the previous version stays served until the mapping
            // changes again, a replay is asked for, or (ordinary batches) new raw rows arrive.
            replay::Mode::Stalled => return Ok(idle),
        };
        if !replaying && !batch::has_work(&client, source).await? {
            return Ok(idle);
        }
        self.run_with_work(source, client, replaying).await
    }

    /// The part of [`run_source`](Self::run_source) that has something to do.
    #[tracing::instrument(name = "run_source", skip_all, fields(name = %source.name))]
    async fn run_with_work(
        &self,
        source: &Source,
        mut client: deadpool_postgres::Object,
        replaying: bool,
    ) -> Result<RunOutcome, NormalizeError> {
        if replaying {
            return self.replay_source(source, client).await;
        }
        let inner = &self.inner;
        let name = source.name.as_str();
        let paths = &inner.paths[name];
        let idle = RunOutcome {
            summary: None,
            busy: false,
        };
        if batch::wants_bulk(&client, source, inner.bulk_min_rows).await? {
            self.begin_bulk(&client, name).await?;
            return self.replay_source(source, client).await;
        }
        let run = inner.runs.begin(name).await?;
        let run_id = run.id;
        let mut total = RunCounts::default();
        let mut error = None;
        let mut busy = false;
        let mut row_limit = inner.batch_size;
        let mut bulk_checked = Instant::now();
        let mut bulk = false;
        while !inner.shutdown.is_cancelled() {
            // A backlog that grows faster than batches apply it (a large load landing now)
            // switches to the bulk path; looked at every few seconds, since it counts.
            if bulk_checked.elapsed() >= BULK_CHECK_INTERVAL {
                bulk_checked = Instant::now();
                if batch::wants_bulk(&client, source, inner.bulk_min_rows).await? {
                    bulk = true;
                    break;
                }
            }
            let batch_started = Instant::now();
            let batch = batch::process_batch(
                &mut client,
                source,
                paths,
                run_id,
                row_limit,
                inner.hook.as_ref(),
            )
            .instrument(tracing::info_span!(
                "normalize_batch",
                source = name,
                rows = tracing::field::Empty
            ))
            .await;
            match batch {
                Ok(BatchOutcome::Processed { counts, text_bytes }) => {
                    row_limit =
                        batch::next_row_limit(inner.batch_size, counts.processed, text_bytes);
                    total.add(counts);
                    inner.metrics.record_batch(
                        name,
                        &counts,
                        batch_started.elapsed().as_secs_f64(),
                    );
                    etl_shared::pacing::yield_to_readers(
                        &**client,
                        batch_started.elapsed(),
                        &inner.metrics,
                    )
                    .await;
                }
                Ok(BatchOutcome::Busy) => {
                    busy = true;
                    break;
                }
                Ok(BatchOutcome::CaughtUp) => break,
                Err(e) => {
                    if let BatchError::Mapping(reason) = &e {
                        batch::stall(&client, name, reason).await?;
                    }
                    error = Some(etl_shared::error_chain(&e));
                    break;
                }
            }
        }
        if bulk {
            self.begin_bulk(&client, name).await?;
            // The caller comes back at once, and the next run is the bulk one.
            busy = true;
        }
        if total.processed == 0 && error.is_none() {
            run.discard().await?;
            return Ok(RunOutcome { busy, ..idle });
        }
        if total.inserted + total.updated + total.deleted > 0 && !busy {
            batch::clean_search_pending_lists(&client, name).await;
        }
        drop(client);
        let summary = run.end(&inner.metrics, total, error).await?;
        Ok(RunOutcome {
            summary: Some(summary),
            busy,
        })
    }

    /// Starts the bulk path for `name`'s backlog: a replay to its current mapping.
    async fn begin_bulk(&self, client: &Client, name: &str) -> Result<(), NormalizeError> {
        tracing::info!(
            source = name,
            "large backlog: normalizing it apart, search indexes built in bulk"
        );
        let fingerprint = &self.inner.fingerprints[name];
        replay::begin(client, name, fingerprint, replay::Reason::Backlog).await?;
        Ok(())
    }

    /// A replay run of `source` (see [`replay`]): builds batch after batch until it swaps the
    /// new version in, another replica holds the source, or the mapping cannot apply.
    async fn replay_source(
        &self,
        source: &Source,
        mut client: deadpool_postgres::Object,
    ) -> Result<RunOutcome, NormalizeError> {
        let inner = &self.inner;
        let name = source.name.as_str();
        let paths = &inner.paths[name];
        let run = inner.runs.begin(name).await?;
        let mut outcome = RunOutcome {
            summary: None,
            busy: false,
        };
        let mut counts = RunCounts::default();
        let mut error = None;
        let mut built = 0;
        let mut row_limit = inner.batch_size;
        // A second connection to read ahead and to build one of the search indexes, if the
        // pool has one to spare.
        let helper = tokio::time::timeout(Duration::from_millis(100), inner.pool.get())
            .await
            .ok()
            .and_then(Result::ok);
        let mut ahead = None;
        while !inner.shutdown.is_cancelled() {
            let started = Instant::now();
            let batch = replay::process_batch(
                &mut client,
                helper.as_ref().map(|c| &***c),
                &mut ahead,
                source,
                paths,
                run.id,
                row_limit,
            )
            .instrument(tracing::info_span!("replay_batch", source = name))
            .await;
            match batch {
                Ok(replay::ReplayOutcome::Built { rows, text_bytes }) => {
                    built += rows;
                    row_limit = batch::next_row_limit(inner.batch_size, rows, text_bytes);
                    inner.metrics.record_batch(
                        name,
                        &RunCounts {
                            processed: rows,
                            ..RunCounts::default()
                        },
                        started.elapsed().as_secs_f64(),
                    );
                    etl_shared::pacing::yield_to_readers(
                        &**client,
                        started.elapsed(),
                        &inner.metrics,
                    )
                    .await;
                }
                Ok(replay::ReplayOutcome::Indexed) => {}
                Ok(replay::ReplayOutcome::WaitingForIngest) => {
                    tokio::select! {
                        _ = inner.shutdown.cancelled() => {}
                        _ = tokio::time::sleep(INGEST_WAIT) => {}
                    }
                }
                Ok(replay::ReplayOutcome::Swapped(swapped)) => {
                    counts = swapped;
                    break;
                }
                Ok(replay::ReplayOutcome::Busy) => {
                    outcome.busy = true;
                    break;
                }
                Err(e) => {
                    error = Some(format!("replay: {}", etl_shared::error_chain(&e)));
                    break;
                }
            }
        }
        if built == 0 && counts == RunCounts::default() && error.is_none() {
            run.discard().await?;
            return Ok(outcome);
        }
        drop(client);
        outcome.summary = Some(run.end(&inner.metrics, counts, error).await?);
        Ok(outcome)
    }

    /// Starts a replay of `name` to its current mapping, which its next runs (on any replica)
    /// carry out: what a replay asked for from the console does.
    pub async fn begin_replay(&self, name: &str) -> Result<(), NormalizeError> {
        let fingerprint = self
            .inner
            .fingerprints
            .get(name)
            .ok_or_else(|| NormalizeError::UnknownSource(name.into()))?;
        let client = self.inner.pool.get().await?;
        replay::mode(&client, name, fingerprint).await?;
        replay::begin(&client, name, fingerprint, replay::Reason::Requested).await?;
        Ok(())
    }

    /// `etl-normalizer replay --source NAME`: re-normalizes `name` from its raw rows now, to
    /// the current mapping, and returns once the new version is served (or why it is not).
    pub async fn replay(&self, name: &str) -> Result<RunCounts, NormalizeError> {
        let source = self
            .inner
            .sources
            .get(name)
            .ok_or_else(|| NormalizeError::UnknownSource(name.into()))?;
        self.begin_replay(name).await?;
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            let client = self.inner.pool.get().await?;
            let outcome = self.replay_source(source, client).await?;
            if let Some(summary) = outcome.summary {
                return match summary.error {
                    None => Ok(summary.counts),
                    Some(error) => Err(NormalizeError::Replay(error)),
                };
            }
            if !outcome.busy {
                // Another process swapped it in while this one waited.
                return Ok(RunCounts::default());
            }
            // Another replica holds the source (and may be replaying it): look again.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(2));
        }
    }
}
