//! `GET /stats`: per-source counts, value ranges, checkpoints and latest runs. Exact aggregates
//! over millions of rows take a noticeable fraction of a second, so one consistent snapshot
//! (one repeatable-read transaction) is computed at most once per `max_age` and shared by every
//! request. When it is older, the next request starts a refresh in the background and is
//! answered with the previous snapshot (its `generated_at` says how old), so no request waits
//! for the aggregates except the very first. And however `max_age` is set, a refresh comes at
//! most once per ten times the last one took, so the aggregates take at most a tenth of a core
//! from the requests however large the tables grow.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use poem_openapi::types::{Example, ParseFromParameter, ToJSON};
use poem_openapi::{Enum, Object};
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tokio_postgres::Row;

use crate::data::QueryError;
use crate::reader::{Reader, Snapshot, Statement};

/// Statistics of the whole pipeline.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct Stats {
    /// When these figures were computed.
    pub generated_at: OffsetDateTime,
    /// They are recomputed when older than this: `QUERY_STATS_MAX_AGE_SECS`, or ten times
    /// what computing them took if that is longer.
    pub max_age_seconds: u32,
    /// Normalized records over all sources.
    pub total_records: i64,
    pub sources: Vec<SourceStats>,
}

/// Statistics of one source. `checkpoint` is absent until the normalizer has looked at the
/// source; `last_ingest` and `last_normalize` are the latest run of each service; `replay` is
/// there while the source is re-normalized from its raw rows (its mapping changed, a replay
/// was asked for, or a large backlog takes the bulk path): until it completes, the previous
/// version is served whole, searches included (empty for a source's first load).
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct SourceStats {
    pub source: String,
    /// Normalized records.
    pub records: i64,
    /// Raw records landed by the ingester.
    pub raw_records: i64,
    /// Records the ingester could not land.
    pub rejected_at_ingest: i64,
    /// Raw records the normalizer rejected (their current version).
    pub rejected_at_normalize: i64,
    #[oai(skip_serializing_if_is_none)]
    pub value_min: Option<f64>,
    #[oai(skip_serializing_if_is_none)]
    pub value_max: Option<f64>,
    #[oai(skip_serializing_if_is_none)]
    pub value_avg: Option<f64>,
    // No doc comments on the fields below: poem-openapi would wrap each `$ref` in an `allOf`
    // to carry one, which some generators turn into duplicate or untyped models.
    #[oai(skip_serializing_if_is_none)]
    pub checkpoint: Option<Checkpoint>,
    #[oai(skip_serializing_if_is_none)]
    pub last_ingest: Option<RunInfo>,
    #[oai(skip_serializing_if_is_none)]
    pub last_normalize: Option<RunInfo>,
    #[oai(skip_serializing_if_is_none)]
    pub replay: Option<ReplayInfo>,
    #[oai(skip_serializing_if_is_none)]
    pub config: Option<SourceConfig>,
    /// When the latest successful ingest run ended: how fresh the source's data is, even
    /// while its latest runs fail. Absent until one succeeds.
    #[oai(skip_serializing_if_is_none)]
    pub last_successful_ingest_at: Option<OffsetDateTime>,
}

/// The source as an ingester's sources file declares it (published when the ingester starts;
/// absent before any has).
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Seconds between scheduled runs.
    pub schedule_seconds: i64,
    /// Where it is read from, without credentials and with query values masked.
    pub url: String,
    pub mapping: SourceMapping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum SourceKind {
    Rest,
    Csv,
}

/// Where each normalized field comes from: JSON pointers (REST) or column names (CSV).
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct SourceMapping {
    /// The columns or pointers whose values make the record's id (several: a composite key);
    /// empty when the id is the record's position (`by_position`).
    pub source_id: Vec<String>,
    /// The id is the record's position in its source.
    pub by_position: bool,
    pub name: String,
    pub value: String,
    #[oai(skip_serializing_if_is_none)]
    pub description: Option<String>,
}

