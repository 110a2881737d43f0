//! Postgres connections: a pool for ordinary queries and dedicated connections for the jobs a
//! pooled connection cannot do (holding a session advisory lock for migrations, `LISTEN`).

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseSettings;

pub type Pool = deadpool_postgres::Pool;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("could not build the connection pool: {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
    #[error("could not connect to Postgres: {0}")]
    Connect(#[source] tokio_postgres::Error),
}

/// The shared pool. Connections are opened lazily, so building it never touches the network;
/// the first query reports an unreachable database.
pub fn pool(settings: &DatabaseSettings) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        connection_config(settings),
        NoTls,
        // `Fast` skips the test query on checkout; a broken connection fails its query and is
        // dropped, and callers retry at the unit-of-work level anyway.
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(settings.pool_max_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(settings.connect_timeout))
        .wait_timeout(Some(settings.connect_timeout))
        .build()?)
}

/// A connection of its own, outside the pool, with its driver task. The task ends when the
/// client is dropped or the connection breaks.
pub async fn connect(
    settings: &DatabaseSettings,
) -> Result<(Client, JoinHandle<Result<(), tokio_postgres::Error>>), DbError> {
    let (client, connection) = connection_config(settings)
        .connect(NoTls)
        .await
        .map_err(DbError::Connect)?;
    Ok((client, tokio::spawn(connection)))
}

fn connection_config(settings: &DatabaseSettings) -> tokio_postgres::Config {
    let mut config = settings.config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(settings.connect_timeout);
    }
    if config.get_application_name().is_none() {
        if let Some(name) = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        {
            // Shows which service a backend belongs to in pg_stat_activity.
            config.application_name(&name);
        }
    }
    config
}

/// `url` with its database name replaced, for tools that make a database per test or benchmark
/// next to the one they were given. Only `postgres://` URLs are supported.
pub fn url_with_database(url: &str, dbname: &str) -> String {
    let scheme_end = url
        .find("://")
        .map(|i| i + 3)
        .unwrap_or_else(|| panic!("the database URL is not a postgres:// URL"));
    let (base, query) = match url.find('?') {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{dbname}{query}", &base[..authority_end])
}

#[cfg(test)]
mod tests {
    use super::url_with_database as with_database;

    #[test]
    fn with_database_replaces_only_the_database_name() {
        assert_eq!(
            with_database("postgres://u:p@h:5/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h:5/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:5", "t1"), "postgres://h:5/t1");
        assert_eq!(
            with_database("postgresql://h/db", "t2"),
            "postgresql://h/t2"
        );
    }
}
