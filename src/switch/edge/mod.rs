//! The shared edge: one plain-HTTP and one TLS listener for every app that names `hosts`,
//! and for nonstop's own server (`server.hosts`). It picks the site by `Host` (HTTP/1.1)
//! or `:authority` (HTTP/2), then forwards through that app's own proxy path — the same
//! live cell `switch_to` swaps, the same upstream pool and header rewrite — so a switch
//! holds for routed traffic exactly as for an app's own listener. It terminates TLS
//! (rustls; the certificate by SNI, `tls`), serves HTTP/2 and HTTP/1.1 to clients while
//! the upstream stays HTTP/1.1 keep-alive, answers ACME's HTTP-01 challenges (`acme`) and
//! applies the front door's limits.
//!
//! It must never route a host to another site than the one that claims it, never name
//! anything internal to a client (an unknown host gets a short 404), and never let a
//! request through it pass for a caller on this host: requests to nonstop's own server
//! carry [`THROUGH_EDGE`], which no client can remove or set for the edge.
//!
//! It runs where the built-in proxies run: inside `serve`, or in `nonstop proxy`.

pub mod acme;
mod routes;
pub mod tls;
mod worker;
mod x509;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::header::HeaderValue;
use tokio::sync::watch;
use tracing::info;

pub use routes::Routes;
pub use tls::{CertSpec, CertStatus, Certificates};

use super::SwitchError;
use super::proxy::{Admission, ConnectionLimits, LiveCell, Proxy, ProxyOptions, Target};
use crate::config::{Config, EdgeLimits, HostName, TlsConfig};
use crate::domain::AppName;

pub use super::THROUGH_EDGE;

/// Where ACME's HTTP-01 challenges are answered.
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// How often the certificate files are looked at for a change.
const CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// One site behind the edge: an app, or nonstop's own server.
struct Site {
    live: LiveCell,
    /// The app's proxy, whose cuts must reach this site's lanes too (`None`: nonstop's own
    /// server, never cut).
    proxy: Option<Arc<Proxy>>,
    /// nonstop's own router: its requests carry [`THROUGH_EDGE`].
    own_server: bool,
}

/// The HTTP-01 answers ACME is waiting for: token → key authorization.
#[derive(Clone, Default)]
pub struct Challenges(Arc<RwLock<HashMap<String, String>>>);

impl Challenges {
    pub fn answer(&self, token: &str) -> Option<String> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.get(token).cloned()
    }

    pub fn publish(&self, token: String, key_authorization: String) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.insert(token, key_authorization);
    }

    pub fn withdraw(&self, token: &str) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.remove(token);
    }
}

/// What every worker of the edge shares.
struct Shared {
    sites: Vec<Site>,
    routes: Routes,
    limits: EdgeLimits,
    redirect_https: bool,
    /// The TLS listener's port, for redirects (omitted when 443).
    https_port: Option<u16>,
    hsts: Option<HeaderValue>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    challenges: Challenges,
    options: ProxyOptions,
    http_admission: Arc<Admission>,
    https_admission: Arc<Admission>,
}

/// The running edge. Dropping it, like [`Edge::shutdown`], stops accepting.
pub struct Edge {
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    certificates: Option<Arc<Certificates>>,
    challenges: Challenges,
    shutdown: watch::Sender<bool>,
}

