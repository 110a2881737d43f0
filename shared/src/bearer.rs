//! Bearer credentials (RFC 6750), as the query API's keys and the admin ports' token are sent:
//! reading one from a request, and the 401 problem that asks for one.

use poem::http::{header, HeaderMap, HeaderValue, StatusCode};
use poem::Response;

use crate::problem::{Problem, ProblemCode};

/// The credential of `Authorization: Bearer <credential>` (the scheme in any case), if any.
pub fn credential(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credential) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim())
}

/// A 401 problem (`unauthorized`) saying `detail`, with `WWW-Authenticate: challenge`.
pub fn unauthorized(challenge: &'static str, detail: &str) -> Response {
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        ProblemCode::Unauthorized,
        "Unauthorized",
        detail,
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bearer_scheme_carries_a_credential() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            credential(&headers).map(str::to_owned)
        };
        assert_eq!(with("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("abc"), None);
        assert_eq!(credential(&HeaderMap::new()), None);
    }
}
