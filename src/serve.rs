//! `nonstop serve`: wires the configured backends together once, restores what was live,
//! and serves HTTP until told to stop. Everything here runs once per start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::apps::{App, Apps};
use crate::config::{AppConfig, Config, RunnerConfig, Secret, StoreConfig, SwitchConfig};
use crate::db::{self, Db};
use crate::domain::AppName;
use crate::events::Bus;
use crate::pipeline::{Pipeline, source};
use crate::queue::Queue;
use crate::recovery;
use crate::runner::Runner;
use crate::runner::codedeploy::{CodeDeployRunner, CodeDeploySettings};
use crate::runner::local::LocalRunner;
use crate::store::ArtifactStore;
use crate::store::local::LocalStore;
use crate::store::s3::{S3Settings, S3Store};
use crate::switch::TrafficSwitch;
use crate::switch::control::{self, RemoteProxy};
use crate::switch::edge::Edge;
use crate::switch::nginx::Nginx;
use crate::switch::proxy::{ConnectionLimits, Proxy, ProxyOptions};
use crate::traffic::Traffic;
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
    /// The shared edge, when `[proxy]` asks for one and the proxies run in this process.
    pub edge: Option<Arc<Edge>>,
    /// Every app's proxy address, in this process or the proxy process.
    proxy_addrs: Vec<(AppName, SocketAddr)>,
}

/// Tells whoever started this process where a listener is bound, as one line on stdout: a
/// config may say port 0 (tests do), and only the bound port is of use to a client.
fn announce(listener: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    // Nobody reading stdout is no reason to stop serving.
    let _ = writeln!(stdout, "nonstop: {listener}").and_then(|()| stdout.flush());
}

/// Makes this process undumpable: no process of the same user (a build, an app instance)
/// may read its memory or `/proc/<pid>/environ`, where nonstop's own secrets are, or attach
/// to it; only one with `CAP_SYS_PTRACE` can. Children get the flag back at `exec`.
pub fn forbid_inspection() {
    // SAFETY: prctl(PR_SET_DUMPABLE) changes a flag of this process only; no memory involved.
    let set = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if set != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not make the process undumpable");
    }
}

/// Runs the server until `shutdown` is cancelled.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    forbid_inspection();
    let fd_limit = crate::listen::raise_fd_limit();
    let limits = crate::listen::Limits {
        // A flood of sockets on this port must leave descriptors for the proxies, the
        // database and the builds: an eighth of the limit, at most the default cap.
        max_connections: (fd_limit as usize / 8)
            .clamp(16, crate::listen::Limits::default().max_connections),
        // One client's slow requests may hold half of them, never all.
        max_per_client: (fd_limit as usize / 16)
            .clamp(8, crate::listen::Limits::default().max_per_client),
        ..crate::listen::Limits::default()
    };
    let server = prepare(config, shutdown.clone()).await?;
    for (app, addr) in &server.proxy_addrs {
        // An app reached only through the edge has no listener to announce.
        if addr.port() != 0 {
            announce(format_args!("proxy {app} on {addr}"));
        }
    }
    announce_edge(server.edge.as_deref());
    if let Ok(addr) = server.listener.local_addr() {
        announce(format_args!("listening on {addr}"));
    }
    tracing::info!(
        listen = %server.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        fd_limit,
        max_connections = limits.max_connections,
        "nonstop serving"
    );
    let router = web::router(server.state.clone());
    crate::listen::serve(server.listener, router, limits, shutdown).await;
    for (_, proxy) in server.proxies {
        proxy.shutdown();
    }
    if let Some(edge) = server.edge {
        edge.shutdown();
    }
    Ok(())
}

fn announce_edge(edge: Option<&Edge>) {
    let Some(edge) = edge else { return };
    if let Some(addr) = edge.http_addr() {
        announce(format_args!("edge http on {addr}"));
    }
    if let Some(addr) = edge.https_addr() {
        announce(format_args!("edge https on {addr}"));
    }
}