impl Edge {
    /// Starts the edge `config` asks for (`None` when `[proxy]` has neither `http` nor
    /// `https`). `proxies` are the apps' built-in proxies by name, `own_server` where
    /// nonstop's own router listens.
    pub async fn from_config(
        config: &Config,
        proxies: &[(AppName, Arc<Proxy>)],
        own_server: Option<SocketAddr>,
        options: &ProxyOptions,
    ) -> Result<Option<Arc<Edge>>, SwitchError> {
        let proxy = &config.proxy;
        if proxy.http.is_none() && proxy.https.is_none() {
            return Ok(None);
        }
        let mut sites = Vec::new();
        let mut names: Vec<&[HostName]> = Vec::new();
        let mut specs = Vec::new();
        let mut default_site = None;
        let mut acme_sites = Vec::new();
        let data_dir = config.data_dir();
        if !config.server.hosts.is_empty() {
            let address = own_server.ok_or_else(|| {
                SwitchError::Rejected(
                    "server.hosts: the edge needs server.listen's port (not 0) to reach the server"
                        .into(),
                )
            })?;
            let target = Arc::new(Target::at(address)?);
            sites.push(Site {
                live: Arc::new(arc_swap::ArcSwapOption::new(Some(target))),
                proxy: None,
                own_server: true,
            });
            names.push(&config.server.hosts);
            if let Some(tls) = &config.server.tls {
                if tls.acme {
                    acme_sites.push(acme::AcmeSite {
                        owner: "server".into(),
                        names: config.server.hosts.iter().map(|h| h.to_string()).collect(),
                    });
                }
                specs.push(cert_spec(
                    "server",
                    &config.server.hosts,
                    tls,
                    &config.base_dir,
                    &data_dir,
                ));
            }
        }
        for app in &config.apps {
            let is_default = proxy.default_app.as_ref() == Some(&app.name);
            if app.hosts.is_empty() && !is_default {
                continue;
            }
            let Some((_, routed)) = proxies.iter().find(|(name, _)| *name == app.name) else {
                continue;
            };
            if is_default {
                default_site = Some(sites.len());
            }
            sites.push(Site {
                live: routed.live_cell(),
                proxy: Some(Arc::clone(routed)),
                own_server: false,
            });
            names.push(&app.hosts);
            if let Some(tls) = &app.tls {
                let owner = format!("app.{}", app.name);
                if tls.acme {
                    acme_sites.push(acme::AcmeSite {
                        owner: owner.clone(),
                        names: app.hosts.iter().map(|h| h.to_string()).collect(),
                    });
                }
                specs.push(cert_spec(
                    &owner,
                    &app.hosts,
                    tls,
                    &config.base_dir,
                    &data_dir,
                ));
            }
        }
        let routes = Routes::new(names, default_site);
        let default_owner = proxy.default_app.as_ref().map(|app| format!("app.{app}"));
        let certificates = proxy
            .https
            .map(|_| Certificates::load(specs, default_owner));
        let tls = match &certificates {
            Some(certificates) => Some(tokio_rustls::TlsAcceptor::from(
                certificates
                    .server_config()
                    .map_err(|err| SwitchError::Rejected(format!("TLS settings: {err}")))?,
            )),
            None => None,
        };
        let limits = match proxy.limits.max_connections {
            0 => options.limits,
            max => ConnectionLimits {
                max_connections: max,
                max_per_client: (max / 8).max(16).min(max),
            },
        };
        let trusted: Arc<[crate::domain::IpRange]> = options.trusted_proxies.clone().into();
        let shared = Shared {
            sites,
            routes,
            limits: proxy.limits,
            redirect_https: proxy.redirect_https,
            https_port: None,
            hsts: proxy
                .hsts_max_age_secs
                .and_then(|age| HeaderValue::from_str(&format!("max-age={age}")).ok()),
            tls,
            challenges: Challenges::default(),
            options: options.clone(),
            http_admission: Admission::new(limits, trusted.clone()),
            https_admission: Admission::new(limits, trusted),
        };
        let edge = Self::start(shared, proxy.http, proxy.https, certificates, &data_dir).await?;
        if let (Some(acme), Some(certificates)) = (&proxy.acme, &edge.certificates)
            && !acme_sites.is_empty()
        {
            // HTTP-01 wherever there is a plain listener (it works behind any TLS setup);
            // TLS-ALPN-01 on the TLS listener otherwise.
            let proof = match proxy.http {
                Some(_) => acme::Proof::Http01,
                None => acme::Proof::TlsAlpn01,
            };
            tokio::spawn(acme::keep(
                acme.clone(),
                proof,
                config.base_dir.clone(),
                data_dir,
                acme_sites,
                Arc::clone(certificates),
                edge.challenges.clone(),
                edge.shutdown.subscribe(),
            ));
        }
        Ok(Some(edge))
    }

