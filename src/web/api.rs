//! The JSON API: apps and their live instance, deployments and their stages, and the
//! actions (deploy, switch) behind tokens.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{AppError, AppJson, AppState, bearer, require_loopback, token_matches};
use crate::db::{self, Live};
use crate::domain::{DeploymentId, DeploymentStatus};
use crate::switch::OpenOn;
use crate::traffic::TrafficError;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/apps", get(apps))
        .route("/api/edge", get(edge))
        .route("/api/apps/{app}/live", get(live))
        .route("/api/apps/{app}/traffic", get(traffic))
        .route("/api/apps/{app}/switch", post(switch).get(switched))
        .route("/api/apps/{app}/drain", post(drain))
        .route("/api/deployments", get(deployments))
        .route("/api/deployments/{id}", get(deployment))
}

async fn apps(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, AppError> {
    let names: Vec<String> = state.apps.names().map(str::to_owned).collect();
    let lives = {
        let names = names.clone();
        state
            .db
            .call(move |conn| {
                names
                    .iter()
                    .map(|n| Ok((db::live(conn, n)?, db::lock_of(conn, n)?)))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?
    };
    let apps: Vec<_> = state
        .apps
        .iter()
        .zip(lives)
        .map(|(app, (live, lock))| {
            let app = &app.config;
            json!({
                "name": app.name,
                "branch": app.branch,
                "ports": app.ports,
                "profiles": app.profiles,
                "entry": app.entry(),
                "live": live,
                "lock": lock,
            })
        })
        .collect();
    Ok(Json(apps))
}

/// The live instance, and what is still open on each of the app's ports.
#[derive(Serialize)]
struct LiveAnswer {
    #[serde(flatten)]
    live: Live,
    connections: Vec<OpenOn>,
}

async fn live(
    State(state): State<Arc<AppState>>,
    Path(app): Path<String>,
) -> Result<Json<LiveAnswer>, AppError> {
    let live = live_instance(&state, &app).await?;
    // The record answers even when the proxy process does not.
    let connections = match state.app(&app)?.switch.open_connections().await {
        Ok(connections) => connections,
        Err(err) => {
            tracing::warn!(app = %app, error = %err, "could not count open connections");
            Vec::new()
        }
    };
    Ok(Json(LiveAnswer { live, connections }))
}

async fn live_instance(state: &AppState, app: &str) -> Result<Live, AppError> {
    let app = app.to_owned();
    let runtime = state.app(&app)?;
    let name = app.clone();
    let recorded = state.db.call(move |conn| db::live(conn, &name)).await?;
    // A fleet's live slot is asked of its public URL; the version is the last that went live.
    if let Some(public_url) = runtime.config.fleet_url() {
        let slot = crate::switch::fleet::probe(&runtime.config, public_url)
            .await
            .map_err(|err| AppError::BadGateway(err.to_string()))?;
        let name = app.clone();
        let last = state
            .db
            .call(move |conn| {
                db::deployments(conn, Some(&name), Some(DeploymentStatus::Succeeded), 1, 0)
            })
            .await?
            .into_iter()
            .next();
        return Ok(Live {
            app,
            port: slot.port,
            profile: slot.profile,
            version: last.as_ref().and_then(|d| d.version.clone()),
            deployment_id: last.as_ref().map(|d| d.id),
            since: last
                .and_then(|d| d.finished_at)
                .or(recorded.map(|r| r.since))
                .unwrap_or_default(),
        });
    }
    recorded.ok_or_else(|| AppError::NotFound(format!("`{app}` has no live instance yet")))
}

#[derive(Deserialize)]
struct ListQuery {
    app: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
    offset: Option<u32>,
}

async fn deployments(
    State(state): State<Arc<AppState>>,
    Query(query): Query<ListQuery>,
) -> Result<impl IntoResponse, AppError> {
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        Some(text) => Some(
            DeploymentStatus::parse(text)
                .ok_or_else(|| AppError::BadRequest(format!("unknown status `{text}`")))?,
        ),
        None => None,
    };
    let limit = query.limit.unwrap_or(50).min(500);
    let offset = query.offset.unwrap_or(0);
    let app = query.app.filter(|a| !a.is_empty());
    let rows = state
        .db
        .call(move |conn| db::deployments(conn, app.as_deref(), status, limit, offset))
        .await?;
    Ok(Json(rows))
}

async fn deployment(
    State(state): State<Arc<AppState>>,
    Path(id): Path<DeploymentId>,
) -> Result<impl IntoResponse, AppError> {
    let found = state
        .db
        .call(move |conn| {
            let Some(deployment) = db::deployment(conn, id)? else {
                return Ok(None);
            };
            let guard = db::guard_of(conn, id)?;
            Ok(Some((deployment, db::stages(conn, id)?, guard)))
        })
        .await?;
    let (deployment, stages, guard) =
        found.ok_or_else(|| AppError::NotFound(format!("no deployment {id}")))?;
    // The countdown of an open window, in whole seconds.
    let secs_left = guard
        .as_ref()
        .filter(|g| g.outcome.is_none())
        .map(|g| ((g.ends_at - db::now_ms()).max(0) + 999) / 1000);
    Ok(Json(json!({
        "deployment": deployment,
        "stages": stages,
        "guard": guard.map(|g| json!({ "window": g, "secs_left": secs_left })),
    })))
}

#[derive(Deserialize)]
struct SwitchRequest {
    port: u16,
}

/// Who may use the switch: hooks on this host (the switch token) or an operator on it.
fn require_hook_caller(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), AppError> {
    require_loopback(peer, headers)?;
    let presented = bearer(headers);
    if token_matches(presented, &state.switch_token) || token_matches(presented, &state.admin_token)
    {
        Ok(())
    } else {
        Err(AppError::Unauthorized(
            "a switch or admin token is needed".into(),
        ))
    }
}

/// What `deploy.sh` calls in ValidateService: loopback only, with the switch (or admin) token.
async fn switch(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(app): Path<String>,
    headers: HeaderMap,
    // Its failure is reported after the checks below: who may call decides first.
    body: Result<AppJson<SwitchRequest>, AppError>,
) -> Result<Json<serde_json::Value>, AppError> {
    require_hook_caller(&state, peer, &headers)?;
    let AppJson(request) = body.map_err(|err| match err {
        AppError::BadRequest(reason) => {
            AppError::BadRequest(format!("expected {{\"port\": N}}: {reason}"))
        }
        other => other,
    })?;
    match state
        .traffic
        .go_live(state.app(&app)?, request.port, None)
        .await
    {
        Ok(moved) => Ok(Json(json!(moved.live))),
        // Traffic moved and only its record failed (logged): the caller must not undo a
        // switch that happened, so it hears that it did.
        Err(TrafficError::Record { port, .. }) => {
            Ok(Json(json!({ "port": port, "recorded": false })))
        }
        Err(err) => Err(err.into()),
    }
}

/// What `deploy.sh` calls before it stops an instance: waits until the connections open on
/// `port` (not live) have closed, at most the app's `drain_timeout_secs`, then closes what
/// is left. Loopback only, with the switch (or admin) token.
async fn drain(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Result<AppJson<SwitchRequest>, AppError>,
) -> Result<Json<serde_json::Value>, AppError> {
    require_hook_caller(&state, peer, &headers)?;
    let AppJson(request) = body.map_err(|err| match err {
        AppError::BadRequest(reason) => {
            AppError::BadRequest(format!("expected {{\"port\": N}}: {reason}"))
        }
        other => other,
    })?;
    let app = state.app(&app)?;
    if !app.config.ports.contains(&request.port) {
        return Err(AppError::BadRequest(format!(
            "port {} is not one of {}'s ports {:?}",
            request.port, app.config.name, app.config.ports
        )));
    }
    let timeout = std::time::Duration::from_secs(app.config.drain_timeout_secs);
    let drained = crate::switch::drain::drain(app.switch.as_ref(), request.port, timeout).await?;
    // `line` is what deploy.sh writes into the stage log, so it parses no numbers.
    Ok(Json(json!({
        "port": drained.port,
        "drained": drained.drained,
        "seconds": drained.seconds,
        "closed": drained.closed,
        "line": drained.line(),
    })))
}

/// Which port the switch points at now: how `deploy.sh` learns whether a switch whose
/// answer it lost went through, before it stops anything.
async fn switched(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, AppError> {
    require_hook_caller(&state, peer, &headers)?;
    Ok(Json(json!({ "port": state.app(&app)?.switch.live() })))
}

/// The shared edge: which names route where, and each certificate's issuer, expiry and
/// last error (as the edge, in this process or in `nonstop proxy`, last wrote them down).
async fn edge(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, AppError> {
    let config = &state.config;
    let mut routes: Vec<serde_json::Value> = config
        .server
        .hosts
        .iter()
        .map(|host| json!({ "host": host.as_str(), "to": "server" }))
        .collect();
    for app in &config.apps {
        routes.extend(
            app.hosts
                .iter()
                .map(|host| json!({ "host": host.as_str(), "to": format!("app.{}", app.name) })),
        );
    }
    let path = crate::switch::edge::status_file(&config.data_dir());
    let certificates = match tokio::fs::read(&path).await {
        Ok(text) => serde_json::from_slice(&text)
            .map_err(|err| AppError::Internal(format!("{}: {err}", path.display())))?,
        Err(_) => serde_json::Value::Array(Vec::new()),
    };
    Ok(Json(json!({
        "http": config.proxy.http,
        "https": config.proxy.https,
        "routes": routes,
        "certificates": certificates,
    })))
}

/// Each instance's requests per second over the last ten minutes, as the proxy counted them.
async fn traffic(
    State(state): State<Arc<AppState>>,
    Path(app): Path<String>,
) -> Result<impl IntoResponse, AppError> {
    let runtime = state.app(&app)?;
    let instances = state
        .traffic
        .metrics()
        .traffic(runtime.config.name.as_str());
    Ok(Json(json!({
        "app": app,
        "interval_secs": crate::metrics::SAMPLE_INTERVAL.as_secs(),
        "instances": instances,
    })))
}

/// Prometheus text: deployments by app and status, each app's live port, and what the
/// proxy counted of each instance (read now, not sampled).
async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, AppError> {
    let (deployments, live) = state
        .db
        .call(|conn| {
            let mut stmt =
                conn.prepare("SELECT app, status, COUNT(*) FROM deployments GROUP BY app, status")?;
            let counts = stmt
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = conn.prepare("SELECT app, port FROM live")?;
            let live = stmt
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((counts, live))
        })
        .await?;
    let mut instances = Vec::new();
    for app in state.apps.iter() {
        match crate::metrics::read_now(app, &state.db).await {
            Ok(counts) => {
                instances.extend(counts.into_iter().map(|c| (app.config.name.to_string(), c)));
            }
            // A proxy process that does not answer costs its lines, not the scrape.
            Err(err) => {
                tracing::warn!(app = %app.config.name, error = %err, "could not read what the proxy measured")
            }
        }
    }
    let scrape = crate::metrics::Scrape {
        deployments,
        live,
        instances,
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        scrape.render(),
    ))
}
