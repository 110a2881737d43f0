//! One REST page: read whole (in memory when small, else spooled to a temporary file), checked
//! to be one UTF-8 JSON value before any of its items lands, so a page lands whole or not at
//! all and a cut-off body is retried, then read back in chunks for the
//! [`PageScanner`](crate::page_scan::PageScanner). No page is ever held in memory whole.

use std::io::{self, BufReader, Read, Seek};

use reqwest::header::{CONTENT_TYPE, LINK};
use serde::de::IgnoredAny;
use tokio::io::AsyncReadExt;

use crate::http::{read_body_limited, Body, FetchError};

/// Bytes read back from a spooled page at a time.
const CHUNK_BYTES: usize = 64 * 1024;

/// A fetched page whose body is valid JSON, and its `Link: rel="next"` target, if any.
pub struct Page {
    body: Body,
    pub link_next: Option<String>,
}

/// Reads `response` into a [`Page`], failing (retryably) when the body is not JSON.
pub async fn read(response: reqwest::Response, limit: u64) -> Result<Page, FetchError> {
    let link_next = response
        .headers()
        .get_all(LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(link_rel_next);
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let body = read_body_limited(response, limit).await?;
    let len = body.bytes();
    let body = check_json(body).await.map_err(|e| {
        FetchError::Body(format!(
            "the body is not valid JSON ({e}; content-type {content_type}, {len} bytes)"
        ))
    })?;
    Ok(Page { body, link_next })
}

impl Page {
    /// The body from its start, chunk by chunk.
    pub fn chunks(self) -> Chunks {
        Chunks {
            body: Some(self.body),
            buffer: Vec::new(),
        }
    }
}

/// The chunks of a page's body (see [`Page::chunks`]).
pub struct Chunks {
    body: Option<Body>,
    buffer: Vec<u8>,
}

impl Chunks {
    /// The next chunk, or `None` at the end.
    pub async fn next(&mut self) -> io::Result<Option<&[u8]>> {
        match self.body.take() {
            None => Ok(None),
            Some(Body::Memory(bytes)) => {
                self.buffer = bytes;
                Ok(Some(&self.buffer))
            }
            Some(Body::Spooled { mut file, len }) => {
                self.buffer.resize(CHUNK_BYTES, 0);
                let n = file.read(&mut self.buffer).await?;
                if n == 0 {
                    return Ok(None);
                }
                self.body = Some(Body::Spooled { file, len });
                Ok(Some(&self.buffer[..n]))
            }
        }
    }
}

/// Whether `body` is one JSON value in UTF-8; a spooled body is read back in a blocking thread,
/// in constant memory, and left at its start.
async fn check_json(body: Body) -> Result<Body, String> {
    match body {
        Body::Memory(bytes) => {
            let text = std::str::from_utf8(&bytes).map_err(|e| e.to_string())?;
            serde_json::from_str::<IgnoredAny>(text).map_err(|e| e.to_string())?;
            Ok(Body::Memory(bytes))
        }
        Body::Spooled { file, len } => {
            let mut file = file.into_std().await;
            let checked = tokio::task::spawn_blocking(move || {
                file.rewind().map_err(|e| e.to_string())?;
                let reader = BufReader::with_capacity(CHUNK_BYTES, Utf8Checked::new(&mut file));
                serde_json::from_reader::<_, IgnoredAny>(reader).map_err(|e| e.to_string())?;
                file.rewind().map_err(|e| e.to_string())?;
                Ok::<_, String>(file)
            })
            .await
            .map_err(|e| format!("the check stopped: {e}"))??;
            Ok(Body::Spooled {
                file: tokio::fs::File::from_std(checked),
                len,
            })
        }
    }
}

/// Passes bytes through, failing at the first one that is not part of valid UTF-8 (serde_json
/// does not check the strings it skips when reading from an `io::Read`).
struct Utf8Checked<R> {
    inner: R,
    /// Bytes read but not yet checked: the start of a character cut by a read boundary.
    unchecked: Vec<u8>,
    /// Bytes checked so far.
    offset: u64,
}

impl<R> Utf8Checked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            unchecked: Vec::new(),
            offset: 0,
        }
    }
}

