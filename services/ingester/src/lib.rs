//! The ingester service: pulls REST and CSV sources over HTTP into the raw tables, records every
//! run in `etl_runs` and every unusable record in `etl_rejects`, and notifies the normalizer.
//!
//! `main.rs` only parses the command line and starts logging; [`Application`] (the daemon) and
//! [`Ingester::run_source`] (one run) are what tests and the binary start.

pub mod admin;
mod csv;
mod csv_records;
pub mod daemon;
mod error;
mod fetch_page;
pub mod http;
pub mod land;
pub mod lease;
mod page_scan;
pub mod purge;
mod rest;
pub mod secrets;
mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etl_shared::config::{ConfigError, DatabaseSettings, Env};
use etl_shared::metrics::PipelineMetrics;
use etl_shared::runs::{RunCounts, RunSummary, Runs, Service};
use etl_shared::sources::{Deletes, SourceKind, Sources, SourcesError};
use etl_shared::Pool;
use reqwest::header::HeaderMap;
use tokio_util::sync::CancellationToken;

pub use daemon::Application;
pub use error::{IngestError, SafeUrl, SourceError};

use crate::http::{Fetcher, HeaderError};
use crate::lease::Claim;

/// Everything the ingester reads from its environment, validated at start-up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub sources: Sources,
    /// Per source, its request headers with the secrets already read from the environment.
    pub headers: HashMap<String, HeaderMap>,
    /// Where `/health/*`, `/metrics` and `POST /sources/{name}/run` are served.
    pub admin_addr: SocketAddr,
    /// Days of run and reject history kept (`ETL_RETENTION_DAYS`, default 30).
    pub retention_days: u32,
    /// What `POST /sources/{name}/run` needs (`ADMIN_TOKEN_FILE`).
    pub admin_token: etl_shared::admin::AdminToken,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sources(#[from] SourcesError),
    #[error(transparent)]
    Header(#[from] HeaderError),
}

impl Settings {
    pub const ADMIN_ADDR_VAR: &'static str = "INGESTER_ADMIN_ADDR";
    pub const RETENTION_DAYS_VAR: &'static str = "ETL_RETENTION_DAYS";

    /// Reads `DATABASE_*`, `SOURCES_FILE` (required), `INGESTER_ADMIN_ADDR` (default
    /// `0.0.0.0:8081`), `ETL_RETENTION_DAYS` (default 30), `ADMIN_TOKEN_FILE` (unset: no
    /// actions), and the environment variables the sources' headers name.
    pub fn from_env(env: &Env) -> Result<Self, SettingsError> {
        let database = DatabaseSettings::from_env(env)?;
        let path: PathBuf = env
            .required(Sources::FILE_VAR, "path of the sources file (TOML)")?
            .into();
        let sources = Sources::load(&path)?;
        let mut headers = HashMap::new();
        for source in &sources.sources {
            let resolved = http::resolve_headers(source, |var| env.get(var).ok().flatten())?;
            headers.insert(source.name.clone(), resolved);
        }
        let admin_addr = env
            .parse(Self::ADMIN_ADDR_VAR)?
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8081)));
        let retention_days = env.parse(Self::RETENTION_DAYS_VAR)?.unwrap_or(30);
        if retention_days == 0 {
            return Err(ConfigError::Invalid {
                var: Self::RETENTION_DAYS_VAR.into(),
                reason: "must be at least 1 day".into(),
            }
            .into());
        }
        Ok(Self {
            database,
            sources,
            headers,
            admin_addr,
            retention_days,
            admin_token: etl_shared::admin::AdminToken::from_env(env)?,
        })
    }
}

/// Runs sources. Cheap to clone; every clone shares the pool, metrics and shutdown signal.
#[derive(Clone)]
pub struct Ingester {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    runs: Runs,
    /// Batch bytes in flight, across all sources.
    in_flight: land::InFlight,
    sources: Sources,
    headers: HashMap<String, HeaderMap>,
    metrics: PipelineMetrics,
    shutdown: CancellationToken,
}

