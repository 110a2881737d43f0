//! `GET /data/export`: every record matching `/data`'s filters, streamed as NDJSON or CSV.
//!
//! One statement, so one snapshot: records inserted or updated while an export runs are in it
//! or not, never half. Its rows come through a portal as the client takes them: tokio-postgres
//! stops reading the socket while the HTTP body is not polled, and Postgres waits, so memory
//! stays flat however large the export (a chunk of about [`CHUNK_BYTES`] at a time).
//!
//! An export holds a connection of the pool for as long as it runs: at most
//! [`EXPORTS_AT_ONCE`] run at once (others get a 503 problem with `Retry-After`), so pages are
//! always served beside them.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use deadpool_postgres::Object;
use futures_util::{Stream, StreamExt};
use poem_openapi::types::ToJSON;
use poem_openapi::Enum;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::Type;
use tokio_postgres::RowStream;

use crate::data::{self, DataQuery, QueryError};
use crate::reader::Reader;
use crate::sql::Sql;

/// Exports running at once; each holds one connection of the pool.
pub const EXPORTS_AT_ONCE: usize = 2;

/// An export may run this long (its statement's timeout), at whatever pace its client reads.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Rows are sent in chunks of about this size.
const CHUNK_BYTES: usize = 64 * 1024;

/// The columns of a record, in the order of CSV's header and of `DataRecord`.
const HEADER: &str = "id,source,source_id,name,value,description,created_at,updated_at\n";

/// An export's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line, shaped like `/data`'s records.
    Ndjson,
    /// RFC 4180: a header line, then one line per record; fields with a comma, a quote or a
    /// line break are quoted, quotes doubled. An absent `description` is an empty field.
    Csv,
}

/// Admits at most [`EXPORTS_AT_ONCE`] exports.
#[derive(Clone)]
pub struct Exports {
    running: Arc<Semaphore>,
}

impl Default for Exports {
    fn default() -> Self {
        Self {
            running: Arc::new(Semaphore::new(EXPORTS_AT_ONCE)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{EXPORTS_AT_ONCE} exports are running already")]
    Busy,
    #[error(transparent)]
    Query(#[from] QueryError),
}

impl From<tokio_postgres::Error> for ExportError {
    fn from(e: tokio_postgres::Error) -> Self {
        ExportError::Query(e.into())
    }
}

impl Exports {
    /// Starts the export of what `query` selects (its filters and order; not its paging): the
    /// body's chunks, once the database has started answering, so a failure to start is an
    /// error here rather than a broken body.
    pub async fn start(
        &self,
        reader: &Reader,
        query: &DataQuery,
        format: Format,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, ExportError> {
        let permit = self
            .running
            .clone()
            .try_acquire_owned()
            .map_err(|_| ExportError::Busy)?;
        let client = reader.pool().get().await.map_err(QueryError::from)?;
        let timeout = EXPORT_TIMEOUT.as_millis().to_string();
        // In a transaction of its own, with its own timeout: whatever the connection's session
        // settings, and behind a transaction pooler too.
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        client
            .query_typed(
                "SELECT set_config('statement_timeout', $1, true)",
                &[(&timeout, Type::TEXT)],
            )
            .await?;
        let filters = &query.filters;
        let pattern = filters.search.as_deref().map(data::like_pattern);
        let mut sql = Sql::new(data::SELECT_RECORDS);
        sql.filters(filters, pattern.as_ref());
        sql.push(query.sort.order_by());
        let rows = client.query_typed_raw(&sql.text, sql.params).await?;
        let mut first = BytesMut::with_capacity(CHUNK_BYTES + 4096);
        if format == Format::Csv {
            first.put_slice(HEADER.as_bytes());
        }
        let export = Export {
            client: Some(client),
            rows: Box::pin(rows),
            format,
            buffer: first,
            _permit: permit,
        };
        Ok(futures_util::stream::unfold(export, Export::next_chunk))
    }
}

/// A running export: its connection (inside the export's transaction until the last row),
/// its rows, and what is written of them but not sent yet.
struct Export {
    client: Option<Object>,
    rows: std::pin::Pin<Box<RowStream>>,
    format: Format,
    buffer: BytesMut,
    _permit: OwnedSemaphorePermit,
}

impl Export {
    async fn next_chunk(mut self) -> Option<(std::io::Result<Bytes>, Self)> {
        self.client.as_ref()?; // ended
        while self.buffer.len() < CHUNK_BYTES {
            match self.rows.next().await {
                Some(Ok(row)) => {
                    let record = data::record(&row);
                    match self.format {
                        Format::Ndjson => write_json_line(&mut self.buffer, &record),
                        Format::Csv => write_csv_line(&mut self.buffer, &record),
                    }
                }
                Some(Err(e)) => {
                    tracing::error!(error = %etl_shared::error_chain(&e), "export failed");
                    // Left in its transaction: out of the pool. The body ends with an error,
                    // so the client sees a broken transfer, not a short file.
                    if let Some(client) = self.client.take() {
                        drop(Object::take(client));
                    }
                    return Some((Err(std::io::Error::other(e)), self));
                }
                None => {
                    let client = self.client.take().expect("checked above");
                    if let Err(e) = client.batch_execute("COMMIT").await {
                        tracing::warn!(error = %e, "export: COMMIT failed");
                        drop(Object::take(client));
                    }
                    let last = self.buffer.split().freeze();
                    return (!last.is_empty()).then_some((Ok(last), self));
                }
            }
        }
        let chunk = self.buffer.split().freeze();
        Some((Ok(chunk), self))
    }
}

impl Drop for Export {
    /// An export dropped before its end (the client went away, or its statement failed) leaves
    /// its connection inside a transaction: it is closed, never handed to another request.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

fn write_json_line(out: &mut BytesMut, record: &data::DataRecord) {
    let value = record.to_json().expect("a record is a JSON object");
    serde_json::to_writer((&mut *out).writer(), &value).expect("writing to memory");
    out.put_u8(b'\n');
}

fn write_csv_line(out: &mut BytesMut, record: &data::DataRecord) {
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .expect("a timestamp of Postgres's range formats")
    };
    let fields: [&str; 8] = [
        &record.id.to_string(),
        &record.source,
        &record.source_id,
        &record.name,
        &record.value.to_string(),
        record.description.as_deref().unwrap_or(""),
        &rfc3339(record.created_at),
        &rfc3339(record.updated_at),
    ];
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        write_csv_field(out, field);
    }
    out.put_u8(b'\n');
}

/// RFC 4180: quoted when it holds a comma, a quote or a line break, quotes doubled.
fn write_csv_field(out: &mut BytesMut, field: &str) {
    if !field.contains([',', '"', '\n', '\r']) {
        out.put_slice(field.as_bytes());
        return;
    }
    out.put_u8(b'"');
    for (i, part) in field.split('"').enumerate() {
        if i > 0 {
            out.put_slice(b"\"\"");
        }
        out.put_slice(part.as_bytes());
    }
    out.put_u8(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(text: &str) -> String {
        let mut out = BytesMut::new();
        write_csv_field(&mut out, text);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(field("plain text"), "plain text");
        assert_eq!(field(""), "");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("two\nlines\r"), "\"two\nlines\r\"");
        assert_eq!(field("\""), "\"\"\"\"");
    }
}
