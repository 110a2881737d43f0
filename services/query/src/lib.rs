//! The query service: a read-only HTTP API over `normalized_data` and the pipeline's bookkeeping,
//! described by a generated OpenAPI 3 spec (`/openapi.json`, `/openapi.yaml`) and browsable in
//! Swagger UI (`/docs`, assets bundled in the binary).
//!
//! `main.rs` parses the command line; [`Application`] is what tests and the binary start.

pub mod access;
mod actions;
mod api;
mod caching;
mod compression;
mod console;
pub mod data;
mod export;
pub mod history;
mod metrics;
pub mod problem;
pub mod reader;
mod spec;
mod sql;
pub mod stats;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use etl_shared::config::{ConfigError, DatabaseSettings, Env};
use poem::listener::{AcceptorExt, BoxAcceptor, TcpAcceptor};
use poem::middleware::Cors;
use poem::{get, Endpoint, EndpointExt, IntoResponse, Response, Route, Server};
use poem_openapi::OpenApiService;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::metrics::HttpMetrics;
use crate::stats::StatsCache;
use etl_shared::problem::{Problem, ProblemCode};
use tracing::Instrument;

/// Everything the query service reads from its environment, validated at start-up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseSettings,
    /// Where the API is served.
    pub addr: SocketAddr,
    /// Origins allowed to call the API from a browser. Empty: no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// Postgres cancels any statement running longer, so a pathological query cannot pile up.
    pub statement_timeout: Duration,
    /// A request not answered by then gets a 503 problem.
    pub request_timeout: Duration,
    /// How stale `/stats` may be.
    pub stats_max_age: Duration,
    /// The clients allowed in (`QUERY_API_KEYS_FILE`); `None`: everyone.
    pub api_keys: Option<access::ApiKeys>,
    /// Requests per second per API key (`QUERY_RATE_LIMIT_PER_SECOND`).
    pub rate_limit_per_second: Option<u32>,
    /// HTTPS instead of HTTP (`QUERY_TLS_CERT_FILE` and `QUERY_TLS_KEY_FILE`).
    pub tls: Option<tls::TlsFiles>,
}

impl Settings {
    /// Reads `DATABASE_*`, `QUERY_ADDR` (default `0.0.0.0:8080`), `QUERY_CORS_ORIGINS`
    /// (comma-separated), `QUERY_STATEMENT_TIMEOUT_MS` (10–600000, default 5000),
    /// `QUERY_REQUEST_TIMEOUT_SECS` (1–600, default 10), `QUERY_STATS_MAX_AGE_SECS` (0–3600,
    /// default 5), `QUERY_API_KEYS_FILE` (a path; unset: no keys needed),
    /// `QUERY_RATE_LIMIT_PER_SECOND` (1–100000, per key; needs the keys file) and
    /// `QUERY_TLS_CERT_FILE` with `QUERY_TLS_KEY_FILE` (both or neither; set: HTTPS only).
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let api_keys = env
            .get("QUERY_API_KEYS_FILE")?
            .map(|path| access::ApiKeys::load(std::path::Path::new(&path)))
            .transpose()
            .map_err(|e| ConfigError::Invalid {
                var: "QUERY_API_KEYS_FILE".into(),
                reason: e.to_string(),
            })?;
        let rate_limit_per_second = match env.get("QUERY_RATE_LIMIT_PER_SECOND")? {
            None => None,
            Some(_) if api_keys.is_none() => {
                return Err(ConfigError::Invalid {
                    var: "QUERY_RATE_LIMIT_PER_SECOND".into(),
                    reason: "it limits each API key: set QUERY_API_KEYS_FILE too".into(),
                })
            }
            Some(_) => {
                Some(env.parse_in_range("QUERY_RATE_LIMIT_PER_SECOND", 1..=100_000, 1)? as u32)
            }
        };
        let cors_origins = env
            .get("QUERY_CORS_ORIGINS")?
            .map(|list| {
                list.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for origin in &cors_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) || origin == "*" {
                return Err(ConfigError::Invalid {
                    var: "QUERY_CORS_ORIGINS".into(),
                    reason: format!("{origin:?} is not an origin like https://app.example.com"),
                });
            }
        }
        Ok(Self {
            database: DatabaseSettings::from_env(env)?,
            addr: env
                .parse("QUERY_ADDR")?
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            cors_origins,
            statement_timeout: Duration::from_millis(env.parse_in_range(
                "QUERY_STATEMENT_TIMEOUT_MS",
                10..=600_000,
                5_000,
            )?),
            request_timeout: Duration::from_secs(env.parse_in_range(
                "QUERY_REQUEST_TIMEOUT_SECS",
                1..=600,
                10,
            )?),
            stats_max_age: Duration::from_secs(env.parse_in_range(
                "QUERY_STATS_MAX_AGE_SECS",
                0..=3600,
                5,
            )?),
            api_keys,
            rate_limit_per_second,
            tls: tls::TlsFiles::from_env(env)?,
        })
    }
}

