//! Shared foundation of the ETL services: one place for configuration, the Postgres pool, the
//! embedded schema migrations, logging start-up and the shutdown signal, so the three services
//! behave the same way and stay thin.

pub mod admin;
pub mod bearer;
pub mod config;
pub mod console;
pub mod db;
pub mod metrics;
pub mod migrate;
pub mod pacing;
pub mod problem;
pub mod raw;
pub mod runs;
pub mod shutdown;
pub mod sources;
pub mod telemetry;
pub mod tls;

pub use config::{ConfigError, DatabaseSettings};
pub use db::{DbError, Pool};
pub use migrate::{migrate, MigrateError, MigrationReport};
pub use raw::{RAW_READY_CHANNEL, RAW_WRITE_LOCK_CLASS};

/// An error and every cause under it, joined with `: `. Some errors (tokio-postgres's among them)
/// keep the part that explains them in their source, not in their own message: this is the
/// text to record or log when an error becomes a string.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let part = e.to_string();
        // Skip a cause whose message is already included (errors that print their source).
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner: the reason")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("outer says {0}")]
    struct Repeats(#[source] Inner);

    #[test]
    fn the_chain_carries_every_cause_once() {
        assert_eq!(error_chain(&Outer(Inner)), "outer: inner: the reason");
        assert_eq!(error_chain(&Repeats(Inner)), "outer says inner: the reason");
    }
}
