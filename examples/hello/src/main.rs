//! hello: the example app nonstop deploys, a tiny HTTP/1.1 server on the standard library.
//!
//! `GET /` answers the version it was built as (env `NONSTOP_VERSION`), `GET /profile` the
//! profile it runs as (`real1`/`real2`: which of the two blue/green slots), `GET /health`
//! `ok`. A reverse proxy pools connections to it, so keep-alive must be right: every
//! response has a `Content-Length`, request bodies are read off the wire before the next
//! request is parsed, and `Connection: close` / HTTP/1.0 end the connection.
//! `GET /ws` is a WebSocket echo (RFC 6455: the handshake, text and binary messages,
//! fragments, ping and close), each reply prefixed with the version; `GET /stream` is an
//! endless server-sent event stream, one event a second naming the version. Both show that
//! an open connection stays on the version it opened on while a deploy switches traffic.
//! Its constants `ERROR_EVERY` (every N-th `/` answers 500) and `SLOW_MS` (each `/` waits)
//! make a version that passes its health check and then serves badly, for the guard.
//! It must never panic on bad input (it answers 400 and closes) and never listens beyond
//! loopback: nonstop's proxy (or nginx) is its only client.

use std::env;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

/// A version with this set to false never passes its health check (the failure tests flip it).
const HEALTHY: bool = true;
/// When N > 0, every N-th request to `/` answers 500 (health and `/profile` stay fine), so
/// a version passes its health check and then fails its users: what the guard catches.
const ERROR_EVERY: u32 = 0;
/// Milliseconds each request to `/` waits before it is answered: a version that is only slow.
const SLOW_MS: u64 = 0;

/// How long an idle keep-alive connection stays open. Longer than the 90 s pool idle timeout
/// of hyper's client, so the proxy is the one that closes idle connections and never sends
/// a request on a connection this server is closing at the same instant.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A client that stops reading its response for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line or header line accepted, like common servers' defaults.
const MAX_LINE: usize = 8 * 1024;
const MAX_HEADERS: usize = 100;
/// Time between two events of `/stream`.
const EVENT_INTERVAL: Duration = Duration::from_secs(1);
/// Largest WebSocket message echoed; a bigger one closes with 1009 (too big).
const MAX_MESSAGE: usize = 1024 * 1024;
/// RFC 6455 §1.3: appended to the client's key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const USAGE: &str = "usage: hello --port N [--profile NAME]   (version from env NONSTOP_VERSION)";

/// What the app answers with; fixed at start-up.
#[derive(Debug)]
struct App {
    version: String,
    profile: String,
    healthy: bool,
    error_every: u32,
    slow: Duration,
    /// Requests to `/` so far, for `error_every`.
    served: AtomicU32,
}

