//! Prometheus metrics shared by the pipeline services, with one naming scheme: every service
//! gets `<prefix>_rows_total{source,outcome}`, `<prefix>_runs_total{source,status}`,
//! `<prefix>_run_duration_seconds{source}` and `<prefix>_batch_duration_seconds{source}`, and can
//! register its own extras beside them.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use crate::runs::RunCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RowLabels {
    pub source: String,
    /// inserted, updated, unchanged or rejected
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub source: String,
    /// success or failed
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// Cheap to clone: every clone updates the same registry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub state: &'static str,
}

/// The database pool's use, read from the pool at scrape time: connections in use and idle,
/// the most it may open, and callers waiting for one (a sign the pool is too small).
#[derive(Clone, Default)]
pub struct PoolGauges {
    connections: Family<PoolLabels, Gauge>,
    max: Gauge,
    waiting: Gauge,
}

impl PoolGauges {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "etl_db_pool_connections",
            "Open database connections of this process, by state (in_use, idle)",
            self.connections.clone(),
        );
        registry.register(
            "etl_db_pool_max_connections",
            "Most database connections this process may open (DATABASE_POOL_MAX_SIZE)",
            self.max.clone(),
        );
        registry.register(
            "etl_db_pool_waiting",
            "Callers waiting for a database connection",
            self.waiting.clone(),
        );
    }

    pub fn update(&self, pool: &crate::Pool) {
        let status = pool.status();
        let idle = status.available as i64;
        self.connections
            .get_or_create(&PoolLabels { state: "idle" })
            .set(idle);
        self.connections
            .get_or_create(&PoolLabels { state: "in_use" })
            .set(status.size as i64 - idle);
        self.max.set(status.max_size as i64);
        self.waiting.set(status.waiting as i64);
    }
}

/// The same counts as OpenTelemetry instruments, exported over OTLP when telemetry export is on
/// (the global meter is a no-op otherwise). Same names, without Prometheus's `_total`.
#[derive(Clone)]
struct OtelPipeline {
    rows_read: opentelemetry::metrics::Counter<u64>,
    rows: opentelemetry::metrics::Counter<u64>,
    runs: opentelemetry::metrics::Counter<u64>,
    run_duration: opentelemetry::metrics::Histogram<f64>,
    batch_duration: opentelemetry::metrics::Histogram<f64>,
}

impl OtelPipeline {
    fn new(prefix: &str, what: &str) -> Self {
        let meter = opentelemetry::global::meter("etl");
        let seconds = |name: String, description: String| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .build()
        };
        Self {
            rows_read: meter
                .u64_counter(format!("{prefix}_rows_read"))
                .with_description(format!("Records read by {what} runs"))
                .build(),
            rows: meter
                .u64_counter(format!("{prefix}_rows"))
                .with_description(format!("Records processed by {what} runs, by outcome"))
                .build(),
            runs: meter
                .u64_counter(format!("{prefix}_runs"))
                .with_description(format!("{what} runs finished, by status"))
                .build(),
            run_duration: seconds(
                format!("{prefix}_run_duration"),
                format!("Duration of {what} runs"),
            ),
            batch_duration: seconds(
                format!("{prefix}_batch_duration"),
                format!("Duration of one {what} batch transaction"),
            ),
        }
    }
}

