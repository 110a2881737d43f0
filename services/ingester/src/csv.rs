//! CSV sources, streamed: the HTTP body flows through (optional) gzip decoding into csv-async
//! and out in batches, so memory stays flat however large the file. Each row becomes a JSON
//! object keyed by the header; a row that does not fit (wrong field count, invalid UTF-8, no
//! id) is rejected with its line number and the rest of the file goes on.

use std::io;

use async_compression::tokio::bufread::GzipDecoder;
use csv_async::{AsyncReaderBuilder, ByteRecord};
use etl_shared::sources::Source;
use futures_util::TryStreamExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::io::StreamReader;
use url::Url;

use crate::http::{FetchError, Fetcher};
use crate::land::{Lander, Position};
use crate::IngestError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

pub async fn ingest(
    source: &Source,
    fetcher: &Fetcher,
    lander: &mut Lander,
) -> Result<(), IngestError> {
    let options = source.csv_options();
    let url = Url::parse(&source.url).map_err(|e| IngestError::Source(format!("bad url: {e}")))?;
    // Retries cover getting a successful response; once rows are streaming, a broken
    // connection fails the run (what was landed stays landed, and the next run re-reads it).
    let response = fetcher.get(&url, |r| async { Ok(r) }).await?;
    let body = StreamReader::new(
        response
            .bytes_stream()
            .map_err(|e| io::Error::other(FetchError::from_reqwest(e))),
    );
    let mut body = BufReader::with_capacity(64 * 1024, body);
    let starts_gzipped = body
        .fill_buf()
        .await
        .map_err(|e| read_error(&url, e))?
        .starts_with(&GZIP_MAGIC);
    let reader: Box<dyn AsyncRead + Unpin + Send> = if options.gzip.unwrap_or(starts_gzipped) {
        let mut decoder = GzipDecoder::new(body);
        decoder.multiple_members(true);
        Box::new(decoder)
    } else {
        Box::new(body)
    };
    // Counted after decompression, so a small gzip bomb is caught as well as a huge file.
    let quoting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = Limited {
        inner: reader,
        quotes: QuoteTracker::new(options.delimiter as u8, options.quote as u8),
        ends_in_quotes: quoting.clone(),
        left: fetcher.max_file_bytes(),
        limit: fetcher.max_file_bytes(),
        deadline: tokio::time::Instant::now() + fetcher.max_response_time(),
        max_time: fetcher.max_response_time(),
    };

    let mut csv = AsyncReaderBuilder::new()
        .delimiter(options.delimiter as u8)
        .quote(options.quote as u8)
        .has_headers(false)
        .flexible(true)
        .create_reader(reader);

    let mut record = ByteRecord::new();
    if !csv
        .read_byte_record(&mut record)
        .await
        .map_err(|e| csv_error(&url, e))?
    {
        return Ok(()); // an empty file: nothing to land
    }
    let header = Header::parse(&record, source)?;

    let delimiter = options.delimiter as u8;
    // One record of lookahead: only once the next one (or the end) is read do we know whether
    // this one is the last, and the last is cut short if the file ends inside quotes.
    let mut next = ByteRecord::new();
    let mut more = csv
        .read_byte_record(&mut record)
        .await
        .map_err(|e| csv_error(&url, e))?;
    while more {
        if fetcher.stopping() {
            // The rows queued since the last batch are dropped, not half-written; the next
            // run reads the file again.
            return Err(IngestError::Source(format!(
                "interrupted by shutdown{}",
                line_suffix(&record)
            )));
        }
        more = csv
            .read_byte_record(&mut next)
            .await
            .map_err(|e| csv_error(&url, e))?;
        let line = record.position().map(|p| p.line() as i64);
        let position = Position {
            line,
            ..Position::default()
        };
        let parsed = if !more && quoting.load(std::sync::atomic::Ordering::Relaxed) {
            Err(
                "the file ends inside a quoted field, so this last record is cut short \
                 (a truncated file?)"
                    .to_owned(),
            )
        } else {
            header.to_json(&record)
        };
        lander
            .land(position, parsed, || reassemble(&record, delimiter))
            .await?;
        std::mem::swap(&mut record, &mut next);
    }
    Ok(())
}

