use anyhow::Context;
use clap::{Parser, Subcommand};
use etl_normalizer::{Application, Normalizer, Settings};
use etl_shared::config::Env;

/// Turns raw rows into normalized records, exactly once, with checkpoints.
///
/// Configuration comes from the environment: DATABASE_URL, SOURCES_FILE, NORMALIZER_ADMIN_ADDR,
/// NORMALIZER_POLL_INTERVAL_SECS, NORMALIZER_BATCH_SIZE.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// LISTEN and normalize until SIGTERM (the default). Run as many replicas as you like.
    Run,
    /// Apply pending schema migrations and exit (for a compose one-shot or a Helm hook).
    Migrate,
    /// Re-normalize a source from its raw rows with the current mapping, built apart and
    /// swapped in whole; returns once the new version is served.
    Replay {
        #[arg(long)]
        source: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = etl_shared::telemetry::init("normalizer").context("invalid configuration")?;
    let outcome = run(cli).await;
    // Flushes the spans still queued (bounded), off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    outcome
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let env = Env::from_process();
    match cli.command.unwrap_or(Command::Run) {
        Command::Migrate => {
            let database =
                etl_shared::DatabaseSettings::from_env(&env).context("invalid configuration")?;
            let report = etl_shared::migrate(&database)
                .await
                .context("could not migrate the database")?;
            println!("migrations applied: {}", report.applied.len());
        }
        Command::Replay { source } => {
            let settings = Settings::from_env(&env).context("invalid configuration")?;
            etl_shared::db::check_at_start(&settings.database, etl_shared::db::Needs::Session)
                .await?;
            let pool = etl_shared::db::pool(&settings.database, etl_shared::db::Needs::Session)?;
            let normalizer = Normalizer::new(&settings, pool, etl_shared::shutdown::on_signal());
            let counts = normalizer
                .replay(&source)
                .await
                .with_context(|| format!("the replay of {source:?} did not complete"))?;
            println!(
                "replayed {source}: {} normalized ({} new, {} changed, {} unchanged), {} rejected, {} withdrawn",
                counts.processed - counts.rejected,
                counts.inserted,
                counts.updated,
                counts.unchanged,
                counts.rejected,
                counts.deleted,
            );
        }
        Command::Run => {
            let settings = Settings::from_env(&env).context("invalid configuration")?;
            let pool = etl_shared::db::pool(&settings.database, etl_shared::db::Needs::Session)?;
            let normalizer = Normalizer::new(&settings, pool, etl_shared::shutdown::on_signal());
            Application::build(settings, normalizer)
                .await?
                .run_until_stopped()
                .await?;
        }
    }
    Ok(())
}
