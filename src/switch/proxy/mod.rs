//! The built-in reverse proxy of one app: it listens on the app's public address and forwards
//! every request to the live instance on `127.0.0.1:<port>`. A switch is a single atomic
//! store of the live [`Target`]; each request reads the target once when it arrives and
//! finishes on that instance, so a release never drops or splits a request. The proxy must
//! never buffer whole bodies, never retry a request the upstream may already have seen, and
//! never start, stop or health-check instances: it only points traffic.
//!
//! Its parts: `worker` (a thread per core: accept, serve a client connection, forward a
//! request), `pool` (a worker's upstream connections by target), `headers` (the rewrite
//! between client and app, and who is trusted to say who the client is), `tunnel`
//! (WebSocket and every other HTTP/1.1 `Upgrade`: after the app's `101`, the client's
//! connection and a new upstream one are spliced, on the instance they opened on, past any
//! switch). Streamed responses (server-sent events) flow frame by frame; the proxy sets no
//! response timeout. It serves HTTP/1.1 only, so HTTP/2 extended `CONNECT` (RFC 8441) is
//! not in scope yet; plain `CONNECT` is refused.

mod admission;
mod headers;
mod pool;
#[cfg(test)]
mod tests;
mod tunnel;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use hyper::header::HeaderValue;
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tracing::info;

pub use crate::domain::{BadIpRange, IpRange};
pub use admission::ConnectionLimits;
// What the shared edge (`switch::edge`) builds on: it routes a request to an app's live
// cell and forwards it through that app's own path.
pub(in crate::switch) use admission::{Admission, Refused};
pub(in crate::switch) use headers::ClientPeer;
pub(in crate::switch) use worker::{
    ClientConnection, FailureLog, ProxyBody, Stopping, Worker, sweep_idle_connections,
    text_response,
};

/// The live target of one app, the one cell every worker (of its own proxy and of the
/// shared edge) reads per request and `switch_to` swaps.
pub(in crate::switch) type LiveCell = Arc<ArcSwapOption<Target>>;

use super::{SwitchError, TrafficSwitch};

/// How the proxy treats its clients; the default trusts nobody.
#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    /// Peers (another proxy or load balancer in front of this one) whose `X-Forwarded-*`,
    /// `X-Real-IP` and `Forwarded` headers are kept and extended. From anyone else those
    /// headers are replaced with what the proxy itself saw.
    pub trusted_proxies: Vec<IpRange>,
    /// How many connections the proxy holds open, in all and per client.
    pub limits: ConnectionLimits,
}

/// One upstream: an app instance listening on `127.0.0.1:<port>`. Each switch makes a new
/// one, so connections pooled for an earlier target are never taken for it, even when the
/// port is the same (the instance there may have been restarted since).
#[derive(Debug)]
pub struct Target {
    port: u16,
    address: SocketAddr,
    /// `Host` for clients that sent none (HTTP/1.0), pre-built so no request formats it.
    host: HeaderValue,
}

