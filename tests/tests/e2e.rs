//! The whole system end to end: the three real binaries as separate processes against one
//! Postgres, fed by source servers over HTTP. Rows flow through to `GET /data`, `/stats` reports
//! the runs, a normalizer killed with SIGKILL in the middle of a large backlog is restarted and
//! the result is exact, and SIGTERM stops every service cleanly.

use std::time::Duration;

use etl_tests::{wait_for, ServiceProcess as Service, SourceToml, SourcesFile, TestDb, TestServer};
use poem::{endpoint::make_sync, Request, Response, Route};
use serde_json::{json, Value};

const BIG: usize = 60_000;
const DEADLINE: Duration = Duration::from_secs(120);

async fn sources_server() -> TestServer {
    let products: Vec<Value> = (1..=150)
        .map(|i| json!({ "id": format!("p{i}"), "title": format!("product {i}"), "price": i as f64 + 0.5 }))
        .collect();
    let mut sensors = String::from("id,name,value\n");
    for i in 1..=500 {
        sensors.push_str(&format!("s{i},sensor {i},{i}\n"));
    }
    let mut big = String::from("id,name,value\n");
    for i in 1..=BIG {
        big.push_str(&format!("b{i},bulk row {i},{}\n", i % 1000));
    }
    TestServer::start(
        Route::new()
            .at(
                "/products",
                make_sync(move |req: Request| {
                    let page: usize = req
                        .uri()
                        .query()
                        .and_then(|q| q.strip_prefix("page="))
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(1);
                    let start = ((page - 1) * 100).min(products.len());
                    let end = (start + 100).min(products.len());
                    Response::builder()
                        .content_type("application/json")
                        .body(json!({ "items": &products[start..end] }).to_string())
                }),
            )
            .at(
                "/sensors.csv",
                make_sync(move |_| Response::builder().body(sensors.clone())),
            )
            .at(
                "/big.csv",
                make_sync(move |_| Response::builder().body(big.clone())),
            ),
    )
    .await
}

/// The JSON at `url`, or `Null` while the service is not answering yet.
async fn get_json(url: &str) -> Value {
    match reqwest::get(url).await {
        Ok(response) => {
            serde_json::from_str(&response.text().await.unwrap_or_default()).unwrap_or(Value::Null)
        }
        Err(_) => Value::Null,
    }
}

