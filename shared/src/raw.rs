//! The raw tables: which one a source lands in, every statement that names one, and the one
//! protocol for writing them.
//!
//! A source's kind picks its table (`rest` → `raw_api_data`, `csv` → `raw_csv_data`), never its
//! input, so every statement here is a compile-time constant. Readers that only look (the query
//! service, tools, tests) use the `etl_pending` view (per source: raw rows, and changes after the
//! checkpoint) instead of repeating the "changed after the checkpoint" predicate.

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::CopyInSink;
use tokio_postgres::Transaction;

use crate::sources::SourceKind;

/// The `NOTIFY` channel on which raw writers announce new raw changes; the payload is the source
/// name. Notifications are only hints: the normalizer also polls.
pub const RAW_READY_CHANNEL: &str = "etl_raw_ready";

/// Class of the per-source write lock on the raw tables (two-key advisory lock: this and
/// `hashtext(source)`), held by every raw writer from drawing change ids until commit. Within a
/// source, change ids then become visible in order, so the normalizer's "last change id"
/// checkpoint never skips a slower transaction.
pub const RAW_WRITE_LOCK_CLASS: i32 = 0x4554_4c31; // "ETL1"

/// One of the two raw tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawTable {
    Api,
    Csv,
}

/// The statements that name one raw table.
#[derive(Debug)]
pub struct RawStatements {
    /// The positions of the session's `raw_keys` whose record must be sent whole for source
    /// `$1`: new, tombstoned, or with another fingerprint.
    changed_keys: &'static str,
    /// Upserts the session's staging table into the raw table: `$1` source, `$2` trace context.
    /// A tombstoned row seen again is revived. Returns one row: (inserted, updated).
    upsert_staged: &'static str,
    /// Gives the staged fingerprints to rows of `$1` that the upsert left alone because their
    /// data was equal (rows landed before fingerprints, or JSON text that changed only in form).
    refresh_fingerprints: &'static str,
    /// Tombstones the live rows of source `$1` that snapshot run `$2` did not see, each with a
    /// new change id.
    tombstone_unseen: &'static str,
    /// The normalizer's batch: rows of `$1` after change id `$2`, at most `$3` rows and, past
    /// the first row, at most `$10` bytes of field text, with the JSON type, the text cut to
    /// `$7`, `$8`, `$9` characters, and the full text's length in characters and in bytes at
    /// paths `$4`, `$5`, `$6` (a NULL path reads as missing). Fields are cut and measured here
    /// so no record, however large, enters the normalizer's memory whole. Columns: id,
    /// source_id, change_id, then (type, cut text, characters, bytes) for each path, then
    /// trace_context, deleted (a tombstone).
    pub read_after: &'static str,
    /// Records normalize-stage rejects (`$1` run, `$2` source, then arrays of source ids, raw
    /// ids and reasons) with the raw row's data as their bytes; one current reject per record.
    pub reject_normalize: &'static str,
    /// Records as normalize-stage rejects of run `$2` the rejects a replay of source `$1` built
    /// (`etl_rejects_replay`), with the raw row's data as their bytes.
    pub reject_replayed: &'static str,
    /// Whether `$1` has a change after its checkpoint (one index probe).
    pub has_pending: &'static str,
    /// How many changes of `$1` are after its checkpoint (an index range).
    pub count_pending: &'static str,
    /// As `count_pending`, counting at most `$2` (so asking "at least $2?" costs at most that).
    pub count_pending_upto: &'static str,
}

/// The checkpoint of source `$1` (0 before its first batch).
macro_rules! checkpoint_of_1 {
    () => {
        "coalesce((SELECT last_processed_id FROM etl_checkpoint WHERE source = $1), 0)"
    };
}

