//! Who may use the web view, and which requests may change anything.
//!
//! - **Where it listens**: loopback by default; any other address only with a token
//!   ([`check_config`]).
//! - **The token**: when there is one, every request carries it, as `Authorization: Bearer
//!   <token>` or as the cookie `run_engine_token` that opening any page once with
//!   `?token=<token>` sets (`HttpOnly`, `SameSite=Strict`; the page is then reloaded without it in
//!   the address). Without a token (loopback), the `Host` header must name loopback, so that a
//!   page of another site that renames itself to 127.0.0.1 (DNS rebinding) reads nothing.
//! - **Actions** are POSTs that carry the server's CSRF token (a random value made at start,
//!   in a hidden field of each form) and that the browser does not mark as cross-site
//!   (`Sec-Fetch-Site`, and `Origin` must be this server's); anything else gets 403.
//! - **Every response** forbids inline scripts and framing (`Content-Security-Policy`,
//!   `X-Frame-Options`), sniffing, and referrers to other sites (`same-origin`: with
//!   `no-referrer`, browsers send `Origin: null` on the forms' own POSTs).

use super::{ServeConfig, WebError};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;

/// The cookie that carries the token once `?token=` was given.
pub const TOKEN_COOKIE: &str = "run_engine_token";

/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// Refuses a non-loopback address without a token, and a short token.
pub fn check_config(config: &ServeConfig) -> Result<(), WebError> {
    match &config.token {
        None if !config.listen.ip().is_loopback() => Err(WebError::TokenRequired(config.listen)),
        Some(token)
            if token.len() < MIN_TOKEN_LEN
                || !token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(c)) =>
        {
            Err(WebError::WeakToken)
        }
        _ => Ok(()),
    }
}

/// The security settings of one server.
#[derive(Debug)]
pub struct Security {
    token: Option<String>,
    csrf: String,
    /// Without a token: the `Host` values accepted (loopback names with the port).
    hosts: Vec<String>,
}

impl Security {
    /// Settings for a server on `listen`, with a fresh CSRF token.
    pub fn new(token: Option<String>, listen: SocketAddr) -> Security {
        let csrf = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let port = listen.port();
        let mut hosts = Vec::new();
        for name in ["127.0.0.1", "localhost", "[::1]"] {
            hosts.push(format!("{name}:{port}"));
            if port == 80 {
                hosts.push(name.to_owned());
            }
        }
        Security { token, csrf, hosts }
    }

    /// The CSRF token forms carry.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether `given` is the CSRF token.
    pub fn csrf_matches(&self, given: &str) -> bool {
        same(given, &self.csrf)
    }
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// The value of `name` in a query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn refuse(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

/// Whether a POST comes from a page of this server: not marked cross-site by the browser, and
/// from this origin when the browser names one.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = header_str(headers, header::HeaderName::from_static("sec-fetch-site"))
        && site != "same-origin"
        && site != "none"
    {
        return false;
    }
    if let Some(origin) = header_str(headers, header::ORIGIN) {
        let Some(host) = header_str(headers, header::HOST) else {
            return false;
        };
        let ours = [format!("http://{host}"), format!("https://{host}")];
        if !ours.iter().any(|o| o == origin) {
            return false;
        }
    }
    true
}

/// The layer in front of every route: the host or token check, the same-origin check for
/// POSTs, and the security headers on every answer.
pub(crate) async fn guard(
    State(security): State<Arc<Security>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let mut response = match &security.token {
        None => {
            let host = header_str(headers, header::HOST).unwrap_or("");
            if !security.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
                refuse(
                    StatusCode::FORBIDDEN,
                    "forbidden: this server answers only to 127.0.0.1, localhost or [::1]",
                )
            } else {
                check_post(request, next).await
            }
        }
        Some(token) => {
            let bearer = header_str(headers, header::AUTHORIZATION)
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| same(t.trim(), token));
            let cookie_ok = cookie(headers, TOKEN_COOKIE).is_some_and(|t| same(t, token));
            let query = request.uri().query().unwrap_or("");
            let in_query = query_param(query, "token");
            if bearer || cookie_ok {
                check_post(request, next).await
            } else if in_query.as_deref().is_some_and(|t| same(t, token))
                && request.method() == Method::GET
            {
                // Set the cookie and show the same address without the token in it.
                let rest: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                    .filter(|(k, _)| k != "token")
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                let mut location = request.uri().path().to_owned();
                if !rest.is_empty() {
                    location.push('?');
                    location.push_str(
                        &url::form_urlencoded::Serializer::new(String::new())
                            .extend_pairs(rest)
                            .finish(),
                    );
                }
                let mut response = StatusCode::SEE_OTHER.into_response();
                let set = format!(
                    "{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age=2592000"
                );
                if let (Ok(location), Ok(set)) = (
                    HeaderValue::from_str(&location),
                    HeaderValue::from_str(&set),
                ) {
                    response.headers_mut().insert(header::LOCATION, location);
                    response.headers_mut().insert(header::SET_COOKIE, set);
                    response
                } else {
                    refuse(StatusCode::BAD_REQUEST, "bad request")
                }
            } else {
                let mut response = refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized: this server needs its token (Authorization: Bearer <token>, \
                     or open any page once with ?token=<token>)",
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"run-engine\""),
                );
                response
            }
        }
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

async fn check_post(request: Request, next: Next) -> Response {
    if request.method() != Method::GET
        && request.method() != Method::HEAD
        && !same_origin(request.headers())
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden: a cross-site request may not change anything",
        );
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            );
        }
        h
    }

    #[test]
    fn only_same_origin_posts_pass() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8080")])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example"),
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("sec-fetch-site", "cross-site"),
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("sec-fetch-site", "same-site"),
        ])));
    }

    #[test]
    fn a_public_address_needs_a_long_token() {
        let public = ServeConfig {
            listen: "0.0.0.0:8080".parse().expect("addr"),
            token: None,
        };
        assert!(matches!(
            check_config(&public),
            Err(WebError::TokenRequired(_))
        ));
        let short = ServeConfig {
            token: Some("abc".into()),
            ..public.clone()
        };
        assert!(matches!(check_config(&short), Err(WebError::WeakToken)));
        let odd = ServeConfig {
            token: Some("0123456789abcdef; x".into()),
            ..public.clone()
        };
        assert!(matches!(check_config(&odd), Err(WebError::WeakToken)));
        let ok = ServeConfig {
            token: Some("0123456789abcdef".into()),
            ..public
        };
        assert!(check_config(&ok).is_ok());
        assert!(check_config(&ServeConfig::default()).is_ok());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }
}
