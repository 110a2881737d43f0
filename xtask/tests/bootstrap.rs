//! The Postgres bootstrap behind both README commands: it uses `DATABASE_URL` when that answers
//! and otherwise makes, runs and removes a throwaway cluster with the machine's own binaries.

use std::path::{Path, PathBuf};

use xtask::pg::{self, answers, BootstrapError, Database, PgBinaries};

/// A folder under the build directory (`target/tmp`) that only this test uses.
fn clusters_dir(test: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("bootstrap")
        .join(test)
}

async fn server_version(url: &str) -> String {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0)
}

fn folders_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

#[tokio::test]
async fn without_database_url_a_throwaway_cluster_is_started_and_removed() {
    let dir = clusters_dir("without_url");

    let database = pg::provision(None, &dir)
        .await
        .expect("provision a cluster");

    let Database::Throwaway(cluster) = &database else {
        panic!("expected a throwaway cluster, got {database:?}");
    };
    assert!(cluster.root.starts_with(&dir) || cluster.root.starts_with(std::env::temp_dir()));
    assert!(cluster.data_dir().join("PG_VERSION").is_file());
    let url = database.url();
    assert!(url.starts_with("postgres://postgres@127.0.0.1:"), "{url}");
    assert!(!server_version(&url).await.is_empty());
    let root = cluster.root.clone();

    database.shutdown().expect("stop the cluster");

    assert!(
        answers(&url).await.is_err(),
        "server still answers after shutdown"
    );
    assert!(
        !root.exists(),
        "cluster folder left behind: {}",
        root.display()
    );
}

#[tokio::test]
async fn with_database_url_that_answers_that_server_is_used_and_nothing_is_started() {
    // `cargo xtask test` hands the suite a server that answers: the one under test here.
    let url = std::env::var("DATABASE_URL").expect("run through `cargo xtask test`");
    let dir = clusters_dir("with_url");

    let database = pg::provision(Some(&url), &dir).await.expect("provision");

    assert!(
        matches!(&database, Database::External { url: u } if *u == url),
        "{database:?}"
    );
    assert_eq!(folders_in(&dir), 0, "no cluster may be created");
    database.shutdown().unwrap();
    answers(&url)
        .await
        .expect("an external server is left running");
}

#[tokio::test]
async fn with_database_url_that_does_not_answer_a_throwaway_cluster_is_used() {
    let dir = clusters_dir("dead_url");
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let dead = "postgres://postgres@127.0.0.1:1/postgres";

    let database = pg::provision(Some(dead), &dir).await.expect("provision");

    assert!(matches!(database, Database::Throwaway(_)), "{database:?}");
    assert_ne!(database.url(), dead);
    answers(&database.url())
        .await
        .expect("the fallback cluster answers");
    database.shutdown().unwrap();
}

#[tokio::test]
async fn a_cluster_whose_owner_died_is_stopped_and_removed_by_the_next_run() {
    let dir = clusters_dir("stale");
    let database = pg::provision(None, &dir).await.unwrap();
    let Database::Throwaway(cluster) = database else {
        panic!("expected a throwaway cluster");
    };
    let (root, url) = (cluster.root.clone(), cluster.url());
    // Pretend the owning process was killed: point owner.pid at a process that has exited, and
    // skip the cluster's own clean-up.
    let mut exited = std::process::Command::new("true").spawn().unwrap();
    exited.wait().unwrap();
    std::fs::write(root.join("owner.pid"), exited.id().to_string()).unwrap();
    std::mem::forget(cluster);

    pg::reap_stale(&dir);

    assert!(answers(&url).await.is_err(), "stale server still running");
    assert!(!root.exists(), "stale cluster folder left behind");
}

#[test]
fn with_no_postgres_binaries_the_error_says_how_to_install_them() {
    let err = PgBinaries::find_in(&[], Path::new("/nonexistent")).unwrap_err();

    assert!(matches!(err, BootstrapError::NoBinaries));
    let message = err.to_string();
    assert!(message.contains("apt-get install postgresql"), "{message}");
    assert!(message.contains("DATABASE_URL"), "{message}");
}

#[test]
fn binaries_are_found_under_the_versioned_folder_when_not_on_path() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-pg-lib");
    for version in ["13", "15"] {
        let bin = root.join(version).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for tool in ["initdb", "pg_ctl"] {
            std::fs::write(bin.join(tool), "").unwrap();
        }
    }

    let found = PgBinaries::find_in(&[], &root).unwrap();

    assert_eq!(
        found.bin_dir,
        root.join("15").join("bin"),
        "the newest version wins"
    );
}
