//! `nonstop.toml`: typed, validated once at start-up. An invalid file stops the server with
//! one line naming the key and the problem. Secrets are never in the file, only the names of
//! the env vars that hold them; this module reads those vars once and never logs them.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::domain::AppName;

mod edge;
pub use edge::{AcmeConfig, EdgeLimits, HostName, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub apps: Vec<AppConfig>,
    /// Where the file was read from: relative paths in it are relative to its folder.
    pub base_dir: PathBuf,
    /// `[travis]`: Travis CI's public key for every app (an app may name its own).
    pub travis: Option<TravisKeyConfig>,
    /// `[slack]`: deployment messages to a Slack incoming webhook.
    pub slack: Option<SlackConfig>,
    /// `[github]`: GitHub deployments and their statuses for apps that name a `repository`.
    pub github: Option<GitHubConfig>,
    /// `[proxy]`: how the built-in proxies treat their clients.
    pub proxy: ProxyConfig,
    /// The file itself, for a process started with the same config (`nonstop proxy`).
    pub file: PathBuf,
    /// `[[user]]`: people with a token of their own, named on what they do.
    pub users: Vec<UserConfig>,
}

/// `[[user]] name = "ada", token_env = "ADA_TOKEN"`: someone who may act with a token of
/// their own (the CLI, a dashboard login); every action, lock and cancel names them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub token_env: String,
    /// Filled from `token_env` at load time; never logged.
    #[serde(skip)]
    pub token: Option<Secret>,
}

impl UserConfig {
    fn validate(&self) -> Result<(), Invalid> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 32
            && (self.name.bytes())
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        require(
            name_ok,
            "name",
            "must be 1 to 32 lowercase letters, digits, - or _",
        )?;
        require(
            !matches!(
                self.name.as_str(),
                "admin" | "dashboard" | "github" | "anonymous"
            ),
            "name",
            format!("`{}` is nonstop's own name for a caller", self.name),
        )
    }

    fn read_secret(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        let var = &self.token_env;
        let token = env_value(env, "token_env", var, "the user's token")?;
        require(
            token.bytes().all(|b| b.is_ascii_graphic()),
            "token_env",
            format!("env var {var} holds characters a token cannot have"),
        )?;
        require(
            token.len() >= MIN_METRICS_TOKEN_BYTES,
            "token_env",
            format!(
                "env var {var} holds {} bytes; at least {MIN_METRICS_TOKEN_BYTES} are needed",
                token.len()
            ),
        )?;
        self.token = Some(Secret(token));
        Ok(())
    }
}

/// `[proxy]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Peers in front of nonstop (a load balancer, a CDN) whose `X-Forwarded-*`,
    /// `X-Real-IP` and `Forwarded` headers are believed and extended; from anyone else
    /// they are replaced with what the proxy saw.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::domain::IpRange>,
    /// The shared edge's plain-HTTP listener, for every app that names `hosts`.
    pub http: Option<SocketAddr>,
    /// The shared edge's TLS listener (HTTP/2 and HTTP/1.1 by ALPN).
    pub https: Option<SocketAddr>,
    /// Plain HTTP answers 308 to https (ACME HTTP-01 challenges excepted).
    #[serde(default)]
    pub redirect_https: bool,
    /// `Strict-Transport-Security: max-age=N` on every TLS answer that has none.
    pub hsts_max_age_secs: Option<u64>,
    /// The app that answers a host nobody claims; unset: a short 404.
    pub default_app: Option<AppName>,
    /// `[proxy.limits]`: the front door's limits, each with a safe default.
    #[serde(default)]
    pub limits: EdgeLimits,
    /// `[proxy.acme]`: automatic certificates for apps with `tls = { acme = true }`.
    pub acme: Option<AcmeConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Env var holding the admin token (API actions, dashboard login). When unset or empty,
    /// nonstop makes a token and keeps it in `data_dir/admin-token` (mode 0600).
    #[serde(default = "default_admin_token_env")]
    pub admin_token_env: String,
    /// How hooks reach this server's switch endpoint; derived from `listen` when unset.
    pub control_url: Option<String>,
    /// Whether the built-in proxies run in a `nonstop proxy` process of their own, which
    /// outlives `serve`: restarting or killing `serve` then drops no client connection.
    /// `serve` starts it when none answers on `proxy_socket`, else takes it over. `false`:
    /// one process, the proxies inside `serve` (they stop with it).
    #[serde(default = "default_proxy_process")]
    pub proxy_process: bool,
    /// The proxy process's control socket; `<data_dir>/proxy.sock` when unset. Its live
    /// ports are kept beside it (`proxy.state.json`), and its pid (`proxy.pid`).
    pub proxy_socket: Option<PathBuf>,
    /// Where people reach the dashboard (links in Slack and GitHub); `http://<listen>` when unset.
    pub public_url: Option<String>,
    /// Whether anyone may read the pages, the API, `/events` and `/metrics` without a login
    /// or a token. Off by default: stage logs show paths, pids and whatever a build prints.
    #[serde(default)]
    pub public_read: bool,
    /// Env var holding a bearer token that may read `/metrics` and nothing else (for a
    /// Prometheus scraper, which should not hold the admin token).
    pub metrics_token_env: Option<String>,
    /// Filled from `metrics_token_env` at load time; never logged.
    #[serde(skip)]
    pub metrics_token: Option<Secret>,
    /// Names under which the shared edge serves this server (dashboard, API, webhooks).
    #[serde(default)]
    pub hosts: Vec<HostName>,
    /// The certificate for `hosts` on the edge's TLS listener.
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub name: AppName,
    /// A git URL or a local path (relative to the config file).
    pub repo: String,
    /// When `repo` is a local path that does not exist yet, nonstop creates a git repository
    /// there from this folder's files (the shipped example uses it).
    pub init_from: Option<PathBuf>,
    /// `owner/name` on GitHub: pushes from any other repository are ignored.
    pub repository: Option<String>,
    #[serde(default = "default_branch")]
    pub branch: String,
    #[serde(default)]
    pub trigger: TriggerMode,
    /// With `trigger = "checks"`: the check runs and status contexts that must pass on a
    /// commit before it deploys; empty: every one GitHub reports on it.
    #[serde(default)]
    pub checks: Vec<String>,
    pub webhook_secret_env: Option<String>,
    pub build: String,
    #[serde(default = "default_build_timeout")]
    pub build_timeout_secs: u64,
    /// Path of the build's output, relative to the checkout.
    pub artifact: PathBuf,
    #[serde(default = "default_version")]
    pub version: String,
    /// Command that starts one instance: `{artifact}`, `{port}`, `{profile}` are filled in.
    pub run: String,
    #[serde(default = "default_ports")]
    pub ports: [u16; 2],
    #[serde(default = "default_profiles")]
    pub profiles: [String; 2],
    #[serde(default)]
    pub health: HealthConfig,
    /// The guard window after each switch (`guard = false`: none).
    #[serde(default = "default_guard", deserialize_with = "guard_setting")]
    pub guard: Option<GuardConfig>,
    /// Per-hook timeout in seconds (CodeDeploy's default is 3600; a local deploy wants less).
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout_secs: u64,
    /// Run once per deployment in the new release's folder, once ApplicationStart started
    /// its instance and before the switch (a database migration, say); a failure stops the
    /// new instance and leaves traffic where it was. Times out after `hook_timeout_secs`.
    pub release: Option<String>,
    /// Commands run like `release`: `before_switch` after it, `after_switch` once traffic
    /// is on the new version.
    #[serde(default)]
    pub hooks: ReleaseHooks,
    /// Before an instance is stopped, how long its open connections (WebSockets, streams,
    /// requests in flight) get to close by themselves; what is left then is closed.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    #[serde(default)]
    pub switch: SwitchConfig,
    /// Names the shared edge (`[proxy] http`/`https`) routes to this app: exact names, or
    /// `*.name` for one label below it.
    #[serde(default)]
    pub hosts: Vec<HostName>,
    /// The certificate for `hosts` on the edge's TLS listener.
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub runner: RunnerConfig,
    /// Where users reach the app (GitHub's environment URL); `http://<switch listen>` when unset.
    pub public_url: Option<String>,
    /// This app's own Travis CI key, instead of the server-wide `[travis]` one.
    pub travis: Option<TravisKeyConfig>,
    /// Slack overrides for this app: another channel, or no messages at all.
    pub slack: Option<AppSlackConfig>,
    /// GitHub overrides for this app.
    pub github: Option<AppGitHubConfig>,
    /// Env vars the app's build, hooks and instances get. Not secret: they are in this file
    /// and in every bundle (fleet hosts read them there).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of env vars of the server whose values the app gets; they are never bundled,
    /// logged or stored.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// `KEY=VALUE` lines read at each deploy, never sourced (relative to the config file);
    /// its values are treated as secrets. On fleet hosts deploy.sh reads the same path there.
    pub env_file: Option<PathBuf>,
    /// The user the hooks, the release and the instances run as on this host (the local
    /// runner), instead of nonstop's own; resolved at load time into `run_user`.
    pub run_as: Option<String>,
    /// The user Fetch and the build run as, instead of nonstop's own; resolved at load time
    /// into `build_user`.
    pub build_as: Option<String>,
    #[serde(skip)]
    pub run_user: Option<crate::user::User>,
    #[serde(skip)]
    pub build_user: Option<crate::user::User>,
    /// Filled from `secrets` at load time, by name; never logged.
    #[serde(skip)]
    pub secret_values: Vec<(String, Secret)>,
    /// Filled from `webhook_secret_env` at load time; never serialised or logged.
    #[serde(skip)]
    pub webhook_secret: Option<Secret>,
    /// Travis CI's public key for this app (its own or the server-wide one), read at load time.
    #[serde(skip)]
    pub travis_key: Option<Arc<rsa::PublicKey>>,
}

