//! nonstop's promise in figures: requests lost across deploys, proxy throughput, latency and
//! CPU per request, switch latency, push→live time and memory — the built-in proxy (as the
//! `nonstop proxy` process) beside nginx (an `upstream` keep-alive pool, and the classic
//! include + reload) and HAProxy (runtime API), same backend, same machine, same run. Run it
//! with `scripts/bench`, which installs wrk, nginx and HAProxy first; it prints the tables
//! and writes them to docs/benchmarks.md. Loopback only; every load is bounded in time and
//! every loop in count.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nonstop::switch::control::RemoteProxy;
use nonstop::switch::nginx::{Nginx as NginxSwitch, render_include};
use nonstop::switch::{SwitchError, TrafficSwitch};
use serde_json::Value;

const ADMIN_TOKEN: &str = "bench-admin-token-of-at-least-32-bytes";
const SECRET: &str = "bench-secret";
const DEPLOYS: usize = 20;
const LOAD_SECONDS: u64 = 8;
/// The proxies run one after the other, in a rotating order, this many times; the table
/// gives each one's median.
const ROUNDS: usize = 3;
/// What a reverse proxy in front of an app sends it about the client, configured alike in
/// all three so that each does the same work per request.
const NGINX_FORWARDING: &str = "proxy_set_header Host $host; proxy_set_header X-Real-IP $remote_addr; \
     proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Forwarded-Proto $scheme; \
     proxy_set_header X-Forwarded-Host $host;";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|err| panic!("{command:?}: {err}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// --- the example app, started directly -------------------------------------------------

fn build_hello(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    let target = dir.join("hello-target");
    run(Command::new("cargo")
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(&target)
        .current_dir(&source));
    target.join("release/hello")
}

struct Instance(Child);

impl Instance {
    fn start(bin: &Path, port: u16, profile: &str, version: &str) -> Self {
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--profile", profile])
            .env("NONSTOP_VERSION", version)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_answers(port);
        Self(child)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_answers(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(port, "/").is_none() {
        assert!(Instant::now() < deadline, "nothing answers on {port}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One GET on a fresh connection; the body, if the answer was 200.
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.trim().to_owned())
}

// --- nginx, configured as in the classic recipe ------------------------------------------

struct NginxServer {
    conf: PathBuf,
    include: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl NginxServer {
    /// `port` proxies as the classic recipe does (`proxy_pass $service_url`, a new upstream
    /// connection per request); `kept_port`, when given, to the same upstream through an
    /// `upstream` block with keep-alive connections, nginx at its fastest.
    fn start(dir: &Path, port: u16, upstream: u16, kept_port: Option<u16>) -> Self {
        for sub in ["logs", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let d = dir.display();
        let include = dir.join("service-url.inc");
        std::fs::write(&include, render_include(upstream)).unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\nworker_processes auto;\n\
                 events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n\
                 client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n\
                 fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n\
                 server {{\n    listen 127.0.0.1:{port};\n    include {d}/service-url.inc;\n\
                 location / {{ proxy_pass $service_url; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n{kept}}}\n",
                kept = match kept_port {
                    Some(kept) => format!(
                        "  upstream kept {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n\
                         server {{ listen 127.0.0.1:{kept}; location / {{ proxy_pass http://kept; \
                         proxy_http_version 1.1; proxy_set_header Connection \"\"; {NGINX_FORWARDING} }} }}\n"
                    ),
                    None => String::new(),
                }
            ),
        )
        .unwrap();
        // In the foreground, as a child of this process like the other proxies: a daemon
        // calls setsid(), and with the kernel's autogroup scheduling its own session would
        // get a share of the cores of its own instead of sharing this run's (measured here:
        // 5,000 instead of 28,000 req/s on a busy machine).
        let log = std::fs::File::create(dir.join("logs/stderr.log")).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx does not listen on {port}");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self {
            conf,
            include,
            dir: dir.to_owned(),
            child,
        }
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master: u32 = std::fs::read_to_string(self.dir.join("nginx.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        with_children(master)
    }

    fn switch(&self) -> NginxSwitch {
        NginxSwitch::new(
            self.include.clone(),
            "nginx".into(),
            Some(self.conf.clone()),
        )
    }
}

impl Drop for NginxServer {
    fn drop(&mut self) {
        let _ = Command::new("nginx")
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "stop"])
            .output();
        let _ = self.child.wait();
    }
}

// --- wrk -----------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Wrk {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
}

fn wrk_command(port: u16, connections: u32, seconds: u64) -> Command {
    wrk_threads(2, port, connections, seconds)
}

fn wrk_threads(threads: u32, port: u16, connections: u32, seconds: u64) -> Command {
    let mut command = Command::new("wrk");
    command
        .args([
            &format!("-t{threads}"),
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "--timeout",
            "5s",
        ])
        .arg(format!("http://127.0.0.1:{port}/"));
    command
}

fn millis(text: &str) -> f64 {
    let number: f64 = text
        .trim_end_matches(|c: char| c.is_alphabetic())
        .parse()
        .unwrap_or(f64::NAN);
    match text.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.') {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => f64::NAN,
    }
}

fn parse_wrk(out: &str) -> Wrk {
    let mut report = Wrk::default();
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => report.p50_ms = millis(value),
            ["99%", value] => report.p99_ms = millis(value),
            [count, "requests", "in", ..] => report.requests = count.parse().unwrap_or(0),
            ["Requests/sec:", value] => report.rps = value.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                report.failed += count.parse::<u64>().unwrap_or(0)
            }
            ["Socket", "errors:", rest @ ..] => {
                report.failed += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    report
}

// --- the proxies compared, each in processes of its own ------------------------------------

/// `pid` and its direct children (nginx's workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        if fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// User + system CPU seconds the processes have used so far (all their threads).
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let fields: Vec<u64> = stat
                .rsplit_once(')')
                .map(|(_, rest)| {
                    rest.split_whitespace()
                        .map(|f| f.parse().unwrap_or(0))
                        .collect()
                })
                .unwrap_or_default();
            // utime and stime: fields 14 and 15 of the whole line, 12 and 13 after the name.
            (fields.get(11).unwrap_or(&0) + fields.get(12).unwrap_or(&0)) as f64 / ticks_per_second
        })
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn wait_listens(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// nonstop's built-in proxy as `nonstop proxy`, the process that runs it in production when
/// `server.proxy_socket` is set, so that only the proxy's own CPU is counted.
struct NonstopProxy {
    child: Child,
    port: u16,
    socket: PathBuf,
}

impl NonstopProxy {
    fn start(dir: &Path, live: u16, other: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        std::fs::write(
            dir.join("nonstop.toml"),
            format!(
                "[server]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"data\"\nproxy_socket = \"proxy.sock\"\n\n\
                 [[app]]\nname = \"hello\"\nrepo = \"hello-repo\"\nbuild = \"true\"\nartifact = \"hello\"\n\
                 run = \"{{artifact}} --port {{port}} --profile {{profile}}\"\nports = [{live}, {other}]\n\
                 switch = {{ kind = \"proxy\", listen = \"127.0.0.1:{port}\" }}\n",
                free_port()
            ),
        )
        .unwrap();
        // The proxy process starts on the live port it saved last.
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
        Self {
            child,
            port,
            socket: dir.join("proxy.sock"),
        }
    }

    async fn switch(&self) -> RemoteProxy {
        RemoteProxy::connect(self.socket.clone(), "hello".into(), None)
            .await
            .unwrap()
    }
}

impl Drop for NonstopProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy with both instances as servers of one backend, one of them in maintenance;
/// switched through its runtime API, without a reload.
struct Haproxy {
    child: Child,
    port: u16,
    socket: PathBuf,
    ports: [u16; 2],
}

impl Haproxy {
    fn start(dir: &Path, ports: [u16; 2]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let socket = dir.join("haproxy.sock");
        let conf = dir.join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n  stats socket {} mode 600 level admin\n  maxconn 4096\n\
                 defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 http-reuse always\n  option forwardfor\n\
                 frontend web\n  bind 127.0.0.1:{port}\n  http-request set-header X-Real-IP %[src]\n\
                 http-request set-header X-Forwarded-Proto http\n  http-request set-header X-Forwarded-Host %[req.hdr(host)]\n\
                 default_backend app\n\
                 backend app\n  server p{a} 127.0.0.1:{a}\n  server p{b} 127.0.0.1:{b} disabled\n",
                socket.display(),
                a = ports[0],
                b = ports[1],
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("haproxy.log")).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_listens(port, "haproxy");
        Self {
            child,
            port,
            socket,
            ports,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[async_trait]
impl TrafficSwitch for Haproxy {
    fn live(&self) -> Option<u16> {
        None
    }

    async fn switch_to(&self, port: u16) -> Result<(), SwitchError> {
        let other = if port == self.ports[0] {
            self.ports[1]
        } else {
            self.ports[0]
        };
        let mut api = std::os::unix::net::UnixStream::connect(&self.socket)?;
        writeln!(
            api,
            "set server app/p{port} state ready; set server app/p{other} state maint"
        )?;
        let mut answer = String::new();
        api.read_to_string(&mut answer)?;
        match answer.trim() {
            "" => Ok(()),
            error => Err(SwitchError::Rejected(error.to_owned())),
        }
    }
}

/// One proxy under test: where it listens and the processes whose CPU counts.
struct Contender {
    name: &'static str,
    port: u16,
    pids: Vec<u32>,
}

#[derive(Clone, Copy, Default)]
struct Measured {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_request: f64,
    rss_mib: f64,
    failed: u64,
}

fn measure(contender: &Contender, connections: u32) -> Measured {
    let before = cpu_seconds(&contender.pids);
    let load = parse_wrk(&run(&mut wrk_threads(
        1,
        contender.port,
        connections,
        LOAD_SECONDS,
    )));
    let cpu = cpu_seconds(&contender.pids) - before;
    Measured {
        rps: load.rps,
        p50_ms: load.p50_ms,
        p99_ms: load.p99_ms,
        cpu_us_per_request: cpu * 1e6 / load.requests.max(1) as f64,
        rss_mib: contender.pids.iter().map(|&pid| rss_kib(pid)).sum::<u64>() as f64 / 1024.0,
        failed: load.failed,
    }
}

/// Each field's median over the rounds.
fn medians(runs: &[Measured]) -> Measured {
    let of = |field: fn(&Measured) -> f64| median(runs.iter().map(field).collect());
    Measured {
        rps: of(|m| m.rps),
        p50_ms: of(|m| m.p50_ms),
        p99_ms: of(|m| m.p99_ms),
        cpu_us_per_request: of(|m| m.cpu_us_per_request),
        rss_mib: of(|m| m.rss_mib),
        failed: runs.iter().map(|m| m.failed).sum(),
    }
}

// --- a real nonstop serve ------------------------------------------------------------------

struct Server {
    child: Child,
    dir: PathBuf,
    base: String,
    proxy_port: u16,
    repo: PathBuf,
    http: reqwest::Client,
}

fn git(dir: &Path, args: &[&str]) -> String {
    run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
        .args(args))
    .trim()
    .to_owned()
}

impl Server {
    async fn start(dir: PathBuf, switch: &str, proxy_port: u16, ports: [u16; 2]) -> Self {
        let repo = dir.join("hello-repo");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
        std::fs::create_dir_all(repo.join("src")).unwrap();
        for file in ["Cargo.toml", ".gitignore", "src/main.rs"] {
            std::fs::copy(source.join(file), repo.join(file)).unwrap();
        }
        git(&repo, &["init", "--quiet", "-b", "main"]);
        git(&repo, &["add", "--all"]);
        git(&repo, &["commit", "--quiet", "-m", "bench"]);
        let port = free_port();
        std::fs::write(
            dir.join("nonstop.toml"),
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\n\n[[app]]\nname = \"hello\"\n\
                 repo = \"hello-repo\"\nwebhook_secret_env = \"BENCH_SECRET\"\n\
                 build = \"cargo build --release --target-dir target\"\nartifact = \"target/release/hello\"\n\
                 run = \"{{artifact}} --port {{port}} --profile {{profile}}\"\nports = [{}, {}]\n\
                 health = {{ path = \"/profile\", attempts = 100, interval_ms = 50 }}\nguard = false\n{switch}\n",
                ports[0], ports[1]
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nonstop"))
            .args(["serve", "--config"])
            .arg(dir.join("nonstop.toml"))
            .env("BENCH_SECRET", SECRET)
            .env("NONSTOP_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = Self {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
            proxy_port,
            repo,
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server
            .http
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "nonstop did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    async fn json(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Queues a deploy of the branch head and waits until it ended; returns it with stages.
    async fn deploy(&self) -> Value {
        let record = self.deploy_ended().await;
        let status = record["deployment"]["status"].as_str().unwrap_or("");
        assert_eq!(status, "succeeded", "{record:#}");
        record
    }

    /// Queues a deploy of the branch head and waits until it ended, however it ended.
    async fn deploy_ended(&self) -> Value {
        let answer: Value = self
            .http
            .post(format!("{}/api/apps/hello/deploy", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        self.wait_ended(answer["deployment_id"].as_i64().expect("a deployment id"))
            .await
    }

    async fn wait(&self, id: i64) -> Value {
        let done = self.wait_ended(id).await;
        let status = done["deployment"]["status"].as_str().unwrap_or("");
        assert_eq!(status, "succeeded", "deployment {id}: {done:#}");
        done
    }

    async fn wait_ended(&self, id: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let done = self.json(&format!("/api/deployments/{id}")).await;
            let status = done["deployment"]["status"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            if !["queued", "running"].contains(&status.as_str()) {
                return done;
            }
            assert!(Instant::now() < deadline, "deployment {id} took over 300 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for entry in std::fs::read_dir(self.dir.join("data/apps/hello/run"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(pid) = std::fs::read_to_string(entry.path())
                .unwrap_or_default()
                .trim()
                .parse::<i32>()
            {
                // SAFETY: kill(2) on an instance this benchmark's server started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// DEPLOYS real deployments while wrk holds `connections` keep-alive connections on the
/// server's entry port; returns what wrk saw and each deployment's record.
async fn deploys_under_load(server: &Server, connections: u32) -> (Wrk, Vec<Value>) {
    // Long enough for every deploy; stopped (SIGINT: wrk then prints its summary) as soon as
    // they are done.
    let load = wrk_command(server.proxy_port, connections, 240)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // let wrk open its connections
    let mut records = Vec::with_capacity(DEPLOYS);
    for _ in 0..DEPLOYS {
        let record = server.deploy_ended().await;
        let deployment = &record["deployment"];
        // The one failure a busy machine may cause: the switch's last look at the new
        // instance timed out, so traffic stayed where it was. It is counted, not hidden;
        // any other failure ends the run.
        let refused = deployment["status"] == "failed"
            && deployment["error"]
                .as_str()
                .is_some_and(|e| e.contains("traffic stays where it was"));
        assert!(deployment["status"] == "succeeded" || refused, "{record:#}");
        records.push(record);
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // the last version serves a while
    // SAFETY: signals the wrk child this function started.
    unsafe { libc::kill(load.id() as i32, libc::SIGINT) };
    let out = load.wait_with_output().unwrap();
    (parse_wrk(&String::from_utf8_lossy(&out.stdout)), records)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// From a switch call returning to the first answer of the new version, fresh connection
/// each poll (ms, median of 20).
async fn switch_latency(
    switch: &dyn TrafficSwitch,
    entry: u16,
    ports: [u16; 2],
    versions: [&str; 2],
) -> f64 {
    let mut samples = Vec::new();
    for round in 0..20 {
        let to = round % 2;
        switch.switch_to(ports[to]).await.unwrap();
        let switched = Instant::now();
        let deadline = switched + Duration::from_secs(5);
        loop {
            if get(entry, "/").as_deref() == Some(versions[to]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the switch to {} never took effect",
                ports[to]
            );
        }
        samples.push(switched.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    median(samples)
}

/// Holds `count` idle keep-alive client connections on `port`, each after one request.
fn idle_connections(port: u16, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(stream, "GET / HTTP/1.1\r\nHost: bench\r\n\r\n").unwrap();
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf).unwrap();
            stream
        })
        .collect()
}

// --- HTTPS: the shared edge beside nginx (`ssl` + `http2`) and HAProxy (`ssl crt`) -------

/// One certificate for `localhost` that all three serve.
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_file, key_file, both) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("both.pem"),
    );
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::write(&both, format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
    (cert_file, key_file, both)
}

/// nonstop's edge in `nonstop proxy`, TLS on `port` for `localhost`, the default app.
fn start_edge(dir: &Path, live: u16, other: u16, cert: &Path, key: &Path) -> (Child, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    std::fs::write(
        dir.join("nonstop.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"data\"\nproxy_socket = \"proxy.sock\"\n\n\
             [proxy]\nhttps = \"127.0.0.1:{port}\"\ndefault_app = \"hello\"\n\n\
             [[app]]\nname = \"hello\"\nrepo = \"hello-repo\"\nbuild = \"true\"\nartifact = \"hello\"\n\
             run = \"{{artifact}} --port {{port}} --profile {{profile}}\"\nports = [{live}, {other}]\n\
             hosts = [\"localhost\"]\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n",
            free_port(),
            cert.display(),
            key.display(),
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
    wait_listens(port, "nonstop's edge");
    (child, port)
}

/// nginx with `listen … ssl http2` and an `upstream` keep-alive pool.
fn start_nginx_tls(dir: &Path, upstream: u16, cert: &Path, key: &Path) -> (NginxServer, u16) {
    for sub in ["logs", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let d = dir.display();
    let port = free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, format!(
        "daemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\nworker_processes auto;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n\
         client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n\
         fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n\
         upstream kept {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n\
         keepalive_requests 1000000;\n\
         server {{ listen 127.0.0.1:{port} ssl http2; ssl_certificate {}; ssl_certificate_key {};\n\
         location / {{ proxy_pass http://kept; proxy_http_version 1.1; proxy_set_header Connection \"\"; {NGINX_FORWARDING} }} }}\n}}\n",
        cert.display(), key.display()
    )).unwrap();
    std::fs::write(dir.join("service-url.inc"), render_include(upstream)).unwrap();
    let log = std::fs::File::create(dir.join("logs/stderr.log")).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_listens(port, "nginx (TLS)");
    let server = NginxServer {
        conf,
        include: dir.join("service-url.inc"),
        dir: dir.to_owned(),
        child,
    };
    (server, port)
}

/// HAProxy with `bind … ssl crt … alpn h2,http/1.1` and `http-reuse always`.
fn start_haproxy_tls(dir: &Path, upstream: u16, both: &Path) -> (Child, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let conf = dir.join("haproxy.cfg");
    std::fs::write(&conf, format!(
        "global\n  maxconn 4096\n  nbthread 2\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         http-reuse always\n  option forwardfor\n\
         frontend web\n  bind 127.0.0.1:{port} ssl crt {} alpn h2,http/1.1\n  http-request set-header X-Real-IP %[src]\n\
         http-request set-header X-Forwarded-Proto https\n  http-request set-header X-Forwarded-Host %[req.hdr(host)]\n\
         default_backend app\n\
         backend app\n  server p{upstream} 127.0.0.1:{upstream}\n",
        both.display()
    )).unwrap();
    let log = std::fs::File::create(dir.join("haproxy.log")).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&conf)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_listens(port, "haproxy (TLS)");
    (child, port)
}

/// How a load reaches a TLS listener.
#[derive(Clone, Copy, PartialEq)]
enum TlsLoad {
    /// wrk: HTTP/1.1 keep-alive.
    Http1,
    /// h2load: HTTP/2, one stream per connection at a time (as many requests in flight as
    /// wrk's).
    Http2,
    /// wrk with `Connection: close`: one full handshake per request.
    Handshakes,
}

fn tls_load(load: TlsLoad, port: u16, connections: u32, dir: &Path) -> Wrk {
    let url = format!("https://127.0.0.1:{port}/");
    match load {
        TlsLoad::Http1 | TlsLoad::Handshakes => {
            let mut command = Command::new("wrk");
            command.args([
                "-t1",
                &format!("-c{connections}"),
                &format!("-d{LOAD_SECONDS}s"),
                "--latency",
                "--timeout",
                "5s",
            ]);
            if load == TlsLoad::Handshakes {
                command.args(["-H", "Connection: close"]);
            }
            parse_wrk(&run(command.arg(&url)))
        }
        TlsLoad::Http2 => {
            // Its own file each run: h2load writes none when it fails, and an old one would
            // pass for this run's.
            let log = dir.join(format!("h2load-{port}.log"));
            let _ = std::fs::remove_file(&log);
            let out = run(Command::new("h2load")
                .args(["-t1", &format!("-c{connections}"), "-m1", "-D"])
                .arg(LOAD_SECONDS.to_string())
                .arg("--log-file")
                .arg(&log)
                .arg(&url));
            let mut report = Wrk::default();
            let mut times: Vec<f64> = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|line| line.split('\t').nth(2)?.parse::<f64>().ok())
                .map(|us| us / 1000.0)
                .collect();
            times.sort_by(|a, b| a.total_cmp(b));
            let at = |q: f64| {
                times
                    .get(((times.len() as f64 - 1.0) * q) as usize)
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            report.p50_ms = at(0.5);
            report.p99_ms = at(0.99);
            for line in out.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["finished", "in", _, rps, "req/s,", ..] => {
                        report.rps = rps.parse().unwrap_or(0.0)
                    }
                    [
                        "requests:",
                        _,
                        "total,",
                        _,
                        "started,",
                        done,
                        "done,",
                        ok,
                        "succeeded,",
                        ..,
                    ] => {
                        let (done, ok): (u64, u64) =
                            (done.parse().unwrap_or(0), ok.parse().unwrap_or(0));
                        report.requests = ok;
                        report.failed += done - ok.min(done);
                    }
                    _ => {}
                }
            }
            report
        }
    }
}

/// The HTTPS table: three loads, three proxies in a rotating order, medians of the rounds.
fn https_side_by_side(dir: &Path, upstream: u16, other: u16) -> Vec<String> {
    let (cert, key, both) = tls_files(&dir.join("tls"));
    let (mut edge, edge_port) = start_edge(&dir.join("edge"), upstream, other, &cert, &key);
    let (nginx, nginx_port) = start_nginx_tls(&dir.join("nginx-tls"), upstream, &cert, &key);
    let (mut haproxy, haproxy_port) = start_haproxy_tls(&dir.join("haproxy-tls"), upstream, &both);
    let contenders = [
        Contender {
            name: "nonstop edge",
            port: edge_port,
            pids: vec![edge.id()],
        },
        Contender {
            name: "nginx, `ssl http2` + `keepalive 64`",
            port: nginx_port,
            pids: nginx.pids(),
        },
        Contender {
            name: "HAProxy, `ssl crt` + `http-reuse always`",
            port: haproxy_port,
            pids: vec![haproxy.id()],
        },
    ];
    let mut rows = vec![
        "| proxy | load | connections | req/s | p50 / p99 ms | CPU µs per request | CPU vs nginx | CPU vs HAProxy | req/s vs nginx |".to_owned(),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |".to_owned(),
    ];
    for (load, what) in [
        (TlsLoad::Http1, "HTTP/1.1 keep-alive (wrk)"),
        (TlsLoad::Http2, "HTTP/2 (h2load, 1 stream per connection)"),
        (
            TlsLoad::Handshakes,
            "a new TLS handshake per request (wrk, `Connection: close`)",
        ),
    ] {
        let connections = 50;
        let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); contenders.len()];
        for round in 0..ROUNDS {
            for k in 0..contenders.len() {
                let i = (round + k) % contenders.len();
                let contender = &contenders[i];
                let before = cpu_seconds(&contender.pids);
                let result = tls_load(load, contender.port, connections, dir);
                let cpu = cpu_seconds(&contender.pids) - before;
                runs[i].push(Measured {
                    rps: result.rps,
                    p50_ms: result.p50_ms,
                    p99_ms: result.p99_ms,
                    cpu_us_per_request: cpu * 1e6 / result.requests.max(1) as f64,
                    rss_mib: 0.0,
                    failed: result.failed,
                });
            }
        }
        let results: Vec<Measured> = runs.iter().map(|r| medians(r)).collect();
        let (by_nginx, by_haproxy) = (results[1], results[2]);
        for (contender, m) in contenders.iter().zip(&results) {
            rows.push(format!(
                "| {} | {what} | {connections} | {:.0} | {:.2} / {:.2} | {:.1} | {:.2}× | {:.2}× | {:.2}× |",
                contender.name,
                m.rps,
                m.p50_ms,
                m.p99_ms,
                m.cpu_us_per_request,
                m.cpu_us_per_request / by_nginx.cpu_us_per_request,
                m.cpu_us_per_request / by_haproxy.cpu_us_per_request,
                m.rps / by_nginx.rps,
            ));
            println!("{}  (failed: {})", rows.last().unwrap(), m.failed);
        }
    }
    let _ = edge.kill();
    let _ = edge.wait();
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    drop(nginx);
    rows
}

/// The HTTPS section of the report, between its heading and the next one.
fn https_section(rows: &[String]) -> String {
    format!(
        "## HTTPS: the shared edge, nginx and HAProxy\n\n`scripts/bench https`: TLS 1.3 \
         (each proxy's default suite), one ECDSA P-256 certificate for all three, to the same \
         examples/hello instance over HTTP/1.1 keep-alive; {ROUNDS} rounds of {LOAD_SECONDS} s in a \
         rotating order, medians. CPU is the proxy's own processes (`/proc/<pid>/stat`) over the \
         run ÷ requests. nonstop's edge runs in `nonstop proxy` (2 worker threads), nginx with \
         `worker_processes auto` (2), HAProxy with `nbthread 2`.\n\n{}\n",
        rows.join("\n")
    )
}

/// Puts `section` in place of the report's HTTPS section (or at its end).
fn replace_https_section(path: &str, section: &str) {
    let report = std::fs::read_to_string(path).unwrap_or_default();
    let heading = "## HTTPS: ";
    let updated = match report.find(heading) {
        Some(start) => {
            let end = report[start + heading.len()..]
                .find("\n## ")
                .map_or(report.len(), |at| start + heading.len() + at + 1);
            format!("{}{section}{}", &report[..start], &report[end..])
        }
        None => format!("{}\n\n{section}", report.trim_end()),
    };
    std::fs::write(path, updated).unwrap();
}

#[tokio::main]
async fn main() {
    if std::env::var("NONSTOP_BENCH_ONLY").as_deref() == Ok("https") {
        let dir = tempfile::tempdir().unwrap();
        println!("building the example app…");
        let hello = build_hello(dir.path());
        let (a, b) = (free_port(), free_port());
        let _blue = Instance::start(&hello, a, "real1", "blue");
        let rows = https_side_by_side(dir.path(), a, b);
        println!("\n{}", rows.join("\n"));
        if let Ok(path) = std::env::var("NONSTOP_BENCH_REPORT") {
            replace_https_section(&path, &https_section(&rows));
        }
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut table = Vec::<String>::new();
    let mut row = |line: String| {
        println!("{line}");
        table.push(line);
    };
    println!("building the example app…");
    let hello = build_hello(dir.path());
    let (a, b) = (free_port(), free_port());
    let _blue = Instance::start(&hello, a, "real1", "blue");
    let _green = Instance::start(&hello, b, "real2", "green");

    // 2. The proxies side by side, each in processes of its own: throughput, latency, the
    // CPU their processes used per request, memory. They take turns, in a rotating order.
    let nonstop = NonstopProxy::start(&dir.path().join("nonstop-proxy"), a, b);
    let nginx_port = free_port();
    let kept_port = free_port();
    let nginx = NginxServer::start(&dir.path().join("nginx"), nginx_port, a, Some(kept_port));
    let haproxy = Haproxy::start(&dir.path().join("haproxy"), [a, b]);
    let contenders = [
        Contender {
            name: "nonstop proxy",
            port: nonstop.port,
            pids: vec![nonstop.child.id()],
        },
        Contender {
            name: "nginx, `upstream` + `keepalive 64`",
            port: kept_port,
            pids: nginx.pids(),
        },
        Contender {
            name: "HAProxy, `http-reuse always`",
            port: haproxy.port,
            pids: vec![haproxy.child.id()],
        },
    ];
    let mut failed_in_throughput = 0;
    let mut proxies = vec![
        "| proxy | connections | req/s | p50 / p99 ms | CPU µs per request | RSS MiB | CPU vs nginx | CPU vs HAProxy | p99 vs HAProxy |".to_owned(),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |".to_owned(),
    ];
    for connections in [50, 200] {
        let direct = parse_wrk(&run(&mut wrk_threads(1, a, connections, LOAD_SECONDS)));
        failed_in_throughput += direct.failed;
        let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); contenders.len()];
        for round in 0..ROUNDS {
            for k in 0..contenders.len() {
                let i = (round + k) % contenders.len();
                runs[i].push(measure(&contenders[i], connections));
            }
        }
        let results: Vec<Measured> = runs.iter().map(|r| medians(r)).collect();
        let (by_nginx, by_haproxy) = (results[1], results[2]);
        for (contender, m) in contenders.iter().zip(&results) {
            failed_in_throughput += m.failed;
            proxies.push(format!(
                "| {} | {connections} | {:.0} | {:.2} / {:.2} | {:.1} | {:.1} | {:.2}× | {:.2}× | {:.2}× |",
                contender.name,
                m.rps,
                m.p50_ms,
                m.p99_ms,
                m.cpu_us_per_request,
                m.rss_mib,
                m.cpu_us_per_request / by_nginx.cpu_us_per_request,
                m.cpu_us_per_request / by_haproxy.cpu_us_per_request,
                m.p99_ms / by_haproxy.p99_ms,
            ));
            println!("{}", proxies.last().unwrap());
        }
        proxies.push(format!(
            "| direct to the app | {connections} | {:.0} | {:.2} / {:.2} | | | | | |",
            direct.rps, direct.p50_ms, direct.p99_ms
        ));
        println!("{}", proxies.last().unwrap());
    }

    // 2b. The same over HTTPS, with the shared edge.
    let https_rows = https_side_by_side(&dir.path().join("https"), a, b);

    // 3. Switch latency.
    row("| measure | nonstop | nginx (classic include + reload) | HAProxy (runtime API) |".into());
    row("| --- | --- | --- | --- |".into());
    let remote = nonstop.switch().await;
    let proxy_switch = switch_latency(&remote, nonstop.port, [b, a], ["green", "blue"]).await;
    let nginx_switch = switch_latency(&nginx.switch(), nginx_port, [b, a], ["green", "blue"]).await;
    let haproxy_switch = switch_latency(&haproxy, haproxy.port, [b, a], ["green", "blue"]).await;
    row(format!(
        "| switch: call returned → first answer of the new version (median of 20) | {proxy_switch:.3} ms | {nginx_switch:.1} ms | {haproxy_switch:.3} ms |"
    ));
    drop((nginx, haproxy, nonstop));

    // 1. Requests lost during real deploys, and 4. push→live, through nonstop serve.
    let via_proxy = {
        let proxy_port = free_port();
        let switch =
            format!("switch = {{ kind = \"proxy\", listen = \"127.0.0.1:{proxy_port}\" }}");
        Server::start(
            dir.path().join("serve-proxy"),
            &switch,
            proxy_port,
            [free_port(), free_port()],
        )
        .await
    };
    via_proxy.deploy().await; // builds the app once; later deploys reuse the build
    let idle_rss = via_proxy.rss_kib();
    let via_nginx = {
        let entry = free_port();
        let ports = [free_port(), free_port()];
        let sub = dir.path().join("serve-nginx");
        std::fs::create_dir_all(&sub).unwrap();
        let switch = format!(
            "switch = {{ kind = \"nginx\", include = \"{0}/nginx/service-url.inc\", conf = \"{0}/nginx/nginx.conf\" }}",
            sub.display()
        );
        // nginx must start with a valid include; a first instance answers there until the
        // first deploy replaces it.
        let nginx = NginxServer::start(&sub.join("nginx"), entry, ports[0], None);
        let server = Server::start(sub, &switch, entry, ports).await;
        server.deploy().await;
        (server, nginx)
    };
    for connections in [50, 200] {
        let (proxy_load, proxy_records) = deploys_under_load(&via_proxy, connections).await;
        let (nginx_load, _) = deploys_under_load(&via_nginx.0, connections).await;
        assert_eq!(proxy_records.len(), DEPLOYS);
        let live = proxy_records
            .iter()
            .filter(|r| r["deployment"]["status"] == "succeeded")
            .count();
        if live < DEPLOYS {
            println!(
                "{} of {DEPLOYS} deploys were refused by the switch's last health probe; nonstop serve's warnings:\n{}",
                DEPLOYS - live,
                std::fs::read_to_string(via_proxy.dir.join("server.log")).unwrap_or_default()
            );
        }
        row(format!(
            "| failed requests during {DEPLOYS} deploys, {connections} keep-alive connections (`nonstop serve`) | {} of {} ({live} of {DEPLOYS} deploys went live) | {} of {} | |",
            proxy_load.failed, proxy_load.requests, nginx_load.failed, nginx_load.requests
        ));
    }
    drop(via_nginx);

    // 4. Push→live for the example app (the build is incremental: the example is prebuilt).
    let mut totals = Vec::new();
    let mut by_stage: Vec<(String, Vec<f64>)> = Vec::new();
    let mut current = get(via_proxy.proxy_port, "/").unwrap();
    for round in 0..5 {
        std::fs::write(via_proxy.repo.join("NOTES"), format!("push {round}")).unwrap();
        git(&via_proxy.repo, &["add", "--all"]);
        git(&via_proxy.repo, &["commit", "--quiet", "-m", "push"]);
        let sha = git(&via_proxy.repo, &["rev-parse", "HEAD"]);
        let body = serde_json::json!({"ref": "refs/heads/main", "after": sha, "repository": {"full_name": "bench/hello"}}).to_string();
        let pushed = Instant::now();
        let answer: Value = via_proxy
            .http
            .post(format!("{}/hooks/github", via_proxy.base))
            .header("X-GitHub-Event", "push")
            .header("X-GitHub-Delivery", format!("bench-{sha}"))
            .header(
                "X-Hub-Signature-256",
                nonstop::webhook::github::sign(SECRET.as_bytes(), body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let deadline = pushed + Duration::from_secs(120);
        let served = loop {
            let now = get(via_proxy.proxy_port, "/").unwrap_or_default();
            if now != current {
                break now;
            }
            assert!(Instant::now() < deadline, "push {round} never went live");
            std::thread::sleep(Duration::from_millis(1));
        };
        totals.push(pushed.elapsed().as_secs_f64() * 1000.0);
        current = served;
        let record = via_proxy
            .wait(answer["deployment_id"].as_i64().unwrap())
            .await;
        for stage in record["stages"].as_array().unwrap() {
            let name = stage["name"].as_str().unwrap().to_owned();
            let ms = (stage["finished_at"].as_i64().unwrap_or(0)
                - stage["started_at"].as_i64().unwrap_or(0)) as f64;
            match by_stage.iter_mut().find(|(n, _)| *n == name) {
                Some((_, samples)) => samples.push(ms),
                None => by_stage.push((name, vec![ms])),
            }
        }
    }
    let split: Vec<String> = by_stage
        .into_iter()
        .map(|(name, samples)| format!("{name} {:.0}", median(samples)))
        .collect();
    row(format!(
        "| push → live, example app (median of 5) | {:.0} ms | | |",
        median(totals)
    ));
    row(format!(
        "| … by stage (median ms) | {} | | |",
        split.join(", ")
    ));

    // 5. Memory.
    let held = idle_connections(via_proxy.proxy_port, 1000);
    let loaded_rss = via_proxy.rss_kib();
    drop(held);
    row(format!(
        "| RSS of nonstop serve: idle / with 1,000 idle client connections | {:.1} MiB / {:.1} MiB | | |",
        idle_rss as f64 / 1024.0,
        loaded_rss as f64 / 1024.0
    ));
    assert_eq!(
        failed_in_throughput, 0,
        "requests failed in the throughput runs"
    );
    println!("\n{}", proxies.join("\n"));
    println!("\n(done in {:.0} s)", started.elapsed().as_secs_f64());

    if let Ok(path) = std::env::var("NONSTOP_BENCH_REPORT") {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
                })
            })
            .unwrap_or_default();
        let report = format!(
            "# Benchmarks\n\nProduced by `scripts/bench` on {} ({} cores, {cpu}), release build. Everything \
             runs on loopback on this one machine: wrk, the example app, nginx, HAProxy and nonstop \
             share the cores.\n\n## The proxies side by side\n\n`wrk -t1 -d{LOAD_SECONDS}s` through each \
             proxy to the same examples/hello instance, {ROUNDS} rounds in a rotating order, medians. \
             CPU is the proxy's own processes (user + system time from `/proc/<pid>/stat`: \
             `nonstop proxy`, nginx's master and workers, HAProxy) over the run ÷ requests \
             served; RSS is theirs after the run. All three set the same forwarding headers \
             (`Host` kept, `X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto`, \
             `X-Forwarded-Host`; nonstop also `Forwarded`).\n\n{}\n\n{}\n## Switches, deploys, memory\n\n{}\n",
            chrono::Utc::now().format("%Y-%m-%d"),
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            proxies.join("\n"),
            https_section(&https_rows),
            table.join("\n")
        );
        // `scripts/bench ws` writes a section of its own: keep its last run.
        let previous = std::fs::read_to_string(&path).unwrap_or_default();
        let ws = previous
            .find("\n## WebSockets, idle connections")
            .map(|start| {
                let rest = &previous[start + 1..];
                match rest[3..].find("\n## ") {
                    Some(end) => &rest[..end + 3],
                    None => rest,
                }
            })
            .unwrap_or("");
        let report = if ws.is_empty() {
            report
        } else {
            format!("{report}\n{}\n", ws.trim_end())
        };
        std::fs::write(path, report).unwrap();
    }
}
