//! `POST /hooks/github` and `POST /hooks/travis`: verify, interpret, queue — and answer at
//! once with the deployment id. An app with `trigger = "travis"` or `"checks"` records a
//! push as waiting; Travis's report, or GitHub's checks of that commit, release it or fail
//! it. What a delivery means is decided in `webhook` and `gate`; this module only reads the
//! request, calls the queue and answers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

use super::error::Refusal;
use super::why::{self, Heard};
use super::{AppError, AppState};
use crate::apps::App;
use crate::config::{AppConfig, TriggerMode};
use crate::db::{self, CiOutcome, Enqueued};
use crate::domain::{AppName, CommitSha, Decision, DeploymentId, Trigger};
use crate::gate::Required;
use crate::webhook::{self, WebhookError, github, travis};

/// GitHub caps webhook payloads at 25 MB.
pub const MAX_WEBHOOK_BYTES: usize = 25 * 1024 * 1024;

/// Webhook bodies held in memory at once: anyone may send one (the signature can only be
/// checked once it has arrived whole), so this times the body limit bounds what they cost.
const MAX_WEBHOOKS_AT_ONCE: usize = 4;

/// How long a delivery may wait for its turn before it is answered 503.
const WAIT_FOR_TURN: Duration = Duration::from_secs(10);

/// A whole delivery, body included, must arrive within this: GitHub sends 25 MB in
/// seconds, so a body that trickles is a client holding memory, not a slow network.
const BODY_DEADLINE: Duration = Duration::from_secs(30);

pub fn routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let turns = Arc::new(Semaphore::new(MAX_WEBHOOKS_AT_ONCE));
    Router::new()
        .route("/hooks/github", post(github_hook))
        .route("/hooks/travis", post(travis_hook))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES))
        .layer(axum::middleware::from_fn_with_state(turns, one_turn_each))
        // Outside the turns: a delivery's row is written after its turn is given back.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            why::record,
        ))
}

/// Refuses a declared oversize body before reading it, lets a bounded number of deliveries
/// in at once, and gives each one a deadline.
async fn one_turn_each(
    State(turns): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_WEBHOOK_BYTES as u64) {
        // Answered at once, the body read and thrown away meanwhile: a client still sending
        // would otherwise meet a reset connection instead of this answer.
        let body = request.into_body();
        tokio::spawn(tokio::time::timeout(BODY_DEADLINE, discard(body)));
        return too_large().into_response();
    }
    let Ok(Ok(_turn)) = tokio::time::timeout(WAIT_FOR_TURN, turns.acquire()).await else {
        return busy();
    };
    match tokio::time::timeout(BODY_DEADLINE, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let reason = format!("the delivery did not arrive whole within {BODY_DEADLINE:?}");
            let mut response = (
                StatusCode::REQUEST_TIMEOUT,
                Json(json!({ "error": reason })),
            )
                .into_response();
            response.extensions_mut().insert(Refusal(reason));
            response
        }
    }
}

async fn discard(body: axum::body::Body) {
    use http_body_util::BodyExt;
    let mut body = body;
    while let Some(Ok(_)) = body.frame().await {}
}

fn busy() -> Response {
    let reason = "too many webhook deliveries at once; redeliver in a moment";
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": reason })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("5"));
    response.extensions_mut().insert(Refusal(reason.to_owned()));
    response
}

fn too_large() -> AppError {
    AppError::PayloadTooLarge(format!("webhook body is over {MAX_WEBHOOK_BYTES} bytes"))
}

#[derive(Deserialize)]
struct HookQuery {
    app: Option<String>,
}