/// Column names, and where the id is.
struct Header {
    columns: Vec<String>,
    source_id: usize,
}

impl Header {
    fn parse(record: &ByteRecord, source: &Source) -> Result<Self, IngestError> {
        let mut columns = Vec::with_capacity(record.len());
        for (i, field) in record.iter().enumerate() {
            let field = if i == 0 {
                field.strip_prefix(UTF8_BOM).unwrap_or(field)
            } else {
                field
            };
            let name = std::str::from_utf8(field).map_err(|_| {
                IngestError::Source(format!("the header's column {} is not valid UTF-8", i + 1))
            })?;
            let name = name.trim().to_owned();
            if columns.contains(&name) {
                return Err(IngestError::Source(format!(
                    "the header names column {name:?} twice; rows could not be mapped unambiguously"
                )));
            }
            columns.push(name);
        }
        let mapping = &source.mapping;
        let mapped = [
            ("mapping.source_id", Some(&mapping.source_id)),
            ("mapping.name", Some(&mapping.name)),
            ("mapping.value", Some(&mapping.value)),
            ("mapping.description", mapping.description.as_ref()),
        ];
        for (field, column) in mapped {
            if let Some(column) = column {
                if !columns.contains(column) {
                    return Err(IngestError::Source(format!(
                        "the header has no column {column:?} ({field}); it has: {}",
                        columns.join(", ")
                    )));
                }
            }
        }
        let source_id = columns
            .iter()
            .position(|c| *c == mapping.source_id)
            .expect("checked above");
        Ok(Self { columns, source_id })
    }

    /// The row as a JSON object keyed by column, with its id; or why it cannot be one.
    fn to_json(&self, record: &ByteRecord) -> Result<(String, String), String> {
        if record.len() != self.columns.len() {
            return Err(format!(
                "expected {} fields as in the header, found {}",
                self.columns.len(),
                record.len()
            ));
        }
        let mut json = String::with_capacity(record.as_slice().len() + self.columns.len() * 16);
        json.push('{');
        for (i, (column, field)) in self.columns.iter().zip(record.iter()).enumerate() {
            let value = std::str::from_utf8(field)
                .map_err(|_| format!("field {column:?} is not valid UTF-8"))?;
            if i > 0 {
                json.push(',');
            }
            push_json_string(&mut json, column);
            json.push(':');
            push_json_string(&mut json, value);
        }
        json.push('}');
        let id = std::str::from_utf8(&record[self.source_id]).expect("checked in the loop");
        let id = id.trim();
        if id.is_empty() {
            return Err(format!(
                "source_id column {:?} is empty",
                self.columns[self.source_id]
            ));
        }
        Ok((id.to_owned(), json))
    }
}

fn push_json_string(out: &mut String, value: &str) {
    // serde_json's escaping, written straight into our buffer.
    out.push_str(&serde_json::to_string(value).expect("a str always serializes"));
}

/// The row's fields joined back into CSV (quoted where needed) for the reject record.
fn reassemble(record: &ByteRecord, delimiter: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.as_slice().len() + record.len());
    for (i, field) in record.iter().enumerate() {
        if i > 0 {
            out.push(delimiter);
        }
        let needs_quotes = field
            .iter()
            .any(|&b| b == delimiter || b == b'"' || b == b'\n' || b == b'\r');
        if needs_quotes {
            out.push(b'"');
            for &b in field {
                if b == b'"' {
                    out.push(b'"');
                }
                out.push(b);
            }
            out.push(b'"');
        } else {
            out.extend_from_slice(field);
        }
    }
    out
}

