//! Traces over OTLP, received by a collector stand-in started here (OTLP/HTTP with JSON
//! bodies): the ingest run and its batches come from `etl-ingester`, the normalizer's batches
//! from `etl-normalizer` and link to the ingest batch that wrote their rows (the trace context
//! crosses the queue on the raw rows), and a query request continues the caller's W3C trace.
//! Metrics go out over OTLP too, and both whatever `RUST_LOG` says (it filters logs only); the
//! sampler decides what is traced, and idle polls trace nothing. With export off, one log line
//! says so and nothing else is said or started.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etl_tests::{
    service_binary, wait_for, ServiceProcess, SourceToml, SourcesFile, TestDb, TestServer,
};
use poem::web::Data;
use poem::{handler, post, EndpointExt, Route};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// A span as exported: its service, name, ids, parent and links.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    links: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Span>>>);

/// A metric data point as exported: (service, metric, attributes as sorted `k=v`, value).
type Point = (String, String, String, f64);

#[derive(Clone, Default)]
struct Points(Arc<Mutex<Vec<Point>>>);

#[handler]
fn collect_metrics(body: poem::web::Json<Value>, Data(points): Data<&Points>) -> &'static str {
    for resource in body["resourceMetrics"].as_array().into_iter().flatten() {
        let service = resource["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_owned();
        for scope in resource["scopeMetrics"].as_array().into_iter().flatten() {
            for metric in scope["metrics"].as_array().into_iter().flatten() {
                let name = metric["name"].as_str().unwrap_or_default().to_owned();
                for point in metric["sum"]["dataPoints"].as_array().into_iter().flatten() {
                    let mut attributes: Vec<String> = point["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            format!(
                                "{}={}",
                                a["key"].as_str().unwrap_or_default(),
                                a["value"]["stringValue"].as_str().unwrap_or_default()
                            )
                        })
                        .collect();
                    attributes.sort();
                    // int64 is a string in proto3 JSON; accept a number too.
                    let value = match &point["asInt"] {
                        Value::String(s) => s.parse().unwrap_or(f64::NAN),
                        v => v.as_f64().unwrap_or(f64::NAN),
                    };
                    points.0.lock().unwrap().push((
                        service.clone(),
                        name.clone(),
                        attributes.join(","),
                        value,
                    ));
                }
            }
        }
    }
    "{}"
}

#[handler]
fn collect(body: poem::web::Json<Value>, Data(received): Data<&Received>) -> &'static str {
    let str_of = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    for resource_spans in body["resourceSpans"].as_array().into_iter().flatten() {
        let service = resource_spans["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| str_of(&a["value"]["stringValue"]))
            .unwrap_or_default();
        for scope in resource_spans["scopeSpans"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for span in scope["spans"].as_array().into_iter().flatten() {
                received.0.lock().unwrap().push(Span {
                    service: service.clone(),
                    name: str_of(&span["name"]),
                    trace_id: str_of(&span["traceId"]),
                    span_id: str_of(&span["spanId"]),
                    parent_span_id: str_of(&span["parentSpanId"]),
                    links: span["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| (str_of(&l["traceId"]), str_of(&l["spanId"])))
                        .collect(),
                });
            }
        }
    }
    "{}"
}

/// A collector stand-in: OTLP/HTTP JSON bodies in, the spans and metric points it received.
async fn collector() -> (TestServer, Received, Points) {
    let (received, points) = (Received::default(), Points::default());
    let server = TestServer::start(
        Route::new()
            .at("/v1/traces", post(collect).data(received.clone()))
            .at("/v1/metrics", post(collect_metrics).data(points.clone())),
    )
    .await;
    (server, received, points)
}

fn otel_env(collector: &TestServer) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url("")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".to_owned()),
    ]
}