/// A webhook's body as sent (its signature is over these bytes); one over the limit is
/// nonstop's own 413.
struct RawBody(Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = AppError;

    async fn from_request(request: Request, state: &S) -> Result<Self, AppError> {
        match Bytes::from_request(request, state).await {
            Ok(body) => Ok(Self(body)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(too_large())
            }
            Err(rejection) => Err(AppError::BadRequest(format!(
                "could not read the body: {}",
                rejection.body_text()
            ))),
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn github_hook(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HookQuery>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, AppError> {
    let signature = header(&headers, github::SIGNATURE_HEADER);
    // Who sent it is settled over the raw bytes before anything is decoded or parsed.
    let signed_by = signed_by(&state, query.app.as_deref(), github::KEY_SETTING, |app| {
        github::verify_for(app, signature, &body)
    })?;
    let delivery = github::Delivery::decode(
        headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
        header(&headers, github::EVENT_HEADER),
        header(&headers, github::DELIVERY_HEADER),
        &body,
    )?;
    let repository = delivery.repository();
    let app = &webhook::app_for_repository(&signed_by, repository.as_deref(), config_of)?.config;
    match delivery.interpret(app)? {
        github::Outcome::Pong => {
            let heard = Heard::new(
                &app.name,
                Decision::Ignored,
                "ping: nothing to deploy",
                None,
            );
            Ok(heard.on(Json(json!({ "ok": "pong", "app": app.name }))))
        }
        github::Outcome::Ignored(reason) => {
            let id = delivery.delivery.id.clone();
            state
                .db
                .call(move |conn| db::record_delivery(conn, "github", &id))
                .await?;
            tracing::info!(app = %app.name, event = delivery.event, reason = %reason, "webhook ignored");
            Ok(ignored(&app.name, reason))
        }
        github::Outcome::Deploy(trigger) => queue_push(&state, app, *trigger).await,
        github::Outcome::Checks(news) => {
            let github::CheckNews { commit, evidence } = *news;
            let outcome = state
                .queue
                .checks_reported(
                    &app.name,
                    Required::of(app),
                    commit,
                    evidence,
                    Some(delivery.delivery.clone()),
                )
                .await?;
            match &outcome {
                CiOutcome::Waiting { confirm: true, .. } => state.checks.ask_now(),
                CiOutcome::Ignored(reason) => {
                    tracing::info!(app = %app.name, event = delivery.event, reason = %reason, "checks of a commit nothing waits for");
                }
                _ => {}
            }
            Ok(ci_answer(
                &app.name,
                outcome,
                "this delivery was already received",
            ))
        }
    }
}

/// Queues a push to deploy, or, for an app that deploys after CI, records it waiting. A push
/// of the commit already live deploys nothing: it would only restart what serves.
async fn queue_push(
    state: &AppState,
    app: &AppConfig,
    trigger: Trigger,
) -> Result<Response, AppError> {
    if let Some(commit) = trigger.commit.as_ref().map(|c| c.to_string()) {
        let name = app.name.to_string();
        let live_commit = state
            .db
            .call(move |conn| {
                let Some(id) = db::live(conn, &name)?.and_then(|l| l.deployment_id) else {
                    return Ok(None);
                };
                Ok(db::deployment(conn, id)?.and_then(|d| d.commit_sha))
            })
            .await?;
        if live_commit.as_deref() == Some(commit.as_str()) {
            let reason = format!("commit {commit} is already live");
            tracing::info!(app = %app.name, reason = %reason, "webhook ignored");
            return Ok(ignored(&app.name, reason));
        }
    }
    let waiting = waiting_for(app, trigger.commit.as_ref());
    let enqueued = match &waiting {
        Some(waiting) => state.queue.hold(trigger, waiting.clone()).await?,
        None => state.queue.enqueue(trigger).await?,
    };
    let name = &app.name;
    Ok(match enqueued {
        Enqueued::New { id, .. } => match waiting {
            Some(waiting) => waits(
                Heard::new(
                    name,
                    Decision::Waiting,
                    format!("#{id} waits for {waiting}"),
                    Some(id),
                ),
                id,
                &waiting,
            ),
            None => queued(
                Heard::new(
                    name,
                    Decision::Deployed,
                    format!("queued as #{id}"),
                    Some(id),
                ),
                id,
            ),
        },
        Enqueued::Held { id, waiting_for } => waits(
            Heard::new(
                name,
                Decision::Blocked,
                format!("#{id} waits for {waiting_for}"),
                Some(id),
            ),
            id,
            &waiting_for,
        ),
        Enqueued::Duplicate { id } => duplicate(name, id, "this delivery was already received"),
    })
}

/// What a push of `commit` waits for before it deploys, for an app that deploys after CI.
fn waiting_for(app: &AppConfig, commit: Option<&CommitSha>) -> Option<String> {
    let commit = commit?;
    match app.trigger {
        TriggerMode::Push => None,
        TriggerMode::Travis => Some(format!("Travis CI to pass {commit}")),
        TriggerMode::Checks => Some(Required::of(app).describe(commit)),
    }
}

/// Travis CI's build notification: the form field `payload`, signed with Travis's key.
async fn travis_hook(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HookQuery>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, AppError> {
    let signature = header(&headers, travis::SIGNATURE_HEADER)
        .ok_or(WebhookError::MissingSignature("Signature"))?;
    let payload = travis::payload_of(&body)?;
    // Who sent it is settled over the raw payload before the JSON is parsed.
    let signed_by = signed_by(&state, query.app.as_deref(), travis::KEY_SETTING, |app| {
        travis::verify_for(app, Some(signature), payload.as_bytes())
    })?;
    let build = travis::parse(payload.as_bytes())?;
    let app = &webhook::app_for_repository(&signed_by, Some(&build.slug()), config_of)?.config;
    let answer = match travis::interpret(app, &build)? {
        travis::Outcome::Ignored(reason) => {
            tracing::info!(app = %app.name, build_id = build.id, reason = %reason, "Travis notification ignored");
            return Ok(with_build(ignored(&app.name, reason), build.id));
        }
        travis::Outcome::Passed(trigger, ci) => state.queue.ci_passed(trigger, ci).await?,
        travis::Outcome::Failed(trigger, ci, reason) => {
            state.queue.ci_failed(trigger, ci, reason).await?
        }
    };
    let answer = ci_answer(&app.name, answer, "this build was already reported");
    Ok(with_build(answer, build.id))
}

/// A Travis answer's why-log entry names the build it was about.
fn with_build(mut response: Response, build: u64) -> Response {
    if let Some(heard) = response.extensions_mut().get_mut::<Heard>() {
        heard.delivery_id = Some(format!("build {build}"));
    }
    response
}

/// The answer to a CI report (Travis's build, GitHub's checks): 202 with the deployment it
/// released, failed (and why) or still holds (and for what); `again` says what a duplicate is.
fn ci_answer(app: &AppName, outcome: CiOutcome, again: &str) -> Response {
    match outcome {
        CiOutcome::Released { id, .. } => queued(
            Heard::new(
                app,
                Decision::Deployed,
                format!("CI passed: queued as #{id}"),
                Some(id),
            ),
            id,
        ),
        CiOutcome::Failed { id, reason } => {
            let heard = Heard::new(
                app,
                Decision::Failed,
                format!("CI failed #{id}: {reason}"),
                Some(id),
            );
            heard.on((
                StatusCode::ACCEPTED,
                Json(json!({ "deployment_id": id, "failed": reason })),
            ))
        }
        CiOutcome::Waiting {
            id, waiting_for, ..
        } => waits(
            Heard::new(
                app,
                Decision::Waiting,
                format!("#{id} waits for {waiting_for}"),
                Some(id),
            ),
            id,
            &waiting_for,
        ),
        CiOutcome::Held { id, waiting_for } => waits(
            Heard::new(
                app,
                Decision::Blocked,
                format!("CI passed; #{id} waits for {waiting_for}"),
                Some(id),
            ),
            id,
            &waiting_for,
        ),
        CiOutcome::Duplicate { id } => duplicate(app, id, again),
        CiOutcome::Ignored(reason) => ignored(app, reason),
    }
}

/// 202 with the deployment queued.
fn queued(heard: Heard, id: DeploymentId) -> Response {
    heard.on((StatusCode::ACCEPTED, Json(json!({ "deployment_id": id }))))
}

/// 202 with the deployment recorded and what it waits for.
fn waits(heard: Heard, id: DeploymentId, waiting_for: &str) -> Response {
    heard.on((
        StatusCode::ACCEPTED,
        Json(json!({ "deployment_id": id, "waiting": format!("for {waiting_for}") })),
    ))
}

/// 202: received and understood, and nothing deploys, for `reason`.
fn ignored(app: &AppName, reason: String) -> Response {
    let heard = Heard::new(app, Decision::Ignored, reason.clone(), None);
    heard.on((StatusCode::ACCEPTED, Json(json!({ "ignored": reason }))))
}

/// 200: seen before; `id` is what it made then.
fn duplicate(app: &AppName, id: Option<DeploymentId>, what: &str) -> Response {
    let made = id.map_or_else(
        || "it deployed nothing".to_owned(),
        |id| format!("it made #{id}"),
    );
    let heard = Heard::new(
        app,
        Decision::Ignored,
        format!("duplicate: {what} ({made})"),
        id,
    );
    heard.on((
        StatusCode::OK,
        Json(json!({ "deployment_id": id, "duplicate": what })),
    ))
}

fn config_of(app: &Arc<App>) -> &AppConfig {
    &app.config
}

/// The apps whose key verifies a delivery. With `named` (the URL's `?app=NAME`) only that
/// app's key counts, and having none is refused; otherwise every app with a key is tried
/// (several may share one). `verify` checks one app's key (`None`: it has no `key_setting`).
fn signed_by<'a>(
    state: &'a AppState,
    named: Option<&str>,
    key_setting: &'static str,
    verify: impl Fn(&AppConfig) -> Option<Result<(), WebhookError>>,
) -> Result<Vec<&'a Arc<App>>, AppError> {
    if let Some(name) = named {
        let app = state.app(name)?;
        verify(&app.config).unwrap_or_else(|| {
            Err(WebhookError::NoKey {
                app: name.to_owned(),
                key: key_setting,
            })
        })?;
        return Ok(vec![app]);
    }
    let mut refusal = WebhookError::BadSignature;
    let mut signed = Vec::new();
    for app in state.apps.iter() {
        match verify(&app.config) {
            Some(Ok(())) => signed.push(app),
            Some(Err(err)) => refusal = err,
            None => {}
        }
    }
    if signed.is_empty() {
        return Err(refusal.into());
    }
    Ok(signed)
}