/// Everything `serve` does before it answers requests: opens the database, marks what the
/// last stop interrupted, binds the listener and each app's backends (a proxy on the port
/// that was live), undoes the interrupted deployments and starts the queue. Benchmarks and
/// tests use it to drive the router without a socket.
pub async fn prepare(config: Config, shutdown: CancellationToken) -> Result<Server, ServeError> {
    let data_dir = config.data_dir();
    open_data_dir(&config, &data_dir).map_err(|err| {
        ServeError::Setup(format!(
            "cannot create data_dir {}: {err}",
            data_dir.display()
        ))
    })?;
    let database = data_dir.join("nonstop.db");
    make_private(&database)
        .map_err(|err| ServeError::Setup(format!("cannot make the database private: {err}")))?;
    let db = Db::open(&database).await?;
    let cut = recovery::mark_interrupted(&db, &data_dir).await?;
    let admin_token = admin_token(&config, &data_dir)?;
    if let Some(user) = (config.users.iter()).find(|user| {
        user.token
            .as_ref()
            .is_some_and(|token| token.expose() == admin_token.expose())
    }) {
        return Err(ServeError::Setup(format!(
            "user.{}.token_env holds the admin token: each user needs a token of their own",
            user.name
        )));
    }
    let listener = bind_listener(config.server.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.server.listen,
            source,
        })?;
    let bound = format!(
        "http://{}",
        listener.local_addr().unwrap_or(config.server.listen)
    );
    let wiring = Wiring {
        data_dir: data_dir.clone(),
        control_url: config.server.control_url.clone().unwrap_or(bound.clone()),
        switch_token: Secret::new(random_token()),
        proxy_socket: config.server.proxy_process.then(|| config.proxy_socket()),
        proxy_options: proxy_options(&config),
    };
    if let Some(socket) = &wiring.proxy_socket
        && config
            .apps
            .iter()
            .any(|app| matches!(app.switch, SwitchConfig::Proxy { .. }))
    {
        control::attach_or_start(socket, &config.file, &data_dir.join("proxy.log")).await?;
    }

    // Notifiers subscribe before the queue starts, so resumed deployments are reported too.
    let bus = Bus::new();
    let dashboard_url = config.server.public_url.clone().unwrap_or(bound);
    crate::notify::start(&config, &dashboard_url, db.clone(), &bus, shutdown.clone())
        .map_err(|err| ServeError::Setup(err.to_string()))?;
    recovery::announce(&bus, &cut);

    let mut apps = Apps::default();
    let mut proxies = Vec::new();
    for app in &config.apps {
        apps.insert(build_app(&config, app, &db, &wiring, &mut proxies).await?);
    }
    let edge = match wiring.proxy_socket {
        // The proxy process runs the edge beside the proxies.
        Some(_) => None,
        None => {
            let own = listener.local_addr().ok();
            Edge::from_config(&config, &proxies, own, &wiring.proxy_options).await?
        }
    };
    let proxy_addrs = apps
        .iter()
        .filter_map(|app| match app.config.switch {
            SwitchConfig::Proxy {
                listen: Some(listen),
            } => Some((app.config.name.clone(), listen)),
            _ => None,
        })
        .collect();
    let traffic = Traffic::new(db.clone(), bus.clone());
    traffic.watch(&apps, shutdown.clone());
    traffic.resume_guards().await;
    let recoveries = recovery::undo(&apps, cut, &traffic);
    let env_key = private_key(&data_dir.join("env-key"))?;
    let pipeline = Pipeline::new(db.clone(), bus.clone(), data_dir, env_key);
    let queue = Queue::start(
        db.clone(),
        bus.clone(),
        pipeline,
        traffic.clone(),
        &apps,
        recoveries,
        shutdown.clone(),
    );
    // After the queue: its first round may release a push whose checks passed meanwhile.
    let checks = crate::checks::Checks::start(&config, db.clone(), queue.clone(), shutdown.clone())
        .map_err(|err| ServeError::Setup(err.to_string()))?;
    let secure = dashboard_url.starts_with("https://");
    let sessions = web::Sessions::load(db.clone(), secure).await?;
    let allowed_hosts = web::AllowedHosts::new(
        config.server.public_url.as_deref(),
        config.server.hosts.iter().map(|h| h.as_str()),
    );
    let state = Arc::new(AppState {
        config: Arc::new(config),
        db,
        bus,
        queue,
        checks,
        traffic,
        apps,
        admin_token,
        switch_token: wiring.switch_token,
        sessions,
        allowed_hosts,
        shutdown,
    });
    Ok(Server {
        state,
        listener,
        proxies,
        edge,
        proxy_addrs,
    })
}

