//! The operations console's actions through the API, on the three real services: "run now"
//! and "replay" are recorded by the query service for an admin key only, then taken by an
//! ingester and a normalizer, whose runs show in `/runs`.

use std::time::Duration;

use etl_tests::{wait_for, Pipeline, SourceToml, SourcesFile, TestDb, TestServer};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// The runs `/runs` lists for `source` and `service`, newest first; none while the query
/// service is not up yet.
async fn runs_of(api: &str, key: &str, source: &str, service: &str) -> Vec<Value> {
    let url = format!("{api}/runs?source={source}&service={service}&page_size=100");
    let Ok(response) = reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
    else {
        return Vec::new();
    };
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    page["data"].as_array().cloned().unwrap()
}

#[tokio::test]
async fn run_now_and_replay_are_taken_by_the_services_for_an_admin_key_only() {
    let db = TestDb::new().await;
    let server = TestServer::serving("/rows.csv", "id,name,value\n1,one,1\n2,two,2\n").await;
    // An hour's schedule: any run after the first is one the console asked for.
    let sources = SourcesFile::of(&[
        SourceToml::csv("rows", &server.url("/rows.csv")).with(r#"schedule = "1h""#)
    ]);
    let (viewer, viewer_entry) = etl_query::access::new_key("viewer", false);
    let (ops, ops_entry) = etl_query::access::new_key("ops", true);
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), format!("{viewer_entry}{ops_entry}")).unwrap();
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
        ("QUERY_API_KEYS_FILE", keys.path().display().to_string()),
        ("NORMALIZER_POLL_INTERVAL_SECS", "1".to_owned()),
    ]);
    let api = pipeline.api();
    wait_for(
        "the first ingest and its normalize run",
        DEADLINE,
        || async {
            let ingests = runs_of(&api, &viewer, "rows", "ingester").await;
            let normalizes = runs_of(&api, &viewer, "rows", "normalizer").await;
            (ingests.len() == 1 && ingests[0]["status"] == "success" && !normalizes.is_empty())
                .then_some(())
        },
    )
    .await;

    // The ingester published the source as its file declares it.
    let stats: Value = reqwest::Client::new()
        .get(format!("{api}/stats"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let config = &stats["sources"][0]["config"];
    assert_eq!(config["kind"], "csv", "{stats}");
    assert_eq!(config["schedule_seconds"], 3600);
    assert_eq!(config["url"], server.url("/rows.csv"));
    assert_eq!(config["mapping"]["source_id"], serde_json::json!(["id"]));
    assert_eq!(config["mapping"]["by_position"], false);
    assert_eq!(config["mapping"]["value"], "value");

    let client = reqwest::Client::new();
    let ask = |path: &str, key: Option<&str>| {
        let mut request = client.post(format!("{api}{path}"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    for (path, key, status, code) in [
        ("/sources/rows/run", None, 401, "unauthorized"),
        ("/sources/rows/run", Some(viewer.as_str()), 403, "forbidden"),
        ("/sources/nowhere/run", Some(ops.as_str()), 404, "not_found"),
        (
            "/sources/rows/sometimes",
            Some(ops.as_str()),
            400,
            "invalid_parameter",
        ),
    ] {
        let response = ask(path, key).await.unwrap();
        assert_eq!(response.status(), status, "{path} with {key:?}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], code, "{path}: {problem}");
    }
    let requests: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM etl_requests", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(requests, 0, "a refused action records nothing");

    let response = ask("/sources/rows/run", Some(&ops)).await.unwrap();
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["source"], "rows");
    assert_eq!(accepted["action"], "run");
    assert_eq!(accepted["requested_by"], "ops");
    wait_for("the run asked for", DEADLINE, || async {
        let ingests = runs_of(&api, &viewer, "rows", "ingester").await;
        (ingests.len() == 2 && ingests[0]["status"] == "success").then_some(())
    })
    .await;

    let normalized_before = runs_of(&api, &viewer, "rows", "normalizer").await.len();
    let response = ask("/sources/rows/replay", Some(&ops)).await.unwrap();
    assert_eq!(response.status(), 202);
    wait_for("the replay asked for", DEADLINE, || async {
        let runs = runs_of(&api, &viewer, "rows", "normalizer").await;
        (runs.len() > normalized_before && runs[0]["status"] == "success").then_some(())
    })
    .await;
    let taken: Vec<(String, bool)> = db
        .client()
        .await
        .query(
            "SELECT action, taken_at IS NOT NULL FROM etl_requests ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        taken,
        [("run".to_owned(), true), ("replay".to_owned(), true)]
    );
    pipeline.assert_running();
    pipeline.stop().await;
}
