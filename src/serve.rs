//! `nonstop serve`: wires the configured backends together once, restores what was live,
//! and serves HTTP until told to stop. Everything here runs once per start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::apps::{App, Apps};
use crate::config::{Config, RunnerConfig, Secret, StoreConfig, SwitchConfig};
use crate::db::{self, Db};
use crate::domain::{AppName, DeploymentStatus};
use crate::events::{Bus, Event};
use crate::pipeline::{Pipeline, source};
use crate::queue::Queue;
use crate::runner::codedeploy::{CodeDeployRunner, CodeDeploySettings};
use crate::runner::local::LocalRunner;
use crate::runner::{Interrupted, Job, Runner};
use crate::store::ArtifactStore;
use crate::store::local::LocalStore;
use crate::store::s3::{S3Settings, S3Store};
use crate::switch::TrafficSwitch;
use crate::switch::control::{self, RemoteProxy};
use crate::switch::nginx::Nginx;
use crate::switch::proxy::Proxy;
use crate::web::{self, AppState};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Switch(#[from] crate::switch::SwitchError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Where `serve` keeps the admin token it made when none was given.
pub fn admin_token_file(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-token")
}

/// A server ready to serve: its state, its bound listener, and the proxies to stop after.
pub struct Server {
    pub state: Arc<AppState>,
    pub listener: tokio::net::TcpListener,
    proxies: Vec<(AppName, Arc<Proxy>)>,
}

/// Tells whoever started this process where a listener is bound, as one line on stdout: a
/// config may say port 0 (tests do), and only the bound port is of use to a client.
fn announce(listener: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    // Nobody reading stdout is no reason to stop serving.
    let _ = writeln!(stdout, "nonstop: {listener}").and_then(|()| stdout.flush());
}

/// Runs the server until `shutdown` is cancelled.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let server = prepare(config, shutdown.clone()).await?;
    for (app, proxy) in &server.proxies {
        announce(format_args!("proxy {app} on {}", proxy.local_addr()));
    }
    if let Ok(addr) = server.listener.local_addr() {
        announce(format_args!("listening on {addr}"));
    }
    tracing::info!(listen = %server.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "nonstop serving");
    let router = web::router(server.state.clone());
    let served = axum::serve(
        server.listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await;
    for (_, proxy) in server.proxies {
        proxy.shutdown();
    }
    served.map_err(|source| ServeError::Listen {
        addr: server.state.config.server.listen,
        source,
    })
}

/// Everything `serve` does before it answers requests: opens the database, marks what the
/// last stop interrupted, binds the listener and each app's proxy (on the port that was
/// live), and starts the queue. Benchmarks use it to drive the router without a socket.
pub async fn prepare(config: Config, shutdown: CancellationToken) -> Result<Server, ServeError> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir).map_err(|err| {
        ServeError::Setup(format!(
            "cannot create data_dir {}: {err}",
            data_dir.display()
        ))
    })?;
    let db = Db::open(&data_dir.join("nonstop.db")).await?;
    remove_leftover_bundles(&data_dir.join("tmp"));
    let interrupted = db.call(db::interrupt_running).await?;
    if !interrupted.is_empty() {
        let ids: Vec<_> = interrupted.iter().map(|(d, _)| d.id).collect();
        tracing::warn!(deployments = ?ids, "marked deployments interrupted by the last stop");
    }
    let admin_token = admin_token(&config, &data_dir)?;
    let switch_token = Secret::new(random_token());
    let scrubbed_env: Vec<String> = std::iter::once(config.server.admin_token_env.clone())
        .chain(
            config
                .apps
                .iter()
                .filter_map(|a| a.webhook_secret_env.clone()),
        )
        .chain(config.slack.iter().map(|s| s.webhook_url_env.clone()))
        .chain(config.github.iter().map(|g| g.token_env.clone()))
        .collect();
    let bus = Bus::new();
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.server.listen,
            source,
        })?;
    let control_url = config.server.control_url.clone().unwrap_or_else(|| {
        format!(
            "http://{}",
            listener.local_addr().unwrap_or(config.server.listen)
        )
    });

    // Notifiers subscribe before the queue starts, so resumed deployments are reported too.
    let dashboard_url = config.server.public_url.clone().unwrap_or_else(|| {
        format!(
            "http://{}",
            listener.local_addr().unwrap_or(config.server.listen)
        )
    });
    crate::notify::start(&config, &dashboard_url, db.clone(), &bus, shutdown.clone())
        .map_err(|err| ServeError::Setup(err.to_string()))?;
    // What the last stop cut short is reported as ended (GitHub's `in_progress` must not
    // stay forever), now that the notifiers listen.
    for (deployment, _) in &interrupted {
        bus.publish(Event::Deployment {
            id: deployment.id,
            app: deployment.app.clone(),
            status: DeploymentStatus::Interrupted,
            version: deployment.version.clone().unwrap_or_default(),
        });
    }

    let mut apps = Apps::default();
    let mut proxies = Vec::new();
    let proxy_socket = config.proxy_socket();
    for app in &config.apps {
        let mut app = app.clone();
        let repo = source::resolve_repo(&app.repo, &config.base_dir);
        if let Some(seed) = &app.init_from {
            source::init_from_seed(Path::new(&repo), &config.base_dir.join(seed), &app.branch)
                .await
                .map_err(|err| ServeError::Setup(format!("app.{}.init_from: {err}", app.name)))?;
        }
        let name = app.name.to_string();
        let live = db.call(move |conn| db::live(conn, &name)).await?;
        let switch: Arc<dyn TrafficSwitch> = match &app.switch {
            SwitchConfig::Proxy { .. } if proxy_socket.is_some() => {
                let socket = proxy_socket.clone().expect("matched Some just above");
                let remote = RemoteProxy::connect(
                    socket,
                    app.name.to_string(),
                    live.as_ref().map(|l| l.port),
                )
                .await?;
                tracing::info!(app = %app.name, live_port = remote.live(), "driving the proxy process");
                Arc::new(remote)
            }
            SwitchConfig::Proxy { listen } => {
                let proxy = Proxy::start(*listen, live.as_ref().map(|l| l.port)).await?;
                tracing::info!(app = %app.name, proxy = %proxy.local_addr(), live_port = live.as_ref().map(|l| l.port), "proxy listening");
                // Port 0 in the config: the app's entry shows the port the proxy really got.
                app.switch = SwitchConfig::Proxy {
                    listen: proxy.local_addr(),
                };
                proxies.push((app.name.clone(), proxy.clone()));
                proxy
            }
            SwitchConfig::Nginx { include, conf, bin } => {
                let nginx = Nginx::new(
                    config.base_dir.join(include),
                    bin.clone(),
                    conf.as_ref().map(|c| config.base_dir.join(c)),
                );
                // nginx's include is what really routes traffic; say so if the record differs.
                if nginx.live() != live.as_ref().map(|l| l.port) {
                    tracing::warn!(app = %app.name, include_port = nginx.live(), recorded_port = live.as_ref().map(|l| l.port), "the nginx include and the record disagree; the include wins");
                }
                Arc::new(nginx)
            }
        };
        let app = Arc::new(app);
        let s3 = match S3Settings::from_config(&app.store) {
            Some(settings) => Some(Arc::new(S3Store::new(settings).await)),
            None => None,
        };
        let store: Arc<dyn ArtifactStore> = match &s3 {
            Some(s3) => s3.clone(),
            None => {
                let keep = match app.store {
                    StoreConfig::Local { keep } => keep,
                    StoreConfig::S3 { .. } => unreachable!("S3 settings were found just above"),
                };
                Arc::new(LocalStore::new(data_dir.join("artifacts"), keep))
            }
        };
        let runner: Arc<dyn Runner> = match (&app.runner, CodeDeploySettings::from_app(&app), &s3) {
            (_, Some(settings), Some(s3)) => {
                Arc::new(CodeDeployRunner::new(settings, s3.clone()).await)
            }
            (RunnerConfig::Local { group, .. }, ..) => Arc::new(LocalRunner::new(
                data_dir.join("apps").join(app.name.as_str()),
                group.clone(),
                store.clone(),
                switch.clone(),
                control_url.clone(),
                switch_token.clone(),
                scrubbed_env.clone(),
            )),
            _ => {
                return Err(ServeError::Setup(format!(
                    "app.{}.runner: codedeploy needs store kind = \"s3\"",
                    app.name
                )));
            }
        };
        apps.insert(App {
            config: app.clone(),
            repo,
            store,
            runner,
            switch,
        });
    }

    let recoveries = recover_interrupted(&apps, interrupted, &db, &bus);

    let pipeline = Pipeline::new(db.clone(), bus.clone(), data_dir.clone(), scrubbed_env);
    let queue = Queue::start(
        db.clone(),
        bus.clone(),
        pipeline,
        &apps,
        recoveries,
        shutdown.clone(),
    );
    let state = Arc::new(AppState {
        config: Arc::new(config),
        db,
        bus,
        queue,
        apps,
        admin_token,
        switch_token,
        shutdown: shutdown.clone(),
    });
    Ok(Server {
        state,
        listener,
        proxies,
    })
}

