//! The operations console in a real headless browser (Debian's chromium, driven through
//! playwright-core), against the three real services ingesting real sources over HTTP: what
//! an operator sees on the overview and a source's page, what "Run now" does, that nothing
//! a source sends is ever run as markup, and that no page logs an error or fails a request.
//! Each test leaves its screenshots in `target/screenshots/`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etl_tests::{
    screenshot_dir, wait_for, Browser, Pipeline, SourceToml, SourcesFile, TestDb, TestServer,
};
use poem::endpoint::make_sync;
use poem::{Response, Route};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);
const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);

/// Three good rows, one row short of a field (rejected at ingest: line 5) and one whose value
/// is not a number (rejected at normalize).
const ORDERS: &str = "id,name,value\n1,chair,40\n2,table,120\n3,lamp,cheap\n4,shelf\n5,desk,300\n";

/// The services with `sources`, an operator's admin key and a viewer's plain key.
struct Console {
    pipeline: Pipeline,
    api: String,
    admin_key: String,
    _keys: tempfile::NamedTempFile,
    _sources: SourcesFile,
}

impl Console {
    fn start(db: &TestDb, sources: &[SourceToml]) -> Self {
        let sources = SourcesFile::of(sources);
        let (admin_key, admin_entry) = etl_query::access::new_key("ops", true);
        let keys = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(keys.path(), admin_entry).unwrap();
        let pipeline = Pipeline::start(&[
            ("DATABASE_URL", db.url.clone()),
            ("SOURCES_FILE", sources.env_value()),
            ("QUERY_API_KEYS_FILE", keys.path().display().to_string()),
            ("QUERY_STATS_MAX_AGE_SECS", "0".to_owned()),
            ("NORMALIZER_POLL_INTERVAL_SECS", "1".to_owned()),
        ]);
        let api = pipeline.api();
        Self {
            pipeline,
            api,
            admin_key,
            _keys: keys,
            _sources: sources,
        }
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.api))
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .ok()?;
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.ok()
    }

    /// Waits until every source in `names` has an ingest run that ended and nothing waiting to
    /// be normalized; `/stats` as it is then.
    async fn settled(&self, names: &[&str]) -> Value {
        wait_for("every source ingested and normalized", DEADLINE, || async {
            let stats = self.get("/stats").await?;
            let sources = stats["sources"].as_array()?;
            names
                .iter()
                .all(|name| {
                    sources.iter().any(|s| {
                        s["source"] == *name
                            && s["last_ingest"]["status"] != "running"
                            && s["last_ingest"]["status"].is_string()
                            && s["last_normalize"]["status"] == "success"
                            && s["checkpoint"]["lag"] == 0
                    })
                })
                .then_some(stats)
        })
        .await
    }

    async fn ask(&self, source: &str, action: &str) {
        let response = reqwest::Client::new()
            .post(format!("{}/sources/{source}/{action}", self.api))
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
}

/// Opens the console at `fragment` (`""` for the overview), enters the admin key in the form
/// it shows first (the page knows this service asks for keys: no request is refused), and
/// waits for `ready` to be on the page.
async fn sign_in(console: &Console, fragment: &str, ready: &str) -> Browser {
    let mut browser = Browser::start();
    browser
        .open(
            &format!("{}/console{fragment}", console.api),
            DESKTOP.0,
            DESKTOP.1,
        )
        .await;
    browser
        .wait("#key-form:not([hidden])", Duration::from_secs(20))
        .await;
    let focused = browser.eval("document.activeElement.id").await;
    assert_eq!(focused, "key-input", "the key's field takes the focus");
    browser.fill("#key-input", &console.admin_key).await;
    browser.press("Enter").await;
    browser.wait(ready, Duration::from_secs(20)).await;
    let problems = browser.problems().await;
    assert!(problems.is_empty(), "signing in: {problems:?}");
    browser
}

/// The cells of the overview's row for `source`, by column.
async fn overview_row(browser: &mut Browser, source: &str) -> Value {
    browser
        .eval(&format!(
            "Object.fromEntries([...document.querySelectorAll('tr[data-source={source:?}] td')]
                .map((td) => [td.dataset.label, td.innerText.trim()]))"
        ))
        .await
}

/// The state shown for `source` ("red", "amber", "green"), with its reason.
async fn state_of(browser: &mut Browser, source: &str) -> (String, String) {
    let state = browser
        .text(&format!("tr[data-source={source:?}] .state"))
        .await
        .unwrap_or_default();
    let reason = browser
        .text(&format!("tr[data-source={source:?}] .reason"))
        .await
        .unwrap_or_default();
    (state, reason)
}

