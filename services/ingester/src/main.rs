use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use etl_ingester::{Application, Ingester, Settings};
use etl_shared::config::Env;
use etl_shared::runs::{reap_interrupted, Service};

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
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    etl_shared::telemetry::init("ingester");
    let env = Env::from_process();
    if let Some(Command::Migrate) = cli.command {
        let database =
            etl_shared::DatabaseSettings::from_env(&env).context("invalid configuration")?;
        let report = etl_shared::migrate(&database)
            .await
            .context("could not migrate the database")?;
        println!("migrations applied: {}", report.applied.len());
        return Ok(ExitCode::SUCCESS);
    }
    let settings = Settings::from_env(&env).context("invalid configuration")?;
    let shutdown = etl_shared::shutdown::on_signal();
    match cli.command {
        None | Some(Command::Run) => {
            let app = Application::build(settings, shutdown).await?;
            app.run_until_stopped().await?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Ingest { source }) => {
            let pool = etl_shared::db::pool(&settings.database)?;
            reap_interrupted(&pool, Service::Ingester)
                .await
                .context("could not reach the database")?;
            let ingester = Ingester::new(&settings, pool, shutdown);
            let names: Vec<String> = match source {
                Some(name) => vec![name],
                None => settings
                    .sources
                    .sources
                    .iter()
                    .map(|s| s.name.clone())
                    .collect(),
            };
            let runs = names.iter().map(|name| ingester.run_source(name));
            let mut failed = 0;
            for (name, result) in names.iter().zip(futures_util::future::join_all(runs).await) {
                match result {
                    Ok(summary) if summary.error.is_none() => {
                        println!("{name}: ok (run {}): {:?}", summary.run_id, summary.counts)
                    }
                    Ok(summary) => {
                        failed += 1;
                        println!(
                            "{name}: FAILED (run {}): {}",
                            summary.run_id,
                            summary.error.unwrap_or_default()
                        );
                    }
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
        Some(Command::Migrate) => unreachable!("handled above"),
    }
}
