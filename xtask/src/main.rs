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
    /// Run the whole system: Postgres, the three services and a demo source, until ctrl-c.
    Up,
    /// Stop a stack started by `up` in another terminal.
    Down,
    /// Measure the pipeline against Postgres's own ceiling; writes the table to BENCHMARKS.md.
    Bench {
        /// A small smoke run (as CI does); its table goes to target/bench/BENCHMARKS-quick.md.
        #[arg(long)]
        quick: bool,
    },
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli {
        Cli::Down => {
            xtask::stack::down(&target_dir())?;
            return Ok(ExitCode::SUCCESS);
        }
        Cli::Up => {
            if let Some(pid) = xtask::stack::running(&target_dir()) {
                eprintln!(
                    "a stack is already running (pid {pid}); stop it with `cargo xtask down` \
                     (or ctrl-c in its terminal) first"
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        Cli::Test { .. } | Cli::Bench { .. } => {}
    }
    let database = provision().await?;
    let outcome = match cli {
        Cli::Test { args } => test(&database, args).await,
        Cli::Up => up(&database).await,
        Cli::Bench { quick } => bench(&database, quick).await,
        Cli::Down => unreachable!("handled before provisioning"),
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
    let ts_client = tokio::task::spawn_blocking(|| {
        xtask::tsclient::generate_and_check(&workspace_dir(), &target_dir())
    })
    .await??;
    eprintln!("xtask: TypeScript client generated and type-checked");
    let browser_bridge =
        tokio::task::spawn_blocking(|| xtask::browser::install(&workspace_dir(), &target_dir()))
            .await??;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The end-to-end tests run the real binaries as processes: build them first.
    let built = Command::new(&cargo)
        .args(["build", "--quiet", "--bins", "--workspace"])
        .status()
        .await?;
    if !built.success() {
        anyhow::bail!("building the service binaries failed");
    }
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
        .env("ETL_PY_CLIENT_DIR", &client.package_dir)
        .env("ETL_NODE", &ts_client.node)
        .env("ETL_TS_CLIENT_SMOKE", &ts_client.smoke_script)
        .env("ETL_BROWSER_BRIDGE", &browser_bridge)
        .env("ETL_BIN_DIR", target_dir().join("debug"));
    run_to_end(command).await
}

async fn up(database: &Database) -> Result<ExitCode> {
    let url = database.url();
    let settings = etl_shared::DatabaseSettings::from_url(&url)?;
    etl_shared::migrate(&settings)
        .await
        .context("could not migrate the database")?;
    let target = target_dir();
    let pid_file = xtask::stack::pid_file(&target);
    std::fs::create_dir_all(pid_file.parent().expect("pid file has a folder"))?;
    std::fs::write(&pid_file, std::process::id().to_string())?;
    eprintln!("xtask: building and starting the services; the demo sources are ingested next");
    let started = xtask::stack::start(&workspace_dir(), &target, &url).await;
    let stack = match started {
        Ok(stack) => stack,
        Err(e) => {
            let _ = std::fs::remove_file(&pid_file);
            return Err(e);
        }
    };
    let api = format!("http://{}", stack.query_addr);
    println!(
        "\nThe ETL platform is up: the demo sources are ingested and normalized.\n\n\
         Console      {api}/console\n\
         Swagger UI   {api}/docs\n\
         OpenAPI      {api}/openapi.json\n\
         API key      {key}   (an admin key made for this stack: the console asks for it)\n\n\
         Try:\n  export KEY={key}\n\
         \x20 curl -H \"Authorization: Bearer $KEY\" '{api}/data?page=1&page_size=5'\n\
         \x20 curl -H \"Authorization: Bearer $KEY\" '{api}/data?search=lamp&source=products'\n\
         \x20 curl -H \"Authorization: Bearer $KEY\" '{api}/stats'\n\n\
         Database     {url}\n\
         Logs         {}\n\n\
         Stop with ctrl-c here, or `cargo xtask down` (`just down`) from another terminal.",
        stack.logs.display(),
        key = stack.api_key,
    );
    stop_requested().await;
    eprintln!("xtask: stopping the services");
    let stopped = stack.stop().await;
    let _ = std::fs::remove_file(&pid_file);
    stopped?;
    Ok(ExitCode::SUCCESS)
}

async fn bench(database: &Database, quick: bool) -> Result<ExitCode> {
    let target = target_dir();
    let bench = xtask::bench::Bench {
        workspace: workspace_dir(),
        admin_url: database.url(),
        sizes: if quick {
            xtask::bench::Sizes::QUICK
        } else {
            xtask::bench::Sizes::FULL
        },
        output: if quick {
            target.join("bench").join("BENCHMARKS-quick.md")
        } else {
            workspace_dir().join("BENCHMARKS.md")
        },
        target,
    };
    tokio::select! {
        outcome = bench.run() => outcome.map(|()| ExitCode::SUCCESS),
        _ = stop_requested() => {
            eprintln!("xtask: benchmark interrupted");
            Ok(ExitCode::FAILURE)
        }
    }
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