/// Nothing on the page reaches past the window's right edge, not even inside a scrolling box.
async fn assert_fits_the_width(browser: &mut Browser, page: &str) {
    let past = browser
        .eval(
            "[...document.querySelectorAll('body *')]
                .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 0.5)
                .map((e) => e.tagName + '.' + e.className + ': ' + e.innerText.slice(0, 40))",
        )
        .await;
    assert_eq!(
        past,
        serde_json::json!([]),
        "{page} is wider than the screen"
    );
}

async fn assert_no_problems(browser: &mut Browser, page: &str) {
    let problems = browser.problems().await;
    assert!(problems.is_empty(), "{page}: {problems:?}");
    let violations = browser.accessibility_violations().await;
    assert!(violations.is_empty(), "{page}: {violations:#?}");
}

#[tokio::test]
async fn the_overview_shows_each_source_with_its_counts_and_turns_red_when_its_last_run_fails() {
    let db = TestDb::new().await;
    let failing = Arc::new(AtomicBool::new(false));
    let flaky = failing.clone();
    let server = TestServer::start(
        Route::new()
            .at(
                "/orders.csv",
                make_sync(|_| Response::builder().body(ORDERS)),
            )
            .at(
                "/flaky.csv",
                make_sync(move |_| {
                    if flaky.load(Ordering::SeqCst) {
                        Response::builder()
                            .status(poem::http::StatusCode::SERVICE_UNAVAILABLE)
                            .body("upstream is down for maintenance")
                    } else {
                        Response::builder().body("id,name,value\n1,one,1\n2,two,2\n")
                    }
                }),
            ),
    )
    .await;
    let mut console = Console::start(
        &db,
        &[
            SourceToml::csv("orders", &server.url("/orders.csv")).with(r#"schedule = "1h""#),
            SourceToml::csv("flaky", &server.url("/flaky.csv"))
                .with(r#"schedule = "1h""#)
                .with("http = { attempts = 1 }"),
        ],
    );
    console.settled(&["orders", "flaky"]).await;

    let mut browser = sign_in(&console, "", "tr[data-source=flaky]").await;
    let heading = browser.text("main h2").await.unwrap();
    assert_eq!(heading, "Sources (2), 5 records");
    let orders = overview_row(&mut browser, "orders").await;
    assert_eq!(orders["Kind"], "csv, every 1 h", "{orders}");
    assert_eq!(orders["Records"], "3", "{orders}");
    assert_eq!(orders["Rejected at ingest"], "1", "{orders}");
    assert_eq!(orders["Rejected at normalize"], "1", "{orders}");
    assert_eq!(orders["Lag (rows)"], "0", "{orders}");
    let last_ingest = orders["Last ingest"].as_str().unwrap();
    assert!(
        last_ingest.starts_with("success, ")
            && last_ingest.contains("5 read (4 new, 0 changed, 1 rejected)"),
        "{last_ingest}"
    );
    assert!(
        orders["Last successful ingest"]
            .as_str()
            .unwrap()
            .ends_with("s ago"),
        "{orders}"
    );
    assert_eq!(
        state_of(&mut browser, "orders").await,
        ("amber".into(), "last ingest rejected 1 of 5 records".into())
    );
    let flaky_row = overview_row(&mut browser, "flaky").await;
    assert_eq!(flaky_row["Records"], "2", "{flaky_row}");
    assert_eq!(flaky_row["Rejected at ingest"], "0", "{flaky_row}");
    let (state, reason) = state_of(&mut browser, "flaky").await;
    assert_eq!(state, "green", "{reason}");
    assert_no_problems(&mut browser, "overview").await;
    browser
        .screenshot(&screenshot_dir().join("console-overview.png"))
        .await;

    // The source starts failing; a run now fails, and the open page turns red by itself.
    browser.eval("window.sameDocument = true").await;
    failing.store(true, Ordering::SeqCst);
    console.ask("flaky", "run").await;
    let reason = browser
        .until(
            "document.querySelector('tr[data-source=flaky] .state')?.innerText === 'red'
                && document.querySelector('tr[data-source=flaky] .reason').innerText",
            DEADLINE,
        )
        .await;
    let reason = reason.as_str().unwrap();
    assert!(
        reason.starts_with("last ingest failed: ") && reason.contains("503"),
        "{reason}"
    );
    assert_eq!(
        browser.eval("window.sameDocument === true").await,
        true,
        "refreshed in place, not reloaded"
    );
    let flaky_row = overview_row(&mut browser, "flaky").await;
    assert!(
        flaky_row["Last ingest"]
            .as_str()
            .unwrap()
            .starts_with("failed, "),
        "{flaky_row}"
    );
    assert_eq!(flaky_row["Records"], "2", "a failed run keeps the data");
    assert_no_problems(&mut browser, "overview after the failure").await;

    // On a phone: every column still there, nothing wider than the screen.
    browser.resize(PHONE.0, PHONE.1).await;
    assert_fits_the_width(&mut browser, "the overview").await;
    let orders = overview_row(&mut browser, "orders").await;
    assert_eq!(orders["Records"], "3", "{orders}");
    assert_no_problems(&mut browser, "overview on a phone").await;
    browser
        .screenshot(&screenshot_dir().join("console-overview-phone.png"))
        .await;
    console.pipeline.assert_running();
    console.pipeline.stop().await;
}

/// Waits for the runs table to start with a successful run newer than `newest_run`; its
/// service and records read.
async fn new_successful_run(browser: &mut Browser, newest_run: i64) -> Value {
    browser
        .until(
            &format!(
                "(() => {{
                    const row = document.querySelector('tr[data-run]');
                    const cell = (label) => row.querySelector(`td[data-label=${{label}}]`).innerText;
                    return row && Number(row.dataset.run) > {newest_run}
                        && cell('Status') === 'success'
                        && {{ service: cell('Service'), read: cell('Read') }};
                }})()"
            ),
            DEADLINE,
        )
        .await
}

