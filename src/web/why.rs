//! The why log over HTTP: `record`, the middleware on the webhook and action routes that
//! writes one `triggers` row for every request they answer — what the handler decided
//! (`Heard`, carried on its answer) or, for a refusal, the one-line reason `AppError` gave
//! (`Refusal`) — and the reads, `GET /api/deliveries` and the `/deliveries` page. It never
//! records a request's body, and it never changes an answer: a row it cannot write is logged.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::dashboard::{csrf_of, render};
use super::error::Refusal;
use super::views::When;
use super::{AppError, AppState, bearer};
use crate::db::{self, NewTrigger, TriggerRow, now_ms};
use crate::domain::{AppName, Decision, DeploymentId, DeploymentStatus};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/deliveries", get(deliveries))
        .route("/deliveries", get(page))
}

/// What a handler decided about the trigger it answered, for the why log.
#[derive(Clone, Debug)]
pub struct Heard {
    pub app: Option<AppName>,
    pub decision: Decision,
    pub reason: String,
    pub deployment_id: Option<DeploymentId>,
    /// The sender's id for it when the request's headers do not say (Travis's build).
    pub delivery_id: Option<String>,
}

impl Heard {
    pub fn new(
        app: &AppName,
        decision: Decision,
        reason: impl Into<String>,
        deployment_id: Option<DeploymentId>,
    ) -> Self {
        Self {
            app: Some(app.clone()),
            decision,
            reason: reason.into(),
            deployment_id,
            delivery_id: None,
        }
    }

