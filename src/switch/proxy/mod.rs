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
//! switch), `meter` (what each instance answered, counted per worker and added up when
//! read). Streamed responses (server-sent events) flow frame by frame; the proxy sets no
//! response timeout. It serves HTTP/1.1 only, so HTTP/2 extended `CONNECT` (RFC 8441) is
//! not in scope yet; plain `CONNECT` is refused.

mod admission;
mod headers;
pub mod meter;
mod open;
mod pool;
#[cfg(test)]
mod tests;
mod tunnel;
mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use hyper::header::HeaderValue;
use tokio::net::TcpSocket;
use tokio::sync::{Notify, watch};
use tracing::info;

pub use crate::domain::{BadIpRange, IpRange};
pub use admission::ConnectionLimits;
// What the shared edge (`switch::edge`) builds on: it routes a request to an app's live
// cell and forwards it through that app's own path.
pub(in crate::switch) use admission::{Admission, Refused};
pub(in crate::switch) use headers::ClientPeer;
pub(in crate::switch) use worker::{
    ClientConnection, FailureLog, ProxyBody, Stopping, Worker, sweep_idle_connections,
    text_response, wake_on_cut,
};

/// The live target of one app, the one cell every worker (of its own proxy and of the
/// shared edge) reads per request and `switch_to` swaps.
pub(in crate::switch) type LiveCell = Arc<ArcSwapOption<Target>>;

use super::{OpenOn, SwitchError, TrafficSwitch};

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
    /// Its requests in flight and tunnels, counted by every worker.
    open: open::OpenCounts,
    /// What this instance answers is counted here.
    meter: Arc<meter::InstanceMeter>,
}

impl Target {
    fn new(port: u16, meter: Arc<meter::InstanceMeter>) -> Result<Self, SwitchError> {
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
            open: open::OpenCounts::default(),
            meter,
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
        // nonstop's own answers are not an instance's: counted nowhere anyone reads.
        let uncounted = meter::Meters::new(1).instance(address.port(), None);
        let mut target = Self::new(address.port(), uncounted)?;
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
    /// Every target made, while anything holds it (the live cell, a request, a tunnel):
    /// where the open counts are read. Touched by switches and reads, never by a request.
    targets: Mutex<Vec<Weak<Target>>>,
    /// One per worker (the shared edge's too): a cut wakes each, to end what waits there
    /// on the cut target.
    cut_signals: Mutex<Vec<Arc<Notify>>>,
    /// What each instance answered, counted by the workers.
    meters: meter::Meters,
    /// The workers' threads, to wait for after shutdown.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// A copy of each worker's listening socket, for a handover to the next proxy process;
    /// dropped at shutdown, so no socket outlives the workers that accept on it.
    sockets: Mutex<Vec<std::net::TcpListener>>,
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
        let bind_error = |source| SwitchError::Bind {
            addr: listen,
            source,
        };
        let first = reuseport_listener(listen).map_err(bind_error)?;
        let local_addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..worker_count() {
            // Every worker binds the address the first one got (port 0 included).
            listeners.push(reuseport_listener(local_addr).map_err(bind_error)?);
        }
        Self::serve_on(listeners, live, options)
    }

    /// [`Proxy::start_with`] on listening sockets made elsewhere (one systemd passed, or
    /// those of the proxy process this one takes over from): with one socket every worker
    /// accepts on it (a dup each), with several one worker each; none binds its own, so
    /// whatever queued in their backlogs while no proxy ran is served, and nothing queues on
    /// a socket that dies with this process.
    pub async fn start_on(
        mut listeners: Vec<std::net::TcpListener>,
        live: Option<u16>,
        options: ProxyOptions,
    ) -> Result<Arc<Proxy>, SwitchError> {
        for listener in &listeners {
            listener.set_nonblocking(true)?;
        }
        if let [only] = listeners.as_slice() {
            let only = only.try_clone()?;
            for _ in 1..worker_count() {
                listeners.push(only.try_clone()?);
            }
        }
        Self::serve_on(listeners, live, options)
    }

    /// Starts a worker on each of `listeners` (the same address, all of them).
    fn serve_on(
        listeners: Vec<std::net::TcpListener>,
        live: Option<u16>,
        options: ProxyOptions,
    ) -> Result<Arc<Proxy>, SwitchError> {
        let local_addr = listeners
            .first()
            .ok_or_else(|| SwitchError::Rejected("no listening socket".into()))?
            .local_addr()?;
        let workers = listeners.len();
        let meters = meter::Meters::new(workers);
        let live = live
            .map(|port| Target::new(port, meters.instance(port, None)))
            .transpose()?
            .map(Arc::new);

        let live = Arc::new(ArcSwapOption::new(live));
        let admission =
            admission::Admission::new(options.limits, options.trusted_proxies.clone().into());
        let options = Arc::new(options);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut cut_signals = Vec::new();
        let mut threads = Vec::new();
        let sockets = listeners
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        for (index, listener) in listeners.into_iter().enumerate() {
            let cut_signal = Arc::new(Notify::new());
            cut_signals.push(Arc::clone(&cut_signal));
            let (live, options, admission, shutdown_rx) = (
                Arc::clone(&live),
                Arc::clone(&options),
                Arc::clone(&admission),
                shutdown_rx.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("proxy-{}-{index}", local_addr.port()))
                    .spawn(move || {
                        meter::become_worker(index);
                        worker::run(listener, live, options, admission, shutdown_rx, cut_signal)
                    })?,
            );
        }
        let targets = Mutex::new(
            live.load()
                .as_ref()
                .map(Arc::downgrade)
                .into_iter()
                .collect(),
        );
        info!(addr = %local_addr, workers, live = ?live.load().as_ref().map(|t| t.port), "proxy listening");