impl Example for SourceConfig {
    fn example() -> Self {
        Self {
            kind: SourceKind::Rest,
            schedule_seconds: 300,
            url: "https://api.example.com/v1/products?api_key=***".into(),
            mapping: SourceMapping::example(),
        }
    }
}

impl Example for SourceMapping {
    fn example() -> Self {
        Self {
            source_id: vec!["/sku".into()],
            by_position: false,
            name: "/title".into(),
            value: "/price/amount".into(),
            description: Some("/details/summary".into()),
        }
    }
}

impl SourceMapping {
    /// The mapping as `etl_shared::console::publish_sources` stores it.
    fn from_published(json: &str) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_str(json).ok()?;
        let text = |key: &str| value[key].as_str().map(str::to_owned);
        let (source_id, by_position) = match &value["source_id"] {
            serde_json::Value::Array(parts) => (
                parts
                    .iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect(),
                false,
            ),
            _ => (Vec::new(), true),
        };
        Some(Self {
            source_id,
            by_position,
            name: text("name")?,
            value: text("value")?,
            description: text("description"),
        })
    }
}

/// A replay of a source in progress, or stopped because its mapping cannot apply.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct ReplayInfo {
    pub reason: ReplayReason,
    pub started_at: OffsetDateTime,
    /// Raw rows built into the new version so far.
    pub processed: i64,
    /// Raw changes still to build (an upper bound: changed rows count once per version).
    pub remaining: i64,
    /// Why the replay stopped: the mapping cannot apply to this source's rows. The previous
    /// version stays served until the mapping changes again or a replay is asked for.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
}

/// Why a source is being replayed: `mapping` (its mapping changed), `requested`
/// (`etl-normalizer replay`) or `backlog` (the bulk path: a large backlog normalized apart,
/// search indexes built once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum ReplayReason {
    Mapping,
    Requested,
    Backlog,
}

/// How far the normalizer has got with a source.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct Checkpoint {
    /// The last raw change id applied.
    pub last_processed_id: i64,
    #[oai(skip_serializing_if_is_none)]
    pub last_processed_at: Option<OffsetDateTime>,
    /// Raw changes applied since the start.
    pub total_processed: i64,
    /// Raw changes not yet applied.
    pub lag: i64,
}

/// One run of a service for a source.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct RunInfo {
    pub run_id: i64,
    pub service: Service,
    pub source: String,
    pub status: RunStatus,
    pub started_at: OffsetDateTime,
    #[oai(skip_serializing_if_is_none)]
    pub ended_at: Option<OffsetDateTime>,
    #[oai(skip_serializing_if_is_none)]
    pub duration_seconds: Option<f64>,
    pub records_processed: i64,
    pub records_inserted: i64,
    pub records_updated: i64,
    pub records_unchanged: i64,
    pub records_rejected: i64,
    /// Ingest: raw rows it withdrew because the source no longer had them (`deletes =
    /// "snapshot"`). Normalize: such withdrawals it applied.
    pub records_deleted: i64,
    /// Why it failed.
    #[oai(skip_serializing_if_is_none)]
    pub error_message: Option<String>,
}

/// The service that made a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Service {
    Ingester,
    Normalizer,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Success,
    Failed,
}

impl Example for Stats {
    fn example() -> Self {
        Stats {
            generated_at: example_time(),
            max_age_seconds: 5,
            total_records: 1_000_000,
            sources: vec![SourceStats::example()],
        }
    }
}

impl Example for SourceStats {
    fn example() -> Self {
        SourceStats {
            source: "products".into(),
            records: 1_000_000,
            raw_records: 1_000_002,
            rejected_at_ingest: 1,
            rejected_at_normalize: 2,
            value_min: Some(0.5),
            value_max: Some(999.5),
            value_avg: Some(500.0),
            checkpoint: Some(Checkpoint::example()),
            last_ingest: Some(RunInfo::example()),
            last_normalize: Some(RunInfo {
                run_id: 43,
                service: Service::Normalizer,
                ..RunInfo::example()
            }),
            replay: None,
            config: Some(SourceConfig::example()),
            last_successful_ingest_at: Some(example_time() + time::Duration::seconds(12)),
        }
    }
}

