//! One edge worker: a thread with its own single-threaded runtime, its own sockets on the
//! edge's listeners, and one proxy [`Worker`] per site (its upstream pool and tunnels), so a
//! routed request takes exactly the path of an app's own listener. Each connection is
//! served HTTP/1.1 or HTTP/2 (by ALPN on TLS, by the preface on plain); a request is routed
//! by its host, checked against the limits, and forwarded. Like the proxy's workers it
//! never blocks its thread and never lets a connection task leave it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::LocalSet;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::super::proxy::{
    Admission, ClientConnection, ClientPeer, FailureLog, ProxyBody, Refused, Stopping, Worker,
    sweep_idle_connections, text_response, wake_on_cut,
};
use super::{ACME_CHALLENGE_PREFIX, Shared, THROUGH_EDGE};

/// Accept errors are mostly fd exhaustion; retrying at once would spin a core.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

const EDGE_MARK: HeaderValue = HeaderValue::from_static("1");

/// What a host nobody claims is told: nothing about what runs here.
const NOT_FOUND: &str = "404 not found\n";

/// This worker's sockets.
pub(super) struct Listeners {
    pub(super) http: Option<std::net::TcpListener>,
    pub(super) https: Option<std::net::TcpListener>,
}

/// Runs hyper's HTTP/2 stream tasks on this worker's thread: they hold the worker's `Rc`s.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
    F::Output: 'static,
{
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}

/// What this worker's connections share.
struct Local {
    shared: Arc<Shared>,
    /// `sites[i]`'s forwarding path on this thread.
    lanes: Vec<Rc<Worker>>,
    connections: auto::Builder<LocalExec>,
    stopping: Stopping,
    refusals: std::cell::RefCell<FailureLog>,
}

pub(super) fn run(listeners: Listeners, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            warn!(error = %err, "edge worker could not start its runtime");
            return;
        }
    };
    LocalSet::new().block_on(&runtime, async move {
        let local = Rc::new(Local::new(shared));
        for (lane, site) in local.lanes.iter().zip(&local.shared.sites) {
            tokio::task::spawn_local(sweep_idle_connections(Rc::clone(lane)));
            if let Some(proxy) = &site.proxy {
                tokio::task::spawn_local(wake_on_cut(Rc::clone(lane), proxy.cut_signal()));
            }
        }
        let connections = TaskTracker::new();
        let mut accepting = Vec::new();
        for (listener, tls) in [(listeners.http, false), (listeners.https, true)] {
            let Some(listener) = listener else { continue };
            match TcpListener::from_std(listener) {
                Ok(listener) => accepting.push(tokio::task::spawn_local(accept_loop(
                    listener,
                    tls,
                    Rc::clone(&local),
                    shutdown.clone(),
                    connections.clone(),
                ))),
                Err(err) => warn!(error = %err, "edge worker could not take its socket"),
            }
        }
        for accept in accepting {
            let _ = accept.await;
        }
        local.stopping.start();
        connections.close();
        connections.wait().await;
    });
}

impl Local {
    fn new(shared: Arc<Shared>) -> Self {
        let lanes = shared
            .sites
            .iter()
            .map(|site| {
                Rc::new(Worker::new(
                    Arc::clone(&site.live),
                    &shared.options,
                    Arc::clone(&shared.http_admission),
                ))
            })
            .collect();
        let limits = shared.limits;
        let header_read = Duration::from_secs(limits.header_read_timeout_secs);
        let idle = Duration::from_secs(limits.idle_timeout_secs);
        let mut connections = auto::Builder::new(LocalExec);
        connections
            .http1()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(header_read)
            .max_buf_size(limits.max_header_bytes)
            .max_headers(limits.max_headers);
        connections
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(idle)
            .keep_alive_timeout(idle);
        Self {
            shared,
            lanes,
            connections,
            stopping: Stopping::default(),
            refusals: std::cell::RefCell::new(FailureLog::default()),
        }
    }

    /// A refused body up to this size is read and dropped before the 413 goes out: an HTTP/2
    /// client whose stream is reset while it still writes (curl, for one) reports a framing
    /// error instead of the answer. A larger one is answered at once.
    const DISCARD_BYTES: u64 = 64 * 1024;