/// The statements of one raw table, its name spelled once.
macro_rules! raw_statements {
    ($table:literal) => {
        RawStatements {
            // One index probe per key, whatever the planner knows: a join here may become a
            // hash join over the whole raw table when its statistics are stale (as while a
            // first load fills it), which made each batch scan every row landed before it.
            // A scalar subquery in the select list is always run per row.
            changed_keys: concat!(
                "SELECT position FROM (
                     SELECT k.position, k.fingerprint,
                            (SELECT r.fingerprint FROM ", $table, " r
                             WHERE r.source = $1 AND r.source_id = k.source_id
                               AND r.deleted_at IS NULL) AS held
                     FROM raw_keys k
                 ) probed
                 WHERE held IS DISTINCT FROM fingerprint
                 ORDER BY position"
            ),
            upsert_staged: concat!(
                "WITH upserted AS (
                    INSERT INTO ", $table, " AS r (source, source_id, data, fingerprint, trace_context)
                    SELECT $1, source_id, data, fingerprint, $2 FROM raw_staging
                    ON CONFLICT (source, source_id) DO UPDATE
                        SET data = EXCLUDED.data, fingerprint = EXCLUDED.fingerprint,
                            change_id = nextval('raw_change_id_seq'),
                            changed_at = now(), trace_context = EXCLUDED.trace_context,
                            deleted_at = NULL
                        WHERE r.data IS DISTINCT FROM EXCLUDED.data OR r.deleted_at IS NOT NULL
                    RETURNING (r.xmax = 0) AS inserted
                )
                SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
                FROM upserted"
            ),
            refresh_fingerprints: concat!(
                "UPDATE ", $table, " r SET fingerprint = s.fingerprint FROM raw_staging s
                 WHERE r.source = $1 AND r.source_id = s.source_id
                   AND r.fingerprint IS DISTINCT FROM s.fingerprint"
            ),
            tombstone_unseen: concat!(
                "UPDATE ", $table, " r
                 SET deleted_at = now(), change_id = nextval('raw_change_id_seq'), changed_at = now()
                 WHERE r.source = $1 AND r.deleted_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM etl_run_seen s
                                   WHERE s.run_id = $2 AND s.source_id = r.source_id)"
            ),
            read_after: concat!(
                "SELECT id, source_id, change_id, nk, nt, nc, nb, vk, vt, vc, vb, dk, dt, dc, db,
                        trace_context, deleted
                 FROM (
                     SELECT c.*, row_number() OVER w AS n, sum(
                                octet_length(source_id) + coalesce(octet_length(nt), 0)
                                + coalesce(octet_length(vt), 0) + coalesce(octet_length(dt), 0)
                            ) OVER w AS running
                     FROM (
                         SELECT id, source_id, change_id, trace_context,
                                deleted_at IS NOT NULL AS deleted,
                                jsonb_typeof(data #> $4) AS nk, left(f.n, $7) AS nt,
                                char_length(f.n) AS nc, octet_length(f.n) AS nb,
                                jsonb_typeof(data #> $5) AS vk, left(f.v, $8) AS vt,
                                char_length(f.v) AS vc, octet_length(f.v) AS vb,
                                jsonb_typeof(data #> $6) AS dk, left(f.d, $9) AS dt,
                                char_length(f.d) AS dc, octet_length(f.d) AS db
                         FROM ", $table, "
                         CROSS JOIN LATERAL (SELECT data #>> $4 AS n, data #>> $5 AS v,
                                                    data #>> $6 AS d) f
                         WHERE source = $1 AND change_id > $2
                         ORDER BY change_id
                         LIMIT $3
                     ) c
                     WINDOW w AS (ORDER BY change_id)
                 ) b
                 WHERE n = 1 OR running <= $10
                 ORDER BY change_id"
            ),
            reject_normalize: concat!(
                "INSERT INTO etl_rejects (run_id, stage, source, source_id, raw_id, reason, raw)
                 SELECT $1, 'normalize', $2, t.source_id, t.raw_id, t.reason,
                        convert_to(r.data::text, 'UTF8')
                 FROM unnest($3::text[], $4::bigint[], $5::text[]) AS t(source_id, raw_id, reason)
                 JOIN ", $table, " r ON r.id = t.raw_id
                 ON CONFLICT (source, source_id) WHERE stage = 'normalize' DO UPDATE
                 SET run_id = EXCLUDED.run_id, raw_id = EXCLUDED.raw_id, reason = EXCLUDED.reason,
                     raw = EXCLUDED.raw, created_at = now()"
            ),
            reject_replayed: concat!(
                "INSERT INTO etl_rejects (run_id, stage, source, source_id, raw_id, reason, raw)
                 SELECT $2, 'normalize', j.source, j.source_id, j.raw_id, j.reason,
                        convert_to(r.data::text, 'UTF8')
                 FROM etl_rejects_replay j JOIN ", $table, " r ON r.id = j.raw_id
                 WHERE j.source = $1"
            ),
            has_pending: concat!(
                "SELECT EXISTS (SELECT 1 FROM ", $table, " r
                 WHERE r.source = $1 AND r.change_id > ", checkpoint_of_1!(), ")"
            ),
            count_pending: concat!(
                "SELECT count(*) FROM ", $table, " r
                 WHERE r.source = $1 AND r.change_id > ", checkpoint_of_1!()
            ),
            count_pending_upto: concat!(
                "SELECT count(*) FROM (SELECT 1 FROM ", $table, " r
                 WHERE r.source = $1 AND r.change_id > ", checkpoint_of_1!(), " LIMIT $2) capped"
            ),
        }
    };
}