impl Example for Checkpoint {
    fn example() -> Self {
        Checkpoint {
            last_processed_id: 1_000_002,
            last_processed_at: Some(example_time()),
            total_processed: 1_000_002,
            lag: 0,
        }
    }
}

impl Example for RunInfo {
    fn example() -> Self {
        RunInfo {
            run_id: 42,
            service: Service::Ingester,
            source: "products".into(),
            status: RunStatus::Success,
            started_at: example_time(),
            ended_at: Some(example_time() + time::Duration::seconds(12)),
            duration_seconds: Some(12.0),
            records_processed: 1_000_003,
            records_inserted: 1_000_002,
            records_updated: 0,
            records_unchanged: 0,
            records_rejected: 1,
            records_deleted: 0,
            error_message: None,
        }
    }
}

impl Example for ReplayInfo {
    fn example() -> Self {
        ReplayInfo {
            reason: ReplayReason::Mapping,
            started_at: example_time(),
            processed: 250_000,
            remaining: 750_002,
            error: None,
        }
    }
}

/// The instant every example of the spec shows.
pub(crate) fn example_time() -> OffsetDateTime {
    time::macros::datetime!(2026-12-01 09:30:00 UTC)
}

/// The last computed [`Stats`], shared by requests; refreshed in the background once older
/// than their max age.
#[derive(Clone)]
pub struct StatsCache {
    max_age: Duration,
    cached: Arc<Mutex<Option<(Instant, Stats)>>>,
    refreshing: Arc<AtomicBool>,
}

/// A refresh comes at most once per this many times the last one took.
const COST_FACTOR: u32 = 10;

impl StatsCache {
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            cached: Arc::new(Mutex::new(None)),
            refreshing: Arc::new(AtomicBool::new(false)),
        }
    }

    pub async fn get(&self, reader: &Reader) -> Result<Stats, QueryError> {
        let mut cached = self.cached.lock().await;
        match cached.as_ref() {
            Some((at, stats)) if at.elapsed().as_secs_f64() < stats.max_age_seconds as f64 => {
                Ok(stats.clone())
            }
            Some((_, stale)) => {
                if !self.refreshing.swap(true, Ordering::SeqCst) {
                    let (cache, reader) = (self.clone(), reader.clone());
                    tokio::spawn(async move {
                        match cache.compute(&reader).await {
                            Ok(fresh) => *cache.cached.lock().await = Some((Instant::now(), fresh)),
                            Err(e) => tracing::warn!(error = %e, "could not refresh /stats"),
                        }
                        cache.refreshing.store(false, Ordering::SeqCst);
                    });
                }
                Ok(stale.clone())
            }
            None => {
                let stats = self.compute(reader).await?;
                *cached = Some((Instant::now(), stats.clone()));
                Ok(stats)
            }
        }
    }

    async fn compute(&self, reader: &Reader) -> Result<Stats, QueryError> {
        let started = Instant::now();
        let mut stats = compute(reader).await?;
        stats.max_age_seconds = max_age_after(self.max_age, started.elapsed());
        Ok(stats)
    }
}

/// Whole seconds: the configured age, or [`COST_FACTOR`] times `took` if longer (0 stays 0:
/// always recomputed, as tests ask).
fn max_age_after(configured: Duration, took: Duration) -> u32 {
    if configured.is_zero() {
        return 0;
    }
    configured.max(took * COST_FACTOR).as_secs_f64().ceil() as u32
}