    /// Reads `body` to its end and drops it, for at most a few seconds.
    async fn discard(mut body: Incoming) {
        use http_body_util::BodyExt;
        let reading = async { while let Some(Ok(_)) = body.frame().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), reading).await;
    }

    /// One request: the ACME challenge, the route, the limits, then the site's own path.
    async fn handle(
        &self,
        client: &Rc<ClientConnection>,
        tls: bool,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let shared = &*self.shared;
        if !tls
            && let Some(token) = req.uri().path().strip_prefix(ACME_CHALLENGE_PREFIX)
            && let Some(answer) = shared.challenges.answer(token)
        {
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(answer))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return response;
        }
        let host = request_host(&req);
        let Some(site) = host.and_then(|host| shared.routes.route(host)) else {
            return text_response(StatusCode::NOT_FOUND, NOT_FOUND);
        };
        if !tls && shared.redirect_https {
            return self.to_https(&req);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = declared.filter(|length| *length > shared.limits.max_body_bytes) {
            if length <= Self::DISCARD_BYTES {
                Self::discard(req.into_body()).await;
            }
            return text_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "413 request body too large\n",
            );
        }
        // HTTP/2 names the host in `:authority`; the app reads `Host`, as over HTTP/1.1.
        if !req.headers().contains_key(header::HOST)
            && let Some(authority) = req.uri().authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, value);
        }
        if shared.sites[site].own_server {
            req.headers_mut().insert(THROUGH_EDGE, EDGE_MARK);
        }
        let mut response = self.lanes[site].forward(client, req).await;
        if tls
            && let Some(hsts) = &shared.hsts
            && !response
                .headers()
                .contains_key(header::STRICT_TRANSPORT_SECURITY)
        {
            response
                .headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        response
    }

    /// 308 to the same host and path on the TLS listener.
    fn to_https(&self, req: &Request<Incoming>) -> Response<ProxyBody> {
        let host = request_host(req).unwrap_or_default();
        let name = match host.rsplit_once(':') {
            Some((name, port))
                if !host.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name
            }
            _ => host,
        };
        let port = match self.shared.https_port {
            Some(443) | None => String::new(),
            Some(port) => format!(":{port}"),
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{name}{port}{path}");
        match HeaderValue::from_str(&location) {
            Ok(location) => {
                let mut response = text_response(StatusCode::PERMANENT_REDIRECT, "");
                response.headers_mut().insert(header::LOCATION, location);
                response
            }
            Err(_) => text_response(StatusCode::BAD_REQUEST, "400 bad host\n"),
        }
    }
}

/// The host a request names: `Host`, else the URI's authority (HTTP/2, absolute form).
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    match req.headers().get(header::HOST) {
        Some(host) => host.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

fn admission(local: &Local, tls: bool) -> &Arc<Admission> {
    if tls {
        &local.shared.https_admission
    } else {
        &local.shared.http_admission
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: bool,
    local: Rc<Local>,
    mut shutdown: watch::Receiver<bool>,
    connections: TaskTracker,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client_addr)) => match admission(&local, tls).admit(client_addr.ip()) {
                    Ok(ticket) => {
                        let peer = ClientPeer::with_scheme(client_addr.ip(), &local.shared.options.trusted_proxies, tls);
                        let client = Rc::new(ClientConnection::new(peer, ticket));
                        connections.spawn_local(serve_connection(stream, client_addr, tls, Rc::clone(&local), client));
                    }
                    Err(refused) => {
                        drop(stream);
                        if let Some(held_back) = local.refusals.borrow_mut().admit(Instant::now()) {
                            let limit = match refused {
                                Refused::Full => "the edge's",
                                Refused::ClientFull => "this client's",
                            };
                            warn!(client = %client_addr.ip(), limit, earlier_refusals_not_logged = held_back, "connection closed: at the connection limit");
                        }
                    }
                },
                Err(err) => {
                    warn!(error = %err, "edge accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            _ = shutdown.wait_for(|stopping| *stopping) => break,
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    client_addr: SocketAddr,
    tls: bool,
    local: Rc<Local>,
    client: Rc<ClientConnection>,
) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(client = %client_addr, error = %err, "could not set TCP_NODELAY");
    }
    match (&local.shared.tls, tls) {
        (Some(acceptor), true) => {
            let handshake_time = Duration::from_secs(local.shared.limits.header_read_timeout_secs);
            match tokio::time::timeout(handshake_time, acceptor.accept(stream)).await {
                // A TLS-ALPN-01 validation ends with its handshake (RFC 8737 §3).
                Ok(Ok(stream))
                    if stream.get_ref().1.alpn_protocol() == Some(super::tls::ACME_TLS_ALPN) => {}
                Ok(Ok(stream)) => serve_http(stream, client_addr, tls, local, client).await,
                Ok(Err(err)) => debug!(client = %client_addr, error = %err, "TLS handshake failed"),
                Err(_) => debug!(client = %client_addr, "TLS handshake timed out"),
            }
        }
        _ => serve_http(stream, client_addr, tls, local, client).await,
    }
}

async fn serve_http<I>(
    io: I,
    client_addr: SocketAddr,
    tls: bool,
    local: Rc<Local>,
    client: Rc<ClientConnection>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_local = Rc::clone(&local);
    let service = service_fn(move |req| {
        let (local, client) = (Rc::clone(&service_local), Rc::clone(&client));
        async move { Ok::<_, Infallible>(local.handle(&client, tls, req).await) }
    });
    let connection = local
        .connections
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = local.stopping.wait() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        debug!(client = %client_addr, error = %err, "edge connection ended with an error");
    }
}
