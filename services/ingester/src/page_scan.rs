//! Items out of a REST page as it streams by, so no page is ever held whole: the page's bytes
//! are fed in chunks of any size, and each item of the array at `rest.items` comes out on its
//! own, byte for byte as the API sent it, with at most `http.max_record_bytes` of it held. One
//! scalar elsewhere in the page (the next page's URL or cursor) can be kept on the way.
//!
//! The scanner only follows structure (strings, containers, where a value starts and ends): it
//! expects a page already checked to be valid JSON, and only the object keys on the way to a
//! pointer are decoded. Where a key repeats, the first value at a pointer is the one used.

use crate::land::KEPT_PREFIX_BYTES;

/// What the scanner found in the bytes fed so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Scanned {
    /// An item of the array, whole.
    Item { index: u64, bytes: Vec<u8> },
    /// An item over the limit: its length and first bytes.
    Oversized {
        index: u64,
        len: u64,
        prefix: Vec<u8>,
    },
}

/// What the whole page held besides its items.
#[derive(Debug, PartialEq, Eq)]
pub struct PageEnd {
    /// How many items the array had.
    pub items: u64,
    /// The value at the capture pointer, if there was one: its raw JSON when a scalar (an
    /// empty container stands for a container), or its length when over [`MAX_CAPTURE_BYTES`].
    pub captured: Option<Result<Vec<u8>, u64>>,
}

/// Longest value kept at the capture pointer (a next-page URL or cursor).
pub const MAX_CAPTURE_BYTES: usize = 64 * 1024;

/// The streaming scanner (see the module's header).
pub struct PageScanner {
    items: Vec<String>,
    capture: Option<Vec<String>>,
    max_item: usize,
    /// Keys are decoded only this deep: deeper ones cannot be on a pointer's path.
    key_depth: usize,
    state: Lex,
    frames: Vec<Frame>,
    key: Vec<u8>,
    key_too_long: bool,
    recording: Option<Recording>,
    found: Found,
    captured: Option<Result<Vec<u8>, u64>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lex {
    Value,
    /// Just after `[`: a value or `]`.
    ValueOrEnd,
    /// Just after `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object.
    Key,
    InKey {
        escaped: bool,
    },
    Colon,
    InString {
        escaped: bool,
    },
    InScalar,
    AfterValue,
    Done,
}

struct Frame {
    is_array: bool,
    /// The current element's index (arrays).
    index: u64,
    /// The current member's key (objects), `None` when not decoded.
    key: Option<String>,
}

enum Found {
    Nothing,
    NotArray(&'static str),
    /// Inside the item array, which sits at this many open containers (itself included).
    Inside {
        depth: usize,
        items: u64,
    },
    Array {
        items: u64,
    },
}

struct Recording {
    what: Recorded,
    /// Open containers when the value started, so its end is known.
    depth: usize,
    bytes: Vec<u8>,
    len: u64,
    limit: usize,
}

enum Recorded {
    Item(u64),
    Capture,
}

/// Longest key kept for matching; a pointer token is never that long.
const MAX_KEY_BYTES: usize = 1024;

impl PageScanner {
    /// `items` and `capture` are JSON pointers (RFC 6901) from the page's root.
    pub fn new(items: &str, capture: Option<&str>, max_item: u64) -> Self {
        let items = tokens(items);
        let capture = capture.map(tokens);
        let key_depth = items.len().max(capture.as_ref().map_or(0, Vec::len)).max(1);
        Self {
            items,
            capture,
            max_item: usize::try_from(max_item).unwrap_or(usize::MAX),
            key_depth,
            state: Lex::Value,
            frames: Vec::new(),
            key: Vec::new(),
            key_too_long: false,
            recording: None,
            found: Found::Nothing,
            captured: None,
        }
    }

    /// Follows `chunk`, pushing every item it completes onto `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Scanned>) {
        for &b in chunk {
            self.byte(b, out);
        }
    }

