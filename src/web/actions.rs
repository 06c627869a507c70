//! Actions people take: deploy the branch head, roll back, redeploy a past version. Each is
//! a plain function over `AppState`; the handlers accept the admin token (scripts, JSON) or
//! a dashboard session with its CSRF token (forms, answered with a redirect).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::session::authorize;
use super::{AppError, AppState};
use crate::db::{self, Enqueued};
use crate::domain::{CommitSha, DeploymentId, Trigger, TriggerKind};
use crate::rollback;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/apps/{app}/deploy", post(deploy))
        .route("/api/apps/{app}/rollback", post(rollback))
        .route("/api/deployments/{id}/redeploy", post(redeploy))
}

/// The fields an action may carry, as JSON (scripts) or a form (the dashboard).
#[derive(Deserialize, Default)]
struct ActionInput {
    commit: Option<String>,
    csrf: Option<String>,
}

struct Action {
    input: ActionInput,
    from_form: bool,
}

fn read_action(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<Action, AppError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let from_form = content_type.starts_with("application/x-www-form-urlencoded");
    let input = if body.is_empty() {
        ActionInput::default()
    } else if from_form {
        serde_urlencoded::from_bytes(body)
            .map_err(|err| AppError::BadRequest(format!("malformed form: {err}")))?
    } else {
        serde_json::from_slice(body)
            .map_err(|err| AppError::BadRequest(format!("malformed JSON: {err}")))?
    };
    authorize(state, headers, input.csrf.as_deref())?;
    Ok(Action { input, from_form })
}

/// A form goes on to the deployment's page; a script gets the id.
fn answer(action: &Action, id: DeploymentId) -> Response {
    if action.from_form {
        Redirect::to(&format!("/deployments/{id}")).into_response()
    } else {
        (StatusCode::ACCEPTED, Json(json!({ "deployment_id": id }))).into_response()
    }
}

async fn deploy(
    State(state): State<Arc<AppState>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let action = read_action(&state, &headers, &body)?;
    let config = &state.app(&app)?.config;
    let commit = action
        .input
        .commit
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(CommitSha::parse)
        .transpose()
        .map_err(|err| AppError::BadRequest(err.to_string()))?;
    let trigger = Trigger {
        app: config.name.clone(),
        commit,
        branch: config.branch.clone(),
        kind: TriggerKind::Manual,
        delivery: None,
        message: None,
        author: None,
        reuse: None,
    };
    let id = match state.queue.enqueue(trigger).await? {
        Enqueued::New { id, .. } => id,
        Enqueued::Duplicate { .. } => {
            return Err(AppError::Internal(
                "an action cannot be a redelivery".into(),
            ));
        }
    };
    Ok(answer(&action, id))
}

async fn redeploy(
    State(state): State<Arc<AppState>>,
    Path(id): Path<DeploymentId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let action = read_action(&state, &headers, &body)?;
    let past = state
        .db
        .call(move |conn| db::deployment(conn, id))
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no deployment {id}")))?;
    let new_id = rollback::redeploy(&state.queue, state.app(&past.app)?, &past).await?;
    Ok(answer(&action, new_id))
}

async fn rollback(
    State(state): State<Arc<AppState>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let action = read_action(&state, &headers, &body)?;
    let app = state.app(&app)?;
    let id = rollback::roll_back(&state.db, &state.traffic, &state.queue, app).await?;
    Ok(answer(&action, id))
}
