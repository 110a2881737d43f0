//! Landing records in the raw tables, in batches: `COPY … FROM STDIN BINARY` into a session
//! staging table, then one set-based upsert that writes only changed records, the batch's
//! rejects, and one `NOTIFY` when anything changed, all in one transaction.
//!
//! Writes to one source are serialized by a transaction-scoped advisory lock taken just before
//! the upsert: within a source, `change_id`s then become visible in the order they were drawn,
//! so the normalizer's "last change id" checkpoint never skips a slower transaction.

use std::collections::HashSet;
use std::sync::Arc;

use etl_shared::metrics::PipelineMetrics;
use etl_shared::raw::{self, Probe, RawJson, RawTable, Written, RAW_READY_CHANNEL};
use etl_shared::runs::RunCounts;
use etl_shared::sources::SourceKind;
use etl_shared::Pool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Transaction};
use tracing::Instrument;

/// Rows per batch: large enough to amortize the round trips, small enough to bound memory and
/// lock time.
pub const BATCH_ROWS: usize = 5_000;
/// How much of a record over `http.max_record_bytes` is kept with its reject.
pub const KEPT_PREFIX_BYTES: usize = 4 * 1024;
/// Bytes per batch, so a file of very wide rows still flushes in bounded memory.
pub const BATCH_BYTES: usize = 1024 * 1024;
/// Bytes of batches handed over and not yet written, across every run of the process: a run
/// whose batch does not fit waits for others' writes to finish. A batch larger than the whole
/// budget (a record near `http.max_record_bytes`) takes all of it: it is written alone, while
/// its run reads the next record (see [`Lander::make_room`]).
pub const BYTES_IN_FLIGHT: usize = 8 * 1024 * 1024;

/// The process-wide budget of batch bytes in flight (see [`BYTES_IN_FLIGHT`]), shared by the
/// [`Lander`]s of concurrent runs.
#[derive(Clone)]
pub struct InFlight(Arc<Semaphore>);

impl InFlight {
    pub fn new() -> Self {
        Self(Arc::new(Semaphore::new(BYTES_IN_FLIGHT)))
    }

    async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let share = bytes.clamp(1, BYTES_IN_FLIGHT) as u32;
        self.0
            .clone()
            .acquire_many_owned(share)
            .await
            .expect("the budget is never closed")
    }
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new()
    }
}

/// One record ready to land.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub source_id: String,
    pub data: RawJson,
    pub position: Position,
}

impl raw::Landable for RawRecord {
    fn source_id(&self) -> &str {
        &self.source_id
    }

    fn data(&self) -> &RawJson {
        &self.data
    }
}

/// Where a record was in its source, for rejects.
#[derive(Debug, Clone, Copy, Default)]
pub struct Position {
    pub line: Option<i64>,
    pub page: Option<i64>,
    pub item: Option<i64>,
}

