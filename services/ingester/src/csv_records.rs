//! CSV record boundaries, found before the parser sees the bytes, so that no record is ever
//! held whole beyond `http.max_record_bytes`.
//!
//! [`RecordGuard`] sits between the body and the CSV parser. It passes on whole records only,
//! holding the current one until its end (a newline outside quotes) arrives. A record that
//! grows past the limit is not passed on: its first bytes are kept for the reject, the rest is
//! counted and dropped until the record ends, and the parser gets one newline per line dropped
//! instead (it skips empty lines, and its line numbers stay those of the file). An unterminated
//! quote swallows everything after it: the guard reaches the end of the file inside that record
//! and says so, with the line it started on.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::land::KEPT_PREFIX_BYTES;

/// The CSV dialect, as bytes.
#[derive(Clone, Copy)]
pub struct Dialect {
    pub delimiter: u8,
    pub quote: u8,
}

/// Where the CSV parser is with respect to quotes, followed byte by byte the way csv-core does.
#[derive(Clone, Copy, PartialEq)]
enum Quoting {
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: it closes the field, or escapes a second quote.
    QuoteInQuoted,
}

pub struct QuoteTracker {
    state: Quoting,
    delimiter: u8,
    quote: u8,
}

impl QuoteTracker {
    pub fn new(dialect: Dialect) -> Self {
        Self {
            state: Quoting::FieldStart,
            delimiter: dialect.delimiter,
            quote: dialect.quote,
        }
    }

    /// Follows one byte; true when it ends a record (a line break outside quotes).
    fn feed_byte(&mut self, b: u8) -> bool {
        let (d, q) = (self.delimiter, self.quote);
        let line_break = b == b'\n' || b == b'\r';
        let ends_record = line_break && self.state != Quoting::Quoted;
        self.state = match self.state {
            Quoting::Quoted if b == q => Quoting::QuoteInQuoted,
            Quoting::Quoted => Quoting::Quoted,
            Quoting::QuoteInQuoted if b == q => Quoting::Quoted,
            Quoting::FieldStart if b == q => Quoting::Quoted,
            _ if b == d || line_break => Quoting::FieldStart,
            _ => Quoting::Unquoted,
        };
        ends_record
    }

    #[cfg(test)]
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.feed_byte(b);
        }
    }

    pub fn inside_quotes(&self) -> bool {
        self.state == Quoting::Quoted
    }
}

/// A record dropped for its size: where it started, how large it was, its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    pub line: u64,
    pub bytes: u64,
    pub prefix: Vec<u8>,
}

/// The reader between the body and the parser (see the module's header).
pub struct RecordGuard<R> {
    inner: R,
    quotes: QuoteTracker,
    limit: usize,
    /// The current record, until it ends or outgrows the limit.
    pending: Vec<u8>,
    /// Whole records (and stand-in newlines), ready for the parser.
    ready: VecDeque<u8>,
    /// The record being dropped, if any.
    dropping: Option<Oversized>,
    /// Records dropped and finished, for the owner to reject.
    dropped: Vec<Oversized>,
    /// Line on which the current record started (1-based, header included).
    record_line: u64,
    /// Newlines seen so far.
    newlines: u64,
    done: bool,
}

impl<R> RecordGuard<R> {
    pub fn new(inner: R, dialect: Dialect, limit: u64) -> Self {
        Self {
            inner,
            quotes: QuoteTracker::new(dialect),
            limit: usize::try_from(limit).unwrap_or(usize::MAX).max(1),
            pending: Vec::new(),
            ready: VecDeque::new(),
            dropping: None,
            dropped: Vec::new(),
            record_line: 1,
            newlines: 0,
            done: false,
        }
    }

    /// Whether the bytes so far end inside a quoted field (a file cut short).
    pub fn ends_inside_quotes(&self) -> bool {
        self.quotes.inside_quotes()
    }

    /// The first line, if it was dropped for its size (a header too large to read).
    pub fn dropped_header(&self) -> Option<&Oversized> {
        self.dropped.iter().find(|d| d.line == 1)
    }

