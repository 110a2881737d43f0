//! Optional access control: API keys and a per-key rate limit.
//!
//! With `QUERY_API_KEYS_FILE` set, every request but the probes, the spec, Swagger UI and
//! `/metrics` needs `Authorization: Bearer <key>` with one of the file's keys; without one it
//! gets a 401 problem with `WWW-Authenticate`. The file holds each key's SHA-256 and its
//! client's name, never the key itself (`etl-query api-key <name>` makes a key and its entry):
//! keys are 256 random bits, so a plain digest is as hard to reverse as the key is to guess.
//!
//! With `QUERY_RATE_LIMIT_PER_SECOND` set too, each key may make that many requests per second
//! (bursts of up to one second's worth); beyond, a 429 problem with `Retry-After`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use etl_shared::bearer;
use etl_shared::problem::{Problem, ProblemCode};
use poem::http::{header, HeaderValue, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};
use serde::Deserialize;

/// Where requests pass without a key: what probes, scrapers and spec readers call.
fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/health"
            | "/health/live"
            | "/health/ready"
            | "/openapi.json"
            | "/openapi.yaml"
            | "/metrics"
    ) || path == "/docs"
        || path.starts_with("/docs/")
        || path == "/console"
        || path.starts_with("/console/")
}

/// The clients allowed in, by the SHA-256 of their key.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    names: HashMap<[u8; 32], Caller>,
}

/// Who sent a request, as its key says; put in the request's extensions for the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
    /// May ask for actions (the console's "run now" and "replay"): `admin = true` in the file.
    pub admin: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a keys file: {reason}")]
    Invalid { path: String, reason: String },
}

/// The file's shape: `[[keys]]` tables of `name`, `sha256` (64 hex digits) and optionally
/// `admin = true`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    sha256: String,
    #[serde(default)]
    admin: bool,
}

