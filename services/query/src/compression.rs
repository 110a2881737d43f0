//! Answers compressed with brotli or gzip when the request's `Accept-Encoding` asks for one
//! (brotli first at equal preference), streamed (an export is compressed as it goes), at the
//! fastest levels: an answer is compressed once per request, so compression must cost less
//! than the bytes it saves. `Vary: Accept-Encoding` tells caches that the answer depends on it.

use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder};
use async_compression::Level;
use poem::http::{header, HeaderValue, Method, StatusCode};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use tokio::io::BufReader;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Brotli,
    Gzip,
}

/// Calls `ep`, then compresses its answer as the request asks.
pub async fn compress<E: Endpoint>(ep: E, req: Request) -> poem::Result<Response> {
    let coding = req
        .headers()
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .and_then(negotiate);
    let head = req.method() == Method::HEAD;
    let mut response = ep.call(req).await?.into_response();
    response
        .headers_mut()
        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    let bodiless = matches!(
        response.status(),
        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
    );
    let Some(coding) = coding.filter(|_| {
        !head && !bodiless && !response.headers().contains_key(header::CONTENT_ENCODING)
    }) else {
        return Ok(response);
    };
    let body = BufReader::new(response.take_body().into_async_read());
    let (compressed, name) = match coding {
        Coding::Brotli => (
            Body::from_async_read(BrotliEncoder::with_quality(body, Level::Fastest)),
            "br",
        ),
        Coding::Gzip => (
            Body::from_async_read(GzipEncoder::with_quality(body, Level::Fastest)),
            "gzip",
        ),
    };
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(name));
    response.set_body(compressed);
    Ok(response)
}

/// The coding `Accept-Encoding: value` prefers among brotli and gzip (RFC 9110 12.5.3: the
/// highest `q`, none at `q=0`, `*` for any not named), if any.
fn negotiate(value: &str) -> Option<Coding> {
    let (mut brotli, mut gzip, mut any) = (None::<f32>, None::<f32>, None::<f32>);
    for item in value.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .find_map(|p| p.trim().strip_prefix("q=").map(str::to_owned))
            .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok())
            .unwrap_or(0.0);
        match name.as_str() {
            "br" => brotli = Some(q),
            "gzip" | "x-gzip" => gzip = Some(q),
            "*" => any = Some(q),
            _ => {}
        }
    }
    let brotli = brotli.or(any).unwrap_or(0.0);
    let gzip = gzip.or(any).unwrap_or(0.0);
    match (brotli, gzip) {
        (b, g) if b > 0.0 && b >= g => Some(Coding::Brotli),
        (_, g) if g > 0.0 => Some(Coding::Gzip),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preferred_coding_wins_brotli_on_ties_and_q0_refuses() {
        assert_eq!(negotiate("gzip, deflate, br"), Some(Coding::Brotli));
        assert_eq!(negotiate("gzip"), Some(Coding::Gzip));
        assert_eq!(negotiate("br;q=0.5, gzip;q=0.8"), Some(Coding::Gzip));
        assert_eq!(negotiate("br;q=0, gzip;q=0"), None);
        assert_eq!(negotiate("identity"), None);
        assert_eq!(negotiate("*"), Some(Coding::Brotli));
        assert_eq!(negotiate("*;q=0.1, br;q=0"), Some(Coding::Gzip));
        assert_eq!(negotiate("GZIP ; q=1.0"), Some(Coding::Gzip));
        assert_eq!(negotiate("gzip;q=bogus"), None);
        assert_eq!(negotiate(""), None);
    }
}