/// The app's own commands around the switch (`hooks = { before_switch, after_switch }`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseHooks {
    pub before_switch: Option<String>,
    pub after_switch: Option<String>,
}

/// Where Travis CI's public key is: a PEM file, or an env var holding the PEM text. Travis
/// publishes it at `/config` of its API (`notifications.webhook.public_key`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TravisKeyConfig {
    /// Relative to the config file.
    pub public_key_file: Option<PathBuf>,
    pub public_key_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Env var holding the incoming webhook URL (the URL is the secret).
    pub webhook_url_env: String,
    /// A channel to post in instead of the webhook's own (legacy webhooks honour it).
    pub channel: Option<String>,
    /// Filled from `webhook_url_env` at load time; never logged.
    #[serde(skip)]
    pub webhook_url: Option<Secret>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSlackConfig {
    pub channel: Option<String>,
    /// No Slack messages for this app.
    #[serde(default)]
    pub mute: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubConfig {
    /// Env var holding a token that may create deployments (`repo_deployment` scope).
    #[serde(default = "default_github_token_env")]
    pub token_env: String,
    /// The REST API's root; GitHub Enterprise Server's is `https://HOST/api/v3`.
    #[serde(default = "default_github_api_url")]
    pub api_url: String,
    /// Filled from `token_env` at load time; never logged.
    #[serde(skip)]
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppGitHubConfig {
    /// No GitHub deployments for this app.
    #[serde(default)]
    pub mute: bool,
}

/// When a push of the app's branch deploys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerMode {
    /// At once.
    #[default]
    Push,
    /// Once Travis CI reports its commit's build passed.
    Travis,
    /// Once the checks GitHub shows on its commit (GitHub Actions, or any CI that reports
    /// check runs or commit statuses) passed.
    Checks,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_attempts")]
    pub attempts: u32,
    #[serde(default = "default_health_interval")]
    pub interval_ms: u64,
}

/// After a deployment switches traffic, how its new version is watched: for `secs`, it is
/// switched back when its 5xx and upstream errors pass `max_error_ratio` of at least
/// `min_requests` requests, or its p99 passes `max_p99_ratio` times the previous version's.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    #[serde(default = "default_guard_secs")]
    pub secs: u64,
    #[serde(default = "default_guard_error_ratio")]
    pub max_error_ratio: f64,
    #[serde(default = "default_guard_min_requests")]
    pub min_requests: u64,
    #[serde(default = "default_guard_p99_ratio")]
    pub max_p99_ratio: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            secs: default_guard_secs(),
            max_error_ratio: default_guard_error_ratio(),
            min_requests: default_guard_min_requests(),
            max_p99_ratio: default_guard_p99_ratio(),
        }
    }
}

fn default_guard() -> Option<GuardConfig> {
    Some(GuardConfig::default())
}
fn default_guard_secs() -> u64 {
    60
}
fn default_guard_error_ratio() -> f64 {
    0.05
}
fn default_guard_min_requests() -> u64 {
    20
}
fn default_guard_p99_ratio() -> f64 {
    3.0
}

/// `guard = false`, `guard = true` or `guard = { … }`.
fn guard_setting<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<GuardConfig>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Setting {
        On(bool),
        With(GuardConfig),
    }
    Ok(match Setting::deserialize(deserializer)? {
        Setting::On(false) => None,
        Setting::On(true) => Some(GuardConfig::default()),
        Setting::With(config) => Some(config),
    })
}

