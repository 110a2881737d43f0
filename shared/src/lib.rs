//! Shared foundation of the ETL services: one place for configuration, the Postgres pool, the
//! embedded schema migrations, logging start-up and the shutdown signal, so the three services
//! behave the same way and stay thin.

pub mod admin;
pub mod config;
pub mod db;
pub mod metrics;
pub mod migrate;
pub mod problem;
pub mod raw;
pub mod runs;
pub mod shutdown;
pub mod sources;
pub mod telemetry;

pub use config::{ConfigError, DatabaseSettings};
pub use db::{DbError, Pool};
pub use migrate::{migrate, MigrateError, MigrationReport};
pub use raw::{RAW_READY_CHANNEL, RAW_WRITE_LOCK_CLASS};
