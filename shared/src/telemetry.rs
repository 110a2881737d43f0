//! Logs and traces, set up the same way for every service.
//!
//! - Logs go to stderr, human-readable by default or one JSON object per line with
//!   `LOG_FORMAT=json`; the level comes from `RUST_LOG` (default `info`), which filters the
//!   logs only: operators quiet the logs without losing traces.
//! - Traces carry every span at `info` and above, whatever `RUST_LOG` says; which traces are
//!   kept is the standard sampler's choice (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`;
//!   default `parentbased_always_on`), and an unknown sampler or a bad ratio stops the start.
//! - Traces and metrics are exported over OTLP/HTTP when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with the protocol from
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or `http/json`). The resource
//!   says which service (`OTEL_SERVICE_NAME`, default `etl-<service>`), version and instance.
//!   Without an endpoint nothing is started, and one line says so.
//! - [`Telemetry::shutdown`] flushes the spans still queued and the last metrics.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{ConfigError, Env};

/// What [`init`] started; keep it for the life of the process and call `shutdown` at the end.
#[must_use = "call shutdown() before exiting so queued spans are exported"]
pub struct Telemetry {
    providers: Option<(SdkTracerProvider, SdkMeterProvider)>,
}

impl Telemetry {
    /// Exports what is still queued (bounded: a collector that is down costs at most 5 s each).
    pub fn shutdown(self) {
        if let Some((traces, metrics)) = self.providers {
            if let Err(e) = traces.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("could not flush the last traces: {e}");
            }
            if let Err(e) = metrics.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("could not export the last metrics: {e}");
            }
        }
    }
}

