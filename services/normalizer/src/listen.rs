//! The wake-up side: a dedicated connection (a pooled one would drop notifications) that
//! `LISTEN`s for the ingester's notifications, pings to notice a dead link, and reconnects with
//! backoff. After every (re)connect it asks for a scan of every source, because notifications
//! sent while it was away are gone for good.

use std::time::Duration;

use etl_shared::config::DatabaseSettings;
use etl_shared::{error_chain, RAW_READY_CHANNEL};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

/// What to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    Source(String),
    All,
}

/// How often the listening connection is checked with a query.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Listens until shutdown, sending wake-ups to `wake`; `on_reconnect` is called before every
/// connection attempt after the first.
pub async fn run(
    database: DatabaseSettings,
    wake: mpsc::UnboundedSender<Wake>,
    shutdown: CancellationToken,
    on_reconnect: impl Fn(),
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    while !shutdown.is_cancelled() {
        if !first {
            on_reconnect();
        }
        first = false;
        match listen_once(&database, &wake, &shutdown).await {
            Ok(()) => return, // shutdown
            Err(ListenError::Connected(e)) => {
                tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(ListenError::Connect(e)) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot connect to LISTEN");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum ListenError {
    /// Could not connect or subscribe.
    Connect(String),
    /// Was listening, then the connection failed.
    Connected(String),
}

async fn listen_once(
    database: &DatabaseSettings,
    wake: &mpsc::UnboundedSender<Wake>,
    shutdown: &CancellationToken,
) -> Result<(), ListenError> {
    let mut config = etl_shared::db::connection_config(database);
    config.application_name("etl-normalizer-listen");
    let (client, mut connection) = config
        .connect(database.tls.connector.clone())
        .await
        .map_err(|e| ListenError::Connect(error_chain(&e)))?;
    // The Connection future alone drops notifications: poll its messages ourselves.
    let (notes_tx, mut notes) = mpsc::unbounded_channel::<String>();
    // Ends with why the connection ended, which the loop below reports.
    let mut driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = notes_tx.send(n.payload().to_owned());
                }
                Ok(_) => {}
                Err(e) => return error_chain(&e),
            }
        }
        "connection closed".to_owned()
    });
    let result = async {
        client
            .batch_execute(etl_shared::db::SERVER_KEEPALIVES)
            .await
            .map_err(|e| ListenError::Connect(error_chain(&e)))?;
        client
            // sql: constant (a compile-time channel name; LISTEN takes no bind parameters)
            .batch_execute(&format!("LISTEN {RAW_READY_CHANNEL}"))
            .await
            .map_err(|e| ListenError::Connect(error_chain(&e)))?;
        tracing::info!(channel = RAW_READY_CHANNEL, "listening");
        // Subscribed first, then scan: a change committed in between is caught by one or the other.
        let _ = wake.send(Wake::All);
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                note = notes.recv() => match note {
                    Some(source) => { let _ = wake.send(Wake::Source(source)); }
                    // The driver ended: its result says why (the server's error, a reset, …).
                    None => {
                        let why = (&mut driver)
                            .await
                            .unwrap_or_else(|e| format!("the connection's driver failed: {e}"));
                        return Err(ListenError::Connected(why));
                    }
                },
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await;
                    match pong {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(ListenError::Connected(error_chain(&e))),
                        Err(_) => return Err(ListenError::Connected("ping timed out".into())),
                    }
                }
            }
        }
    }
    .await;
    drop(client);
    driver.abort();
    result
}