static API: RawStatements = raw_statements!("raw_api_data");
static CSV: RawStatements = raw_statements!("raw_csv_data");

impl RawTable {
    /// The table a source of `kind` lands in.
    pub fn of(kind: SourceKind) -> Self {
        match kind {
            SourceKind::Rest => RawTable::Api,
            SourceKind::Csv => RawTable::Csv,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RawTable::Api => "raw_api_data",
            RawTable::Csv => "raw_csv_data",
        }
    }

    pub fn sql(self) -> &'static RawStatements {
        match self {
            RawTable::Api => &API,
            RawTable::Csv => &CSV,
        }
    }
}

/// A JSON document that is already serialized; [`write`] sends it as `jsonb` in the binary
/// format (a version byte, then the text), so it is not parsed again on this side.
#[derive(Debug, Clone)]
pub struct RawJson(pub String);

/// A record to [`write`]: its id within the source, and its data.
pub trait Landable: Sync {
    fn source_id(&self) -> &str;
    fn data(&self) -> &RawJson;
}

impl Landable for (String, RawJson) {
    fn source_id(&self) -> &str {
        &self.0
    }

    fn data(&self) -> &RawJson {
        &self.1
    }
}

/// What one [`write`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub inserted: i64,
    pub updated: i64,
}

impl Written {
    pub fn changed(&self) -> bool {
        self.inserted + self.updated > 0
    }
}

/// Whether [`write`] asks Postgres which records it already holds before sending them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Ids and fingerprints first, then only the records that differ: for data that is mostly
    /// unchanged (a re-ingest).
    Fingerprints,
    /// Every record whole at once: for data that is mostly new (a first load), where a probe
    /// would find nothing to spare. The result is the same either way.
    Skip,
}

