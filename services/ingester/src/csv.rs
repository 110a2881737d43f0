//! CSV sources, streamed: the HTTP body flows through (optional) gzip decoding into csv-async
//! and out in batches, so memory stays flat however large the file. Each row becomes a JSON
//! object keyed by the header; a row that does not fit (wrong field count, invalid UTF-8, no
//! id) is rejected with its line number and the rest of the file goes on.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_compression::tokio::bufread::GzipDecoder;
use csv_async::{AsyncReader, AsyncReaderBuilder, ByteRecord};
use etl_shared::sources::{Source, SourceKey};
use futures_util::TryStreamExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, ReadBuf};
use tokio_util::io::StreamReader;
use url::Url;

use crate::csv_records::{Dialect, RecordGuard, UnterminatedQuote};
use crate::http::{FetchError, Fetcher};
use crate::land::{Lander, Position};
use crate::{IngestError, SafeUrl, SourceError};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";
/// Room in the record buffer past `http.max_record_bytes`, so a record at the limit never
/// makes the parser double the buffer.
const RECORD_SLACK_BYTES: usize = 64 * 1024;

/// A decompressed, size- and time-capped body, passed on record by record (none larger than
/// `http.max_record_bytes`), parsed as CSV.
type CsvReader = AsyncReader<RecordGuard<Capped<Box<dyn AsyncRead + Unpin + Send>>>>;

pub async fn ingest(
    source: &Source,
    fetcher: &Fetcher,
    lander: &mut Lander,
) -> Result<(), IngestError> {
    let options = source.csv_options();
    let dialect = Dialect {
        delimiter: options.delimiter as u8,
        quote: options.quote as u8,
    };
    let url = Url::parse(&source.url).map_err(SourceError::BadUrl)?;
    let body = open(fetcher, &url, options.gzip).await?;
    // Counted after decompression, so a small gzip bomb is caught as well as a huge file.
    let body = RecordGuard::new(
        Capped::new(body, fetcher),
        dialect,
        fetcher.max_record_bytes(),
    );
    let mut csv = AsyncReaderBuilder::new()
        .delimiter(dialect.delimiter)
        .quote(dialect.quote)
        .has_headers(false)
        .flexible(true)
        .create_reader(body);

    let mut record = ByteRecord::new();
    if !next_record(&mut csv, &mut record, &url).await? {
        return Ok(()); // an empty file: nothing to land
    }
    let header_line = record.position().map_or(1, |p| p.line());
    if csv.get_mut().take_cut(header_line) {
        return Err(SourceError::HeaderTooLarge {
            limit: fetcher.max_record_bytes(),
        }
        .into());
    }
    let header = Header::parse(&record, source)?;
    land_rows(&mut csv, &header, dialect, &url, fetcher, lander).await
}

/// The response body, gunzipped when it is gzip (by its magic bytes, or as configured).
async fn open(
    fetcher: &Fetcher,
    url: &Url,
    gzip: Option<bool>,
) -> Result<Box<dyn AsyncRead + Unpin + Send>, IngestError> {
    // Retries cover getting a successful response; once rows are streaming, a broken
    // connection fails the run (what was landed stays landed, and the next run re-reads it).
    let response = fetcher.get(url, |r| async { Ok(r) }).await?;
    let body = StreamReader::new(
        response
            .bytes_stream()
            .map_err(|e| io::Error::other(FetchError::from_reqwest(e))),
    );
    let mut body = BufReader::with_capacity(64 * 1024, body);
    let starts_gzipped = body
        .fill_buf()
        .await
        .map_err(|e| read_error(url, e))?
        .starts_with(&GZIP_MAGIC);
    Ok(if gzip.unwrap_or(starts_gzipped) {
        let mut decoder = GzipDecoder::new(body);
        decoder.multiple_members(true);
        Box::new(decoder)
    } else {
        Box::new(body)
    })
}

async fn next_record(
    csv: &mut CsvReader,
    record: &mut ByteRecord,
    url: &Url,
) -> Result<bool, SourceError> {
    csv.read_byte_record(record)
        .await
        .map_err(|e| csv_error(url, e))
}