/// A record that cannot land, with why, and its bytes as received.
#[derive(Debug, Clone)]
pub struct Reject {
    pub position: Position,
    pub reason: String,
    pub raw: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum LandError {
    #[error("no database connection for a batch: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("writing a batch to {table} failed: {source}")]
    Db {
        table: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The writer stopped at a failure of its own, which is the run's error.
    #[error("the batch writer stopped")]
    WriterStopped,
    /// Another run took the source over (this process lost its lock connection, so the run
    /// looked dead): what it read is not landed over the newer run's.
    #[error("another run took this source over; the batch was not landed")]
    LeaseLost,
}

/// One batch on its way from the reader to the writer.
struct Batch {
    records: Vec<RawRecord>,
    rejects: Vec<Reject>,
    /// Its bytes' share of the process's [`InFlight`] budget, given back once written.
    reserved: OwnedSemaphorePermit,
}

/// The reading side of a run: accumulates records and rejects, and hands each full batch to the
/// [`BatchWriter`], so the next batch is fetched and parsed while Postgres writes this one.
pub struct Lander {
    batches: tokio::sync::mpsc::Sender<Batch>,
    in_flight: InFlight,
    batch: Vec<RawRecord>,
    batch_ids: HashSet<String>,
    batch_bytes: usize,
    rejects: Vec<Reject>,
    /// The budget taken by [`make_room`](Lander::make_room) for a large record still being
    /// made, used by the flush that sends it.
    reserved: Option<OwnedSemaphorePermit>,
}

/// The writing side of a run: lands batches in order, one transaction each, each on a pooled
/// connection taken for that batch only: while the run waits on its source it holds none.
pub struct BatchWriter<'a> {
    pool: &'a Pool,
    source: &'a str,
    table: RawTable,
    run_id: i64,
    /// The source has `deletes = "snapshot"`: the run notes the ids it lands.
    snapshot: bool,
    batches: tokio::sync::mpsc::Receiver<Batch>,
    counts: RunCounts,
    metrics: &'a PipelineMetrics,
    probe: Probe,
}

/// Whether the batch after one of `records` that [`raw::write`] reported as `written` should
/// probe fingerprints first: only while at least a tenth of the records turn out unchanged.
/// A first load or a full refresh then sends each record once, as it must, without paying for
/// a probe that spares nothing; a re-ingest sends ids and fingerprints. Either way the write
/// reports what was unchanged, so the choice follows the data batch by batch.
fn next_probe(records: usize, written: Written) -> Probe {
    let unchanged = records as i64 - written.inserted - written.updated;
    if unchanged * 10 >= records as i64 {
        Probe::Fingerprints
    } else {
        Probe::Skip
    }
}

/// A reader and a writer for one run, joined by a one-batch queue: memory stays bounded (a batch
/// being filled, and at most one queued and one being written, within the process's
/// `in_flight` budget) and a failed write stops the reader at its next batch.
pub fn pipeline<'a>(
    pool: &'a Pool,
    source: &'a str,
    kind: SourceKind,
    run_id: i64,
    snapshot: bool,
    metrics: &'a PipelineMetrics,
    in_flight: &InFlight,
) -> (Lander, BatchWriter<'a>) {
    let table = RawTable::of(kind);
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let lander = Lander {
        batches: sender,
        in_flight: in_flight.clone(),
        batch: Vec::with_capacity(BATCH_ROWS),
        batch_ids: HashSet::with_capacity(BATCH_ROWS),
        batch_bytes: 0,
        rejects: Vec::new(),
        reserved: None,
    };
    let writer = BatchWriter {
        pool,
        source,
        table,
        run_id,
        snapshot,
        batches: receiver,
        counts: RunCounts::default(),
        metrics,
        probe: Probe::Fingerprints,
    };
    (lander, writer)
}

impl Lander {
    /// Queues what a source reader made of one record: its id and JSON, or why it has none
    /// (then `raw` gives the bytes to keep with the reject). What Postgres would refuse (NUL
    /// characters, oversized ids) is checked here, so one bad record is rejected alone instead
    /// of failing its whole batch.
    pub async fn land(
        &mut self,
        position: Position,
        parsed: Result<(String, String), String>,
        raw: impl FnOnce() -> Vec<u8>,
    ) -> Result<(), LandError> {
        match parsed {
            Ok((source_id, json)) => {
                // Keep what the source sent, not our JSON rendering of it.
                self.land_record(position, source_id, json, |_| raw()).await
            }
            Err(reason) => {
                self.reject(Reject {
                    position,
                    reason,
                    raw: raw(),
                })
                .await
            }
        }
    }

    /// Like [`land`](Self::land), for a record whose JSON is exactly what the source sent (a
    /// REST item): a reject keeps that text, without a second copy of it being made up front.
    pub async fn land_verbatim(
        &mut self,
        position: Position,
        source_id: Result<String, String>,
        json: String,
    ) -> Result<(), LandError> {
        match source_id {
            Ok(source_id) => {
                self.land_record(position, source_id, json, |record| {
                    record.data.0.into_bytes()
                })
                .await
            }
            Err(reason) => {
                self.reject(Reject {
                    position,
                    reason,
                    raw: json.into_bytes(),
                })
                .await
            }
        }
    }

