//! A source's life past its first load, with the real binaries: one run per source at a time
//! across replicas, and ingest rejects that are those of the latest run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etl_tests::{wait_for, Pipeline, ServiceProcess, SourceToml, SourcesFile, TestDb, TestServer};
use poem::{endpoint::make_sync, Response, Route};

const DEADLINE: Duration = Duration::from_secs(60);

/// Serves `body` as `/data.csv`, noting when each request arrived.
async fn logged_csv(body: &'static str) -> (TestServer, Arc<Mutex<Vec<Instant>>>) {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    let server = TestServer::start(Route::new().at(
        "/data.csv",
        make_sync(move |_| {
            seen.lock().unwrap().push(Instant::now());
            Response::builder().content_type("text/csv").body(body)
        }),
    ))
    .await;
    (server, requests)
}

#[tokio::test]
async fn three_ingester_replicas_fetch_a_source_once_per_schedule_tick() {
    let db = TestDb::new().await;
    let (server, requests) = logged_csv("id,name,value\n1,a,1\n2,b,2\n").await;
    let sources = SourcesFile::of(&[
        SourceToml::csv("shared", &server.url("/data.csv")).with(r#"schedule = "2s""#)
    ]);
    let env = [
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
        ("INGESTER_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
    ];
    let mut replicas: Vec<ServiceProcess> = (0..3)
        .map(|_| ServiceProcess::start("etl-ingester", &env))
        .collect();

    wait_for("four fetches of the source", DEADLINE, || async {
        (requests.lock().unwrap().len() >= 4).then_some(())
    })
    .await;
    for replica in &mut replicas {
        assert_eq!(replica.stop().await, Some(0), "{}", replica.log_tail());
    }

    let at = requests.lock().unwrap().clone();
    // Three replicas each fetching on their own would send three requests per tick, a few
    // milliseconds apart; one fetch per tick leaves about a schedule between them.
    for pair in at.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_secs(1),
            "two fetches {gap:?} apart: {at:?}"
        );
    }
    let client = db.client().await;
    let overlapping: i64 = client
        .query_one(
            "SELECT count(*) FROM etl_runs a JOIN etl_runs b
               ON a.source = b.source AND a.id < b.id
              AND a.started_at < b.ended_at AND b.started_at < a.ended_at
             WHERE a.service = 'ingester' AND b.service = 'ingester'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(overlapping, 0, "runs of one source overlapped");
    let logs: String = replicas.iter().map(|r| r.log()).collect();
    assert!(
        logs.contains("run skipped"),
        "the replicas that did not run say why"
    );
}

/// Asks the pipeline's ingester to run `source` now (its admin action, with the token).
async fn run_now(pipeline: &Pipeline, source: &str) {
    let admin = format!("http://{}/sources/{source}/run", pipeline.ingester_admin);
    let response = reqwest::Client::new()
        .post(admin)
        .bearer_auth(&pipeline.admin_token.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "run {source} now");
}

/// The JSON body of a 200 answer to `GET url`.
async fn get_json(url: &str) -> serde_json::Value {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

/// `/stats`'s ingest rejects for `source`.
async fn rejected_at_ingest(api: &str, source: &str) -> i64 {
    let stats = get_json(&format!("{api}/stats")).await;
    stats["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == source)
        .map_or(0, |s| s["rejected_at_ingest"].as_i64().unwrap())
}

#[tokio::test]
async fn ingest_rejects_are_those_of_the_latest_run() {
    let db = TestDb::new().await;
    let body = Arc::new(Mutex::new("id,name,value\n1,a,1\n2,b,2,extra\n3,c,3\n"));
    let current = body.clone();
    let server = TestServer::start(
        Route::new().at("/data.csv", make_sync(move |_| *current.lock().unwrap())),
    )
    .await;
    let sources = SourcesFile::of(&[
        SourceToml::csv("fixed", &server.url("/data.csv")).with(r#"schedule = "1h""#)
    ]);
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
    ]);
    let api = pipeline.api();
    let run_now = || run_now(&pipeline, "fixed");
    let client = db.client().await;
    let runs = || async {
        client
            .query_one(
                "SELECT count(*) FROM etl_runs WHERE service = 'ingester' AND status = 'success'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let wait_for_runs = |n: i64| {
        let runs = &runs;
        async move {
            wait_for("the ingest run", DEADLINE, || async {
                (runs().await == n).then_some(())
            })
            .await
        }
    };

    wait_for_runs(1).await;
    wait_for("/stats to show the reject", DEADLINE, || async {
        (rejected_at_ingest(&api, "fixed").await == 1).then_some(())
    })
    .await;
    // What an operator finds through the API: the reject, why, where, its bytes and its run.
    let rejects = get_json(&format!("{api}/rejects?source=fixed&stage=ingest")).await;
    let reject = &rejects["data"][0];
    assert_eq!(
        rejects["data"].as_array().map(Vec::len),
        Some(1),
        "{rejects}"
    );
    assert_eq!(reject["position"]["line"], 3, "{reject}");
    assert_eq!(reject["raw_encoding"], "utf8", "{reject}");
    assert_eq!(
        reject["raw"].as_str().map(str::trim_end),
        Some("2,b,2,extra")
    );
    assert!(
        reject["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{reject}"
    );
    let runs = get_json(&format!("{api}/runs?source=fixed&service=ingester")).await;
    let run = &runs["data"][0];
    assert_eq!(
        (&run["status"], &run["records_rejected"]),
        (&"success".into(), &1.into()),
        "{runs}"
    );
    assert_eq!(reject["run_id"], run["run_id"], "{reject} {run}");

    run_now().await;
    wait_for_runs(2).await;
    let rejects: i64 = client
        .query_one(
            "SELECT count(*) FROM etl_rejects WHERE stage = 'ingest'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rejects, 1, "the same bad row, run twice, is one reject");

    *body.lock().unwrap() = "id,name,value\n1,a,1\n2,b,2\n3,c,3\n";
    run_now().await;
    wait_for_runs(3).await;
    wait_for(
        "/stats to drop the fixed row's reject",
        DEADLINE,
        || async { (rejected_at_ingest(&api, "fixed").await == 0).then_some(()) },
    )
    .await;
    pipeline.stop().await;
}

/// Counts of what `source` has in each table: raw, normalized, checkpoint, rejects, runs.
async fn footprint(client: &tokio_postgres::Client, source: &str) -> [i64; 5] {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM raw_csv_data WHERE source = $1),
                    (SELECT count(*) FROM normalized_data WHERE source = $1),
                    (SELECT count(*) FROM etl_checkpoint WHERE source = $1),
                    (SELECT count(*) FROM etl_rejects WHERE source = $1),
                    (SELECT count(*) FROM etl_runs WHERE source = $1)",
            &[&source],
        )
        .await
        .unwrap();
    [0, 1, 2, 3, 4].map(|i| row.get(i))
}

async fn purge(db: &TestDb, source: &str) -> std::process::Output {
    tokio::process::Command::new(etl_tests::service_binary("etl-ingester"))
        .args(["purge", "--source", source])
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn purge_removes_a_sources_rows_checkpoint_and_rejects_and_keeps_its_runs() {
    let db = TestDb::new().await;
    let csv = "id,name,value\n1,a,1\n2,b,not a number\n3,c,3,extra\n";
    let server = TestServer::start(Route::new().at("/:file", make_sync(move |_| csv))).await;
    let sources = SourcesFile::of(&[
        SourceToml::csv("keep", &server.url("/keep.csv")).with(r#"schedule = "1h""#),
        SourceToml::csv("gone", &server.url("/gone.csv")).with(r#"schedule = "1h""#),
    ]);
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
    ]);
    let client = db.client().await;
    // Each: 2 raw rows, 1 normalized, a checkpoint, 2 rejects (one per stage), 2 runs.
    let loaded = [2, 1, 1, 2, 2];
    wait_for(
        "both sources to be loaded and normalized",
        DEADLINE,
        || async {
            let both = [
                footprint(&client, "keep").await,
                footprint(&client, "gone").await,
            ];
            (both == [loaded, loaded]).then_some(())
        },
    )
    .await;
    pipeline.stop().await;

    let purged = purge(&db, "gone").await;

    let stdout = String::from_utf8_lossy(&purged.stdout);
    assert!(purged.status.success(), "{purged:?}");
    assert!(
        stdout.contains("2 raw rows, 1 normalized rows, 2 rejects, its checkpoint"),
        "{stdout}"
    );
    assert_eq!(footprint(&client, "gone").await, [0, 0, 0, 0, 2]);
    assert_eq!(footprint(&client, "keep").await, loaded);

    let unknown = purge(&db, "never-was").await;
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("unknown source \"never-was\""), "{stderr}");
}

/// The demo's sources (`deploy/demo/`), served as `cargo xtask up` serves them.
async fn demo_server() -> TestServer {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo");
    let products: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("products.json")).unwrap()).unwrap();
    let sensors = std::fs::read(dir.join("sensors.csv")).unwrap();
    TestServer::start(
        Route::new()
            .at(
                "/api/products",
                make_sync(move |req: poem::Request| {
                    let query: std::collections::HashMap<String, usize> =
                        req.params().unwrap_or_default();
                    let (page, size) = (query["page"].max(1), query["per_page"]);
                    let start = ((page - 1) * size).min(products.len());
                    let end = (start + size).min(products.len());
                    let body = serde_json::json!({ "data": &products[start..end] });
                    Response::builder()
                        .content_type("application/json")
                        .body(body.to_string())
                }),
            )
            .at(
                "/exports/sensors.csv",
                make_sync(move |_| Response::builder().body(sensors.clone())),
            ),
    )
    .await
}

#[tokio::test]
async fn the_demo_run_twice_shows_the_same_rejects_at_ingest() {
    let db = TestDb::new().await;
    let server = demo_server().await;
    let demo = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo/sources.toml"),
    )
    .unwrap()
    .replace("http://{demo}", &server.url(""));
    let sources = SourcesFile::new(&demo);
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
    ]);
    let api = pipeline.api();
    let client = db.client().await;
    let successful_runs = |n: i64| {
        let client = &client;
        async move {
            wait_for("the demo's ingest runs", DEADLINE, || async {
                let runs: i64 = client
                    .query_one(
                        "SELECT count(*) FROM etl_runs
                         WHERE service = 'ingester' AND status = 'success'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (runs >= n).then_some(())
            })
            .await
        }
    };
    successful_runs(2).await;
    let first = wait_for("/stats to show the demo's bad row", DEADLINE, || async {
        let n = rejected_at_ingest(&api, "sensors").await;
        (n > 0).then_some(n)
    })
    .await;

    for source in ["products", "sensors"] {
        run_now(&pipeline, source).await;
    }
    successful_runs(4).await;
    let after: i64 = client
        .query_one(
            "SELECT count(*) FROM etl_rejects WHERE stage = 'ingest' AND source = 'sensors'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    assert_eq!(first, 1, "the demo has one ragged CSV row");
    assert_eq!(
        after, first,
        "a second run of the demo leaves the same rejects"
    );
    pipeline.stop().await;
}

/// A file that lands its first row and then fails the run: a quote opened on line 3 never
/// closes, past `http.max_record_bytes`.
fn failing_after_one_row() -> String {
    format!("id,name,value\n1,a,1\n2,\"{}\n", "x".repeat(4096))
}

#[tokio::test]
async fn a_snapshot_source_withdraws_rows_gone_upstream_and_a_failed_run_deletes_nothing() {
    let db = TestDb::new().await;
    let serving = Arc::new(Mutex::new(String::from(
        "id,name,value\n1,a,1\n2,b,2\n3,c,3\n4,d,4\n5,e,5\n",
    )));
    let current = serving.clone();
    let server = TestServer::start(Route::new().at(
        "/data.csv",
        make_sync(move |_| current.lock().unwrap().clone()),
    ))
    .await;
    let sources = SourcesFile::of(&[SourceToml::csv("snap", &server.url("/data.csv"))
        .with(r#"schedule = "1h""#)
        .with(r#"deletes = "snapshot""#)
        .with("http = { attempts = 1, max_record_bytes = 1024 }")]);
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
    ]);
    let client = db.client().await;
    let run_now = || run_now(&pipeline, "snap");
    // (live raw ids, normalized ids), once nothing is pending.
    let settled = |runs: i64| {
        let client = &client;
        async move {
            wait_for("the run to end and be normalized", DEADLINE, || async {
                let row = client
                    .query_one(
                        "SELECT (SELECT count(*) FROM etl_runs
                                 WHERE service = 'ingester' AND status <> 'running'),
                                (SELECT coalesce(sum(pending_changes), 0)::bigint FROM etl_pending),
                                (SELECT array_agg(source_id ORDER BY source_id) FROM raw_csv_data
                                 WHERE deleted_at IS NULL),
                                (SELECT array_agg(source_id ORDER BY source_id) FROM normalized_data)",
                        &[],
                    )
                    .await
                    .unwrap();
                let (ended, pending): (i64, i64) = (row.get(0), row.get(1));
                let ids = |i: usize| row.get::<_, Option<Vec<String>>>(i).unwrap_or_default();
                (ended == runs && pending == 0).then(|| (ids(2), ids(3)))
            })
            .await
        }
    };
    let all: Vec<String> = ["1", "2", "3", "4", "5"].map(String::from).to_vec();
    assert_eq!(settled(1).await, (all.clone(), all));

    *serving.lock().unwrap() = "id,name,value\n1,a,1\n3,c,3\n5,e,5\n".into();
    run_now().await;
    let kept: Vec<String> = ["1", "3", "5"].map(String::from).to_vec();
    assert_eq!(settled(2).await, (kept.clone(), kept.clone()));
    let row = client
        .query_one(
            "SELECT (SELECT records_deleted FROM etl_runs WHERE service = 'ingester'
                     ORDER BY id DESC LIMIT 1),
                    (SELECT array_agg(data->>'name' ORDER BY source_id) FROM raw_csv_data
                     WHERE deleted_at IS NOT NULL)",
            &[],
        )
        .await
        .unwrap();
    let (deleted, tombstones): (i64, Vec<String>) = (row.get(0), row.get(1));
    assert_eq!(deleted, 2);
    assert_eq!(
        tombstones,
        ["b", "d"],
        "a tombstone keeps the row's last data"
    );

    *serving.lock().unwrap() = failing_after_one_row();
    run_now().await;
    assert_eq!(
        settled(3).await,
        (kept.clone(), kept),
        "a failed run deletes nothing"
    );
    let status: String = client
        .query_one(
            "SELECT status FROM etl_runs WHERE service = 'ingester' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "failed");

    *serving.lock().unwrap() = "id,name,value\n1,a,1\n2,b,2\n3,c,3\n5,e,5\n".into();
    run_now().await;
    let back: Vec<String> = ["1", "2", "3", "5"].map(String::from).to_vec();
    assert_eq!(
        settled(4).await,
        (back.clone(), back),
        "a row seen again is back"
    );
    pipeline.stop().await;
}

