//! The shared edge's settings: `[proxy] http`/`https` and its limits, `[proxy.acme]`, and the
//! `hosts` and `tls` of apps and of the server itself. Checked here once, so the edge never
//! meets two owners of one name, a wildcard it would have to prove over DNS, or a TLS name
//! without a listener.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{AppConfig, Invalid, ProxyConfig, ServerConfig, SwitchConfig, Under, require};

/// A host name the edge answers for: lowercase, without a port, either exact
/// (`hello.example.com`) or a wildcard for one label below a name (`*.hello.example.com`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct HostName(String);

impl HostName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }
}

impl std::fmt::Display for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for HostName {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let name = text.to_ascii_lowercase();
        let bare = name.strip_prefix("*.").unwrap_or(&name);
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if bare.len() > 253 || !bare.split('.').all(label_ok) {
            return Err(format!(
                "`{text}` is not a host name (letters, digits, '-' and dots; `*.` only as the first label)"
            ));
        }
        Ok(Self(name))
    }
}

/// Where a name's certificate comes from: PEM files (reloaded when they change), or ACME.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub acme: bool,
    /// The certificate chain, PEM (relative to the config file).
    pub cert_file: Option<PathBuf>,
    /// Its private key, PEM.
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    fn validate(&self, hosts: &[HostName], acme: Option<&AcmeConfig>) -> Result<(), Invalid> {
        let files = self.cert_file.is_some() || self.key_file.is_some();
        require(
            self.acme != files,
            "",
            "give either acme = true or cert_file and key_file",
        )?;
        require(
            !files || (self.cert_file.is_some() && self.key_file.is_some()),
            "",
            "cert_file and key_file go together",
        )?;
        if self.acme {
            require(
                acme.is_some(),
                "acme",
                "needs [proxy.acme] with the ACME directory",
            )?;
            if let Some(wildcard) = hosts.iter().find(|h| h.is_wildcard()) {
                return Err(Invalid::new(
                    "acme",
                    format!(
                        "{wildcard} needs a DNS-01 challenge, which nonstop does not answer: give it cert_file and key_file"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `[proxy.acme]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME directory URL (Let's Encrypt's, or a private ACME server's).
    pub directory: String,
    /// `mailto:` address the CA may write to about the certificates.
    pub contact: Option<String>,
    /// An extra CA the ACME server's own HTTPS certificate is checked against.
    pub ca_file: Option<PathBuf>,
    /// A certificate is renewed this many days before it expires.
    #[serde(default = "default_renew_before_days")]
    pub renew_before_days: u32,
}

fn default_renew_before_days() -> u32 {
    30
}

/// `[proxy.limits]`: the front door's limits.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeLimits {
    /// A request declaring a larger body is answered 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// A request head larger than this is answered 431 (HTTP/1.1; HTTP/2's header list).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// More header fields than this: 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// A request head must arrive within this; also how long an HTTP/1.1 connection may
    /// sit idle between requests, and how long a TLS handshake may take.
    #[serde(default = "default_header_read_timeout_secs")]
    pub header_read_timeout_secs: u64,
    /// An HTTP/2 connection is pinged after this long idle, and closed when the ping is
    /// not answered within the same time.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Open connections per listener at most (0: from the open-file limit).
    #[serde(default)]
    pub max_connections: usize,
    /// Streams one HTTP/2 connection may have open at once.
    #[serde(default = "default_h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body_bytes(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            header_read_timeout_secs: default_header_read_timeout_secs(),
            idle_timeout_secs: default_idle_timeout_secs(),
            max_connections: 0,
            h2_max_concurrent_streams: default_h2_max_concurrent_streams(),
        }
    }
}

fn default_max_body_bytes() -> u64 {
    // GitHub's largest webhook is 25 MB; uploads bigger than this want a limit of their own.
    32 * 1024 * 1024
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_header_read_timeout_secs() -> u64 {
    10
}
fn default_idle_timeout_secs() -> u64 {
    60
}
fn default_h2_max_concurrent_streams() -> u32 {
    // nginx's `http2_max_concurrent_streams`.
    128
}

/// What spans `[proxy]`, `[server]` and the apps: every name has one owner, names need a
/// listener, TLS names the TLS listener, ACME names `[proxy.acme]`.
pub(super) fn validate(
    proxy: &ProxyConfig,
    server: &ServerConfig,
    apps: &[AppConfig],
) -> Result<(), Invalid> {
    let edge = proxy.http.is_some() || proxy.https.is_some();
    let mut owners: HashMap<&HostName, String> = HashMap::new();
    let claims = std::iter::once(("server".to_owned(), &server.hosts, &server.tls)).chain(
        apps.iter()
            .map(|app| (format!("app.{}", app.name), &app.hosts, &app.tls)),
    );
    for (table, hosts, tls) in claims {
        if !hosts.is_empty() {
            require(
                edge,
                "hosts",
                "needs the shared edge: set [proxy] http or https",
            )
            .under(&table)?;
        }
        for host in hosts {
            if let Some(first) = owners.insert(host, table.clone()) {
                return Err(Invalid::new(
                    "hosts",
                    format!("{host} is claimed by both {first} and {table}"),
                ))
                .under(&table);
            }
        }
        if let Some(tls) = tls {
            require(
                proxy.https.is_some(),
                "tls",
                "needs the edge's TLS listener: set [proxy] https",
            )
            .under(&table)?;
            require(!hosts.is_empty(), "tls", "names no hosts to serve").under(&table)?;
            tls.validate(hosts, proxy.acme.as_ref())
                .under(&format!("{table}.tls"))?;
        }
    }
    for app in apps {
        if !app.hosts.is_empty() {
            require(
                matches!(app.switch, SwitchConfig::Proxy { .. }),
                "hosts",
                "the edge routes to the built-in proxy's live instance: use switch kind = \"proxy\"",
            )
            .under(&format!("app.{}", app.name))?;
        }
    }
    if let Some(name) = &proxy.default_app {
        let routed = apps
            .iter()
            .any(|app| app.name == *name && matches!(app.switch, SwitchConfig::Proxy { .. }));
        require(
            routed,
            "default_app",
            format!("`{name}` is not an app with switch kind = \"proxy\""),
        )
        .under("proxy")?;
    }
    require(
        !proxy.redirect_https || (proxy.https.is_some() && proxy.http.is_some()),
        "redirect_https",
        "needs both http and https",
    )
    .under("proxy")?;
    if let (Some(http), Some(https)) = (proxy.http, proxy.https) {
        require(
            http != https || http.port() == 0,
            "https",
            "is the same address as http",
        )
        .under("proxy")?;
    }
    require(
        proxy.limits.max_header_bytes >= 8192,
        "max_header_bytes",
        "must be at least 8192",
    )
    .under("proxy")?;
    if let Some(acme) = &proxy.acme {
        require(
            super::is_http_url(&acme.directory),
            "directory",
            "must be an absolute https:// URL",
        )
        .under("proxy.acme")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    fn app(name: &str, extra: &str) -> String {
        format!(
            "[[app]]\nname = \"{name}\"\nrepo = \"r\"\nbuild = \"true\"\nartifact = \"a\"\nrun = \"a --port {{port}}\"\n{extra}\n"
        )
    }

    fn refused(text: &str) -> String {
        match Config::parse(text, Path::new("nonstop.toml")) {
            Err(ConfigError::Invalid { key, message, .. }) => format!("{key}: {message}"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn two_owners_of_one_host_are_named_both() {
        let text = format!(
            "[proxy]\nhttp = \"127.0.0.1:0\"\n{}{}",
            app("hello", "hosts = [\"Hello.Test\"]"),
            app("world", "hosts = [\"hello.test\"]")
        );
        assert_eq!(
            refused(&text),
            "app.world.hosts: hello.test is claimed by both app.hello and app.world"
        );
        let text = format!(
            "[server]\nhosts = [\"deploy.test\"]\n[proxy]\nhttp = \"127.0.0.1:0\"\n{}",
            app("hello", "hosts = [\"deploy.test\"]")
        );
        assert_eq!(
            refused(&text),
            "app.hello.hosts: deploy.test is claimed by both server and app.hello"
        );
    }

    #[test]
    fn an_edge_app_needs_no_listener_of_its_own_and_others_keep_the_classic_one() {
        let text = format!(
            "[proxy]\nhttp = \"127.0.0.1:0\"\n{}{}",
            app("hello", "hosts = [\"hello.test\"]"),
            app("world", "")
        );
        let config = Config::parse(&text, Path::new("nonstop.toml")).unwrap();
        assert_eq!(config.apps[0].entry(), "edge hello.test");
        assert_eq!(config.apps[0].public_url(), "http://hello.test");
        assert_eq!(config.apps[1].entry(), "proxy 127.0.0.1:8080");
    }

    #[test]
    fn mistakes_of_the_edge_are_named_by_their_key() {
        let cases = [
            (
                app("hello", "hosts = [\"hello.test\"]"),
                "app.hello.hosts: needs the shared edge: set [proxy] http or https",
            ),
            (
                format!(
                    "[proxy]\nhttp = \"127.0.0.1:0\"\n{}",
                    app("hello", "hosts = [\"hello.test\"]\ntls = { acme = true }")
                ),
                "app.hello.tls: needs the edge's TLS listener: set [proxy] https",
            ),
            (
                format!(
                    "[proxy]\nhttps = \"127.0.0.1:0\"\n{}",
                    app("hello", "hosts = [\"hello.test\"]\ntls = { acme = true }")
                ),
                "app.hello.tls.acme: needs [proxy.acme] with the ACME directory",
            ),
            (
                format!(
                    "[proxy]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\n[proxy.acme]\ndirectory = \"https://acme.test/dir\"\n{}",
                    app("hello", "hosts = [\"*.hello.test\"]\ntls = { acme = true }")
                ),
                "app.hello.tls.acme: *.hello.test needs a DNS-01 challenge, which nonstop does not answer: give it cert_file and key_file",
            ),
            (
                format!(
                    "[proxy]\nhttps = \"127.0.0.1:0\"\n{}",
                    app(
                        "hello",
                        "hosts = [\"hello.test\"]\ntls = { cert_file = \"c.pem\" }"
                    )
                ),
                "app.hello.tls: cert_file and key_file go together",
            ),
            (
                format!(
                    "[proxy]\nhttp = \"127.0.0.1:0\"\nredirect_https = true\n{}",
                    app("hello", "")
                ),
                "proxy.redirect_https: needs both http and https",
            ),
            (
                format!(
                    "[proxy]\nhttp = \"127.0.0.1:0\"\ndefault_app = \"nope\"\n{}",
                    app("hello", "")
                ),
                "proxy.default_app: `nope` is not an app with switch kind = \"proxy\"",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(refused(&text), expected, "{text}");
        }
        let bad = format!(
            "[proxy]\nhttp = \"127.0.0.1:0\"\n{}",
            app("hello", "hosts = [\"hello..test\"]")
        );
        assert!(
            matches!(
                Config::parse(&bad, Path::new("nonstop.toml")),
                Err(ConfigError::Syntax { .. })
            ),
            "a bad name is refused where it is written"
        );
    }
}