impl GuardConfig {
    fn validate(&self) -> Result<(), Invalid> {
        require(
            self.secs > 0,
            "secs",
            "must be at least 1 (or guard = false)",
        )?;
        require(
            self.max_error_ratio > 0.0 && self.max_error_ratio < 1.0,
            "max_error_ratio",
            "must be between 0 and 1",
        )?;
        require(self.min_requests > 0, "min_requests", "must be at least 1")?;
        require(
            self.max_p99_ratio >= 1.0,
            "max_p99_ratio",
            "must be at least 1",
        )
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: default_health_path(),
            attempts: default_health_attempts(),
            interval_ms: default_health_interval(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SwitchConfig {
    /// The built-in reverse proxy, listening on `listen`; `None` only for an app reached
    /// through the shared edge alone (it names `hosts` and no `listen`).
    Proxy {
        #[serde(default)]
        listen: Option<SocketAddr>,
    },
    /// nginx in front: `include` is the file holding `set $service_url …;`.
    Nginx {
        include: PathBuf,
        /// nginx's main config, passed as `-c` (its default location when unset).
        conf: Option<PathBuf>,
        #[serde(default = "default_nginx_bin")]
        bin: String,
    },
}

impl Default for SwitchConfig {
    fn default() -> Self {
        Self::Proxy { listen: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// `<data_dir>/artifacts/{app}/{version}.zip`.
    Local {
        /// Keep the newest `keep` bundles per app (the live and previous ones always stay).
        #[serde(default = "default_local_bundles")]
        keep: u32,
    },
    /// `s3://{bucket}/{prefix}/{app}/{version}.zip`; credentials from AWS's standard chain.
    S3 {
        bucket: String,
        #[serde(default)]
        prefix: String,
        /// An S3-compatible server instead of AWS (path-style addressing then).
        endpoint: Option<String>,
        region: Option<String>,
        /// Keep the newest `keep` bundles per app (the live and previous ones always stay).
        keep: Option<u32>,
    },
}

// One per app, read once at start-up: its size does not matter, plain matching does.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RunnerConfig {
    Local {
        #[serde(default = "default_group")]
        group: String,
        /// Keep the newest `keep` unpacked revisions and releases on this host, as the
        /// CodeDeploy agent's `max_revisions` does; those of running instances always stay.
        #[serde(default = "default_local_revisions")]
        keep: u32,
    },
    /// AWS CodeDeploy deploys the S3 bundle to a fleet; needs `store.kind = "s3"`.
    #[serde(rename = "codedeploy")]
    CodeDeploy {
        application: String,
        group: String,
        deployment_config: Option<String>,
        /// `DISALLOW` (CodeDeploy's default), `OVERWRITE` or `RETAIN`.
        file_exists_behavior: Option<String>,
        #[serde(default)]
        auto_rollback: bool,
        /// Where the fleet is reached from outside; its `/profile` tells the live slot.
        public_url: Option<String>,
        /// A CodeDeploy-compatible endpoint instead of AWS (emulators, tests).
        endpoint: Option<String>,
        region: Option<String>,
        /// How long a deployment may take, queueing included; default: every hook's
        /// timeout plus ten minutes.
        timeout_secs: Option<u64>,
        /// The appspec's `files` destination on each host.
        destination: Option<String>,
        /// The user the hooks run as on each host (the appspec's `runas`).
        runas: Option<String>,
        /// The file nginx on each host includes for `$service_url`, which deploy.sh
        /// rewrites to switch (default `/etc/nginx/conf.d/service-url.inc`).
        nginx_include: Option<String>,
        /// What deploy.sh asks on each host for the live profile (default
        /// `http://127.0.0.1/profile`: the host's nginx, hence the live instance).
        profile_url: Option<String>,
        /// The one host (its `hostname`) that runs the app's `release` command; the others
        /// skip it. Required when the app has a `release`.
        release_host: Option<String>,
    },
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self::Local {
            group: default_group(),
            keep: default_local_revisions(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self::Local {
            keep: default_local_bundles(),
        }
    }
}

/// A secret read from the environment. `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9000))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("nonstop-data")
}
fn default_admin_token_env() -> String {
    "NONSTOP_ADMIN_TOKEN".into()
}
fn default_branch() -> String {
    "main".into()
}
fn default_build_timeout() -> u64 {
    600
}
fn default_version() -> String {
    "1.0.1-SNAPSHOT-{timestamp}".into()
}
fn default_ports() -> [u16; 2] {
    [8081, 8082]
}
fn default_profiles() -> [String; 2] {
    ["real1".into(), "real2".into()]
}
fn default_health_path() -> String {
    "/profile".into()
}
fn default_health_attempts() -> u32 {
    20
}
fn default_health_interval() -> u64 {
    250
}
fn default_hook_timeout() -> u64 {
    300
}
fn default_proxy_process() -> bool {
    true
}
fn default_drain_timeout() -> u64 {
    30
}
fn default_proxy_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_nginx_bin() -> String {
    "nginx".into()
}
fn default_group() -> String {
    "local".into()
}
fn default_local_bundles() -> u32 {
    10
}
fn default_local_revisions() -> u32 {
    5
}
fn default_github_token_env() -> String {
    "GITHUB_TOKEN".into()
}
fn default_github_api_url() -> String {
    "https://api.github.com".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<ServerConfig>,
    #[serde(default, rename = "app")]
    apps: Vec<AppConfig>,
    travis: Option<TravisKeyConfig>,
    slack: Option<SlackConfig>,
    github: Option<GitHubConfig>,
    #[serde(default)]
    proxy: ProxyConfig,
    #[serde(default, rename = "user")]
    users: Vec<UserConfig>,
}

impl Config {
    /// Reads, parses and validates `path`, and reads the secrets it names from the
    /// environment: what `serve` needs.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::load_settings(path)?;
        config.read_secrets(path, |name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Reads, parses and validates `path` without its secrets: what a client command needs.
    pub fn load_settings(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Fills each app's secrets from `env`; a secret that is named but not set is an error
    /// for the app that needs it.
    pub fn read_secrets(
        &mut self,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        self.read_every_secret(&env)
            .map_err(|invalid| invalid.in_file(path))
    }

    fn read_every_secret(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        self.server.read_secret(env).under("server")?;
        for app in &mut self.apps {
            let table = format!("app.{}", app.name);
            app.read_secret(env).under(&table)?;
        }
        if let Some(slack) = &mut self.slack {
            slack.read_secret(env).under("slack")?;
        }
        if let Some(github) = &mut self.github {
            github.read_secret(env).under("github")?;
        }
        for user in &mut self.users {
            let table = format!("user.{}", user.name);
            user.read_secret(env).under(&table)?;
        }
        let tokens: Vec<&str> = (self.users.iter())
            .filter_map(|user| user.token.as_ref().map(Secret::expose))
            .collect();
        let distinct: HashSet<&str> = tokens.iter().copied().collect();
        require(
            distinct.len() == tokens.len(),
            "user",
            "two users hold the same token: each needs one of their own",
        )?;
        // Travis CI's public keys: the server-wide one, and any app's own.
        let server_key = match &self.travis {
            Some(source) => Some(source.read_key(&self.base_dir, env).under("travis")?),
            None => None,
        };
        for app in &mut self.apps {
            app.travis_key = match &app.travis {
                Some(source) => {
                    let table = format!("app.{}.travis", app.name);
                    Some(source.read_key(&self.base_dir, env).under(&table)?)
                }
                None => server_key.clone(),
            };
        }
        Ok(())
    }

    /// Parses and validates `text` as if read from `path` (secrets not read).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Syntax {
            path: path.to_owned(),
            line: err
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1)
                .unwrap_or(0),
            message: err.message().replace('\n', " "),
        })?;
        let server = raw.server.take().unwrap_or_else(|| {
            toml::from_str("").expect("every server key has a default, so empty is valid")
        });
        raw.validate(&server)
            .map_err(|invalid| invalid.in_file(path))?;
        let folder = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let base_dir = folder.canonicalize().unwrap_or_else(|_| folder.to_owned());
        let mut apps = raw.apps;
        for app in &mut apps {
            app.env_file = app.env_file.as_ref().map(|file| base_dir.join(file));
            // An app the edge routes to needs no listener of its own; any other one gets
            // the classic 127.0.0.1:8080.
            if let SwitchConfig::Proxy { listen: None } = app.switch
                && app.hosts.is_empty()
            {
                app.switch = SwitchConfig::Proxy {
                    listen: Some(default_proxy_listen()),
                };
            }
        }
        let file = base_dir.join(path.file_name().unwrap_or(path.as_os_str()));
        Ok(Self {
            server,
            apps,
            file,
            base_dir,
            travis: raw.travis,
            slack: raw.slack,
            github: raw.github,
            proxy: raw.proxy,
            users: raw.users,
        })
    }

    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|app| app.name.as_str() == name)
    }

    /// `data_dir`, resolved against the config file's folder.
    pub fn data_dir(&self) -> PathBuf {
        self.base_dir.join(&self.server.data_dir)
    }

    /// `server.proxy_socket`, resolved against the config file's folder, or the default
    /// in the data dir.
    pub fn proxy_socket(&self) -> PathBuf {
        match &self.server.proxy_socket {
            Some(socket) => self.base_dir.join(socket),
            None => self.data_dir().join("proxy.sock"),
        }
    }
}

impl RawConfig {
    /// Every table checks itself; what spans tables (unique names, free listen addresses)
    /// is checked here.
    fn validate(&self, server: &ServerConfig) -> Result<(), Invalid> {
        let sections = Sections {
            travis: self.travis.is_some(),
            slack: self.slack.is_some(),
            github: self.github.is_some(),
        };
        let mut names = HashSet::new();
        let mut listens = HashSet::from([server.listen]);
        for app in &self.apps {
            let table = format!("app.{}", app.name);
            require(names.insert(&app.name), "name", "two apps have this name").under(&table)?;
            app.validate(&sections).under(&table)?;
            if let SwitchConfig::Proxy {
                listen: Some(listen),
            } = app.switch
            {
                // Port 0 (any free port, for tests and benchmarks) never collides.
                let free = listen.port() == 0 || listens.insert(listen);
                let taken = format!("{listen} is already used by the server or another app");
                require(free, "switch.listen", taken).under(&table)?;
            }
        }
        let own = self.own_secret_vars(server);
        for app in &self.apps {
            let table = format!("app.{}", app.name);
            for name in &app.secrets {
                let message =
                    format!("{name} holds one of nonstop's own secrets, which no app may get");
                require(!own.contains(name.as_str()), "secrets", message).under(&table)?;
            }
        }
        server.validate().under("server")?;
        let mut names = HashSet::new();
        for user in &self.users {
            let table = format!("user.{}", user.name);
            user.validate().under(&table)?;
            require(
                names.insert(user.name.as_str()),
                "name",
                format!("`{}` is named twice", user.name),
            )
            .under(&table)?;
        }
        edge::validate(&self.proxy, server, &self.apps)?;
        if let Some(source) = &self.travis {
            source.validate().under("travis")?;
        }
        if let Some(github) = &self.github {
            github.validate().under("github")?;
        }
        Ok(())
    }
}

