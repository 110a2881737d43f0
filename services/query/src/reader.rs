//! Every read the API makes runs in one read-only transaction on a pooled connection, with the
//! statement timeout set for that transaction only (`set_config(…, true)`), and goes to the
//! server in one round trip: `BEGIN`, the timeout, the statements and `COMMIT` are sent
//! together, and the answers read back in order.
//!
//! Why per transaction: connection poolers in transaction mode (PgBouncer and the poolers of
//! managed Postgres) hand each transaction to any server connection, so session settings and
//! the startup `options` parameter (which they refuse outright) cannot carry them. It also
//! leaves any `options` the operator put in `DATABASE_URL` in force. Statements use the unnamed
//! prepared statement (`query_typed`), which such poolers also carry correctly.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use futures_util::future::{join4, join_all};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;
use tracing::Instrument;

use crate::data::QueryError;

/// What a read sees: each statement its own snapshot, or one snapshot for all (`/stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    PerStatement,
    Shared,
}

/// One statement of a read: constant SQL and its typed bind parameters.
pub struct Statement<'a> {
    pub sql: &'static str,
    pub params: Vec<(&'a (dyn ToSql + Sync), Type)>,
}

impl<'a> Statement<'a> {
    pub fn new(sql: &'static str, params: Vec<(&'a (dyn ToSql + Sync), Type)>) -> Self {
        Self { sql, params }
    }
}

#[derive(Clone)]
pub struct Reader {
    pool: Pool,
    /// `statement_timeout` as Postgres reads it (milliseconds).
    statement_timeout: String,
}

const BEGIN: &str = "BEGIN READ ONLY";
const BEGIN_SHARED_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
const SET_TIMEOUT: &str = "SELECT set_config('statement_timeout', $1, true)";

impl Reader {
    pub fn new(pool: Pool, statement_timeout: Duration) -> Self {
        Self {
            pool,
            statement_timeout: statement_timeout.as_millis().to_string(),
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
        let mut guard = InTransaction(Some(self.pool.get().await?));
        let client = guard.0.as_ref().expect("held until released");
        let timeout = [(&self.statement_timeout as &(dyn ToSql + Sync), Type::TEXT)];
        // Each future sends its messages when first polled, and join4 and join_all poll in
        // order: the server receives BEGIN, the timeout, the statements, then COMMIT.
        let (began, timeout_set, answers, committed) = join4(
            client.batch_execute(match snapshot {
                Snapshot::PerStatement => BEGIN,
                Snapshot::Shared => BEGIN_SHARED_SNAPSHOT,
            }),
            client.query_typed(SET_TIMEOUT, &timeout),
            join_all(statements.iter().map(|s| {
                client
                    .query_typed(s.sql, &s.params)
                    .instrument(tracing::info_span!("db.query", db.query.text = s.sql))
            })),
            // On an aborted transaction COMMIT rolls back: the connection ends idle either way.
            client.batch_execute("COMMIT"),
        )
        .await;
        // COMMIT answered: the session is idle again, whatever the statements did.
        if committed.is_ok() {
            guard.release();
        }
        began?;
        timeout_set?;
        let rows = answers.into_iter().collect::<Result<Vec<_>, _>>()?;
        committed?;
        Ok(rows)
    }
}

/// A pooled connection that may be inside a transaction. Unless released once COMMIT has been
/// answered, it is taken out of the pool when dropped (a request cancelled mid-way, a broken
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