/// Writes `(source_id, data)` records of `source` into `table`, the one way every raw writer
/// must. Under the source's write lock, with [`Probe::Fingerprints`]: each record's id and
/// [`fingerprint`] go first (binary `COPY` into `raw_keys`), and only the records that are new,
/// tombstoned or fingerprinted otherwise are sent whole (binary `COPY` into `raw_staging`) for
/// one upsert, which leaves records with equal data untouched and gives changed ones a new
/// change id. An unchanged record thus costs its id and 16 bytes on the wire, and no jsonb
/// parse. With [`Probe::Skip`], every record is sent whole to the same upsert. Nothing is
/// visible before `tx` commits; follow with [`notify`] when something changed.
pub async fn write<R: Landable>(
    tx: &Transaction<'_>,
    table: RawTable,
    source: &str,
    records: &[R],
    trace_context: Option<&str>,
    probe: Probe,
) -> Result<Written, tokio_postgres::Error> {
    // Per session, emptied at every commit: no catalog churn per batch.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TEMP TABLE IF NOT EXISTS raw_keys
             (position int4 NOT NULL, source_id text NOT NULL, fingerprint bytea NOT NULL)
             ON COMMIT DELETE ROWS;
         CREATE TEMP TABLE IF NOT EXISTS raw_staging
             (source_id text NOT NULL, data jsonb NOT NULL, fingerprint bytea NOT NULL)
             ON COMMIT DELETE ROWS",
    )
    .await?;
    let fingerprints: Vec<Fingerprint> = records.iter().map(|r| fingerprint(r.data())).collect();
    let to_send: Vec<usize> = match probe {
        Probe::Skip => {
            lock_source(tx, source).await?;
            (0..records.len()).collect()
        }
        Probe::Fingerprints => {
            let mut keys = CopyStream::start(
                tx,
                "COPY raw_keys (position, source_id, fingerprint) FROM STDIN BINARY",
            )
            .await?;
            for (position, (record, fingerprint)) in records.iter().zip(&fingerprints).enumerate() {
                let position = i32::try_from(position).expect("a batch is far under 2^31 rows");
                keys.put(&3i16.to_be_bytes()).await?; // fields in the row
                keys.field(&[&position.to_be_bytes()]).await?;
                keys.field(&[record.source_id().as_bytes()]).await?;
                keys.field(&[fingerprint]).await?;
            }
            keys.finish().await?;
            lock_source(tx, source).await?;
            let changed = tx.query(table.sql().changed_keys, &[&source]).await?;
            changed
                .iter()
                .map(|row| {
                    let position: i32 = row.get(0);
                    usize::try_from(position).expect("positions are what was sent")
                })
                .collect()
        }
    };
    if to_send.is_empty() {
        return Ok(Written::default());
    }
    let mut staging = CopyStream::start(
        tx,
        "COPY raw_staging (source_id, data, fingerprint) FROM STDIN BINARY",
    )
    .await?;
    for &position in &to_send {
        let record = &records[position];
        staging.put(&3i16.to_be_bytes()).await?; // fields in the row
        staging.field(&[record.source_id().as_bytes()]).await?;
        // jsonb's binary format: a version byte, then the text.
        staging.field(&[&[1], record.data().0.as_bytes()]).await?;
        staging.field(&[&fingerprints[position]]).await?;
    }
    staging.finish().await?;
    let row = tx
        .query_one(table.sql().upsert_staged, &[&source, &trace_context])
        .await?;
    let written = Written {
        inserted: row.get(0),
        updated: row.get(1),
    };
    if written.inserted + written.updated < to_send.len() as i64 {
        tx.execute(table.sql().refresh_fingerprints, &[&source])
            .await?;
    }
    Ok(written)
}

/// Takes the source's write lock (see [`RAW_WRITE_LOCK_CLASS`]) until `tx` ends.
async fn lock_source(tx: &Transaction<'_>, source: &str) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&RAW_WRITE_LOCK_CLASS, &source],
    )
    .await?;
    Ok(())
}

/// What identifies a record's data: the first 16 bytes of the SHA-256 of its JSON text. Kept
/// with the raw row; a collision between two versions of one record is as likely as guessing
/// a 128-bit key.
pub type Fingerprint = [u8; 16];

pub fn fingerprint(data: &RawJson) -> Fingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, data.0.as_bytes());
    let mut fingerprint = [0; 16];
    fingerprint.copy_from_slice(&digest.as_ref()[..16]);
    fingerprint
}

/// The binary `COPY` header: signature, flags, header extension length.
const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Size of each `CopyData` message.
const COPY_CHUNK_BYTES: usize = 64 * 1024;

/// A field's length as the binary `COPY` format writes it. Records reach here bounded by
/// `http.max_record_bytes`, far below Postgres's 1 GB field limit.
fn field_length(len: usize) -> i32 {
    i32::try_from(len).expect("a raw field is under 2 GiB")
}