    /// `response`, carrying this decision to `record`.
    pub fn on(self, response: impl IntoResponse) -> Response {
        let mut response = response.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

/// Who sent a request and about what, as far as its head says: the rest is the answer's.
struct Sender {
    source: &'static str,
    actor: String,
    event: Option<String>,
    delivery_id: Option<String>,
    app: Option<AppName>,
}

impl Sender {
    fn of(state: &AppState, request: &Request) -> Self {
        let path = request.uri().path();
        let headers = request.headers();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        // Only a configured app's name is kept: anyone may put anything in a URL.
        let configured = |name: &str| state.apps.get(name).map(|app| app.config.name.clone());
        if let Some(hook) = path.strip_prefix("/hooks/") {
            let named = request.uri().query().and_then(|query| {
                url::form_urlencoded::parse(query.as_bytes())
                    .find(|(key, _)| key == "app")
                    .and_then(|(_, name)| configured(&name))
            });
            let github = hook == "github";
            return Self {
                source: if github { "github" } else { "travis" },
                actor: hook.to_owned(),
                event: if github {
                    header("x-github-event")
                } else {
                    Some("build".into())
                },
                delivery_id: if github {
                    header("x-github-delivery")
                } else {
                    None
                },
                app: named,
            };
        }
        let segments: Vec<&str> = path.split('/').collect();
        let app = match segments.as_slice() {
            ["", "api", "apps", name, ..] => configured(name),
            _ => None,
        };
        let (source, actor) = caller(state, headers);
        Self {
            source,
            actor,
            event: segments.last().map(|action| (*action).to_owned()),
            delivery_id: None,
            app,
        }
    }

    /// The row for `response`; `None` for an answer no handler spoke for.
    fn heard(self, response: &Response) -> Option<NewTrigger> {
        let status = response.status();
        let (decision, reason, deployment_id, app, delivery_id) =
            match response.extensions().get::<Heard>() {
                Some(heard) => (
                    heard.decision,
                    heard.reason.clone(),
                    heard.deployment_id,
                    heard.app.clone().or(self.app),
                    heard.delivery_id.clone().or(self.delivery_id),
                ),
                None if status.is_client_error() || status.is_server_error() => {
                    let reason = match response.extensions().get::<Refusal>() {
                        Some(Refusal(reason)) => reason.clone(),
                        None => status.canonical_reason().unwrap_or("refused").to_owned(),
                    };
                    (Decision::Refused, reason, None, self.app, self.delivery_id)
                }
                None => return None,
            };
        Some(NewTrigger {
            app,
            source: self.source,
            event: self.event,
            delivery_id,
            actor: self.actor,
            decision,
            reason,
            status: status.as_u16(),
            deployment_id,
        })
    }
}

/// Where an action comes from and who took it, as far as the request shows: the admin
/// token, a dashboard login, or neither (refused, then).
fn caller(state: &AppState, headers: &HeaderMap) -> (&'static str, String) {
    let presented = bearer(headers);
    if let Some(owner) = state.token_owner(presented) {
        return ("api", owner);
    }
    if presented.is_some() {
        return ("api", "anonymous".into());
    }
    let session = state
        .sessions
        .current(headers, &state.admin_token, now_ms());
    match session.and_then(|session| state.sessions.actor_of(&session)) {
        Some(actor) => ("dashboard", actor),
        None => ("api", "anonymous".into()),
    }
}

/// Records the trigger each request is, once its answer is known, before it is sent: so
/// whoever reads the log after the answer finds the row.
pub async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let sender = Sender::of(&state, &request);
    let response = next.run(request).await;
    if let Some(trigger) = sender.heard(&response) {
        let written = state
            .db
            .call(move |conn| db::record_trigger(conn, &trigger))
            .await;
        if let Err(err) = written {
            tracing::warn!(error = %err, "could not record a trigger in the why log");
        }
    }
    response
}

#[derive(Deserialize)]
struct LogQuery {
    app: Option<String>,
    limit: Option<u32>,
    deployment: Option<DeploymentId>,
}

/// Rows a read returns unless it asks for fewer; at most `MAX_LIMIT`.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

async fn read(state: &AppState, query: LogQuery) -> Result<(String, Vec<TriggerRow>), AppError> {
    let app = query.app.filter(|a| !a.is_empty());
    if let Some(name) = &app {
        state.app(name)?;
    }
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let deployment = query.deployment;
    let filter = app.clone();
    let rows = state
        .db
        .call(move |conn| db::triggers(conn, filter.as_deref(), deployment, limit))
        .await?;
    Ok((app.unwrap_or_default(), rows))
}

/// `GET /api/deliveries?app=&limit=`: the why log, newest first.
async fn deliveries(
    State(state): State<Arc<AppState>>,
    Query(query): Query<LogQuery>,
) -> Result<Json<Vec<TriggerRow>>, AppError> {
    Ok(Json(read(&state, query).await?.1))
}

/// One row of the page.
pub struct TriggerView {
    pub id: i64,
    pub at: When,
    pub app: String,
    /// `github push`, `api deploy`, `dashboard lock`.
    pub what: String,
    pub delivery_id: String,
    pub actor: String,
    pub decision: Decision,
    pub reason: String,
    pub status: u16,
    pub deployment_id: Option<DeploymentId>,
    pub deployment_status: Option<DeploymentStatus>,
}

impl TriggerView {
    pub fn new(row: &TriggerRow, now: i64) -> Self {
        Self {
            id: row.id,
            at: When::new(row.received_at, now),
            app: row.app.as_deref().unwrap_or("").to_owned(),
            what: match &row.event {
                Some(event) => format!("{} {event}", row.source),
                None => row.source.clone(),
            },
            delivery_id: row.delivery_id.clone().unwrap_or_default(),
            actor: row.actor.clone(),
            decision: row.decision,
            reason: row.reason.clone(),
            status: row.status,
            deployment_id: row.deployment_id,
            deployment_status: row.deployment_status,
        }
    }
}

#[derive(Template)]
#[template(path = "deliveries.html")]
struct DeliveriesPage {
    csrf: Option<String>,
    apps: Vec<String>,
    app: String,
    triggers: Vec<TriggerView>,
}

/// `/deliveries`: the why log as a page.
async fn page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<LogQuery>,
) -> Result<Response, AppError> {
    let now = now_ms();
    let (app, rows) = read(&state, query).await?;
    render(&DeliveriesPage {
        csrf: csrf_of(&state, &headers),
        apps: state.apps.names().map(str::to_owned).collect(),
        app,
        triggers: rows.iter().map(|row| TriggerView::new(row, now)).collect(),
    })
}
