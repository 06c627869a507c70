//! The built-in reverse proxy of one app: it listens on the app's public address and forwards
//! every request to the live instance on `127.0.0.1:<port>`. A switch is a single atomic
//! store of the live [`Target`]; each request reads the target once when it arrives and
//! finishes on that instance, so a release never drops or splits a request. The proxy must
//! never buffer whole bodies, never retry a request the upstream may already have seen, and
//! never start, stop or health-check instances: it only points traffic.
//!
//! Not supported yet: protocol upgrades (WebSocket). `Upgrade` is a hop-by-hop header and is
//! stripped like the others, so the upstream sees an ordinary request.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{SwitchError, TrafficSwitch};

/// Idle upstream connections are kept this long so keep-alive traffic skips the TCP
/// handshake; a connection the app closes earlier is detected at checkout and the request
/// is retried on a fresh one (`retry_canceled_requests`).
const UPSTREAM_POOL_IDLE: Duration = Duration::from_secs(30);

/// Instances listen on loopback, so a connect that takes this long means the app is wedged,
/// not that the network is slow.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Accept errors are mostly fd exhaustion; retrying at once would spin a core.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// legacy `Proxy-Connection`. They are never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Body of every response the proxy sends: the upstream's, streamed through, or a short
/// text the proxy wrote itself.
type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The HTTP client shared by all connections; bodies stream straight from the client's
/// connection into the upstream's.
type UpstreamClient = Client<HttpConnector, Incoming>;

/// One upstream: an app instance listening on `127.0.0.1:<port>`.
#[derive(Debug)]
pub struct Target {
    port: u16,
    /// Pre-built so that a request only clones it instead of formatting and parsing.
    authority: Authority,
}

impl Target {
    pub fn new(port: u16) -> Result<Self, SwitchError> {
        if port == 0 {
            return Err(SwitchError::Rejected(
                "port 0 is not an instance's port".to_string(),
            ));
        }
        let authority = Authority::try_from(format!("127.0.0.1:{port}"))
            .map_err(|err| SwitchError::Rejected(format!("bad upstream port {port}: {err}")))?;
        Ok(Self { port, authority })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// The reverse proxy of one app. Dropping the last handle stops accepting, like
/// [`Proxy::shutdown`].
///
/// It runs one worker thread per core, each with its own single-threaded runtime, its own
/// listening socket on the same address (`SO_REUSEPORT`: the kernel spreads connections)
/// and its own upstream pool, like nginx's worker processes. A request and its upstream
/// connection then never change threads (a work-stealing runtime hands them between its
/// threads at every wake-up), and the proxy never waits behind the server's own work.
pub struct Proxy {
    live: Arc<ArcSwapOption<Target>>,
    local_addr: SocketAddr,
    /// `true` once shutdown started; dropping the sender means the same to the workers.
    shutdown: watch::Sender<bool>,
}

/// What one worker's connection tasks share: the live target (the same cell in every
/// worker) and this worker's pooled client that reaches it.
struct Forwarder {
    live: Arc<ArcSwapOption<Target>>,
    client: UpstreamClient,
}

impl Proxy {
    /// Binds `listen` and starts serving on worker threads of its own. `live` is the
    /// initial upstream port (`None` = answer 503 until switched).
    pub async fn start(listen: SocketAddr, live: Option<u16>) -> Result<Arc<Proxy>, SwitchError> {
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
        let (shutdown, shutdown_rx) = watch::channel(false);
        for (index, listener) in listeners.into_iter().enumerate() {
            let (live, shutdown_rx) = (Arc::clone(&live), shutdown_rx.clone());
            std::thread::Builder::new()
                .name(format!("proxy-{}-{index}", local_addr.port()))
                .spawn(move || run_worker(listener, live, shutdown_rx))?;
        }
        info!(addr = %local_addr, workers, live = ?live.load().as_ref().map(|t| t.port), "proxy listening");

        Ok(Arc::new(Proxy {
            live,
            local_addr,
            shutdown,
        }))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting; open connections finish their current request (graceful) and are
    /// then closed. Returns at once, without waiting for them.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

/// A listening socket that other sockets may bind too, handed over as a std socket so a
/// worker's own runtime can take it.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
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

/// One worker: accepts on its own socket until shutdown, then waits for its connections
/// to finish their requests.
fn run_worker(
    listener: std::net::TcpListener,
    live: Arc<ArcSwapOption<Target>>,
    shutdown: watch::Receiver<bool>,
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
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(err) => {
                warn!(error = %err, "proxy worker could not take its socket");
                return;
            }
        };
        let forwarder = Arc::new(Forwarder {
            live,
            client: upstream_client(),
        });
        let connections = TaskTracker::new();
        accept_loop(listener, forwarder, shutdown, &connections).await;
        connections.close();
        connections.wait().await;
    });
}

#[async_trait]
impl TrafficSwitch for Proxy {
    fn live(&self) -> Option<u16> {
        self.live.load().as_ref().map(|target| target.port)
    }

