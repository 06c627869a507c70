//! The dashboard: server-rendered pages (askama templates compiled into the binary), the
//! login that unlocks actions, and `/events`, the stream that keeps open pages current.
//! Every page reads fully without JavaScript; `static/live.js` only refreshes it in place.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Extension, Router};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use tokio_stream::wrappers::BroadcastStream;

use super::access::{self, MayRead};
use super::session::{self, csrf_token};
use super::views::{DeploymentView, LiveView, LockView, Progress, StageView, SwitchView};
use super::why::TriggerView;
use super::{AppError, AppState};
use crate::db::{self, now_ms};
use crate::domain::{DeploymentId, DeploymentStatus, Stage};

const HISTORY_PAGE_SIZE: u32 = 50;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(overview))
        .route("/deployments", get(history))
        .route("/deployments/{id}", get(deployment_page))
        .route("/deployments/{id}/stages/{stage}/log", get(stage_log))
        .route("/login", get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/events", get(events))
        .route("/favicon.svg", get(favicon))
        .route(
            "/static/style.css",
            get(|| static_file("text/css", include_str!("../../static/style.css"))),
        )
        .route(
            "/static/live.js",
            get(|| static_file("text/javascript", include_str!("../../static/live.js"))),
        )
}

async fn static_file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The CSRF token of the request's login session, if logged in (templates show actions).
pub(super) fn csrf_of(state: &AppState, headers: &HeaderMap) -> Option<String> {
    state
        .sessions
        .current(headers, &state.admin_token, now_ms())
        .map(|s| csrf_token(&state.admin_token, &s))
}

pub(super) fn render(page: &impl Template) -> Result<Response, AppError> {
    let html = page
        .render()
        .map_err(|err| AppError::Internal(format!("template: {err}")))?;
    Ok(Html(html).into_response())
}

struct AppCard {
    name: String,
    entry: String,
    branch: String,
    ports: String,
    live: Option<LiveView>,
    /// Whether the live instance answered its health check just now.
    healthy: Option<bool>,
    running: Option<Progress>,
    /// While locked: pushes wait, and a deploy must be forced.
    lock: Option<LockView>,
    /// Connections still open on the instance that is not live (after a switch, until
    /// they close or the next deploy drains them).
    still_open: Vec<StillOpen>,
}

struct StillOpen {
    port: u16,
    connections: usize,
    version: Option<String>,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    csrf: Option<String>,
    apps: Vec<AppCard>,
    deployments: Vec<DeploymentView>,
    /// The shared edge's certificates: whose, for which names, issuer, expiry, last error.
    certificates: Vec<CertificateRow>,
}

struct CertificateRow {
    owner: String,
    names: String,
    source: &'static str,
    issuer: String,
    expires: String,
    error: Option<String>,
}

/// What the edge (in this process or in `nonstop proxy`) last wrote about its certificates.
async fn certificate_rows(state: &AppState) -> Vec<CertificateRow> {
    let path = crate::switch::edge::status_file(&state.config.data_dir());
    let Ok(text) = tokio::fs::read(&path).await else {
        return Vec::new();
    };
    let statuses: Vec<crate::switch::edge::CertStatus> =
        serde_json::from_slice(&text).unwrap_or_default();
    statuses
        .into_iter()
        .map(|status| CertificateRow {
            owner: status.owner,
            names: status.names.join(", "),
            source: if status.acme { "ACME" } else { "files" },
            issuer: status.issuer.unwrap_or_default(),
            expires: status
                .not_after
                .map(|at| super::views::utc(at.saturating_mul(1000)))
                .unwrap_or_else(|| "none yet".into()),
            error: status.error,
        })
        .collect()
}