/// The OpenAPI service: the API and its spec. The spec does not depend on settings or the
/// database, so it can be produced without either (see [`openapi_json`]).
fn openapi(api: Api) -> OpenApiService<Api, ()> {
    OpenApiService::new(api, "ETL platform query API", env!("CARGO_PKG_VERSION"))
        .description(
            "Read-only access to the normalized records of every source, and to the pipeline's \
             statistics. Errors are RFC 9457 problem details with a stable `code`.",
        )
        .server("/")
}

/// The spec as served at `/openapi.json`.
pub fn openapi_json() -> String {
    let spec = spec::document(&openapi_generated());
    serde_json::to_string_pretty(&spec).expect("a JSON value serializes")
}

/// The spec as poem-openapi derives it, before [`spec::document`] completes it.
fn openapi_generated() -> String {
    let pool = etl_shared::db::pool(
        &DatabaseSettings::from_url("postgres://spec@localhost/spec").expect("static URL"),
        etl_shared::db::Needs::Transactions,
    )
    .expect("a lazy pool needs no database");
    openapi(Api {
        reader: reader::Reader::new(pool, Duration::ZERO, reader::Sessions::Pooled),
        stats: StatsCache::new(Duration::ZERO),
        exports: export::Exports::default(),
    })
    .spec()
}

pub struct Application {
    acceptor: BoxAcceptor,
    https: bool,
    addr: SocketAddr,
    endpoint: poem::endpoint::BoxEndpoint<'static, Response>,
    shutdown: CancellationToken,
}