impl ApiKeys {
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| KeysError::Invalid {
            path: shown,
            reason,
        })
    }

    fn parse(text: &str) -> Result<Self, String> {
        let file: KeysFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.keys.is_empty() {
            return Err("it lists no [[keys]]: nobody could call the API".into());
        }
        let mut names = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for entry in file.keys {
            let name = entry.name.trim();
            if name.is_empty() || !seen.insert(name.to_owned()) {
                return Err(format!("key name {:?} is empty or repeated", entry.name));
            }
            let digest = decode_sha256(&entry.sha256)
                .ok_or_else(|| format!("the sha256 of key {name:?} is not 64 hex digits"))?;
            let caller = Caller {
                name: Arc::from(name),
                admin: entry.admin,
            };
            if names.insert(digest, caller).is_some() {
                return Err(format!("key {name:?} has the same sha256 as another"));
            }
        }
        Ok(Self { names })
    }

    /// The client whose key this is.
    fn client_of(&self, key: &str) -> Option<&Caller> {
        self.names.get(&sha256(key.as_bytes()))
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// A new key for client `name` (allowed the console's actions when `admin`), and its entry for
/// the keys file.
pub fn new_key(name: &str, admin: bool) -> (String, String) {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut secret = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .expect("the system's random source works");
    let key = format!(
        "etlq_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let digest: String = sha256(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let entry = format!(
        "[[keys]]\nname = {}\nsha256 = \"{digest}\"\n{}",
        toml_string(name),
        if admin { "admin = true\n" } else { "" }
    );
    (key, entry)
}

/// `text` as a TOML basic string: JSON's escapes are a subset of TOML's.
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// Requests per second per key, refilled continuously, with bursts of one second's worth.
#[derive(Debug)]
struct RateLimit {
    per_second: f64,
    buckets: Mutex<HashMap<Arc<str>, (f64, Instant)>>,
}

impl RateLimit {
    /// `Ok` to serve a request of `client` now, or the whole seconds until one would be.
    fn take(&self, client: &Arc<str>) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("never held across a panic");
        let (tokens, at) = buckets
            .entry(client.clone())
            .or_insert((self.per_second, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second)
            .min(self.per_second);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }
}

/// What the service checks before a request reaches the API: nothing without keys.
#[derive(Debug, Clone)]
pub struct Access {
    keys: Option<ApiKeys>,
    limit: Option<Arc<RateLimit>>,
}

impl Access {
    pub fn new(keys: Option<ApiKeys>, rate_limit_per_second: Option<u32>) -> Self {
        Self {
            keys,
            limit: rate_limit_per_second.map(|per_second| {
                Arc::new(RateLimit {
                    per_second: f64::from(per_second),
                    buckets: Mutex::default(),
                })
            }),
        }
    }

    /// Calls `ep` if the request may pass; else the 401 or 429 problem.
    pub async fn check<E: Endpoint>(&self, ep: E, mut req: Request) -> poem::Result<Response> {
        let Some(keys) = self.keys.as_ref().filter(|_| !is_open(req.uri().path())) else {
            return ep.call(req).await.map(IntoResponse::into_response);
        };
        let presented = bearer::credential(req.headers());
        let caller = match presented.map(|key| keys.client_of(key)) {
            None => {
                return Ok(bearer::unauthorized(
                    "Bearer realm=\"etl-query\"",
                    "send an API key as `Authorization: Bearer <key>`",
                ))
            }
            Some(None) => {
                return Ok(bearer::unauthorized(
                    "Bearer realm=\"etl-query\", error=\"invalid_token\"",
                    "the API key is not one of this service's",
                ))
            }
            Some(Some(caller)) => caller.clone(),
        };
        tracing::Span::current().record("client", &*caller.name);
        if let Some(limit) = &self.limit {
            if let Err(retry_after) = limit.take(&caller.name) {
                let mut response = Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    ProblemCode::RateLimited,
                    "Rate limit",
                    format!(
                        "this key may make {} requests per second; try again in {retry_after} s",
                        limit.per_second
                    ),
                )
                .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                return Ok(response);
            }
        }
        req.extensions_mut().insert(caller);
        ep.call(req).await.map(IntoResponse::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_keys_entry_lets_its_key_in_and_nothing_else() {
        let (key, entry) = new_key("dash \"board\"", false);
        let (admin_key, admin_entry) = new_key("ops", true);
        let keys = ApiKeys::parse(&format!("{entry}{admin_entry}")).unwrap();
        let caller = keys.client_of(&key).unwrap();
        assert_eq!((&*caller.name, caller.admin), ("dash \"board\"", false));
        let admin = keys.client_of(&admin_key).unwrap();
        assert_eq!((&*admin.name, admin.admin), ("ops", true));
        assert!(keys.client_of("etlq_guess").is_none());
        assert!(keys.client_of(&key[..key.len() - 1]).is_none());
    }

    #[test]
    fn malformed_keys_files_are_refused_with_the_reason() {
        let sha = "a".repeat(64);
        for (text, reason) in [
            ("", "missing field `keys`"),
            ("keys = []", "no [[keys]]"),
            ("[[keys]]\nname = \"a\"\nsha256 = \"abc\"", "not 64 hex digits"),
            (
                &format!("[[keys]]\nname = \"a\"\nsha256 = \"{sha}\"\n[[keys]]\nname = \"a\"\nsha256 = \"{}\"", "b".repeat(64)),
                "empty or repeated",
            ),
            (
                &format!("[[keys]]\nname = \"a\"\nsha256 = \"{sha}\"\n[[keys]]\nname = \"b\"\nsha256 = \"{sha}\""),
                "same sha256",
            ),
            (&format!("[[keys]]\nname = \"a\"\nkey = \"{sha}\""), "unknown field"),
        ] {
            let error = ApiKeys::parse(text).unwrap_err();
            assert!(error.contains(reason), "{text:?}: {error}");
        }
    }

    #[test]
    fn a_key_gets_a_seconds_worth_at_once_then_waits() {
        let limit = RateLimit {
            per_second: 3.0,
            buckets: Mutex::default(),
        };
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert_eq!(
            (0..4).map(|_| limit.take(&a).is_ok()).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(limit.take(&a), Err(1));
        assert!(limit.take(&b).is_ok(), "each key has its own");
    }

    #[test]
    fn probes_spec_and_metrics_are_open_and_data_is_not() {
        for open in [
            "/health",
            "/health/live",
            "/openapi.json",
            "/docs",
            "/docs/",
            "/metrics",
        ] {
            assert!(is_open(open), "{open}");
        }
        for closed in [
            "/data",
            "/data/export",
            "/stats",
            "/runs",
            "/rejects",
            "/docsx",
            "/health/x",
        ] {
            assert!(!is_open(closed), "{closed}");
        }
    }
}
