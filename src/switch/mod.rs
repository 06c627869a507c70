//! Traffic switch: which of an app's two ports receives the traffic, and the one call that
//! moves it. The built-in proxy (`proxy`) is the default; `nginx` rewrites an include file.
//! A switch never starts or stops app instances: it only points traffic.

pub mod activation;
pub mod control;
pub mod drain;
pub mod edge;
pub mod fleet;
pub mod nginx;
pub mod proxy;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use proxy::meter::InstanceCounts;

/// Set by the shared edge on every request it forwards to nonstop's own server (a client's
/// own value is replaced, and the proxy strips it from what it forwards to apps), so the
/// server never takes such a request for a local caller.
pub const THROUGH_EDGE: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-nonstop-edge");

/// Why a switch could not move traffic. Traffic stays where it was whenever this is returned.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("could not bind the proxy on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Points an app's public traffic at one local port.
#[async_trait]
pub trait TrafficSwitch: Send + Sync {
    /// The port traffic goes to now, if any.
    fn live(&self) -> Option<u16>;
    /// Sends every new request to `port`; requests already in flight finish where they are.
    async fn switch_to(&self, port: u16) -> Result<(), SwitchError>;
    /// `switch_to`, naming the version that runs on `port` for what the switch measures.
    async fn switch_to_version(&self, port: u16, version: &str) -> Result<(), SwitchError> {
        let _ = version;
        self.switch_to(port).await
    }
    /// What each instance answered so far, for a switch that sees every request (the
    /// built-in proxy); nothing for one that does not.
    async fn measured(&self) -> Result<Vec<InstanceCounts>, SwitchError> {
        Ok(Vec::new())
    }
    /// What is still open on each port: requests in flight (streamed responses among them)
    /// and tunnels (WebSockets). Empty when this switch cannot tell (nginx).
    async fn open_connections(&self) -> Result<Vec<OpenOn>, SwitchError> {
        Ok(Vec::new())
    }
    /// Ends what is still open on `port`, which is not live; returns how much that was.
    /// A switch that cannot tell cuts nothing.
    async fn cut(&self, port: u16) -> Result<usize, SwitchError> {
        let _ = port;
        Ok(0)
    }
}

/// Connections still open on one instance's port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOn {
    pub port: u16,
    /// Requests in flight, streamed responses (server-sent events, downloads) among them.
    pub requests: usize,
    /// Upgraded connections (WebSockets).
    pub tunnels: usize,
}

impl OpenOn {
    pub fn none(port: u16) -> Self {
        Self {
            port,
            ..Self::default()
        }
    }

    /// Everything open there: requests and tunnels.
    pub fn total(&self) -> usize {
        self.requests + self.tunnels
    }
}