    async fn switch_to(&self, port: u16) -> Result<(), SwitchError> {
        let target = Arc::new(Target::new(port)?);
        // The whole switch: one atomic store. Requests that already loaded the old target
        // keep their `Arc` to it and finish there.
        let previous = self.live.swap(Some(target));
        info!(from = ?previous.map(|t| t.port), to = port, "traffic switched");
        Ok(())
    }
}

impl Forwarder {
    async fn forward(
        &self,
        client_addr: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        // Read once: the rest of the request uses this target whatever a switch does now.
        let Some(target) = self.live.load_full() else {
            warn!(method = %req.method(), path = req.uri().path(), "no live instance");
            return text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "nonstop: no live instance\n",
            );
        };

        let uri = match upstream_uri(req.uri(), &target.authority) {
            Ok(uri) => uri,
            Err(err) => {
                debug!(uri = %req.uri(), error = %err, "request target cannot be forwarded");
                return text_response(StatusCode::BAD_REQUEST, "nonstop: bad request target\n");
            }
        };
        *req.uri_mut() = uri;
        // HTTP/1.0 clients would make the upstream close after every response; upstream
        // connections are ours, so they always speak 1.1 and stay in the pool.
        *req.version_mut() = Version::HTTP_11;
        prepare_upstream_headers(req.headers_mut(), client_addr.ip());

        match self.client.request(req).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(err) => {
                let unreachable = err.is_connect();
                warn!(
                    upstream = %target.authority,
                    unreachable,
                    error = ?err,
                    "upstream request failed"
                );
                let reason = if unreachable { "unreachable" } else { "failed" };
                text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("nonstop: upstream {} {reason}\n", target.authority),
                )
            }
        }
    }
}

fn upstream_client() -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(UPSTREAM_CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(UPSTREAM_POOL_IDLE)
        // Without a timer the pool never reaps idle connections.
        .pool_timer(TokioTimer::new())
        // The default, stated because zero dropped requests depends on it: a request that
        // meets a pooled connection the app closed before it was written is sent again.
        .retry_canceled_requests(true)
        .build(connector)
}

async fn accept_loop(
    listener: TcpListener,
    forwarder: Arc<Forwarder>,
    mut shutdown: watch::Receiver<bool>,
    connections: &TaskTracker,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client_addr)) => {
                    connections.spawn(serve_connection(
                        stream,
                        client_addr,
                        Arc::clone(&forwarder),
                        shutdown.clone(),
                    ));
                }
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            () = shutdown_started(&mut shutdown) => break,
        }
    }
    info!(addr = ?listener.local_addr().ok(), "proxy stopped accepting");
}

