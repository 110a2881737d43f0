//! The operations console at `/console`: one page, its script and its style, bundled in the
//! binary (it works offline, with no frontend build). Open like `/docs`: the page holds no
//! data; its requests to the API carry the key the operator enters. The page's policy lets it
//! run its own script only and talk to this service only, so a record holding markup can at
//! worst be shown, never run (the script also puts every value in as text).

use bytes::Bytes;
use poem::http::header;
use poem::{get, Endpoint, Response, Route};

const PAGE: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");
const ICON: &str = include_str!("../console/favicon.svg");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// The page, telling its script whether this service asks for API keys, so it asks the
/// operator for one before its first request instead of after a refused one.
fn page(keys_required: bool) -> Bytes {
    const OPTIONAL: &str = r#"<meta name="etl-api-keys" content="optional">"#;
    debug_assert!(PAGE.contains(OPTIONAL));
    if keys_required {
        PAGE.replace(OPTIONAL, r#"<meta name="etl-api-keys" content="required">"#)
            .into()
    } else {
        Bytes::from_static(PAGE.as_bytes())
    }
}

fn asset(content_type: &'static str, body: Bytes) -> impl Endpoint<Output = Response> {
    poem::endpoint::make_sync(move |_| {
        Response::builder()
            .content_type(content_type)
            .header(header::CONTENT_SECURITY_POLICY, POLICY)
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body.clone())
    })
}

/// `/console` (the page), `/console/console.js`, `/console/console.css` and its icon.
pub fn routes(keys_required: bool) -> Route {
    Route::new()
        .at(
            "/",
            get(asset("text/html; charset=utf-8", page(keys_required))),
        )
        .at(
            "/console.js",
            get(asset(
                "text/javascript; charset=utf-8",
                Bytes::from_static(SCRIPT.as_bytes()),
            )),
        )
        .at(
            "/console.css",
            get(asset(
                "text/css; charset=utf-8",
                Bytes::from_static(STYLE.as_bytes()),
            )),
        )
        .at(
            "/favicon.svg",
            get(asset("image/svg+xml", Bytes::from_static(ICON.as_bytes()))),
        )
}
