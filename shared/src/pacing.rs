//! Writers yield to readers. On a machine where the pipeline and the query API share cores (and
//! the same Postgres), a bulk load at full speed takes the CPU and I/O that API requests need,
//! and their latency goes from milliseconds to seconds. So between batches, the normalizer and
//! the ingester look at how many of the query service's backends are running a statement right
//! now (`pg_stat_activity`, shared memory: no table is read) and, while two or more are, pause
//! for as long as the batch took: the write load at most halves while the API is in use, and
//! runs at full speed when it is idle, so freshness at rest is unchanged.
//!
//! The query service is recognised by its `application_name` (`etl-query`, set by
//! [`crate::db::connection_config`] from the binary's name); an operator who sets another one
//! turns the pacing off.

use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::metrics::PipelineMetrics;

/// The query service's `application_name`.
pub const READER_APPLICATION: &str = "etl-query";

/// The longest pause after one batch, whatever it took.
pub const MAX_PAUSE: Duration = Duration::from_millis(500);

/// How many of the query service's backends are running a statement in this database.
pub async fn busy_readers(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1 AND state = 'active'",
            &[&READER_APPLICATION],
        )
        .await?;
    Ok(row.get(0))
}

/// Readers running at once from which the API counts as under load. One request at a time is
/// a client polling, which the writers need not make room for (a poller at 20 requests per
/// second had them pause a quarter of their batches, and a 1M-row load took 30% longer); two
/// or more already compete with each other for the database.
pub const BUSY_READERS: i64 = 2;

/// How long to pause after a batch that took `batch`, with `busy` readers at work.
pub fn pause_after(batch: Duration, busy: i64) -> Duration {
    if busy >= BUSY_READERS {
        batch.min(MAX_PAUSE)
    } else {
        Duration::ZERO
    }
}

/// Pauses after a batch that took `batch` while the query service is busy, and counts the
/// pause in `metrics`; an error reading the activity costs no pause (the next statement will
/// meet the same database anyway).
pub async fn yield_to_readers(
    client: &impl GenericClient,
    batch: Duration,
    metrics: &PipelineMetrics,
) {
    let busy = match busy_readers(client).await {
        Ok(busy) => busy,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the query service's activity; not pausing");
            0
        }
    };
    let pause = pause_after(batch, busy);
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
        metrics.record_yield(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_pause_as_long_as_their_batch_only_while_readers_are_busy() {
        let batch = Duration::from_millis(120);
        assert_eq!(pause_after(batch, 0), Duration::ZERO);
        assert_eq!(pause_after(batch, 1), Duration::ZERO);
        assert_eq!(pause_after(batch, 2), batch);
        assert_eq!(pause_after(batch, 3), batch);
        assert_eq!(pause_after(Duration::from_secs(5), 2), MAX_PAUSE);
    }
}
