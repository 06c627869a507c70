//! One proxy worker: a thread with its own single-threaded runtime, its own listening socket
//! and everything its connections share ([`Worker`]: the live target cell, the upstream
//! pool, the failure log). This is the one place per-worker state lives, so counters that
//! are merged on read belong here too. A worker never blocks its thread and never lets a
//! connection task leave it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::LocalSet;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::admission::{Admission, Refused, Ticket};
use super::headers::{self, ClientPeer};
use super::open::{self, CountedBody, Cuts, OpenRequest};
use super::pool::{self, UPSTREAM_IDLE_SWEEP, UpstreamError, UpstreamPool};
use super::tunnel;
use super::{ProxyOptions, Target};
use crate::domain::IpRange;

/// Accept errors are mostly fd exhaustion; retrying at once would spin a core.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Once shutdown started, a kept-alive client connection that sends no request in this
/// long is closed. One that does is answered with `Connection: close` and closed after its
/// answer: closing an idle connection races with a request the client may be sending on
/// it right then (it would fail), while a client that was told to close never sends one.
const STOPPING_LINGER: Duration = Duration::from_secs(2);

/// A dead instance fails every request; one warning per worker this often says so without
/// writing a line per request.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Body of every response the proxy sends: the upstream's, streamed through, or a short
/// text the proxy wrote itself.
pub(in crate::switch) type ProxyBody = Either<CountedBody, Full<Bytes>>;

/// What one worker's connection tasks share. The shared edge keeps one per app and
/// thread, and forwards through it.
pub(in crate::switch) struct Worker {
    /// The live target: the same cell in every worker, swapped by `Proxy::switch_to`.
    live: Arc<ArcSwapOption<Target>>,
    pool: Rc<RefCell<UpstreamPool>>,
    /// This worker's streams and tunnels waiting on their upstream, for a cut to end.
    cuts: Rc<Cuts>,
    /// Its client connections and tunnels: the worker ends once all of them have.
    tasks: TaskTracker,
    trusted_proxies: Arc<[IpRange]>,
    failures: RefCell<FailureLog>,
    /// Connections closed at the limits, logged like failures: at most one line a second.
    refusals: RefCell<FailureLog>,
    stopping: Stopping,
    admission: Arc<Admission>,
    /// Built once: the settings of every client connection.
    http1: hyper::server::conn::http1::Builder,
}

/// Runs one worker on the current thread: accepts on `listener` until shutdown, then waits
/// for its connections to finish their requests.
pub(super) fn run(
    listener: std::net::TcpListener,
    live: Arc<ArcSwapOption<Target>>,
    options: Arc<ProxyOptions>,
    admission: Arc<Admission>,
    shutdown: watch::Receiver<bool>,
    cut_signal: Arc<Notify>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            warn!(error = %err, "proxy worker could not start its runtime");
            return;
        }
    };
    // Connection tasks and the pool they share never leave this thread: `Rc`, not `Arc`.
    LocalSet::new().block_on(&runtime, async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(err) => {
                warn!(error = %err, "proxy worker could not take its socket");
                return;
            }
        };
        let worker = Rc::new(Worker::new(live, &options, admission));
        tokio::task::spawn_local(sweep_idle(Rc::clone(&worker.pool)));
        tokio::task::spawn_local(open::wake_on_cut(Rc::clone(&worker.cuts), cut_signal));
        let tasks = worker.tasks.clone();
        accept_loop(listener, worker, shutdown, &tasks).await;
        // Tunnels too: after a handover the old process keeps them until they close or its
        // drain window ends (then the process exits).
        tasks.close();
        tasks.wait().await;
    });
}