/// `nonstop proxy`: every app's built-in proxy, in a process of its own that `serve` drives
/// through `server.proxy_socket`; runs until `shutdown`. Starts on the live ports it saved.
pub async fn run_proxies(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let socket = config.proxy_socket().ok_or_else(|| {
        ServeError::Setup(
            "server.proxy_socket is not set: `nonstop proxy` listens there for `serve`".into(),
        )
    })?;
    let saved = control::load_state(&socket);
    let mut proxies = HashMap::new();
    for app in &config.apps {
        if let SwitchConfig::Proxy { listen } = app.switch {
            let live = saved.get(app.name.as_str()).copied();
            let proxy = Proxy::start(listen, live).await?;
            tracing::info!(app = %app.name, proxy = %proxy.local_addr(), live_port = live, "proxy listening");
            announce(format_args!("proxy {} on {}", app.name, proxy.local_addr()));
            proxies.insert(app.name.to_string(), proxy);
        }
    }
    let all: Vec<_> = proxies.values().cloned().collect();
    tracing::info!(socket = %socket.display(), "taking switch commands");
    let served = control::serve_control(socket.clone(), proxies, shutdown).await;
    for proxy in all {
        proxy.shutdown();
    }
    served.map_err(|err| ServeError::Setup(format!("control socket {}: {err}", socket.display())))
}