impl RawConfig {
    /// The env vars that hold nonstop's own secrets (the admin and metrics tokens, webhook
    /// secrets, Slack's URL, the GitHub token).
    fn own_secret_vars<'a>(&'a self, server: &'a ServerConfig) -> HashSet<&'a str> {
        std::iter::once(server.admin_token_env.as_str())
            .chain(server.metrics_token_env.as_deref())
            .chain(
                self.apps
                    .iter()
                    .filter_map(|a| a.webhook_secret_env.as_deref()),
            )
            .chain(self.slack.iter().map(|s| s.webhook_url_env.as_str()))
            .chain(self.users.iter().map(|u| u.token_env.as_str()))
            .chain(self.github.iter().map(|g| g.token_env.as_str()))
            .chain(
                self.travis
                    .iter()
                    .chain(self.apps.iter().filter_map(|a| a.travis.as_ref()))
                    .filter_map(|t| t.public_key_env.as_deref()),
            )
            .collect()
    }
}

/// One key's problem, named relative to the table that found it. Each table checks itself
/// and knows only its own keys (`bucket`); whoever holds the table prefixes its key
/// (`under("store")`, then `under("app.hello")`), and `in_file` adds the path. The message is
/// one line and never holds a secret's value.
#[derive(Debug)]
struct Invalid {
    key: String,
    message: String,
}

impl Invalid {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn in_file(self, path: &Path) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_owned(),
            key: self.key,
            message: self.message,
        }
    }
}

/// Names a table's problem from the table that holds it.
trait Under {
    fn under(self, table: &str) -> Self;
}

impl<T> Under for Result<T, Invalid> {
    fn under(self, table: &str) -> Self {
        self.map_err(|invalid| Invalid {
            key: if invalid.key.is_empty() {
                table.to_owned()
            } else {
                format!("{table}.{}", invalid.key)
            },
            message: invalid.message,
        })
    }
}

/// `Err` at `key` unless `check` holds.
fn require(check: bool, key: &str, message: impl Into<String>) -> Result<(), Invalid> {
    if check {
        Ok(())
    } else {
        Err(Invalid::new(key, message))
    }
}

/// Whether `text` is an absolute http(s) URL.
fn is_http_url(text: &str) -> bool {
    url::Url::parse(text)
        .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
}

/// `key` must be an absolute http(s) URL; the message does not repeat the value.
fn http_url(key: &str, text: &str) -> Result<(), Invalid> {
    require(
        is_http_url(text),
        key,
        "must be an absolute http:// or https:// URL",
    )
}

/// An AWS endpoint or fleet address, when given, starts with `http://` or `https://`.
fn http_scheme(key: &str, text: Option<&str>) -> Result<(), Invalid> {
    let valid = text.is_none_or(|t| t.starts_with("http://") || t.starts_with("https://"));
    require(valid, key, "must be an http:// or https:// URL")
}

/// `key`, when given, is an absolute path on the fleet's hosts.
fn host_path(key: &str, text: Option<&str>) -> Result<(), Invalid> {
    require(
        text.is_none_or(|t| t.starts_with('/')),
        key,
        "must be an absolute path on the hosts",
    )
}

/// The value of env var `var`, which must be set and not empty; `holds` says what it is for.
fn env_value(
    env: &impl Fn(&str) -> Option<String>,
    key: &str,
    var: &str,
    holds: &str,
) -> Result<String, Invalid> {
    env(var)
        .filter(|value| !value.is_empty())
        .ok_or_else(|| Invalid::new(key, format!("env var {var} is not set (it holds {holds})")))
}

/// Which top-level sections the file has: what an app's overrides and triggers rely on.
struct Sections {
    travis: bool,
    slack: bool,
    github: bool,
}

/// A metrics token shorter than this is refused: it is a password a scraper sends over the
/// network, and a short one could be guessed.
pub const MIN_METRICS_TOKEN_BYTES: usize = 32;

impl ServerConfig {
    fn validate(&self) -> Result<(), Invalid> {
        require(
            self.proxy_process || self.proxy_socket.is_none(),
            "proxy_socket",
            "has no use with proxy_process = false: the proxies then run inside serve",
        )?;
        if let Some(url) = &self.public_url {
            http_url("public_url", url)?;
        }
        if let Some(var) = &self.metrics_token_env {
            require(
                !self.public_read,
                "metrics_token_env",
                "has no use with public_read = true, which lets anyone read /metrics",
            )?;
            require(
                *var != self.admin_token_env,
                "metrics_token_env",
                "names the admin token's env var: the metrics token must be one that reads /metrics only",
            )?;
        }
        Ok(())
    }

    fn read_secret(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        let Some(var) = &self.metrics_token_env else {
            return Ok(());
        };
        let token = env_value(env, "metrics_token_env", var, "the metrics token")?;
        // It arrives as a header value: only printable characters can match.
        require(
            token.bytes().all(|b| b.is_ascii_graphic()),
            "metrics_token_env",
            format!("env var {var} holds characters a token cannot have"),
        )?;
        require(
            token.len() >= MIN_METRICS_TOKEN_BYTES,
            "metrics_token_env",
            format!(
                "env var {var} holds {} bytes; at least {MIN_METRICS_TOKEN_BYTES} are needed",
                token.len()
            ),
        )?;
        self.metrics_token = Some(Secret(token));
        Ok(())
    }
}

impl HealthConfig {
    fn validate(&self) -> Result<(), Invalid> {
        require(self.path.starts_with('/'), "path", "must start with /")
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), Invalid> {
        match self {
            Self::Local { keep } => require(
                *keep > 0,
                "keep",
                "must be at least 1: the live revision always stays",
            ),
            Self::S3 {
                bucket,
                endpoint,
                keep,
                ..
            } => {
                // S3's bucket naming rules, the part a typo breaks.
                let valid = (3..=63).contains(&bucket.len())
                    && bucket.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                    });
                require(
                    valid,
                    "bucket",
                    format!(
                        "`{bucket}` is not a valid S3 bucket name (3-63 lowercase letters, digits, - and .)"
                    ),
                )?;
                http_scheme("endpoint", endpoint.as_deref())?;
                require(
                    *keep != Some(0),
                    "keep",
                    "must be at least 1 (or left out to keep every bundle)",
                )
            }
        }
    }
}

impl RunnerConfig {
    fn validate(&self) -> Result<(), Invalid> {
        match self {
            Self::Local { keep, .. } => require(
                *keep > 0,
                "keep",
                "must be at least 1: the live revision always stays",
            ),
            Self::CodeDeploy {
                application,
                group,
                file_exists_behavior,
                public_url,
                endpoint,
                timeout_secs,
                destination,
                runas,
                nginx_include,
                profile_url,
                ..
            } => {
                require(
                    !application.trim().is_empty(),
                    "application",
                    "must name the CodeDeploy application",
                )?;
                require(
                    !group.trim().is_empty(),
                    "group",
                    "must name the CodeDeploy deployment group",
                )?;
                if let Some(behavior) = file_exists_behavior {
                    require(
                        ["DISALLOW", "OVERWRITE", "RETAIN"].contains(&behavior.as_str()),
                        "file_exists_behavior",
                        format!("`{behavior}` is not one of DISALLOW, OVERWRITE, RETAIN"),
                    )?;
                }
                http_scheme("public_url", public_url.as_deref())?;
                http_scheme("endpoint", endpoint.as_deref())?;
                require(
                    *timeout_secs != Some(0),
                    "timeout_secs",
                    "must be at least 1",
                )?;
                host_path("destination", destination.as_deref())?;
                let one_user = runas
                    .as_deref()
                    .is_none_or(|u| !u.is_empty() && !u.contains(char::is_whitespace));
                require(one_user, "runas", "must be one user name")?;
                host_path("nginx_include", nginx_include.as_deref())?;
                http_scheme("profile_url", profile_url.as_deref())
            }
        }
    }
}

