//! Traffic switch: which of an app's two ports receives the traffic, and the one call that
//! moves it. The built-in proxy (`proxy`) is the default; `nginx` rewrites an include file.
//! A switch never starts or stops app instances: it only points traffic.

pub mod control;
pub mod edge;
pub mod fleet;
pub mod nginx;
pub mod proxy;

use async_trait::async_trait;

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
}