#[derive(Clone)]
pub struct PipelineMetrics {
    registry: Arc<Mutex<Registry>>,
    otel: OtelPipeline,
    rows_read: Family<SourceLabels, Counter>,
    rows: Family<RowLabels, Counter>,
    pool: PoolGauges,
    runs: Family<RunLabels, Counter>,
    run_duration: Family<SourceLabels, Histogram>,
    batch_duration: Family<SourceLabels, Histogram>,
    yielded: Counter<f64, std::sync::atomic::AtomicU64>,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to about 9 hours.
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

impl PipelineMetrics {
    /// `prefix` is e.g. `etl_ingest` or `etl_normalize`; `what` words the help texts.
    pub fn new(prefix: &str, what: &str) -> Self {
        let rows_read = Family::<SourceLabels, Counter>::default();
        let rows = Family::<RowLabels, Counter>::default();
        let runs = Family::<RunLabels, Counter>::default();
        let run_duration = Family::<SourceLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let batch_duration = Family::<SourceLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let mut registry = Registry::default();
        registry.register(
            format!("{prefix}_rows_read"),
            format!("Records read by {what} runs (each then counts once in {prefix}_rows_total)"),
            rows_read.clone(),
        );
        registry.register(
            format!("{prefix}_rows"),
            format!("Records processed by {what} runs, by outcome"),
            rows.clone(),
        );
        registry.register(
            format!("{prefix}_runs"),
            format!("{what} runs finished, by status"),
            runs.clone(),
        );
        registry.register(
            format!("{prefix}_run_duration_seconds"),
            format!("Duration of {what} runs"),
            run_duration.clone(),
        );
        registry.register(
            format!("{prefix}_batch_duration_seconds"),
            format!("Duration of one {what} batch transaction"),
            batch_duration.clone(),
        );
        let yielded = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            format!("{prefix}_yield_seconds"),
            format!(
                "Time {what} batches paused because the query service was busy (writers yield to readers)"
            ),
            yielded.clone(),
        );
        let pool = PoolGauges::default();
        pool.register(&mut registry);
        Self {
            registry: Arc::new(Mutex::new(registry)),
            otel: OtelPipeline::new(prefix, what),
            rows_read,
            rows,
            pool,
            runs,
            run_duration,
            batch_duration,
            yielded,
        }
    }

    /// Counts a pause of [`crate::pacing::yield_to_readers`].
    pub fn record_yield(&self, paused: std::time::Duration) {
        self.yielded.inc_by(paused.as_secs_f64());
    }

    /// Adds a service-specific metric to the same exposition.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .lock()
            .expect("metrics registry lock")
            .register(name, help, metric);
    }

    /// Reads the pool's use into its gauges; call before [`encode`](Self::encode).
    pub fn update_pool(&self, pool: &crate::Pool) {
        self.pool.update(pool);
    }

    pub fn record_batch(&self, source: &str, counts: &RunCounts, seconds: f64) {
        let attributes = [opentelemetry::KeyValue::new("source", source.to_owned())];
        self.otel
            .rows_read
            .add(counts.processed.max(0) as u64, &attributes);
        self.otel.batch_duration.record(seconds, &attributes);
        self.rows_read
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .inc_by(counts.processed.max(0) as u64);
        for (outcome, n) in [
            ("inserted", counts.inserted),
            ("updated", counts.updated),
            ("unchanged", counts.unchanged),
            ("rejected", counts.rejected),
        ] {
            self.rows
                .get_or_create(&RowLabels {
                    source: source.into(),
                    outcome,
                })
                .inc_by(n.max(0) as u64);
            self.otel.rows.add(
                n.max(0) as u64,
                &[
                    opentelemetry::KeyValue::new("source", source.to_owned()),
                    opentelemetry::KeyValue::new("outcome", outcome),
                ],
            );
        }
        self.batch_duration
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .observe(seconds);
    }

    pub fn record_run(&self, source: &str, success: bool, seconds: f64) {
        let status = if success { "success" } else { "failed" };
        self.otel.runs.add(
            1,
            &[
                opentelemetry::KeyValue::new("source", source.to_owned()),
                opentelemetry::KeyValue::new("status", status),
            ],
        );
        self.otel.run_duration.record(
            seconds,
            &[opentelemetry::KeyValue::new("source", source.to_owned())],
        );
        self.runs
            .get_or_create(&RunLabels {
                source: source.into(),
                status,
            })
            .inc();
        self.run_duration
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .observe(seconds);
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }

    /// The `/metrics` response.
    pub fn exposition(&self) -> poem::Response {
        exposition(&self.registry)
    }
}

/// The OpenMetrics text exposition of a registry: what every service's `/metrics` serves.
pub fn encode(registry: &Mutex<Registry>) -> String {
    let mut out = String::new();
    let registry = registry.lock().expect("metrics registry lock");
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// A `/metrics` response with [`encode`]'s text.
pub fn exposition(registry: &Mutex<Registry>) -> poem::Response {
    poem::Response::builder()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(encode(registry))
}