/// A CSV of `rows` rows, each with an old and a new name column (`old 7`, `new 7`).
fn two_named(rows: u64) -> String {
    let mut csv = String::from("id,name,label,value\n");
    for i in 1..=rows {
        csv.push_str(&format!("{i},old {i},new {i},{i}\n"));
    }
    csv
}

/// Which version of the mapping a `/data` page shows: all old names, all new, or a mix.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Version {
    Old,
    New,
    Mixed,
}

/// `None` while the query service is not answering yet.
async fn page_version(api: &str, source: &str) -> Option<(Version, u64)> {
    let body = reqwest::get(format!("{api}/data?source={source}&page_size=100"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let total = page["total"].as_u64().unwrap_or(0);
    let version = if names.iter().all(|n| n.starts_with("old ")) {
        Version::Old
    } else if names.iter().all(|n| n.starts_with("new ")) {
        Version::New
    } else {
        Version::Mixed
    };
    Some((version, total))
}

/// The ingester and query service, and a normalizer that can be replaced, on one database.
struct Replaying {
    db: TestDb,
    sources: SourcesFile,
    _server: TestServer,
    others: Vec<ServiceProcess>,
    api: String,
}

impl Replaying {
    async fn start(rows: u64) -> Self {
        let db = TestDb::new().await;
        let csv: &'static str = Box::leak(two_named(rows).into_boxed_str());
        let server = TestServer::start(Route::new().at("/data.csv", make_sync(move |_| csv))).await;
        let sources = SourcesFile::of(&[
            SourceToml::csv("renamed", &server.url("/data.csv")).with(r#"schedule = "1h""#)
        ]);
        let query_addr = etl_tests::free_local_addr();
        let env = [
            ("DATABASE_URL", db.url.clone()),
            ("SOURCES_FILE", sources.env_value()),
        ];
        let with = |var: &'static str, value: String| {
            let mut env = env.to_vec();
            env.push((var, value));
            env
        };
        let others = vec![
            ServiceProcess::start(
                "etl-ingester",
                &with("INGESTER_ADMIN_ADDR", "127.0.0.1:0".into()),
            ),
            ServiceProcess::start("etl-query", &with("QUERY_ADDR", query_addr.to_string())),
        ];
        Self {
            db,
            sources,
            _server: server,
            others,
            api: format!("http://{query_addr}"),
        }
    }

    /// A normalizer, and its admin address.
    fn normalizer(&self) -> (ServiceProcess, std::net::SocketAddr) {
        let admin = etl_tests::free_local_addr();
        let process = ServiceProcess::start(
            "etl-normalizer",
            &[
                ("DATABASE_URL", self.db.url.clone()),
                ("SOURCES_FILE", self.sources.env_value()),
                ("NORMALIZER_ADMIN_ADDR", admin.to_string()),
                ("NORMALIZER_BATCH_SIZE", "100".into()),
            ],
        );
        (process, admin)
    }

    /// Switches the mapping's name from the `name` column to `label`.
    fn remap(&self) {
        let toml = std::fs::read_to_string(self.sources.env_value()).unwrap();
        let remapped = toml.replace(r#"name = "name""#, r#"name = "label""#);
        assert_ne!(toml, remapped, "the mapping names the `name` column");
        std::fs::write(self.sources.env_value(), remapped).unwrap();
    }

    async fn wait_for_version(&self, version: Version, rows: u64) {
        wait_for("/data to serve the version", DEADLINE, || async {
            (page_version(&self.api, "renamed").await == Some((version, rows))).then_some(())
        })
        .await;
    }

    async fn stop(mut self) {
        for service in &mut self.others {
            assert_eq!(service.stop().await, Some(0), "{}", service.log_tail());
        }
    }
}

#[tokio::test]
async fn a_mapping_change_is_replayed_and_readers_see_only_whole_versions() {
    const ROWS: u64 = 3_000;
    let stack = Replaying::start(ROWS).await;
    let (mut normalizer, _) = stack.normalizer();
    stack.wait_for_version(Version::Old, ROWS).await;
    assert_eq!(normalizer.stop().await, Some(0));

    stack.remap();
    let (mut normalizer, _) = stack.normalizer();
    let mut seen = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (version, total) = page_version(&stack.api, "renamed")
            .await
            .expect("the API answers");
        assert_eq!(total, ROWS, "every record is served all along");
        seen.push(version);
        if version == Version::New {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replay did not finish: {seen:?}"
        );
    }
    assert_eq!(
        normalizer.stop().await,
        Some(0),
        "{}",
        normalizer.log_tail()
    );

    assert!(
        !seen.contains(&Version::Mixed),
        "a reader saw both versions: {seen:?}"
    );
    assert!(
        seen.contains(&Version::Old),
        "the old version was served during the replay"
    );
    let client = stack.db.client().await;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM etl_replays), (SELECT count(*) FROM normalized_build),
                    (SELECT records_processed FROM etl_runs WHERE service = 'normalizer'
                     ORDER BY id DESC LIMIT 1)",
            &[],
        )
        .await
        .unwrap();
    let (replays, shadow, processed): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((replays, shadow, processed), (0, 0, ROWS as i64));
    stack.stop().await;
}