fn main() -> ExitCode {
    let args = match Args::parse(env::args().skip(1)) {
        Ok(args) => args,
        Err(reason) => {
            eprintln!("hello: {reason}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let version = env::var("NONSTOP_VERSION")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "dev".to_string());
    let app = Arc::new(App {
        version,
        profile: args.profile,
        healthy: HEALTHY,
        error_every: ERROR_EVERY,
        slow: Duration::from_millis(SLOW_MS),
        served: AtomicU32::new(0),
    });

    let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, args.port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("hello: cannot listen on 127.0.0.1:{}: {e}", args.port);
            return ExitCode::FAILURE;
        }
    };
    // The bound port, not the requested one: `--port 0` picks a free port.
    let port = listener.local_addr().map_or(args.port, |a| a.port());
    println!(
        "hello {} listening on 127.0.0.1:{port} as {}",
        app.version, app.profile
    );
    // stdout is a log file when deployed, so it is block-buffered: flush the start line now.
    let _ = io::stdout().flush();

    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let app = Arc::clone(&app);
                let spawned = thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || handle_connection(stream, &app));
                if let Err(e) = spawned {
                    eprintln!("hello: cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("hello: accept failed: {e}");
                // Out of file descriptors and the like: don't spin on the error.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    ExitCode::SUCCESS
}

/// Command-line arguments: `--port N` (required), `--profile NAME` (default `local`).
#[derive(Debug, PartialEq)]
struct Args {
    port: u16,
    profile: String,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut port = None;
        let mut profile = "local".to_string();
        while let Some(arg) = args.next() {
            let (name, inline_value) = match arg.split_once('=') {
                Some((name, value)) => (name.to_string(), Some(value.to_string())),
                None => (arg, None),
            };
            let mut value = || {
                inline_value
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match name.as_str() {
                "--port" => {
                    let raw = value()?;
                    let parsed = raw
                        .parse::<u16>()
                        .map_err(|_| format!("--port: not a port number: {raw:?}"))?;
                    port = Some(parsed);
                }
                "--profile" => {
                    profile = value()?;
                    if profile.trim().is_empty() {
                        return Err("--profile must not be empty".to_string());
                    }
                }
                "-h" | "--help" => return Err("help requested".to_string()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        let port = port.ok_or("--port is required")?;
        Ok(Args { port, profile })
    }
}

/// Serves one TCP connection; I/O errors (peer gone, idle timeout) just end it.
fn handle_connection(stream: TcpStream, app: &App) {
    let setup = stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone());
    let Ok(read_half) = setup else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let _ = serve(&mut reader, &mut writer, app);
}

/// The keep-alive loop: read a request, discard its body, answer, until the client closes
/// or asks to. Generic over the streams so tests can drive it from bytes in memory.
fn serve(reader: &mut impl BufRead, writer: &mut impl Write, app: &App) -> io::Result<()> {
    loop {
        let request = match read_head(reader) {
            Ok(Some(request)) => request,
            // The client closed (or went idle too long) between requests: a clean end.
            Ok(None) => return Ok(()),
            Err(RequestError::Io(e)) => return Err(e),
            Err(RequestError::Bad(reason)) => return bad_request(writer, reason),
        };
        if request.body != Body::None && request.expects_continue {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        match discard_body(reader, request.body) {
            Ok(()) => {}
            Err(RequestError::Io(e)) => return Err(e),
            Err(RequestError::Bad(reason)) => return bad_request(writer, reason),
        }
        let path = request.target.split(['?', '#']).next().unwrap_or("");
        if request.method == "GET" && path == "/ws" {
            if let Some(key) = request.websocket_key() {
                return websocket(reader, writer, app, key);
            }
        }
        if request.method == "GET" && path == "/stream" {
            let events = query_value(&request.target, "events").and_then(|n| n.parse().ok());
            event_stream(writer, app, EVENT_INTERVAL, events)?;
            if !request.keep_alive() || events.is_none() {
                return Ok(());
            }
            continue;
        }
        let response = route(app, &request.method, &request.target);
        let keep_alive = request.keep_alive();
        write_response(writer, &response, request.method == "HEAD", !keep_alive)?;
        if !keep_alive {
            return Ok(());
        }
    }
}

fn bad_request(writer: &mut impl Write, reason: &str) -> io::Result<()> {
    let response = Response::new(400, format!("bad request: {reason}\n"));
    write_response(writer, &response, false, true)
}

/// Maps a request to its answer. Every route answers GET and HEAD alike.
fn route(app: &App, method: &str, target: &str) -> Response {
    let path = target.split(['?', '#']).next().unwrap_or(target);
    if method != "GET" && method != "HEAD" {
        return Response::new(404, "not found\n");
    }
    match path {
        "/" => root(app),
        "/profile" if app.healthy => Response::new(200, format!("{}\n", app.profile)),
        "/health" if app.healthy => Response::new(200, "ok\n"),
        "/profile" | "/health" => Response::new(503, "unhealthy\n"),
        "/ws" => Response::new(426, "a WebSocket handshake only\n"),
        _ => Response::new(404, "not found\n"),
    }
}

/// `/`: the version, after `slow`, or a 500 for every `error_every`-th request.
fn root(app: &App) -> Response {
    let n = app.served.fetch_add(1, Ordering::Relaxed) + 1;
    if !app.slow.is_zero() {
        thread::sleep(app.slow);
    }
    if app.error_every > 0 && n % app.error_every == 0 {
        return Response::new(500, format!("{} failed on purpose\n", app.version));
    }
    Response::new(200, format!("{}\n", app.version))
}

#[derive(Debug, PartialEq)]
struct Response {
    status: u16,
    body: String,
}

impl Response {
    fn new(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            body: body.into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            426 => "Upgrade Required",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "",
        }
    }
}

fn write_response(
    writer: &mut impl Write,
    response: &Response,
    head_only: bool,
    close: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Cache-Control: no-store\r\n",
        response.status,
        response.reason(),
        response.body.len()
    );
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&response.body);
    }
    writer.write_all(out.as_bytes())?;
    writer.flush()
}

/// A parsed request line and the headers this server cares about.
#[derive(Debug, PartialEq)]
struct RequestHead {
    method: String,
    target: String,
    http10: bool,
    connection_close: bool,
    expects_continue: bool,
    /// `Connection` names `upgrade`, `Upgrade` names `websocket`, and the key to answer.
    connection_upgrade: bool,
    upgrade_websocket: bool,
    sec_websocket_key: Option<String>,
    body: Body,
}

impl RequestHead {
    /// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked to. We
    /// close HTTP/1.0 connections regardless: its keep-alive is a rarely used extension.
    fn keep_alive(&self) -> bool {
        !self.http10 && !self.connection_close
    }

    /// The key of a WebSocket handshake, if this request is one (HTTP/1.1, no body).
    fn websocket_key(&self) -> Option<&str> {
        let handshake = !self.http10
            && self.connection_upgrade
            && self.upgrade_websocket
            && self.body == Body::None;
        self.sec_websocket_key.as_deref().filter(|_| handshake)
    }
}

/// How the request's body is framed on the wire.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Body {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug)]
enum RequestError {
    /// The connection broke or timed out: close without answering.
    Io(io::Error),
    /// The client sent something malformed: answer 400 and close.
    Bad(&'static str),
}

impl From<io::Error> for RequestError {
    fn from(e: io::Error) -> Self {
        RequestError::Io(e)
    }
}

/// Reads one line ending in `\n`, without the line ending. `Ok(None)` at a clean EOF.
fn read_line(reader: &mut impl BufRead) -> Result<Option<String>, RequestError> {
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
    reader.take(limit).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if line.len() > MAX_LINE {
            return Err(RequestError::Bad("line too long"));
        }
        return Err(RequestError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    // Header values may carry obs-text; nothing here needs them exact, so lossy is fine.
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// Reads the request line and headers. `Ok(None)` if the connection ended before a request.
fn read_head(reader: &mut impl BufRead) -> Result<Option<RequestHead>, RequestError> {
    // RFC 9112 §2.2: ignore empty lines before the request line (some clients send a CRLF
    // after a POST body).
    let mut request_line = String::new();
    for _ in 0..4 {
        match read_line(reader) {
            Ok(Some(line)) if line.is_empty() => {}
            Ok(Some(line)) => {
                request_line = line;
                break;
            }
            Ok(None) => return Ok(None),
            // A keep-alive connection idling past IDLE_TIMEOUT: no request, nothing to answer.
            Err(RequestError::Io(e)) if is_timeout(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    if request_line.is_empty() {
        return Err(RequestError::Bad("no request line"));
    }
    let mut head = parse_request_line(&request_line)?;

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut headers = 0;
    loop {
        let line =
            read_line(reader)?.ok_or(RequestError::Io(io::ErrorKind::UnexpectedEof.into()))?;
        if line.is_empty() {
            break;
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return Err(RequestError::Bad("too many headers"));
        }
        let (name, value) = parse_header(&line)?;
        if name.eq_ignore_ascii_case("content-length") {
            let length = parse_content_length(value)?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err(RequestError::Bad("conflicting Content-Length headers"));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            // Only the last coding decides the framing; a request must end in chunked.
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    head.connection_close = true;
                } else if option.eq_ignore_ascii_case("upgrade") {
                    head.connection_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket = value
                .split(',')
                .any(|protocol| protocol.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            head.sec_websocket_key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("expect") {
            head.expects_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }

    head.body = match (transfer_encoding, chunked, content_length) {
        // Both framings at once is the classic request-smuggling shape: refuse it.
        (true, _, Some(_)) => {
            return Err(RequestError::Bad(
                "both Transfer-Encoding and Content-Length",
            ))
        }
        (true, false, None) => {
            return Err(RequestError::Bad("Transfer-Encoding must end in chunked"))
        }
        (true, true, None) => Body::Chunked,
        (false, _, Some(0) | None) => Body::None,
        (false, _, Some(length)) => Body::Length(length),
    };
    Ok(Some(head))
}

fn parse_request_line(line: &str) -> Result<RequestHead, RequestError> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Bad("malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(RequestError::Bad("malformed method"));
    }
    let target = origin_form(target).ok_or(RequestError::Bad("malformed request target"))?;
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(RequestError::Bad("unsupported HTTP version")),
    };
    Ok(RequestHead {
        method: method.to_string(),
        target,
        http10,
        connection_close: false,
        expects_continue: false,
        connection_upgrade: false,
        upgrade_websocket: false,
        sec_websocket_key: None,
        body: Body::None,
    })
}

/// The path-and-query of a request target: as sent (`/x?y`), or taken out of the absolute
/// form a proxy may send (`http://host/x?y`). `None` for anything else.
fn origin_form(target: &str) -> Option<String> {
    if target.starts_with('/') {
        return Some(target.to_string());
    }
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))?;
    match rest.find('/') {
        Some(slash) => Some(rest[slash..].to_string()),
        None if !rest.is_empty() => Some("/".to_string()),
        None => None,
    }
}

fn parse_header(line: &str) -> Result<(&str, &str), RequestError> {
    let (name, value) = line
        .split_once(':')
        .ok_or(RequestError::Bad("malformed header"))?;
    // No whitespace is allowed between a header name and its colon (RFC 9112 §5.1).
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(RequestError::Bad("malformed header name"));
    }
    Ok((name, value.trim_matches([' ', '\t'])))
}

fn parse_content_length(value: &str) -> Result<u64, RequestError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestError::Bad("malformed Content-Length"));
    }
    value
        .parse()
        .map_err(|_| RequestError::Bad("Content-Length too large"))
}

/// Reads the request body off the connection and throws it away, so the next request on a
/// kept-alive connection starts where it should.
fn discard_body(reader: &mut impl BufRead, body: Body) -> Result<(), RequestError> {
    match body {
        Body::None => Ok(()),
        Body::Length(length) => discard_exactly(reader, length),
        Body::Chunked => loop {
            let size_line =
                read_line(reader)?.ok_or(RequestError::Io(io::ErrorKind::UnexpectedEof.into()))?;
            let size = parse_chunk_size(&size_line)?;
            if size == 0 {
                // Trailer fields, up to the empty line that ends the message.
                for _ in 0..=MAX_HEADERS {
                    match read_line(reader)? {
                        Some(line) if line.is_empty() => return Ok(()),
                        Some(_) => {}
                        None => return Err(RequestError::Io(io::ErrorKind::UnexpectedEof.into())),
                    }
                }
                return Err(RequestError::Bad("too many trailer fields"));
            }
            discard_exactly(reader, size)?;
            match read_line(reader)? {
                Some(line) if line.is_empty() => {}
                Some(_) => return Err(RequestError::Bad("chunk not followed by CRLF")),
                None => return Err(RequestError::Io(io::ErrorKind::UnexpectedEof.into())),
            }
        },
    }
}

fn discard_exactly(reader: &mut impl BufRead, length: u64) -> Result<(), RequestError> {
    let copied = io::copy(&mut reader.take(length), &mut io::sink())?;
    if copied < length {
        return Err(RequestError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

fn parse_chunk_size(line: &str) -> Result<u64, RequestError> {
    // A chunk size may be followed by `;name=value` extensions, which we ignore.
    let hex = line
        .split(';')
        .next()
        .unwrap_or("")
        .trim_matches([' ', '\t']);
    if hex.is_empty() || hex.len() > 15 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RequestError::Bad("malformed chunk size"));
    }
    u64::from_str_radix(hex, 16).map_err(|_| RequestError::Bad("malformed chunk size"))
}

/// The value of `name` in the target's query, if it has one.
fn query_value<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// `/stream`: server-sent events, one every `every`, each naming the version, until the
/// client goes away (a write fails) or, with `events`, after that many (then the response
/// ends and the connection may serve another request).
fn event_stream(
    writer: &mut impl Write,
    app: &App,
    every: Duration,
    events: Option<u64>,
) -> io::Result<()> {
    writer.write_all(
        b"HTTP/1.1 200 OK\r\n\
          Content-Type: text/event-stream\r\n\
          Cache-Control: no-store\r\n\
          Transfer-Encoding: chunked\r\n\r\n",
    )?;
    writer.flush()?;
    let mut sent = 0u64;
    while events.is_none_or(|events| sent < events) {
        if sent > 0 {
            thread::sleep(every);
        }
        let event = format!("id: {sent}\ndata: {}\n\n", app.version);
        write!(writer, "{:x}\r\n{event}\r\n", event.len())?;
        writer.flush()?;
        sent += 1;
    }
    writer.write_all(b"0\r\n\r\n")?;
    writer.flush()
}

/// Why a WebSocket ends from our side, as its close status (RFC 6455 §7.4.1).
#[derive(Debug)]
enum Closing {
    Io(io::Error),
    /// A frame RFC 6455 forbids: unmasked, reserved bits, a bad opcode or control frame.
    Protocol,
    NotUtf8,
    TooBig,
}

impl From<io::Error> for Closing {
    fn from(e: io::Error) -> Self {
        Closing::Io(e)
    }
}

/// `/ws`: answers the handshake, then echoes every message prefixed with the version until
/// the client closes. Client frames must be masked (RFC 6455 §5.1); ours are not.
fn websocket(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    app: &App,
    key: &str,
) -> io::Result<()> {
    let accept = websocket_accept(key);
    write!(
        writer,
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )?;
    writer.flush()?;
    let status: u16 = match echo_messages(reader, writer, app) {
        Ok(()) => return Ok(()),
        Err(Closing::Io(e)) => return Err(e),
        Err(Closing::Protocol) => 1002,
        Err(Closing::NotUtf8) => 1007,
        Err(Closing::TooBig) => 1009,
    };
    write_frame(writer, 0x8, &status.to_be_bytes())
}

fn echo_messages(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    app: &App,
) -> Result<(), Closing> {
    // A fragmented message so far: its opcode (text or binary) and bytes.
    let mut message: Option<(u8, Vec<u8>)> = None;
    loop {
        let (fin, opcode, payload) = read_frame(reader)?;
        let complete = match (opcode, message.take()) {
            (0x1 | 0x2, None) if fin => (opcode, payload),
            (0x1 | 0x2, None) => {
                message = Some((opcode, payload));
                continue;
            }
            (0x0, Some((first, mut so_far))) => {
                if so_far.len() + payload.len() > MAX_MESSAGE {
                    return Err(Closing::TooBig);
                }
                so_far.extend_from_slice(&payload);
                if !fin {
                    message = Some((first, so_far));
                    continue;
                }
                (first, so_far)
            }
            (0x8..=0xA, in_progress) => {
                message = in_progress;
                if !fin || payload.len() > 125 {
                    return Err(Closing::Protocol);
                }
                match opcode {
                    // Close: answer with the client's status, then the connection ends.
                    0x8 => {
                        write_frame(writer, 0x8, payload.get(..2).unwrap_or(&[]))?;
                        return Ok(());
                    }
                    0x9 => write_frame(writer, 0xA, &payload)?,
                    _ => {}
                }
                continue;
            }
            _ => return Err(Closing::Protocol),
        };
        let (opcode, payload) = complete;
        if opcode == 0x1 && std::str::from_utf8(&payload).is_err() {
            return Err(Closing::NotUtf8);
        }
        let mut reply = format!("{}: ", app.version).into_bytes();
        reply.extend_from_slice(&payload);
        write_frame(writer, opcode, &reply)?;
    }
}

/// One client frame: FIN, opcode and the unmasked payload.
fn read_frame(reader: &mut impl Read) -> Result<(bool, u8, Vec<u8>), Closing> {
    let mut head = [0u8; 2];
    reader.read_exact(&mut head)?;
    let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0F);
    if head[0] & 0x70 != 0 {
        return Err(Closing::Protocol);
    }
    if head[1] & 0x80 == 0 {
        return Err(Closing::Protocol);
    }
    let length = match head[1] & 0x7F {
        126 => {
            let mut bytes = [0u8; 2];
            reader.read_exact(&mut bytes)?;
            u64::from(u16::from_be_bytes(bytes))
        }
        127 => {
            let mut bytes = [0u8; 8];
            reader.read_exact(&mut bytes)?;
            u64::from_be_bytes(bytes)
        }
        short => u64::from(short),
    };
    let length = usize::try_from(length)
        .ok()
        .filter(|&length| length <= MAX_MESSAGE)
        .ok_or(Closing::TooBig)?;
    let mut mask = [0u8; 4];
    reader.read_exact(&mut mask)?;
    let mut payload = vec![0u8; length];
    reader.read_exact(&mut payload)?;
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
    Ok((fin, opcode, payload))
}

fn write_frame(writer: &mut impl Write, opcode: u8, payload: &[u8]) -> io::Result<()> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        short @ 0..=125 => frame.push(short as u8),
        medium @ 126..=0xFFFF => {
            frame.push(126);
            frame.extend_from_slice(&(medium as u16).to_be_bytes());
        }
        long => {
            frame.push(127);
            frame.extend_from_slice(&(long as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    writer.write_all(&frame)?;
    writer.flush()
}

/// `Sec-WebSocket-Accept` for a client's key (RFC 6455 §4.2.2).
fn websocket_accept(key: &str) -> String {
    base64(&sha1(format!("{}{WEBSOCKET_GUID}", key.trim()).as_bytes()))
}

/// SHA-1 (RFC 3174), here only because the WebSocket handshake needs it and this app has
/// no dependencies; it secures nothing.
fn sha1(message: &[u8]) -> [u8; 20] {
    let mut state: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut padded = message.to_vec();
    padded.push(0x80);
    while padded.len() % 64 != 56 {
        padded.push(0);
    }
    padded.extend_from_slice(&((message.len() as u64) * 8).to_be_bytes());
    for block in padded.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = state;
        for (i, &word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let next = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(word);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, next);
        }
        for (kept, new) in state.iter_mut().zip([a, b, c, d, e]) {
            *kept = kept.wrapping_add(new);
        }
    }
    let mut digest = [0u8; 20];
    for (bytes, word) in digest.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> shift & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `tchar` from RFC 9110 §5.6.2: the bytes allowed in a method or header name.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn app(healthy: bool) -> App {
        App {
            version: "1.0.1-SNAPSHOT-20240101000000".to_string(),
            profile: "real2".to_string(),
            healthy,
            error_every: 0,
            slow: Duration::ZERO,
            served: AtomicU32::new(0),
        }
    }

    /// Feeds raw bytes through the keep-alive loop and returns everything written back.
    fn exchange(app: &App, input: &str) -> String {
        let mut reader = Cursor::new(input.as_bytes().to_vec());
        let mut output = Vec::new();
        let _ = serve(&mut reader, &mut output, app);
        String::from_utf8(output).expect("responses are UTF-8")
    }

    fn head(input: &str) -> Result<Option<RequestHead>, RequestError> {
        read_head(&mut Cursor::new(input.as_bytes().to_vec()))
    }

    #[test]
    fn root_answers_the_version_and_a_newline_exactly() {
        let out = exchange(&app(true), "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("Content-Length: 30\r\n"), "{out}");
        assert!(
            out.contains("Content-Type: text/plain; charset=utf-8\r\n"),
            "{out}"
        );
        assert!(
            out.ends_with("\r\n\r\n1.0.1-SNAPSHOT-20240101000000\n"),
            "{out}"
        );
        assert!(!out.contains("Connection: close"), "{out}");
    }

    #[test]
    fn sha1_base64_and_the_websocket_accept_match_the_rfcs() {
        let hex: String = sha1(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "a9993e364706816aba3e25717850c26c9cd0d89d");
        let long: String = sha1(&[b'a'; 1000])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(long, "291e9a6c66994949b57ba5e650361e98fc36b1ba");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // RFC 6455 §1.3's example.
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    /// A frame as a client sends it: masked.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            short @ 0..=125 => frame.push(0x80 | short as u8),
            medium => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(medium as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    fn exchange_bytes(app: &App, input: Vec<u8>) -> Vec<u8> {
        let mut output = Vec::new();
        let _ = serve(&mut Cursor::new(input), &mut output, app);
        output
    }

    const HANDSHAKE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn ws_answers_the_handshake_and_echoes_with_the_version() {
        let mut input = HANDSHAKE.as_bytes().to_vec();
        input.extend(client_frame(true, 0x1, b"hi"));
        input.extend(client_frame(false, 0x1, b"frag"));
        input.extend(client_frame(true, 0x9, b"p"));
        input.extend(client_frame(true, 0x0, b"ment"));
        input.extend(client_frame(true, 0x2, &[0u8; 300]));
        input.extend(client_frame(true, 0x8, &1000u16.to_be_bytes()));
        input.extend(b"GET / HTTP/1.1\r\n\r\n");

        let out = exchange_bytes(&app(true), input);

        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(out.starts_with(head.as_bytes()), "{out:?}");
        let mut expected = Vec::new();
        let version = "1.0.1-SNAPSHOT-20240101000000: ";
        write_frame(&mut expected, 0x1, format!("{version}hi").as_bytes()).expect("frame");
        write_frame(&mut expected, 0xA, b"p").expect("frame");
        write_frame(&mut expected, 0x1, format!("{version}fragment").as_bytes()).expect("frame");
        let mut binary = version.as_bytes().to_vec();
        binary.extend_from_slice(&[0u8; 300]);
        write_frame(&mut expected, 0x2, &binary).expect("frame");
        write_frame(&mut expected, 0x8, &1000u16.to_be_bytes()).expect("frame");
        // Nothing after the close: the connection is no HTTP connection any more.
        assert_eq!(&out[head.len()..], &expected[..]);
    }

    #[test]
    fn ws_closes_on_protocol_errors_and_refuses_plain_requests() {
        let mut input = HANDSHAKE.as_bytes().to_vec();
        input.extend([0x81, 0x02, b'h', b'i']); // unmasked
        let out = exchange_bytes(&app(true), input);
        assert!(out.ends_with(&[0x88, 0x02, 0x03, 0xEA]), "1002: {out:?}");

        let mut input = HANDSHAKE.as_bytes().to_vec();
        input.extend(client_frame(true, 0x1, &[0xff, 0xfe]));
        let out = exchange_bytes(&app(true), input);
        assert!(out.ends_with(&[0x88, 0x02, 0x03, 0xEF]), "1007: {out:?}");

        let out = exchange(&app(true), "GET /ws HTTP/1.1\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{out}"
        );
    }

    #[test]
    fn stream_sends_events_naming_the_version_in_chunks() {
        let out = exchange(
            &app(true),
            "GET /stream?events=2 HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
        );
        let event = |n| format!("id: {n}\ndata: 1.0.1-SNAPSHOT-20240101000000\n\n");
        let expected = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            event(0).len(),
            event(0),
            event(1).len(),
            event(1),
        );
        assert!(out.starts_with(&expected), "{out}");
        assert!(
            out.ends_with("\r\n\r\nok\n"),
            "the connection is kept: {out}"
        );
    }

    #[test]
    fn profile_health_and_unknown_paths() {
        let app = app(true);
        assert_eq!(
            route(&app, "GET", "/profile"),
            Response::new(200, "real2\n")
        );
        assert_eq!(
            route(&app, "GET", "/health?probe=1"),
            Response::new(200, "ok\n")
        );
        assert_eq!(route(&app, "GET", "/nope").status, 404);
        assert_eq!(route(&app, "POST", "/").status, 404);
    }

    #[test]
    fn error_every_fails_every_nth_root_request_and_leaves_health_alone() {
        let app = App {
            error_every: 3,
            ..app(true)
        };
        let statuses: Vec<u16> = (0..6).map(|_| route(&app, "GET", "/").status).collect();
        assert_eq!(statuses, [200, 200, 500, 200, 200, 500]);
        assert_eq!(route(&app, "GET", "/profile").status, 200);
        assert_eq!(route(&app, "GET", "/health").status, 200);
    }

    #[test]
    fn an_unhealthy_build_fails_health_and_profile_but_still_serves_its_version() {
        let app = app(false);
        assert_eq!(route(&app, "GET", "/health").status, 503);
        assert_eq!(route(&app, "GET", "/profile").status, 503);
        assert_eq!(route(&app, "GET", "/").status, 200);
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        let input = "GET / HTTP/1.1\r\n\r\nGET /profile HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let out = exchange(&app(true), input);
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 3, "{out}");
        assert!(out.ends_with("Connection: close\r\n\r\nok\n"), "{out}");
    }

    #[test]
    fn http10_closes_after_one_response() {
        let out = exchange(&app(true), "GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n");
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 1, "{out}");
        assert!(out.contains("Connection: close\r\n"), "{out}");
    }

    #[test]
    fn bodies_are_discarded_so_the_next_request_parses() {
        let input = "POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /health HTTP/1.1\r\n\r\n\
                     PUT /y HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\n\
                     HEAD / HTTP/1.1\r\n\r\n";
        let out = exchange(&app(true), input);
        let statuses: Vec<&str> = out.lines().filter(|l| l.starts_with("HTTP/1.1")).collect();
        assert_eq!(
            statuses,
            [
                "HTTP/1.1 404 Not Found",
                "HTTP/1.1 200 OK",
                "HTTP/1.1 404 Not Found",
                "HTTP/1.1 200 OK"
            ],
            "{out}"
        );
        // HEAD: the headers of GET, no body.
        assert!(
            out.ends_with("Content-Length: 30\r\nCache-Control: no-store\r\n\r\n"),
            "{out}"
        );
    }

    #[test]
    fn expect_continue_gets_an_interim_response() {
        let out = exchange(
            &app(true),
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
        );
        assert!(
            out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404"),
            "{out}"
        );
    }

    #[test]
    fn bad_input_gets_400_and_a_close() {
        for input in [
            "GARBAGE\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET nothing HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "\r\n\r\n\r\n\r\n\r\n",
        ] {
            let out = exchange(&app(true), &format!("{input}GET / HTTP/1.1\r\n\r\n"));
            assert!(
                out.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{input:?} -> {out}"
            );
            assert!(out.contains("Connection: close\r\n"), "{input:?} -> {out}");
            assert_eq!(out.matches("HTTP/1.1").count(), 1, "{input:?} -> {out}");
        }
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE));
        assert!(matches!(
            head(&long),
            Err(RequestError::Bad("line too long"))
        ));
        let headers = "X-A: b\r\n".repeat(MAX_HEADERS + 1);
        let many = format!("GET / HTTP/1.1\r\n{headers}\r\n");
        assert!(matches!(
            head(&many),
            Err(RequestError::Bad("too many headers"))
        ));
    }

    #[test]
    fn eof_between_requests_is_a_clean_end_and_mid_request_is_not_answered() {
        assert!(matches!(head(""), Ok(None)));
        assert_eq!(exchange(&app(true), "GET / HTTP/1.1\r\nHost: x"), "");
        assert_eq!(
            exchange(
                &app(true),
                "POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc"
            ),
            ""
        );
    }

    #[test]
    fn request_line_and_headers_parse() {
        let parsed = head("\r\nGET http://127.0.0.1:8081/profile?x=1 HTTP/1.1\r\nConnection: keep-alive, Close\r\ncontent-length:  0 \r\n\r\n")
            .expect("valid request")
            .expect("a request, not EOF");
        assert_eq!(parsed.method, "GET");
        assert_eq!(parsed.target, "/profile?x=1");
        assert!(parsed.connection_close && !parsed.keep_alive());
        assert_eq!(parsed.body, Body::None);
    }

    #[test]
    fn args_need_a_port_and_default_the_profile() {
        let parse = |args: &[&str]| Args::parse(args.iter().map(ToString::to_string));
        assert_eq!(
            parse(&["--port", "8081"]),
            Ok(Args {
                port: 8081,
                profile: "local".into()
            })
        );
        assert_eq!(
            parse(&["--profile=real2", "--port=8082"]),
            Ok(Args {
                port: 8082,
                profile: "real2".into()
            })
        );
        assert!(parse(&[]).is_err());
        assert!(parse(&["--port"]).is_err());
        assert!(parse(&["--port", "70000"]).is_err());
        assert!(parse(&["--port", "1", "--verbose"]).is_err());
    }
}
