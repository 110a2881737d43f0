//! Shared foundation of the ETL services: one place for configuration, the Postgres pool, the
//! embedded schema migrations, logging start-up and the shutdown signal, so the three services
//! behave the same way and stay thin.

pub mod admin;
pub mod config;
pub mod db;
pub mod metrics;
pub mod migrate;
pub mod runs;
pub mod shutdown;
pub mod sources;
pub mod telemetry;

pub use config::{ConfigError, DatabaseSettings};
pub use db::{DbError, Pool};
pub use migrate::{migrate, MigrateError, MigrationReport};

/// The `NOTIFY` channel on which the ingester announces new raw changes; the payload is the
/// source name. Notifications are only hints: the normalizer also polls.
pub const RAW_READY_CHANNEL: &str = "etl_raw_ready";

/// Class of the per-source write lock on the raw tables (two-key advisory lock: this and
/// `hashtext(source)`), held by every raw writer from drawing change ids until commit. Within a
/// source, change ids then become visible in order, so the normalizer's "last change id"
/// checkpoint never skips a slower transaction. Anything else that writes raw rows must take it.
pub const RAW_WRITE_LOCK_CLASS: i32 = 0x4554_4c31; // "ETL1"
