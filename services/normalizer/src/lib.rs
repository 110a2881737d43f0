//! The normalizer service. Turns raw rows into normalized records, exactly once, with checkpoints.
//!
//! `main.rs` only parses the command line and starts logging; everything a test needs to start
//! and stop the service lives here.

use etl_shared::config::{ConfigError, DatabaseSettings, Env};

/// Everything the normalizer reads from its environment, validated at start-up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseSettings,
}

impl Settings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            database: DatabaseSettings::from_env(env)?,
        })
    }
}
