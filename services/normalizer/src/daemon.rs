//! The long-running normalizer: one worker per source, woken by notifications, by the listener's
//! (re)connects and by a slow poll; a clean stop on SIGTERM.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etl_shared::config::DatabaseSettings;
use etl_shared::db::Needs;
use poem::listener::TcpAcceptor;
use poem::Server;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use crate::listen::{self, Wake};
use crate::{admin, Normalizer, Settings};

/// Wait before retrying a source whose run could not start (database unreachable).
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

pub struct Application {
    normalizer: Normalizer,
    database: DatabaseSettings,
    poll_interval: Duration,
    acceptor: TcpAcceptor,
    admin_addr: SocketAddr,
}

impl Application {
    /// Binds the admin port (port 0 picks a free one); nothing runs yet.
    pub async fn build(settings: Settings, normalizer: Normalizer) -> anyhow::Result<Self> {
        etl_shared::db::check_at_start(&settings.database, Needs::Session).await?;
        let listener = tokio::net::TcpListener::bind(settings.admin_addr).await?;
        let admin_addr = listener.local_addr()?;
        Ok(Self {
            normalizer,
            database: settings.database,
            poll_interval: settings.poll_interval,
            acceptor: TcpAcceptor::from_tokio(listener)?,
            admin_addr,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Runs until the shutdown token is cancelled; the batch in flight commits or rolls back.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let normalizer = self.normalizer;
        let shutdown = normalizer.shutdown_token().clone();
        let workers: HashMap<String, Arc<Notify>> = normalizer
            .sources()
            .sources
            .iter()
            .map(|s| (s.name.clone(), Arc::new(Notify::new())))
            .collect();
        let mut tasks = JoinSet::new();
        tasks.spawn(
            normalizer
                .runs()
                .clone()
                .reap_periodically(shutdown.clone()),
        );
        for (name, notify) in &workers {
            tasks.spawn(work(normalizer.clone(), name.clone(), notify.clone()));
        }

        let (wake_tx, mut wake_rx) = mpsc::unbounded_channel();
        tasks.spawn({
            let (database, wake, shutdown, n) = (
                self.database.clone(),
                wake_tx.clone(),
                shutdown.clone(),
                normalizer.clone(),
            );
            async move { listen::run(database, wake, shutdown, || n.count_reconnect()).await }
        });
        tasks.spawn({
            let (every, wake, shutdown) = (self.poll_interval, wake_tx.clone(), shutdown.clone());
            async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => { let _ = wake.send(Wake::All); }
                    }
                }
            }
        });
        // Replays asked for from the console: begun here, carried out by the source's worker.
        tasks.spawn({
            let (n, shutdown, wake) = (normalizer.clone(), shutdown.clone(), wake_tx.clone());
            let pool = normalizer.pool().clone();
            async move {
                etl_shared::console::take_periodically(
                    pool,
                    etl_shared::console::Action::Replay,
                    shutdown,
                    |source| {
                        let (n, wake) = (n.clone(), wake.clone());
                        async move {
                            match n.begin_replay(&source).await {
                                Ok(()) => {
                                    let _ = wake.send(Wake::Source(source));
                                }
                                Err(e) => tracing::warn!(source, error = %e, "could not begin the replay asked for"),
                            }
                        }
                    },
                )
                .await
            }
        });
        tasks.spawn({
            let shutdown = shutdown.clone();
            async move {
                loop {
                    let wake = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        wake = wake_rx.recv() => wake,
                    };
                    match wake {
                        Some(Wake::All) => workers.values().for_each(|n| n.notify_one()),
                        Some(Wake::Source(name)) => {
                            if let Some(n) = workers.get(&name) {
                                n.notify_one();
                            }
                        }
                        None => return,
                    }
                }
            }
        });
        tracing::info!(admin = %self.admin_addr, "normalizer started");

        let served = Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(
                admin::routes(normalizer.clone()),
                shutdown.clone().cancelled_owned(),
                Some(Duration::from_secs(5)),
            )
            .await;
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        tracing::info!("normalizer stopped");
        served.map_err(Into::into)
    }
}

/// Another replica holds the source: try again soon, at a random moment so replicas alternate
/// batches (spreading a backlog) and one takes over if the holder dies.
fn busy_retry() -> Duration {
    Duration::from_millis(10 + fastrand::u64(0..40))
}

/// One source's worker: each wake-up runs a normalize run.
async fn work(normalizer: Normalizer, name: String, notify: Arc<Notify>) {
    let shutdown = normalizer.shutdown_token().clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = notify.notified() => {}
        }
        let retry_in = match normalizer.run_source(&name).await {
            Ok(outcome) if outcome.busy => Some(busy_retry()),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(source = %name, error = %e, "normalize run could not start; retrying");
                Some(RETRY_AFTER_ERROR)
            }
        };
        if let Some(wait) = retry_in {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => notify.notify_one(),
            }
        }
    }
}