/// Puts each app back where it was before a deployment the last stop cut short, in the
/// background (the server answers meanwhile): traffic that deployment moved goes back to the
/// instance it came from, and what it started on the idle port is stopped. Returns, per app,
/// the task its queue must wait for, so no new deployment races the clean-up.
fn recover_interrupted(
    apps: &Apps,
    interrupted: Vec<(db::Deployment, bool)>,
    db: &Db,
    bus: &Bus,
) -> HashMap<String, tokio::task::JoinHandle<()>> {
    let mut by_app: HashMap<String, Vec<(db::Deployment, bool)>> = HashMap::new();
    for (deployment, started_instances) in interrupted {
        by_app
            .entry(deployment.app.clone())
            .or_default()
            .push((deployment, started_instances));
    }
    by_app
        .into_iter()
        .filter_map(|(app, deployments)| {
            let backends = apps.get(&app)?.clone();
            let switch = backends.switch.clone();
            let (db, bus) = (db.clone(), bus.clone());
            let task = tokio::spawn(async move {
                for (deployment, started_instances) in deployments {
                    let id = deployment.id;
                    if !move_traffic_back(&db, &bus, &backends, switch.as_ref(), id).await {
                        continue;
                    }
                    stop_half_started(&backends, deployment, started_instances).await;
                }
            });
            Some((app, task))
        })
        .collect()
}

