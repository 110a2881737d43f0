//! Exactly-once effect whatever happens: a normalizer killed between the upsert and the
//! checkpoint, three replicas on one backlog, lost notifications, and the admin port.

mod support;

use std::sync::Arc;
use std::time::Duration;

use etl_normalizer::batch::{Hook, HookPoint};
use etl_shared::raw::RawTable;
use etl_tests::{wait_for, SourceToml, TcpProxy, TestDb};
use support::*;
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(30);

/// A hook that reports the batch's backend pid at the first `AfterUpsert` and then never
/// returns: the batch is stuck between its upsert and its checkpoint until killed.
fn stall_after_first_upsert() -> (Hook, mpsc::UnboundedReceiver<i32>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let hook: Hook = Arc::new(move |point, pid| {
        let tx = tx.clone();
        Box::pin(async move {
            if point == HookPoint::AfterUpsert && tx.send(pid).is_ok() {
                std::future::pending::<()>().await;
            }
        })
    });
    (hook, rx)
}

/// 2,500 raw rows of source `api` with an apply log installed, and settings for normalizers
/// of them.
async fn api_backlog_of_2500(db: &TestDb) -> (tokio_postgres::Client, etl_normalizer::Settings) {
    let mut client = db.client().await;
    install_apply_log(&client).await;
    write_raw(
        &mut client,
        RawTable::Api,
        "api",
        &api_items(1..=2500),
        false,
    )
    .await;
    (client, settings(db, &sources_toml(&[])))
}

/// Another normalizer of `settings` takes source `api` over within `deadline` and normalizes
/// its 2,500 rows, each applied exactly once.
async fn survivor_finishes_the_backlog(
    client: &tokio_postgres::Client,
    settings: &etl_normalizer::Settings,
    deadline: Duration,
) {
    let survivor = normalizer(settings, None);
    wait_for("the survivor to take the source over", deadline, || async {
        survivor.run_source("api").await.ok()?;
        caught_up(client, "api").await.then_some(())
    })
    .await;
    assert_eq!(tallies(client, "api").await, (2500, 0, 2500));
    assert_eq!(
        apply_counts(client).await,
        (2500, 0),
        "every row applied exactly once"
    );
}

async fn crash_between_upsert_and_checkpoint(
    kill: impl AsyncFnOnce(&TestDb, i32, tokio::task::JoinHandle<()>),
) {
    let db = TestDb::new().await;
    let (client, settings) = api_backlog_of_2500(&db).await;
    let (hook, mut stalled) = stall_after_first_upsert();
    let doomed = normalizer(&settings, Some(hook));
    let task = tokio::spawn(async move {
        let _ = doomed.run_source("api").await;
    });
    let pid = tokio::time::timeout(DEADLINE, stalled.recv())
        .await
        .unwrap()
        .unwrap();

    kill(&db, pid, task).await;

    survivor_finishes_the_backlog(&client, &settings, DEADLINE).await;
    let bad: i64 = client
        .query_one(
            "SELECT count(*) FROM raw_api_data r JOIN normalized_data n USING (source, source_id)
             WHERE n.name <> r.data->>'title' OR n.value <> (r.data->>'price')::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0, "normalized = f(raw)");
}

#[tokio::test]
async fn a_backend_terminated_between_upsert_and_checkpoint_leaves_no_double_effect() {
    crash_between_upsert_and_checkpoint(
        async |db: &TestDb, pid: i32, task: tokio::task::JoinHandle<()>| {
            let admin = db.client().await;
            admin
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .unwrap();
            task.abort();
        },
    )
    .await;
}

#[tokio::test]
async fn a_task_aborted_between_upsert_and_checkpoint_leaves_no_double_effect() {
    crash_between_upsert_and_checkpoint(
        async |_: &TestDb, _: i32, task: tokio::task::JoinHandle<()>| {
            task.abort();
            let _ = task.await;
        },
    )
    .await;
}

