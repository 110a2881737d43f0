//! `etl-query migrate`, the stand-alone migration step a compose one-shot or a Helm hook runs.
//! (The ingester and normalizer share the same command through `etl_shared::migrate`.)

use std::process::{Command, Output};

use etl_tests::TestDb;

fn migrate_command(database_url: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_etl-query"));
    command.arg("migrate").env_remove("DATABASE_URL");
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    command.output().expect("run etl-query")
}

/// The SQL files in `migrations/`, every one of which a fresh database gets.
fn migration_files() -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "sql"))
        .count()
}

#[tokio::test]
async fn migrate_applies_the_schema_to_an_empty_database_then_finds_nothing_to_do() {
    let db = TestDb::empty().await;

    let first = migrate_command(Some(&db.url));
    let second = migrate_command(Some(&db.url));

    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        format!("migrations applied: {}", migration_files())
    );
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        "migrations applied: 0"
    );
    let client = db.client().await;
    let present: bool = client
        .query_one("SELECT to_regclass('normalized_data') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(present);
}

#[test]
fn without_database_url_the_service_refuses_to_start_and_names_the_variable() {
    let output = migrate_command(None);

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("DATABASE_URL is required but not set"),
        "{stderr}"
    );
}

#[test]
fn a_malformed_pool_size_stops_the_service_with_the_variable_named() {
    let output = Command::new(env!("CARGO_BIN_EXE_etl-query"))
        .arg("migrate")
        .env("DATABASE_URL", "postgres://u@127.0.0.1:1/db")
        .env("DATABASE_POOL_MAX_SIZE", "lots")
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("DATABASE_POOL_MAX_SIZE is invalid"),
        "{stderr}"
    );
}