#[tokio::test]
async fn a_replay_killed_midway_leaves_the_old_version_served_and_resumes() {
    const ROWS: u64 = 20_000;
    let stack = Replaying::start(ROWS).await;
    let (mut normalizer, _) = stack.normalizer();
    stack.wait_for_version(Version::Old, ROWS).await;
    assert_eq!(normalizer.stop().await, Some(0));

    stack.remap();
    let (mut normalizer, admin) = stack.normalizer();
    let client = stack.db.client().await;
    wait_for("the replay to be under way", DEADLINE, || async {
        let processed: Option<i64> = client
            .query_opt("SELECT processed FROM etl_replays", &[])
            .await
            .unwrap()
            .map(|r| r.get(0));
        processed.filter(|&p| p > 0 && p < ROWS as i64)
    })
    .await;
    // Its progress shows in the metrics and in /stats.
    let metrics = wait_for("the replay gauge", DEADLINE, || async {
        let text = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("etl_normalize_replay_rows{source=\"renamed\"} "))
            .and_then(|v| v.trim().parse::<i64>().ok())
    })
    .await;
    assert!(metrics > 0, "replay rows gauge: {metrics}");
    let stats: serde_json::Value = serde_json::from_str(
        &reqwest::get(format!("{}/stats", stack.api))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let replay = &stats["sources"][0]["replay"];
    assert_eq!(replay["reason"], "mapping", "{stats}");
    assert!(replay["processed"].as_i64().unwrap() > 0, "{stats}");
    assert!(replay["remaining"].as_i64().unwrap() > 0, "{stats}");
    normalizer.signal("-KILL").await;
    let _ = normalizer.child.wait().await;

    assert_eq!(
        page_version(&stack.api, "renamed").await,
        Some((Version::Old, ROWS)),
        "the old version is still served"
    );
    let (mut normalizer, _) = stack.normalizer();
    stack.wait_for_version(Version::New, ROWS).await;
    assert_eq!(
        normalizer.stop().await,
        Some(0),
        "{}",
        normalizer.log_tail()
    );
    let left: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM etl_replays) + (SELECT count(*) FROM normalized_build)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    stack.stop().await;
}

#[tokio::test]
async fn replay_on_demand_rebuilds_a_source_and_says_what_changed() {
    const ROWS: u64 = 500;
    let stack = Replaying::start(ROWS).await;
    let (mut normalizer, _) = stack.normalizer();
    stack.wait_for_version(Version::Old, ROWS).await;
    assert_eq!(normalizer.stop().await, Some(0));
    stack.remap();
    let replay = |source: &'static str| {
        let (url, path) = (stack.db.url.clone(), stack.sources.env_value());
        async move {
            tokio::process::Command::new(etl_tests::service_binary("etl-normalizer"))
                .args(["replay", "--source", source])
                .env("DATABASE_URL", url)
                .env("SOURCES_FILE", path)
                .output()
                .await
                .unwrap()
        }
    };

    let done = replay("renamed").await;

    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{done:?}");
    assert!(
        stdout.contains("replayed renamed: 500 normalized (0 new, 500 changed, 0 unchanged)"),
        "{stdout}"
    );
    assert_eq!(
        page_version(&stack.api, "renamed").await,
        Some((Version::New, ROWS))
    );
    let unknown = replay("nothing").await;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown source `nothing`"));
    stack.stop().await;
}
