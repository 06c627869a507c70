//! `nonstop serve`: wires the configured backends together once, restores what was live,
//! and serves HTTP until told to stop. Everything here runs once per start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, RunnerConfig, Secret, StoreConfig};
use crate::db::{self, Db};
use crate::events::Bus;
use crate::pipeline::{AppBackends, Pipeline, source};
use crate::queue::Queue;
use crate::runner::local::LocalRunner;
use crate::store::local::LocalStore;
use crate::switch::proxy::Proxy;
use crate::web::{self, AppRuntime, AppState};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Switch(#[from] crate::switch::SwitchError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Where `serve` keeps the admin token it made when none was given.
pub fn admin_token_file(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-token")
}

/// Runs the server until `shutdown` is cancelled.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir).map_err(|err| {
        ServeError::Setup(format!(
            "cannot create data_dir {}: {err}",
            data_dir.display()
        ))
    })?;
    let db = Db::open(&data_dir.join("nonstop.db")).await?;
    let interrupted = db.call(db::interrupt_running).await?;
    if !interrupted.is_empty() {
        tracing::warn!(deployments = ?interrupted, "marked deployments interrupted by the last stop");
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

    let mut apps = HashMap::new();
    let mut proxies = Vec::new();
    for app in &config.apps {
        let app = Arc::new(app.clone());
        let repo = source::resolve_repo(&app.repo, &config.base_dir);
        if let Some(seed) = &app.init_from {
            source::init_from_seed(Path::new(&repo), &config.base_dir.join(seed), &app.branch)
                .await
                .map_err(|err| ServeError::Setup(format!("app.{}.init_from: {err}", app.name)))?;
        }
        let name = app.name.to_string();
        let live = db.call(move |conn| db::live(conn, &name)).await?;
        let proxy = Proxy::start(app.proxy_listen(), live.as_ref().map(|l| l.port)).await?;
        tracing::info!(app = %app.name, proxy = %proxy.local_addr(), live_port = live.as_ref().map(|l| l.port), "proxy listening");
        proxies.push(proxy.clone());
        let StoreConfig::Local = app.store;
        let store = Arc::new(LocalStore::new(data_dir.join("artifacts")));
        let RunnerConfig::Local { group } = &app.runner;
        let runner = Arc::new(LocalRunner::new(
            data_dir.join("apps").join(app.name.as_str()),
            group.clone(),
            store.clone(),
            proxy.clone(),
            control_url.clone(),
            switch_token.clone(),
            scrubbed_env.clone(),
        ));
        let backends = Arc::new(AppBackends {
            app: app.clone(),
            repo,
            store,
            runner,
        });
        apps.insert(
            app.name.to_string(),
            AppRuntime {
                backends,
                switch: proxy,
            },
        );
    }

    let pipeline = Pipeline::new(db.clone(), bus.clone(), data_dir.clone(), scrubbed_env);
    let backends: Vec<_> = apps.values().map(|a| a.backends.clone()).collect();
    let queue = Queue::start(
        db.clone(),
        bus.clone(),
        pipeline,
        &backends,
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
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "nonstop serving");
    let router = web::router(state);
    let served = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
    .await;
    for proxy in proxies {
        proxy.shutdown();
    }
    served.map_err(|source| ServeError::Listen {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
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