impl Ingester {
    pub fn new(settings: &Settings, pool: Pool, shutdown: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                runs: Runs::new(pool.clone(), &settings.database, Service::Ingester),
                in_flight: land::InFlight::new(),
                pool,
                sources: settings.sources.clone(),
                headers: settings.headers.clone(),
                metrics: PipelineMetrics::new("etl_ingest", "ingest"),
                shutdown,
            }),
        }
    }

    pub fn runs(&self) -> &Runs {
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

    /// Fetches and lands one source now, recorded as one row of `etl_runs`, once no other run
    /// holds it (waiting up to [`ONE_SHOT_WAIT`]). `Err` only when the run could not even be
    /// recorded (unknown source, database down, still held after the wait); a source that
    /// fails gives `Ok` with `error` set, and its run row says why.
    pub async fn run_source(&self, name: &str) -> Result<RunSummary, IngestError> {
        match self
            .run(
                name,
                Start::Now {
                    wait: ONE_SHOT_WAIT,
                },
            )
            .await?
        {
            Ok(summary) => Ok(summary),
            Err(Claim::Busy { holder }) => Err(IngestError::Busy {
                holder,
                waited: ONE_SHOT_WAIT,
            }),
            Err(claim) => unreachable!("a run now is never {claim:?}"),
        }
    }

    /// The daemon's run of `name` on its schedule of `every`: skipped (and said why) when
    /// another run holds the source or its last successful run, on any replica, started less
    /// than about `every` ago, so N replicas fetch each source once per tick, not N times.
    pub async fn run_scheduled(
        &self,
        name: &str,
        every: Duration,
    ) -> Result<Result<RunSummary, Claim>, IngestError> {
        // A little early counts as due: replicas' timers drift, and a tick that just misses
        // would otherwise wait a whole schedule more.
        self.run(
            name,
            Start::Scheduled {
                due_after: every.mul_f64(0.9),
            },
        )
        .await
    }

    /// Traced from the claim on: a scheduled tick that finds the source held or not yet due
    /// exports no span.
    async fn run(
        &self,
        name: &str,
        start: Start,
    ) -> Result<Result<RunSummary, Claim>, IngestError> {
        let inner = &self.inner;
        let source = inner
            .sources
            .get(name)
            .ok_or_else(|| IngestError::UnknownSource(name.into()))?;
        inner.runs.reap().await?;
        let run = inner.runs.reserve(name).await?;
        let claim = match start {
            Start::Now { wait } => lease::claim_within(&inner.pool, name, run.id, wait).await,
            Start::Scheduled { due_after } => {
                lease::try_claim(&inner.pool, name, run.id, Some(due_after)).await
            }
        };
        match claim.map_err(IngestError::Claim)? {
            Claim::Held => {}
            lost => {
                run.discard().await?;
                return Ok(Err(lost));
            }
        }
        let span = tracing::info_span!("run_source", name, ?start, run_id = run.id);
        tracing::Instrument::instrument(self.run_claimed(source, run), span).await
    }

    /// A run of `source` that holds its claim: from recording it to releasing the claim.
    async fn run_claimed(
        &self,
        source: &etl_shared::sources::Source,
        mut run: etl_shared::runs::Run,
    ) -> Result<Result<RunSummary, Claim>, IngestError> {
        let inner = &self.inner;
        let name = source.name.as_str();
        if let Err(e) = run.record().await {
            let _ = lease::release(&inner.pool, name, run.id, lease::Outcome::Failed, None).await;
            return Err(e.into());
        }
        let run_id = run.id;
        let server_started = server_start_time(&inner.pool).await;
        let previous = match state::load(&inner.pool, name).await {
            Ok(previous) => previous,
            Err(e) => {
                let _ =
                    lease::release(&inner.pool, name, run_id, lease::Outcome::Failed, None).await;
                let error = etl_shared::error_chain(&IngestError::Claim(e));
                return Ok(Ok(run
                    .end(&inner.metrics, RunCounts::default(), Some(error))
                    .await?));
            }
        };
        let incremental = source
            .rest_options()
            .incremental
            .filter(|_| source.kind == SourceKind::Rest);
        // The largest incremental value this run saw.
        let mut max_seen: Option<String> = None;
        let headers = inner.headers.get(name).cloned().unwrap_or_default();
        let secrets = secrets::Secrets::of(source, &headers);
        let (counts, outcome, validators) = {
            let (mut lander, writer) = land::pipeline(
                &inner.pool,
                &source.name,
                source.kind,
                run_id,
                source.deletes == Deletes::Snapshot,
                &inner.metrics,
                &inner.in_flight,
            );
            let fetcher = Fetcher::new(source, headers, secrets.clone(), inner.shutdown.clone())
                .map(|fetcher| match conditional_url(source, previous.as_ref()) {
                    Some((url, validators)) => fetcher.conditional(url, validators),
                    None => fetcher,
                });
            let since = previous
                .as_ref()
                .and_then(|p| p.incremental.as_deref())
                .zip(incremental.as_ref())
                .map(|(seen, incremental)| rest::incremental_from(seen, incremental.lag));
            let max_seen = &mut max_seen;
            let fetcher_ref = fetcher.as_ref();
            let read = async move {
                let fetched = match fetcher_ref {
                    Ok(fetcher) => match source.kind {
                        SourceKind::Rest => {
                            rest::ingest(source, fetcher, &mut lander, since.as_deref(), max_seen)
                                .await
                        }
                        SourceKind::Csv => csv::ingest(source, fetcher, &mut lander).await,
                    },
                    Err(e) => Err(IngestError::Client(e.to_string())),
                };
                // A failed read drops what it queued since the last batch (the next run reads
                // the source again); a whole read hands over its last batch. Either way the
                // lander is dropped here, which tells the writer there is no more.
                match fetched {
                    Ok(()) => lander.flush().await.map_err(IngestError::from),
                    Err(e) => Err(e),
                }
            };
            let (read, (counts, written)) = tokio::join!(read, writer.run());
            // The writer's own failure explains a reader that stopped because of it.
            let outcome = match (read, written) {
                (_, Err(e)) => Err(IngestError::from(e)),
                (read, Ok(())) => read,
            };
            let validators = fetcher.ok().and_then(|f| f.validators());
            (counts, outcome, validators)
        };
        // A 304: the source has not changed since the last successful run; nothing was read.
        let unchanged = matches!(
            &outcome,
            Err(IngestError::Fetch(gave_up)) if matches!(gave_up.last, http::FetchError::NotModified)
        );
        let outcome = if unchanged { Ok(()) } else { outcome };
        // A run holds a connection only while it writes, so it can ride out a database restart
        // between two batches. But a server that crashed may have lost commits it had already
        // acknowledged (with synchronous_commit off, say): such a run fails, so that its retry
        // lands everything again.
        let outcome = match outcome {
            Ok(()) if server_start_time(&inner.pool).await != server_started => {
                Err(IngestError::DatabaseRestarted)
            }
            outcome => outcome,
        };
        // Only a snapshot read whole and landed, with no restart in between, deletes.
        let mut counts = counts;
        let outcome = match outcome {
            Ok(()) if source.deletes == Deletes::Snapshot && !unchanged => {
                match tombstone_unseen(&inner.pool, source, run_id).await {
                    Ok(deleted) => {
                        counts.deleted = deleted as i64;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            outcome => outcome,
        };
        if source.deletes == Deletes::Snapshot && outcome.is_err() {
            if let Ok(client) = inner.pool.get().await {
                let _ = etl_shared::raw::forget_seen(&**client, run_id).await;
            }
        }
        let ended = match &outcome {
            Err(_) => lease::Outcome::Failed,
            Ok(()) if unchanged || incremental.is_some() => lease::Outcome::Partial,
            Ok(()) => lease::Outcome::Complete,
        };
        // What the next run starts from: this run's validators (a 304 keeps the old ones) and
        // the largest incremental value seen (none seen keeps the old one).
        let learnt = (!unchanged).then(|| state::SourceState {
            url: source.url.clone(),
            validators: validators.unwrap_or_default(),
            incremental: max_seen.or_else(|| previous.and_then(|p| p.incremental)),
        });
        if unchanged {
            tracing::info!(
                source = name,
                "not modified since the last successful run (HTTP 304)"
            );
        }
        // A run that landed everything but cannot let go of its source (the database went
        // away) is failed, so the next run repeats it and supersedes its rejects.
        let released = lease::release(&inner.pool, name, run_id, ended, learnt.as_ref()).await;
        let outcome = match (outcome, released) {
            (Ok(()), Err(e)) => Err(IngestError::Claim(e)),
            (outcome, _) => outcome,
        };
        // Stored, logged and served: scrubbed of the source's secrets whatever the error.
        let error = outcome
            .err()
            .map(|e| secrets.scrub(&etl_shared::error_chain(&e)));
        Ok(Ok(run.end(&inner.metrics, counts, error).await?))
    }
}

/// How long a run started now (`etl-ingester ingest`, a test) waits for another run of the
/// same source to end.
pub const ONE_SHOT_WAIT: Duration = Duration::from_secs(3600);

/// How a run starts: now (waiting for the source if another run holds it), or on a schedule
/// (skipped if the source is held or not due).
#[derive(Debug, Clone, Copy)]
enum Start {
    Now { wait: Duration },
    Scheduled { due_after: Duration },
}

/// The URL a run GETs conditionally (and keeps the validators of), with those the last
/// successful run got for it (none on a first run):
/// a CSV file, or a REST source of one request (a 304 on the first of several pages says
/// nothing of the others; an incremental source asks for changes instead).
fn conditional_url(
    source: &etl_shared::sources::Source,
    previous: Option<&state::SourceState>,
) -> Option<(url::Url, http::Validators)> {
    let single = match source.kind {
        SourceKind::Csv => true,
        SourceKind::Rest => {
            let rest = source.rest_options();
            rest.pagination == etl_shared::sources::Pagination::None && rest.incremental.is_none()
        }
    };
    if !single {
        return None;
    }
    let validators = previous
        .filter(|p| p.url == source.url)
        .map(|p| p.validators.clone())
        .unwrap_or_default();
    Some((url::Url::parse(&source.url).ok()?, validators))
}

/// Tombstones the raw rows of `source` that snapshot run `run_id` did not see.
async fn tombstone_unseen(
    pool: &Pool,
    source: &etl_shared::sources::Source,
    run_id: i64,
) -> Result<u64, IngestError> {
    let table = etl_shared::raw::RawTable::of(source.kind);
    let mut client = pool.get().await.map_err(land::LandError::from)?;
    etl_shared::raw::tombstone_unseen(&mut client, table, &source.name, run_id)
        .await
        .map_err(|source| {
            land::LandError::Db {
                table: table.name(),
                source,
            }
            .into()
        })
}

/// When the database server last started (a change within a run means it restarted); `None`
/// when it does not answer.
async fn server_start_time(pool: &Pool) -> Option<String> {
    let client = pool.get().await.ok()?;
    let row = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .ok()?;
    Some(row.get(0))
}