/// What start-up settles once and every app's backends share.
struct Wiring {
    data_dir: PathBuf,
    /// What every built-in proxy of this process is started with (`proxy_socket` unset).
    proxy_options: ProxyOptions,
    /// How hooks on this host reach the switch endpoint.
    control_url: String,
    /// For hooks on this host: the switch endpoint only. Made anew at every start.
    switch_token: Secret,
    proxy_socket: Option<PathBuf>,
}

/// The proxies' trusted peers, and connection limits that fit this process's open-file
/// limit (raised to its hard limit first).
fn proxy_options(config: &Config) -> ProxyOptions {
    ProxyOptions {
        trusted_proxies: config.proxy.trusted_proxies.clone(),
        limits: ConnectionLimits::for_fd_limit(crate::listen::raise_fd_limit()),
    }
}

/// One app with the backends its config chose: its switch (on the port recorded live),
/// its store and its runner.
async fn build_app(
    config: &Config,
    app: &AppConfig,
    db: &Db,
    wiring: &Wiring,
    proxies: &mut Vec<(AppName, Arc<Proxy>)>,
) -> Result<App, ServeError> {
    let mut app = app.clone();
    let repo = source::resolve_repo(&app.repo, &config.base_dir);
    if let Some(seed) = &app.init_from {
        source::init_from_seed(Path::new(&repo), &config.base_dir.join(seed), &app.branch)
            .await
            .map_err(|err| ServeError::Setup(format!("app.{}.init_from: {err}", app.name)))?;
    }
    let name = app.name.to_string();
    let live = db.call(move |conn| db::live(conn, &name)).await?;
    let switch = build_switch(config, &mut app, live.map(|l| l.port), wiring, proxies).await?;
    let app = Arc::new(app);
    let store = build_store(&app, &wiring.data_dir).await?;
    let runner = build_runner(&app, &store, &switch, wiring).await?;
    Ok(App {
        config: app,
        repo,
        store: store.shared(),
        runner,
        switch,
        moving: Default::default(),
    })
}

async fn build_switch(
    config: &Config,
    app: &mut AppConfig,
    live: Option<u16>,
    wiring: &Wiring,
    proxies: &mut Vec<(AppName, Arc<Proxy>)>,
) -> Result<Arc<dyn TrafficSwitch>, ServeError> {
    match (&app.switch, &wiring.proxy_socket) {
        (SwitchConfig::Proxy { .. }, Some(socket)) => {
            let remote = RemoteProxy::connect(socket.clone(), app.name.to_string(), live)
                .await
                .map_err(|err| {
                    ServeError::Setup(format!(
                        "app.{}: the proxy process at {}: {err} (after a change of the apps or their proxies, stop it with `nonstop proxy --stop` and start serve again)",
                        app.name,
                        socket.display()
                    ))
                })?;
            tracing::info!(app = %app.name, live_port = remote.live(), "driving the proxy process");
            // The address the proxy process really listens on (port 0 in the config).
            // An app reached only through the edge has none (port 0).
            if let Some(listen) = remote.listen().filter(|addr| addr.port() != 0) {
                app.switch = SwitchConfig::Proxy {
                    listen: Some(listen),
                };
            }
            Ok(Arc::new(remote))
        }
        (SwitchConfig::Proxy { listen: None }, None) => {
            // Reached through the shared edge alone.
            let proxy = Proxy::unbound(live)?;
            proxies.push((app.name.clone(), proxy.clone()));
            Ok(proxy)
        }
        (
            SwitchConfig::Proxy {
                listen: Some(listen),
            },
            None,
        ) => {
            let proxy = Proxy::start_with(*listen, live, wiring.proxy_options.clone()).await?;
            tracing::info!(app = %app.name, proxy = %proxy.local_addr(), live_port = live, "proxy listening");
            // Port 0 in the config: the app's entry shows the port the proxy really got.
            app.switch = SwitchConfig::Proxy {
                listen: Some(proxy.local_addr()),
            };
            proxies.push((app.name.clone(), proxy.clone()));
            Ok(proxy)
        }
        (SwitchConfig::Nginx { include, conf, bin }, _) => {
            let nginx = Nginx::new(
                config.base_dir.join(include),
                bin.clone(),
                conf.as_ref().map(|c| config.base_dir.join(c)),
            );
            // nginx's include is what really routes traffic; say so if the record differs.
            if nginx.live() != live {
                tracing::warn!(app = %app.name, include_port = nginx.live(), recorded_port = live, "the nginx include and the record disagree; the include wins");
            }
            Ok(Arc::new(nginx))
        }
    }
}