    /// After the last chunk: the item count and the captured value, or why there are no items.
    pub fn finish(self, pointer: &str) -> Result<PageEnd, String> {
        let at = if pointer.is_empty() {
            "the top level"
        } else {
            pointer
        };
        match self.found {
            Found::Array { items } => Ok(PageEnd {
                items,
                captured: self.captured,
            }),
            Found::NotArray(kind) => Err(format!(
                "expected an array of items at {at} (rest.items), found {kind}"
            )),
            Found::Nothing | Found::Inside { .. } => {
                Err(format!("no item array at {at} (rest.items)"))
            }
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Scanned>) {
        let whitespace = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        match self.state {
            Lex::Value | Lex::ValueOrEnd if whitespace => self.record(b),
            Lex::ValueOrEnd if b == b']' => self.close(b, out),
            Lex::Value | Lex::ValueOrEnd => {
                self.value_start(b);
                self.record(b);
                match b {
                    b'{' => self.open(false),
                    b'[' => self.open(true),
                    b'"' => self.state = Lex::InString { escaped: false },
                    _ => self.state = Lex::InScalar,
                }
            }
            Lex::KeyOrEnd | Lex::Key if whitespace => self.record(b),
            Lex::KeyOrEnd if b == b'}' => self.close(b, out),
            Lex::KeyOrEnd | Lex::Key => {
                // Valid JSON: this is the key's opening quote.
                self.record(b);
                self.key.clear();
                self.key_too_long = false;
                self.state = Lex::InKey { escaped: false };
            }
            Lex::InKey { escaped } => {
                self.record(b);
                if !escaped && b == b'"' {
                    self.end_key();
                    self.state = Lex::Colon;
                } else {
                    if self.frames.len() <= self.key_depth {
                        if self.key.len() < MAX_KEY_BYTES {
                            self.key.push(b);
                        } else {
                            self.key_too_long = true;
                        }
                    }
                    self.state = Lex::InKey {
                        escaped: !escaped && b == b'\\',
                    };
                }
            }
            Lex::Colon => {
                self.record(b);
                if b == b':' {
                    self.state = Lex::Value;
                }
            }
            Lex::InString { escaped } => {
                self.record(b);
                if !escaped && b == b'"' {
                    self.value_end(out);
                } else {
                    self.state = Lex::InString {
                        escaped: !escaped && b == b'\\',
                    };
                }
            }
            Lex::InScalar => {
                if whitespace || matches!(b, b',' | b']' | b'}') {
                    // The scalar ended on the byte before: this one belongs to what follows.
                    self.value_end(out);
                    self.byte(b, out);
                } else {
                    self.record(b);
                }
            }
            Lex::AfterValue => match b {
                b',' => {
                    self.record(b);
                    let top = self
                        .frames
                        .last_mut()
                        .expect("a comma is inside a container");
                    if top.is_array {
                        top.index += 1;
                        self.state = Lex::Value;
                    } else {
                        self.state = Lex::Key;
                    }
                }
                b']' | b'}' => self.close(b, out),
                _ => self.record(b), // whitespace
            },
            Lex::Done => {} // trailing whitespace
        }
    }

    fn open(&mut self, is_array: bool) {
        self.frames.push(Frame {
            is_array,
            index: 0,
            key: None,
        });
        self.state = if is_array {
            Lex::ValueOrEnd
        } else {
            Lex::KeyOrEnd
        };
    }

    fn close(&mut self, b: u8, out: &mut Vec<Scanned>) {
        self.record(b);
        self.frames.pop();
        if let Found::Inside { depth, items } = self.found {
            if self.frames.len() + 1 == depth {
                self.found = Found::Array { items };
            }
        }
        self.value_end(out);
    }

    fn end_key(&mut self) {
        let decode = self.frames.len() <= self.key_depth && !self.key_too_long;
        let key = decode
            .then(|| {
                let mut quoted = Vec::with_capacity(self.key.len() + 2);
                quoted.push(b'"');
                quoted.extend_from_slice(&self.key);
                quoted.push(b'"');
                serde_json::from_slice::<String>(&quoted).ok()
            })
            .flatten();
        if let Some(top) = self.frames.last_mut() {
            top.key = key;
        }
    }

    /// Whether the value starting now sits at `pointer`.
    fn at(&self, pointer: &[String]) -> bool {
        self.frames.len() == pointer.len()
            && self.frames.iter().zip(pointer).all(|(frame, token)| {
                if frame.is_array {
                    token.parse::<u64>().is_ok_and(|i| i == frame.index)
                } else {
                    frame.key.as_deref() == Some(token.as_str())
                }
            })
    }

    fn value_start(&mut self, first: u8) {
        if self.recording.is_some() {
            return; // a value inside the one being recorded
        }
        let depth = self.frames.len();
        if let Found::Inside { depth: array, .. } = self.found {
            if depth == array {
                let index = self.frames.last().map_or(0, |f| f.index);
                self.start(Recorded::Item(index), self.max_item);
                return;
            }
        }
        if matches!(self.found, Found::Nothing) && self.at(&self.items) {
            self.found = match first {
                b'[' => Found::Inside {
                    depth: depth + 1,
                    items: 0,
                },
                other => Found::NotArray(kind_of(other)),
            };
            return;
        }
        if self.captured.is_none() && self.capture.as_ref().is_some_and(|c| self.at(c)) {
            match first {
                // Not a link or a cursor; it is not followed into (it may hold the items).
                b'{' => self.captured = Some(Ok(b"{}".to_vec())),
                b'[' => self.captured = Some(Ok(b"[]".to_vec())),
                _ => self.start(Recorded::Capture, MAX_CAPTURE_BYTES),
            }
        }
    }

    fn start(&mut self, what: Recorded, limit: usize) {
        self.recording = Some(Recording {
            what,
            depth: self.frames.len(),
            bytes: Vec::new(),
            len: 0,
            limit,
        });
    }

    fn record(&mut self, b: u8) {
        if let Some(recording) = &mut self.recording {
            recording.len += 1;
            if recording.len <= recording.limit as u64 {
                recording.bytes.push(b);
            } else if recording.len == recording.limit as u64 + 1 {
                // Over the limit: keep only the prefix, and give the rest of the memory back.
                recording
                    .bytes
                    .truncate(KEPT_PREFIX_BYTES.min(recording.limit));
                recording.bytes.shrink_to_fit();
            }
        }
    }

    fn value_end(&mut self, out: &mut Vec<Scanned>) {
        let depth = self.frames.len();
        self.state = if depth == 0 {
            Lex::Done
        } else {
            Lex::AfterValue
        };
        let Some(recording) = self.recording.take_if(|r| r.depth == depth) else {
            return;
        };
        let oversized = recording.len > recording.limit as u64;
        match recording.what {
            Recorded::Item(index) => {
                if let Found::Inside { items, .. } = &mut self.found {
                    *items += 1;
                }
                out.push(if oversized {
                    Scanned::Oversized {
                        index,
                        len: recording.len,
                        prefix: recording.bytes,
                    }
                } else {
                    Scanned::Item {
                        index,
                        bytes: recording.bytes,
                    }
                });
            }
            Recorded::Capture => {
                self.captured = Some(if oversized {
                    Err(recording.len)
                } else {
                    Ok(recording.bytes)
                });
            }
        }
    }
}

/// The reference tokens of a JSON pointer (RFC 6901), unescaped.
pub fn tokens(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer[1..]
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// What kind of JSON value starts with `first`, for messages.
pub fn kind_of(first: u8) -> &'static str {
    match first {
        b'{' => "an object",
        b'[' => "an array",
        b'"' => "a string",
        b't' | b'f' => "a boolean",
        b'n' => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The items and the end of `page`, fed `chunk` bytes at a time.
    fn scan(
        page: &str,
        items: &str,
        capture: Option<&str>,
        max_item: u64,
        chunk: usize,
    ) -> (Vec<Scanned>, Result<PageEnd, String>) {
        let mut scanner = PageScanner::new(items, capture, max_item);
        let mut out = Vec::new();
        for piece in page.as_bytes().chunks(chunk) {
            scanner.feed(piece, &mut out);
        }
        (out, scanner.finish(items))
    }

    fn item(index: u64, text: &str) -> Scanned {
        Scanned::Item {
            index,
            bytes: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn items_come_out_byte_for_byte_whatever_the_chunk_size() {
        let page = r#" { "meta": {"x": [1, {"y": "]"}]}, "data" : { "a/b" : [ {"id": 1, "s": "q\"}]"} , 7.50e1,"two",null ,[ ],{ }] } } "#;
        let expected = vec![
            item(0, r#"{"id": 1, "s": "q\"}]"}"#),
            item(1, "7.50e1"),
            item(2, r#""two""#),
            item(3, "null"),
            item(4, "[ ]"),
            item(5, "{ }"),
        ];
        for chunk in [1, 2, 7, page.len()] {
            let (items, end) = scan(page, "/data/a~1b", None, 1 << 20, chunk);
            assert_eq!(items, expected, "chunks of {chunk}");
            assert_eq!(
                end,
                Ok(PageEnd {
                    items: 6,
                    captured: None
                })
            );
        }
    }

    #[test]
    fn a_top_level_array_and_an_empty_one() {
        let (items, end) = scan(r#"[{"id":"a"},{"id":"b"}]"#, "", None, 100, 3);
        assert_eq!(items, [item(0, r#"{"id":"a"}"#), item(1, r#"{"id":"b"}"#)]);
        assert_eq!(end.unwrap().items, 2);
        let (items, end) = scan(r#"{"items": []}"#, "/items", None, 100, 1);
        assert!(items.is_empty());
        assert_eq!(end.unwrap().items, 0);
    }

    #[test]
    fn an_item_over_the_limit_keeps_its_length_and_prefix_and_the_next_one_lands() {
        let big = format!(r#"{{"id":1,"pad":"{}"}}"#, "p".repeat(10_000));
        let page = format!(r#"[{big},{{"id":2}}]"#);
        let (items, _) = scan(&page, "", None, 5_000, 100);
        assert_eq!(
            items,
            [
                Scanned::Oversized {
                    index: 0,
                    len: big.len() as u64,
                    prefix: big.as_bytes()[..KEPT_PREFIX_BYTES].to_vec(),
                },
                item(1, r#"{"id":2}"#),
            ]
        );
    }

    #[test]
    fn a_missing_array_or_another_kind_is_explained() {
        let (_, end) = scan(r#"{"data": {"n": 1}}"#, "/items", None, 100, 4);
        assert_eq!(end.unwrap_err(), "no item array at /items (rest.items)");
        let (_, end) = scan(r#"{"items": {"n": 1}}"#, "/items", None, 100, 4);
        assert_eq!(
            end.unwrap_err(),
            "expected an array of items at /items (rest.items), found an object"
        );
        let (_, end) = scan(r#""text""#, "", None, 100, 4);
        assert_eq!(
            end.unwrap_err(),
            "expected an array of items at the top level (rest.items), found a string"
        );
    }

    #[test]
    fn the_capture_pointer_keeps_one_scalar_before_or_after_the_items() {
        let after = r#"{"items": [{"next": "not this"}], "links": {"next": "http://h/p2?a=1"}}"#;
        let (_, end) = scan(after, "/items", Some("/links/next"), 100, 5);
        assert_eq!(
            end.unwrap().captured,
            Some(Ok(br#""http://h/p2?a=1""#.to_vec()))
        );
        let before = r#"{"cursor": 42, "items": [1]}"#;
        let (_, end) = scan(before, "/items", Some("/cursor"), 100, 5);
        assert_eq!(end.unwrap().captured, Some(Ok(b"42".to_vec())));
        let (_, end) = scan(
            r#"{"n": {"a": 1}, "items": []}"#,
            "/items",
            Some("/n"),
            100,
            5,
        );
        assert_eq!(end.unwrap().captured, Some(Ok(b"{}".to_vec())));
        let huge = format!(
            r#"{{"n": "{}", "items": []}}"#,
            "x".repeat(MAX_CAPTURE_BYTES)
        );
        let (_, end) = scan(&huge, "/items", Some("/n"), 100, 1000);
        assert_eq!(
            end.unwrap().captured,
            Some(Err(MAX_CAPTURE_BYTES as u64 + 2))
        );
        let (_, end) = scan(r#"{"items": []}"#, "/items", Some("/next"), 100, 5);
        assert_eq!(end.unwrap().captured, None);
    }

    #[test]
    fn array_indexes_and_escaped_keys_are_followed_and_the_first_of_repeated_keys_wins() {
        let page =
            r#"{"pages": [{"items": [0]}, {"it\u0065ms": [1, 2]}], "pages": [{"items": [9]}]}"#;
        let (items, end) = scan(page, "/pages/1/items", None, 100, 3);
        assert_eq!(items, [item(0, "1"), item(1, "2")]);
        assert_eq!(end.unwrap().items, 2);
    }
}