#[tokio::test]
async fn the_three_services_move_rows_end_to_end_survive_a_sigkill_and_stop_on_sigterm() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE apply_log (source text, source_id text);
             CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO apply_log VALUES (NEW.source, NEW.source_id); RETURN NEW; END $$;
             CREATE TRIGGER log_apply AFTER INSERT OR UPDATE ON normalized_data
                 FOR EACH ROW EXECUTE FUNCTION log_apply();",
        )
        .await
        .unwrap();
    let server = sources_server().await;
    let hourly = r#"schedule = "1h""#;
    let sources_file = SourcesFile::of(&[
        SourceToml::rest("products", &server.url("/products"))
            .with(hourly)
            .with(r#"rest = { items = "/items", pagination = { style = "page", size = 100 } }"#),
        SourceToml::csv("sensors", &server.url("/sensors.csv")).with(hourly),
        SourceToml::csv("big", &server.url("/big.csv")).with(hourly),
    ]);
    let query_addr = etl_tests::free_local_addr();
    let common = vec![
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources_file.env_value()),
    ];
    let with = |extra: (&'static str, String)| {
        let mut env = common.clone();
        env.push(extra);
        env
    };
    let normalizer_env = {
        let mut env = with(("NORMALIZER_ADMIN_ADDR", "127.0.0.1:0".into()));
        // Small batches: the large backlog takes many transactions, so a kill lands mid-way.
        env.push(("NORMALIZER_BATCH_SIZE", "500".into()));
        env
    };
    let mut query = Service::start("etl-query", &with(("QUERY_ADDR", query_addr.to_string())));
    let mut normalizer = Service::start("etl-normalizer", &normalizer_env);
    let mut ingester = Service::start(
        "etl-ingester",
        &with(("INGESTER_ADMIN_ADDR", "127.0.0.1:0".into())),
    );
    let api = format!("http://{query_addr}");

    // Rows of both kinds of source arrive through the API.
    wait_for(
        "products and sensors through GET /data",
        DEADLINE,
        || async {
            let products = get_json(&format!("{api}/data?source=products")).await;
            let sensors = get_json(&format!("{api}/data?source=sensors")).await;
            (products["total"] == 150 && sensors["total"] == 500).then_some(())
        },
    )
    .await;
    let page = get_json(&format!("{api}/data?source=products&page_size=1")).await;
    assert_eq!(page["data"][0]["name"], "product 1");

    // Kill the normalizer in the middle of the large backlog, then start a new one.
    let backlog =
        "SELECT coalesce((SELECT normalized_rows FROM etl_checkpoint WHERE source = 'big'), 0),
                          (SELECT count(*) FROM raw_csv_data WHERE source = 'big')";
    wait_for(
        "the normalizer to be part-way through the backlog",
        DEADLINE,
        || async {
            let row = client.query_one(backlog, &[]).await.unwrap();
            let (normalized, raw): (i64, i64) = (row.get(0), row.get(1));
            (normalized > 0 && normalized < BIG as i64 && raw > normalized).then_some(())
        },
    )
    .await;
    normalizer.signal("-KILL").await;
    let killed = normalizer.child.wait().await.unwrap();
    assert!(!killed.success(), "SIGKILL ends the process");
    let at_kill: i64 = client.query_one(backlog, &[]).await.unwrap().get(0);
    assert!(
        at_kill < BIG as i64,
        "the kill happened before the backlog was done"
    );
    normalizer = Service::start("etl-normalizer", &normalizer_env);

    wait_for(
        "the restarted normalizer to finish the backlog",
        DEADLINE,
        || async {
            let page = get_json(&format!("{api}/data?source=big&page_size=1")).await;
            (page["total"] == BIG).then_some(())
        },
    )
    .await;
    let exact = client
        .query_one(
            "SELECT (SELECT count(*) FROM normalized_data WHERE source = 'big'),
                    (SELECT count(DISTINCT source_id) FROM normalized_data WHERE source = 'big'),
                    (SELECT count(*) FROM apply_log WHERE source = 'big'),
                    (SELECT count(*) FROM raw_csv_data WHERE source = 'big')",
            &[],
        )
        .await
        .unwrap();
    let counts: (i64, i64, i64, i64) = (exact.get(0), exact.get(1), exact.get(2), exact.get(3));
    assert_eq!(
        counts,
        (BIG as i64, BIG as i64, BIG as i64, BIG as i64),
        "no loss, no duplicates, each row applied once"
    );

    // /stats reports the runs of both services.
    let stats = get_json(&format!("{api}/stats")).await;
    let sources = stats["sources"].as_array().expect("sources");
    for name in ["big", "products", "sensors"] {
        let s = sources
            .iter()
            .find(|s| s["source"] == name)
            .unwrap_or_else(|| panic!("{name} in {stats}"));
        assert_eq!(s["last_ingest"]["status"], "success", "{s}");
        assert!(s["last_normalize"]["status"].is_string(), "{s}");
    }

    // SIGTERM stops every service cleanly.
    for service in [&mut ingester, &mut normalizer, &mut query] {
        let code = service.stop().await;
        assert_eq!(
            code,
            Some(0),
            "{} exit:\n{}",
            service.name,
            service.log_tail()
        );
    }
}

/// What `docker compose up` ingests: `deploy/sources.toml` as committed, against `deploy/demo/`
/// served as files over HTTP (the stack's `demo-source` is a static file server; here the
/// host name points at one started by the test): both demo sources are read whole and their
/// runs succeed.
#[tokio::test]
async fn the_compose_stacks_demo_sources_ingest_deploy_demo_served_as_static_files() {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let demo = workspace.join("deploy/demo");
    let file = |name: &str, content_type: &'static str| {
        let body = std::fs::read(demo.join(name)).unwrap();
        make_sync(move |_| {
            Response::builder()
                .content_type(content_type)
                .body(body.clone())
        })
    };
    let server = TestServer::start(
        Route::new()
            .at("/products.json", file("products.json", "application/json"))
            .at("/sensors.csv", file("sensors.csv", "text/csv")),
    )
    .await;
    let compose_sources = std::fs::read_to_string(workspace.join("deploy/sources.toml")).unwrap();
    assert!(compose_sources.contains("http://demo-source/"));
    let sources =
        SourcesFile::new(&compose_sources.replace("http://demo-source/", &server.url("/")));
    let db = TestDb::new().await;
    let output = tokio::process::Command::new(etl_tests::service_binary("etl-ingester"))
        .arg("ingest")
        .env("DATABASE_URL", &db.url)
        .env("SOURCES_FILE", sources.env_value())
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let client = db.client().await;
    let expected_rows = |file: &str| {
        let text = std::fs::read_to_string(demo.join(file)).unwrap();
        match file {
            "products.json" => serde_json::from_str::<Vec<Value>>(&text).unwrap().len() as i64,
            _ => text.lines().count() as i64 - 1,
        }
    };
    for (source, file) in [("products", "products.json"), ("sensors", "sensors.csv")] {
        let row = client
            .query_one(
                "SELECT status, records_processed FROM etl_runs \
                 WHERE service = 'ingester' AND source = $1",
                &[&source],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "success", "{source}");
        assert_eq!(
            row.get::<_, i64>(1),
            expected_rows(file),
            "{source}: every row read"
        );
    }
}
