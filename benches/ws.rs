//! What the proxy costs long-lived connections, and what upgrading it in place costs its
//! clients: WebSocket echo round trips per second and p99 through `nonstop proxy` beside
//! the same examples/hello instance direct; the proxy's memory per idle WebSocket (its RSS
//! before and after opening up to 10,000 of them); and the p99 of keep-alive HTTP requests
//! while `nonstop proxy --upgrade` hands the listeners to a new process, beside the p99 of
//! the same run before it, with the requests that failed across the handover. Run it with
//! `scripts/bench ws`; it prints the table and writes it to its own section of
//! docs/benchmarks.md. Loopback only; every loop is bounded in count and in time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nonstop::switch::control::{running_pid, upgrade_process};
use tokio_tungstenite::tungstenite::Message;

/// Echo: this many WebSockets at once, each this many round trips, the whole run capped.
const ECHO_CONNECTIONS: usize = 20;
const ECHO_ROUND_TRIPS: usize = 2_000;
const ECHO_TIME_CAP: Duration = Duration::from_secs(30);
/// Direct and through the proxy take turns this many times; the table gives medians.
const ECHO_ROUNDS: usize = 3;
/// Idle WebSockets held open through the proxy at most, opened this many at a time.
const IDLE_SOCKETS: usize = 10_000;
const IDLE_OPENING_AT_ONCE: usize = 32;
/// Under the app's 120 s idle timeout, so the first ones opened are still open at the end.
const IDLE_TIME_CAP: Duration = Duration::from_secs(100);
/// Keep-alive HTTP clients during the upgrade, each at most this many requests.
const HTTP_CLIENTS: usize = 16;
const HTTP_MAX_PER_CLIENT: usize = 200_000;
/// Load before the upgrade (the steady state) and after the new process answers.
const STEADY: Duration = Duration::from_secs(6);
const AFTER_HANDOVER: Duration = Duration::from_secs(3);
/// How long the old proxy process keeps its long-lived connections after a handover.
const DRAIN_SECS: u64 = 3;
const SECTION: &str = "## WebSockets, idle connections and the proxy's upgrade in place";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn build_hello(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    let target = dir.join("hello-target");
    let out = Command::new("cargo")
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(&target)
        .current_dir(&source)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("release/hello")
}

