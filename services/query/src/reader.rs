//! Every read the API makes, read-only and bounded by the statement timeout, in one round trip.
//!
//! How depends on what `DATABASE_URL` leads to, found at start ([`Sessions`]):
//! - **Sessions of our own** (a server, or a pooler in session mode): each new connection is set
//!   read-only with the statement timeout once, and statements are prepared once per connection
//!   and sent together.
//! - **A pooler in transaction mode** (PgBouncer, the poolers of managed Postgres), or nothing
//!   known yet: each transaction may run on any server connection, so session settings would
//!   leak to other clients and named statements would be lost. Each read is its own read-only
//!   transaction with the timeout set for it alone (`set_config(…, true)`), and statements use
//!   the unnamed prepared statement; `BEGIN`, the timeout, the statements and `COMMIT` go out
//!   together.
//!
//! Either way the startup `options` parameter (which poolers refuse) is left to the operator:
//! any `options` in `DATABASE_URL` stay in force.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Hook, HookError, Object, Pool};
use futures_util::future::{join4, join_all, OptionFuture};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;
use tracing::Instrument;

use crate::data::QueryError;
use etl_shared::db::{DbError, Found};
use etl_shared::DatabaseSettings;

/// Whose sessions the query service's connections are, from [`etl_shared::db::check_at_start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sessions {
    Own,
    /// Shared through a transaction pooler, or not known (the database did not answer at start).
    Pooled,
}

impl Sessions {
    pub fn from_found(found: &Found) -> Self {
        match found {
            Found::OwnSessions => Sessions::Own,
            Found::TransactionPooler(evidence) => {
                tracing::info!(%evidence, "a transaction pooler is in front of the database: settings go per transaction");
                Sessions::Pooled
            }
            Found::Nothing => Sessions::Pooled,
        }
    }
}

/// The query service's pool: with [`Sessions::Own`], each new connection is made read-only
/// with the statement timeout (and the server's keepalives) once.
pub fn pool(
    database: &DatabaseSettings,
    sessions: Sessions,
    statement_timeout: Duration,
) -> Result<Pool, DbError> {
    let builder = etl_shared::db::pool_builder(database);
    let builder = match sessions {
        Sessions::Pooled => builder,
        Sessions::Own => {
            let timeout = statement_timeout.as_millis().to_string();
            builder.post_create(Hook::async_fn(move |client, _| {
                let timeout = timeout.clone();
                Box::pin(async move {
                    client
                        .batch_execute(etl_shared::db::SERVER_KEEPALIVES)
                        .await
                        .map_err(HookError::Backend)?;
                    client
                        .batch_execute(SESSION_SETTINGS)
                        .await
                        .map_err(HookError::Backend)?;
                    client
                        .query(SET_SESSION_TIMEOUT, &[&timeout])
                        .await
                        .map_err(HookError::Backend)?;
                    Ok(())
                })
            }))
        }
    };
    Ok(builder.build()?)
}

/// What a read sees: each statement its own snapshot, or one snapshot for all (`/stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    PerStatement,
    Shared,
}

/// One statement of a read: SQL made of constant text only (see `data::Sql`) and its typed
/// bind parameters.
pub struct Statement<'a> {
    pub sql: Cow<'static, str>,
    pub params: Vec<(&'a (dyn ToSql + Sync), Type)>,
    /// Planned for its values each time (the unnamed statement) instead of prepared once.
    pub per_values: bool,
}

