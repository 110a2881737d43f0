//! The Postgres bootstrap behind both README commands: it uses `DATABASE_URL` when that answers
//! and otherwise makes, runs and removes a throwaway cluster with the machine's own binaries.

use std::path::{Path, PathBuf};

use xtask::pg::{self, answers, BootstrapError, Cluster, Database, PgBinaries, Placement};

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
    let (root, entry) = (cluster.root.clone(), cluster.entry.clone());

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
    assert!(!entry.exists(), "registry entry left behind");
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

/// Stops a server left by a failed test, so a failing run leaks nothing either.
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.0.join("postmaster.pid").exists() {
            pg::kill_server(&self.0);
        }
    }
}

/// Starts a cluster with `placement`, pretends its owner was killed (its owner file names a
/// process that has exited and its own clean-up never runs), and has the next run reap it.
async fn reap_a_cluster_whose_owner_died(test: &str, placement: Placement) {
    let dir = clusters_dir(test);
    let cluster = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || Cluster::start_placed(&PgBinaries::find()?, &dir, placement)
    })
    .await
    .unwrap()
    .expect("a cluster starts");
    let (root, entry, url) = (cluster.root.clone(), cluster.entry.clone(), cluster.url());
    let _guard = StopOnDrop(cluster.data_dir());
    assert!(
        entry.starts_with(&dir),
        "registered under {}",
        dir.display()
    );
    match placement {
        Placement::TempFolder => assert!(
            !root.starts_with(&dir) && root.starts_with(std::env::temp_dir()),
            "{} is in the temp folder",
            root.display()
        ),
        // In a checkout the server's user cannot enter, the preferred place is the temp folder.
        Placement::Preferred => {}
    }
    let mut exited = std::process::Command::new("true").spawn().unwrap();
    exited.wait().unwrap();
    std::fs::write(cluster.owner_file(), exited.id().to_string()).unwrap();
    std::mem::forget(cluster);
    answers(&url)
        .await
        .expect("the abandoned server still runs");

    tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || pg::reap_stale(&dir)
    })
    .await
    .unwrap();

    assert!(answers(&url).await.is_err(), "stale server still running");
    assert!(
        !root.exists(),
        "stale cluster folder left behind: {}",
        root.display()
    );
    assert!(
        !entry.exists(),
        "stale registry entry left behind: {}",
        entry.display()
    );
}

#[tokio::test]
async fn a_cluster_whose_owner_died_is_stopped_and_removed_by_the_next_run() {
    reap_a_cluster_whose_owner_died("stale", Placement::Preferred).await;
}

#[tokio::test]
async fn a_cluster_in_the_temp_folder_whose_owner_died_is_found_and_removed_by_the_next_run() {
    reap_a_cluster_whose_owner_died("stale_in_temp", Placement::TempFolder).await;
}

#[tokio::test]
async fn a_cluster_whose_owner_lives_is_left_alone_by_the_reaper() {
    let dir = clusters_dir("live_owner");
    let cluster = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || Cluster::start_placed(&PgBinaries::find()?, &dir, Placement::TempFolder)
    })
    .await
    .unwrap()
    .expect("a cluster starts");

    pg::reap_stale(&dir);

    answers(&cluster.url())
        .await
        .expect("a cluster whose owner runs is kept");
    assert!(cluster.root.exists() && cluster.entry.exists());
    let (root, entry) = (cluster.root.clone(), cluster.entry.clone());
    cluster.stop().unwrap();
    assert!(!root.exists() && !entry.exists(), "stop removes both");
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
