//! Every read the API makes runs in one read-only transaction on a pooled connection, with the
//! statement timeout set for that transaction only (`set_config(…, true)`).
//!
//! Why per transaction: connection poolers in transaction mode (PgBouncer and the poolers of
//! managed Postgres) hand each transaction to any server connection, so session settings and
//! the startup `options` parameter (which they refuse outright) cannot carry them. It also
//! leaves any `options` the operator put in `DATABASE_URL` in force. Statements use the unnamed
//! prepared statement (`query_typed`), which such poolers also carry correctly.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use crate::data::QueryError;

/// A read's work: the queries it sends on the client it is given. Statements sent together
/// should be awaited with `join!` and their errors taken in statement order (see [`Reader::read`]).
pub type Work<'c, T> = Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>;

/// What a read sees: each statement its own snapshot, or one snapshot for all (`/stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    PerStatement,
    Shared,
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

    /// Runs `work` inside the transaction. `BEGIN`, the timeout and `work`'s first statements
    /// go out together (one round trip), then `COMMIT`.
    pub async fn read<T, F>(&self, snapshot: Snapshot, work: F) -> Result<T, QueryError>
    where
        F: for<'c> FnOnce(&'c Client) -> Work<'c, T>,
    {
        let mut guard = InTransaction(Some(self.pool.get().await?));
        let client: &Client = guard.0.as_ref().expect("held until released");
        let begin = match snapshot {
            Snapshot::PerStatement => BEGIN,
            Snapshot::Shared => BEGIN_SHARED_SNAPSHOT,
        };
        let timeout = [(&self.statement_timeout as &(dyn ToSql + Sync), Type::TEXT)];
        // join, not try_join: every answer is awaited, and the first error in statement order
        // is the one reported (after it, the rest only say the transaction is aborted).
        let (began, timeout_set, out) = tokio::join!(
            client.batch_execute(begin),
            client.query_typed(SET_TIMEOUT, &timeout),
            work(client),
        );
        began?;
        timeout_set?;
        let out = out?;
        client.batch_execute("COMMIT").await?;
        guard.release();
        Ok(out)
    }
}

/// A pooled connection that may be inside a transaction. Unless released after `COMMIT`, it is
/// taken out of the pool when dropped (an error, or a request cancelled mid-way), so no other
/// request ever inherits an open or aborted transaction.
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
