//! The dashboard: server-rendered pages (askama templates compiled into the binary) and the
//! `/events` stream that keeps open pages current. Reading works without JavaScript.

use std::convert::Infallible;
use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;

use super::{AppError, AppState};
use crate::db::{self, Deployment, Live, StageRow};
use crate::domain::DeploymentId;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(overview))
        .route("/deployments/{id}", get(deployment_page))
        .route("/events", get(events))
        .route(
            "/static/style.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css")],
                    include_str!("../../static/style.css"),
                )
            }),
        )
        .route(
            "/static/live.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript")],
                    include_str!("../../static/live.js"),
                )
            }),
        )
}

struct AppCard {
    name: String,
    proxy: String,
    live: Option<Live>,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    apps: Vec<AppCard>,
    deployments: Vec<Deployment>,
}

#[derive(Template)]
#[template(path = "deployment.html")]
struct DeploymentPage {
    deployment: Deployment,
    stages: Vec<StageRow>,
}

fn render(page: &impl Template) -> Result<Html<String>, AppError> {
    page.render()
        .map(Html)
        .map_err(|err| AppError::Internal(format!("template: {err}")))
}

async fn overview(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, AppError> {
    let mut names: Vec<String> = state.apps.keys().cloned().collect();
    names.sort();
    let (lives, deployments) = {
        let names = names.clone();
        state
            .db
            .call(move |conn| {
                let lives = names
                    .iter()
                    .map(|n| db::live(conn, n))
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((lives, db::deployments(conn, None, None, 20, 0)?))
            })
            .await?
    };
    let apps = names
        .into_iter()
        .zip(lives)
        .map(|(name, live)| AppCard {
            proxy: state.apps[&name].backends.app.proxy_listen().to_string(),
            name,
            live,
        })
        .collect();
    render(&OverviewPage { apps, deployments })
}

async fn deployment_page(
    State(state): State<Arc<AppState>>,
    Path(id): Path<DeploymentId>,
) -> Result<impl IntoResponse, AppError> {
    let found = state
        .db
        .call(move |conn| {
            let Some(deployment) = db::deployment(conn, id)? else {
                return Ok(None);
            };
            Ok(Some((deployment, db::stages(conn, id)?)))
        })
        .await?;
    let (deployment, stages) =
        found.ok_or_else(|| AppError::NotFound(format!("no deployment {id}")))?;
    render(&DeploymentPage { deployment, stages })
}

/// Server-Sent Events: every bus event as JSON. Streams end when the server shuts down, or
/// they would hold graceful shutdown open forever.
async fn events(
    State(state): State<Arc<AppState>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let shutdown = state.shutdown.clone();
    let stream = BroadcastStream::new(state.bus.subscribe())
        .filter_map(|event| std::future::ready(event.ok()))
        .map(|event| {
            let data = serde_json::to_string(&event).unwrap_or_default();
            Ok(SseEvent::default().data(data))
        })
        .take_until(async move { shutdown.cancelled().await });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `2026-11-25 14:03:07 UTC` for a millisecond timestamp (templates).
pub fn utc(ms: &i64) -> String {
    chrono::DateTime::from_timestamp_millis(*ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// `1.2 s` between two millisecond timestamps (templates).
pub fn duration(start: &Option<i64>, end: &Option<i64>) -> String {
    match (start, end) {
        (Some(start), Some(end)) => format!("{:.1} s", (end - start) as f64 / 1000.0),
        _ => String::new(),
    }
}