    /// The records dropped for their size since the last call.
    pub fn take_dropped(&mut self) -> Vec<Oversized> {
        std::mem::take(&mut self.dropped)
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let ends = self.quotes.feed_byte(b);
            if b == b'\n' {
                self.newlines += 1;
            }
            match &mut self.dropping {
                Some(dropping) => {
                    dropping.bytes += 1;
                    if b == b'\n' {
                        self.ready.push_back(b'\n');
                    }
                }
                None => {
                    self.pending.push(b);
                    if self.pending.len() > self.limit {
                        let prefix = self.pending[..KEPT_PREFIX_BYTES.min(self.limit)].to_vec();
                        // Stand-ins for the lines already taken, so line numbers stay right.
                        let lines = self.pending.iter().filter(|&&c| c == b'\n').count();
                        self.ready.extend(std::iter::repeat_n(b'\n', lines));
                        self.dropping = Some(Oversized {
                            line: self.record_line,
                            bytes: self.pending.len() as u64,
                            prefix,
                        });
                        self.pending = Vec::new(); // give the memory back
                    }
                }
            }
            if ends {
                if let Some(dropped) = self.dropping.take() {
                    self.dropped.push(dropped);
                } else {
                    self.ready.extend(self.pending.drain(..));
                }
                self.record_line = self.newlines + 1;
            }
        }
    }

    /// At the end of the body: the last record (without a final newline) goes out; a record
    /// still being dropped is an unterminated quote, or a last record that was too large.
    fn finish(&mut self) -> io::Result<()> {
        self.done = true;
        match self.dropping.take() {
            Some(dropped) if self.quotes.inside_quotes() => {
                Err(io::Error::other(UnterminatedQuote {
                    line: dropped.line,
                    bytes: dropped.bytes,
                    limit: self.limit as u64,
                }))
            }
            Some(dropped) => {
                self.dropped.push(dropped);
                Ok(())
            }
            None => {
                self.ready.extend(self.pending.drain(..));
                Ok(())
            }
        }
    }
}

/// A quote opened and never closed: the rest of the file would be one record.
#[derive(Debug, thiserror::Error)]
#[error(
    "the quoted field opened on line {line} is never closed: the rest of the file ({bytes} \
     bytes and more) would be one record, over the limit of {limit} bytes \
     (http.max_record_bytes); the rows before it landed"
)]
pub struct UnterminatedQuote {
    pub line: u64,
    pub bytes: u64,
    pub limit: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for RecordGuard<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut chunk = [0u8; 64 * 1024];
        while this.ready.is_empty() && !this.done {
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.finish()?,
                Poll::Ready(Ok(())) => {
                    let filled = read.filled().len();
                    this.scan(&chunk[..filled]);
                }
            }
        }
        let n = buf.remaining().min(this.ready.len());
        let (front, back) = this.ready.as_slices();
        let from_front = n.min(front.len());
        buf.put_slice(&front[..from_front]);
        buf.put_slice(&back[..n - from_front]);
        this.ready.drain(..n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const STANDARD: Dialect = Dialect {
        delimiter: b',',
        quote: b'"',
    };

    /// What the parser would see, the dropped records, or the error.
    async fn guard(input: &str, limit: u64) -> io::Result<(String, Vec<Oversized>)> {
        let mut guard = RecordGuard::new(input.as_bytes(), STANDARD, limit);
        let mut out = String::new();
        guard.read_to_string(&mut out).await?;
        Ok((out, guard.take_dropped()))
    }

    #[tokio::test]
    async fn records_within_the_limit_pass_unchanged() {
        let input = "id,name\n1,\"multi\nline\"\n2,b";
        assert_eq!(guard(input, 100).await.unwrap(), (input.to_owned(), vec![]));
    }

    #[tokio::test]
    async fn a_record_over_the_limit_is_dropped_with_its_line_and_prefix_and_lines_kept() {
        let input = "id,name\n1,a\n2,\"long\nlong long\"\n3,c\n";
        let (out, dropped) = guard(input, 12).await.unwrap();
        assert_eq!(
            out, "id,name\n1,a\n\n\n3,c\n",
            "two stand-in newlines keep line 5"
        );
        assert_eq!(
            dropped,
            [Oversized {
                line: 3,
                bytes: 19,
                prefix: b"2,\"long\nlong".to_vec()
            }]
        );
    }

    #[tokio::test]
    async fn an_unterminated_quote_ends_the_read_naming_its_line() {
        let input = format!("id,name\n1,a\n2,\"open{}\n", "x,\n".repeat(100));
        let error = guard(&input, 50).await.unwrap_err();
        let error = error.to_string();
        assert!(
            error.contains("opened on line 3 is never closed"),
            "{error}"
        );
    }
}
