//! HTTP: webhooks, the JSON API, the dashboard and its event stream. Handlers are thin: they
//! check who is asking, call the queue, the database or a switch, and map every error to a
//! status and a one-line reason in one place (`AppError`).

mod actions;
mod api;
mod dashboard;
mod hooks;
mod session;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use crate::apps::{App, Apps};
use crate::config::{Config, Secret};
use crate::db::Db;
use crate::events::Bus;
use crate::queue::Queue;

pub use actions::roll_back;
pub use api::switch_traffic;

pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub bus: Bus,
    pub queue: Queue,
    pub apps: Apps,
    /// For people and scripts: API actions and the dashboard login.
    pub admin_token: Secret,
    /// For hooks on this host: the switch endpoint only. Made anew at every start.
    pub switch_token: Secret,
    /// Cancelled when the server shuts down, so event streams end and shutdown completes.
    pub shutdown: CancellationToken,
}

impl AppState {
    fn app(&self, name: &str) -> Result<&Arc<App>, AppError> {
        self.apps
            .get(name)
            .ok_or_else(|| AppError::NotFound(format!("no app named `{name}`")))
    }
}

/// The whole HTTP surface; `serve` serves it, `tests/it/routes.rs` drives it with `oneshot`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(hooks::routes())
        .merge(api::routes())
        .merge(actions::routes())
        .merge(dashboard::routes())
        .with_state(state)
}

/// Every way a request can fail, each with its status and a one-line reason.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<crate::db::DbError> for AppError {
    fn from(err: crate::db::DbError) -> Self {
        tracing::error!(error = %err, "database error while answering a request");
        Self::Internal("the database could not answer".into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), reason = %self, "request failed");
        }
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
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

fn require_loopback(peer: SocketAddr) -> Result<(), AppError> {
    if peer.ip().is_loopback() {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "only callers on this host may switch traffic".into(),
        ))
    }
}