/// Lands every row after the header: each as a record or, when it does not fit, a reject.
async fn land_rows(
    csv: &mut CsvReader,
    header: &Header,
    dialect: Dialect,
    url: &Url,
    fetcher: &Fetcher,
    lander: &mut Lander,
) -> Result<(), IngestError> {
    // Sized once for the largest record the guard lets through. The zeroed buffer is address
    // space until written (the allocator maps fresh pages for it), so a 10 MB record costs
    // its 10 MB rather than the 16 MB the parser's doubling would reach, and no buffer is
    // reallocated (and left to the allocator) as records grow.
    let capacity = usize::try_from(fetcher.max_record_bytes()).unwrap_or(usize::MAX);
    let mut record = ByteRecord::with_capacity(
        capacity.saturating_add(RECORD_SLACK_BYTES),
        header.columns.len(),
    );
    // Records after the header, counted as the parser yields them (cut ones included), for
    // positional keys.
    let mut row: u64 = 0;
    loop {
        if fetcher.stopping() {
            // The rows queued since the last batch are dropped, not half-written; the next
            // run reads the file again.
            return Err(SourceError::Interrupted {
                line: record.position().map(|p| p.line()),
            }
            .into());
        }
        match next_record(csv, &mut record, url).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) if is_unterminated_quote(&e) => {
                // Everything before the open quote lands; then the run fails, saying where.
                reject_oversized(csv, fetcher, lander).await?;
                lander.flush().await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        row += 1;
        let line = record.position().map_or(0, |p| p.line());
        let cut = csv.get_mut().take_cut(line);
        reject_oversized(csv, fetcher, lander).await?;
        if !cut {
            lander.make_room(record.as_slice().len()).await?;
            let parsed = if csv.get_ref().is_cut_short(line) {
                Err(
                    "the file ends inside a quoted field, so this last record is cut short \
                     (a truncated file?)"
                        .to_owned(),
                )
            } else {
                header.to_json(&record, row)
            };
            let position = Position {
                line: Some(line as i64),
                ..Position::default()
            };
            lander
                .land(position, parsed, || reassemble(&record, dialect))
                .await?;
        }
    }
    reject_oversized(csv, fetcher, lander).await
}

/// Rejects the records the guard dropped for their size, with their first bytes.
async fn reject_oversized(
    csv: &mut CsvReader,
    fetcher: &Fetcher,
    lander: &mut Lander,
) -> Result<(), IngestError> {
    for dropped in csv.get_mut().take_dropped() {
        let position = Position {
            line: Some(dropped.line as i64),
            ..Position::default()
        };
        let reason = format!(
            "the record is {} bytes, over the limit of {} bytes (http.max_record_bytes); its \
             first {} bytes are kept",
            dropped.bytes,
            fetcher.max_record_bytes(),
            dropped.prefix.len()
        );
        lander
            .land(position, Err(reason), || dropped.prefix)
            .await?;
    }
    Ok(())
}

fn is_unterminated_quote(error: &SourceError) -> bool {
    let SourceError::Csv { error, .. } = error else {
        return false;
    };
    match error.kind() {
        csv_async::ErrorKind::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.is::<UnterminatedQuote>()),
        _ => false,
    }
}

/// Column names, and where the id is.
struct Header {
    columns: Vec<String>,
    key: Key,
}

/// Where a row's id comes from: these columns (by index), or the row's position.
enum Key {
    Columns(Vec<usize>),
    Row,
}

impl Header {
    fn parse(record: &ByteRecord, source: &Source) -> Result<Self, SourceError> {
        let mut columns = Vec::with_capacity(record.len());
        for (i, field) in record.iter().enumerate() {
            let field = if i == 0 {
                field.strip_prefix(UTF8_BOM).unwrap_or(field)
            } else {
                field
            };
            let name = std::str::from_utf8(field)
                .map_err(|_| SourceError::HeaderNotUtf8 { column: i + 1 })?;
            let name = name.trim().to_owned();
            if columns.contains(&name) {
                return Err(SourceError::DuplicateColumn { name });
            }
            columns.push(name);
        }
        let mapping = &source.mapping;
        if let Some((field, column)) = mapping.targets().find(|(_, c)| !columns.contains(c)) {
            return Err(SourceError::MissingColumn {
                column: column.clone(),
                field,
                columns,
            });
        }
        let key = match &mapping.source_id {
            SourceKey::Row => Key::Row,
            SourceKey::Fields(parts) => Key::Columns(
                parts
                    .iter()
                    .map(|part| {
                        columns
                            .iter()
                            .position(|c| c == part)
                            .expect("checked above")
                    })
                    .collect(),
            ),
        };
        Ok(Self { columns, key })
    }