fn wait_listens(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Instance(Child);

impl Instance {
    fn start(bin: &Path, port: u16, version: &str) -> Self {
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--profile", "real1"])
            .env("NONSTOP_VERSION", version)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_listens(port, "hello");
        Self(child)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Raises this process's open-file limit, which the proxy and the app it starts inherit:
/// the soft limit to the hard one, and the hard one to `wanted` when this process may
/// (CAP_SYS_RESOURCE). Returns the soft limit now in force.
fn raise_open_files(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let ceiling: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(wanted);
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        let higher = wanted.min(ceiling).max(limit.rlim_max);
        let raised = libc::rlimit {
            rlim_cur: higher,
            rlim_max: higher,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return higher;
        }
        let soft = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return limit.rlim_max;
        }
        limit.rlim_cur
    }
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_files(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// `nonstop proxy` in front of one instance, as production runs it beside `serve`.
struct NonstopProxy {
    child: Child,
    port: u16,
    socket: PathBuf,
}

impl NonstopProxy {
    fn start(dir: &Path, live: u16, other: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        // Loopback is the only client here: trusted, so the per-client share of the
        // connection limit does not cap the idle sockets.
        std::fs::write(
            dir.join("nonstop.toml"),
            format!(
                "[server]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"data\"\nproxy_socket = \"proxy.sock\"\n\n\
                 [proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n\n\
                 [[app]]\nname = \"hello\"\nrepo = \"hello-repo\"\nbuild = \"true\"\nartifact = \"hello\"\n\
                 run = \"{{artifact}} --port {{port}} --profile {{profile}}\"\nports = [{live}, {other}]\n\
                 drain_timeout_secs = {DRAIN_SECS}\n\
                 switch = {{ kind = \"proxy\", listen = \"127.0.0.1:{port}\" }}\n",
                free_port()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("proxy.state.json"),
            format!("{{\"hello\": {live}}}"),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nonstop"))
            .args(["proxy", "--config"])
            .arg(dir.join("nonstop.toml"))
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_listens(port, "nonstop proxy");
        let proxy = Self {
            child,
            port,
            socket: dir.join("proxy.sock"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while proxy.pid().is_none() {
            assert!(Instant::now() < deadline, "no proxy.pid");
            std::thread::sleep(Duration::from_millis(5));
        }
        proxy
    }

    /// The process serving now (after an upgrade, not the child this bench started).
    fn pid(&self) -> Option<i32> {
        running_pid(&self.socket)
    }
}

impl Drop for NonstopProxy {
    fn drop(&mut self) {
        if let Some(pid) = self.pid().filter(|pid| *pid as u32 != self.child.id()) {
            // SAFETY: kill(2) on the proxy process the upgrade of this bench's proxy started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at].as_secs_f64() * 1000.0
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[derive(Clone, Copy)]
struct Echo {
    round_trips: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// ECHO_CONNECTIONS WebSockets, all open before the clock starts, each sending a message
/// and waiting for its echo ECHO_ROUND_TRIPS times (or until the time cap).
async fn echo(port: u16) -> Echo {
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut sockets = Vec::with_capacity(ECHO_CONNECTIONS);
    for _ in 0..ECHO_CONNECTIONS {
        sockets.push(tokio_tungstenite::connect_async(&url).await.unwrap().0);
    }
    let started = Instant::now();
    let deadline = started + ECHO_TIME_CAP;
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, mut socket)| {
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(ECHO_ROUND_TRIPS);
                for n in 0..ECHO_ROUND_TRIPS {
                    if Instant::now() > deadline {
                        break;
                    }
                    let text = format!("{i}.{n}");
                    let sent = Instant::now();
                    socket.send(Message::text(text.clone())).await.unwrap();
                    let reply = loop {
                        match socket.next().await {
                            Some(Ok(Message::Text(reply))) => break reply,
                            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                            other => panic!("socket {i}, round trip {n}: {other:?}"),
                        }
                    };
                    samples.push(sent.elapsed());
                    assert!(
                        reply.as_str().ends_with(&text),
                        "{} for {text}",
                        reply.as_str()
                    );
                }
                let _ = socket.close(None).await;
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    samples.sort();
    Echo {
        round_trips: samples.len(),
        per_second: samples.len() as f64 / elapsed,
        p50_ms: percentile(&samples, 0.50),
        p99_ms: percentile(&samples, 0.99),
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens up to `count` WebSockets through `port` and leaves them idle; stops at the first
/// one that fails or at the time cap, and says why it stopped short.
async fn open_idle(port: u16, count: usize) -> (Vec<Socket>, Option<String>) {
    let url = format!("ws://127.0.0.1:{port}/ws");
    let deadline = Instant::now() + IDLE_TIME_CAP;
    let mut opening = futures_util::stream::iter(0..count)
        .map(|_| {
            let url = url.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio_tungstenite::connect_async(url),
                )
                .await
            }
        })
        .buffer_unordered(IDLE_OPENING_AT_ONCE);
    let mut open = Vec::with_capacity(count);
    while let Some(opened) = opening.next().await {
        match opened {
            Ok(Ok((socket, _))) => open.push(socket),
            Ok(Err(err)) => return (open, Some(format!("{err}"))),
            Err(_) => return (open, Some("a handshake took over 10 s".into())),
        }
        if Instant::now() > deadline {
            return (open, Some(format!("time cap {IDLE_TIME_CAP:?}")));
        }
    }
    (open, None)
}

async fn say(socket: &mut Socket, text: &str) -> String {
    socket.send(Message::text(text)).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Text(reply)))) => return reply.as_str().to_owned(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("an idle socket did not answer: {other:?}"),
        }
    }
}

/// One keep-alive HTTP request: when it started (since `origin`), how long it took, and
/// whether it got a whole 200 answer.
struct Request {
    at: Duration,
    took: Duration,
    ok: bool,
}

/// HTTP_CLIENTS keep-alive clients (one pooled connection each, as a browser) on `port`
/// until `stop`, each at most HTTP_MAX_PER_CLIENT requests and never past `cap`.
fn http_load(
    port: u16,
    origin: Instant,
    stop: Arc<AtomicBool>,
    cap: Duration,
) -> Vec<tokio::task::JoinHandle<(Vec<Request>, Vec<String>)>> {
    (0..HTTP_CLIENTS)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let url = format!("http://127.0.0.1:{port}/");
                let mut requests = Vec::new();
                let mut failures = Vec::new();
                for _ in 0..HTTP_MAX_PER_CLIENT {
                    if stop.load(Ordering::Relaxed) || origin.elapsed() > cap {
                        break;
                    }
                    let started = Instant::now();
                    let ok = match client.get(&url).send().await {
                        Ok(answer) if answer.status() == 200 => match answer.text().await {
                            Ok(_) => true,
                            Err(err) => {
                                failures.push(format!("body: {err}"));
                                false
                            }
                        },
                        Ok(answer) => {
                            failures.push(format!("status {}", answer.status()));
                            false
                        }
                        Err(err) => {
                            failures.push(format!("{err:?}"));
                            false
                        }
                    };
                    requests.push(Request {
                        at: started - origin,
                        took: started.elapsed(),
                        ok,
                    });
                }
                (requests, failures)
            })
        })
        .collect()
}

/// Replaces this benchmark's section of the report (or appends it), leaving the rest.
fn write_section(path: &Path, section: &str) {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let (before, after) = match old.find(SECTION) {
        Some(start) => {
            let rest = &old[start + SECTION.len()..];
            let end = rest.find("\n## ").map(|at| &rest[at + 1..]).unwrap_or("");
            (&old[..start], end)
        }
        None => (old.as_str(), ""),
    };
    let mut report = before.trim_end().to_owned();
    report.push_str("\n\n");
    report.push_str(section.trim_end());
    report.push('\n');
    if !after.is_empty() {
        report.push('\n');
        report.push_str(after);
    }
    std::fs::write(path, report).unwrap();
}

#[tokio::main]
async fn main() {
    let started = Instant::now();
    // How busy the machine was before this run added to it (its own thousands of app
    // threads count in the load average later).
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default();
    // The proxy admits a quarter of its open-file limit as client connections (each holds
    // a second descriptor upstream); the app and this process hold one per socket.
    let open_limit = raise_open_files(4 * IDLE_SOCKETS as u64 + 4096);
    let dir = tempfile::tempdir().unwrap();
    println!("building the example app…");
    let hello = build_hello(dir.path());
    let (a, b) = (free_port(), free_port());
    let _app = Instance::start(&hello, a, "blue");
    let proxy = NonstopProxy::start(&dir.path().join("proxy"), a, b);
    let mut rows = vec![
        "| measure | through `nonstop proxy` | direct to the app |".to_owned(),
        "| --- | --- | --- |".to_owned(),
    ];

    // 1. Echo round trips, the two taking turns.
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for _ in 0..ECHO_ROUNDS {
        direct.push(echo(a).await);
        proxied.push(echo(proxy.port).await);
    }
    let of = |runs: &[Echo], field: fn(&Echo) -> f64| median(runs.iter().map(field).collect());
    let trips = proxied.iter().map(|e| e.round_trips).min().unwrap_or(0);
    rows.push(format!(
        "| WebSocket echo, {ECHO_CONNECTIONS} connections × up to {ECHO_ROUND_TRIPS} round trips (median of {ECHO_ROUNDS} rounds; fewest round trips done in one: {trips}): round trips/s | {:.0} | {:.0} |",
        of(&proxied, |e| e.per_second),
        of(&direct, |e| e.per_second)
    ));
    rows.push(format!(
        "| … p50 / p99 ms | {:.3} / {:.3} | {:.3} / {:.3} |",
        of(&proxied, |e| e.p50_ms),
        of(&proxied, |e| e.p99_ms),
        of(&direct, |e| e.p50_ms),
        of(&direct, |e| e.p99_ms)
    ));
    for row in &rows {
        println!("{row}");
    }

    // 2. Memory per idle WebSocket on the proxy.
    let pid = proxy.pid().unwrap();
    let admitted = (open_limit / 4) as usize;
    let wanted = IDLE_SOCKETS.min(admitted.saturating_sub(64));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let (mut idle, stopped) = open_idle(proxy.port, wanted).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    // They are real tunnels: a few of them still echo.
    let held = idle.len();
    for socket in idle.iter_mut().step_by((held / 10).max(1)) {
        assert!(say(socket, "still there").await.ends_with("still there"));
    }
    let per = (after.saturating_sub(before)) as f64 / held.max(1) as f64;
    let short = match (&stopped, wanted < IDLE_SOCKETS) {
        (Some(why), _) => format!(" (stopped at {held} of {wanted}: {why})"),
        (None, true) => format!(
            " ({held}, not {IDLE_SOCKETS}: the open-file hard limit here, {open_limit}, lets the proxy admit {admitted} client connections, a quarter of it)"
        ),
        (None, false) => String::new(),
    };
    rows.push(format!(
        "| RSS of the proxy process: before / with {held} idle WebSockets open{short} | {:.1} MiB / {:.1} MiB | |",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    ));
    rows.push(format!(
        "| … per idle WebSocket (RSS difference ÷ count) | {per:.1} KiB | |"
    ));
    println!("{}\n{}", rows[rows.len() - 2], rows[rows.len() - 1]);
    drop(idle);
    // The old process would keep them for its drain window: let them close first.
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_files(pid) > 200 {
        assert!(
            Instant::now() < deadline,
            "the proxy still holds {} files",
            open_files(pid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 3. The upgrade in place under keep-alive load.
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let cap = STEADY + AFTER_HANDOVER + Duration::from_secs(60);
    let load = http_load(proxy.port, origin, stop.clone(), cap);
    tokio::time::sleep(STEADY).await;
    let signalled = origin.elapsed();
    let (old, new) = upgrade_process(&proxy.socket)
        .await
        .unwrap()
        .expect("a proxy process runs");
    let answered = origin.elapsed();
    tokio::time::sleep(AFTER_HANDOVER).await;
    stop.store(true, Ordering::Relaxed);
    let (mut requests, mut failures) = (Vec::new(), Vec::new());
    for task in load {
        let (r, f) = task.await.unwrap();
        requests.extend(r);
        failures.extend(f);
    }
    // Steady: the first STEADY seconds, after a second of warm-up. During the handover:
    // from the signal until a second after the new process answered its control socket.
    let window = |from: Duration, to: Duration| {
        let mut took: Vec<Duration> = requests
            .iter()
            .filter(|r| r.at >= from && r.at < to)
            .map(|r| r.took)
            .collect();
        took.sort();
        took
    };
    let steady = window(Duration::from_secs(1), signalled);
    let handover = window(signalled, answered + Duration::from_secs(1));
    let failed = requests.iter().filter(|r| !r.ok).count();
    rows.push(format!(
        "| keep-alive HTTP, {HTTP_CLIENTS} clients: p99 steady ({} requests) / during the upgrade, signal → 1 s after the new process answered ({:.0} ms, {} requests) | {:.2} ms / {:.2} ms (max {:.1} ms) | |",
        steady.len(),
        (answered - signalled).as_secs_f64() * 1000.0,
        handover.len(),
        percentile(&steady, 0.99),
        percentile(&handover, 0.99),
        percentile(&handover, 1.0)
    ));
    rows.push(format!(
        "| … failed requests across the handover (pid {old} → {new}) | {failed} of {} | |",
        requests.len()
    ));
    println!("{}\n{}", rows[rows.len() - 2], rows[rows.len() - 1]);
    drop(proxy);
    assert_eq!(
        failed,
        0,
        "requests failed across the upgrade: {:?}",
        &failures[..failures.len().min(10)]
    );
    println!("\n(done in {:.0} s)", started.elapsed().as_secs_f64());

    if let Ok(path) = std::env::var("NONSTOP_BENCH_REPORT") {
        let section = format!(
            "{SECTION}\n\n`scripts/bench ws` on {} ({} cores, load average {load_average} when it started: \
             other builds shared the machine, so take the ratios rather than the absolute \
             figures), release build, loopback: this process, `nonstop proxy` and one \
             examples/hello instance (a thread per connection) share the cores. Echo: each \
             connection sends a text message and waits for its echo before the next. Memory: \
             VmRSS of the `nonstop proxy` process from `/proc/<pid>/status`. Upgrade: \
             `nonstop proxy --upgrade` (SIGUSR2 to the pid in `proxy.pid`) while reqwest \
             clients, one keep-alive connection each, ask for `/`; every request counts, and a \
             request fails unless a whole 200 answer came back.\n\n{}\n",
            chrono::Utc::now().format("%Y-%m-%d"),
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            rows.join("\n")
        );
        write_section(Path::new(&path), &section);
    }
}
