//! HTTP metrics of the query API: requests by route, method and status, and latency by route.
//! Every label is bounded: routes are the API's own path templates and methods the standard
//! ones, anything else `other`, so a scanner cannot blow up the number of series.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use etl_shared::metrics::PoolGauges;
use etl_shared::Pool;
use poem::web::Data;
use poem::{handler, Endpoint, EndpointExt, IntoResponse, Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

const ROUTES: [&str; 14] = [
    "/data",
    "/data/export",
    "/runs",
    "/rejects",
    "/stats",
    "/health",
    "/health/live",
    "/health/ready",
    "/openapi.json",
    "/openapi.yaml",
    "/metrics",
    "/docs",
    "/console",
    "/sources/{source}/{action}",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone)]
pub struct HttpMetrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    pool: PoolGauges,
    /// The same two as OpenTelemetry instruments, exported over OTLP when that is on.
    otel_requests: opentelemetry::metrics::Counter<u64>,
    otel_latency: opentelemetry::metrics::Histogram<f64>,
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl HttpMetrics {
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let mut registry = Registry::default();
        registry.register(
            "etl_http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        registry.register(
            "etl_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            latency.clone(),
        );
        let pool = PoolGauges::default();
        pool.register(&mut registry);
        let meter = opentelemetry::global::meter("etl");
        Self {
            registry: Arc::new(Mutex::new(registry)),
            requests,
            latency,
            pool,
            otel_requests: meter
                .u64_counter("etl_http_requests")
                .with_description("HTTP requests answered, by route, method and status")
                .build(),
            otel_latency: meter
                .f64_histogram("etl_http_request_duration")
                .with_unit("s")
                .with_description("Time to answer an HTTP request, by route")
                .build(),
        }
    }

    /// Wraps the whole app so every answer, errors included, is counted.
    pub fn wrap(&self, app: impl Endpoint + 'static) -> impl Endpoint<Output = Response> {
        let metrics = self.clone();
        app.around(move |ep, req: Request| {
            let metrics = metrics.clone();
            async move {
                let started = Instant::now();
                let route = route_of(req.uri().path());
                let method = method_of(req.method());
                let response = match ep.call(req).await {
                    Ok(r) => r.into_response(),
                    Err(e) => e.into_response(),
                };
                metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        route,
                        method,
                        status: response.status().as_u16(),
                    })
                    .inc();
                let seconds = started.elapsed().as_secs_f64();
                metrics
                    .latency
                    .get_or_create(&RouteLabels { route })
                    .observe(seconds);
                let route_attribute = opentelemetry::KeyValue::new("route", route);
                metrics.otel_requests.add(
                    1,
                    &[
                        route_attribute.clone(),
                        opentelemetry::KeyValue::new("method", method),
                        opentelemetry::KeyValue::new(
                            "status",
                            i64::from(response.status().as_u16()),
                        ),
                    ],
                );
                metrics.otel_latency.record(seconds, &[route_attribute]);
                Ok(response)
            }
        })
    }
}

/// The route template `path` belongs to, or `other`.
pub fn route_of(path: &str) -> &'static str {
    let path = path.trim_end_matches('/');
    if path.starts_with("/docs") {
        return "/docs";
    }
    if path == "/console" || path.starts_with("/console/") {
        return "/console";
    }
    if let Some(rest) = path.strip_prefix("/sources/") {
        // `/sources/{source}/{action}`, the console's actions.
        if matches!(rest.split_once('/'), Some((s, a)) if !s.is_empty() && matches!(a, "run" | "replay"))
        {
            return "/sources/{source}/{action}";
        }
    }
    if let Some(key) = path.strip_prefix("/data/") {
        // `/data/{source}/{source_id}`: two non-empty segments (a `/` in an id is `%2F`).
        if matches!(key.split_once('/'), Some((s, id)) if !s.is_empty() && !id.is_empty() && !id.contains('/'))
        {
            return "/data/{source}/{source_id}";
        }
    }
    ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("other")
}

/// The method's name when it is one of HTTP's own, else `other`.
pub fn method_of(method: &poem::http::Method) -> &'static str {
    use poem::http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::TRACE,
        Method::CONNECT,
    ]
    .iter()
    .find(|m| *m == method)
    .map_or("other", Method::as_str)
}

#[handler]
pub fn endpoint(Data(metrics): Data<&HttpMetrics>, Data(pool): Data<&Pool>) -> Response {
    metrics.pool.update(pool);
    etl_shared::metrics::exposition(&metrics.registry)
}
