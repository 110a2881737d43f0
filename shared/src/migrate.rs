//! The schema migrations in `migrations/`, embedded in every binary, and the one way to apply
//! them. Any service can migrate (`<service> migrate`), so a compose one-shot or a Helm hook needs
//! no extra image.

use tokio_postgres::Client;

use crate::config::{ConfigError, DatabaseSettings, Env};
use crate::db::{self, DbError};

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Session advisory lock held while migrating, so replicas starting together queue up instead of
/// racing on `CREATE TABLE` (which fails with a unique violation in the catalog). The number is
/// arbitrary but fixed: "etl_migr" in ASCII.
const MIGRATION_LOCK_KEY: i64 = 0x6574_6c5f_6d69_6772;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] DbError),
    #[error("could not take the migration lock: {0}")]
    Lock(#[source] tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

/// What one call applied; empty when the schema was already current.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<String>,
}

/// Brings the database at `settings` to the newest schema. Safe to run twice and concurrently.
#[tracing::instrument(skip_all, err)]
pub async fn migrate(settings: &DatabaseSettings) -> Result<MigrationReport, MigrateError> {
    let (mut client, connection) = db::connect(settings).await?;
    let report = migrate_with(&mut client).await;
    drop(client);
    // The lock is session-scoped: closing the connection releases it even if unlocking failed.
    let _ = connection.await;
    report
}

/// The `<service> migrate` command: reads only the database settings (so a migration job needs
/// no sources file) and migrates.
pub async fn migrate_from_env(env: &Env) -> Result<MigrationReport, MigrateError> {
    migrate(&DatabaseSettings::from_env(env)?).await
}

/// Migrates over a connection the caller owns (it must not be pooled: the lock is per session).
pub async fn migrate_with(client: &mut Client) -> Result<MigrationReport, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(MigrateError::Lock)?;
    let outcome = embedded::migrations::runner().run_async(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = outcome?;
    unlocked.map_err(MigrateError::Lock)?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect();
    for name in &applied {
        tracing::info!(migration = %name, "applied migration");
    }
    Ok(MigrationReport { applied })
}

/// Every embedded migration, in order, as (name, checksum of its SQL): `("V1__initial_schema", …)`.
pub fn embedded_migrations() -> Vec<(String, u64)> {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| (m.to_string(), m.checksum()))
        .collect()
}