async fn overview(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let now = now_ms();
    let names: Vec<String> = state.apps.names().map(str::to_owned).collect();
    let open = futures_util::future::join_all(state.apps.iter().map(|app| async {
        // A card without the counts is better than no page.
        let switch = &app.switch;
        let open = switch.open_connections().await.unwrap_or_default();
        let live = switch.live();
        open.into_iter()
            .filter(|on| Some(on.port) != live && on.total() > 0)
            .collect::<Vec<_>>()
    }))
    .await;
    let (per_app, recent) = {
        let names = names.clone();
        state
            .db
            .call(move |conn| {
                let mut per_app = Vec::new();
                for (name, open) in names.iter().zip(open) {
                    let mut still_open = Vec::new();
                    for on in open {
                        still_open.push(StillOpen {
                            port: on.port,
                            connections: on.total(),
                            version: db::version_on(conn, name, on.port)?,
                        });
                    }
                    let live = db::live(conn, name)?;
                    let running = match db::running_deployment(conn, name)? {
                        Some(id) => db::deployment(conn, id)?.map(|d| (d, db::stages(conn, id))),
                        None => None,
                    };
                    let running = match running {
                        Some((d, stages)) => Some((d, stages?)),
                        None => None,
                    };
                    per_app.push((live, running, db::lock_of(conn, name)?, still_open));
                }
                Ok((per_app, db::deployments(conn, None, None, 10, 0)?))
            })
            .await?
    };
    let probes = state
        .apps
        .iter()
        .zip(&per_app)
        .map(|(app, (live, _, _, _))| {
            let path = app.config.health.path.clone();
            let port = live.as_ref().map(|l| l.port);
            async move {
                match port {
                    Some(port) => {
                        Some(crate::health::answers(port, &path, Duration::from_millis(300)).await)
                    }
                    None => None,
                }
            }
        });
    let health = futures_util::future::join_all(probes).await;
    let apps = state
        .apps
        .iter()
        .zip(per_app)
        .zip(health)
        .map(|((app, (live, running, lock, still_open)), healthy)| {
            let config = &app.config;
            AppCard {
                entry: config.entry(),
                branch: config.branch.clone(),
                ports: format!("{} / {}", config.ports[0], config.ports[1]),
                live: live.as_ref().map(|l| LiveView::new(l, now)),
                healthy,
                running: running.map(|(d, stages)| Progress {
                    deployment: DeploymentView::new(&d, now),
                    done: stages
                        .iter()
                        .filter(|s| {
                            s.status.as_str() != "pending" && s.status.as_str() != "running"
                        })
                        .count(),
                    stages: stages.iter().map(|s| StageView::new(s, now)).collect(),
                }),
                name: config.name.to_string(),
                lock: lock.as_ref().map(|l| LockView::new(l, now)),
                still_open,
            }
        })
        .collect();
    render(&OverviewPage {
        csrf: csrf_of(&state, &headers),
        apps,
        deployments: recent.iter().map(|d| DeploymentView::new(d, now)).collect(),
        certificates: certificate_rows(&state).await,
    })
}

#[derive(Deserialize)]
struct HistoryQuery {
    app: Option<String>,
    status: Option<String>,
    page: Option<u32>,
}

#[derive(Template)]
#[template(path = "history.html")]
struct HistoryPage {
    csrf: Option<String>,
    apps: Vec<String>,
    statuses: Vec<&'static str>,
    app: String,
    status: String,
    page: u32,
    pages: u32,
    total: u64,
    deployments: Vec<DeploymentView>,
}

impl HistoryPage {
    fn link(&self, page: u32) -> String {
        let query = serde_urlencoded::to_string([
            ("app", &self.app),
            ("status", &self.status),
            ("page", &page.to_string()),
        ])
        .unwrap_or_default();
        format!("/deployments?{query}")
    }
}

async fn history(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, AppError> {
    let now = now_ms();
    let app = query.app.filter(|a| !a.is_empty());
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        Some(text) => Some(
            DeploymentStatus::parse(text)
                .ok_or_else(|| AppError::BadRequest(format!("unknown status `{text}`")))?,
        ),
        None => None,
    };
    // Past the last page there is nothing; clamped so the offset cannot overflow.
    let page = query
        .page
        .unwrap_or(1)
        .clamp(1, u32::MAX / HISTORY_PAGE_SIZE);
    let (total, rows) = {
        let app = app.clone();
        state
            .db
            .call(move |conn| {
                let total = db::count_deployments(conn, app.as_deref(), status)?;
                let rows = db::deployments(
                    conn,
                    app.as_deref(),
                    status,
                    HISTORY_PAGE_SIZE,
                    (page - 1) * HISTORY_PAGE_SIZE,
                )?;
                Ok((total, rows))
            })
            .await?
    };
    let apps: Vec<String> = state.apps.names().map(str::to_owned).collect();
    render(&HistoryPage {
        csrf: csrf_of(&state, &headers),
        apps,
        statuses: DeploymentStatus::ALL.iter().map(|s| s.as_str()).collect(),
        app: app.unwrap_or_default(),
        status: status.map(|s| s.as_str().to_owned()).unwrap_or_default(),
        page,
        pages: (total.div_ceil(u64::from(HISTORY_PAGE_SIZE)) as u32).max(1),
        total,
        deployments: rows.iter().map(|d| DeploymentView::new(d, now)).collect(),
    })
}