/// `count` finished ingest runs of `source` from the last days, every other one failed, as a
/// source's history holds them (older than anything the services will run).
async fn seed_history(db: &TestDb, source: &str, count: i32) {
    db.client()
        .await
        .execute(
            "INSERT INTO etl_runs (service, source, started_at, ended_at, duration_seconds,
                 records_processed, records_inserted, status, error_message)
             SELECT 'ingester', $1, now() - make_interval(hours => n + 2),
                 now() - make_interval(hours => n + 2) + interval '3 seconds', 3, 5 * n, 0,
                 CASE WHEN n % 2 = 0 THEN 'failed' ELSE 'success' END,
                 CASE WHEN n % 2 = 0 THEN 'GET http://upstream.example/orders.csv failed: HTTP 502 (run ' || n || ')' END
             FROM generate_series($2::int, 1, -1) n",
            &[&source, &count],
        )
        .await
        .expect("seed the source's history");
}

#[tokio::test]
async fn a_source_page_shows_rejects_with_reason_and_bytes_pages_its_runs_and_its_actions_add_runs()
{
    let db = TestDb::new().await;
    seed_history(&db, "orders", 24).await;
    let server = TestServer::serving("/orders.csv", ORDERS).await;
    let mut console = Console::start(
        &db,
        &[SourceToml::csv("orders", &server.url("/orders.csv")).with(r#"schedule = "1h""#)],
    );
    console.settled(&["orders"]).await;
    let mut browser = sign_in(&console, "#/source/orders", "tr[data-reject]").await;

    // Each reject with its stage, position, reason and the record's bytes, as the API has them.
    let rejects = console.get("/rejects?source=orders").await.unwrap();
    let rejects = rejects["data"].as_array().unwrap();
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    for reject in rejects {
        let row = browser
            .eval(&format!(
                "Object.fromEntries([...document.querySelectorAll('tr[data-reject=\"{}\"] td')]
                    .map((td) => [td.dataset.label, td.innerText]))",
                reject["id"]
            ))
            .await;
        assert_eq!(row["Stage"], reject["stage"], "{row}");
        assert_eq!(row["Reason"], reject["reason"], "{row}");
        assert_eq!(row["Record"], reject["raw"], "{row}");
    }
    let ingest = rejects.iter().find(|r| r["stage"] == "ingest").unwrap();
    assert_eq!(ingest["raw"], "4,shelf", "{ingest}");
    let line = browser
        .text(&format!(
            "tr[data-reject=\"{}\"] td[data-label=Where]",
            ingest["id"]
        ))
        .await;
    assert_eq!(line.as_deref(), Some("line 5"));
    let normalize = rejects.iter().find(|r| r["stage"] == "normalize").unwrap();
    assert!(
        normalize["reason"].as_str().unwrap().contains("cheap"),
        "{normalize}"
    );

    // Runs: 2 of the services' and 24 from history, 20 a page, errors shown.
    let first_page = browser
        .eval("[...document.querySelectorAll('tr[data-run]')].map((tr) => tr.dataset.run)")
        .await;
    assert_eq!(first_page.as_array().unwrap().len(), 20, "{first_page}");
    browser.click("a[rel=next]").await;
    let second_page = browser
        .until(
            &format!(
                "(() => {{
                    const runs = [...document.querySelectorAll('tr[data-run]')]
                        .map((tr) => tr.dataset.run);
                    return runs.length && !{first_page}.includes(runs[0]) && runs;
                }})()"
            ),
            DEADLINE,
        )
        .await;
    assert_eq!(second_page.as_array().unwrap().len(), 6, "{second_page}");
    let errors = browser
        .eval(
            "[...document.querySelectorAll('tr[data-run] td[data-label=Error]')]
                .map((td) => td.innerText).filter((text) => text)",
        )
        .await;
    assert_eq!(
        errors.as_array().unwrap().len(),
        3,
        "runs 2, 4 and 6 of the history failed: {errors}"
    );
    assert!(errors[0].as_str().unwrap().contains("HTTP 502"), "{errors}");
    browser.click("a[rel=prev]").await;
    browser
        .until(
            "!location.hash.includes('runs=') && document.querySelectorAll('tr[data-run]').length === 20",
            DEADLINE,
        )
        .await;
    assert_no_problems(&mut browser, "the source page").await;
    browser
        .screenshot(&screenshot_dir().join("console-source.png"))
        .await;

    // "Run now" by keyboard alone: Tab to the button, Enter, Tab to Confirm, Enter.
    let newest_run: i64 = first_page[0].as_str().unwrap().parse().unwrap();
    let mut presses = 0;
    while browser.eval("document.activeElement.id").await != "run-now" {
        presses += 1;
        assert!(presses <= 20, "Tab never reached Run now");
        browser.press("Tab").await;
    }
    browser.press("Enter").await;
    assert_eq!(
        browser
            .eval("document.getElementById('confirm').open")
            .await,
        true
    );
    assert_eq!(
        browser.text("#confirm-title").await.as_deref(),
        Some("Run orders now?")
    );
    browser.press("Tab").await;
    assert_eq!(
        browser.eval("document.activeElement.id").await,
        "confirm-ok"
    );
    browser.press("Enter").await;
    let status = browser
        .until(
            "document.getElementById('status').innerText.includes('asked for')
                && document.getElementById('status').innerText",
            DEADLINE,
        )
        .await;
    assert!(
        status
            .as_str()
            .unwrap()
            .starts_with("run of orders asked for (request "),
        "{status}"
    );
    let run = new_successful_run(&mut browser, newest_run).await;
    assert_eq!(run["service"], "ingester", "{run}");
    assert_eq!(run["read"], "5", "{run}");
    assert_eq!(
        browser.eval("document.activeElement.id").await,
        "run-now",
        "the focus stays on the button through the page's refreshes"
    );
    assert_no_problems(&mut browser, "the source page after a run").await;

    // "Replay" by pointer: confirmed, then a normalizer run of the whole source appears.
    let newest_run = browser
        .eval("Number(document.querySelector('tr[data-run]').dataset.run)")
        .await
        .as_i64()
        .unwrap();
    browser.click("#replay").await;
    assert_eq!(
        browser.text("#confirm-title").await.as_deref(),
        Some("Replay orders?")
    );
    browser.click("#confirm-ok").await;
    let replay = new_successful_run(&mut browser, newest_run).await;
    assert_eq!(replay["service"], "normalizer", "{replay}");
    assert_eq!(replay["read"], "4", "every raw row again: {replay}");
    assert_no_problems(&mut browser, "the source page after a replay").await;

    browser.resize(PHONE.0, PHONE.1).await;
    assert_fits_the_width(&mut browser, "the source page").await;
    browser
        .screenshot(&screenshot_dir().join("console-source-phone.png"))
        .await;
    console.pipeline.assert_running();
    console.pipeline.stop().await;
}