        Ok(Arc::new(Proxy {
            live,
            local_addr: Some(local_addr),
            shutdown,
            targets,
            cut_signals: Mutex::new(cut_signals),
            meters,
            threads: Mutex::new(threads),
            sockets: Mutex::new(sockets),
        }))
    }

    /// A proxy with no listener of its own: an app the shared edge alone routes to. It
    /// switches exactly like a listening one; the edge reads its cell.
    pub fn unbound(live: Option<u16>) -> Result<Arc<Proxy>, SwitchError> {
        // The edge's workers are no worker of this proxy: what they forward is not counted
        // here yet (see `meter`).
        let meters = meter::Meters::new(1);
        let live = live
            .map(|port| Target::new(port, meters.instance(port, None)))
            .transpose()?
            .map(Arc::new);
        let (shutdown, _) = watch::channel(false);
        let targets = Mutex::new(live.as_ref().map(Arc::downgrade).into_iter().collect());
        Ok(Arc::new(Proxy {
            live: Arc::new(ArcSwapOption::new(live)),
            local_addr: None,
            shutdown,
            targets,
            cut_signals: Mutex::new(Vec::new()),
            meters,
            threads: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
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

    /// A cut signal for one more worker (one of the shared edge's), woken by every cut.
    pub(in crate::switch) fn cut_signal(&self) -> Arc<Notify> {
        let signal = Arc::new(Notify::new());
        self.cut_signals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Arc::clone(&signal));
        signal
    }

    /// Switches to `port`, counting what it answers as `version`'s.
    pub fn switch_with_version(&self, port: u16, version: Option<&str>) -> Result<(), SwitchError> {
        let target = Arc::new(Target::new(port, self.meters.instance(port, version))?);
        self.targets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Arc::downgrade(&target));
        // The whole switch: one atomic store. Requests that already loaded the old target
        // keep their `Arc` to it and finish there; the workers' pools drop what they kept
        // for it at their next request or sweep.
        let previous = self.live.swap(Some(target));
        info!(from = ?previous.map(|t| t.port), to = port, version, "traffic switched");
        Ok(())
    }

    /// What each instance this proxy pointed at answered so far (the newest few).
    pub fn readings(&self) -> Vec<meter::InstanceCounts> {
        self.meters.read()
    }

    /// Stops accepting; open connections finish their current request (graceful) and are
    /// then closed. Returns at once, without waiting for them.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
        self.sockets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    /// The listening sockets (one per worker), for the process that takes over from this
    /// one; empty once shutdown started.
    pub fn listening_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.sockets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(AsRawFd::as_raw_fd)
            .collect()
    }

    /// After [`Proxy::shutdown`]: waits until every worker has finished its connections and
    /// tunnels, at most `timeout`. Whether they all did.
    pub async fn stopped(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let finished = self
                .threads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
                .all(std::thread::JoinHandle::is_finished);
            if finished {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The targets still held by anything, the live one first if any.
    fn targets(&self) -> Vec<Arc<Target>> {
        let mut targets = self
            .targets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        targets.retain(|target| target.strong_count() > 0);
        targets.iter().filter_map(Weak::upgrade).collect()
    }

    /// What is open on each port: the live one (even with nothing open), then any other
    /// with requests or tunnels still on it.
    pub fn open_connections(&self) -> Vec<OpenOn> {
        let mut by_port: Vec<OpenOn> = self.live().map(OpenOn::none).into_iter().collect();
        for target in self.targets() {
            let (requests, tunnels) = (target.open.requests(), target.open.tunnels());
            match by_port.iter_mut().find(|open| open.port == target.port) {
                Some(open) => {
                    open.requests += requests;
                    open.tunnels += tunnels;
                }
                None if requests + tunnels > 0 => by_port.push(OpenOn {
                    port: target.port,
                    requests,
                    tunnels,
                }),
                None => {}
            }
        }
        by_port
    }

    /// Ends what is still open on `port`: its tunnels close and its streamed responses end
    /// where they are. Refused for the live port (its new requests would be cut too).
    /// Returns how many requests and tunnels were open there when the cut came.
    pub fn cut(&self, port: u16) -> Result<usize, SwitchError> {
        if self.live() == Some(port) {
            return Err(SwitchError::Rejected(format!(
                "port {port} is live: its connections are not cut"
            )));
        }
        let cut: usize = self
            .targets()
            .iter()
            .filter(|target| target.port == port)
            .map(|target| target.open.cut())
            .sum();
        let signals = self
            .cut_signals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for signal in signals.iter() {
            signal.notify_one();
        }
        info!(port, cut, "cut what was still open");
        Ok(cut)
    }
}

/// One worker per core.
fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
        self.switch_with_version(port, None)
    }

    async fn switch_to_version(&self, port: u16, version: &str) -> Result<(), SwitchError> {
        self.switch_with_version(port, Some(version))
    }

    async fn measured(&self) -> Result<Vec<meter::InstanceCounts>, SwitchError> {
        Ok(self.readings())
    }

    async fn open_connections(&self) -> Result<Vec<OpenOn>, SwitchError> {
        Ok(Proxy::open_connections(self))
    }

    async fn cut(&self, port: u16) -> Result<usize, SwitchError> {
        Proxy::cut(self, port)
    }
}