/// A reader that fails once more than `limit` bytes have come through.
/// Where the CSV parser is with respect to quotes, followed byte by byte the way csv-core
/// does, so the end of the file can tell whether it cut a quoted field short.
#[derive(Clone, Copy, PartialEq)]
enum Quoting {
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: it closes the field, or escapes a second quote.
    QuoteInQuoted,
}

struct QuoteTracker {
    state: Quoting,
    delimiter: u8,
    quote: u8,
}

impl QuoteTracker {
    fn new(delimiter: u8, quote: u8) -> Self {
        Self {
            state: Quoting::FieldStart,
            delimiter,
            quote,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let (d, q) = (self.delimiter, self.quote);
        let ends_field = |b: u8| b == d || b == b'\n' || b == b'\r';
        for &b in bytes {
            self.state = match self.state {
                Quoting::Quoted if b == q => Quoting::QuoteInQuoted,
                Quoting::Quoted => Quoting::Quoted,
                Quoting::QuoteInQuoted if b == q => Quoting::Quoted,
                Quoting::FieldStart if b == q => Quoting::Quoted,
                _ if ends_field(b) => Quoting::FieldStart,
                _ => Quoting::Unquoted,
            };
        }
    }

    fn inside_quotes(&self) -> bool {
        self.state == Quoting::Quoted
    }
}

/// The body, cut off past `http.max_file_bytes` or `http.max_response_time`, with its quoting
/// followed (`ends_in_quotes` says whether the bytes so far end inside a quoted field).
struct Limited<R> {
    inner: R,
    quotes: QuoteTracker,
    ends_in_quotes: std::sync::Arc<std::sync::atomic::AtomicBool>,
    left: u64,
    limit: u64,
    deadline: tokio::time::Instant,
    max_time: std::time::Duration,
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if tokio::time::Instant::now() > self.deadline {
            let limit = self.max_time;
            return std::task::Poll::Ready(Err(io::Error::other(format!(
                "the file took longer than {limit:?} to arrive (http.max_response_time)"
            ))));
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > self.left {
            let limit = self.limit;
            return std::task::Poll::Ready(Err(io::Error::other(format!(
                "the file is larger than the limit of {limit} bytes (http.max_file_bytes)"
            ))));
        }
        self.left -= read;
        if read > 0 {
            let this = &mut *self;
            this.quotes.feed(&buf.filled()[before..]);
            this.ends_in_quotes.store(
                this.quotes.inside_quotes(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        polled
    }
}

fn line_suffix(record: &ByteRecord) -> String {
    record
        .position()
        .map(|p| format!(" at line {}", p.line()))
        .unwrap_or_default()
}

fn read_error(url: &Url, e: io::Error) -> IngestError {
    IngestError::Source(format!("reading {url} failed: {e}"))
}

fn csv_error(url: &Url, e: csv_async::Error) -> IngestError {
    let line = e
        .position()
        .map(|p| format!(" near line {}", p.line()))
        .unwrap_or_default();
    IngestError::Source(format!("reading CSV from {url} failed{line}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::QuoteTracker;

    fn ends_inside_quotes(text: &str) -> bool {
        let mut tracker = QuoteTracker::new(b',', b'"');
        for chunk in text.as_bytes().chunks(3) {
            tracker.feed(chunk);
        }
        tracker.inside_quotes()
    }

    #[test]
    fn quote_tracking_tells_a_closed_field_from_a_cut_one() {
        assert!(!ends_inside_quotes("a,b\n1,\"x, \"\"y\"\"\"\n"));
        assert!(ends_inside_quotes("a,b\n1,\"x, \"\"y"));
        assert!(ends_inside_quotes("a\n\"multi\nline"));
        assert!(!ends_inside_quotes("a\n\"closed\""));
        // A quote inside an unquoted field is literal, as csv-core reads it.
        assert!(!ends_inside_quotes("a,b\n1,5\" screen\n2,\"\"\n"));
    }
}
