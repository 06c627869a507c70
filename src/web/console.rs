//! A deployment's console over HTTP: `GET /api/deployments/{id}/log` answers every stage's
//! log as plain text; with `?follow=1` it is an event stream of the lines as they are
//! printed (`lines` events, then one `end`), starting with what was printed before. Reads
//! only: the console and the record are written by the pipeline.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;

use super::{AppError, AppState};
use crate::db::{self, Deployment, StageRow};
use crate::domain::{DeploymentId, DeploymentStatus, StageStatus};
use crate::output::{Follow, Piece, Seen};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/api/deployments/{id}/log", get(log))
}

#[derive(Deserialize)]
struct LogQuery {
    follow: Option<String>,
}

async fn log(
    State(state): State<Arc<AppState>>,
    Path(id): Path<DeploymentId>,
    Query(query): Query<LogQuery>,
) -> Result<Response, AppError> {
    let follow = matches!(query.follow.as_deref(), Some("1" | "true"));
    // Before the record is read: a line printed meanwhile is then in the follow's pieces.
    let console = follow.then(|| state.bus.output().follow(id));
    let (deployment, stages) = state
        .db
        .call(move |conn| {
            let Some(deployment) = db::deployment(conn, id)? else {
                return Ok(None);
            };
            Ok(Some((deployment, db::stages(conn, id)?)))
        })
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no deployment {id}")))?;
    let Some(console) = console else {
        let text = recorded(&deployment, &stages);
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
    };
    let shutdown = state.shutdown.clone();
    let yet_to_print = matches!(
        deployment.status,
        DeploymentStatus::Waiting | DeploymentStatus::Queued | DeploymentStatus::Running
    );
    let stream = if console.snapshot.is_none() && !yet_to_print {
        // Its pipeline ended (here or before a restart; a guarded one may still be
        // `guarding`): its record is the whole of it.
        let text = recorded(&deployment, &stages);
        futures_util::stream::iter([lines_event(&text), Ok(end_event())]).boxed()
    } else {
        following(id, console).boxed()
    };
    let stream = stream.take_until(async move { shutdown.cancelled().await });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The console so far, then each new piece of it, until its deployment ends.
fn following(
    id: DeploymentId,
    console: Follow,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let Follow { snapshot, pieces } = console;
    futures_util::stream::unfold(
        (Seen::default(), snapshot, Some(pieces)),
        move |(mut seen, snapshot, pieces)| async move {
            if let Some(snapshot) = snapshot {
                let text = seen.fresh(&snapshot).into_owned();
                return Some((lines_event(&text), (seen, None, pieces)));
            }
            let mut pieces = pieces?;
            loop {
                match pieces.recv().await {
                    Ok(Piece::Lines(lines)) if lines.deployment_id == id => {
                        let text = seen.fresh(&lines).into_owned();
                        if !text.is_empty() {
                            return Some((lines_event(&text), (seen, None, Some(pieces))));
                        }
                    }
                    Ok(Piece::End(ended)) if ended == id => {
                        return Some((Ok(end_event()), (seen, None, None)));
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: what it missed is counted by the next lines' number.
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    )
}

fn lines_event(text: &str) -> Result<SseEvent, Infallible> {
    // An event's data may not hold a carriage return; a progress bar's becomes a new line.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    Ok(SseEvent::default().event("lines").data(text))
}

fn end_event() -> SseEvent {
    SseEvent::default().event("end").data("{}")
}

/// A finished (or not yet started) deployment's console, as its record has it.
fn recorded(deployment: &Deployment, stages: &[StageRow]) -> String {
    let mut text = String::new();
    for stage in stages {
        if matches!(stage.status, StageStatus::Pending) {
            continue;
        }
        text.push_str(&format!("── {}\n{}", stage.name, stage.log));
        if !stage.log.is_empty() && !stage.log.ends_with('\n') {
            text.push('\n');
        }
        if stage.status != StageStatus::Running {
            text.push_str(&format!("── {} {}\n", stage.name, stage.status));
        }
    }
    if deployment.status.is_finished() {
        match &deployment.error {
            Some(reason) => text.push_str(&format!("── {}: {reason}\n", deployment.status)),
            None => text.push_str(&format!("── {}\n", deployment.status)),
        }
    }
    text
}