/// The binary `COPY` stream, sent in messages of at most [`COPY_CHUNK_BYTES`] whatever the
/// rows: a 10 MB record goes out slice by slice from the record itself, instead of being
/// encoded whole into a row buffer and copied whole again into the connection's write buffer
/// (which keeps that capacity for the life of the pooled connection).
struct CopyStream {
    sink: std::pin::Pin<Box<CopyInSink<Bytes>>>,
    buffer: BytesMut,
}

impl CopyStream {
    /// Starts `copy` (a binary `COPY … FROM STDIN`) and sends the format's header.
    async fn start(tx: &Transaction<'_>, copy: &str) -> Result<Self, tokio_postgres::Error> {
        let sink = tx.copy_in(copy).await?;
        let mut stream = Self {
            sink: Box::pin(sink),
            buffer: BytesMut::with_capacity(COPY_CHUNK_BYTES),
        };
        stream.put(COPY_SIGNATURE).await?;
        Ok(stream)
    }

    async fn put(&mut self, mut bytes: &[u8]) -> Result<(), tokio_postgres::Error> {
        while !bytes.is_empty() {
            let room = COPY_CHUNK_BYTES - self.buffer.len();
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            self.buffer.put_slice(now);
            bytes = later;
            if self.buffer.len() == COPY_CHUNK_BYTES {
                let chunk = self.buffer.split().freeze();
                self.sink.feed(chunk).await?;
                self.buffer.reserve(COPY_CHUNK_BYTES);
            }
        }
        Ok(())
    }

    /// One field of a row: its length, then its bytes (the `parts` one after the other).
    async fn field(&mut self, parts: &[&[u8]]) -> Result<(), tokio_postgres::Error> {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        self.put(&field_length(len).to_be_bytes()).await?;
        for part in parts {
            self.put(part).await?;
        }
        Ok(())
    }

    /// Sends the format's trailer and what is still buffered, and ends the `COPY`.
    async fn finish(mut self) -> Result<u64, tokio_postgres::Error> {
        self.put(&(-1i16).to_be_bytes()).await?;
        if !self.buffer.is_empty() {
            let chunk = self.buffer.split().freeze();
            self.sink.feed(chunk).await?;
        }
        self.sink.as_mut().finish().await
    }
}

/// Notes, in the transaction that just [`write`]s a batch, that snapshot run `run_id` has seen
/// the batch's ids (what [`tombstone_unseen`] spares): those probed, and those sent whole.
pub async fn mark_seen(tx: &Transaction<'_>, run_id: i64) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO etl_run_seen (run_id, source_id)
         SELECT $1, source_id
         FROM (SELECT source_id FROM raw_keys UNION SELECT source_id FROM raw_staging) seen
         ON CONFLICT DO NOTHING",
        &[&run_id],
    )
    .await?;
    Ok(())
}

/// After snapshot run `run_id` of `source` has landed everything: tombstones the raw rows it
/// did not see (under the source's write lock, so their change ids become visible in order),
/// notifies when there were any, and forgets what the run saw. Returns how many.
pub async fn tombstone_unseen(
    client: &mut tokio_postgres::Client,
    table: RawTable,
    source: &str,
    run_id: i64,
) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&RAW_WRITE_LOCK_CLASS, &source],
    )
    .await?;
    let deleted = tx
        .execute(table.sql().tombstone_unseen, &[&source, &run_id])
        .await?;
    forget_seen(&tx, run_id).await?;
    if deleted > 0 {
        notify(&tx, source).await?;
    }
    tx.commit().await?;
    Ok(deleted)
}

/// Drops what run `run_id` saw (a run that failed, or ended, deletes nothing more).
pub async fn forget_seen(
    client: &impl tokio_postgres::GenericClient,
    run_id: i64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute("DELETE FROM etl_run_seen WHERE run_id = $1", &[&run_id])
        .await?;
    Ok(())
}

/// Tells listeners that `source` has new raw changes (delivered when `tx` commits).
pub async fn notify(tx: &Transaction<'_>, source: &str) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_notify($1, $2)", &[&RAW_READY_CHANNEL, &source])
        .await?;
    Ok(())
}