impl<R: Read> Read for Utf8Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let invalid = |at: u64| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid UTF-8 at byte {at}"),
            )
        };
        let n = self.inner.read(buf)?;
        if n == 0 {
            return match self.unchecked.is_empty() {
                true => Ok(0),
                false => Err(invalid(self.offset)),
            };
        }
        self.unchecked.extend_from_slice(&buf[..n]);
        let valid = match std::str::from_utf8(&self.unchecked) {
            Ok(_) => self.unchecked.len(),
            // Cut inside a character: the rest comes with the next read.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => return Err(invalid(self.offset + e.valid_up_to() as u64)),
        };
        self.offset += valid as u64;
        self.unchecked.drain(..valid);
        Ok(n)
    }
}

/// The target of `rel="next"` in one `Link` header value (RFC 8288), which may hold several
/// comma-separated links.
fn link_rel_next(header: &str) -> Option<String> {
    let mut rest = header;
    while let Some(open) = rest.find('<') {
        let close = open + rest[open..].find('>')?;
        let target = &rest[open + 1..close];
        let params_end = rest[close..].find('<').map_or(rest.len(), |i| close + i);
        let params = &rest[close + 1..params_end];
        let is_next = params.split(';').any(|p| {
            let p = p.trim().trim_end_matches(',').trim();
            p.strip_prefix("rel=").is_some_and(|v| {
                v.trim_matches('"')
                    .split_ascii_whitespace()
                    .any(|r| r.eq_ignore_ascii_case("next"))
            })
        });
        if is_next {
            return Some(target.to_owned());
        }
        rest = &rest[params_end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_yield_the_next_target_only() {
        let header =
            r#"<https://a.test/x?page=1>; rel="prev", <https://a.test/x?page=3>; rel="next""#;
        assert_eq!(
            link_rel_next(header).as_deref(),
            Some("https://a.test/x?page=3")
        );
        assert_eq!(
            link_rel_next(r#"</p2>; rel="last next""#).as_deref(),
            Some("/p2")
        );
        assert_eq!(link_rel_next(r#"<https://a.test/x>; rel="prev""#), None);
    }

    /// Reads `bytes` through the checker `chunk` bytes per inner read.
    fn check(bytes: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        Utf8Checked::new(Trickle(bytes, chunk)).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn utf8_is_checked_across_read_boundaries() {
        let text = "{\"k\": \"é€😀\"}".as_bytes();
        for chunk in 1..6 {
            assert_eq!(check(text, chunk).unwrap(), text, "chunks of {chunk}");
        }
        let bad = b"{\"k\": \"\xff\"}";
        assert_eq!(
            check(bad, 3).unwrap_err().to_string(),
            "invalid UTF-8 at byte 7"
        );
        let cut = "\"é".as_bytes();
        assert!(check(&cut[..2], 1).is_err(), "a character cut by the end");
    }

    #[tokio::test]
    async fn a_spooled_body_is_checked_and_read_back_from_its_start() {
        let json = format!("[{}1]", "1, ".repeat(1000));
        let spooled = || async {
            let mut file = tokio::fs::File::from_std(tempfile::tempfile().unwrap());
            tokio::io::AsyncWriteExt::write_all(&mut file, json.as_bytes())
                .await
                .unwrap();
            Body::Spooled {
                file,
                len: json.len() as u64,
            }
        };
        let body = check_json(spooled().await).await.unwrap();
        let mut chunks = Page {
            body,
            link_next: None,
        }
        .chunks();
        let mut back = Vec::new();
        while let Some(chunk) = chunks.next().await.unwrap() {
            back.extend_from_slice(chunk);
        }
        assert_eq!(back, json.as_bytes());

        let mut file = tokio::fs::File::from_std(tempfile::tempfile().unwrap());
        tokio::io::AsyncWriteExt::write_all(&mut file, b"[1, 2")
            .await
            .unwrap();
        let truncated = Body::Spooled { file, len: 5 };
        let error = check_json(truncated).await.err().unwrap();
        assert!(error.contains("EOF"), "{error}");
    }
}
