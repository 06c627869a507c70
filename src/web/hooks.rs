//! `POST /hooks/github` and `POST /hooks/travis`: verify, interpret, queue — and answer at
//! once with the deployment id. An app with `trigger = "travis"` records a push as waiting;
//! Travis's report of that commit releases it or fails it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{AppError, AppState};
use crate::apps::App;
use crate::config::TriggerMode;
use crate::db::{self, CiOutcome, Enqueued};
use crate::webhook::{WebhookError, github, travis};

/// GitHub caps webhook payloads at 25 MB.
pub const MAX_WEBHOOK_BYTES: usize = 25 * 1024 * 1024;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/hooks/github", post(github_hook))
        .route("/hooks/travis", post(travis_hook))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES))
}

#[derive(Deserialize)]
struct HookQuery {
    app: Option<String>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn github_hook(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HookQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::PayloadTooLarge(format!("webhook body is over {MAX_WEBHOOK_BYTES} bytes"))
        } else {
            AppError::BadRequest(format!(
                "could not read the body: {}",
                rejection.body_text()
            ))
        }
    })?;
    let signature = header(&headers, github::SIGNATURE_HEADER);

    // Who sent it is settled over the raw bytes before anything is parsed or decoded.
    let signed_by: Vec<&Arc<App>> = match &query.app {
        Some(name) => {
            let runtime = state.app(name)?;
            let secret = runtime.config.webhook_secret.as_ref().ok_or_else(|| {
                AppError::Unauthorized(format!("app `{name}` has no webhook_secret_env configured"))
            })?;
            github::verify(secret.expose().as_bytes(), signature, &body).map_err(unauthorized)?;
            vec![runtime]
        }
        None => apps_signing(&state, signature, &body)?,
    };
    let content_type =
        github::ContentType::from_header(headers.get(CONTENT_TYPE).map(|value| value.as_bytes()))
            .map_err(|err| AppError::UnsupportedMediaType(err.to_string()))?;
    let event = header(&headers, github::EVENT_HEADER)
        .ok_or_else(|| AppError::BadRequest("missing X-GitHub-Event header".into()))?;
    let malformed = |err: WebhookError| match err {
        WebhookError::Malformed(reason) => {
            AppError::BadRequest(format!("malformed {event} payload: {reason}"))
        }
        other => AppError::BadRequest(other.to_string()),
    };
    let document = github::payload(content_type, &body).map_err(malformed)?;
    let runtime = app_for_repository(&signed_by, &document)?;
    let app = &runtime.config;

    let delivery = header(&headers, github::DELIVERY_HEADER);
    let outcome = github::interpret(app, event, delivery, &document).map_err(malformed)?;

    match outcome {
        github::Outcome::Pong => Ok(Json(json!({ "ok": "pong", "app": app.name })).into_response()),
        github::Outcome::Ignored(reason) => {
            if let Some(id) = delivery.map(str::to_owned) {
                state.db.call(move |conn| db::record_delivery(conn, "github", &id)).await?;
            }
            tracing::info!(app = %app.name, event, reason = %reason, "webhook ignored");
            Ok((StatusCode::ACCEPTED, Json(json!({ "ignored": reason }))).into_response())
        }
        github::Outcome::Deploy(trigger) if app.trigger == TriggerMode::Travis => {
            let commit = trigger.commit.as_ref().map(|c| c.to_string()).unwrap_or_default();
            match state.queue.hold(*trigger).await? {
                Enqueued::New { id, .. } => Ok((
                    StatusCode::ACCEPTED,
                    Json(json!({ "deployment_id": id, "waiting": format!("for Travis CI to pass {commit}") })),
                )
                    .into_response()),
                Enqueued::Duplicate { id } => Ok((
                    StatusCode::OK,
                    Json(json!({ "deployment_id": id, "duplicate": "this delivery was already received" })),
                )
                    .into_response()),
            }
        }
        github::Outcome::Deploy(trigger) => match state.queue.enqueue(*trigger).await? {
            Enqueued::New { id, .. } => {
                Ok((StatusCode::ACCEPTED, Json(json!({ "deployment_id": id }))).into_response())
            }
            Enqueued::Duplicate { id } => Ok((
                StatusCode::OK,
                Json(json!({ "deployment_id": id, "duplicate": "this delivery was already received" })),
            )
                .into_response()),
        },
    }
}

