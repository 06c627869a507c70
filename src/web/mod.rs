//! HTTP: webhooks, the JSON API, the dashboard and its event stream. Handlers are thin:
//! who may read is decided once, before any handler (`access::gate`), who may act by
//! `session`; a handler then makes one call into the queue, `traffic`, `rollback` or the
//! database, and every error becomes a status and a one-line reason in one place
//! (`error::AppError`). Nothing here moves traffic or decides a rollback itself.

mod access;
mod actions;
mod api;
mod chart;
mod console;
mod dashboard;
mod error;
mod headers;
mod hooks;
mod session;
mod views;
mod why;

pub use error::{AppError, AppJson};
pub use headers::AllowedHosts;
pub use session::Sessions;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, header};
use tokio_util::sync::CancellationToken;

use crate::apps::{App, Apps};
use crate::checks::Checks;
use crate::config::{Config, Secret};
use crate::db::Db;
use crate::events::Bus;
use crate::queue::Queue;
use crate::traffic::Traffic;

pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub bus: Bus,
    pub queue: Queue,
    /// Asks GitHub about commits waiting for their checks, when a webhook cannot decide.
    pub checks: Checks,
    pub traffic: Traffic,
    pub apps: Apps,
    /// For people and scripts: API actions and the dashboard login.
    pub admin_token: Secret,
    /// For hooks on this host: the switch endpoint only. Made anew at every start.
    pub switch_token: Secret,
    /// Dashboard logins, and the throttle on wrong ones.
    pub sessions: Sessions,
    /// The names requests may address this server by.
    pub allowed_hosts: AllowedHosts,
    /// Cancelled when the server shuts down, so event streams end and shutdown completes.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Whose token `presented` is: the admin token's (`admin`) or a `[[user]]`'s (their
    /// name); compared in constant time with each.
    fn token_owner(&self, presented: Option<&str>) -> Option<String> {
        presented?;
        if token_matches(presented, &self.admin_token) {
            return Some(session::ADMIN.to_owned());
        }
        (self.config.users.iter())
            .find(|user| {
                user.token
                    .as_ref()
                    .is_some_and(|token| token_matches(presented, token))
            })
            .map(|user| user.name.clone())
    }

    fn app(&self, name: &str) -> Result<&Arc<App>, AppError> {
        self.apps
            .get(name)
            .ok_or_else(|| AppError::NotFound(format!("no app named `{name}`")))
    }
}

/// The whole HTTP surface; `serve` serves it, `tests/it/routes.rs` drives it with `oneshot`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(hooks::routes(&state))
        .merge(api::routes())
        .merge(actions::routes(&state))
        .merge(dashboard::routes())
        .merge(why::routes())
        .merge(console::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::gate,
        ))
        // Outermost: a foreign Host is refused before anything else, and every answer
        // (the gate's refusals too) carries the security headers.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            headers::protect,
        ))
        .with_state(state)
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Compares a presented token with the expected one in constant time.
fn token_matches(presented: Option<&str>, expected: &Secret) -> bool {
    use subtle::ConstantTimeEq;
    presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(expected.expose().as_bytes())))
}

/// Who the client is: the peer, or for a request the shared edge forwarded from this host,
/// the address the edge saw (its `X-Real-IP`, which it always sets and a client cannot).
fn client_ip(peer: SocketAddr, headers: &HeaderMap) -> std::net::IpAddr {
    let through_edge = headers.contains_key(crate::switch::edge::THROUGH_EDGE);
    if through_edge && peer.ip().to_canonical().is_loopback() {
        let seen = headers
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if let Some(seen) = seen {
            return seen;
        }
    }
    peer.ip()
}

fn require_loopback(peer: SocketAddr, headers: &HeaderMap) -> Result<(), AppError> {
    // The shared edge marks what it forwards here, and it connects from this host: a
    // request through it is a caller from anywhere.
    let through_edge = headers.contains_key(crate::switch::edge::THROUGH_EDGE);
    // A v4 caller on a dual-stack socket shows up as `::ffff:127.0.0.1`.
    if peer.ip().to_canonical().is_loopback() && !through_edge {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "only callers on this host may switch traffic".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn through_the_edge_a_caller_is_the_client_the_edge_saw_and_never_local() {
        let local: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let mut edge = HeaderMap::new();
        edge.insert(crate::switch::edge::THROUGH_EDGE, "1".parse().unwrap());
        edge.insert("x-real-ip", "203.0.113.7".parse().unwrap());

        assert_eq!(
            client_ip(local, &edge),
            "203.0.113.7".parse::<std::net::IpAddr>().unwrap()
        );
        assert!(require_loopback(local, &edge).is_err());
        assert!(require_loopback(local, &HeaderMap::new()).is_ok());

        // Only the edge on this host is believed: from elsewhere the header means nothing.
        let remote: SocketAddr = "198.51.100.1:50000".parse().unwrap();
        assert_eq!(client_ip(remote, &edge), remote.ip());
        let mut direct = HeaderMap::new();
        direct.insert("x-real-ip", "203.0.113.7".parse().unwrap());
        assert_eq!(
            client_ip(local, &direct),
            local.ip(),
            "no edge mark: the peer"
        );
    }
}