#[tokio::test]
async fn three_replicas_share_a_backlog_and_normalize_every_row_exactly_once() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    install_apply_log(&client).await;
    let extra: Vec<_> = (1..=3)
        .map(|i| SourceToml::rest(&format!("feed{i}"), &format!("http://127.0.0.1:1/f{i}")))
        .collect();
    let settings = settings(&db, &sources_toml(&extra));
    let replicas = vec![
        Daemon::start(settings.clone()).await,
        Daemon::start(settings.clone()).await,
        Daemon::start(settings.clone()).await,
    ];

    // 100,000 rows over four sources, in several transactions, each announced.
    for (source, count) in [
        ("api", 40_000),
        ("feed1", 20_000),
        ("feed2", 20_000),
        ("feed3", 20_000),
    ] {
        for chunk in 0..4 {
            let first = chunk * count / 4 + 1;
            let last = (chunk + 1) * count / 4;
            let items: Vec<serde_json::Value> = (first..=last)
                .map(|g| serde_json::json!({"id": g.to_string(), "title": format!("item {g}"), "price": g}))
                .collect();
            write_raw(&mut client, RawTable::Api, source, &items, true).await;
        }
    }
    wait_for(
        "every source to be caught up",
        Duration::from_secs(120),
        || async {
            for source in ["api", "feed1", "feed2", "feed3"] {
                if !caught_up(&client, source).await {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;

    let normalized: i64 = client
        .query_one("SELECT count(*) FROM normalized_data", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(normalized, 100_000);
    assert_eq!(
        apply_counts(&client).await,
        (100_000, 0),
        "every row applied exactly once"
    );
    let mut shares = Vec::new();
    for replica in replicas {
        let metrics = reqwest::get(format!("{}/metrics", replica.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let inserted: u64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("etl_normalize_rows_total{") && l.contains("outcome=\"inserted\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        shares.push(inserted);
        replica.stop().await;
    }
    assert_eq!(shares.iter().sum::<u64>(), 100_000, "{shares:?}");
    assert!(
        shares.iter().all(|&s| s > 0),
        "work was not spread over the replicas: {shares:?}"
    );
}

#[tokio::test]
async fn with_its_listener_connection_killed_the_normalizer_reconnects_and_catches_up() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    // Poll interval an hour: only the reconnect's catch-up scan can find the rows in time.
    let daemon = Daemon::start(settings(&db, &sources_toml(&[]))).await;
    let listener_pids = "SELECT pid FROM pg_stat_activity
                         WHERE application_name = 'etl-normalizer-listen' AND datname = current_database()";
    wait_for("the listener to connect", DEADLINE, || async {
        (!client.query(listener_pids, &[]).await.unwrap().is_empty()).then_some(())
    })
    .await;
    write_raw(&mut client, RawTable::Api, "api", &api_items(1..=10), true).await;
    wait_for("the first rows", DEADLINE, || async {
        caught_up(&client, "api").await.then_some(())
    })
    .await;

    // Kill the listener and write while it is gone, without a notification: only the scan the
    // listener makes after reconnecting can find these rows within the hour.
    client
        .execute(
            &format!("SELECT pg_terminate_backend(pid) FROM ({listener_pids}) l"),
            &[],
        )
        .await
        .unwrap();
    write_raw(
        &mut client,
        RawTable::Api,
        "api",
        &api_items(11..=20),
        false,
    )
    .await;

    wait_for("the rows written while disconnected", DEADLINE, || async {
        caught_up(&client, "api").await.then_some(())
    })
    .await;
    assert_eq!(tallies(&client, "api").await.0, 20);
    // The rows can also be found by a wake-up still queued from the first ones, before the
    // listener notices its link is gone: wait for the reconnect to be counted, not just done.
    wait_for("the reconnect to be counted", DEADLINE, || async {
        let metrics = reqwest::get(format!("{}/metrics", daemon.admin))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metrics
            .contains("etl_normalize_listen_reconnects_total 1")
            .then_some(())
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn without_any_notification_the_poll_still_converges() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let mut settings = settings(&db, &sources_toml(&[]));
    settings.poll_interval = Duration::from_secs(1);
    let daemon = Daemon::start(settings).await;
    // A row from before the start, found by the start-up scan: once it is normalized, that
    // scan is over, and the next row can only be found by the poll.
    write_raw(
        &mut client,
        RawTable::Csv,
        "csv",
        &[serde_json::json!({"id": "0", "name": "n", "value": "4", "note": ""})],
        false,
    )
    .await;
    wait_for("the start-up scan", DEADLINE, || async {
        caught_up(&client, "csv").await.then_some(())
    })
    .await;

    write_raw(
        &mut client,
        RawTable::Csv,
        "csv",
        &[serde_json::json!({"id": "1", "name": "n", "value": "4", "note": ""})],
        false,
    )
    .await;

    wait_for("the poll to normalize the row", DEADLINE, || async {
        caught_up(&client, "csv").await.then_some(())
    })
    .await;
    assert_eq!(tallies(&client, "csv").await, (2, 0, 2));
    daemon.stop().await;
}

#[tokio::test]
async fn the_admin_port_reports_readiness_and_the_lag_per_source() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let mut settings = settings(&db, &sources_toml(&[]));
    settings.poll_interval = Duration::from_secs(3600);
    // Rows written before start and without NOTIFY, then the scrape races the start-up scan:
    // so measure lag with a normalizer that is not running, through its handler.
    write_raw(&mut client, RawTable::Api, "api", &api_items(1..=7), false).await;
    let idle = normalizer(&settings, None);
    idle.refresh_lag().await.unwrap();
    assert!(idle
        .metrics()
        .encode()
        .contains(r#"etl_normalize_lag_rows{source="api"} 7"#));
    // Scrapes read it at most every LAG_MAX_AGE: three more rows show on a refresh, not on a
    // scrape just after the last one.
    write_raw(&mut client, RawTable::Api, "api", &api_items(8..=10), false).await;
    idle.refresh_lag_cached().await.unwrap();
    assert!(idle
        .metrics()
        .encode()
        .contains(r#"etl_normalize_lag_rows{source="api"} 7"#));
    idle.refresh_lag().await.unwrap();
    assert!(idle
        .metrics()
        .encode()
        .contains(r#"etl_normalize_lag_rows{source="api"} 10"#));

    let daemon = Daemon::start(settings).await;
    wait_for("the start-up scan", DEADLINE, || async {
        caught_up(&client, "api").await.then_some(())
    })
    .await;
    let ready = reqwest::get(format!("{}/health/ready", daemon.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = reqwest::get(format!("{}/metrics", daemon.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"etl_normalize_lag_rows{source="api"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"etl_normalize_rows_total{source="api",outcome="inserted"} 10"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("etl_normalize_batch_duration_seconds_count{source=\"api\"} 1"),
        "{metrics}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_normalizer_frozen_mid_batch_loses_its_claim_to_another_replica_and_its_run_fails() {
    let db = TestDb::new().await;
    let (client, settings) = api_backlog_of_2500(&db).await;
    // One replica reaches the database through a proxy that freezes (no reset, no close) right
    // after its first upsert, with its batch transaction and its claim on the source open.
    let proxy = Arc::new(TcpProxy::to_database(&db.url).await);
    let mut frozen_settings = settings.clone();
    frozen_settings.database =
        etl_shared::DatabaseSettings::from_url(&proxy.url_for(&db.url)).unwrap();
    let (frozen_tx, mut frozen_at) = mpsc::unbounded_channel();
    let freezer = proxy.clone();
    let hook: Hook = Arc::new(move |point, pid| {
        let (proxy, tx) = (freezer.clone(), frozen_tx.clone());
        Box::pin(async move {
            if point == HookPoint::AfterUpsert && tx.send(pid).is_ok() {
                proxy.freeze();
            }
        })
    });
    let frozen = normalizer(&frozen_settings, Some(hook));
    let frozen_run = tokio::spawn(async move { frozen.run_source("api").await });
    tokio::time::timeout(DEADLINE, frozen_at.recv())
        .await
        .unwrap()
        .unwrap();

    // The server ends the stalled transaction (idle_in_transaction_session_timeout), which
    // frees the claim: the other replica normalizes everything, within a minute.
    // The frozen batch's upsert was rolled back with it: every row is applied exactly once.
    survivor_finishes_the_backlog(&client, &settings, Duration::from_secs(60)).await;

    // Back on the network, the frozen replica finds its session gone and records a failure (as
    // after a real partition, the server's goodbye may be lost to the reset that follows it).
    proxy.thaw();
    let outcome = tokio::time::timeout(DEADLINE, frozen_run)
        .await
        .expect("the frozen run ends once the network is back")
        .unwrap()
        .expect("its run is recorded");
    let summary = outcome.summary.expect("a recorded run");
    let error = summary.error.expect("the frozen run failed");
    assert!(
        error.contains("idle-in-transaction timeout") || error.contains("connection closed"),
        "{error}"
    );
    let status: String = client
        .query_one(
            "SELECT status FROM etl_runs WHERE id = $1",
            &[&summary.run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "failed");
}
