//! CSV record boundaries, followed before the parser sees the bytes, so that no record is ever
//! held whole beyond `http.max_record_bytes`.
//!
//! [`RecordGuard`] sits between the body and the CSV parser and passes bytes straight on,
//! holding none back. A record that grows past the limit is cut there: the rest of it is
//! counted and dropped (its first bytes are kept for the reject), and the parser is given what
//! ends the record instead (a closing quote if the cut fell inside one, then the record's first
//! line break), followed by one newline per further line dropped (it skips empty lines, and its
//! line numbers stay those of the file). The parser still yields the shortened record; its
//! owner asks [`RecordGuard::take_cut`] and rejects it instead. An unterminated quote swallows
//! everything after it: the guard reaches the end of the file inside that record and says so,
//! with the line it started on.

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
    pub quote: u8,
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
    limit: u64,
    /// Bytes for the parser, from the last chunk read: what was not cut, and stand-ins.
    ready: Vec<u8>,
    /// How much of `ready` the parser has taken.
    taken: usize,
    /// The current record's first bytes, kept in case it must be rejected.
    head: Vec<u8>,
    /// Bytes of the current record so far.
    record_bytes: u64,
    /// The record being cut, if any.
    cutting: Option<Cutting>,
    /// Records cut and finished, for the owner to reject.
    dropped: Vec<Oversized>,
    /// Lines of the records cut, whose shortened start the parser still yields.
    cut_lines: VecDeque<u64>,
    /// The line of a last record that the file ends inside quotes of.
    cut_short: Option<u64>,
    /// Line on which the current record started (1-based, header included).
    record_line: u64,
    /// Newlines seen so far.
    newlines: u64,
    done: bool,
}

struct Cutting {
    dropped: Oversized,
    /// The cut fell inside a quoted field: the parser needs a closing quote to end the record.
    close_quote: bool,
    /// The parser has been given the record's end.
    ended: bool,
}

impl<R> RecordGuard<R> {
    pub fn new(inner: R, dialect: Dialect, limit: u64) -> Self {
        Self {
            inner,
            quotes: QuoteTracker::new(dialect),
            limit: limit.max(1),
            ready: Vec::new(),
            taken: 0,
            head: Vec::new(),
            record_bytes: 0,
            cutting: None,
            dropped: Vec::new(),
            cut_lines: VecDeque::new(),
            cut_short: None,
            record_line: 1,
            newlines: 0,
            done: false,
        }
    }

    /// Whether the parser's record that started on `line` is the shortened start of a record
    /// cut for its size (to be skipped: its reject comes from [`take_dropped`](Self::take_dropped)).
    /// Asked once per record, in order.
    pub fn take_cut(&mut self, line: u64) -> bool {
        while let Some(&cut) = self.cut_lines.front() {
            if cut > line {
                break;
            }
            self.cut_lines.pop_front();
            if cut == line {
                return true;
            }
        }
        false
    }

    /// Whether the record that started on `line` is the last one and the file ends inside one
    /// of its quoted fields (a file cut short).
    pub fn is_cut_short(&self, line: u64) -> bool {
        self.cut_short == Some(line)
    }

    /// The records dropped for their size since the last call.
    pub fn take_dropped(&mut self) -> Vec<Oversized> {
        std::mem::take(&mut self.dropped)
    }

    fn scan(&mut self, bytes: &[u8]) {
        let keep = KEPT_PREFIX_BYTES.min(usize::try_from(self.limit).unwrap_or(usize::MAX));
        for &b in bytes {
            let inside_quotes = self.quotes.inside_quotes();
            let ends = self.quotes.feed_byte(b);
            let line_break = b == b'\n' || b == b'\r';
            if b == b'\n' {
                self.newlines += 1;
            }
            self.record_bytes += 1;
            if self.cutting.is_none() && self.record_bytes > self.limit {
                self.cut_lines.push_back(self.record_line);
                self.cutting = Some(Cutting {
                    dropped: Oversized {
                        line: self.record_line,
                        bytes: 0,
                        prefix: std::mem::take(&mut self.head),
                    },
                    close_quote: inside_quotes,
                    ended: false,
                });
            }
            match &mut self.cutting {
                None => {
                    self.ready.push(b);
                    if self.head.len() < keep {
                        self.head.push(b);
                    }
                }
                Some(cutting) => {
                    if line_break && !cutting.ended {
                        if cutting.close_quote {
                            self.ready.push(self.quotes.quote);
                        }
                        self.ready.push(b);
                        cutting.ended = true;
                    } else if b == b'\n' {
                        self.ready.push(b'\n');
                    }
                }
            }
            if ends {
                if let Some(mut cutting) = self.cutting.take() {
                    cutting.dropped.bytes = self.record_bytes;
                    self.dropped.push(cutting.dropped);
                }
                self.head.clear();
                self.record_bytes = 0;
                self.record_line = self.newlines + 1;
            }
        }
    }

    /// At the end of the body: a record still being cut is an unterminated quote, or a last
    /// record that was too large; a last record inside quotes was cut short.
    fn finish(&mut self) -> io::Result<()> {
        self.done = true;
        match self.cutting.take() {
            Some(cutting) if self.quotes.inside_quotes() => {
                Err(io::Error::other(UnterminatedQuote {
                    line: cutting.dropped.line,
                    bytes: self.record_bytes,
                    limit: self.limit,
                }))
            }
            Some(mut cutting) => {
                if !cutting.ended && cutting.close_quote {
                    self.ready.push(self.quotes.quote);
                }
                cutting.dropped.bytes = self.record_bytes;
                self.dropped.push(cutting.dropped);
                Ok(())
            }
            None => {
                if self.quotes.inside_quotes() {
                    self.cut_short = Some(self.record_line);
                }
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
        while this.taken == this.ready.len() && !this.done {
            this.ready.clear();
            this.taken = 0;
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
        let n = buf.remaining().min(this.ready.len() - this.taken);
        buf.put_slice(&this.ready[this.taken..this.taken + n]);
        this.taken += n;
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
            out, "id,name\n1,a\n2,\"long\nlong\"\n3,c\n",
            "cut at the limit and closed, on as many lines as the file"
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
    async fn a_record_cut_outside_quotes_ends_at_its_own_line_break_and_is_marked_cut() {
        let mut guard = RecordGuard::new("id\n123456789\n2\n".as_bytes(), STANDARD, 5);
        let mut out = String::new();
        guard.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "id\n12345\n2\n");
        assert_eq!(
            guard.take_dropped(),
            [Oversized {
                line: 2,
                bytes: 10,
                prefix: b"12345".to_vec()
            }]
        );
        assert!(!guard.take_cut(1));
        assert!(guard.take_cut(2));
        assert!(!guard.take_cut(3));
    }

    #[tokio::test]
    async fn a_file_ending_inside_quotes_marks_its_last_record_cut_short() {
        let mut guard = RecordGuard::new("id,n\n1,\"abc".as_bytes(), STANDARD, 100);
        let mut out = String::new();
        guard.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "id,n\n1,\"abc", "passed on as it is");
        assert!(guard.is_cut_short(2));
        assert!(!guard.is_cut_short(1));
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
