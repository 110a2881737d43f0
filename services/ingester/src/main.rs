use anyhow::Context;
use clap::Parser;
use etl_ingester::Settings;
use etl_shared::config::Env;

/// Pulls REST and CSV sources over HTTP into the raw tables and notifies the normalizer.
#[derive(Parser)]
#[command(version)]
enum Command {
    /// Apply pending schema migrations and exit (for a compose one-shot or a Helm hook).
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = Command::parse();
    etl_shared::telemetry::init("ingester");
    let settings = Settings::from_env(&Env::from_process()).context("invalid configuration")?;
    match command {
        Command::Migrate => {
            let report = etl_shared::migrate(&settings.database)
                .await
                .context("could not migrate the database")?;
            println!("migrations applied: {}", report.applied.len());
        }
    }
    Ok(())
}