impl Target {
    pub fn new(port: u16) -> Result<Self, SwitchError> {
        if port == 0 {
            return Err(SwitchError::Rejected(
                "port 0 is not an instance's port".to_string(),
            ));
        }
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let host = HeaderValue::from_str(&address.to_string())
            .map_err(|err| SwitchError::Rejected(format!("bad upstream port {port}: {err}")))?;
        Ok(Self {
            port,
            address,
            host,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// An upstream at `address` (an unspecified IP means this host): nonstop's own server
    /// behind the shared edge.
    pub(in crate::switch) fn at(mut address: SocketAddr) -> Result<Self, SwitchError> {
        if address.ip().is_unspecified() {
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let mut target = Self::new(address.port())?;
        target.address = address;
        target.host = HeaderValue::from_str(&address.to_string())
            .map_err(|err| SwitchError::Rejected(format!("bad upstream {address}: {err}")))?;
        Ok(target)
    }
}

/// The reverse proxy of one app. Dropping the last handle stops accepting, like
/// [`Proxy::shutdown`].
///
/// It runs one worker thread per core, each with its own single-threaded runtime, its own
/// listening socket on the same address (`SO_REUSEPORT`: the kernel spreads connections)
/// and its own upstream pool, like nginx's worker processes. A request and its upstream
/// connection then never change threads, nothing they share needs a lock, and the proxy
/// never waits behind the server's own work.
pub struct Proxy {
    live: LiveCell,
    /// `None`: no listener of its own, reached only through the shared edge.
    local_addr: Option<SocketAddr>,
    /// `true` once shutdown started; dropping the sender means the same to the workers.
    shutdown: watch::Sender<bool>,
}

impl Proxy {
    /// Binds `listen` and starts serving on worker threads of its own, trusting no client's
    /// forwarding headers. `live` is the initial upstream port (`None` = answer 503 until
    /// switched).
    pub async fn start(listen: SocketAddr, live: Option<u16>) -> Result<Arc<Proxy>, SwitchError> {
        Self::start_with(listen, live, ProxyOptions::default()).await
    }

    /// [`Proxy::start`] with options.
    pub async fn start_with(
        listen: SocketAddr,
        live: Option<u16>,
        options: ProxyOptions,
    ) -> Result<Arc<Proxy>, SwitchError> {
        let live = live.map(Target::new).transpose()?.map(Arc::new);
        let bind_error = |source| SwitchError::Bind {
            addr: listen,
            source,
        };
        let first = reuseport_listener(listen).map_err(bind_error)?;
        let local_addr = first.local_addr()?;
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut listeners = vec![first];
        for _ in 1..workers {
            // Every worker binds the address the first one got (port 0 included).
            listeners.push(reuseport_listener(local_addr).map_err(bind_error)?);
        }

        let live = Arc::new(ArcSwapOption::new(live));
        let admission =
            admission::Admission::new(options.limits, options.trusted_proxies.clone().into());
        let options = Arc::new(options);
        let (shutdown, shutdown_rx) = watch::channel(false);
        for (index, listener) in listeners.into_iter().enumerate() {
            let (live, options, admission, shutdown_rx) = (
                Arc::clone(&live),
                Arc::clone(&options),
                Arc::clone(&admission),
                shutdown_rx.clone(),
            );
            std::thread::Builder::new()
                .name(format!("proxy-{}-{index}", local_addr.port()))
                .spawn(move || worker::run(listener, live, options, admission, shutdown_rx))?;
        }
        info!(addr = %local_addr, workers, live = ?live.load().as_ref().map(|t| t.port), "proxy listening");

        Ok(Arc::new(Proxy {
            live,
            local_addr: Some(local_addr),
            shutdown,
        }))
    }

    /// A proxy with no listener of its own: an app the shared edge alone routes to. It
    /// switches exactly like a listening one; the edge reads its cell.
    pub fn unbound(live: Option<u16>) -> Result<Arc<Proxy>, SwitchError> {
        let live = live.map(Target::new).transpose()?.map(Arc::new);
        let (shutdown, _) = watch::channel(false);
        Ok(Arc::new(Proxy {
            live: Arc::new(ArcSwapOption::new(live)),
            local_addr: None,
            shutdown,
        }))
    }

    /// The address of its own listener (`0.0.0.0:0` for an [`unbound`](Self::unbound) one).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The live cell, for the shared edge.
    pub(in crate::switch) fn live_cell(&self) -> LiveCell {
        Arc::clone(&self.live)
    }

    /// Stops accepting; open connections finish their current request (graceful) and are
    /// then closed. Returns at once, without waiting for them.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

/// A listening socket that other sockets may bind too, handed over as a std socket so a
/// worker's own runtime can take it.
pub(in crate::switch) fn reuseport_listener(
    addr: SocketAddr,
) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    // The backlog nginx uses on Linux.
    socket.listen(511)?.into_std()
}

#[async_trait]
impl TrafficSwitch for Proxy {
    fn live(&self) -> Option<u16> {
        self.live.load().as_ref().map(|target| target.port)
    }

    async fn switch_to(&self, port: u16) -> Result<(), SwitchError> {
        let target = Arc::new(Target::new(port)?);
        // The whole switch: one atomic store. Requests that already loaded the old target
        // keep their `Arc` to it and finish there; the workers' pools drop what they kept
        // for it at their next request or sweep.
        let previous = self.live.swap(Some(target));
        info!(from = ?previous.map(|t| t.port), to = port, "traffic switched");
        Ok(())
    }
}