/// The store an app's config chose. The S3 one is kept as such: a CodeDeploy runner
/// deploys from it.
enum Store {
    Local(Arc<LocalStore>),
    S3(Arc<S3Store>),
}

impl Store {
    fn shared(&self) -> Arc<dyn ArtifactStore> {
        match self {
            Self::Local(local) => local.clone(),
            Self::S3(s3) => s3.clone(),
        }
    }
}

async fn build_store(app: &AppConfig, data_dir: &Path) -> Result<Store, ServeError> {
    match (&app.store, S3Settings::from_config(&app.store)) {
        (StoreConfig::Local { keep }, _) => Ok(Store::Local(Arc::new(LocalStore::new(
            data_dir.join("artifacts"),
            *keep,
        )))),
        (StoreConfig::S3 { .. }, Some(settings)) => {
            Ok(Store::S3(Arc::new(S3Store::new(settings).await)))
        }
        (StoreConfig::S3 { .. }, None) => Err(ServeError::Setup(format!(
            "app.{}.store: the S3 settings could not be read",
            app.name
        ))),
    }
}

async fn build_runner(
    app: &Arc<AppConfig>,
    store: &Store,
    switch: &Arc<dyn TrafficSwitch>,
    wiring: &Wiring,
) -> Result<Arc<dyn Runner>, ServeError> {
    match (&app.runner, CodeDeploySettings::from_app(app), store) {
        (RunnerConfig::Local { group, .. }, _, _) => Ok(Arc::new(LocalRunner::new(
            wiring.data_dir.join("apps").join(app.name.as_str()),
            group.clone(),
            store.shared(),
            switch.clone(),
            wiring.control_url.clone(),
            wiring.switch_token.clone(),
        ))),
        (RunnerConfig::CodeDeploy { .. }, Some(settings), Store::S3(s3)) => {
            Ok(Arc::new(CodeDeployRunner::new(settings, s3.clone()).await))
        }
        (RunnerConfig::CodeDeploy { .. }, _, _) => Err(ServeError::Setup(format!(
            "app.{}.runner: codedeploy needs store kind = \"s3\"",
            app.name
        ))),
    }
}

