//! The normalizer's admin HTTP port: the shared probes, and `/metrics` with the lag per source
//! read from the database at most every few seconds, however often it is scraped.

use poem::web::Data;
use poem::{get, handler, Endpoint, EndpointExt, Response};

use crate::Normalizer;

pub fn routes(normalizer: Normalizer) -> impl Endpoint {
    etl_shared::admin::probes()
        .at("/metrics", get(metrics))
        .data(normalizer.pool().clone())
        .data(normalizer)
}

#[handler]
async fn metrics(Data(normalizer): Data<&Normalizer>) -> Response {
    if let Err(e) = normalizer.refresh_lag_cached().await {
        // Still serve the counters: a scrape during an outage is when they matter most.
        tracing::warn!(error = %e, "could not refresh the lag gauges");
    }
    normalizer.metrics().update_pool(normalizer.pool());
    normalizer.metrics().exposition()
}
