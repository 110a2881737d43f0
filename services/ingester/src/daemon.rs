//! The long-running ingester: every source on its own schedule (and on demand through the admin
//! port), interrupted runs of dead processes marked failed, and a clean stop on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etl_shared::db::Needs;
use poem::listener::TcpAcceptor;
use poem::Server;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Triggers};
use crate::lease::Claim;
use crate::{IngestError, Ingester, Settings};

/// First wait before retrying a failed run; doubles per consecutive failure, up to the schedule.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

pub struct Application {
    ingester: Ingester,
    admin_token: etl_shared::admin::AdminToken,
    retention_days: u32,
    triggers: Arc<Triggers>,
    acceptor: TcpAcceptor,
    admin_addr: SocketAddr,
}

impl Application {
    /// Binds the admin port (port 0 picks a free one) and prepares the pool; nothing runs yet.
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        etl_shared::db::check_at_start(&settings.database, Needs::Session).await?;
        let pool = etl_shared::db::pool(&settings.database, Needs::Session)?;
        let listener = tokio::net::TcpListener::bind(settings.admin_addr).await?;
        let admin_addr = listener.local_addr()?;
        let acceptor = TcpAcceptor::from_tokio(listener)?;
        let ingester = Ingester::new(&settings, pool, shutdown);
        let triggers = settings
            .sources
            .sources
            .iter()
            .map(|s| (s.name.clone(), Arc::new(Notify::new())))
            .collect();
        Ok(Self {
            ingester,
            admin_token: settings.admin_token.clone(),
            retention_days: settings.retention_days,
            triggers: Arc::new(triggers),
            acceptor,
            admin_addr,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn ingester(&self) -> &Ingester {
        &self.ingester
    }

    /// Runs until the shutdown token is cancelled, then lets running batches finish (or roll
    /// back) and returns.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let shutdown = self.ingester.shutdown_token().clone();
        let mut tasks = JoinSet::new();
        for source in &self.ingester.sources().sources {
            let trigger = self.triggers[&source.name].clone();
            tasks.spawn(schedule(
                self.ingester.clone(),
                source.name.clone(),
                source.schedule,
                trigger,
            ));
        }
        tasks.spawn(
            self.ingester
                .runs()
                .clone()
                .reap_periodically(shutdown.clone()),
        );
        tasks.spawn(etl_shared::runs::prune_periodically(
            self.ingester.pool().clone(),
            self.retention_days,
            shutdown.clone(),
        ));
        tasks.spawn(console_requests(
            self.ingester.clone(),
            self.triggers.clone(),
            shutdown.clone(),
        ));
        tracing::info!(admin = %self.admin_addr, sources = self.triggers.len(), "ingester started");

        let server = Server::new_with_acceptor(self.acceptor).run_with_graceful_shutdown(
            admin::routes(
                self.ingester.clone(),
                self.triggers.clone(),
                self.admin_token.clone(),
            ),
            shutdown.clone().cancelled_owned(),
            Some(Duration::from_secs(5)),
        );
        let served = server.await;
        shutdown.cancel(); // the server may also have stopped on its own (an I/O error)
        while tasks.join_next().await.is_some() {}
        tracing::info!("ingester stopped");
        served.map_err(Into::into)
    }
}

/// One source's loop: run now, then again after `every` or when triggered, until shutdown. A
/// failed run (or one that could not start) is retried sooner, backing off from 5 s up to the
/// schedule, so an outage or a flaky source does not cost a whole interval. Scheduled runs are
/// skipped while another run (of any replica) holds the source or ran it less than a schedule
/// ago; a triggered run waits for the source instead.
async fn schedule(ingester: Ingester, name: String, every: Duration, trigger: Arc<Notify>) {
    let shutdown = ingester.shutdown_token().clone();
    let mut failures: u32 = 0;
    let mut triggered = false;
    loop {
        let started = if triggered {
            ingester.run_source(&name).await.map(Ok)
        } else {
            ingester.run_scheduled(&name, every).await
        };
        let mut wait = every;
        let failed = match started {
            Ok(Ok(summary)) => summary.error.is_some(),
            Ok(Err(Claim::NotDue { since })) => {
                tracing::info!(source = %name, since_last_success = ?since, "run skipped: not due yet");
                // Wake when it falls due: then whichever replica looks first runs it.
                wait = every.saturating_sub(since).max(Duration::from_millis(100));
                false
            }
            Ok(Err(Claim::Busy { holder })) => {
                tracing::info!(source = %name, holder, "run skipped: another run holds the source");
                false
            }
            Ok(Err(Claim::Held)) => unreachable!("a held claim runs"),
            Err(e @ IngestError::Run(_)) => {
                tracing::error!(source = %name, error = %e, "could not start a run; retrying soon");
                true
            }
            Err(e) => {
                tracing::error!(source = %name, error = %e, "run could not start");
                true
            }
        };
        failures = if failed { failures + 1 } else { 0 };
        if failed {
            wait = RETRY_AFTER_FAILURE
                .saturating_mul(1 << (failures - 1).min(10))
                .min(every);
        }
        triggered = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => false,
            _ = trigger.notified() => {
                tracing::info!(source = %name, "run triggered");
                true
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// The console's side of the daemon: publishes the sources as this ingester runs them (once
/// the database answers), then runs each source asked for by "run now" as a trigger would.
async fn console_requests(
    ingester: Ingester,
    triggers: Arc<admin::Triggers>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use etl_shared::console;
    loop {
        let published = match ingester.pool().get().await {
            Ok(client) => console::publish_sources(&**client, ingester.sources())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match published {
            Ok(()) => break,
            Err(error) => tracing::debug!(%error, "could not publish the sources yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(console::POLL_INTERVAL) => {}
        }
    }
    let pool = ingester.pool().clone();
    console::take_periodically(pool, console::Action::Run, shutdown, |source| {
        let trigger = triggers.get(&source).cloned();
        async move {
            match trigger {
                Some(trigger) => trigger.notify_one(),
                None => tracing::warn!(source, "asked to run a source this ingester does not have"),
            }
        }
    })
    .await;
}