/// When the interrupted deployment `id` had moved traffic (its last switch is still live),
/// moves it back to where it came from. False when it stays, because the instance it came
/// from no longer answers: the live instance is then kept, whoever started it.
async fn move_traffic_back(
    db: &Db,
    bus: &Bus,
    backends: &App,
    switch: &dyn TrafficSwitch,
    id: crate::domain::DeploymentId,
) -> bool {
    let app = &backends.config;
    let last = db
        .call(move |conn| Ok(db::switches_of(conn, id)?.pop()))
        .await;
    let moved = match last {
        Ok(Some(moved)) if switch.live() == Some(moved.to_port) => moved,
        Ok(_) => return true,
        Err(err) => {
            tracing::error!(deployment_id = id, error = %err, "could not read the switches of an interrupted deployment");
            return false;
        }
    };
    let answers = match moved.from_port {
        Some(from) => crate::health::answers(from, &app.health.path, Duration::from_secs(2))
            .await
            .then_some(from),
        None => None,
    };
    let Some(from) = answers else {
        tracing::warn!(deployment_id = id, app = %app.name, port = moved.to_port, "an interrupted deployment moved traffic and the instance before it is gone: traffic stays");
        return false;
    };
    if let Err(err) = switch.switch_to(from).await {
        tracing::error!(deployment_id = id, app = %app.name, port = from, error = %err, "could not move traffic back from an interrupted deployment");
        return false;
    }
    let (name, profile) = (
        app.name.to_string(),
        app.profile_of(from).unwrap_or_default().to_owned(),
    );
    match db
        .call(move |conn| db::set_live(conn, &name, from, &profile, None))
        .await
    {
        Ok((live, _)) => {
            tracing::info!(deployment_id = id, app = %app.name, port = from, version = live.version.as_deref(), "moved traffic back from an interrupted deployment");
            bus.publish(Event::Live {
                app: app.name.to_string(),
                port: from,
                profile: live.profile,
                version: live.version,
                from_port: Some(moved.to_port),
            });
            true
        }
        Err(err) => {
            tracing::error!(deployment_id = id, error = %err, "moved traffic back but could not record it");
            true
        }
    }
}

/// Stops what an interrupted deployment may have started on the idle port, or on a fleet.
async fn stop_half_started(backends: &App, deployment: db::Deployment, started_instances: bool) {
    let job = Job {
        deployment_id: deployment.id,
        app: backends.config.clone(),
        version: deployment.version.unwrap_or_default(),
        bundle_key: deployment.bundle_key.unwrap_or_default(),
        bundle_sha256: deployment.bundle_sha256.unwrap_or_default(),
    };
    let record = Interrupted {
        started_instances,
        runner_ref: deployment.runner_ref.as_deref(),
    };
    match backends.runner.clean_up_interrupted(&job, record).await {
        Ok(log) => {
            tracing::info!(deployment_id = job.deployment_id, output = %log.trim(), "cleaned up after an interrupted deployment")
        }
        Err(err) => {
            tracing::warn!(deployment_id = job.deployment_id, error = %err, "could not clean up after an interrupted deployment")
        }
    }
}

/// Bundles being written when the last stop came (in `tmp`, which only in-flight
/// deployments use) are of no use to anyone now.
fn remove_leftover_bundles(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "zip") && path.is_file() {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a bundle left by the last stop")
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "could not remove a leftover bundle")
                }
            }
        }
    }
}

/// The admin token from its env var, else the one kept in the data dir (made on first run).
fn admin_token(config: &Config, data_dir: &Path) -> Result<Secret, ServeError> {
    if let Ok(token) = std::env::var(&config.server.admin_token_env)
        && !token.is_empty()
    {
        return Ok(Secret::new(token));
    }
    let path = admin_token_file(data_dir);
    if let Ok(token) = std::fs::read_to_string(&path) {
        return Ok(Secret::new(token.trim().to_owned()));
    }
    let token = random_token();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| file.write_all(token.as_bytes()))
        .map_err(|err| ServeError::Setup(format!("cannot write {}: {err}", path.display())))?;
    tracing::info!(path = %path.display(), env = %config.server.admin_token_env, "made an admin token (set the env var to choose your own)");
    Ok(Secret::new(token))
}

/// 32 random bytes, hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    hex::encode(bytes)
}
