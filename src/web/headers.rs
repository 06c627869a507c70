//! What every answer of the server carries for the browser's protection, and the `Host`
//! check that keeps a DNS-rebinding page from talking to the dashboard as if it were its
//! own origin. One middleware, applied to the whole router; it never looks at bodies.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppError, AppState};

/// Pages load only what nonstop serves itself (no inline script or style in the
/// templates), and no other site may frame them.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The names a request may address the server by, besides any IP address (a rebinding
/// attack needs a DNS name, so an address literal is always safe).
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    /// `localhost`, and the host names of `public_url` and the configured extra names.
    pub fn new<'a>(public_url: Option<&str>, extra: impl IntoIterator<Item = &'a str>) -> Self {
        let mut names = vec!["localhost".to_owned()];
        names.extend(
            public_url
                .and_then(|u| url::Url::parse(u).ok())
                .and_then(|u| u.host_str().map(str::to_ascii_lowercase)),
        );
        names.extend(extra.into_iter().map(str::to_ascii_lowercase));
        Self(names)
    }

    /// Whether `host` (a `Host` header: a name or address, perhaps with a port) is ours.
    pub fn allows(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            // `[v6 address]:port`
            Some(rest) => return rest.split(']').next().is_some_and(is_ip),
            None => host.rsplit_once(':').map_or(host, |(name, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            }),
        };
        is_ip(name)
            || self
                .0
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(name))
    }
}

fn is_ip(text: &str) -> bool {
    text.parse::<std::net::IpAddr>().is_ok()
}

/// Refuses requests for a host name that is not ours, and adds the security headers.
pub async fn protect(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    let mut response = match host {
        Some(host) if !state.allowed_hosts.allows(host) => {
            AppError::BadRequest(format!("host `{host}` is not served here")).into_response()
        }
        _ => next.run(request).await,
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    let is_page = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if is_page {
        // Pages carry the session's CSRF token: no cache may keep them.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_our_names_are_allowed_and_other_names_are_not() {
        let hosts = AllowedHosts::new(Some("https://Deploy.Example.com/"), ["ci.example.com"]);
        for ok in [
            "127.0.0.1:9000",
            "10.1.2.3",
            "[::1]:9000",
            "localhost:9000",
            "deploy.example.com",
            "DEPLOY.example.com:443",
            "ci.example.com",
        ] {
            assert!(hosts.allows(ok), "{ok} refused");
        }
        for bad in [
            "evil.example",
            "evil.example:9000",
            "deploy.example.com.evil",
            "[evil]",
        ] {
            assert!(!hosts.allows(bad), "{bad} allowed");
        }
    }
}