/// Run at `RUST_LOG=warn`, the level operators set to quiet the logs: the spans and metrics
/// arrive all the same, and the normalizer's idle sources (each polled at its start) export
/// no span.
#[tokio::test]
async fn at_log_level_warn_spans_and_metrics_arrive_and_the_normalizer_batch_links_to_the_ingest_batch(
) {
    let db = TestDb::new().await;
    let (collector, received, points) = collector().await;
    let source = TestServer::serving(
        "/rows.csv",
        "id,name,value
1,one,1
2,two,2
3,three,3
",
    )
    .await;
    let mut declared = vec![SourceToml::csv("rows", &source.url("/rows.csv"))];
    for idle in ["idle_a", "idle_b", "idle_c", "idle_d"] {
        declared.push(SourceToml::csv(idle, &source.url("/never-fetched.csv")));
    }
    let sources = SourcesFile::of(&declared);
    let mut env = otel_env(&collector);
    env.push(("DATABASE_URL", db.url.clone()));
    env.push(("SOURCES_FILE", sources.env_value()));
    env.push(("RUST_LOG", "warn".to_owned()));

    // The one-shot ingest exits, flushing its spans on the way out.
    let ingest = tokio::process::Command::new(service_binary("etl-ingester"))
        .args(["ingest", "--source", "rows"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap();
    assert!(ingest.status.success(), "{ingest:?}");
    let ingest_logs = String::from_utf8_lossy(&ingest.stderr);
    assert!(
        !ingest_logs.contains(" INFO "),
        "RUST_LOG=warn quiets the logs: {ingest_logs}"
    );

    let mut normalizer_env = env.clone();
    normalizer_env.push(("NORMALIZER_ADMIN_ADDR", "127.0.0.1:0".to_owned()));
    let mut normalizer = ServiceProcess::start("etl-normalizer", &normalizer_env);
    let client = db.client().await;
    wait_for("the rows to be normalized", DEADLINE, || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM normalized_data", &[])
            .await
            .unwrap()
            .get(0);
        (n == 3).then_some(())
    })
    .await;
    assert_eq!(
        normalizer.stop().await,
        Some(0),
        "{}",
        normalizer.log_tail()
    );

    let spans = received.0.lock().unwrap().clone();
    let normalizer_runs: i64 = client
        .query_one(
            "SELECT count(*) FROM etl_runs WHERE service = 'normalizer'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let normalizer_run_spans = spans
        .iter()
        .filter(|s| s.service == "etl-normalizer" && s.name == "run_source")
        .count();
    assert_eq!(normalizer_runs, 1, "only `rows` had work");
    assert_eq!(
        normalizer_run_spans, 1,
        "one span per run that found work, none for the idle polls: {spans:#?}"
    );
    let ingest_batch = spans
        .iter()
        .find(|s| s.service == "etl-ingester" && s.name == "ingest_batch")
        .unwrap_or_else(|| panic!("an ingest_batch span from etl-ingester: {spans:#?}"));
    let run = spans
        .iter()
        .find(|s| s.service == "etl-ingester" && s.span_id == ingest_batch.parent_span_id)
        .unwrap_or_else(|| panic!("the batch's parent, the run span: {spans:#?}"));
    assert_eq!(run.name, "run_source");
    assert!(
        spans
            .iter()
            .any(|s| s.name == "notify" && s.parent_span_id == ingest_batch.span_id),
        "the NOTIFY is a child of the batch: {spans:#?}"
    );
    let normalize_batch = spans
        .iter()
        .find(|s| {
            s.service == "etl-normalizer" && s.name == "normalize_batch" && !s.links.is_empty()
        })
        .unwrap_or_else(|| panic!("a linked normalize_batch span from etl-normalizer: {spans:#?}"));
    assert_eq!(
        normalize_batch.links,
        [(ingest_batch.trace_id.clone(), ingest_batch.span_id.clone())],
        "the normalizer batch links to the ingest batch that wrote its rows"
    );

    // Metrics went out too, flushed at each exit, with the exact counts.
    let points = points.0.lock().unwrap().clone();
    let value = |service: &str, metric: &str, attributes: &str| {
        points
            .iter()
            .filter(|p| p.0 == service && p.1 == metric && p.2 == attributes)
            .map(|p| p.3)
            .next_back()
            .unwrap_or_else(|| panic!("{service} {metric} {{{attributes}}} in {points:#?}"))
    };
    assert_eq!(
        value("etl-ingester", "etl_ingest_rows_read", "source=rows"),
        3.0
    );
    assert_eq!(
        value(
            "etl-ingester",
            "etl_ingest_rows",
            "outcome=inserted,source=rows"
        ),
        3.0
    );
    assert_eq!(
        value(
            "etl-normalizer",
            "etl_normalize_rows",
            "outcome=inserted,source=rows"
        ),
        3.0
    );
}

#[tokio::test]
async fn a_query_request_continues_the_callers_trace_down_to_its_sql() {
    let db = TestDb::new().await;
    let received = Received::default();
    let collector =
        TestServer::start(Route::new().at("/v1/traces", post(collect).data(received.clone())))
            .await;
    let addr = etl_tests::free_local_addr();
    let mut env = otel_env(&collector);
    env.push(("DATABASE_URL", db.url.clone()));
    env.push(("QUERY_ADDR", addr.to_string()));
    let mut query = ServiceProcess::start("etl-query", &env);
    let (trace_id, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let response = wait_for("the query service", DEADLINE, || async {
        reqwest::Client::new()
            .get(format!("http://{addr}/data?page=1"))
            .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
            .send()
            .await
            .ok()
    })
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(query.stop().await, Some(0), "{}", query.log_tail());

    let spans = received.0.lock().unwrap().clone();
    let request = spans
        .iter()
        .find(|s| s.service == "etl-query" && s.name == "GET /data")
        .unwrap_or_else(|| panic!("a GET /data span from etl-query: {spans:#?}"));
    assert_eq!(request.trace_id, trace_id, "the caller's trace goes on");
    assert_eq!(
        request.parent_span_id, caller_span,
        "under the caller's span"
    );
    let sql: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "db.query" && s.parent_span_id == request.span_id)
        .collect();
    assert_eq!(
        sql.len(),
        2,
        "the count with the data version (its ETag), and the page: {spans:#?}"
    );
}

/// `OTEL_TRACES_SAMPLER` decides what is traced: `always_off` exports no span (metrics still go
/// out), and a sampler the specification does not define stops the start, naming the variable.
#[tokio::test]
async fn the_sampler_decides_what_is_traced_and_a_bad_one_stops_the_start() {
    let db = TestDb::new().await;
    let (collector, received, points) = collector().await;
    let source = TestServer::serving("/rows.csv", "id,name,value\n1,one,1\n").await;
    let sources = SourcesFile::of(&[SourceToml::csv("rows", &source.url("/rows.csv"))]);
    let ingest = |sampler: &'static str, arg: &'static str| {
        let mut command = tokio::process::Command::new(service_binary("etl-ingester"));
        command
            .arg("ingest")
            .envs(otel_env(&collector))
            .env("DATABASE_URL", &db.url)
            .env("SOURCES_FILE", sources.env_value())
            .env("OTEL_TRACES_SAMPLER", sampler)
            .env("OTEL_TRACES_SAMPLER_ARG", arg);
        command
    };

    let off = ingest("always_off", "").output().await.unwrap();
    assert!(off.status.success(), "{off:?}");
    assert_eq!(
        received.0.lock().unwrap().len(),
        0,
        "always_off traces nothing"
    );
    assert!(
        points
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.1 == "etl_ingest_rows_read" && p.3 == 1.0),
        "metrics do not depend on the sampler"
    );

    let ratio_one = ingest("traceidratio", "1").output().await.unwrap();
    assert!(ratio_one.status.success(), "{ratio_one:?}");
    assert!(
        received
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.name == "run_source"),
        "a ratio of 1 traces every run"
    );

    for (sampler, arg, named) in [
        ("sometimes", "", "OTEL_TRACES_SAMPLER"),
        ("traceidratio", "1.5", "OTEL_TRACES_SAMPLER_ARG"),
    ] {
        let bad = ingest(sampler, arg).output().await.unwrap();
        let logs = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success(), "{sampler} {arg}: {logs}");
        assert!(logs.contains(named), "the error names {named}: {logs}");
    }
}