/// The figures, with `max_age_seconds` left for the cache to fill in.
async fn compute(reader: &Reader) -> Result<Stats, QueryError> {
    // One snapshot for all of them, sent together.
    let statements = [
        BACKGROUND,
        NORMALIZED,
        RAW,
        REJECTS,
        CHECKPOINTS,
        LATEST_RUNS,
        LAST_SUCCESSFUL_INGESTS,
        REPLAYS,
        CONFIGS,
    ]
    .map(|sql| Statement::new(sql, vec![]));
    let mut answers = reader
        .read(Snapshot::Shared, &statements)
        .await?
        .into_iter()
        .skip(1);
    let mut next = || answers.next().unwrap_or_default();
    let (normalized, raw, rejects, checkpoints, latest_runs, last_successes, replays, configs) = (
        next(),
        next(),
        next(),
        next(),
        next(),
        next(),
        next(),
        next(),
    );
    let mut sources: BTreeMap<String, SourceStats> = BTreeMap::new();
    for row in normalized {
        let s = entry(&mut sources, row.get(0));
        s.records = row.get(1);
        s.value_min = row.get(2);
        s.value_max = row.get(3);
        s.value_avg = row.get(4);
    }
    let mut pending = BTreeMap::new();
    for row in raw {
        let source: String = row.get(0);
        entry(&mut sources, source.clone()).raw_records = row.get(1);
        pending.insert(source, row.get::<_, i64>(2));
    }
    for row in rejects {
        let s = entry(&mut sources, row.get(0));
        s.rejected_at_ingest = row.get(1);
        s.rejected_at_normalize = row.get(2);
    }
    for row in checkpoints {
        let source: String = row.get(0);
        let lag = pending.get(&source).copied().unwrap_or(0);
        entry(&mut sources, source).checkpoint = Some(Checkpoint {
            last_processed_id: row.get(1),
            last_processed_at: row.get(2),
            total_processed: row.get(3),
            lag,
        });
    }
    for row in latest_runs {
        let run = run_of(&row)?;
        let s = entry(&mut sources, run.source.clone());
        match run.service {
            Service::Ingester => s.last_ingest = Some(run),
            Service::Normalizer => s.last_normalize = Some(run),
        }
    }
    for row in last_successes {
        entry(&mut sources, row.get(0)).last_successful_ingest_at = row.get(1);
    }
    for row in replays {
        entry(&mut sources, row.get(0)).replay = Some(ReplayInfo {
            started_at: row.get(1),
            processed: row.get(2),
            remaining: row.get(3),
            error: row.get(4),
            reason: one_of(&row, 5)?,
        });
    }
    for row in configs {
        let mapping: String = row.get(4);
        let Some(mapping) = SourceMapping::from_published(&mapping) else {
            continue;
        };
        entry(&mut sources, row.get(0)).config = Some(SourceConfig {
            kind: one_of(&row, 1)?,
            schedule_seconds: row.get(2),
            url: row.get(3),
            mapping,
        });
    }
    let sources: Vec<SourceStats> = sources.into_values().collect();
    Ok(Stats {
        generated_at: OffsetDateTime::now_utc(),
        max_age_seconds: 0,
        total_records: sources.iter().map(|s| s.records).sum(),
        sources,
    })
}

/// A text column whose CHECK constraint lists its values, as the enum `T` does.
pub(crate) fn one_of<T: ParseFromParameter>(row: &Row, column: usize) -> Result<T, QueryError> {
    let text: &str = row.try_get(column)?;
    T::parse_from_parameter(text).map_err(|_| QueryError::UnknownValue {
        column: row.columns()[column].name().to_owned(),
        value: text.to_owned(),
    })
}

/// The value of a closed set as the API and the database spell it (`T`'s enum item).
pub(crate) fn wire_name<T: ToJSON>(value: T) -> String {
    match value.to_json() {
        Some(serde_json::Value::String(name)) => name,
        other => unreachable!("an enum is a JSON string, not {other:?}"),
    }
}

/// The stats of `name`, created empty on first sight.
fn entry(sources: &mut BTreeMap<String, SourceStats>, name: String) -> &mut SourceStats {
    sources.entry(name.clone()).or_insert_with(|| SourceStats {
        source: name,
        records: 0,
        raw_records: 0,
        rejected_at_ingest: 0,
        rejected_at_normalize: 0,
        value_min: None,
        value_max: None,
        value_avg: None,
        checkpoint: None,
        last_ingest: None,
        last_normalize: None,
        replay: None,
        config: None,
        last_successful_ingest_at: None,
    })
}