impl Worker {
    pub(in crate::switch) fn new(
        live: Arc<ArcSwapOption<Target>>,
        options: &ProxyOptions,
        admission: Arc<Admission>,
    ) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .keep_alive(true)
            // Makes hyper's default 30 s header read timeout effective, so idle or slow
            // clients cannot hold a connection task forever.
            .timer(TokioTimer::new());
        Self {
            pool: Rc::new(RefCell::new(UpstreamPool::new(Arc::clone(&live)))),
            cuts: Rc::default(),
            tasks: TaskTracker::new(),
            live,
            trusted_proxies: options.trusted_proxies.clone().into(),
            failures: RefCell::new(FailureLog::default()),
            refusals: RefCell::new(FailureLog::default()),
            stopping: Stopping::default(),
            admission,
            http1,
        }
    }

    pub(in crate::switch) async fn forward(
        &self,
        client: &Rc<ClientConnection>,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        // CONNECT asks for a raw tunnel wherever the client names, past every rule here;
        // an `Upgrade` (below) is a tunnel too, but to the app and only if the app agrees.
        if req.method() == Method::CONNECT {
            return text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "nonstop: CONNECT is not supported\n",
            );
        }
        // Read once: the rest of the request uses this target whatever a switch does now.
        let Some(target) = self.live.load_full() else {
            return text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "nonstop: no live instance\n",
            );
        };
        let arrived = Instant::now();
        // Counted on its target until its answer has been sent, or its tunnel is open.
        let open = OpenRequest::new(&target);

        // Upstream connections are ours: origin-form, and HTTP/1.1 (HTTP/1.0 clients would
        // make the upstream close after every response).
        if req.uri().authority().is_some() {
            *req.uri_mut() = origin_form(req.uri());
        }
        *req.version_mut() = Version::HTTP_11;
        let upgrade = headers::prepare_request(req.headers_mut(), &client.peer, &target.host);
        if upgrade {
            // hyper offers the client's connection only for HTTP/1.1 upgrades; anything
            // else goes on as an ordinary request, never with an upgrade on a pooled one.
            if req.extensions().get::<OnUpgrade>().is_some() {
                return self.or_bad_gateway(
                    &target,
                    arrived,
                    tunnel::open(
                        &self.tasks,
                        &self.cuts,
                        &target,
                        open,
                        Rc::clone(client),
                        req,
                    )
                    .await,
                );
            }
            headers::forget_upgrade(req.headers_mut());
        }

        let response = pool::send(&self.pool, &target, req).await.map(|response| {
            let (mut parts, body) = response.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(
                parts,
                Either::Left(CountedBody::new(body, open, &self.cuts)),
            )
        });
        self.or_bad_gateway(&target, arrived, response)
    }

    /// The response, or the 502 that says the upstream request failed; either is counted
    /// for the target.
    fn or_bad_gateway(
        &self,
        target: &Target,
        arrived: Instant,
        response: Result<Response<ProxyBody>, UpstreamError>,
    ) -> Response<ProxyBody> {
        match response {
            Ok(response) => {
                target
                    .meter
                    .answered(response.status().as_u16(), arrived.elapsed());
                response
            }
            Err(err) => {
                target.meter.failed(err.failure());
                self.failures.borrow_mut().warn(target, &err);
                // The client learns what happened, not where the app listens.
                let reason = if err.is_unreachable() {
                    "nonstop: upstream unreachable\n"
                } else {
                    "nonstop: upstream failed\n"
                };
                text_response(StatusCode::BAD_GATEWAY, reason)
            }
        }
    }
}

/// Closes upstream connections that stayed idle, every [`UPSTREAM_IDLE_SWEEP`].
pub(in crate::switch) async fn sweep_idle_connections(worker: Rc<Worker>) {
    sweep_idle(Rc::clone(&worker.pool)).await;
}

/// Ends what waits on a cut target in `worker` whenever `signal` fires (a shared edge's
/// lane, woken by its app proxy's cuts).
pub(in crate::switch) async fn wake_on_cut(worker: Rc<Worker>, signal: Arc<Notify>) {
    open::wake_on_cut(Rc::clone(&worker.cuts), signal).await;
}

async fn sweep_idle(pool: Rc<RefCell<UpstreamPool>>) {
    let mut every = tokio::time::interval(UPSTREAM_IDLE_SWEEP);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        pool.borrow_mut().sweep();
    }
}

async fn accept_loop(
    listener: TcpListener,
    worker: Rc<Worker>,
    mut shutdown: watch::Receiver<bool>,
    connections: &TaskTracker,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client_addr)) => match worker.admission.admit(client_addr.ip()) {
                    Ok(ticket) => {
                        connections.spawn_local(serve_connection(
                            stream,
                            client_addr,
                            Rc::clone(&worker),
                            ticket,
                        ));
                    }
                    Err(refused) => {
                        // Closed before anything is read: the client sees a clean close.
                        drop(stream);
                        if let Some(held_back) = worker.refusals.borrow_mut().admit(Instant::now()) {
                            let limit = match refused {
                                Refused::Full => "the proxy's",
                                Refused::ClientFull => "this client's",
                            };
                            warn!(client = %client_addr.ip(), limit, earlier_refusals_not_logged = held_back, "connection closed: at the connection limit");
                        }
                    }
                },
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            () = shutdown_started(&mut shutdown) => break,
        }
    }
    worker.stopping.start();
    info!(addr = ?listener.local_addr().ok(), "proxy stopped accepting");
}