#[tokio::test]
async fn with_export_off_one_line_says_so_and_nothing_more() {
    let db = TestDb::new().await;
    let output = tokio::process::Command::new(service_binary("etl-ingester"))
        .args(["ingest"])
        .env("DATABASE_URL", &db.url)
        .env("SOURCES_FILE", "/nonexistent/sources.toml")
        .env("RUST_LOG", "trace")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .output()
        .await
        .unwrap();
    let logs = String::from_utf8_lossy(&output.stderr).to_lowercase();
    let mentions: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("otlp") || l.contains("opentelemetry") || l.contains("export"))
        .collect();
    assert_eq!(mentions.len(), 1, "{logs}");
    assert!(mentions[0].contains("trace export off"), "{logs}");
}

#[tokio::test]
async fn by_default_spans_go_out_as_protobuf_and_logs_can_be_json() {
    let db = TestDb::new().await;
    let bodies = Arc::new(Mutex::new(Vec::<(String, usize)>::new()));
    let collector = TestServer::start(Route::new().at(
        "/v1/traces",
        post(poem::endpoint::make({
            let bodies = bodies.clone();
            move |req: poem::Request| {
                let bodies = bodies.clone();
                async move {
                    let content_type = req.content_type().unwrap_or_default().to_owned();
                    let body = req.into_body().into_bytes().await.unwrap();
                    bodies.lock().unwrap().push((content_type, body.len()));
                    ""
                }
            }
        })),
    ))
    .await;
    let output = tokio::process::Command::new(service_binary("etl-ingester"))
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url(""))
        .env("LOG_FORMAT", "json")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let logs = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "exporting traces and metrics over OTLP"),
        "{logs}"
    );
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    let bodies = bodies.lock().unwrap().clone();
    assert!(
        bodies
            .iter()
            .any(|(ct, len)| ct == "application/x-protobuf" && *len > 0),
        "the migration's spans arrive as protobuf: {bodies:?}"
    );
}