async fn serve_connection(
    stream: TcpStream,
    client_addr: SocketAddr,
    forwarder: Arc<Forwarder>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(client = %client_addr, error = %err, "could not set TCP_NODELAY");
    }
    let service = service_fn(move |req| {
        let forwarder = Arc::clone(&forwarder);
        async move { Ok::<_, Infallible>(forwarder.forward(client_addr, req).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        // Makes hyper's default 30 s header read timeout effective, so idle or slow
        // clients cannot hold a connection task forever.
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);

    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown_started(&mut shutdown) => {
            // Lets the request in progress finish, then closes instead of keeping alive.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        debug!(client = %client_addr, error = %err, "client connection ended with an error");
    }
}

/// Resolves once [`Proxy::shutdown`] was called or the `Proxy` was dropped; the latter
/// shows up as a closed channel and ends serving just the same.
async fn shutdown_started(shutdown: &mut watch::Receiver<bool>) {
    // The borrow guard is dropped here: holding it across an await would make the
    // connection task `!Send` and block the sender.
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

/// The upstream URI: the target's authority with the client's path and query.
fn upstream_uri(client_uri: &Uri, upstream: &Authority) -> Result<Uri, hyper::http::Error> {
    let path_and_query = client_uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(upstream.clone())
        .path_and_query(path_and_query)
        .build()
}

/// Turns the client's request headers into the upstream's. The client's `Host` is kept
/// (like nginx's `proxy_set_header Host $host`) so that apps build links and pick virtual
/// hosts from the public name; the legacy client only fills `Host` in when it is missing.
fn prepare_upstream_headers(headers: &mut HeaderMap, client_ip: IpAddr) {
    strip_hop_by_hop(headers);
    // hyper already answered `100 Continue` on the client's hop when the body was first
    // read; forwarding the expectation would only make the upstream answer it again.
    headers.remove(header::EXPECT);

    let forwarded_for = forwarded_for(headers, client_ip);
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match headers.get(header::HOST).cloned() {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        // A spoofed value must not survive when there is no Host to vouch for.
        None => headers.remove(X_FORWARDED_HOST),
    };
}

/// Removes the hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// `X-Forwarded-For` with the client's address appended to what earlier proxies wrote.
fn forwarded_for(headers: &HeaderMap, client_ip: IpAddr) -> HeaderValue {
    // An IPv4 client on a dual-stack socket shows up as `::ffff:a.b.c.d`; apps expect a.b.c.d.
    let client_ip = client_ip.to_canonical().to_string();
    let mut value: Vec<u8> = Vec::new();
    for prior in headers.get_all(X_FORWARDED_FOR) {
        value.extend_from_slice(prior.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(client_ip.as_bytes());
    HeaderValue::from_bytes(&value).unwrap_or_else(|_| {
        // Prior values were valid header values, so the join is too; should that ever
        // change, the client's own address is still the one fact worth passing on.
        HeaderValue::from_str(&client_ip).unwrap_or(HeaderValue::from_static("unknown"))
    })
}

fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use futures_util::stream;
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper::client::conn::http1::SendRequest;
    use tokio::sync::{Notify, mpsc};

    use super::*;

    /// Every test finishes in well under a second; this only turns a hang into a failure.
    const TEST_DEADLINE: Duration = Duration::from_secs(60);

    type ClientBody = UnsyncBoxBody<Bytes, Infallible>;

    fn loopback_any_port() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// A port nothing listens on: bound by the OS, then released.
    fn unused_port() -> u16 {
        let listener = std::net::TcpListener::bind(loopback_any_port()).expect("bind probe");
        listener.local_addr().expect("probe address").port()
    }

    /// A tiny app instance. `/` answers its name, `/echo` streams the request body back,
    /// `/headers` reports what the proxy forwarded, and `/slow` tells `slow_arrived` and
    /// waits for `slow_release` before answering its name.
    struct Upstream {
        port: u16,
        slow_arrived: Arc<Notify>,
        slow_release: Arc<Notify>,
    }

    async fn spawn_upstream(name: &'static str) -> Upstream {
        let listener = TcpListener::bind(loopback_any_port())
            .await
            .expect("bind upstream");
        let port = listener.local_addr().expect("upstream address").port();
        let slow_arrived = Arc::new(Notify::new());
        let slow_release = Arc::new(Notify::new());
        let (arrived, release) = (Arc::clone(&slow_arrived), Arc::clone(&slow_release));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (arrived, release) = (Arc::clone(&arrived), Arc::clone(&release));
                let service = service_fn(move |req| {
                    upstream_answer(name, Arc::clone(&arrived), Arc::clone(&release), req)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Upstream {
            port,
            slow_arrived,
            slow_release,
        }
    }

    async fn upstream_answer(
        name: &'static str,
        slow_arrived: Arc<Notify>,
        slow_release: Arc<Notify>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let text = |body: String| Response::new(Either::Right(Full::new(Bytes::from(body))));
        Ok(match req.uri().path() {
            "/echo" => Response::new(Either::Left(req.into_body())),
            "/headers" => {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or("-")
                        .to_string()
                };
                text(format!(
                    "for={} proto={} host={} forwarded-host={} secret={} uri={}",
                    header("x-forwarded-for"),
                    header("x-forwarded-proto"),
                    header("host"),
                    header("x-forwarded-host"),
                    header("x-secret"),
                    req.uri(),
                ))
            }
            "/slow" => {
                slow_arrived.notify_one();
                slow_release.notified().await;
                text(name.to_string())
            }
            _ => text(name.to_string()),
        })
    }

    async fn start_proxy(live: Option<u16>) -> Arc<Proxy> {
        Proxy::start(loopback_any_port(), live)
            .await
            .expect("start proxy")
    }

    /// One keep-alive client connection to the proxy.
    async fn connect(addr: SocketAddr) -> SendRequest<ClientBody> {
        let stream = TcpStream::connect(addr).await.expect("connect to proxy");
        stream.set_nodelay(true).expect("nodelay");
        let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("client handshake");
        tokio::spawn(connection);
        send
    }

    fn request(method: &str, path: &str, body: ClientBody) -> Request<ClientBody> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "app.test")
            .body(body)
            .expect("valid test request")
    }

    fn get(path: &str) -> Request<ClientBody> {
        request("GET", path, Full::new(Bytes::new()).boxed_unsync())
    }

    /// Sends on a kept-alive connection and reads the whole answer; errors are strings so
    /// that the load test can count them instead of panicking.
    async fn send(
        client: &mut SendRequest<ClientBody>,
        req: Request<ClientBody>,
    ) -> Result<(StatusCode, Bytes), String> {
        client
            .ready()
            .await
            .map_err(|err| format!("not ready: {err}"))?;
        let response = client
            .send_request(req)
            .await
            .map_err(|err| format!("send: {err}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("body: {err}"))?
            .to_bytes();
        Ok((status, body))
    }

    async fn send_ok(client: &mut SendRequest<ClientBody>, req: Request<ClientBody>) -> String {
        let (status, body) = send(client, req).await.expect("proxied request");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, StatusCode::OK, "body: {body}");
        body
    }

    /// An instance that answers one request per connection and then closes it without
    /// saying so (no `Connection: close`), as an app's idle timeout does. Counts the
    /// connections it closed.
    async fn spawn_closing_upstream() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind(loopback_any_port())
            .await
            .expect("bind upstream");
        let port = listener.local_addr().expect("upstream address").port();
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&closed);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    drop(stream);
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        (port, closed)
    }

    #[tokio::test]
    async fn an_upstream_connection_the_app_closed_is_replaced_and_no_request_fails() {
        let (port, closed) = spawn_closing_upstream().await;
        let proxy = start_proxy(Some(port)).await;
        let mut client = connect(proxy.local_addr()).await;
        let deadline = Instant::now() + TEST_DEADLINE;
        for sent in 1..=20 {
            assert_eq!(send_ok(&mut client, get("/")).await, "ok", "request {sent}");
            // The next request must meet a connection the app has closed already.
            while closed.load(std::sync::atomic::Ordering::SeqCst) < sent {
                assert!(Instant::now() < deadline, "the upstream never closed");
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test]
    async fn switch_sends_new_requests_to_the_other_instance() {
        let (a, b) = (spawn_upstream("A").await, spawn_upstream("B").await);
        let proxy = start_proxy(Some(a.port)).await;
        let mut client = connect(proxy.local_addr()).await;

        assert_eq!(send_ok(&mut client, get("/")).await, "A");
        assert_eq!(send_ok(&mut client, get("/")).await, "A");
        proxy.switch_to(b.port).await.expect("switch to B");

        // Same keep-alive connection and a new one: both land on B now.
        assert_eq!(send_ok(&mut client, get("/")).await, "B");
        assert_eq!(
            send_ok(&mut connect(proxy.local_addr()).await, get("/")).await,
            "B"
        );
        assert_eq!(proxy.live(), Some(b.port));
    }

    #[tokio::test]
    async fn a_request_in_flight_finishes_where_it_started() {
        let (a, b) = (spawn_upstream("A").await, spawn_upstream("B").await);
        let proxy = start_proxy(Some(a.port)).await;
        let mut slow_client = connect(proxy.local_addr()).await;
        let in_flight = tokio::spawn(async move { send_ok(&mut slow_client, get("/slow")).await });
        a.slow_arrived.notified().await;

        proxy.switch_to(b.port).await.expect("switch to B");
        let mut client = connect(proxy.local_addr()).await;
        assert_eq!(send_ok(&mut client, get("/")).await, "B");
        a.slow_release.notify_one();

        assert_eq!(in_flight.await.expect("slow request task"), "A");
    }

    #[tokio::test]
    async fn a_large_post_body_is_echoed_back_intact() {
        let echo = spawn_upstream("echo").await;
        let proxy = start_proxy(Some(echo.port)).await;
        let payload: Bytes = (0..5 * 1024 * 1024)
            .map(|i: usize| (i % 251) as u8)
            .collect();

        let mut client = connect(proxy.local_addr()).await;
        let req = request("POST", "/echo", Full::new(payload.clone()).boxed_unsync());
        let (status, body) = send(&mut client, req).await.expect("echo request");

        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), payload.len());
        assert!(body == payload, "echoed body differs from what was sent");
    }

    /// Each chunk must come back before the next is sent: a proxy that buffered either
    /// body would deadlock here (and hit the deadline) instead of passing.
    #[tokio::test]
    async fn bodies_stream_both_ways_without_buffering() {
        const CHUNKS: usize = 80;
        const CHUNK_SIZE: usize = 64 * 1024;
        let echo = spawn_upstream("echo").await;
        let proxy = start_proxy(Some(echo.port)).await;
        let (chunk_tx, mut chunk_rx) = mpsc::channel::<Bytes>(1);
        let request_body = StreamBody::new(stream::poll_fn(move |cx| {
            chunk_rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|bytes| Ok::<_, Infallible>(Frame::data(bytes))))
        }));
        let mut client = connect(proxy.local_addr()).await;

        let ping_pong = async {
            let response = client
                .send_request(request("POST", "/echo", request_body.boxed_unsync()))
                .await
                .expect("response head before the request body ended");
            let mut response_body = response.into_body();
            let mut echoed = Vec::with_capacity(CHUNKS * CHUNK_SIZE);
            for n in 0..CHUNKS {
                let chunk = Bytes::from(vec![(n % 256) as u8; CHUNK_SIZE]);
                chunk_tx.send(chunk).await.expect("request body open");
                while echoed.len() < (n + 1) * CHUNK_SIZE {
                    let frame = response_body
                        .frame()
                        .await
                        .expect("echo ended early")
                        .expect("echo frame");
                    if let Ok(data) = frame.into_data() {
                        echoed.extend_from_slice(&data);
                    }
                }
            }
            echoed
        };
        let echoed = tokio::time::timeout(TEST_DEADLINE, ping_pong)
            .await
            .expect("chunks were held back: a body is buffered");

        assert_eq!(echoed.len(), CHUNKS * CHUNK_SIZE);
        for (n, chunk) in echoed.chunks(CHUNK_SIZE).enumerate() {
            assert!(
                chunk.iter().all(|&byte| byte == (n % 256) as u8),
                "chunk {n}"
            );
        }
    }

    #[tokio::test]
    async fn forwarding_headers_reach_the_upstream_and_hop_by_hop_ones_do_not() {
        let app = spawn_upstream("app").await;
        let proxy = start_proxy(Some(app.port)).await;
        let mut client = connect(proxy.local_addr()).await;
        let mut req = get("/headers?page=2");
        let headers = req.headers_mut();
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));

        let seen = send_ok(&mut client, req).await;

        assert_eq!(
            seen,
            "for=203.0.113.7, 127.0.0.1 proto=http host=app.test forwarded-host=app.test \
             secret=- uri=/headers?page=2"
        );
    }

    #[tokio::test]
    async fn an_unreachable_upstream_answers_502() {
        let down = unused_port();
        let proxy = start_proxy(Some(down)).await;
        let mut client = connect(proxy.local_addr()).await;

        let (status, body) = send(&mut client, get("/")).await.expect("proxy answers");

        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            body,
            format!("nonstop: upstream 127.0.0.1:{down} unreachable\n")
        );
        // The client's connection survives an upstream failure.
        let (status, _) = send(&mut client, get("/")).await.expect("second answer");
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn without_a_live_instance_the_proxy_answers_503() {
        let proxy = start_proxy(None).await;
        let mut client = connect(proxy.local_addr()).await;

        let (status, body) = send(&mut client, get("/")).await.expect("proxy answers");

        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "nonstop: no live instance\n");
        assert_eq!(proxy.live(), None);
    }

    #[tokio::test]
    async fn switching_to_port_zero_is_rejected_and_traffic_stays() {
        let a = spawn_upstream("A").await;
        let proxy = start_proxy(Some(a.port)).await;

        let result = proxy.switch_to(0).await;

        assert!(
            matches!(result, Err(SwitchError::Rejected(_))),
            "{result:?}"
        );
        assert_eq!(proxy.live(), Some(a.port));
        assert_eq!(
            send_ok(&mut connect(proxy.local_addr()).await, get("/")).await,
            "A"
        );
    }

    #[tokio::test]
    async fn binding_a_taken_address_fails_with_bind() {
        let taken = std::net::TcpListener::bind(loopback_any_port()).expect("bind");
        let addr = taken.local_addr().expect("address");

        let result = Proxy::start(addr, None).await;

        assert!(matches!(result, Err(SwitchError::Bind { .. })));
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_lets_the_request_in_flight_finish() {
        let a = spawn_upstream("A").await;
        let proxy = start_proxy(Some(a.port)).await;
        let addr = proxy.local_addr();
        let mut slow_client = connect(addr).await;
        let in_flight = tokio::spawn(async move {
            let answer = send_ok(&mut slow_client, get("/slow")).await;
            // Graceful means: this answer, then the connection closes instead of idling.
            let next = send(&mut slow_client, get("/")).await;
            (answer, next)
        });
        a.slow_arrived.notified().await;

        proxy.shutdown();
        let refused_by = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(
                Instant::now() < refused_by,
                "proxy still accepts after shutdown"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        a.slow_release.notify_one();

        let (answer, next) = in_flight.await.expect("slow request task");
        assert_eq!(answer, "A");
        assert!(
            next.is_err(),
            "connection kept alive after shutdown: {next:?}"
        );
    }

    #[derive(Default)]
    struct Tally {
        served_by_a: usize,
        served_by_b: usize,
        failures: Vec<String>,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn switching_under_keep_alive_load_drops_no_request() {
        const CLIENTS: usize = 16;
        const REQUESTS_PER_CLIENT: usize = 300;
        const SWITCHES: usize = 50;
        // Spreads the switches over the run, leaving traffic after the last one.
        const REQUESTS_BETWEEN_SWITCHES: usize = CLIENTS * REQUESTS_PER_CLIENT / (SWITCHES + 10);
        let (a, b) = (spawn_upstream("A").await, spawn_upstream("B").await);
        let proxy = start_proxy(Some(a.port)).await;
        let (done_tx, mut done) = mpsc::unbounded_channel::<()>();

        let run = async {
            let mut clients = Vec::new();
            for _ in 0..CLIENTS {
                let mut client = connect(proxy.local_addr()).await;
                let done_tx = done_tx.clone();
                clients.push(tokio::spawn(async move {
                    let mut tally = Tally::default();
                    for _ in 0..REQUESTS_PER_CLIENT {
                        match send(&mut client, get("/")).await {
                            Ok((StatusCode::OK, body)) if body == "A" => tally.served_by_a += 1,
                            Ok((StatusCode::OK, body)) if body == "B" => tally.served_by_b += 1,
                            Ok((status, body)) => tally.failures.push(format!("{status} {body:?}")),
                            Err(err) => tally.failures.push(err),
                        }
                        let _ = done_tx.send(());
                    }
                    tally
                }));
            }
            drop(done_tx);

            let mut switch_times = Vec::with_capacity(SWITCHES);
            for n in 0..SWITCHES {
                for _ in 0..REQUESTS_BETWEEN_SWITCHES {
                    done.recv().await.expect("clients still running");
                }
                let port = if n % 2 == 0 { b.port } else { a.port };
                let started = Instant::now();
                proxy.switch_to(port).await.expect("switch");
                switch_times.push(started.elapsed());
            }

            let mut total = Tally::default();
            for client in clients {
                let tally = client.await.expect("client task");
                total.served_by_a += tally.served_by_a;
                total.served_by_b += tally.served_by_b;
                total.failures.extend(tally.failures);
            }
            (total, switch_times)
        };
        let started = Instant::now();
        let (total, switch_times) = tokio::time::timeout(TEST_DEADLINE, run)
            .await
            .expect("load test finished in time");
        let elapsed = started.elapsed();

        let slowest_switch = switch_times.iter().max().copied().unwrap_or_default();
        let mean_switch = switch_times.iter().sum::<Duration>() / switch_times.len() as u32;
        eprintln!(
            "load: {} requests ({} by A, {} by B, {} failed) in {elapsed:?}; \
             {} switches, mean {mean_switch:?}, slowest {slowest_switch:?}",
            CLIENTS * REQUESTS_PER_CLIENT,
            total.served_by_a,
            total.served_by_b,
            total.failures.len(),
            switch_times.len(),
        );
        assert!(
            total.failures.is_empty(),
            "failed requests: {:?}",
            total.failures
        );
        assert_eq!(
            total.served_by_a + total.served_by_b,
            CLIENTS * REQUESTS_PER_CLIENT
        );
        assert!(total.served_by_a > 0 && total.served_by_b > 0);
        assert_eq!(
            proxy.live(),
            Some(a.port),
            "an even number of switches ends on A"
        );
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("close, X-Trace"));
        headers.insert("x-trace", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("trailer", HeaderValue::from_static("x-checksum"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));

        strip_hop_by_hop(&mut headers);

        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn forwarded_for_appends_the_client_to_earlier_proxies() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            forwarded_for(&headers, IpAddr::from([10, 0, 0, 1])),
            "10.0.0.1"
        );
        headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.2"));
        let mapped = IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001]);
        assert_eq!(
            forwarded_for(&headers, mapped),
            "203.0.113.7, 198.51.100.2, 10.0.0.1"
        );
    }

    #[test]
    fn upstream_uri_keeps_path_and_query_and_replaces_the_authority() {
        let target = Target::new(8082).expect("valid port");
        let cases = [
            ("/a/b?c=d", "http://127.0.0.1:8082/a/b?c=d"),
            ("http://example.test/x?y", "http://127.0.0.1:8082/x?y"),
            ("example.test:443", "http://127.0.0.1:8082/"),
        ];
        for (client_uri, expected) in cases {
            let client_uri: Uri = client_uri.parse().expect("test uri");
            let uri = upstream_uri(&client_uri, &target.authority).expect("upstream uri");
            assert_eq!(uri.to_string(), expected, "from {client_uri}");
        }
    }
}
