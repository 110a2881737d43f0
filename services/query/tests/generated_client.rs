//! The Python client generated from the committed spec (by `cargo xtask test`, with
//! openapi-python-client) pages through `/data` by number and by cursor, reads `/stats` and gets a typed problem back
//! for a bad request, against the running service.

use std::process::Command;

use etl_query::{Application, Settings};
use etl_shared::config::Env;
use etl_tests::TestDb;
use tokio_util::sync::CancellationToken;

fn generated_client() -> (String, String) {
    match (
        std::env::var("ETL_PYTHON"),
        std::env::var("ETL_PY_CLIENT_DIR"),
    ) {
        (Ok(python), Ok(dir)) => (python, dir),
        _ => panic!(
            "ETL_PYTHON / ETL_PY_CLIENT_DIR are not set: run the suite with `cargo xtask test`, \
             which validates the spec and generates the client"
        ),
    }
}

#[tokio::test]
async fn the_generated_python_client_pages_through_data_and_reads_stats() {
    let (python, client_dir) = generated_client();
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "SELECT etl_ensure_partition('gen');
             INSERT INTO normalized_data (source, source_id, name, value, description)
             SELECT 'gen', g::text, 'item ' || g, g, CASE WHEN g % 2 = 0 THEN 'even' END
             FROM generate_series(1, 23) g;
             INSERT INTO etl_checkpoint (source, normalized_rows) VALUES ('gen', 23);",
        )
        .await
        .unwrap();
    let settings = Settings::from_env(&Env::from_pairs([
        ("DATABASE_URL", db.url.as_str()),
        ("QUERY_ADDR", "127.0.0.1:0"),
    ]))
    .unwrap();
    let shutdown = CancellationToken::new();
    let app = Application::build(settings, shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{}", app.addr());
    tokio::spawn(app.run_until_stopped());

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client_smoke.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(base)
            .arg("23")
            .env("PYTHONPATH", client_dir)
            .output()
            .unwrap()
    })
    .await
    .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "paged 23 records over 4 pages, by cursor over 4; stats total 23"
    );
    shutdown.cancel();
}