/// `nonstop proxy`: every app's built-in proxy, in a process of its own that `serve` drives
/// through `server.proxy_socket` (and starts, when none runs); runs until `shutdown`.
/// Starts on the live ports it saved.
pub async fn run_proxies(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    forbid_inspection();
    if !config.server.proxy_process {
        return Err(ServeError::Setup(
            "server.proxy_process = false: the proxies run inside `serve`".into(),
        ));
    }
    let socket = config.proxy_socket();
    // Sockets passed to this process (systemd's socket activation, or the proxy process
    // this one takes over from) are used instead of binding.
    let mut inherited = crate::switch::activation::Inherited::from_env();
    if inherited.is_empty()
        && let Some(pid) = control::running_pid(&socket)
        && control::answers(&socket).await
    {
        return Err(ServeError::Setup(format!(
            "a proxy process already runs (pid {pid}, {}); `nonstop proxy --stop` stops it",
            socket.display()
        )));
    }
    let saved = control::load_state(&socket);
    let mut proxies = HashMap::new();
    for app in &config.apps {
        if let SwitchConfig::Proxy { listen } = app.switch {
            let live = saved.get(app.name.as_str()).copied();
            let proxy = match listen {
                None => Proxy::unbound(live)?,
                Some(listen) => {
                    let passed = inherited.take(app.name.as_str(), listen);
                    let proxy = if passed.is_empty() {
                        Proxy::start_with(listen, live, proxy_options(&config)).await?
                    } else {
                        tracing::info!(app = %app.name, sockets = passed.len(), "listening on the sockets passed to this process");
                        Proxy::start_on(passed, live, proxy_options(&config)).await?
                    };
                    tracing::info!(app = %app.name, proxy = %proxy.local_addr(), live_port = live, "proxy listening");
                    announce(format_args!("proxy {} on {}", app.name, proxy.local_addr()));
                    proxy
                }
            };
            let ports = app.ports;
            proxies.insert(app.name.to_string(), control::Controlled { proxy, ports });
        }
    }
    // The edge runs here, beside the proxies it routes to; it reaches `serve` at its
    // configured address (which must then name a port).
    let routed: Vec<(AppName, Arc<Proxy>)> = config
        .apps
        .iter()
        .filter_map(|app| {
            Some((
                app.name.clone(),
                proxies.get(app.name.as_str())?.proxy.clone(),
            ))
        })
        .collect();
    let own = Some(config.server.listen).filter(|addr| addr.port() != 0);
    let edge = Edge::from_config(&config, &routed, own, &proxy_options(&config)).await?;
    announce_edge(edge.as_deref());
    for addr in inherited.left() {
        tracing::warn!(%addr, "a passed socket that no app's switch.listen names: unused");
    }
    let all: Vec<(String, Arc<Proxy>)> = proxies
        .iter()
        .map(|(app, c)| (app.clone(), c.proxy.clone()))
        .collect();
    tracing::info!(socket = %socket.display(), "taking switch commands");
    let pid_file = control::pid_file(&socket);
    let control_stop = CancellationToken::new();
    let order = control::SwitchOrder::default();
    let mut control = tokio::spawn(control::serve_control(
        socket.clone(),
        proxies,
        control_stop.clone(),
        order.clone(),
        {
            let pid_file = pid_file.clone();
            move || {
                // Written once the socket is bound: a pid file names a process that answers.
                if let Err(err) =
                    write_private(&pid_file, std::process::id().to_string().as_bytes())
                {
                    tracing::warn!(path = %pid_file.display(), error = %err, "could not write the pid file");
                }
            }
        },
    ));
    let mut upgrade = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
        .map_err(|err| ServeError::Setup(format!("cannot take SIGUSR2: {err}")))?;
    let mut served = Ok(());
    let mut handed_over = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            ended = &mut control => {
                served = ended.unwrap_or_else(|err| Err(std::io::Error::other(err)));
                break;
            }
            _ = upgrade.recv() => match control::hand_over(&config.file, &all, &socket, &order).await {
                Ok(next) => {
                    tracing::info!(next_pid = next, "handed the listening sockets over; finishing what is open here");
                    handed_over = true;
                    break;
                }
                Err(err) => tracing::error!(error = %err, "the upgrade failed: this process keeps serving"),
            },
        }
    }
    control_stop.cancel();
    if !control.is_finished() {
        let _ = control.await;
    }
    // The pid file names the process that took over, if one did.
    if control::running_pid(&socket) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(&pid_file);
    }
    for (_, proxy) in &all {
        proxy.shutdown();
    }
    if let Some(edge) = &edge {
        edge.shutdown();
    }
    if handed_over {
        // In-flight requests finish here; long-lived connections get the drain window.
        let window = config
            .apps
            .iter()
            .map(|app| app.drain_timeout_secs)
            .max()
            .unwrap_or(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(window);
        for (_, proxy) in &all {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            proxy.stopped(left).await;
        }
    }
    served.map_err(|err| ServeError::Setup(format!("control socket {}: {err}", socket.display())))
}

/// Shorter admin tokens are refused: the dashboard's session key is derived from the token,
/// so a guessable one would let anyone forge a login.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 32;

