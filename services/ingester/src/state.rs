//! What the last successful run of a source learnt, so the next one fetches less
//! (`etl_source_state`, migration V7): its response's validators, for a conditional GET, and
//! for an incremental REST source the largest value it saw. Read when a run starts; written by
//! [`lease::release`](crate::lease::release) when a run ends well, after its last batch.

use etl_shared::Pool;

use crate::http::Validators;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceState {
    /// The URL the validators belong to.
    pub url: String,
    pub validators: Validators,
    /// The largest value at `rest.incremental.pointer` among the items of the run.
    pub incremental: Option<String>,
}

pub async fn load(
    pool: &Pool,
    source: &str,
) -> Result<Option<SourceState>, crate::lease::ClaimError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT url, etag, last_modified, incremental FROM etl_source_state WHERE source = $1",
            &[&source],
        )
        .await?;
    Ok(row.map(|row| SourceState {
        url: row.get(0),
        validators: Validators {
            etag: row.get(1),
            last_modified: row.get(2),
        },
        incremental: row.get(3),
    }))
}

pub async fn save(
    client: &tokio_postgres::Transaction<'_>,
    source: &str,
    state: &SourceState,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO etl_source_state (source, url, etag, last_modified, incremental)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (source) DO UPDATE
             SET url = EXCLUDED.url, etag = EXCLUDED.etag, last_modified = EXCLUDED.last_modified,
                 incremental = EXCLUDED.incremental, updated_at = now()",
            &[
                &source,
                &state.url,
                &state.validators.etag,
                &state.validators.last_modified,
                &state.incremental,
            ],
        )
        .await?;
    Ok(())
}
