//! Actions people take: deploy the branch head, roll back, redeploy a past version, lock and
//! unlock an app, cancel its running deployment. Each is a plain function over `AppState`; the handlers accept the admin
//! token (scripts, JSON) or a dashboard session with its CSRF token (forms, answered with a
//! redirect), and each answer carries its why-log entry (`why::Heard`).
//!
//! A locked app takes no deploy unless it is forced (`force`): a manual deploy or a redeploy
//! is refused with 409 and who locked it, and pushes wait (`db::enqueue`). A rollback goes
//! through, as with Kamal's lock: undoing a bad release is what a lock must not stop.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Redirect, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::session::{Actor, authorize};
use super::views;
use super::why::{self, Heard};
use super::{AppError, AppState};
use crate::db::{self, Enqueued};
use crate::domain::{AppName, CommitSha, Decision, DeploymentId, Trigger, TriggerKind};
use crate::rollback;

pub fn routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/apps/{app}/deploy", post(deploy))
        .route("/api/apps/{app}/rollback", post(rollback))
        .route("/api/apps/{app}/lock", post(lock))
        .route("/api/apps/{app}/unlock", post(unlock))
        .route("/api/apps/{app}/cancel", post(cancel))
        .route("/api/deployments/{id}/redeploy", post(redeploy))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            why::record,
        ))
}

/// The fields an action may carry, as JSON (scripts) or a form (the dashboard).
#[derive(Deserialize, Default)]
struct ActionInput {
    commit: Option<String>,
    csrf: Option<String>,
    /// Deploy even though the app is locked.
    #[serde(default)]
    force: bool,
    /// Why the app is locked.
    reason: Option<String>,
}

struct Action {
    input: ActionInput,
    from_form: bool,
    actor: Actor,
}

/// The longest lock reason kept, in characters: it is shown on every page of the app.
const MAX_LOCK_REASON_CHARS: usize = 200;

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
    let actor = authorize(state, headers, input.csrf.as_deref())?;
    Ok(Action {
        input,
        from_form,
        actor,
    })
}

/// A form goes on to the deployment's page; a script gets the id.
fn answer(action: &Action, id: DeploymentId, heard: Heard) -> Response {
    if action.from_form {
        heard.on(Redirect::to(&format!("/deployments/{id}")))
    } else {
        heard.on((StatusCode::ACCEPTED, Json(json!({ "deployment_id": id }))))
    }
}

/// Who holds a lock, since when and why: "by admin since 2026-12-01 12:00:00 UTC: migration".
fn held(lock: &db::Lock) -> String {
    format!(
        "by {} since {}: {}",
        lock.actor,
        views::utc(lock.locked_at),
        lock.reason
    )
}

/// Refuses a deploy of a locked app unless it is forced; says who locked it, when and why.
async fn unless_locked(state: &AppState, app: &AppName, force: bool) -> Result<(), AppError> {
    if force {
        return Ok(());
    }
    let name = app.to_string();
    match state.db.call(move |conn| db::lock_of(conn, &name)).await? {
        None => Ok(()),
        Some(lock) => Err(AppError::Conflict(format!(
            "`{app}` is locked {}; deploy with --force to deploy anyway",
            held(&lock)
        ))),
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
    unless_locked(&state, &config.name, action.input.force).await?;
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
        // A manual deploy is never held by the lock: it was refused above, or forced.
        Enqueued::New { id, .. } | Enqueued::Held { id, .. } => id,
        Enqueued::Duplicate { .. } => {
            return Err(AppError::Internal(
                "an action cannot be a redelivery".into(),
            ));
        }
    };
    let forced = if action.input.force {
        " (forced past the lock)"
    } else {
        ""
    };
    let heard = Heard::new(
        &config.name,
        Decision::Deployed,
        format!("deploy queued as #{id}{forced}"),
        Some(id),
    );
    Ok(answer(&action, id, heard))
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
    let app = state.app(&past.app)?;
    if let Err(refused) = unless_locked(&state, &past.app, action.input.force).await {
        // Its URL names no app: the why log learns it here.
        let heard = Heard::new(&past.app, Decision::Refused, refused.to_string(), None);
        return Ok(heard.on(refused));
    }
    let new_id = rollback::redeploy(&state.queue, app, &past).await?;
    let heard = Heard::new(
        &past.app,
        Decision::Deployed,
        format!("redeploy of #{id} queued as #{new_id}"),
        Some(new_id),
    );
    Ok(answer(&action, new_id, heard))
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
    let heard = Heard::new(
        &app.config.name,
        Decision::Deployed,
        format!("rollback as #{id}"),
        Some(id),
    );
    Ok(answer(&action, id, heard))
}

/// Stops the app's running deployment; the previous version keeps serving.
async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let action = read_action(&state, &headers, &body)?;
    let name = state.app(&app)?.config.name.clone();
    let id = state
        .queue
        .cancel(&name, action.actor.as_str())
        .ok_or_else(|| AppError::Conflict(format!("no deployment of `{name}` is running")))?;
    tracing::info!(app = %name, deployment_id = %id, actor = action.actor.as_str(), "cancel asked");
    let heard = Heard::new(
        &name,
        Decision::Cancelled,
        format!("cancel of #{id} by {}", action.actor.as_str()),
        Some(id),
    );
    Ok(answer(&action, id, heard))
}

/// A form goes back to the overview; a script gets `body`.
fn lock_answer(action: &Action, body: serde_json::Value, heard: Heard) -> Response {
    if action.from_form {
        heard.on(Redirect::to("/"))
    } else {
        heard.on(Json(body))
    }
}

/// Locks the app: pushes wait and manual deploys need `force` until it is unlocked.
async fn lock(
    State(state): State<Arc<AppState>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let action = read_action(&state, &headers, &body)?;
    let name = state.app(&app)?.config.name.clone();
    let reason: String = action
        .input
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| AppError::BadRequest("a lock needs a reason (--reason \"…\")".into()))?
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_LOCK_REASON_CHARS)
        .collect();
    let actor = action.actor.as_str();
    let locking = {
        let name = name.to_string();
        state
            .db
            .call(move |conn| db::lock(conn, &name, &reason, actor))
            .await?
    };
    match locking {
        db::Locking::Locked(lock) => {
            tracing::info!(app = %name, actor, "locked");
            let heard = Heard::new(
                &name,
                Decision::Locked,
                format!("locked: {}", lock.reason),
                None,
            );
            Ok(lock_answer(
                &action,
                json!({ "app": name, "lock": lock }),
                heard,
            ))
        }
        db::Locking::AlreadyLocked(lock) => Err(AppError::Conflict(format!(
            "`{name}` is already locked {}",
            held(&lock)
        ))),
    }
}

/// Unlocks the app and deploys the newest push that waited for it.
async fn unlock(
    State(state): State<Arc<AppState>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let action = read_action(&state, &headers, &body)?;
    let name = state.app(&app)?.config.name.clone();
    let unlocked = state
        .queue
        .unlock(&name)
        .await?
        .ok_or_else(|| AppError::Conflict(format!("`{name}` is not locked")))?;
    tracing::info!(app = %name, actor = action.actor.as_str(), "unlocked");
    let reason = match unlocked.released {
        Some(id) => format!("unlocked; the newest waiting push is queued as #{id}"),
        None => "unlocked; no push was waiting".to_owned(),
    };
    let heard = Heard::new(&name, Decision::Unlocked, reason, unlocked.released);
    let body = json!({
        "app": name,
        "deployment_id": unlocked.released,
        "superseded": unlocked.superseded,
    });
    Ok(lock_answer(&action, body, heard))
}
