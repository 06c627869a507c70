//! Serving one listening socket that may face the internet: HTTP/1.1 connections with a
//! header-read timeout (which is also how long a kept-alive connection may sit idle), a
//! cap on open connections that sheds the oldest half-open or idle one when a new client
//! arrives (the flooding client's first), and a shutdown with a deadline. A flood of idle
//! or half-open sockets therefore costs the listener at most its cap in file descriptors,
//! never starves another listener, and never locks another client's newcomer out. Knows nothing of routes: it drives any `tower` service.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Accept errors are mostly fd exhaustion; retrying at once would spin a core.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What one listener allows its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request head must arrive whole within this, counted from the connection's start
    /// or the end of its previous response (so it is also the keep-alive idle timeout).
    pub header_read: Duration,
    /// Open connections at most; at the cap a new client sheds the oldest idle one of the
    /// client that holds the most.
    pub max_connections: usize,
    /// Requests in flight of one client (an IPv4 address or an IPv6 /64) at most: while it
    /// has that many, its new connections are closed, so one client's slow requests cannot
    /// fill the cap (its idle and half-open sockets are shed at the cap as anyone's).
    pub max_per_client: usize,
    /// A request head larger than this is answered 431.
    pub max_head_bytes: usize,
    /// How long shutdown waits for requests in flight before it closes what is left.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            max_connections: 256,
            max_per_client: 128,
            max_head_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Where a connection is between requests; only `Fresh` and `Idle` ones may be shed.
const FRESH: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;
const SHED: u8 = 3;

/// One open connection as the cap sees it.
struct Slot {
    /// Who opened it: at the cap, the client holding the most connections gives one up.
    client: IpAddr,
    state: AtomicU8,
    /// Cancelled to close the connection at once (shed, or the shutdown deadline).
    close: CancellationToken,
}

