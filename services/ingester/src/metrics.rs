//! Prometheus metrics of the ingester, served as text on the admin port's `/metrics`.

use std::sync::Arc;

use etl_shared::runs::RunCounts;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RowLabels {
    source: String,
    /// inserted, updated, unchanged or rejected
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    source: String,
    /// success or failed
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

/// Cheap to clone: every clone updates the same registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    rows: Family<RowLabels, Counter>,
    runs: Family<RunLabels, Counter>,
    duration: Family<SourceLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let rows = Family::<RowLabels, Counter>::default();
        let runs = Family::<RunLabels, Counter>::default();
        let duration = Family::<SourceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 16))
        });
        let mut registry = Registry::default();
        registry.register(
            "etl_ingest_rows",
            "Records processed by ingest runs, by outcome",
            rows.clone(),
        );
        registry.register(
            "etl_ingest_runs",
            "Ingest runs finished, by status",
            runs.clone(),
        );
        registry.register(
            "etl_ingest_run_duration_seconds",
            "Duration of ingest runs",
            duration.clone(),
        );
        Self {
            registry: Arc::new(registry),
            rows,
            runs,
            duration,
        }
    }

    pub fn record_run(&self, source: &str, counts: &RunCounts, success: bool, seconds: f64) {
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
        }
        self.runs
            .get_or_create(&RunLabels {
                source: source.into(),
                status: if success { "success" } else { "failed" },
            })
            .inc();
        self.duration
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
