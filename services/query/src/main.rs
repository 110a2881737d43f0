use anyhow::Context;
use clap::Parser;
use etl_shared::config::Env;

/// Serves normalized data, stats and health over HTTP with a generated OpenAPI spec.
#[derive(Parser)]
#[command(version)]
enum Command {
    /// Apply pending schema migrations and exit (for a compose one-shot or a Helm hook).
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = Command::parse();
    etl_shared::telemetry::init("query");
    let env = Env::from_process();
    match command {
        Command::Migrate => {
            let report = etl_shared::migrate::migrate_from_env(&env)
                .await
                .context("could not migrate the database")?;
            println!("migrations applied: {}", report.applied.len());
        }
    }
    Ok(())
}