#[derive(Template)]
#[template(path = "deployment.html")]
struct DeploymentPage {
    csrf: Option<String>,
    deployment: DeploymentView,
    branch: String,
    commit: String,
    stages: Vec<StageView>,
    switches: Vec<SwitchView>,
    rollback_of: Option<DeploymentId>,
    /// The trigger that made it (a delivery, an action), in the why log.
    cause: Option<TriggerView>,
    /// Its app's lock, while there is one.
    lock: Option<LockView>,
    /// The guard window's traffic chart (SVG), live while it is open, as kept once over.
    chart: Option<String>,
    /// Seconds left of an open guard window.
    guard_secs_left: Option<i64>,
    /// How the window ended (`passed`, `tripped`, `ended`).
    guard_outcome: String,
}

async fn deployment_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<DeploymentId>,
) -> Result<Response, AppError> {
    let now = now_ms();
    let found = state
        .db
        .call(move |conn| {
            let Some(deployment) = db::deployment(conn, id)? else {
                return Ok(None);
            };
            let lock = db::lock_of(conn, deployment.app.as_str())?;
            let guard = db::guard_of(conn, id)?;
            let kept_chart = db::guard_chart(conn, id)?;
            Ok(Some((
                db::stages(conn, id)?,
                db::switches_of(conn, id)?,
                db::trigger_of(conn, id)?,
                lock,
                deployment,
                (guard, kept_chart),
            )))
        })
        .await?;
    let (stages, switches, cause, lock, deployment, (guard, kept_chart)) =
        found.ok_or_else(|| AppError::NotFound(format!("no deployment {id}")))?;
    let chart = match (&guard, kept_chart) {
        (_, Some(kept)) => serde_json::from_str(&kept).ok(),
        (Some(window), None) if window.outcome.is_none() => {
            Some(crate::guard::chart_of(&state.traffic, window))
        }
        _ => None,
    };
    let guard_secs_left = guard
        .as_ref()
        .filter(|g| g.outcome.is_none())
        .map(|g| ((g.ends_at - now).max(0) + 999) / 1000);
    let guard_outcome = guard.and_then(|g| g.outcome).unwrap_or_default();
    render(&DeploymentPage {
        csrf: csrf_of(&state, &headers),
        branch: deployment.branch.clone(),
        commit: deployment
            .commit_sha
            .as_ref()
            .map_or_else(|| "branch head".to_owned(), |c| c.to_string()),
        rollback_of: deployment.rollback_of,
        deployment: DeploymentView::new(&deployment, now),
        stages: stages.iter().map(|s| StageView::new(s, now)).collect(),
        switches: switches.iter().map(|s| SwitchView::new(s, now)).collect(),
        cause: cause.as_ref().map(|t| TriggerView::new(t, now)),
        lock: lock.as_ref().map(|l| LockView::new(l, now)),
        chart: chart.as_ref().and_then(super::chart::svg),
        guard_secs_left,
        guard_outcome,
    })
}

/// A stage's whole output, as plain text.
async fn stage_log(
    State(state): State<Arc<AppState>>,
    Path((id, stage)): Path<(DeploymentId, String)>,
) -> Result<Response, AppError> {
    let stage =
        Stage::parse(&stage).ok_or_else(|| AppError::NotFound(format!("no stage `{stage}`")))?;
    let stages = state.db.call(move |conn| db::stages(conn, id)).await?;
    let row = stages
        .into_iter()
        .find(|s| s.name == stage)
        .ok_or_else(|| AppError::NotFound(format!("no deployment {id}")))?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        row.log,
    )
        .into_response())
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: Option<String>,
    error: String,
    /// Where the browser was going when it was sent here; it goes on there after login.
    next: String,
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// The page to go on to after login: `next` when it is a path on this server, else `/`.
fn after_login(next: Option<&str>) -> &str {
    next.and_then(access::local_path).unwrap_or("/")
}