impl Application {
    /// Binds the port (0 picks a free one) and builds the routes; nothing is served yet.
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let found =
            etl_shared::db::check_at_start(&settings.database, etl_shared::db::Needs::Transactions)
                .await?;
        // Read-only and the statement timeout: per session or per transaction (see `reader`).
        let sessions = reader::Sessions::from_found(&found);
        let pool = reader::pool(&settings.database, sessions, settings.statement_timeout)?;
        let reader = reader::Reader::new(pool, settings.statement_timeout, sessions);
        let listener = tokio::net::TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.addr))?;
        let addr = listener.local_addr()?;
        let endpoint = routes(&settings, reader);
        let tcp = TcpAcceptor::from_tokio(listener)?;
        let acceptor = match settings.tls.clone() {
            Some(files) => tls::TlsAcceptor::new(tcp, files)
                .context("cannot serve HTTPS (QUERY_TLS_CERT_FILE, QUERY_TLS_KEY_FILE)")?
                .boxed(),
            None => tcp.boxed(),
        };
        Ok(Self {
            acceptor,
            https: settings.tls.is_some(),
            addr,
            endpoint,
            shutdown,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the shutdown token is cancelled, then lets requests in flight finish (up to
    /// 10 seconds).
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let scheme = if self.https { "https" } else { "http" };
        tracing::info!(addr = %self.addr, scheme, "query API listening; Swagger UI at /docs");
        Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(
                self.endpoint,
                self.shutdown.cancelled_owned(),
                Some(Duration::from_secs(10)),
            )
            .await?;
        tracing::info!("query API stopped");
        Ok(())
    }
}

fn routes(
    settings: &Settings,
    reader: reader::Reader,
) -> poem::endpoint::BoxEndpoint<'static, Response> {
    let pool = reader.pool().clone();
    let service = openapi(Api {
        reader,
        stats: StatsCache::new(settings.stats_max_age),
        exports: export::Exports::default(),
    });
    let generated = service.spec();
    let spec = spec::document(&generated);
    let spec_json = serde_json::to_string_pretty(&spec).expect("a JSON value serializes");
    let spec_yaml = serde_yaml::to_string(&spec).expect("a JSON value serializes as YAML");
    // Swagger UI embeds the spec it shows: the completed one in place of the derived one.
    let swagger_ui = service
        .swagger_ui_html()
        .replacen(&generated, &spec_json, 1);
    let metrics = HttpMetrics::new();
    let request_timeout = settings.request_timeout;
    let access = access::Access::new(settings.api_keys.clone(), settings.rate_limit_per_second);
    let app = Route::new()
        .at(
            "/openapi.json",
            get(text_endpoint("application/json", spec_json)),
        )
        .at(
            "/openapi.yaml",
            get(text_endpoint("application/yaml", spec_yaml)),
        )
        .nest(
            "/docs",
            Route::new().at(
                "/",
                get(text_endpoint("text/html; charset=utf-8", swagger_ui)),
            ),
        )
        .nest("/console", console::routes(settings.api_keys.is_some()))
        .at(
            "/metrics",
            get(metrics::endpoint)
                .data(metrics.clone())
                .data(pool.clone()),
        )
        .nest("/", service)
        .around(move |ep, req| {
            let access = access.clone();
            async move { access.check(ep, req).await }
        })
        .around(move |ep, req| {
            // One span per request, continuing the caller's trace (W3C traceparent).
            let span = tracing::info_span!(
                "HTTP request",
                otel.name = %format!(
                    "{} {}",
                    metrics::method_of(req.method()),
                    metrics::route_of(req.uri().path())
                ),
                http.request.method = %req.method(),
                url.path = %req.uri().path(),
                client = tracing::field::Empty,
            );
            etl_shared::telemetry::continue_trace_from(&span, req.headers());
            async move {
                match tokio::time::timeout(request_timeout, ep.call(req)).await {
                    Ok(result) => result.map(IntoResponse::into_response),
                    Err(_) => Ok(Problem::new(
                        poem::http::StatusCode::SERVICE_UNAVAILABLE,
                        ProblemCode::Timeout,
                        "Request timed out",
                        format!("no answer within {} s", request_timeout.as_secs()),
                    )
                    .into_response()),
                }
            }
            .instrument(span)
        })
        .catch_all_error(|err| async move { Problem::from_error(&err).into_response() })
        .around(|ep, req| async move {
            // RFC 9110 asks a 405 to say what is allowed: the actions take POST, every other
            // resource is read-only.
            let actions = req.uri().path().starts_with("/sources/");
            let mut response = ep.call(req).await?.into_response();
            if response.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED {
                let allowed = if actions { "POST" } else { "GET, HEAD" };
                response.headers_mut().insert(
                    poem::http::header::ALLOW,
                    poem::http::HeaderValue::from_static(allowed),
                );
            }
            Ok(response)
        });
    let app = metrics.wrap(app).around(compression::compress);
    if settings.cors_origins.is_empty() {
        app.boxed()
    } else {
        app.with(
            Cors::new()
                .allow_origins(settings.cors_origins.iter().map(String::as_str))
                .allow_methods([poem::http::Method::GET])
                .expose_headers(["X-Total-Count"]),
        )
        .map_to_response()
        .boxed()
    }
}

/// An endpoint answering `body` as `content_type`, for the spec and Swagger UI.
fn text_endpoint(content_type: &'static str, body: String) -> impl Endpoint<Output = Response> {
    poem::endpoint::make_sync(move |_| {
        Response::builder()
            .content_type(content_type)
            .body(body.clone())
    })
}