/// Travis CI's build notification: the form field `payload`, signed with Travis's key.
async fn travis_hook(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HookQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = body.map_err(body_error)?;
    let signature = header(&headers, travis::SIGNATURE_HEADER);
    if signature.is_none() {
        return Err(AppError::Unauthorized("missing Signature header".into()));
    }
    let payload = travis::payload_of(&body).map_err(malformed)?;

    // Who sent it is settled over the raw payload before the JSON is parsed.
    let signed_by: Vec<&Arc<App>> = match &query.app {
        Some(name) => {
            let runtime = state.app(name)?;
            let key = runtime.config.travis_key.as_ref().ok_or_else(|| {
                AppError::Unauthorized(format!("app `{name}` has no Travis CI key configured"))
            })?;
            travis::verify(key, signature, payload.as_bytes()).map_err(unauthorized)?;
            vec![runtime]
        }
        None => {
            let signed_by: Vec<_> = state
                .apps
                .iter()
                .filter(|runtime| {
                    runtime.config.travis_key.as_ref().is_some_and(|key| {
                        travis::verify(key, signature, payload.as_bytes()).is_ok()
                    })
                })
                .collect();
            if signed_by.is_empty() {
                return Err(unauthorized(WebhookError::BadSignature));
            }
            signed_by
        }
    };

    let build = travis::parse(payload.as_bytes()).map_err(malformed)?;
    let slug = build.slug();
    // Several apps may share the key: the build's repository picks the app.
    let runtime = match signed_by.as_slice() {
        [only] => *only,
        several => several
            .iter()
            .copied()
            .find(|runtime| {
                runtime
                    .config
                    .repository
                    .as_deref()
                    .is_some_and(|r| r.eq_ignore_ascii_case(&slug))
            })
            .ok_or_else(|| {
                AppError::NotFound(format!(
                    "no app deploys repository {slug}; add ?app=NAME to the webhook URL or set `repository`"
                ))
            })?,
    };
    let app = &runtime.config;
    let outcome = travis::interpret(app, &build).map_err(malformed)?;
    let answer = match outcome {
        travis::Outcome::Ignored(reason) => {
            tracing::info!(app = %app.name, build_id = build.id, reason = %reason, "Travis notification ignored");
            return Ok((StatusCode::ACCEPTED, Json(json!({ "ignored": reason }))).into_response());
        }
        travis::Outcome::Passed(trigger, ci) => state.queue.ci_passed(trigger, ci).await?,
        travis::Outcome::Failed(trigger, ci, reason) => {
            state.queue.ci_failed(trigger, ci, reason).await?
        }
    };
    Ok(match answer {
        CiOutcome::Released { id, .. } => {
            (StatusCode::ACCEPTED, Json(json!({ "deployment_id": id }))).into_response()
        }
        CiOutcome::Failed { id } => (
            StatusCode::ACCEPTED,
            Json(json!({ "deployment_id": id, "failed": "the build failed; nothing deploys" })),
        )
            .into_response(),
        CiOutcome::Duplicate { id } => (
            StatusCode::OK,
            Json(json!({ "deployment_id": id, "duplicate": "this build was already reported" })),
        )
            .into_response(),
        CiOutcome::Ignored(reason) => {
            (StatusCode::ACCEPTED, Json(json!({ "ignored": reason }))).into_response()
        }
    })
}

fn body_error(rejection: BytesRejection) -> AppError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        AppError::PayloadTooLarge(format!("webhook body is over {MAX_WEBHOOK_BYTES} bytes"))
    } else {
        AppError::BadRequest(format!(
            "could not read the body: {}",
            rejection.body_text()
        ))
    }
}

fn malformed(err: WebhookError) -> AppError {
    AppError::BadRequest(err.to_string())
}

fn unauthorized(err: WebhookError) -> AppError {
    AppError::Unauthorized(err.to_string())
}

/// Without `?app=`, the apps whose secret signed the body (several may share a secret).
fn apps_signing<'a>(
    state: &'a AppState,
    signature: Option<&str>,
    body: &[u8],
) -> Result<Vec<&'a Arc<App>>, AppError> {
    let mut last_error = WebhookError::BadSignature;
    let mut signed_by: Vec<&Arc<App>> = Vec::new();
    for runtime in state.apps.iter() {
        let Some(secret) = &runtime.config.webhook_secret else {
            continue;
        };
        match github::verify(secret.expose().as_bytes(), signature, body) {
            Ok(()) => signed_by.push(runtime),
            Err(err) => last_error = err,
        }
    }
    if signed_by.is_empty() {
        return Err(unauthorized(last_error));
    }
    Ok(signed_by)
}

/// Of the apps that signed a delivery, the one whose repository the payload names; a single
/// app decides itself (a push from another repository is then ignored, with its reason).
fn app_for_repository<'a>(
    signed_by: &[&'a Arc<App>],
    document: &[u8],
) -> Result<&'a Arc<App>, AppError> {
    let repository = github::repository_of(document);
    let by_repository = signed_by.iter().copied().find(|runtime| {
        let configured = runtime.config.repository.as_deref();
        configured.is_some()
            && configured.map(str::to_ascii_lowercase)
                == repository.as_deref().map(str::to_ascii_lowercase)
    });
    match (by_repository, signed_by) {
        (Some(runtime), _) => Ok(runtime),
        (None, [only]) => Ok(only),
        _ => Err(AppError::NotFound(format!(
            "no app deploys repository {}; add ?app=NAME to the webhook URL or set `repository`",
            repository.as_deref().unwrap_or("(none named)")
        ))),
    }
}