#[tokio::test]
async fn markup_in_records_rejects_and_upstream_errors_is_shown_as_text_and_never_run() {
    let db = TestDb::new().await;
    let markup = "id,name,value,description\n\
        1,<script>window.pwned='name'</script>,1,\"<img src=x onerror=\"\"window.pwned='description'\"\">\"\n\
        2,<b>bold</b>,2,&lt;entity&gt;\n\
        3,<script>window.pwned='reject'</script>\n";
    let server = TestServer::start(
        Route::new()
            .at(
                "/markup.csv",
                make_sync(move |_| Response::builder().body(markup)),
            )
            .at(
                "/hostile.csv",
                make_sync(|_| {
                    Response::builder()
                        .status(poem::http::StatusCode::INTERNAL_SERVER_ERROR)
                        .body("<script>window.pwned='error'</script><img src=x onerror=\"window.pwned='error-img'\">")
                }),
            ),
    )
    .await;
    let mut console = Console::start(
        &db,
        &[
            SourceToml::csv("markup", &server.url("/markup.csv"))
                .mapping(r#"{ source_id = "id", name = "name", value = "value", description = "description" }"#)
                .with(r#"schedule = "1h""#),
            SourceToml::csv("hostile", &server.url("/hostile.csv"))
                .with(r#"schedule = "1h""#)
                .with("http = { attempts = 1 }"),
        ],
    );
    wait_for("both sources' first runs", DEADLINE, || async {
        let stats = console.get("/stats").await?;
        let sources = stats["sources"].as_array()?;
        let status = |name: &str| {
            sources.iter().find(|s| s["source"] == name).map(|s| {
                (
                    s["last_ingest"]["status"].clone(),
                    s["checkpoint"]["lag"].clone(),
                )
            })
        };
        (status("markup")? == ("success".into(), 0.into()) && status("hostile")?.0 == "failed")
            .then_some(())
    })
    .await;

    let mut browser = sign_in(&console, "", "tr[data-source=hostile]").await;
    let (state, reason) = state_of(&mut browser, "hostile").await;
    assert_eq!(state, "red");
    assert!(
        reason.contains("<script>window.pwned='error'</script>"),
        "the upstream's body, as text: {reason}"
    );
    assert_never_ran(&mut browser, "the overview").await;

    browser
        .goto(&format!("{}/console#/source/markup", console.api))
        .await;
    browser.wait("tr[data-record]", DEADLINE).await;
    let shown = browser
        .eval(
            "[...document.querySelectorAll('tr[data-record]')].map((tr) =>
                tr.querySelector('td[data-label=Name]').innerText + ' | '
                + tr.querySelector('td[data-label=Description]').innerText).sort()",
        )
        .await;
    assert_eq!(
        shown,
        serde_json::json!([
            "<b>bold</b> | &lt;entity&gt;",
            "<script>window.pwned='name'</script> | <img src=x onerror=\"window.pwned='description'\">",
        ])
    );
    let reject = browser.text("tr[data-reject] pre").await;
    assert_eq!(
        reject.as_deref(),
        Some("3,<script>window.pwned='reject'</script>")
    );
    assert_never_ran(&mut browser, "the source page").await;
    console.pipeline.assert_running();
    console.pipeline.stop().await;
}

/// None of the markup ran: no `window.pwned`, no script but the console's own, no image, and
/// no request an image would have made.
async fn assert_never_ran(browser: &mut Browser, page: &str) {
    assert_eq!(
        browser.eval("typeof window.pwned").await,
        "undefined",
        "{page}"
    );
    assert_eq!(
        browser
            .eval("[...document.scripts].map((s) => s.getAttribute('src'))")
            .await,
        serde_json::json!(["/console/console.js"]),
        "{page}"
    );
    assert_eq!(
        browser
            .eval("document.querySelectorAll('img, b').length")
            .await,
        0,
        "{page}"
    );
    assert_no_problems(browser, page).await;
}

#[tokio::test]
async fn without_api_keys_the_console_reads_freely_and_says_why_it_offers_no_action() {
    let db = TestDb::new().await;
    let server = TestServer::serving("/orders.csv", ORDERS).await;
    let sources = SourcesFile::of(&[
        SourceToml::csv("orders", &server.url("/orders.csv")).with(r#"schedule = "1h""#)
    ]);
    let mut pipeline = Pipeline::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("SOURCES_FILE", sources.env_value()),
        ("QUERY_STATS_MAX_AGE_SECS", "0".to_owned()),
    ]);
    let mut browser = Browser::start();
    browser
        .open(
            &format!("{}/console#/source/orders", pipeline.api()),
            DESKTOP.0,
            DESKTOP.1,
        )
        .await;
    // The services may still be starting: the page shows an error until its next refresh.
    let note = browser
        .until(
            "document.getElementById('actions-off')?.innerText",
            DEADLINE,
        )
        .await;
    assert!(
        note.as_str().unwrap().contains("QUERY_API_KEYS_FILE"),
        "{note}"
    );
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#run-now, #replay').length")
            .await,
        0,
        "no button that could only be refused"
    );
    assert_eq!(
        browser
            .eval("document.getElementById('key-form').hidden")
            .await,
        true,
        "no key asked for"
    );
    // Any failure while the services were starting is behind us: a fresh load finds none.
    browser.problems().await;
    browser
        .goto(&format!("{}/console#/source/orders", pipeline.api()))
        .await;
    browser.wait("#actions-off", DEADLINE).await;
    assert_no_problems(&mut browser, "the source page without keys").await;
    pipeline.assert_running();
    pipeline.stop().await;
}
