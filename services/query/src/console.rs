//! The operations console at `/console`: one page, its script and its style, bundled in the
//! binary (it works offline, with no frontend build). Open like `/docs`: the page holds no
//! data; its requests to the API carry the key the operator enters. The page's policy lets it
//! run its own script only and talk to this service only, so a record holding markup can at
//! worst be shown, never run (the script also puts every value in as text).

use poem::http::header;
use poem::{get, Endpoint, Response, Route};

const PAGE: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");
const ICON: &str = include_str!("../console/favicon.svg");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl Endpoint<Output = Response> {
    poem::endpoint::make_sync(move |_| {
        Response::builder()
            .content_type(content_type)
            .header(header::CONTENT_SECURITY_POLICY, POLICY)
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body)
    })
}

/// `/console` (the page), `/console/console.js`, `/console/console.css` and its icon.
pub fn routes() -> Route {
    Route::new()
        .at("/", get(asset("text/html; charset=utf-8", PAGE)))
        .at(
            "/console.js",
            get(asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .at("/console.css", get(asset("text/css; charset=utf-8", STYLE)))
        .at("/favicon.svg", get(asset("image/svg+xml", ICON)))
}