/// The admin token from its env var, else the one kept in the data dir (made on first run).
fn admin_token(config: &Config, data_dir: &Path) -> Result<Secret, ServeError> {
    let env = &config.server.admin_token_env;
    if let Ok(token) = std::env::var(env)
        && !token.is_empty()
    {
        return long_enough(token, &format!("the env var {env}"));
    }
    let path = admin_token_file(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(token) => long_enough(
            token.trim().to_owned(),
            &format!("{} (delete it to have a new one made)", path.display()),
        ),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let token = random_token();
            write_private(&path, token.as_bytes()).map_err(|err| {
                ServeError::Setup(format!("cannot write {}: {err}", path.display()))
            })?;
            tracing::info!(path = %path.display(), env = %env, "made an admin token (set the env var to choose your own)");
            Ok(Secret::new(token))
        }
        Err(err) => Err(ServeError::Setup(format!(
            "cannot read {}: {err}",
            path.display()
        ))),
    }
}

/// The random key kept at `path` (mode 0600), made on first start.
fn private_key(path: &Path) -> Result<Secret, ServeError> {
    match std::fs::read_to_string(path) {
        Ok(key) if key.trim().len() >= MIN_ADMIN_TOKEN_BYTES => Ok(Secret::new(key.trim().into())),
        Ok(_) => Err(ServeError::Setup(format!(
            "{} is too short (delete it to have a new one made)",
            path.display()
        ))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let key = random_token();
            write_private(path, key.as_bytes()).map_err(|err| {
                ServeError::Setup(format!("cannot write {}: {err}", path.display()))
            })?;
            Ok(Secret::new(key))
        }
        Err(err) => Err(ServeError::Setup(format!(
            "cannot read {}: {err}",
            path.display()
        ))),
    }
}

fn long_enough(token: String, from: &str) -> Result<Secret, ServeError> {
    if token.len() < MIN_ADMIN_TOKEN_BYTES {
        return Err(ServeError::Setup(format!(
            "the admin token in {from} is {} bytes; at least {MIN_ADMIN_TOKEN_BYTES} are needed",
            token.len()
        )));
    }
    Ok(Secret::new(token))
}

/// The data dir holds the database, the admin token and every build: only nonstop's user
/// may enter it. When an app builds or runs as another user (`build_as`, `run_as`), that
/// user must pass through it to the folders handed over to it: the data dir and `apps/`
/// are then 0711 (no listing, no reading), and what lies beside them stays 0700 or 0600.
fn open_data_dir(config: &Config, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let shared = config
        .apps
        .iter()
        .any(|app| app.run_user.is_some() || app.build_user.is_some());
    if !shared {
        return set_mode(dir, 0o700);
    }
    crate::user::pass_through(dir)?;
    crate::user::pass_through(&dir.join("apps"))?;
    for private in ["artifacts", "tmp"] {
        std::fs::create_dir_all(dir.join(private))?;
        set_mode(&dir.join(private), 0o700)?;
    }
    for app in &config.apps {
        let app_dir = dir.join("apps").join(app.name.as_str());
        if app.run_user.is_some() || app.build_user.is_some() {
            crate::user::pass_through(&app_dir)?;
        } else {
            std::fs::create_dir_all(&app_dir)?;
            set_mode(&app_dir, 0o700)?;
        }
    }
    Ok(())
}

/// How long a start waits for its address to be free: a previous `serve` killed a moment
/// ago may have left a child between fork and exec, still holding the listening socket.
const BIND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

async fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + BIND_PATIENCE;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(err)
                if err.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            bound => return bound,
        }
    }
}

/// Creates the database file 0600 before SQLite opens it, since SQLite gives its -wal and
/// -shm files the database file's mode; and makes private what an older start left open.
fn make_private(database: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(database)?;
    set_mode(database, 0o600)?;
    for suffix in ["-wal", "-shm"] {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        match set_mode(Path::new(&name), 0o600) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Writes a file only its owner can read, whole or not at all: a temp file beside it,
/// synced, then renamed over the name.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    // `mode` applies only to a file this call creates; a temp file left by an earlier,
    // interrupted write keeps its own mode unless it is set here.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)
}

/// 32 random bytes, hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    hex::encode(bytes)
}