impl Slot {
    /// A request arrived: false when the connection was shed meanwhile.
    fn start_request(&self) -> bool {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != SHED).then_some(BUSY)
            })
            .is_ok()
    }

    fn end_request(&self) {
        let _ = self
            .state
            .compare_exchange(BUSY, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Marks the slot shed if it is in state `from`.
    fn try_shed(&self, from: u8) -> bool {
        self.state
            .compare_exchange(from, SHED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// The open connections of one listener, oldest first. Touched at accept and close only.
#[derive(Default)]
struct Slots(Mutex<VecDeque<Arc<Slot>>>);

impl Slots {
    /// A slot for a new connection from `client`, shedding one when at the cap; `None` when
    /// the client has its share of requests in flight, or every open connection is busy.
    fn admit(&self, limits: &Limits, client: IpAddr) -> Option<Arc<Slot>> {
        let mut slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Requests in flight are what a shed cannot take back: one client holds at most its
        // share of them. Its half-open and idle sockets are the cap's to shed, as anyone's.
        let busy = slots
            .iter()
            .filter(|slot| slot.client == client && slot.state.load(Ordering::Acquire) == BUSY)
            .count();
        if busy >= limits.max_per_client {
            return None;
        }
        if slots.len() >= limits.max_connections {
            let shed = shed_position(&slots)?;
            if let Some(shed) = slots.remove(shed) {
                shed.close.cancel();
            }
        }
        let slot = Arc::new(Slot {
            client,
            state: AtomicU8::new(FRESH),
            close: CancellationToken::new(),
        });
        slots.push_back(slot.clone());
        Some(slot)
    }

    fn release(&self, slot: &Arc<Slot>) {
        let mut slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = slots.iter().position(|s| Arc::ptr_eq(s, slot)) {
            slots.remove(at);
        }
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Which connection makes room for a newcomer (marking it shed): the oldest half-open one
/// of the client holding the most connections, else anyone's oldest half-open one; then
/// idle ones in the same order. Half-open sockets go first, since that is what a flood is
/// made of; and the flooder's go first, since a flood that churns faster than a newcomer's
/// head arrives would otherwise shed other clients' newcomers along with its own sockets.
fn shed_position(slots: &VecDeque<Arc<Slot>>) -> Option<usize> {
    let mut held: HashMap<IpAddr, usize> = HashMap::new();
    for slot in slots {
        *held.entry(slot.client).or_default() += 1;
    }
    let heaviest = held
        .into_iter()
        .max_by_key(|(_, count)| *count)
        .map(|(ip, _)| ip);
    [FRESH, IDLE].into_iter().find_map(|from| {
        slots
            .iter()
            .position(|slot| Some(slot.client) == heaviest && slot.try_shed(from))
            .or_else(|| slots.iter().position(|slot| slot.try_shed(from)))
    })
}

/// Serves `service` on `listener` until `shutdown`, then lets requests in flight finish for
/// up to `limits.shutdown_grace` and closes the rest. Each request carries the peer's
/// address as axum's `ConnectInfo<SocketAddr>`.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    shutdown: CancellationToken,
) where
    S: tower::Service<Request<Incoming>, Response = axum::response::Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let slots = Arc::new(Slots::default());
    let connections = TaskTracker::new();
    let graceful = CancellationToken::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = slots.admit(&limits, crate::domain::client_of(peer.ip())) else {
                        tracing::warn!(peer = %peer, open = slots.len(), "at the connection limit: refused one");
                        drop(stream);
                        continue;
                    };
                    let (service, slots, graceful) = (service.clone(), slots.clone(), graceful.clone());
                    connections.spawn(async move {
                        serve_connection(stream, peer, service, &slot, limits, graceful).await;
                        slots.release(&slot);
                    });
                }
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    graceful.cancel();
    connections.close();
    if tokio::time::timeout(limits.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        let open = slots.len();
        for slot in slots.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            slot.close.cancel();
        }
        tracing::warn!(open, grace = ?limits.shutdown_grace, "closed the connections still open at the shutdown deadline");
        connections.wait().await;
    }
}

async fn serve_connection<S>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    slot: &Arc<Slot>,
    limits: Limits,
    graceful: CancellationToken,
) where
    S: tower::Service<Request<Incoming>, Response = axum::response::Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let _ = stream.set_nodelay(true);
    let request_slot = slot.clone();
    let hyper_service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let (service, slot) = (service.clone(), request_slot.clone());
        async move {
            if !slot.start_request() {
                return Ok(shed_answer(slot));
            }
            request.extensions_mut().insert(ConnectInfo(peer));
            let response = service.oneshot(request).await?;
            // Busy until the body is sent: a streamed answer (SSE) is never shed.
            Ok::<_, Infallible>(response.map(|body| Tracked { body, slot }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_header_size(limits.max_head_bytes);
    let connection = builder.serve_connection(TokioIo::new(stream), hyper_service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = slot.close.cancelled() => return,
        () = graceful.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                () = slot.close.cancelled() => return,
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(peer = %peer, error = %err, "connection ended with an error");
    }
}

/// A response body that marks its connection idle once it is sent or dropped.
struct Tracked {
    body: axum::body::Body,
    slot: Arc<Slot>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.slot.end_request();
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// For a request that arrived on a connection just shed to make room: it was never seen
/// by the service, so the client may send it again.
fn shed_answer(slot: Arc<Slot>) -> Response<Tracked> {
    let body = axum::body::Body::new(Full::new(Bytes::from_static(
        b"{\"error\":\"the server is at its connection limit; try again\"}\n",
    )));
    let mut response = Response::new(Tracked { body, slot });
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Raises this process's open-file limit to its hard limit (a server's connections, the
/// proxy's two sockets per request and the database all draw from it). Returns the limit.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::Router;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    async fn start(limits: Limits) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route(
                "/peer",
                axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                    peer.ip().to_string()
                }),
            )
            .route(
                "/body",
                axum::routing::post(
                    |body: axum::body::Bytes| async move { body.len().to_string() },
                ),
            );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, router, limits, shutdown.clone()));
        (addr, shutdown, task)
    }

    /// Sends one GET on a new connection and returns the whole answer.
    async fn get_once(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// True once the server closed `stream` (a read returns end of file or an error).
    async fn closed_by_server(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(DEADLINE, stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn at_the_cap_a_newcomer_sheds_the_oldest_idle_socket_and_is_served() {
        let limits = Limits {
            max_connections: 4,
            header_read: Duration::from_secs(60),
            ..Limits::default()
        };
        let (addr, _shutdown, _task) = start(limits).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }

        let answer = tokio::time::timeout(DEADLINE, get_once(addr, "/peer"))
            .await
            .unwrap();

        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("127.0.0.1"), "{answer}");
        assert!(
            closed_by_server(&mut idle[0]).await,
            "the oldest idle socket stays open"
        );
    }

    async fn connect_from(client: &str, addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(client.parse().unwrap(), 0))
            .unwrap();
        socket.connect(addr).await.unwrap()
    }

    #[tokio::test]
    async fn at_the_cap_a_flooding_client_sheds_its_own_sockets_not_another_clients() {
        let limits = Limits {
            max_connections: 4,
            header_read: Duration::from_secs(60),
            ..Limits::default()
        };
        let (addr, _shutdown, _task) = start(limits).await;
        let mut visitor = connect_from("127.0.0.3", addr).await;
        // Connections are taken in order: once a later one is answered, the visitor's is in.
        assert!(get_once(addr, "/peer").await.starts_with("HTTP/1.1 200"));
        let mut flood = Vec::new();
        for _ in 0..8 {
            flood.push(connect_from("127.0.0.2", addr).await);
        }
        assert!(
            closed_by_server(&mut flood[0]).await,
            "the flood's oldest socket stays open"
        );

        visitor
            .write_all(b"GET /peer HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(DEADLINE, visitor.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("127.0.0.3"), "{answer}");
    }

    #[tokio::test]
    async fn a_client_whose_share_is_busy_is_refused_and_another_is_served() {
        let limits = Limits {
            max_connections: 8,
            max_per_client: 2,
            header_read: Duration::from_secs(60),
            ..Limits::default()
        };
        let (addr, _shutdown, _task) = start(limits).await;
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut stream = connect_from("127.0.0.2", addr).await;
            // A body announced and never sent keeps the request in flight.
            stream
                .write_all(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n")
                .await
                .unwrap();
            slow.push(stream);
        }
        // Connections are taken in order: once a later one is answered, both are in flight.
        let mut probe = connect_from("127.0.0.3", addr).await;
        probe
            .write_all(b"GET /peer HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(DEADLINE, probe.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.ends_with("127.0.0.3"), "{answer}");

        let mut third = connect_from("127.0.0.2", addr).await;

        assert!(
            closed_by_server(&mut third).await,
            "a third connection of a client with two busy ones stays open"
        );
        slow[0].write_all(b"0123456789").await.unwrap();
        let mut answer = vec![0u8; 256];
        let read = tokio::time::timeout(DEADLINE, slow[0].read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(
            answer[..read].starts_with(b"HTTP/1.1 200"),
            "a busy request was cut"
        );
    }

    #[tokio::test]
    async fn a_head_that_never_completes_is_closed_at_the_header_timeout() {
        let limits = Limits {
            header_read: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, _shutdown, _task) = start(limits).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /peer HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();

        assert!(closed_by_server(&mut slow).await);
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_answered_431() {
        let (addr, _shutdown, _task) = start(Limits::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let big = "x".repeat(100 * 1024);
        let request = format!("GET /peer HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n");
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer)).await;

        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }

    #[tokio::test]
    async fn shutdown_ends_by_its_deadline_even_with_a_half_sent_head() {
        let limits = Limits {
            header_read: Duration::from_secs(60),
            shutdown_grace: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, shutdown, task) = start(limits).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /peer HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        // The server has the connection once it answers another one.
        assert!(get_once(addr, "/peer").await.starts_with("HTTP/1.1 200"));
        let started = Instant::now();

        shutdown.cancel();

        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("serve returned")
            .unwrap();
        assert!(closed_by_server(&mut slow).await);
        eprintln!("shutdown took {:?}", started.elapsed());
    }
}
