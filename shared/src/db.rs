//! Postgres connections: a pool for ordinary queries and dedicated connections for the jobs a
//! pooled connection cannot do (holding a session advisory lock for migrations, `LISTEN`).

use std::time::Duration;

use deadpool_postgres::Hook;
use deadpool_postgres::{HookError, Manager, ManagerConfig, RecyclingMethod, Runtime};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::config::DatabaseSettings;

pub type Pool = deadpool_postgres::Pool;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("could not build the connection pool: {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
    #[error("could not connect to Postgres: {0}")]
    Connect(#[source] tokio_postgres::Error),
    /// A TLS misconfiguration (wrong CA, wrong host name): retrying cannot help.
    #[error("could not connect to Postgres over TLS: {0}")]
    Tls(String),
    #[error(
        "DATABASE_URL leads to a connection pooler in transaction or statement mode ({0}); \
         this service keeps session state (LISTEN, advisory locks), so give it a direct \
         connection or a pooler in session mode (only the query service works through \
         transaction pooling)"
    )]
    TransactionPooling(String),
}

impl DbError {
    /// `Connect`, or `Tls` when the failure is the server's certificate being refused.
    fn from_connect(e: tokio_postgres::Error, settings: &DatabaseSettings) -> Self {
        match crate::tls::explain(&e, &settings.tls) {
            Some(why) => DbError::Tls(why),
            None => DbError::Connect(e),
        }
    }
}

/// The server's half of dead-peer detection, for sessions we own (not through a transaction
/// pooler): the server drops a session whose client vanished without closing (a partition, a
/// frozen pod) within about a minute, releasing its locks and claims, instead of after the
/// kernel's default of hours. The client's half is in [`connection_config`].
pub const SERVER_KEEPALIVES: &str =
    "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
     SET tcp_keepalives_count = 3; SET tcp_user_timeout = 60000";

/// For the pipeline's own sessions: a transaction left idle (its client stalled between two
/// statements) ends after 30 s and gives back what it holds, such as a normalizer's claim on a
/// source; no statement waits more than a minute for a lock.
const SESSION_TIMEOUTS: &str =
    "SET idle_in_transaction_session_timeout = '30s'; SET lock_timeout = '60s'";

/// The shared pool. Connections are opened lazily, so building it never touches the network;
/// the first query reports an unreachable database. With [`Needs::Session`] each new
/// connection gets the server-side keepalives and the session timeouts; with
/// [`Needs::Transactions`] nothing is set on the session (a transaction pooler would carry it
/// to other clients).
pub fn pool(settings: &DatabaseSettings, needs: Needs) -> Result<Pool, DbError> {
    let mut builder = pool_builder(settings);
    if needs == Needs::Session {
        builder = builder.post_create(Hook::async_fn(|client, _| {
            Box::pin(async move {
                client
                    .batch_execute(SERVER_KEEPALIVES)
                    .await
                    .map_err(HookError::Backend)?;
                client
                    .batch_execute(SESSION_TIMEOUTS)
                    .await
                    .map_err(HookError::Backend)
            })
        }));
    }
    Ok(builder.build()?)
}

/// The pool's builder with the settings every pool shares, for a service that sets its
/// sessions up its own way (a `post_create` hook).
pub fn pool_builder(settings: &DatabaseSettings) -> deadpool_postgres::PoolBuilder {
    let manager = Manager::from_config(
        connection_config(settings),
        settings.tls.connector.clone(),
        // `Fast` skips the test query on checkout; a broken connection fails its query and is
        // dropped, and callers retry at the unit-of-work level anyway.
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pool_max_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(settings.connect_timeout))
        .wait_timeout(Some(settings.connect_timeout))
}

/// A connection of its own, outside the pool, with its driver task. The task ends when the
/// client is dropped or the connection breaks.
pub async fn connect(
    settings: &DatabaseSettings,
) -> Result<(Client, JoinHandle<Result<(), tokio_postgres::Error>>), DbError> {
    let (client, connection) = connection_config(settings)
        .connect(settings.tls.connector.clone())
        .await
        .map_err(|e| DbError::from_connect(e, settings))?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(SERVER_KEEPALIVES)
        .await
        .map_err(DbError::Connect)?;
    Ok((client, driver))
}

/// What a service needs of its database connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Each unit of work is one transaction (the query API): any pooler will do.
    Transactions,
    /// Session state that lives across transactions (`LISTEN`, session advisory locks): a
    /// direct connection or a pooler in session mode.
    Session,
}

/// What the start-up check found at the other end of `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing answered (yet): services start before their database and wait for it.
    Nothing,
    /// Sessions of our own: a server, or a pooler in session mode.
    OwnSessions,
    /// A pooler in transaction or statement mode, and what gave it away.
    TransactionPooler(String),
}

/// The start-up check every service runs: a TLS misconfiguration stops the process at once
/// with the reason instead of failing every query later, and a pooler in transaction mode is
/// detected (an error for [`Needs::Session`]). A database that is merely unreachable is not an
/// error here: that is [`Found::Nothing`], logged.
pub async fn check_at_start(settings: &DatabaseSettings, needs: Needs) -> Result<Found, DbError> {
    let (first, first_driver) = match connect(settings).await {
        Ok(connected) => connected,
        Err(e @ DbError::Tls(_)) => return Err(e),
        Err(e) => {
            let error = crate::error_chain(&e);
            tracing::warn!(%error, "the database does not answer yet; carrying on");
            return Ok(Found::Nothing);
        }
    };
    let (second, second_driver) = connect(settings).await?;
    let pooled = shares_server_sessions(&first, &second).await;
    drop((first, second));
    let _ = tokio::join!(first_driver, second_driver);
    match pooled {
        Some(evidence) if needs == Needs::Session => Err(DbError::TransactionPooling(evidence)),
        Some(evidence) => Ok(Found::TransactionPooler(evidence)),
        None => Ok(Found::OwnSessions),
    }
}

/// Whether two client connections are served by whichever server session is free, as poolers
/// in transaction or statement mode do: with `second` holding a transaction open, `first`
/// must still be on the server process it was on. (PgBouncer hands out the most recently
/// freed server first, so in transaction mode `second` takes `first`'s and the check sees it.)
/// Returns what gave it away.
async fn shares_server_sessions(first: &Client, second: &Client) -> Option<String> {
    async fn backend(client: &Client) -> Result<String, tokio_postgres::Error> {
        // Simple protocol: a pooler in transaction mode would lose a named statement.
        let rows = client.simple_query("SELECT pg_backend_pid()").await?;
        Ok(rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap_or_default())
    }
    let probe = async {
        let before = backend(first).await?;
        second.simple_query("BEGIN").await?;
        let held = backend(second).await?;
        let after = backend(first).await?;
        second.simple_query("ROLLBACK").await?;
        Ok::<_, tokio_postgres::Error>((before, held, after))
    };
    match probe.await {
        Ok((before, held, after)) if held == before || after != before => Some(format!(
            "one connection moved from server process {before} to {after} while another \
             held {held} in a transaction"
        )),
        Ok(_) => None,
        // Statement mode refuses transactions outright.
        Err(e) if crate::error_chain(&e).contains("pooling mode") => Some(crate::error_chain(&e)),
        Err(_) => None,
    }
}

/// The client's half of dead-peer detection: TCP keepalives from 30 s of silence, so a
/// connection to a server that vanished fails within about a minute instead of hanging.
pub fn connection_config(settings: &DatabaseSettings) -> tokio_postgres::Config {
    let mut config = settings.config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(settings.connect_timeout);
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(60));
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
