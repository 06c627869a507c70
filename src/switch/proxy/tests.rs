use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use super::*;
use crate::switch::OpenOn;

/// Every test finishes in well under a second; this only turns a hang into a failure.
const TEST_DEADLINE: Duration = Duration::from_secs(60);

type ClientBody = UnsyncBoxBody<Bytes, Infallible>;

/// What the test instances answer with: the request body echoed, or a text.
type AppBody = Either<Incoming, Full<Bytes>>;

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
/// waits for `slow_release` before answering its name. `connections` counts the
/// connections it accepted.
struct Upstream {
    port: u16,
    slow_arrived: Arc<Notify>,
    slow_release: Arc<Notify>,
    connections: Arc<AtomicUsize>,
}

async fn spawn_upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind(loopback_any_port())
        .await
        .expect("bind upstream");
    let port = listener.local_addr().expect("upstream address").port();
    let slow_arrived = Arc::new(Notify::new());
    let slow_release = Arc::new(Notify::new());
    let connections = Arc::new(AtomicUsize::new(0));
    let (arrived, release) = (Arc::clone(&slow_arrived), Arc::clone(&slow_release));
    let accepted = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
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
        connections,
    }
}

async fn upstream_answer(
    name: &'static str,
    slow_arrived: Arc<Notify>,
    slow_release: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, Infallible> {
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
                "for={} real-ip={} forwarded={} proto={} host={} forwarded-host={} \
                 authorization={} secret={} uri={}",
                header("x-forwarded-for"),
                header("x-real-ip"),
                header("forwarded"),
                header("x-forwarded-proto"),
                header("host"),
                header("x-forwarded-host"),
                header("authorization"),
                header("x-secret"),
                req.uri(),
            ))
        }
        // An app without WebSocket: the handshake gets an ordinary error.
        "/refuse" => Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Either::Right(Full::new(Bytes::from_static(
                b"no websocket here\n",
            ))))
            .expect("valid test response"),
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
async fn spawn_closing_upstream() -> (u16, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind(loopback_any_port())
        .await
        .expect("bind upstream");
    let port = listener.local_addr().expect("upstream address").port();
    let closed = Arc::new(AtomicUsize::new(0));
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
                counter.fetch_add(1, Ordering::SeqCst);
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
        while closed.load(Ordering::SeqCst) < sent {
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
async fn forwarding_headers_say_who_the_client_is_and_hop_by_hop_ones_do_not_pass() {
    let app = spawn_upstream("app").await;
    let proxy = start_proxy(Some(app.port)).await;
    let mut client = connect(proxy.local_addr()).await;
    let mut req = get("/headers?page=2");
    let headers = req.headers_mut();
    // A client claiming to be someone else, behind https, and trying to make the proxy
    // drop the app's own headers by naming them in `Connection`.
    headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
    headers.insert("x-real-ip", HeaderValue::from_static("203.0.113.7"));
    headers.insert("forwarded", HeaderValue::from_static("for=203.0.113.7"));
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    headers.insert("authorization", HeaderValue::from_static("Bearer t"));
    headers.insert(
        "connection",
        HeaderValue::from_static("keep-alive, x-secret, Authorization, Host, X-Forwarded-For"),
    );
    headers.insert("x-secret", HeaderValue::from_static("1"));

    let seen = send_ok(&mut client, req).await;

    assert_eq!(
        seen,
        "for=127.0.0.1 real-ip=127.0.0.1 forwarded=for=127.0.0.1;proto=http proto=http \
         host=app.test forwarded-host=app.test authorization=Bearer t secret=- \
         uri=/headers?page=2"
    );
}

#[tokio::test]
async fn a_trusted_proxy_in_front_keeps_the_client_it_named() {
    let app = spawn_upstream("app").await;
    let options = ProxyOptions {
        trusted_proxies: vec!["127.0.0.0/8".parse().expect("range")],
        ..ProxyOptions::default()
    };
    let proxy = Proxy::start_with(loopback_any_port(), Some(app.port), options)
        .await
        .expect("start proxy");
    let mut client = connect(proxy.local_addr()).await;
    let mut req = get("/headers");
    req.headers_mut()
        .insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
    req.headers_mut()
        .insert("x-forwarded-proto", HeaderValue::from_static("https"));

    let seen = send_ok(&mut client, req).await;

    assert!(
        seen.starts_with("for=203.0.113.7, 127.0.0.1 real-ip=127.0.0.1 ")
            && seen.contains(" proto=https "),
        "{seen}"
    );
}

#[tokio::test]
async fn connect_is_refused_with_405() {
    let app = spawn_upstream("app").await;
    let proxy = start_proxy(Some(app.port)).await;
    let mut client = connect(proxy.local_addr()).await;
    let req = Request::builder()
        .method("CONNECT")
        .uri("example.test:443")
        .header(header::HOST, "example.test:443")
        .body(Full::new(Bytes::new()).boxed_unsync())
        .expect("CONNECT request");

    let (status, body) = send(&mut client, req).await.expect("proxy answers");

    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body, "nonstop: CONNECT is not supported\n");
    assert_eq!(app.connections.load(Ordering::SeqCst), 0, "reached the app");
}

/// After a switch, what was pooled for the old target is not used again, even when traffic
/// comes back to the same port: the instance there may have been replaced meanwhile.
#[tokio::test]
async fn connections_pooled_for_an_earlier_target_are_not_reused() {
    let (a, b) = (spawn_upstream("A").await, spawn_upstream("B").await);
    let proxy = start_proxy(Some(a.port)).await;
    let mut client = connect(proxy.local_addr()).await;
    assert_eq!(send_ok(&mut client, get("/")).await, "A");
    assert_eq!(send_ok(&mut client, get("/")).await, "A");
    assert_eq!(a.connections.load(Ordering::SeqCst), 1, "kept alive");

    proxy.switch_to(b.port).await.expect("switch to B");
    assert_eq!(send_ok(&mut client, get("/")).await, "B");
    proxy.switch_to(a.port).await.expect("switch back to A");
    assert_eq!(send_ok(&mut client, get("/")).await, "A");

    assert_eq!(
        a.connections.load(Ordering::SeqCst),
        2,
        "a new connection to A"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_answers_502() {
    let down = unused_port();
    let proxy = start_proxy(Some(down)).await;
    let mut client = connect(proxy.local_addr()).await;

    let (status, body) = send(&mut client, get("/")).await.expect("proxy answers");

    assert_eq!(status, StatusCode::BAD_GATEWAY);
    // What failed, not where the app listens.
    assert_eq!(body, "nonstop: upstream unreachable\n");
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
fn the_upstream_gets_the_path_and_query_in_origin_form() {
    let cases = [
        ("/a/b?c=d", "/a/b?c=d"),
        ("http://example.test/x?y", "/x?y"),
        ("http://example.test", "/"),
    ];
    for (client_uri, expected) in cases {
        let client_uri: Uri = client_uri.parse().expect("test uri");
        assert_eq!(
            worker::origin_form(&client_uri).to_string(),
            expected,
            "from {client_uri}"
        );
    }
}

#[test]
fn failure_warnings_are_limited_to_one_a_second_and_count_the_rest() {
    let mut log = worker::FailureLog::default();
    let start = Instant::now();

    assert_eq!(log.admit(start), Some(0));
    assert_eq!(log.admit(start + Duration::from_millis(10)), None);
    assert_eq!(log.admit(start + Duration::from_millis(900)), None);
    assert_eq!(log.admit(start + Duration::from_millis(1000)), Some(2));
    assert_eq!(log.admit(start + Duration::from_millis(1500)), None);
    assert_eq!(log.admit(start + Duration::from_secs(5)), Some(1));
}

/// A WebSocket app instance: every text message comes back as `<name>: <message>`.
async fn spawn_websocket_upstream(name: &'static str) -> u16 {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind(loopback_any_port())
        .await
        .expect("bind websocket upstream");
    let port = listener.local_addr().expect("upstream address").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Text(text) = message {
                        let reply = Message::text(format!("{name}: {}", text.as_str()));
                        if socket.send(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

type ClientSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn open_websocket(proxy: SocketAddr, path: &str) -> ClientSocket {
    let (socket, response) = tokio_tungstenite::connect_async(format!("ws://{proxy}{path}"))
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    socket
}

/// Sends `text` and returns the answer; a hang is a failure, not a stuck test.
async fn say(socket: &mut ClientSocket, text: &str) -> String {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let exchange = async {
        socket.send(Message::text(text)).await.expect("send");
        loop {
            match socket.next().await.expect("socket open").expect("frame") {
                Message::Text(reply) => return reply.as_str().to_string(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected message {other:?}"),
            }
        }
    };
    tokio::time::timeout(TEST_DEADLINE, exchange)
        .await
        .expect("answer in time")
}

#[tokio::test]
async fn a_websocket_through_the_proxy_echoes_both_ways() {
    let port = spawn_websocket_upstream("A").await;
    let proxy = start_proxy(Some(port)).await;
    let mut socket = open_websocket(proxy.local_addr(), "/ws").await;

    assert_eq!(say(&mut socket, "hello").await, "A: hello");
    let long = "x".repeat(200_000);
    assert_eq!(say(&mut socket, &long).await, format!("A: {long}"));
    assert_eq!(say(&mut socket, "again").await, "A: again");
}

#[tokio::test]
async fn an_open_websocket_stays_on_its_instance_after_a_switch() {
    let (a, b) = (
        spawn_websocket_upstream("A").await,
        spawn_websocket_upstream("B").await,
    );
    let proxy = start_proxy(Some(a)).await;
    let mut on_a = open_websocket(proxy.local_addr(), "/ws").await;
    assert_eq!(say(&mut on_a, "before").await, "A: before");

    proxy.switch_to(b).await.expect("switch to B");
    let mut on_b = open_websocket(proxy.local_addr(), "/ws").await;

    assert_eq!(say(&mut on_a, "after").await, "A: after");
    assert_eq!(say(&mut on_b, "new").await, "B: new");
    assert_eq!(say(&mut on_a, "still").await, "A: still");
}

#[tokio::test]
async fn an_upgrade_the_app_refuses_gets_its_answer_not_a_hang() {
    use tokio_tungstenite::tungstenite::Error;
    let app = spawn_upstream("app").await;
    let proxy = start_proxy(Some(app.port)).await;

    let attempt = tokio_tungstenite::connect_async(format!("ws://{}/refuse", proxy.local_addr()));
    let result = tokio::time::timeout(TEST_DEADLINE, attempt)
        .await
        .expect("an answer in time");

    match result {
        Err(Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            assert_eq!(
                response.body().as_deref(),
                Some(&b"no websocket here\n"[..])
            );
        }
        other => panic!("expected the app's 400, got {other:?}"),
    }
    // The proxy still serves ordinary requests to that app.
    assert_eq!(
        send_ok(&mut connect(proxy.local_addr()).await, get("/")).await,
        "app"
    );
}

/// Each event must reach the client before the app sends the next, on a response that
/// has not ended: an event stream is never buffered nor cut short.
#[tokio::test]
async fn an_event_stream_reaches_the_client_event_by_event() {
    const EVENTS: usize = 20;
    let listener = TcpListener::bind(loopback_any_port())
        .await
        .expect("bind upstream");
    let port = listener.local_addr().expect("upstream address").port();
    let (event_tx, event_rx) = mpsc::channel::<Bytes>(1);
    let events = Arc::new(std::sync::Mutex::new(Some(event_rx)));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let events = Arc::clone(&events);
            let service = service_fn(move |_req: Request<Incoming>| {
                let mut event_rx = events.lock().expect("events").take();
                let body = StreamBody::new(stream::poll_fn(move |cx| match &mut event_rx {
                    Some(rx) => rx
                        .poll_recv(cx)
                        .map(|event| event.map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)))),
                    None => std::task::Poll::Ready(None),
                }));
                let response = Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(body)
                    .expect("valid test response");
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    let proxy = start_proxy(Some(port)).await;
    let mut client = connect(proxy.local_addr()).await;

    let read_events = async {
        let response = client
            .send_request(get("/events"))
            .await
            .expect("response head before any event");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = response.into_body();
        for n in 0..EVENTS {
            let event = format!("data: event {n}\n\n");
            event_tx
                .send(Bytes::from(event.clone()))
                .await
                .expect("stream open");
            let mut received = Vec::new();
            while received.len() < event.len() {
                let frame = body
                    .frame()
                    .await
                    .expect("stream ended early")
                    .expect("frame");
                if let Ok(data) = frame.into_data() {
                    received.extend_from_slice(&data);
                }
            }
            assert_eq!(String::from_utf8_lossy(&received), event);
        }
        drop(event_tx);
        assert!(
            body.frame().await.is_none(),
            "the stream ends when the app ends it"
        );
    };
    tokio::time::timeout(TEST_DEADLINE, read_events)
        .await
        .expect("events were held back: the stream is buffered");
}

/// A tunnel is still a client connection: it holds its place under the limits until it
/// closes, so sockets that never close cannot get past them.
#[tokio::test]
async fn an_open_websocket_keeps_its_place_under_the_connection_limits() {
    let port = spawn_websocket_upstream("A").await;
    let options = ProxyOptions {
        limits: ConnectionLimits {
            max_connections: 1,
            max_per_client: 1,
        },
        ..ProxyOptions::default()
    };
    let proxy = Proxy::start_with(loopback_any_port(), Some(port), options)
        .await
        .expect("start proxy");
    let url = format!("ws://{}/ws", proxy.local_addr());
    let mut socket = open_websocket(proxy.local_addr(), "/ws").await;
    assert_eq!(say(&mut socket, "hi").await, "A: hi");

    let second = tokio::time::timeout(TEST_DEADLINE, tokio_tungstenite::connect_async(&url))
        .await
        .expect("refused in time");
    assert!(second.is_err(), "a second connection got past the limit");
    assert_eq!(say(&mut socket, "still").await, "A: still");

    socket.close(None).await.expect("close handshake");
    drop(socket);
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut again = loop {
        if let Ok((socket, _)) = tokio_tungstenite::connect_async(&url).await {
            break socket;
        }
        assert!(
            Instant::now() < deadline,
            "the closed tunnel kept its place"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(say(&mut again, "back").await, "A: back");
}

/// Polls the proxy's open counts until they are `want`, within the test deadline.
async fn wait_open(proxy: &Proxy, want: &[OpenOn]) {
    let deadline = Instant::now() + TEST_DEADLINE;
    loop {
        let open = proxy.open_connections();
        if open == want {
            return;
        }
        assert!(Instant::now() < deadline, "open: {open:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn tunnels_on(port: u16, tunnels: usize) -> OpenOn {
    OpenOn {
        tunnels,
        ..OpenOn::none(port)
    }
}

#[tokio::test]
async fn a_request_in_flight_is_counted_on_its_port_until_it_is_answered() {
    let app = spawn_upstream("app").await;
    let proxy = start_proxy(Some(app.port)).await;
    wait_open(&proxy, &[OpenOn::none(app.port)]).await;

    let mut client = connect(proxy.local_addr()).await;
    let slow = tokio::spawn(async move { send_ok(&mut client, get("/slow")).await });
    app.slow_arrived.notified().await;
    let in_flight = OpenOn {
        requests: 1,
        ..OpenOn::none(app.port)
    };
    wait_open(&proxy, &[in_flight]).await;

    app.slow_release.notify_one();
    assert_eq!(slow.await.expect("request task"), "app");
    wait_open(&proxy, &[OpenOn::none(app.port)]).await;
}

#[tokio::test]
async fn tunnels_left_on_the_old_instance_are_counted_there_until_a_cut_closes_them() {
    use futures_util::StreamExt;
    let (a, b) = (
        spawn_websocket_upstream("A").await,
        spawn_websocket_upstream("B").await,
    );
    let proxy = start_proxy(Some(a)).await;
    let mut on_a = [
        open_websocket(proxy.local_addr(), "/ws").await,
        open_websocket(proxy.local_addr(), "/ws").await,
    ];
    for socket in &mut on_a {
        assert_eq!(say(socket, "hi").await, "A: hi");
    }
    wait_open(&proxy, &[tunnels_on(a, 2)]).await;

    proxy.switch_to(b).await.expect("switch to B");
    let mut on_b = open_websocket(proxy.local_addr(), "/ws").await;
    assert_eq!(say(&mut on_b, "new").await, "B: new");
    wait_open(&proxy, &[tunnels_on(b, 1), tunnels_on(a, 2)]).await;
    assert_eq!(say(&mut on_a[0], "still").await, "A: still");

    let refused = proxy.cut(b).expect_err("the live port is never cut");
    assert!(refused.to_string().contains("is live"), "{refused}");
    assert_eq!(proxy.cut(a).expect("cut A"), 2);
    for socket in &mut on_a {
        let end = tokio::time::timeout(TEST_DEADLINE, socket.next())
            .await
            .expect("closed in time");
        assert!(
            !matches!(end, Some(Ok(_))),
            "a cut tunnel answered: {end:?}"
        );
    }
    wait_open(&proxy, &[tunnels_on(b, 1)]).await;
    assert_eq!(say(&mut on_b, "still").await, "B: still");
}