/// One client connection as its requests see it.
pub(in crate::switch) struct ClientConnection {
    peer: ClientPeer,
    /// Its place under the connection limits, given back when the last holder lets go: the
    /// connection's task, or the tunnel it became.
    _ticket: Ticket,
}

impl ClientConnection {
    pub(in crate::switch) fn new(peer: ClientPeer, ticket: Ticket) -> Self {
        Self {
            peer,
            _ticket: ticket,
        }
    }
}

/// Serves one client connection until it ends or is upgraded into a tunnel.
async fn serve_connection(
    stream: TcpStream,
    client_addr: SocketAddr,
    worker: Rc<Worker>,
    ticket: Ticket,
) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(client = %client_addr, error = %err, "could not set TCP_NODELAY");
    }
    let client = Rc::new(ClientConnection {
        peer: ClientPeer::new(client_addr.ip(), &worker.trusted_proxies),
        _ticket: ticket,
    });
    let service_worker = Rc::clone(&worker);
    let service = service_fn(move |req| {
        let (worker, client) = (Rc::clone(&service_worker), Rc::clone(&client));
        async move {
            let mut response = worker.forward(&client, req).await;
            if worker.stopping.started.get() && response.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                // hyper closes the connection once this answer is sent.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let connection = worker
        .http1
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);

    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = worker.stopping.wait() => {
            // Its next answer says `Connection: close`; if none comes, it is closed after the
            // linger (letting a request in progress finish first).
            tokio::select! {
                result = connection.as_mut() => result,
                () = tokio::time::sleep(STOPPING_LINGER) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            }
        }
    };
    if let Err(err) = result {
        debug!(client = %client_addr, error = %err, "client connection ended with an error");
    }
}

/// Resolves once `Proxy::shutdown` was called or the `Proxy` was dropped; the latter
/// shows up as a closed channel and ends serving just the same.
async fn shutdown_started(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

/// The worker's own copy of "shutdown started", for its connections. A connection polls it
/// at every wake-up (it is one branch of a `select!`), so polling must be cheap: one `Cell`
/// read here, where a `watch` receiver takes a lock and re-registers (~400 instructions a
/// request, measured with callgrind).
#[derive(Default)]
pub(in crate::switch) struct Stopping {
    started: Cell<bool>,
    next_key: Cell<u64>,
    /// The connections waiting, woken once by `start`.
    waiting: RefCell<HashMap<u64, Waker>>,
}

impl Stopping {
    pub(in crate::switch) fn start(&self) {
        self.started.set(true);
        let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
        for waker in waiting.into_values() {
            waker.wake();
        }
    }

    pub(in crate::switch) fn wait(&self) -> StoppingStarted<'_> {
        StoppingStarted {
            stopping: self,
            key: None,
        }
    }
}

pub(in crate::switch) struct StoppingStarted<'a> {
    stopping: &'a Stopping,
    key: Option<u64>,
}

impl Future for StoppingStarted<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.stopping.started.get() {
            return Poll::Ready(());
        }
        // Registered once: a task's waker stays the same for the task's life.
        if self.key.is_none() {
            let key = self.stopping.next_key.get();
            self.stopping.next_key.set(key + 1);
            self.stopping
                .waiting
                .borrow_mut()
                .insert(key, cx.waker().clone());
            self.key = Some(key);
        }
        Poll::Pending
    }
}

impl Drop for StoppingStarted<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.stopping.waiting.borrow_mut().remove(&key);
        }
    }
}

/// The upstream request target: the client's path and query, in origin form (the upstream
/// connection already says where it goes).
pub(super) fn origin_form(client_uri: &Uri) -> Uri {
    Uri::from(
        client_uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    )
}

pub(in crate::switch) fn text_response(
    status: StatusCode,
    body: &'static str,
) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Warnings about failed upstream requests, at most one per [`FAILURE_LOG_INTERVAL`]; the
/// ones held back are counted in the next.
#[derive(Default)]
pub(in crate::switch) struct FailureLog {
    last_warning: Option<Instant>,
    held_back: u64,
}

impl FailureLog {
    /// Whether a failure at `now` gets its own warning; `Some(n)`: yes, after `n` held back.
    pub(in crate::switch) fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last_warning {
            Some(last) if now.duration_since(last) < FAILURE_LOG_INTERVAL => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last_warning = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }

    fn warn(&mut self, target: &Target, err: &UpstreamError) {
        if let Some(held_back) = self.admit(Instant::now()) {
            warn!(
                upstream_port = target.port,
                unreachable = err.is_unreachable(),
                error = %err,
                earlier_failures_not_logged = held_back,
                "upstream request failed"
            );
        }
    }
}