impl TravisKeyConfig {
    fn validate(&self) -> Result<(), Invalid> {
        require(
            self.public_key_file.is_some() != self.public_key_env.is_some(),
            "",
            "give exactly one of public_key_file and public_key_env",
        )
    }

    /// Reads the key from its file (relative to `base_dir`) or env var and parses the PEM
    /// (SubjectPublicKeyInfo, as Travis publishes it, or PKCS#1).
    fn read_key(
        &self,
        base_dir: &Path,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Arc<rsa::PublicKey>, Invalid> {
        use rsa::pkcs1::DecodeRsaPublicKey;
        use rsa::pkcs8::DecodePublicKey;
        let (field, pem) = match (&self.public_key_file, &self.public_key_env) {
            (Some(file), _) => {
                let file = base_dir.join(file);
                let pem = std::fs::read_to_string(&file).map_err(|err| {
                    Invalid::new(
                        "public_key_file",
                        format!("cannot read {}: {err}", file.display()),
                    )
                })?;
                ("public_key_file", pem)
            }
            (None, Some(var)) => (
                "public_key_env",
                env_value(env, "public_key_env", var, "Travis CI's public key")?,
            ),
            (None, None) => {
                return Err(Invalid::new(
                    "public_key_file",
                    "give public_key_file or public_key_env",
                ));
            }
        };
        let pem = pem.trim();
        rsa::PublicKey::from_public_key_pem(pem)
            .or_else(|_| rsa::PublicKey::from_pkcs1_pem(pem))
            .map(Arc::new)
            .map_err(|_| Invalid::new(field, "not an RSA public key in PEM form"))
    }
}

impl SlackConfig {
    fn read_secret(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        let var = &self.webhook_url_env;
        let url = env_value(env, "webhook_url_env", var, "the Slack webhook URL")?;
        // The URL is the secret: the message names the variable, never its value.
        require(
            is_http_url(&url),
            "webhook_url_env",
            format!("env var {var} does not hold an http(s) URL"),
        )?;
        self.webhook_url = Some(Secret(url));
        Ok(())
    }
}

impl GitHubConfig {
    fn validate(&self) -> Result<(), Invalid> {
        http_url("api_url", &self.api_url)
    }

    fn read_secret(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        let var = &self.token_env;
        let token = env_value(env, "token_env", var, "the GitHub token")?;
        // It becomes a header value: a stray newline would break every request.
        require(
            token.bytes().all(|b| b.is_ascii_graphic()),
            "token_env",
            format!("env var {var} holds characters a token cannot have"),
        )?;
        self.token = Some(Secret(token));
        Ok(())
    }
}

impl AppConfig {
    /// Checks this app on its own, keys named relative to it; `sections` are the file's
    /// top-level tables its settings rely on.
    fn validate(&self, sections: &Sections) -> Result<(), Invalid> {
        require(
            self.ports[0] != self.ports[1] && !self.ports.contains(&0),
            "ports",
            "two different non-zero ports are needed",
        )?;
        require(
            self.profiles[0] != self.profiles[1],
            "profiles",
            "the two profiles must differ",
        )?;
        require(
            self.version.contains("{timestamp}"),
            "version",
            "must contain {timestamp} so every version is unique and sorts in order",
        )?;
        require(
            crate::version::is_safe_pattern(&self.version),
            "version",
            "may hold only letters, digits, '.', '_', '-' and {timestamp}, {sha}, {branch}: a version names a folder",
        )?;
        self.health.validate().under("health")?;
        // AfterInstall drains, then stops the instance (up to 15 s), within its own timeout.
        require(
            self.drain_timeout_secs + 15 <= self.hook_timeout_secs,
            "drain_timeout_secs",
            format!(
                "must leave AfterInstall 15 s to stop the instance: at most hook_timeout_secs - 15 ({})",
                self.hook_timeout_secs.saturating_sub(15)
            ),
        )?;
        if let Some(guard) = &self.guard {
            guard.validate().under("guard")?;
        }
        self.validate_checks()?;
        self.validate_env()?;
        self.validate_users()?;
        require(
            !self.artifact.is_absolute() && self.artifact.file_name().is_some(),
            "artifact",
            "must be a file path relative to the checkout",
        )?;
        require(
            self.run.contains("{port}"),
            "run",
            "must contain {port}: each instance listens on its own port",
        )?;
        self.store.validate().under("store")?;
        if matches!(self.runner, RunnerConfig::CodeDeploy { .. }) {
            require(
                matches!(self.store, StoreConfig::S3 { .. }),
                "runner",
                "kind = \"codedeploy\" deploys bundles from S3: set store = { kind = \"s3\", bucket = … }",
            )?;
            let release_host = match &self.runner {
                RunnerConfig::CodeDeploy { release_host, .. } => release_host.as_deref(),
                RunnerConfig::Local { .. } => None,
            };
            require(
                self.release.is_none() || release_host.is_some_and(|h| !h.trim().is_empty()),
                "release",
                "on a CodeDeploy fleet the release runs on one host: name it in runner.release_host (its hostname)",
            )?;
        }
        self.runner.validate().under("runner")?;
        if let Some(url) = &self.public_url {
            http_url("public_url", url)?;
        }
        if let Some(source) = &self.travis {
            source.validate().under("travis")?;
        }
        self.validate_sections(sections)
    }

    /// What this app asks of the file's other sections.
    fn validate_sections(&self, sections: &Sections) -> Result<(), Invalid> {
        if self.trigger == TriggerMode::Checks {
            require(
                self.repository.is_some(),
                "repository",
                "trigger = \"checks\" needs it: a commit's checks are asked of GitHub by repository",
            )?;
            require(
                sections.github,
                "trigger",
                "\"checks\" needs a GitHub token to ask for a commit's checks: add [github] with token_env",
            )?;
        }
        if self.trigger == TriggerMode::Travis {
            require(
                self.repository.is_some(),
                "repository",
                "trigger = \"travis\" needs it: Travis signs every project's builds with one key, so only the repository ties a build to this app",
            )?;
            require(
                self.travis.is_some() || sections.travis,
                "trigger",
                "\"travis\" needs Travis CI's public key: add [travis] public_key_file or public_key_env",
            )?;
        }
        require(
            self.slack.is_none() || sections.slack,
            "slack",
            "there is no [slack] section for this to override",
        )?;
        require(
            self.github.is_none() || sections.github,
            "github",
            "there is no [github] section for this to override",
        )
    }

    /// `checks` names each required check once, and only a checks gate reads it.
    fn validate_checks(&self) -> Result<(), Invalid> {
        require(
            self.checks.is_empty() || self.trigger == TriggerMode::Checks,
            "checks",
            "only trigger = \"checks\" reads it",
        )?;
        let mut seen = HashSet::new();
        for name in &self.checks {
            require(
                !name.trim().is_empty(),
                "checks",
                "a check's name cannot be empty",
            )?;
            require(
                seen.insert(name),
                "checks",
                format!("`{name}` is named twice"),
            )?;
        }
        Ok(())
    }

    /// `env` and `secrets` name valid env vars the runner does not set, each once; `env`'s
    /// values fit on one line (they are bundled as lines).
    fn validate_env(&self) -> Result<(), Invalid> {
        for (name, value) in &self.env {
            if let Some(problem) = crate::app_env::refuse_name(name) {
                return Err(Invalid::new("env", format!("`{name}` {problem}")));
            }
            require(
                !value.contains(['\n', '\r', '\0']),
                "env",
                format!("the value of {name} must be one line"),
            )?;
        }
        let mut seen = HashSet::new();
        for name in &self.secrets {
            if let Some(problem) = crate::app_env::refuse_name(name) {
                return Err(Invalid::new("secrets", format!("`{name}` {problem}")));
            }
            require(
                seen.insert(name),
                "secrets",
                format!("{name} is named twice"),
            )?;
            require(
                !self.env.contains_key(name),
                "secrets",
                format!("{name} is also in env: a value is either in the file or a secret"),
            )?;
        }
        Ok(())
    }