/// For the rest of the transaction: shown as `etl-query-stats` in `pg_stat_activity`, so the
/// pipeline's writers, which yield to the API's readers (`etl_shared::pacing`), do not yield to
/// this background job; and on one core, as its full scans would otherwise take every core
/// (parallel workers) from the requests for a second or two every few seconds.
const BACKGROUND: &str = "SELECT set_config('application_name', 'etl-query-stats', true),
    set_config('max_parallel_workers_per_gather', '0', true)";

const NORMALIZED: &str = "SELECT source, count(*), min(value), max(value), avg(value)
    FROM normalized_data GROUP BY source";

/// Raw rows and pending changes per source, from the one definition of "pending".
const RAW: &str = "SELECT source, raw_rows, pending_changes FROM etl_pending";

const REJECTS: &str = "SELECT source,
        count(*) FILTER (WHERE stage = 'ingest'), count(*) FILTER (WHERE stage = 'normalize')
    FROM etl_rejects GROUP BY source";

const CHECKPOINTS: &str =
    "SELECT source, last_processed_id, last_processed_at, total_processed FROM etl_checkpoint";

/// The columns [`run_of`] reads, in its order.
macro_rules! run_columns {
    () => {
        "service, source, id, status, started_at, ended_at, duration_seconds, records_processed,
         records_inserted, records_updated, records_unchanged, records_rejected, error_message,
         records_deleted"
    };
}
pub(crate) use run_columns;

/// A run from a row of [`run_columns`].
pub(crate) fn run_of(row: &Row) -> Result<RunInfo, QueryError> {
    Ok(RunInfo {
        service: one_of(row, 0)?,
        source: row.try_get(1)?,
        run_id: row.try_get(2)?,
        status: one_of(row, 3)?,
        started_at: row.try_get(4)?,
        ended_at: row.try_get(5)?,
        duration_seconds: row.try_get(6)?,
        records_processed: row.try_get(7)?,
        records_inserted: row.try_get(8)?,
        records_updated: row.try_get(9)?,
        records_unchanged: row.try_get(10)?,
        records_rejected: row.try_get(11)?,
        error_message: row.try_get(12)?,
        records_deleted: row.try_get(13)?,
    })
}

const LATEST_RUNS: &str = concat!(
    "SELECT DISTINCT ON (service, source) ",
    run_columns!(),
    " FROM etl_runs ORDER BY service, source, started_at DESC, id DESC"
);

/// When each source's latest successful ingest ended (the runs' index walks each source's
/// newest runs first).
const LAST_SUCCESSFUL_INGESTS: &str = "SELECT DISTINCT ON (source) source, ended_at
    FROM etl_runs WHERE service = 'ingester' AND status = 'success'
    ORDER BY source, started_at DESC, id DESC";

/// Each source as its ingesters declare it.
const CONFIGS: &str =
    "SELECT source, kind, schedule_seconds, url, mapping::text FROM etl_source_config";

/// Replays under way: how far each is, and how many raw changes are past its position.
const REPLAYS: &str = "SELECT p.source, p.started_at, p.processed,
        (SELECT count(*) FROM raw_api_data r WHERE r.source = p.source AND r.change_id > p.position)
        + (SELECT count(*) FROM raw_csv_data r WHERE r.source = p.source AND r.change_id > p.position),
        p.error, p.reason
    FROM etl_replays p";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_max_age_grows_with_what_a_refresh_costs() {
        let five = Duration::from_secs(5);
        assert_eq!(max_age_after(five, Duration::from_millis(200)), 5);
        assert_eq!(max_age_after(five, Duration::from_millis(1_250)), 13);
        assert_eq!(max_age_after(Duration::ZERO, Duration::from_secs(3)), 0);
    }
}