async fn login_page(Query(query): Query<LoginQuery>) -> Result<Response, AppError> {
    render(&LoginPage {
        csrf: None,
        error: String::new(),
        next: after_login(query.next.as_deref()).to_owned(),
    })
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    // Through the edge every login comes from this host: the throttle counts the client
    // the edge saw, so one client's wrong tokens cannot lock everyone else out.
    let client = super::client_ip(peer, &headers);
    let form: LoginForm = serde_urlencoded::from_bytes(&body)
        .map_err(|err| AppError::BadRequest(format!("malformed login form: {err}")))?;
    let next = after_login(form.next.as_deref()).to_owned();
    let throttle = state.sessions.throttle();
    if let Err(wait) = throttle.check(client, now_ms()) {
        // Rounded up: a client told to come back a moment too early is refused again.
        let wait = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        return login_refused(
            StatusCode::TOO_MANY_REQUESTS,
            format!("Too many wrong tokens from your address: try again in {wait} s."),
            Some(wait),
            next,
        );
    }
    let Some(owner) = state.token_owner(Some(form.token.trim())) else {
        throttle.failed(client, now_ms());
        return login_refused(
            StatusCode::UNAUTHORIZED,
            "That is not the admin token.".into(),
            None,
            next,
        );
    };
    throttle.succeeded(client);
    // The admin token's login acts as `dashboard`, as it always did; a user's as its name.
    let actor = match owner.as_str() {
        super::session::ADMIN => super::session::DASHBOARD,
        name => name,
    };
    let cookie = state
        .sessions
        .start(&state.admin_token, actor, now_ms())
        .await?;
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response())
}

fn login_refused(
    status: StatusCode,
    error: String,
    retry_after_secs: Option<u64>,
    next: String,
) -> Result<Response, AppError> {
    let mut response = render(&LoginPage {
        csrf: None,
        error,
        next,
    })?;
    *response.status_mut() = status;
    if let Some(secs) = retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    Ok(response)
}

/// Ends the session for good. A logged-in browser must send its CSRF token, so another
/// site cannot log it out; without a session there is nothing to end.
async fn logout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let session = state
        .sessions
        .current(&headers, &state.admin_token, now_ms());
    if session.is_some() {
        let form: LogoutForm = serde_urlencoded::from_bytes(&body)
            .map_err(|err| AppError::BadRequest(format!("malformed logout form: {err}")))?;
        session::authorize(&state, &headers, form.csrf.as_deref())?;
    }
    let cookie = state.sessions.end(session.as_deref()).await?;
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response())
}

#[derive(Deserialize)]
struct LogoutForm {
    csrf: Option<String>,
}

/// Server-Sent Events: every bus event as JSON. Streams end when the server shuts down, or
/// they would hold graceful shutdown open forever; browsers reconnect within half a second.
async fn events(
    State(state): State<Arc<AppState>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let shutdown = state.shutdown.clone();
    let hello = futures_util::stream::once(async {
        Ok(SseEvent::default()
            .event("hello")
            .data("{}")
            .retry(Duration::from_millis(500)))
    });
    let updates = BroadcastStream::new(state.bus.subscribe())
        .filter_map(|event| std::future::ready(event.ok()))
        .map(|event| {
            let data = serde_json::to_string(&event).unwrap_or_default();
            Ok(SseEvent::default().data(data))
        });
    let stream = hello
        .chain(updates)
        .take_until(async move { shutdown.cancelled().await });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A dot in the colour of the newest deployment's state: green, red, amber (running). The
/// login page shows it too, so to anyone who may not read the dashboard it stays grey.
async fn favicon(
    State(state): State<Arc<AppState>>,
    Extension(MayRead(may_read)): Extension<MayRead>,
) -> Result<Response, AppError> {
    let latest = if may_read {
        state
            .db
            .call(|conn| db::deployments(conn, None, None, 1, 0))
            .await?
    } else {
        Vec::new()
    };
    let colour = match latest.first().map(|d| d.status) {
        Some(DeploymentStatus::Succeeded) => "#1a7f37",
        Some(DeploymentStatus::Failed | DeploymentStatus::Interrupted) => "#cf222e",
        Some(DeploymentStatus::Running | DeploymentStatus::Queued) => "#bf8700",
        _ => "#6e7781",
    };
    let svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="8" cy="8" r="7" fill="{colour}"/></svg>"#
    );
    Ok((
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        svg,
    )
        .into_response())
}
