//! Actions people take: deploy the branch head, roll back, redeploy a past version. Each is
//! a plain function over `AppState`; the handlers accept the admin token (scripts, JSON) or
//! a dashboard session with its CSRF token (forms, answered with a redirect).

use std::sync::Arc;
use std::time::Duration;

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
use crate::domain::{CommitSha, DeploymentId, DeploymentStatus, Reuse, Trigger, TriggerKind};
use crate::events::Event;

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

async fn enqueue(state: &AppState, trigger: Trigger) -> Result<DeploymentId, AppError> {
    match state.queue.enqueue(trigger).await? {
        Enqueued::New { id, .. } => Ok(id),
        Enqueued::Duplicate { .. } => Err(AppError::Internal(
            "an action cannot be a redelivery".into(),
        )),
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
        .map_err(AppError::BadRequest)?;
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
    let id = enqueue(&state, trigger).await?;
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
    let runtime = state.app(&past.app)?;
    let trigger = reuse_of(
        &past,
        runtime.config.name.clone(),
        TriggerKind::Manual,
        None,
    )?;
    let new_id = enqueue(&state, trigger).await?;
    Ok(answer(&action, new_id))
}

/// A trigger that deploys `past`'s stored bundle again.
fn reuse_of(
    past: &db::Deployment,
    app: crate::domain::AppName,
    kind: TriggerKind,
    rollback_of: Option<DeploymentId>,
) -> Result<Trigger, AppError> {
    if past.bundle_pruned_at.is_some() {
        return Err(AppError::Conflict(format!(
            "deployment {}'s bundle was deleted by retention (store.keep): deploy its commit instead",
            past.id
        )));
    }
    let (Some(version), Some(key), Some(sha256)) =
        (&past.version, &past.bundle_key, &past.bundle_sha256)
    else {
        return Err(AppError::Conflict(format!(
            "deployment {} has no stored bundle to redeploy",
            past.id
        )));
    };
    Ok(Trigger {
        app,
        commit: past
            .commit_sha
            .as_deref()
            .and_then(|c| CommitSha::parse(c).ok()),
        branch: past.branch.clone(),
        kind,
        delivery: None,
        message: past.commit_message.clone(),
        author: past.author.clone(),
        reuse: Some(Reuse {
            from: past.id,
            version: version.clone(),
            bundle_key: key.clone(),
            bundle_sha256: sha256.clone(),
            rollback_of,
        }),
    })
}

async fn rollback(
    State(state): State<Arc<AppState>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let action = read_action(&state, &headers, &body)?;
    let id = roll_back(&state, &app).await?;
    Ok(answer(&action, id))
}

/// Undoes the live deployment: switches back to the previous instance when it still runs
/// and answers its health check (instant), else redeploys the previous bundle.
pub async fn roll_back(state: &AppState, app: &str) -> Result<DeploymentId, AppError> {
    let runtime = state.app(app)?;
    let config = runtime.config.clone();
    let name = app.to_owned();
    let (live, running) = state
        .db
        .call(move |conn| Ok((db::live(conn, &name)?, db::running_deployment(conn, &name)?)))
        .await?;
    if let Some(running) = running {
        return Err(AppError::Conflict(format!(
            "deployment {running} is running; roll back when it ends"
        )));
    }
    let live = live.ok_or_else(|| {
        AppError::Conflict(format!("nothing of `{app}` is live to roll back from"))
    })?;
    let other = config.idle_port(Some(live.port));

    let name = app.to_owned();
    let undone = live.deployment_id;
    let (instance, instance_ok, previous) = state
        .db
        .call(move |conn| {
            let instance = db::instance(conn, &name, other)?;
            // Only an instance whose deployment went live is a version to go back to.
            let instance_ok = match instance.as_ref().and_then(|i| i.deployment_id) {
                Some(id) => db::deployment(conn, id)?.is_some_and(|d| {
                    matches!(
                        d.status,
                        DeploymentStatus::Succeeded | DeploymentStatus::RolledBack
                    )
                }),
                None => false,
            };
            let previous = db::previous_live_bundle(conn, &name, undone)?;
            Ok((instance, instance_ok, previous))
        })
        .await?;

    let switch_back = match &instance {
        Some(instance) if instance_ok => {
            crate::health::answers(instance.port, &config.health.path, Duration::from_secs(1)).await
        }
        _ => false,
    };
    if let (true, Some(instance)) = (switch_back, instance) {
        runtime
            .switch
            .switch_to(instance.port)
            .await
            .map_err(|err| {
                AppError::BadGateway(format!("switch back to {} failed: {err}", instance.port))
            })?;
        let (name, branch) = (app.to_owned(), config.branch.clone());
        let profile = config
            .profile_of(instance.port)
            .unwrap_or_default()
            .to_owned();
        let (id, live, previous) = state
            .db
            .call(move |conn| {
                let id = db::record_switch_back(conn, &name, &branch, &instance, undone)?;
                let (live, previous) =
                    db::set_live(conn, &name, instance.port, &profile, Some(id))?;
                Ok((id, live, previous))
            })
            .await?;
        tracing::info!(
            app,
            port = live.port,
            version = live.version.as_deref(),
            "rolled back by switching"
        );
        state.bus.publish(Event::Live {
            app: app.to_owned(),
            port: live.port,
            profile: live.profile,
            version: live.version.clone(),
            from_port: previous.map(|p| p.port),
        });
        for (deployment, status) in [
            (Some(id), DeploymentStatus::Succeeded),
            (undone, DeploymentStatus::RolledBack),
        ] {
            if let Some(deployment) = deployment {
                state.bus.publish(Event::Deployment {
                    id: deployment,
                    app: app.to_owned(),
                    status,
                    version: live.version.clone().unwrap_or_default(),
                });
            }
        }
        return Ok(id);
    }
    let previous = previous.ok_or_else(|| {
        AppError::Conflict(format!("`{app}` has no earlier version: the previous instance is gone and no earlier bundle is stored"))
    })?;
    let trigger = reuse_of(
        &previous,
        config.name.clone(),
        TriggerKind::Rollback,
        undone,
    )?;
    enqueue(state, trigger).await
}