    async fn start(
        mut shared: Shared,
        http: Option<SocketAddr>,
        https: Option<SocketAddr>,
        certificates: Option<Arc<Certificates>>,
        data_dir: &Path,
    ) -> Result<Arc<Edge>, SwitchError> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let http = bind_all(http, workers)?;
        let https = bind_all(https, workers)?;
        let http_addr = http.first().map(|l| l.local_addr()).transpose()?;
        let https_addr = https.first().map(|l| l.local_addr()).transpose()?;
        shared.https_port = https_addr.map(|a| a.port());
        let challenges = shared.challenges.clone();
        let shared = Arc::new(shared);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut http = http.into_iter();
        let mut https = https.into_iter();
        for index in 0..workers {
            let listeners = worker::Listeners {
                http: http.next(),
                https: https.next(),
            };
            let (shared, shutdown_rx) = (Arc::clone(&shared), shutdown_rx.clone());
            std::thread::Builder::new()
                .name(format!("edge-{index}"))
                .spawn(move || worker::run(listeners, shared, shutdown_rx))?;
        }
        if let Some(certificates) = &certificates {
            save_status(certificates, data_dir);
            tokio::spawn(reload_certificates(
                Arc::clone(certificates),
                data_dir.to_owned(),
                shutdown_rx.clone(),
            ));
        }
        info!(http = ?http_addr, https = ?https_addr, workers, "edge listening");
        Ok(Arc::new(Edge {
            http: http_addr,
            https: https_addr,
            certificates,
            challenges,
            shutdown,
        }))
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https
    }

    /// The certificates the TLS listener serves (`None` without one).
    pub fn certificates(&self) -> Option<&Arc<Certificates>> {
        self.certificates.as_ref()
    }

    /// Where ACME publishes its HTTP-01 answers for the plain listener.
    pub fn challenges(&self) -> &Challenges {
        &self.challenges
    }

    /// Stops accepting; open connections finish their current request.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

/// The certificate files of one site: the operator's (relative to the config file), or
/// the ones ACME keeps for it under `data_dir`.
fn cert_spec(
    owner: &str,
    hosts: &[HostName],
    tls: &TlsConfig,
    base_dir: &Path,
    data_dir: &Path,
) -> CertSpec {
    let (cert_file, key_file) = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) if !tls.acme => (base_dir.join(cert), base_dir.join(key)),
        _ => acme::cert_files(data_dir, owner),
    };
    CertSpec {
        owner: owner.to_owned(),
        names: hosts.to_vec(),
        cert_file,
        key_file,
        acme: tls.acme,
    }
}

/// One `SO_REUSEPORT` socket per worker on `addr` (the first one's port for port 0).
fn bind_all(
    addr: Option<SocketAddr>,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, SwitchError> {
    let Some(addr) = addr else {
        return Ok(Vec::new());
    };
    let bind_error = |source| SwitchError::Bind { addr, source };
    let first = super::proxy::reuseport_listener(addr).map_err(bind_error)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..workers {
        all.push(super::proxy::reuseport_listener(bound).map_err(bind_error)?);
    }
    Ok(all)
}

/// Where the edge keeps what it knows about its certificates, for the API (which may run in
/// another process than the edge).
pub fn status_file(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("edge-certificates.json")
}

/// Writes every certificate's state to [`status_file`] (whole, temp + rename).
fn save_status(certificates: &Certificates, data_dir: &Path) {
    let path = status_file(data_dir);
    let temp = path.with_extension("tmp");
    let text = serde_json::to_vec(&certificates.status()).unwrap_or_default();
    let saved = std::fs::write(&temp, text).and_then(|()| std::fs::rename(&temp, &path));
    if let Err(err) = saved {
        tracing::warn!(path = %path.display(), error = %err, "could not save the certificates' state");
    }
}

async fn reload_certificates(
    certificates: Arc<Certificates>,
    data_dir: std::path::PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(CERT_RELOAD_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
        let (certificates, data_dir) = (Arc::clone(&certificates), data_dir.clone());
        // Reading files blocks; a slow disk must not hold up the runtime.
        let _ = tokio::task::spawn_blocking(move || {
            if certificates.reload() {
                save_status(&certificates, &data_dir);
            }
        })
        .await;
    }
}