const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Installs logging (and trace export when configured) for `service` (`"ingester"`, …). Must be
/// called inside the tokio runtime when export is on: exports run on it. In tests, where a
/// subscriber may already be installed, later calls only log nothing and export nothing.
pub fn init(service: &'static str) -> Result<Telemetry, ConfigError> {
    let env = Env::from_process();
    let json = match env.get("LOG_FORMAT")?.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            return Err(ConfigError::Invalid {
                var: "LOG_FORMAT".into(),
                reason: format!("{other:?} is neither text nor json"),
            })
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let sampler = sampler(&env)?;
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    }
    .with_filter(filter);
    let mut endpoint = None;
    for var in ENDPOINT_VARS {
        endpoint = endpoint.or(env.get(var)?);
    }
    let exporter = endpoint
        .as_ref()
        .map(|_| build_providers(service, &env, sampler));
    let (providers, export_error) = match exporter {
        Some(Ok(providers)) => (Some(providers), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let traces = providers.as_ref().map(|(traces, _)| {
        tracing_opentelemetry::layer()
            .with_tracer(traces.tracer(format!("etl-{service}")))
            .with_filter(LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if installed {
        match (&endpoint, &providers, export_error) {
            (Some(endpoint), Some(_), _) => {
                tracing::info!(service, %endpoint, "exporting traces and metrics over OTLP")
            }
            (Some(_), None, Some(e)) => {
                tracing::error!(service, error = %e, "trace export is configured but could not start; going on without it")
            }
            _ => tracing::info!(
                service,
                "trace export off (OTEL_EXPORTER_OTLP_ENDPOINT is not set)"
            ),
        }
    }
    if installed {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        if let Some((_, metrics)) = &providers {
            // The instruments in `crate::metrics` record through the global meter.
            opentelemetry::global::set_meter_provider(metrics.clone());
        }
    }
    Ok(Telemetry {
        providers: providers.filter(|_| installed),
    })
}

/// The sampler `OTEL_TRACES_SAMPLER` (and `OTEL_TRACES_SAMPLER_ARG`, a ratio from 0 to 1)
/// name, as the OpenTelemetry specification defines them.
fn sampler(env: &Env) -> Result<Sampler, ConfigError> {
    const VAR: &str = "OTEL_TRACES_SAMPLER";
    const ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
    let ratio = || -> Result<f64, ConfigError> {
        let Some(arg) = env.get(ARG)? else {
            return Ok(1.0);
        };
        arg.trim()
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| ConfigError::Invalid {
                var: ARG.into(),
                reason: format!("{arg:?} is not a ratio from 0 to 1"),
            })
    };
    Ok(match env.get(VAR)?.as_deref() {
        None | Some("parentbased_always_on") => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        Some("parentbased_always_off") => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        Some("parentbased_traceidratio") => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        Some("always_on") => Sampler::AlwaysOn,
        Some("always_off") => Sampler::AlwaysOff,
        Some("traceidratio") => Sampler::TraceIdRatioBased(ratio()?),
        Some(other) => {
            return Err(ConfigError::Invalid {
                var: VAR.into(),
                reason: format!(
                    "{other:?} is not one of always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ),
            })
        }
    })
}

fn build_providers(
    service: &str,
    env: &Env,
    sampler: Sampler,
) -> Result<(SdkTracerProvider, SdkMeterProvider), String> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "export needs the tokio runtime".to_owned())?;
    let client = OnTokio {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?,
        runtime,
    };
    let protocol = protocol(env)?;
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client.clone())
        .with_protocol(protocol)
        .build()
        .map_err(|e| e.to_string())?;
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(protocol)
        .build()
        .map_err(|e| e.to_string())?;
    let mut resource = Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()),
    ]);
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(format!("etl-{service}"));
    }
    let resource = resource.build();
    let traces = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_sampler(sampler)
        .with_resource(resource.clone())
        .build();
    // Every OTEL_METRIC_EXPORT_INTERVAL (default 60 s), and once more at shutdown.
    let metrics = SdkMeterProvider::builder()
        .with_periodic_exporter(metrics)
        .with_resource(resource)
        .build();
    Ok((traces, metrics))
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL`: the OTLP default is protobuf (the exporter crate would pick
/// JSON when both are built in).
fn protocol(env: &Env) -> Result<opentelemetry_otlp::Protocol, String> {
    let mut protocol = None;
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        protocol = protocol.or(env.get(var).map_err(|e| e.to_string())?);
    }
    match protocol.as_deref() {
        None | Some("http/protobuf") => Ok(opentelemetry_otlp::Protocol::HttpBinary),
        Some("http/json") => Ok(opentelemetry_otlp::Protocol::HttpJson),
        Some(other) => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported; use http/protobuf or http/json"
        )),
    }
}

/// The OTLP exporter's HTTP client. The batch exporter runs on a thread of its own, outside the
/// tokio runtime, where reqwest's async client cannot run ("no reactor running"); each request
/// is therefore spawned onto the service's runtime and awaited from there.
#[derive(Debug, Clone)]
struct OnTokio {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnTokio {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<bytes::Bytes>,
    ) -> Result<opentelemetry_http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request)?;
        let sent = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        });
        let (status, body) = sent.await??;
        Ok(opentelemetry_http::Response::builder()
            .status(status)
            .body(body)?)
    }
}

/// The W3C `traceparent` of the current span, when it is being exported; stored with the rows a
/// batch writes so whoever reads them later can link back.
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    // The same propagator that reads it back in `link_current_span_to`; it writes nothing for a
    // span that is not exported.
    let mut carrier = std::collections::HashMap::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Links the current span to the span a stored `traceparent` names (the cause of this work,
/// in another trace). Malformed values are ignored: they only cost the link.
pub fn link_current_span_to(traceparent: &str) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        tracing::Span::current().add_link(linked);
    }
}

/// Makes `span` (not yet entered) a child of the caller's, given its request headers (W3C
/// `traceparent`/`tracestate`); without them the span stays a root.
pub fn continue_trace_from(span: &tracing::Span, headers: &poem::http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    let _ = span.set_parent(context);
}
