//! `cargo xtask <command>`: the project's developer commands. Each provisions Postgres first
//! (`DATABASE_URL` if it answers, else a throwaway cluster under `target/pg`) and removes what it
//! started when it ends, also on ctrl-c or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::process::Command;
use xtask::pg::{self, Database};

#[derive(Parser)]
#[command(about = "Developer commands for the ETL platform")]
enum Cli {
    /// Run the whole test suite against a self-provisioned Postgres.
    ///
    /// Extra arguments go to `cargo nextest run` (e.g. a test name filter).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Start Postgres and migrate it, then wait until ctrl-c.
    Up,
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let database = provision().await?;
    let outcome = match cli {
        Cli::Test { args } => test(&database, args).await,
        Cli::Up => up(&database).await,
    };
    database
        .shutdown()
        .context("could not stop the throwaway Postgres cluster")?;
    outcome
}

async fn provision() -> Result<Database> {
    let url = std::env::var("DATABASE_URL").ok();
    let database = pg::provision(url.as_deref(), &clusters_dir())
        .await
        .context("could not provision Postgres")?;
    match &database {
        Database::External { .. } => eprintln!("xtask: using the Postgres at DATABASE_URL"),
        Database::Throwaway(cluster) => eprintln!(
            "xtask: started a throwaway Postgres on 127.0.0.1:{} in {}",
            cluster.port,
            cluster.root.display()
        ),
    }
    Ok(database)
}

fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

/// The ignored build folder, so `cargo clean` removes what xtask leaves there too.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"))
}

fn clusters_dir() -> PathBuf {
    target_dir().join("pg")
}

async fn test(database: &Database, args: Vec<String>) -> Result<ExitCode> {
    let client = tokio::task::spawn_blocking(|| {
        xtask::pyclient::validate_and_generate(&workspace_dir(), &target_dir())
    })
    .await??;
    eprintln!("xtask: OpenAPI spec valid; Python client generated");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_nextest = Command::new(&cargo)
        .args(["nextest", "--version"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    let mut command = Command::new(&cargo);
    if has_nextest {
        command.args(["nextest", "run", "--workspace"]);
    } else {
        eprintln!(
            "xtask: cargo-nextest not found (`cargo install cargo-nextest`); using cargo test"
        );
        command.args(["test", "--workspace"]);
    }
    command
        .args(args)
        .env("DATABASE_URL", database.url())
        .env("ETL_PYTHON", &client.python)
        .env("ETL_PY_CLIENT_DIR", &client.package_dir);
    run_to_end(command).await
}

async fn up(database: &Database) -> Result<ExitCode> {
    let settings = etl_shared::DatabaseSettings::from_url(&database.url())?;
    let report = etl_shared::migrate(&settings)
        .await
        .context("could not migrate the database")?;
    println!(
        "Postgres is ready and migrated ({} migration(s) applied now).\n\
         DATABASE_URL={}\n\
         The ingester, normalizer and query services are not built yet; this holds the database \
         until ctrl-c.",
        report.applied.len(),
        database.url()
    );
    stop_requested().await;
    Ok(ExitCode::SUCCESS)
}

/// Runs a child to completion. On ctrl-c the child (in our process group) gets the signal too;
/// on SIGTERM we pass it on. Either way we wait for it, so the cluster outlives its users.
async fn run_to_end(mut command: Command) -> Result<ExitCode> {
    let mut child = command.spawn().context("could not start the test runner")?;
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = stop_requested() => {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
            child.wait().await?
        }
    };
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
