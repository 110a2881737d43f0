use anyhow::Context;
use clap::{Parser, Subcommand};
use etl_query::{Application, Settings};
use etl_shared::config::Env;

/// Serves normalized data, stats and health over HTTP with a generated OpenAPI spec.
///
/// Configuration comes from the environment: DATABASE_URL, QUERY_ADDR, QUERY_CORS_ORIGINS,
/// QUERY_STATEMENT_TIMEOUT_MS, QUERY_REQUEST_TIMEOUT_SECS, QUERY_STATS_MAX_AGE_SECS,
/// QUERY_API_KEYS_FILE, QUERY_RATE_LIMIT_PER_SECOND, QUERY_TLS_CERT_FILE, QUERY_TLS_KEY_FILE.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API until SIGTERM (the default).
    Serve,
    /// Print the OpenAPI spec (JSON) and exit.
    Spec,
    /// Apply pending schema migrations and exit (for a compose one-shot or a Helm hook).
    Migrate,
    /// Make an API key for client NAME: prints the key (give it to the client; it is kept
    /// nowhere) and the entry to add to QUERY_API_KEYS_FILE.
    ApiKey {
        /// Who the key is for (shown in the request logs).
        name: String,
        /// The key may also ask for actions (the console's "run now" and "replay").
        #[arg(long)]
        admin: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = etl_shared::telemetry::init("query").context("invalid configuration")?;
    let outcome = run(cli).await;
    // Flushes the spans still queued (bounded), off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    outcome
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let env = Env::from_process();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            let report = etl_shared::migrate::migrate_from_env(&env)
                .await
                .context("could not migrate the database")?;
            println!("migrations applied: {}", report.applied.len());
        }
        Command::Spec => println!("{}", etl_query::openapi_json()),
        Command::ApiKey { name, admin } => {
            let (key, entry) = etl_query::access::new_key(&name, admin);
            eprintln!("the key for {name:?} (shown once: it is kept nowhere):");
            println!("{key}");
            eprintln!("its entry for QUERY_API_KEYS_FILE:\n\n{entry}");
        }
        Command::Serve => {
            let settings = Settings::from_env(&env).context("invalid configuration")?;
            Application::build(settings, etl_shared::shutdown::on_signal())
                .await?
                .run_until_stopped()
                .await?;
        }
    }
    Ok(())
}
