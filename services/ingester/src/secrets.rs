//! What a source's errors must never show: its header secrets and the credentials in its URL.
//! Errors are scrubbed of them before they are logged, stored in `etl_runs` or served, because
//! an upstream error body may echo what it was sent ("your token … is invalid").

use etl_shared::sources::Source;
use reqwest::header::HeaderMap;
use url::Url;

/// Query values shorter than this are not taken for secrets (`page=2`, `format=csv`): masking
/// them would garble every message that holds the same short text. URLs themselves are shown
/// with every query value masked (`SafeUrl`).
const MIN_QUERY_SECRET_CHARS: usize = 8;

/// Shown in place of a secret.
pub const REDACTED: &str = "[redacted]";

/// The secret strings of one source, longest first (so a secret that contains another is
/// replaced whole).
#[derive(Debug, Clone, Default)]
pub struct Secrets(Vec<String>);

impl Secrets {
    /// The secrets of `source`: each header's value without its prefix (and with it), and the
    /// URL's password and longer query values.
    pub fn of(source: &Source, headers: &HeaderMap) -> Self {
        let mut secrets = Vec::new();
        for (name, from) in &source.headers {
            let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            secrets.push(value.to_owned());
            if let Some(secret) = value.strip_prefix(from.prefix.as_str()) {
                secrets.push(secret.to_owned());
            }
        }
        if let Ok(url) = Url::parse(&source.url) {
            secrets.extend(url.password().map(str::to_owned));
            for (_, value) in url.query_pairs() {
                if value.chars().count() >= MIN_QUERY_SECRET_CHARS {
                    secrets.push(value.into_owned());
                }
            }
        }
        // A secret as a URL or a JSON string would carry it, should the upstream echo it so.
        let encoded: Vec<String> = secrets
            .iter()
            .flat_map(|s| {
                [
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>(),
                    serde_json::to_string(s)
                        .unwrap_or_default()
                        .trim_matches('"')
                        .to_owned(),
                ]
            })
            .collect();
        secrets.extend(encoded);
        secrets.retain(|s| !s.trim().is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self(secrets)
    }

    /// `text` with every secret replaced by [`REDACTED`].
    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.0 {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), REDACTED);
            }
        }
        text
    }
}

/// The start of an upstream body as an error may quote it: control characters (a terminal's
/// escapes, newlines that would forge log lines) become spaces, runs of white space one, and
/// at most `max_chars` characters are kept.
pub fn snippet(body: &str, max_chars: usize) -> String {
    let mut shown = String::new();
    let mut kept = 0;
    let mut last_space = true;
    for c in body.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && last_space {
            continue;
        }
        if kept == max_chars {
            shown.push('…');
            return shown.trim_end().to_owned();
        }
        last_space = c == ' ';
        shown.push(c);
        kept += 1;
    }
    shown.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etl_shared::sources::Sources;

    fn source(url: &str) -> Source {
        let toml = format!(
            r#"
[[source]]
name = "s"
kind = "rest"
url = "{url}"
headers.Authorization = {{ env = "T", prefix = "Bearer " }}
mapping = {{ source_id = "/id", name = "/n", value = "/v" }}
"#
        );
        Sources::parse(std::path::Path::new("sources.toml"), &toml)
            .unwrap()
            .sources
            .remove(0)
    }

    #[test]
    fn header_secrets_and_url_credentials_are_redacted_wherever_they_appear() {
        let source = source("https://me:pa55word@api.example/x?api_key=q-secret-123&page=2");
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer tok/en+1".parse().unwrap());
        let secrets = Secrets::of(&source, &headers);
        let text = r#"{"echo":"your token tok/en+1 is invalid", "sent": "tok%2Fen%2B1", "q": "q-secret-123", "p": "pa55word", "page": 2}"#;
        assert_eq!(
            secrets.scrub(text),
            r#"{"echo":"your token [redacted] is invalid", "sent": "[redacted]", "q": "[redacted]", "p": "[redacted]", "page": 2}"#
        );
    }

    #[test]
    fn a_snippet_is_short_and_free_of_control_characters() {
        assert_eq!(snippet("  a\r\n\u{1b}[31mb\tc  ", 10), "a [31mb c");
        assert_eq!(snippet("abcdef", 3), "abc…");
        assert_eq!(snippet("abc", 3), "abc");
        assert_eq!(snippet("", 3), "");
    }
}
