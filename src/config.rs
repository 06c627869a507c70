//! `nonstop.toml`: typed, validated once at start-up. An invalid file stops the server with
//! one line naming the key and the problem. Secrets are never in the file, only the names of
//! the env vars that hold them; this module reads those vars once and never logs them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::AppName;

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
    /// When set, the built-in proxies run in `nonstop proxy`, which takes switch commands on
    /// this Unix socket, so restarting `serve` never drops a client connection. Unset: the
    /// proxies run inside `serve`.
    pub proxy_socket: Option<PathBuf>,
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
    /// Per-hook timeout in seconds (CodeDeploy's default is 3600; a local deploy wants less).
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout_secs: u64,
    #[serde(default)]
    pub switch: SwitchConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub runner: RunnerConfig,
    /// Filled from `webhook_secret_env` at load time; never serialised or logged.
    #[serde(skip)]
    pub webhook_secret: Option<Secret>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerMode {
    #[default]
    Push,
    Travis,
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
    /// The built-in reverse proxy, listening on `listen`.
    Proxy {
        #[serde(default = "default_proxy_listen")]
        listen: SocketAddr,
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
        Self::Proxy {
            listen: default_proxy_listen(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    #[default]
    Local,
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
    },
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self::Local {
            group: default_group(),
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
fn default_proxy_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_nginx_bin() -> String {
    "nginx".into()
}
fn default_group() -> String {
    "local".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<ServerConfig>,
    #[serde(default, rename = "app")]
    apps: Vec<AppConfig>,
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
        for app in &mut self.apps {
            if let Some(var) = &app.webhook_secret_env {
                match env(var) {
                    Some(value) if !value.is_empty() => app.webhook_secret = Some(Secret(value)),
                    _ => {
                        return Err(ConfigError::Invalid {
                            path: path.to_owned(),
                            key: format!("app.{}.webhook_secret_env", app.name),
                            message: format!(
                                "env var {var} is not set (it holds the webhook secret)"
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Parses and validates `text` as if read from `path` (secrets not read).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Syntax {
            path: path.to_owned(),
            line: err
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1)
                .unwrap_or(0),
            message: err.message().replace('\n', " "),
        })?;
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let folder = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let base_dir = folder.canonicalize().unwrap_or_else(|_| folder.to_owned());
        let server = raw.server.unwrap_or_else(|| {
            toml::from_str("").expect("every server key has a default, so empty is valid")
        });

        let mut names = HashSet::new();
        let mut listens = HashSet::from([server.listen]);
        let mut apps = Vec::with_capacity(raw.apps.len());
        for app in raw.apps {
            let key = |field: &str| format!("app.{}.{field}", app.name);
            if !names.insert(app.name.clone()) {
                return Err(invalid(key("name"), "two apps have this name".into()));
            }
            if app.ports[0] == app.ports[1] || app.ports.contains(&0) {
                return Err(invalid(
                    key("ports"),
                    "two different non-zero ports are needed".into(),
                ));
            }
            if app.profiles[0] == app.profiles[1] {
                return Err(invalid(
                    key("profiles"),
                    "the two profiles must differ".into(),
                ));
            }
            if !app.version.contains("{timestamp}") {
                return Err(invalid(
                    key("version"),
                    "must contain {timestamp} so every version is unique and sorts in order".into(),
                ));
            }
            if !app.health.path.starts_with('/') {
                return Err(invalid(key("health.path"), "must start with /".into()));
            }
            if app.artifact.is_absolute() || app.artifact.file_name().is_none() {
                return Err(invalid(
                    key("artifact"),
                    "must be a file path relative to the checkout".into(),
                ));
            }
            if !app.run.contains("{port}") {
                return Err(invalid(
                    key("run"),
                    "must contain {port}: each instance listens on its own port".into(),
                ));
            }
            if let Err((field, message)) = check_aws_backends(&app) {
                return Err(invalid(key(field), message));
            }
            if let SwitchConfig::Proxy { listen } = app.switch
                // Port 0 (any free port, for tests and benchmarks) never collides.
                && listen.port() != 0
                && !listens.insert(listen)
            {
                return Err(invalid(
                    key("switch.listen"),
                    format!("{listen} is already used by the server or another app"),
                ));
            }
            apps.push(app);
        }
        Ok(Self {
            server,
            apps,
            base_dir,
        })
    }

    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|app| app.name.as_str() == name)
    }

    /// `data_dir`, resolved against the config file's folder.
    pub fn data_dir(&self) -> PathBuf {
        self.base_dir.join(&self.server.data_dir)
    }

    /// `server.proxy_socket`, resolved against the config file's folder.
    pub fn proxy_socket(&self) -> Option<PathBuf> {
        self.server
            .proxy_socket
            .as_ref()
            .map(|p| self.base_dir.join(p))
    }

    pub fn control_url(&self) -> String {
        self.server
            .control_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.server.listen))
    }
}

/// The S3 store's and CodeDeploy runner's settings, checked: `(key under the app, problem)`.
fn check_aws_backends(app: &AppConfig) -> Result<(), (&'static str, String)> {
    let http_url = |url: &str| url.starts_with("http://") || url.starts_with("https://");
    if let StoreConfig::S3 {
        bucket,
        endpoint,
        keep,
        ..
    } = &app.store
    {
        // S3's bucket naming rules, the part a typo breaks.
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err((
                "store.bucket",
                format!(
                    "`{bucket}` is not a valid S3 bucket name (3-63 lowercase letters, digits, - and .)"
                ),
            ));
        }
        if endpoint.as_deref().is_some_and(|e| !http_url(e)) {
            return Err((
                "store.endpoint",
                "must be an http:// or https:// URL".into(),
            ));
        }
        if *keep == Some(0) {
            return Err((
                "store.keep",
                "must be at least 1 (or left out to keep every bundle)".into(),
            ));
        }
    }
    if let RunnerConfig::CodeDeploy {
        application,
        group,
        file_exists_behavior,
        public_url,
        endpoint,
        timeout_secs,
        destination,
        runas,
        ..
    } = &app.runner
    {
        if !matches!(app.store, StoreConfig::S3 { .. }) {
            return Err((
                "runner",
                "kind = \"codedeploy\" deploys bundles from S3: set store = { kind = \"s3\", bucket = … }".into(),
            ));
        }
        if application.trim().is_empty() {
            return Err((
                "runner.application",
                "must name the CodeDeploy application".into(),
            ));
        }
        if group.trim().is_empty() {
            return Err((
                "runner.group",
                "must name the CodeDeploy deployment group".into(),
            ));
        }
        if let Some(behavior) = file_exists_behavior
            && !["DISALLOW", "OVERWRITE", "RETAIN"].contains(&behavior.as_str())
        {
            return Err((
                "runner.file_exists_behavior",
                format!("`{behavior}` is not one of DISALLOW, OVERWRITE, RETAIN"),
            ));
        }
        if public_url.as_deref().is_some_and(|u| !http_url(u)) {
            return Err((
                "runner.public_url",
                "must be an http:// or https:// URL".into(),
            ));
        }
        if endpoint.as_deref().is_some_and(|e| !http_url(e)) {
            return Err((
                "runner.endpoint",
                "must be an http:// or https:// URL".into(),
            ));
        }
        if *timeout_secs == Some(0) {
            return Err(("runner.timeout_secs", "must be at least 1".into()));
        }
        if destination.as_deref().is_some_and(|d| !d.starts_with('/')) {
            return Err((
                "runner.destination",
                "must be an absolute path on the hosts".into(),
            ));
        }
        if runas
            .as_deref()
            .is_some_and(|u| u.is_empty() || u.contains(char::is_whitespace))
        {
            return Err(("runner.runas", "must be one user name".into()));
        }
    }
    Ok(())
}

impl AppConfig {
    /// Where the fleet answers from outside, when it runs elsewhere (CodeDeploy).
    pub fn public_url(&self) -> Option<&str> {
        match &self.runner {
            RunnerConfig::CodeDeploy { public_url, .. } => public_url.as_deref(),
            RunnerConfig::Local { .. } => None,
        }
    }

    /// Where the app's traffic comes in, for people: `proxy 127.0.0.1:8080` or the include.
    pub fn entry(&self) -> String {
        match &self.switch {
            SwitchConfig::Proxy { listen } => format!("proxy {listen}"),
            SwitchConfig::Nginx { include, .. } => format!("nginx via {}", include.display()),
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
        assert_eq!(app.public_url(), Some("https://hello.example"));

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
}
