//! hello: the example app nonstop deploys, a tiny HTTP/1.1 server on the standard library.
//!
//! `GET /` answers the version it was built as (env `NONSTOP_VERSION`), `GET /profile` the
//! profile it runs as (`real1`/`real2`: which of the two blue/green slots), `GET /health`
//! `ok`. A reverse proxy pools connections to it, so keep-alive must be right: every
//! response has a `Content-Length`, request bodies are read off the wire before the next
//! request is parsed, and `Connection: close` / HTTP/1.0 end the connection.
//! It must never panic on bad input (it answers 400 and closes) and never listens beyond
//! loopback: nonstop's proxy (or nginx) is its only client.

use std::env;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// A version with this set to false never passes its health check (the failure tests flip it).
const HEALTHY: bool = true;

/// How long an idle keep-alive connection stays open. Longer than the 90 s pool idle timeout
/// of hyper's client, so the proxy is the one that closes idle connections and never sends
/// a request on a connection this server is closing at the same instant.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A client that stops reading its response for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line or header line accepted, like common servers' defaults.
const MAX_LINE: usize = 8 * 1024;
const MAX_HEADERS: usize = 100;

const USAGE: &str = "usage: hello --port N [--profile NAME]   (version from env NONSTOP_VERSION)";

/// What the app answers with; fixed at start-up.
#[derive(Debug)]
struct App {
    version: String,
    profile: String,
    healthy: bool,
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
        "/" => Response::new(200, format!("{}\n", app.version)),
        "/profile" if app.healthy => Response::new(200, format!("{}\n", app.profile)),
        "/health" if app.healthy => Response::new(200, "ok\n"),
        "/profile" | "/health" => Response::new(503, "unhealthy\n"),
        _ => Response::new(404, "not found\n"),
    }
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
    body: Body,
}

impl RequestHead {
    /// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked to. We
    /// close HTTP/1.0 connections regardless: its keep-alive is a rarely used extension.
    fn keep_alive(&self) -> bool {
        !self.http10 && !self.connection_close
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
                }
            }
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
