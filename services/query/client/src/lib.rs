//! A Rust client for the query API: progenitor generates it at build time from the committed
//! spec (`services/query/openapi.json`), so a spec change that the generator cannot take, or
//! that breaks the client's callers, fails the build. Calls use the builder interface:
//!
//! ```no_run
//! # async fn demo() -> Result<(), etl_query_client::Error<()>> {
//! let client = etl_query_client::Client::new("http://127.0.0.1:8080");
//! let page = client.list_data().page_size(100).send().await.map_err(|e| e.into_untyped())?;
//! println!("{} records", page.total);
//! # Ok(())
//! # }
//! ```

progenitor::generate_api!(spec = "../openapi.json", interface = Builder);