    async fn land_record(
        &mut self,
        position: Position,
        source_id: String,
        json: String,
        raw: impl FnOnce(RawRecord) -> Vec<u8>,
    ) -> Result<(), LandError> {
        let record = RawRecord {
            source_id,
            data: RawJson(json),
            position,
        };
        match unstorable(&record) {
            None => self.queue(record).await,
            Some(reason) => {
                self.reject(Reject {
                    position,
                    reason,
                    raw: raw(record),
                })
                .await
            }
        }
    }

    async fn queue(&mut self, record: RawRecord) -> Result<(), LandError> {
        // The same id twice in one upsert is an error; a new batch makes the later copy an
        // ordinary update, so the last occurrence in the source wins.
        if self.batch_ids.contains(&record.source_id) {
            self.flush().await?;
        }
        self.batch_bytes += record.source_id.len() + record.data.0.len();
        self.batch_ids.insert(record.source_id.clone());
        self.batch.push(record);
        if self.batch.len() >= BATCH_ROWS || self.batch_bytes >= BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn reject(&mut self, reject: Reject) -> Result<(), LandError> {
        self.batch_bytes += reject.raw.len();
        self.rejects.push(reject);
        if self.rejects.len() >= BATCH_ROWS || self.batch_bytes >= BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Called before a record of `bytes` is converted for landing. A record over
    /// [`BATCH_BYTES`] is a batch of its own: what is queued goes first, then the record's
    /// share of the budget is waited for *before* its converted copy exists, so a run of
    /// 10 MB records holds the one being written and the one being read, not also a
    /// converted one waiting for its turn.
    pub async fn make_room(&mut self, bytes: usize) -> Result<(), LandError> {
        if bytes < BATCH_BYTES || self.reserved.is_some() {
            return Ok(());
        }
        self.flush().await?;
        self.reserved = Some(self.in_flight.reserve(bytes).await);
        Ok(())
    }

    /// Hands everything queued so far to the writer (waiting for room in the process's budget,
    /// and while the writer is still busy with the batch before the previous one).
    pub async fn flush(&mut self) -> Result<(), LandError> {
        if self.batch.is_empty() && self.rejects.is_empty() {
            return Ok(());
        }
        let reserved = match self.reserved.take() {
            Some(reserved) => reserved,
            None => self.in_flight.reserve(self.batch_bytes).await,
        };
        let batch = Batch {
            records: std::mem::take(&mut self.batch),
            rejects: std::mem::take(&mut self.rejects),
            reserved,
        };
        self.batch_ids.clear();
        self.batch_bytes = 0;
        self.batches
            .send(batch)
            .await
            .map_err(|_| LandError::WriterStopped)
    }
}

impl BatchWriter<'_> {
    /// Lands every batch the reader sends until it is done (drops its [`Lander`]); stops at
    /// the first failure. Returns the counts of what was committed, also when it failed.
    pub async fn run(mut self) -> (RunCounts, Result<(), LandError>) {
        while let Some(batch) = self.batches.recv().await {
            if let Err(e) = self.land_batch(batch).await {
                return (self.counts, Err(e));
            }
        }
        (self.counts, Ok(()))
    }

    /// Lands one batch in one transaction. If Postgres refuses it for its data (a record it
    /// cannot store, say a number beyond `numeric`'s range), the records are landed one by one
    /// instead, and the ones it refuses become rejects with its message.
    async fn land_batch(&mut self, batch: Batch) -> Result<(), LandError> {
        let Batch {
            records,
            rejects,
            reserved,
        } = batch;
        let bytes: usize = records
            .iter()
            .map(|r| r.source_id.len() + r.data.0.len())
            .sum();
        let span = tracing::info_span!(
            "ingest_batch",
            source = self.source,
            rows = records.len(),
            rejects = rejects.len(),
            bytes,
        );
        let landed = self.land_batch_in(records, rejects).instrument(span).await;
        // Given back once the batch is written and its records freed.
        drop(reserved);
        landed
    }

    async fn land_batch_in(
        &mut self,
        records: Vec<RawRecord>,
        mut rejects: Vec<Reject>,
    ) -> Result<(), LandError> {
        let started = std::time::Instant::now();
        let table = self.table.name();
        let db = |e: WriteError| match e {
            WriteError::Db(source) => LandError::Db { table, source },
            WriteError::LeaseLost => LandError::LeaseLost,
        };
        let mut client = self.pool.get().await?;
        match self
            .write(&mut client, &records, &rejects, self.probe)
            .await
        {
            Ok((inserted, updated)) => {
                self.probe = next_probe(records.len(), Written { inserted, updated });
                self.account(records.len(), rejects.len(), inserted, updated, started);
                etl_shared::pacing::yield_to_readers(&**client, started.elapsed(), self.metrics)
                    .await;
                Ok(())
            }
            Err(WriteError::Db(e)) if is_record_error(&e) && !records.is_empty() => {
                tracing::warn!(source = self.source, error = %e, "batch refused; landing its records one by one");
                for record in records {
                    let one = std::time::Instant::now();
                    match self
                        .write(&mut client, std::slice::from_ref(&record), &[], Probe::Skip)
                        .await
                    {
                        Ok((inserted, updated)) => self.account(1, 0, inserted, updated, one),
                        Err(WriteError::Db(e)) if is_record_error(&e) => rejects.push(Reject {
                            position: record.position,
                            reason: format!("Postgres refused the record: {}", db_message(&e)),
                            raw: record.data.0.into_bytes(),
                        }),
                        Err(e) => return Err(db(e)),
                    }
                }
                self.write(&mut client, &[], &rejects, Probe::Skip)
                    .await
                    .map_err(db)?;
                self.account(0, rejects.len(), 0, 0, started);
                Ok(())
            }
            Err(e) => Err(db(e)),
        }
    }

    /// One transaction: the records (written by the raw-write protocol), the rejects, and a
    /// NOTIFY if anything changed. Returns (inserted, updated).
    async fn write(
        &self,
        client: &mut Client,
        records: &[RawRecord],
        rejects: &[Reject],
        probe: Probe,
    ) -> Result<(i64, i64), WriteError> {
        let tx = client.transaction().await?;
        if !crate::lease::still_held(&tx, self.source, self.run_id).await? {
            return Err(WriteError::LeaseLost);
        }
        let written = if records.is_empty() {
            Written::default()
        } else {
            // Stored with the rows, so the normalizer batch that reads them links to this one.
            let trace_context = etl_shared::telemetry::current_traceparent();
            let written = raw::write(
                &tx,
                self.table,
                self.source,
                records,
                trace_context.as_deref(),
                probe,
            )
            .await?;
            if self.snapshot {
                raw::mark_seen(&tx, self.run_id).await?;
            }
            written
        };
        insert_rejects(&tx, self.run_id, self.source, rejects).await?;
        if written.changed() {
            raw::notify(&tx, self.source)
                .instrument(tracing::info_span!("notify", channel = RAW_READY_CHANNEL))
                .await?;
        }
        tx.commit().await?;
        Ok((written.inserted, written.updated))
    }

    fn account(
        &mut self,
        landed: usize,
        rejected: usize,
        inserted: i64,
        updated: i64,
        started: std::time::Instant,
    ) {
        let (landed, rejected) = (landed as i64, rejected as i64);
        let batch = RunCounts {
            processed: landed + rejected,
            inserted,
            updated,
            unchanged: landed - inserted - updated,
            rejected,
            deleted: 0,
        };
        self.counts.add(batch);
        self.metrics
            .record_batch(self.source, &batch, started.elapsed().as_secs_f64());
    }
}

/// The record, not the database, is at fault: a data exception (SQLSTATE class 22), or a value
/// past one of Postgres's limits (54000, e.g. a jsonb too large) or too deep to parse (54001,
/// stack depth). Such a record is rejected alone; the rest of its batch lands.
/// Why one batch transaction did not commit.
enum WriteError {
    Db(tokio_postgres::Error),
    LeaseLost,
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

fn is_record_error(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let code = c.code();
        code.starts_with("22") || code == "54000" || code == "54001"
    })
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

async fn insert_rejects(
    tx: &Transaction<'_>,
    run_id: i64,
    source: &str,
    rejects: &[Reject],
) -> Result<(), tokio_postgres::Error> {
    if rejects.is_empty() {
        return Ok(());
    }
    let lines: Vec<Option<i64>> = rejects.iter().map(|r| r.position.line).collect();
    let pages: Vec<Option<i64>> = rejects.iter().map(|r| r.position.page).collect();
    let items: Vec<Option<i64>> = rejects.iter().map(|r| r.position.item).collect();
    let reasons: Vec<&str> = rejects.iter().map(|r| r.reason.as_str()).collect();
    let raws: Vec<&[u8]> = rejects.iter().map(|r| r.raw.as_slice()).collect();
    tx.execute(
        "INSERT INTO etl_rejects (run_id, stage, source, line, page, item, reason, raw)
         SELECT $1, 'ingest', $2, * FROM unnest($3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::bytea[])",
        &[&run_id, &source, &lines, &pages, &items, &reasons, &raws],
    )
    .await?;
    Ok(())
}

/// Longest `source_id` accepted: it is part of a btree key, which Postgres caps near 2.7 kB.
pub const MAX_SOURCE_ID_BYTES: usize = 512;

fn unstorable(record: &RawRecord) -> Option<String> {
    if record.source_id.is_empty() {
        return Some("source_id is empty".into());
    }
    if record.source_id.len() > MAX_SOURCE_ID_BYTES {
        return Some(format!(
            "source_id is {} bytes long; at most {MAX_SOURCE_ID_BYTES} are accepted",
            record.source_id.len()
        ));
    }
    if record.source_id.contains('\0') || has_nul_escape(&record.data.0) {
        return Some("contains a NUL character (\\u0000), which Postgres cannot store".into());
    }
    None
}

/// Whether JSON text holds the escape `\u0000` (and not merely an escaped backslash followed by
/// the letters `u0000`).
fn has_nul_escape(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes[i + 1..].starts_with(b"u0000") {
                return true;
            }
            i += 2; // skip the escaped character, whatever it is
        } else {
            i += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::{has_nul_escape, next_probe, Probe, Written};

    #[test]
    fn batches_probe_while_a_tenth_or_more_of_the_records_are_unchanged() {
        let written = |inserted, updated| Written { inserted, updated };
        assert_eq!(next_probe(5_000, written(0, 0)), Probe::Fingerprints);
        assert_eq!(next_probe(5_000, written(4_500, 0)), Probe::Fingerprints);
        assert_eq!(next_probe(5_000, written(4_000, 501)), Probe::Skip);
        assert_eq!(next_probe(5_000, written(5_000, 0)), Probe::Skip);
        assert_eq!(next_probe(5_000, written(0, 5_000)), Probe::Skip);
    }

    #[test]
    fn nul_escapes_are_told_apart_from_escaped_backslashes() {
        assert!(has_nul_escape(r#"{"a":"x\u0000y"}"#));
        assert!(!has_nul_escape(r#"{"a":"x\\u0000y"}"#));
        assert!(has_nul_escape(r#"{"a":"x\\\u0000y"}"#));
        assert!(!has_nul_escape(r#"{"a":"\u0001"}"#));
    }
}
