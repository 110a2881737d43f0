//! What the operations console (served by the query service) reads and asks for through the
//! database: each source as the ingester runs it, and the actions "run now" (an ingester takes
//! it) and "replay" (a normalizer does). The query service records a request; each replica of
//! the service that acts polls for the oldest one of its action and takes it, so no service
//! needs to know where another runs, and any number of replicas take each request once.

use std::time::Duration;

use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::Pool;

/// How often a service looks for requests: the delay between a click and the run starting.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run the source's ingest now.
    Run,
    /// Re-normalize the source from its raw rows.
    Replay,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Run => "run",
            Action::Replay => "replay",
        }
    }
}

/// Records that `by` asks for `action` on `source`; the request's id.
pub async fn ask(
    client: &impl GenericClient,
    source: &str,
    action: Action,
    by: &str,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "INSERT INTO etl_requests (source, action, requested_by) VALUES ($1, $2, $3)
             RETURNING id",
            &[&source, &action.as_str(), &by],
        )
        .await?;
    Ok(row.get(0))
}

/// Takes the oldest request for `action` no one has taken: its source. Replicas polling at
/// once skip each other's (`SKIP LOCKED`).
pub async fn take(
    client: &impl GenericClient,
    action: Action,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "UPDATE etl_requests SET taken_at = now()
             WHERE id = (SELECT id FROM etl_requests
                         WHERE action = $1 AND taken_at IS NULL
                         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING source",
            &[&action.as_str()],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Until shutdown, takes every request for `action` as it comes and hands its source to `act`.
/// A database that does not answer is tried again at the next poll.
pub async fn take_periodically<F, Fut>(
    pool: Pool,
    action: Action,
    shutdown: CancellationToken,
    act: F,
) where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        loop {
            let taken = match pool.get().await {
                Ok(client) => take(&**client, action).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match taken {
                Ok(Some(source)) => {
                    tracing::info!(source, action = action.as_str(), "request taken");
                    act(source).await;
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%error, action = action.as_str(), "could not look for requests");
                    break;
                }
            }
        }
    }
}

/// Records what the sources file declares for each source (kind, schedule, URL without
/// credentials or query values, mapping), for the console to show.
pub async fn publish_sources(
    client: &impl GenericClient,
    sources: &crate::sources::Sources,
) -> Result<(), tokio_postgres::Error> {
    for source in &sources.sources {
        let mapping = serde_json::json!({
            "source_id": match &source.mapping.source_id {
                crate::sources::SourceKey::Fields(fields) => serde_json::json!(fields),
                crate::sources::SourceKey::Row => serde_json::json!({ "row": true }),
            },
            "name": source.mapping.name,
            "value": source.mapping.value,
            "description": source.mapping.description,
        });
        client
            .execute(
                "INSERT INTO etl_source_config (source, kind, schedule_seconds, url, mapping)
                 VALUES ($1, $2, $3, $4, $5::text::jsonb)
                 ON CONFLICT (source) DO UPDATE
                 SET kind = EXCLUDED.kind, schedule_seconds = EXCLUDED.schedule_seconds,
                     url = EXCLUDED.url, mapping = EXCLUDED.mapping, updated_at = now()",
                &[
                    &source.name,
                    &source.kind.as_str(),
                    &(source.schedule.as_secs().max(1) as i64),
                    &shown_url(&source.url),
                    &mapping.to_string(),
                ],
            )
            .await?;
    }
    Ok(())
}

/// `url` without user, password, fragment or query values, as the console may show it.
fn shown_url(url: &str) -> String {
    let Ok(mut url) = url::Url::parse(url) else {
        return String::new();
    };
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.set_fragment(None);
    let names: Vec<String> = url
        .query_pairs()
        .map(|(name, _)| name.into_owned())
        .collect();
    if names.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut()
            .clear()
            .extend_pairs(names.iter().map(|n| (n.as_str(), "***")));
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn shown_urls_carry_no_credentials_or_query_values() {
        assert_eq!(
            super::shown_url("https://u:pw@api.example/x?api_key=s3cret&page=2#f"),
            "https://api.example/x?api_key=***&page=***"
        );
        assert_eq!(
            super::shown_url("http://127.0.0.1:8080/a.csv"),
            "http://127.0.0.1:8080/a.csv"
        );
    }
}