impl<'a> Statement<'a> {
    pub fn new(
        sql: impl Into<Cow<'static, str>>,
        params: Vec<(&'a (dyn ToSql + Sync), Type)>,
    ) -> Self {
        Self {
            sql: sql.into(),
            params,
            per_values: false,
        }
    }

    /// A statement whose best plan depends on its values, as a search's does on how many rows
    /// its term matches: a prepared statement may settle on one generic plan for every term
    /// (after five executions Postgres may stop planning for the values), so this one is
    /// planned for its values each time, at the cost of planning (a fraction of a millisecond).
    pub fn per_values(
        sql: impl Into<Cow<'static, str>>,
        params: Vec<(&'a (dyn ToSql + Sync), Type)>,
    ) -> Self {
        Self {
            per_values: true,
            ..Self::new(sql, params)
        }
    }
}

#[derive(Clone)]
pub struct Reader {
    pool: Pool,
    /// `statement_timeout` as Postgres reads it (milliseconds).
    statement_timeout: String,
    /// Settings per transaction and unnamed statements (see the module's header). Set at start;
    /// also set later if a prepared statement turns out lost, as behind a pooler not detected.
    pooled: Arc<AtomicBool>,
}

const BEGIN: &str = "BEGIN READ ONLY";
const BEGIN_SHARED_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
const SET_TIMEOUT: &str = "SELECT set_config('statement_timeout', $1, true),
     set_config('random_page_cost', '1.1', true)";
/// Read-only, and the planner told that a random page read costs little more than a sequential
/// one (`random_page_cost`, 4 by default, a spinning disk's ratio): the API's reads are index
/// probes of hot data. At 4, a search's capped count switched to a sequential scan whenever the
/// trigram indexes' pending lists grew under writes (75-120 ms instead of 13-20).
const SESSION_SETTINGS: &str = "SET default_transaction_read_only = on; SET random_page_cost = 1.1";
const SET_SESSION_TIMEOUT: &str = "SELECT set_config('statement_timeout', $1, false)";

impl Reader {
    pub fn new(pool: Pool, statement_timeout: Duration, sessions: Sessions) -> Self {
        Self {
            pool,
            statement_timeout: statement_timeout.as_millis().to_string(),
            pooled: Arc::new(AtomicBool::new(sessions == Sessions::Pooled)),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The rows of each statement, in order; or the first error in statement order (after
    /// one, the others only say that the transaction is aborted).
    pub async fn read(
        &self,
        snapshot: Snapshot,
        statements: &[Statement<'_>],
    ) -> Result<Vec<Vec<Row>>, QueryError> {
        let pooled = self.pooled.load(Ordering::Relaxed);
        let mut guard = InTransaction(Some(self.pool.get().await?));
        let client = guard.0.as_ref().expect("held until released");
        let prepared = if pooled {
            None
        } else {
            // A round trip the first time per connection, none after.
            let mut prepared = Vec::with_capacity(statements.len());
            for s in statements {
                prepared.push(if s.per_values {
                    None
                } else {
                    let types: Vec<Type> = s.params.iter().map(|(_, t)| t.clone()).collect();
                    Some(client.prepare_typed_cached(&s.sql, &types).await?)
                });
            }
            Some(prepared)
        };
        let transaction = pooled || snapshot == Snapshot::Shared;
        let timeout = [(&self.statement_timeout as &(dyn ToSql + Sync), Type::TEXT)];
        // Each future sends its messages when first polled, and join4 and join_all poll in
        // order: the server receives BEGIN, the timeout, the statements, then COMMIT.
        let (began, timeout_set, answers, committed) = join4(
            OptionFuture::from(transaction.then(|| {
                client.batch_execute(match snapshot {
                    Snapshot::PerStatement => BEGIN,
                    Snapshot::Shared => BEGIN_SHARED_SNAPSHOT,
                })
            })),
            OptionFuture::from(pooled.then(|| client.query_typed(SET_TIMEOUT, &timeout))),
            join_all(statements.iter().enumerate().map(|(i, s)| {
                let statement = prepared.as_ref().and_then(|p| p[i].as_ref());
                async move {
                    match statement {
                        Some(statement) => {
                            let params: Vec<&(dyn ToSql + Sync)> =
                                s.params.iter().map(|(p, _)| *p).collect();
                            client.query(statement, &params).await
                        }
                        None => client.query_typed(&s.sql, &s.params).await,
                    }
                }
                .instrument(tracing::info_span!("db.query", db.query.text = &*s.sql))
            })),
            // On an aborted transaction COMMIT rolls back: the connection ends idle either way.
            OptionFuture::from(transaction.then(|| client.batch_execute("COMMIT"))),
        )
        .await;
        // Outside a transaction, or COMMIT answered: the session is idle again.
        if committed.as_ref().is_none_or(Result::is_ok) {
            guard.release();
        }
        let outcome = (|| -> Result<Vec<Vec<Row>>, tokio_postgres::Error> {
            began.transpose()?;
            timeout_set.transpose()?;
            let rows = answers.into_iter().collect::<Result<Vec<_>, _>>()?;
            committed.transpose()?;
            Ok(rows)
        })();
        if let Err(e) = &outcome {
            if e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) && !pooled {
                tracing::warn!("a prepared statement was lost, as behind a transaction pooler: settings go per transaction from now on");
                self.pooled.store(true, Ordering::Relaxed);
            }
        }
        Ok(outcome?)
    }
}

/// A pooled connection that may be inside a transaction. Unless released once it is idle again,
/// it is taken out of the pool when dropped (a request cancelled mid-way, a broken
/// connection), so no other request ever inherits an open transaction.
struct InTransaction(Option<Object>);

impl InTransaction {
    fn release(&mut self) {
        self.0.take(); // back to the pool
    }
}

impl Drop for InTransaction {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client)); // closes the connection
        }
    }
}
