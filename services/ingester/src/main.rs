use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use etl_ingester::{Application, Ingester, Settings};
use etl_shared::config::Env;

/// Pulls REST and CSV sources over HTTP into the raw tables and notifies the normalizer.
///
/// Configuration comes from the environment: DATABASE_URL, SOURCES_FILE, INGESTER_ADMIN_ADDR.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every source on its schedule, with the admin port, until SIGTERM (the default).
    Run,
    /// Run sources once and exit: non-zero if any run failed (for cron jobs).
    Ingest {
        /// Only this source (default: all of them, concurrently).
        #[arg(long)]
        source: Option<String>,
    },
    /// Apply pending schema migrations and exit (for a compose one-shot or a Helm hook).
    Migrate,
    /// Remove a source's raw and normalized rows, checkpoint and rejects (its runs stay, as
    /// history): for a source taken out of the sources file.
    Purge {
        #[arg(long)]
        source: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    return_large_buffers_when_freed();
    let cli = Cli::parse();
    let telemetry = etl_shared::telemetry::init("ingester").context("invalid configuration")?;
    let outcome = run(cli).await;
    // Flushes the spans still queued (bounded), off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    outcome
}

/// Has glibc map every allocation of 128 KiB or more on its own, so freeing it returns the
/// memory to the system. Left alone, glibc raises that threshold to the largest block freed
/// so far (up to 32 MiB), and a record's buffers after the first large one come from, and stay
/// in, per-thread heaps: 40 records of 10 MB took the ingester's peak from 45 to 64 MiB.
/// Other C libraries (musl) return large blocks anyway; nothing to set there.
fn return_large_buffers_when_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MAPPED_FROM_BYTES: libc::c_int = 128 * 1024;
        // SAFETY: mallopt only changes an allocator setting, which glibc allows at any time
        // from any thread; it takes no pointers.
        #[allow(unsafe_code)]
        let accepted = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MAPPED_FROM_BYTES) };
        if accepted != 1 {
            eprintln!("glibc refused M_MMAP_THRESHOLD={MAPPED_FROM_BYTES}; large buffers may stay resident after use");
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let env = Env::from_process();
    match cli.command.unwrap_or(Command::Run) {
        Command::Migrate => {
            let report = etl_shared::migrate::migrate_from_env(&env)
                .await
                .context("could not migrate the database")?;
            println!("migrations applied: {}", report.applied.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let settings = Settings::from_env(&env).context("invalid configuration")?;
            let app = Application::build(settings, etl_shared::shutdown::on_signal()).await?;
            app.run_until_stopped().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Purge { source } => purge(&env, &source).await,
        Command::Ingest { source } => {
            let settings = Settings::from_env(&env).context("invalid configuration")?;
            ingest_once(settings, source).await
        }
    }
}

/// Purges one source; needs only the database (`SOURCES_FILE`, when set, is read to warn about
/// a source that is still in it and will be ingested again).
async fn purge(env: &Env, source: &str) -> anyhow::Result<ExitCode> {
    let database = etl_shared::DatabaseSettings::from_env(env).context("invalid configuration")?;
    let still_listed = match env.get(etl_shared::sources::Sources::FILE_VAR) {
        Ok(Some(path)) => etl_shared::sources::Sources::load(path.as_ref())
            .context("invalid configuration")?
            .get(source)
            .is_some(),
        _ => false,
    };
    etl_shared::db::check_at_start(&database, etl_shared::db::Needs::Transactions).await?;
    let pool = etl_shared::db::pool(&database, etl_shared::db::Needs::Transactions)?;
    let purged = etl_ingester::purge::purge(&pool, source)
        .await
        .with_context(|| format!("could not purge {source:?}"))?;
    println!(
        "purged {source}: {} raw rows, {} normalized rows, {} rejects{}; its {} runs are kept as history",
        purged.raw_rows,
        purged.normalized_rows,
        purged.rejects,
        if purged.checkpoint { ", its checkpoint" } else { "" },
        purged.runs_kept,
    );
    if still_listed {
        println!("note: {source:?} is still in the sources file, so its next run ingests it again");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the sources once, concurrently, and prints one line per source.
async fn ingest_once(settings: Settings, only: Option<String>) -> anyhow::Result<ExitCode> {
    etl_shared::db::check_at_start(&settings.database, etl_shared::db::Needs::Session).await?;
    // Each run reaps interrupted runs of dead processes before it starts.
    let pool = etl_shared::db::pool(&settings.database, etl_shared::db::Needs::Session)?;
    let ingester = Ingester::new(&settings, pool, etl_shared::shutdown::on_signal());
    let names: Vec<String> = match only {
        Some(name) => vec![name],
        None => settings
            .sources
            .sources
            .iter()
            .map(|s| s.name.clone())
            .collect(),
    };
    // No daemon prunes history in cron mode: each one-shot does.
    if let Err(e) = etl_shared::runs::prune_history(ingester.pool(), settings.retention_days).await
    {
        eprintln!("could not prune history: {e}");
    }
    let runs = names.iter().map(|name| ingester.run_source(name));
    let mut failed = 0;
    for (name, result) in names.iter().zip(futures_util::future::join_all(runs).await) {
        match result {
            Ok(summary) => match summary.error {
                None => println!("{name}: ok (run {}): {:?}", summary.run_id, summary.counts),
                Some(error) => {
                    failed += 1;
                    println!("{name}: FAILED (run {}): {error}", summary.run_id);
                }
            },
            Err(e) => {
                failed += 1;
                println!("{name}: FAILED: {e}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