    /// `run_as` and `build_as` are one user name each; a fleet's hooks run as `runner.runas`.
    fn validate_users(&self) -> Result<(), Invalid> {
        for (key, user) in [("run_as", &self.run_as), ("build_as", &self.build_as)] {
            let one_user = user.as_deref().is_none_or(|u| {
                !u.is_empty() && !u.contains(|c: char| c.is_whitespace() || c == '\0')
            });
            require(one_user, key, "must be one user name")?;
        }
        require(
            self.run_as.is_none() || matches!(self.runner, RunnerConfig::Local { .. }),
            "run_as",
            "is for the local runner: on a fleet, hooks run as runner.runas",
        )
    }

    /// The users `run_as` and `build_as` name, from this host's user database.
    fn resolve_users(&mut self) -> Result<(), Invalid> {
        let lookup = |key: &str, name: &Option<String>| -> Result<_, Invalid> {
            let Some(name) = name else { return Ok(None) };
            match crate::user::User::lookup(name) {
                Ok(Some(user)) => Ok(Some(user)),
                Ok(None) => Err(Invalid::new(
                    key,
                    format!("there is no user `{name}` on this host"),
                )),
                Err(err) => Err(Invalid::new(
                    key,
                    format!("cannot look up user `{name}`: {err}"),
                )),
            }
        };
        self.run_user = lookup("run_as", &self.run_as)?;
        self.build_user = lookup("build_as", &self.build_as)?;
        Ok(())
    }

    fn read_secret(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        // What this host gives the app is read here, with its secrets: its users too.
        self.resolve_users()?;
        if let Some(var) = &self.webhook_secret_env {
            let secret = env_value(env, "webhook_secret_env", var, "the webhook secret")?;
            self.webhook_secret = Some(Secret(secret));
        }
        self.secret_values = self
            .secrets
            .iter()
            .map(|var| {
                let value = env_value(env, "secrets", var, "a secret of this app")?;
                Ok((var.clone(), Secret(value)))
            })
            .collect::<Result<_, Invalid>>()?;
        Ok(())
    }

    /// Where the fleet answers from outside, when it runs elsewhere (CodeDeploy).
    pub fn fleet_url(&self) -> Option<&str> {
        match &self.runner {
            RunnerConfig::CodeDeploy { public_url, .. } => public_url.as_deref(),
            RunnerConfig::Local { .. } => None,
        }
    }

    /// Where users reach the app, without a trailing `/`: `public_url`, else the fleet's,
    /// else the built-in proxy's address (nginx in front: the host's port 80, as in the
    /// classic recipe).
    pub fn public_url(&self) -> String {
        if let Some(url) = self.public_url.as_deref().or(self.fleet_url()) {
            return url.trim_end_matches('/').to_owned();
        }
        match (&self.switch, self.hosts.iter().find(|h| !h.is_wildcard())) {
            (_, Some(host)) if self.tls.is_some() => format!("https://{host}"),
            (_, Some(host)) => format!("http://{host}"),
            (
                SwitchConfig::Proxy {
                    listen: Some(listen),
                },
                None,
            ) => format!("http://{listen}"),
            _ => "http://127.0.0.1".into(),
        }
    }

    /// Where the app's traffic comes in, for people: `proxy 127.0.0.1:8080` or the include.
    pub fn entry(&self) -> String {
        let own = match &self.switch {
            SwitchConfig::Proxy {
                listen: Some(listen),
            } => format!("proxy {listen}"),
            SwitchConfig::Proxy { listen: None } => String::new(),
            SwitchConfig::Nginx { include, .. } => format!("nginx via {}", include.display()),
        };
        let hosts: Vec<&str> = self.hosts.iter().map(HostName::as_str).collect();
        match (own.is_empty(), hosts.is_empty()) {
            (_, true) => own,
            (true, false) => format!("edge {}", hosts.join(", ")),
            (false, false) => format!("{own}, edge {}", hosts.join(", ")),
        }
    }

    /// The profile that goes with `port`.
    pub fn profile_of(&self, port: u16) -> Option<&str> {
        let index = self.ports.iter().position(|p| *p == port)?;
        Some(&self.profiles[index])
    }

    /// The port that is not `live` (the first one when nothing is live yet).
    pub fn idle_port(&self, live: Option<u16>) -> u16 {
        if live == Some(self.ports[0]) {
            self.ports[1]
        } else {
            self.ports[0]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[app]]
name = "hello"
repo = "examples/hello"
build = "true"
artifact = "hello"
run = "{artifact} --port {port}"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let path = Path::new("nonstop.toml");
        let mut config = Config::parse(text, path)?;
        config.read_secrets(path, |_| None)?;
        Ok(config)
    }

    #[test]
    fn defaults_fill_everything_but_the_app_essentials() {
        let config = parse(MINIMAL).unwrap();
        let app = &config.apps[0];
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(app.ports, [8081, 8082]);
        assert_eq!(app.profile_of(8082), Some("real2"));
        assert_eq!(app.idle_port(None), 8081);
        assert_eq!(app.idle_port(Some(8081)), 8082);
        assert_eq!(app.idle_port(Some(8082)), 8081);
        assert_eq!(app.entry(), "proxy 127.0.0.1:8080");
        assert!(
            !config.server.public_read,
            "reading needs a login by default"
        );
        assert!(config.server.metrics_token.is_none());
        // Restart-safe out of the box: the proxies outlive `serve`.
        assert!(config.server.proxy_process);
        assert!(
            config.proxy_socket().ends_with("nonstop-data/proxy.sock"),
            "{}",
            config.proxy_socket().display()
        );
        assert_eq!(app.drain_timeout_secs, 30);
    }

    #[test]
    fn the_proxy_and_drain_settings_that_cannot_work_are_refused_naming_their_key() {
        let one_process = "\n[server]\nproxy_process = false\nproxy_socket = \"p.sock\"\n";
        let err = parse(&format!("{MINIMAL}{one_process}")).unwrap_err();
        assert!(err.to_string().contains("server.proxy_socket"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}hook_timeout_secs = 40\ndrain_timeout_secs = 30\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("app.hello.drain_timeout_secs: must leave AfterInstall 15 s"),
            "{err}"
        );
        let fits = parse(&format!(
            "{MINIMAL}hook_timeout_secs = 45\ndrain_timeout_secs = 30\n"
        ));
        assert!(fits.is_ok());
    }

    #[test]
    fn the_guard_is_on_by_default_off_with_false_and_its_limits_are_checked() {
        let app =
            |line: &str| parse(&format!("{MINIMAL}{line}\n")).map(|c| c.apps[0].guard.clone());
        assert_eq!(app("").unwrap(), Some(GuardConfig::default()));
        assert_eq!(GuardConfig::default().secs, 60);
        assert_eq!(app("guard = false").unwrap(), None);
        assert_eq!(
            app("guard = { secs = 5, max_error_ratio = 0.1, min_requests = 50, max_p99_ratio = 2.0 }")
                .unwrap(),
            Some(GuardConfig {
                secs: 5,
                max_error_ratio: 0.1,
                min_requests: 50,
                max_p99_ratio: 2.0
            })
        );
        let err = app("guard = { max_error_ratio = 5 }")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("guard.max_error_ratio") && err.contains("between 0 and 1"),
            "{err}"
        );
        assert!(
            app("guard = { sec = 5 }").is_err(),
            "an unknown key is refused"
        );
    }