    /// The row as a JSON object keyed by column, with its id (`row` is its position, for a
    /// positional key); or why it cannot be one.
    fn to_json(&self, record: &ByteRecord, row: u64) -> Result<(String, String), String> {
        if record.len() != self.columns.len() {
            return Err(format!(
                "expected {} fields as in the header, found {}",
                self.columns.len(),
                record.len()
            ));
        }
        let mut json = Vec::with_capacity(record.as_slice().len() + self.columns.len() * 16);
        json.push(b'{');
        for (i, (column, field)) in self.columns.iter().zip(record.iter()).enumerate() {
            let value = std::str::from_utf8(field)
                .map_err(|_| format!("field {column:?} is not valid UTF-8"))?;
            if i > 0 {
                json.push(b',');
            }
            push_json_string(&mut json, column);
            json.push(b':');
            push_json_string(&mut json, value);
        }
        json.push(b'}');
        let json = String::from_utf8(json).expect("serde_json writes UTF-8");
        Ok((self.id(record, row)?, json))
    }

    /// The row's id: its key columns' values, trimmed (joined when there are several), or its
    /// position. An empty part is named.
    fn id(&self, record: &ByteRecord, row: u64) -> Result<String, String> {
        let Key::Columns(columns) = &self.key else {
            return Ok(row.to_string());
        };
        let mut parts = Vec::with_capacity(columns.len());
        for &i in columns {
            let part = std::str::from_utf8(&record[i]).expect("checked as UTF-8 above");
            let part = part.trim();
            if part.is_empty() {
                let what = if columns.len() == 1 {
                    "source_id column"
                } else {
                    "source_id part"
                };
                return Err(format!("{what} {:?} is empty", self.columns[i]));
            }
            parts.push(part);
        }
        Ok(SourceKey::compose(&parts))
    }
}

fn push_json_string(out: &mut Vec<u8>, value: &str) {
    // serde_json's escaping, written straight into our buffer (no string per field).
    serde_json::to_writer(out, value).expect("a str always serializes");
}

/// The row's fields joined back into CSV in the source's own dialect (quoted where needed, with
/// the source's quote character) for the reject record.
fn reassemble(record: &ByteRecord, dialect: Dialect) -> Vec<u8> {
    let Dialect { delimiter, quote } = dialect;
    let mut out = Vec::with_capacity(record.as_slice().len() + record.len());
    for (i, field) in record.iter().enumerate() {
        if i > 0 {
            out.push(delimiter);
        }
        let needs_quotes = field
            .iter()
            .any(|&b| b == delimiter || b == quote || b == b'\n' || b == b'\r');
        if needs_quotes {
            out.push(quote);
            for &b in field {
                if b == quote {
                    out.push(quote);
                }
                out.push(b);
            }
            out.push(quote);
        } else {
            out.extend_from_slice(field);
        }
    }
    out
}

/// The body, cut off past `http.max_file_bytes` or `http.max_response_time`.
struct Capped<R> {
    inner: R,
    left: u64,
    limit: u64,
    deadline: tokio::time::Instant,
    max_time: Duration,
}

impl<R> Capped<R> {
    fn new(inner: R, fetcher: &Fetcher) -> Self {
        Self {
            inner,
            left: fetcher.max_file_bytes(),
            limit: fetcher.max_file_bytes(),
            deadline: tokio::time::Instant::now() + fetcher.max_response_time(),
            max_time: fetcher.max_response_time(),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Capped<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if tokio::time::Instant::now() > self.deadline {
            let limit = self.max_time;
            return Poll::Ready(Err(io::Error::other(format!(
                "the file took longer than {limit:?} to arrive (http.max_response_time)"
            ))));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > self.left {
            let limit = self.limit;
            return Poll::Ready(Err(io::Error::other(format!(
                "the file is larger than the limit of {limit} bytes (http.max_file_bytes)"
            ))));
        }
        self.left -= read;
        polled
    }
}

fn read_error(url: &Url, error: io::Error) -> SourceError {
    SourceError::Read {
        url: SafeUrl::from(url),
        error,
    }
}

fn csv_error(url: &Url, error: csv_async::Error) -> SourceError {
    SourceError::Csv {
        url: SafeUrl::from(url),
        line: error.position().map(|p| p.line()),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::reassemble;
    use crate::csv_records::{Dialect, QuoteTracker};

    const STANDARD: Dialect = Dialect {
        delimiter: b',',
        quote: b'"',
    };

    fn ends_inside_quotes(text: &str) -> bool {
        let mut tracker = QuoteTracker::new(STANDARD);
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

    #[test]
    fn a_rejected_row_is_reassembled_in_the_sources_own_dialect() {
        let record = csv_async::ByteRecord::from(vec!["3", "a;b", "it's", "plain"]);
        let semicolon_single_quote = Dialect {
            delimiter: b';',
            quote: b'\'',
        };

        assert_eq!(
            reassemble(&record, semicolon_single_quote),
            b"3;'a;b';'it''s';plain"
        );
        assert_eq!(reassemble(&record, STANDARD), b"3,a;b,it's,plain");
    }
}