    #[test]
    fn a_metrics_token_is_read_from_its_env_var_and_checked_without_being_shown() {
        let server = "\n[server]\nmetrics_token_env = \"METRICS_TOKEN\"\n";
        let text = format!("{MINIMAL}{server}");
        let err = with_env(&text, &[]).unwrap_err().to_string();
        assert!(
            err.contains("server.metrics_token_env: env var METRICS_TOKEN is not set"),
            "{err}"
        );
        let err = with_env(&text, &[("METRICS_TOKEN", "short-s3cret")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.metrics_token_env: env var METRICS_TOKEN holds 12 bytes"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        let spaced = format!("{} s3cret", "x".repeat(32));
        let err = with_env(&text, &[("METRICS_TOKEN", &spaced)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds characters a token cannot have"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");

        let token = "m".repeat(MIN_METRICS_TOKEN_BYTES);
        let config = with_env(&text, &[("METRICS_TOKEN", &token)]).unwrap();
        let read = config.server.metrics_token.as_ref().map(Secret::expose);
        assert_eq!(read, Some(token.as_str()));
        assert!(!format!("{config:?}").contains(&token));

        for (extra, problem) in [
            ("public_read = true\n", "has no use with public_read = true"),
            (
                "admin_token_env = \"METRICS_TOKEN\"\n",
                "names the admin token's env var",
            ),
        ] {
            let err = with_env(&format!("{text}{extra}"), &[("METRICS_TOKEN", &token)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("server.metrics_token_env: ") && err.contains(problem),
                "{extra}: {err}"
            );
        }
    }

    #[test]
    fn an_unknown_key_names_the_line_and_the_key() {
        let err = parse(&format!("{MINIMAL}bulid = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("nonstop.toml:8:"), "{err}");
        assert!(err.contains("bulid"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = parse(&format!("{MINIMAL}ports = [8081, 8081]\n")).unwrap_err();
        assert!(err.to_string().contains("app.hello.ports"), "{err}");
        let err = parse(&MINIMAL.replace("\"hello\"", "\"Hello\"")).unwrap_err();
        assert!(err.to_string().contains("not a valid app name"), "{err}");
        for pattern in ["../../{timestamp}", "v/{timestamp}", "{timestamp}-{user}"] {
            let err = parse(&format!("{MINIMAL}version = \"{pattern}\"\n")).unwrap_err();
            assert!(
                err.to_string()
                    .contains("app.hello.version: may hold only letters"),
                "{pattern}: {err}"
            );
        }
    }

    #[test]
    fn aws_backends_parse_and_their_mistakes_name_the_key() {
        let s3 =
            "store = { kind = \"s3\", bucket = \"releases\", prefix = \"nonstop\", keep = 5 }\n";
        let cd = "runner = { kind = \"codedeploy\", application = \"hello\", group = \"fleet\", public_url = \"https://hello.example\" }\n";
        let config = parse(&format!("{MINIMAL}{s3}{cd}")).unwrap();
        let app = &config.apps[0];
        assert!(
            matches!(&app.store, StoreConfig::S3 { bucket, keep: Some(5), .. } if bucket == "releases")
        );
        assert_eq!(app.fleet_url(), Some("https://hello.example"));
        assert_eq!(app.public_url(), "https://hello.example");

        for (extra, key, problem) in [
            (
                "store = { kind = \"s3\", bucket = \"Releases_1\" }\n".to_owned(),
                "app.hello.store.bucket",
                "not a valid S3 bucket name",
            ),
            (
                "store = { kind = \"s3\", bucket = \"releases\", keep = 0 }\n".to_owned(),
                "app.hello.store.keep",
                "at least 1",
            ),
            (
                "store = { kind = \"local\", keep = 0 }\n".to_owned(),
                "app.hello.store.keep",
                "at least 1",
            ),
            (
                "runner = { kind = \"local\", keep = 0 }\n".to_owned(),
                "app.hello.runner.keep",
                "at least 1",
            ),
            (
                "store = { kind = \"s3\", bucket = \"releases\", endpoint = \"127.0.0.1:9\" }\n"
                    .to_owned(),
                "app.hello.store.endpoint",
                "http://",
            ),
            (
                cd.to_owned(),
                "app.hello.runner",
                "set store = { kind = \"s3\"",
            ),
            (
                format!(
                    "{s3}{}",
                    cd.replace("public_url", "file_exists_behavior")
                        .replace("https://hello.example", "overwrite")
                ),
                "app.hello.runner.file_exists_behavior",
                "not one of DISALLOW, OVERWRITE, RETAIN",
            ),
            (
                format!("{s3}{}", cd.replace("group = \"fleet\"", "group = \" \"")),
                "app.hello.runner.group",
                "deployment group",
            ),
            (
                format!("{s3}{cd}release = \"bin/migrate\"\n"),
                "app.hello.release",
                "name it in runner.release_host",
            ),
            (
                format!(
                    "{s3}{}",
                    cd.replace("public_url", "destination")
                        .replace("https://hello.example", "srv/hello")
                ),
                "app.hello.runner.destination",
                "absolute path",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(problem), "{extra}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        // A missing required key is named by the TOML reader, on its line.
        let err = parse(&format!(
            "{MINIMAL}{s3}runner = {{ kind = \"codedeploy\", group = \"fleet\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("application"), "{err}");
    }

    #[test]
    fn a_missing_secret_is_an_error_for_the_app_that_needs_it() {
        let text = format!("{MINIMAL}webhook_secret_env = \"HELLO_SECRET\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("app.hello.webhook_secret_env"), "{err}");
        assert!(err.contains("HELLO_SECRET is not set"), "{err}");
        let path = Path::new("nonstop.toml");
        let mut config = Config::parse(&text, path).unwrap();
        config
            .read_secrets(path, |_| Some("s3cret".into()))
            .unwrap();
        let secret = config.apps[0].webhook_secret.clone().unwrap();
        assert_eq!(secret.expose(), "s3cret");
        assert_eq!(format!("{secret:?}"), "Secret(…)");
    }

    #[test]
    fn an_apps_env_and_secrets_are_checked_by_name_and_read_without_being_shown() {
        let keys = "env = { RUST_LOG = \"info\", APP_MODE = \"production\" }\n\
                    secrets = [\"DATABASE_URL\", \"SESSION_KEY\"]\n\
                    env_file = \"hello.env\"\n";
        let text = format!("{MINIMAL}{keys}");
        let secrets = [
            ("DATABASE_URL", "postgres://s3cret"),
            ("SESSION_KEY", "k3y"),
        ];
        let config = with_env(&text, &secrets).unwrap();
        let app = &config.apps[0];
        assert_eq!(app.env["APP_MODE"], "production");
        let read: Vec<_> = app
            .secret_values
            .iter()
            .map(|(name, value)| (name.as_str(), value.expose()))
            .collect();
        assert_eq!(read, secrets);
        assert_eq!(app.env_file, Some(config.base_dir.join("hello.env")));
        assert!(!format!("{app:?}").contains("s3cret"));

        let err = with_env(&text, &secrets[..1]).unwrap_err().to_string();
        assert!(
            err.contains("app.hello.secrets: env var SESSION_KEY is not set"),
            "{err}"
        );
        for (keys, key, problem) in [
            (
                "env = { \"1X\" = \"a\" }",
                "app.hello.env",
                "`1X` is not an env var name",
            ),
            (
                "env = { NONSTOP_RUN = \"a\" }",
                "app.hello.env",
                "is nonstop's own",
            ),
            (
                "env = { DEPLOYMENT_ID = \"a\" }",
                "app.hello.env",
                "set by the runner",
            ),
            (
                "env = { A = \"two\\nlines\" }",
                "app.hello.env",
                "must be one line",
            ),
            (
                "secrets = [\"A\", \"A\"]",
                "app.hello.secrets",
                "named twice",
            ),
            (
                "env = { A = \"x\" }\nsecrets = [\"A\"]",
                "app.hello.secrets",
                "also in env",
            ),
            (
                "secrets = [\"HOOK_SECRET\"]\nwebhook_secret_env = \"HOOK_SECRET\"",
                "app.hello.secrets",
                "one of nonstop's own secrets",
            ),
            (
                "secrets = [\"NONSTOP_ADMIN_TOKEN\"]",
                "app.hello.secrets",
                "is nonstop's own",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{keys}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("{key}: ")), "{keys}: {err}");
            assert!(err.contains(problem), "{keys}: {err}");
        }
    }

    #[test]
    fn run_as_and_build_as_name_users_of_this_host() {
        let config = parse(&format!(
            "{MINIMAL}run_as = \"nobody\"\nbuild_as = \"root\"\n"
        ))
        .unwrap();
        let app = &config.apps[0];
        assert_eq!(
            app.run_user.as_ref().map(|u| u.name.as_str()),
            Some("nobody")
        );
        assert_eq!(app.build_user.as_ref().map(|u| u.uid), Some(0));
        for (keys, problem) in [
            (
                "run_as = \"no-such-user-here\"",
                "app.hello.run_as: there is no user `no-such-user-here`",
            ),
            (
                "build_as = \"two users\"",
                "app.hello.build_as: must be one user name",
            ),
            (
                "run_as = \"nobody\"\nstore = { kind = \"s3\", bucket = \"releases\" }\nrunner = { kind = \"codedeploy\", application = \"a\", group = \"g\" }",
                "app.hello.run_as: is for the local runner",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{keys}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(problem), "{keys}: {err}");
        }
    }

    fn with_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let path = Path::new("nonstop.toml");
        let mut config = Config::parse(text, path)?;
        config.read_secrets(path, |name| {
            env.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| value.to_string())
        })?;
        Ok(config)
    }

    #[test]
    fn notifier_settings_are_checked_and_their_secrets_never_shown() {
        let slack = format!("{MINIMAL}\n[slack]\nwebhook_url_env = \"SLACK_URL\"\n");
        let err = with_env(&slack, &[]).unwrap_err().to_string();
        assert!(
            err.contains("slack.webhook_url_env: env var SLACK_URL is not set"),
            "{err}"
        );
        let err = with_env(&slack, &[("SLACK_URL", "hooks.slack.com/T0/B0/s3cret")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("slack.webhook_url_env"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let config = with_env(
            &slack,
            &[("SLACK_URL", "https://hooks.slack.com/T0/B0/s3cret")],
        )
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");

        let github = format!("{MINIMAL}\n[github]\napi_url = \"ftp://x\"\n");
        let err = with_env(&github, &[]).unwrap_err().to_string();
        assert!(
            err.contains("github.api_url: must be an absolute http"),
            "{err}"
        );
        let github = format!("{MINIMAL}\n[github]\n");
        let err = with_env(&github, &[]).unwrap_err().to_string();
        assert!(
            err.contains("github.token_env: env var GITHUB_TOKEN is not set"),
            "{err}"
        );
        let err = with_env(&github, &[("GITHUB_TOKEN", "ghp_x\ny")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("github.token_env: env var GITHUB_TOKEN holds characters"),
            "{err}"
        );
        assert!(!err.contains("ghp_x"), "{err}");

        let override_without_section = format!("{MINIMAL}slack = {{ mute = true }}\n");
        let err = with_env(&override_without_section, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("app.hello.slack: there is no [slack] section"),
            "{err}"
        );
        let err = with_env(&format!("{MINIMAL}public_url = \"nope\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("app.hello.public_url"), "{err}");
    }

    #[test]
    fn a_nested_tables_mistake_is_named_from_the_top() {
        let listen = "switch = { kind = \"proxy\", listen = \"127.0.0.1:9000\" }\n";
        let err = parse(&format!("{MINIMAL}{listen}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nonstop.toml: app.hello.switch.listen: 127.0.0.1:9000 is already used"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}health = {{ path = \"profile\" }}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("app.hello.health.path: must start with /"),
            "{err}"
        );
        let both = "travis = { public_key_env = \"K\", public_key_file = \"k.pem\" }\n";
        let err = parse(&format!("{MINIMAL}{both}")).unwrap_err().to_string();
        assert!(
            err.contains("app.hello.travis: give exactly one of"),
            "{err}"
        );
        let own_key = "travis = { public_key_env = \"HELLO_TRAVIS_KEY\" }\n";
        let err = parse(&format!("{MINIMAL}{own_key}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("app.hello.travis.public_key_env: env var HELLO_TRAVIS_KEY is not set"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}\n[server]\npublic_url = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.public_url: must be an absolute http"),
            "{err}"
        );
    }

    #[test]
    fn travis_needs_a_readable_rsa_key_and_the_repository() {
        let err = with_env(&format!("{MINIMAL}trigger = \"travis\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("app.hello.repository: trigger = \"travis\" needs it"),
            "{err}"
        );
        let travis_app = format!("{MINIMAL}trigger = \"travis\"\nrepository = \"acme/hello\"\n");
        let err = with_env(&travis_app, &[]).unwrap_err().to_string();
        assert!(
            err.contains("app.hello.trigger: \"travis\" needs Travis CI's public key"),
            "{err}"
        );

        let both = format!(
            "{travis_app}\n[travis]\npublic_key_env = \"K\"\npublic_key_file = \"k.pem\"\n"
        );
        let err = with_env(&both, &[]).unwrap_err().to_string();
        assert!(err.contains("travis: give exactly one of"), "{err}");

        let by_env = format!("{travis_app}\n[travis]\npublic_key_env = \"TRAVIS_KEY\"\n");
        let err = with_env(&by_env, &[]).unwrap_err().to_string();
        assert!(
            err.contains("travis.public_key_env: env var TRAVIS_KEY is not set"),
            "{err}"
        );
        let err = with_env(
            &by_env,
            &[(
                "TRAVIS_KEY",
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("travis.public_key_env: not an RSA public key in PEM form"),
            "{err}"
        );

        let by_file = format!("{travis_app}\n[travis]\npublic_key_file = \"no-such.pem\"\n");
        let err = with_env(&by_file, &[]).unwrap_err().to_string();
        assert!(err.contains("travis.public_key_file: cannot read"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn a_checks_gate_needs_the_repository_and_a_github_token() {
        let checks_app = format!("{MINIMAL}trigger = \"checks\"\n");
        let err = with_env(&checks_app, &[]).unwrap_err().to_string();
        assert!(
            err.contains("app.hello.repository: trigger = \"checks\" needs it"),
            "{err}"
        );
        let checks_app = format!("{checks_app}repository = \"acme/hello\"\n");
        let err = with_env(&checks_app, &[]).unwrap_err().to_string();
        assert!(
            err.contains("app.hello.trigger: \"checks\" needs a GitHub token"),
            "{err}"
        );
        let with_github = format!("{checks_app}\n[github]\ntoken_env = \"GH_TOKEN\"\n");
        let err = with_env(&with_github, &[]).unwrap_err().to_string();
        assert!(
            err.contains("github.token_env: env var GH_TOKEN is not set"),
            "{err}"
        );
        let config = with_env(&with_github, &[("GH_TOKEN", "ghp_s3cret")]).unwrap();
        assert_eq!(config.apps[0].trigger, TriggerMode::Checks);
        assert!(config.apps[0].checks.is_empty());
        assert!(!format!("{config:?}").contains("ghp_s3cret"));

        let named = with_github.replace(
            "repository = ",
            "checks = [\"test\", \"ci/lint\"]\nrepository = ",
        );
        let config = with_env(&named, &[("GH_TOKEN", "t")]).unwrap();
        assert_eq!(config.apps[0].checks, ["test", "ci/lint"]);

        for (checks, problem) in [
            ("[\"test\", \"test\"]", "`test` is named twice"),
            ("[\" \"]", "a check's name cannot be empty"),
        ] {
            let text = with_github.replace(
                "repository = ",
                &format!("checks = {checks}\nrepository = "),
            );
            let err = with_env(&text, &[("GH_TOKEN", "t")])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("app.hello.checks: {problem}")),
                "{err}"
            );
        }
        let err = with_env(&format!("{MINIMAL}checks = [\"test\"]\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("app.hello.checks: only trigger = \"checks\" reads it"),
            "{err}"
        );
    }
}
