//! nonstop's promise in figures: requests lost across deploys, proxy throughput and latency,
//! switch latency, push→live time and memory — the built-in proxy beside nginx (include +
//! reload), same backend, same machine, same run. Run it with `scripts/bench`, which
//! installs wrk and nginx first; it prints one table and writes it to docs/benchmarks.md.
//! Loopback only; every load is bounded in time and every loop in count.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nonstop::switch::TrafficSwitch;
use nonstop::switch::nginx::{Nginx as NginxSwitch, render_include};
use nonstop::switch::proxy::Proxy;
use serde_json::Value;

const ADMIN_TOKEN: &str = "bench-admin-token-of-at-least-32-bytes";
const SECRET: &str = "bench-secret";
const DEPLOYS: usize = 20;
const LOAD_SECONDS: u64 = 8;

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
                "daemon on;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\nworker_processes auto;\n\
                 events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n\
                 client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n\
                 fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n\
                 server {{\n    listen 127.0.0.1:{port};\n    include {d}/service-url.inc;\n\
                 location / {{ proxy_pass $service_url; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n{kept}}}\n",
                kept = match kept_port {
                    Some(kept) => format!(
                        "  upstream kept {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n\
                         server {{ listen 127.0.0.1:{kept}; location / {{ proxy_pass http://kept; \
                         proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n"
                    ),
                    None => String::new(),
                }
            ),
        )
        .unwrap();
        run(Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx does not listen on {port}");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self { conf, include }
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
    let mut command = Command::new("wrk");
    command
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "--timeout",
            "5s",
        ])
        .arg(format!("http://127.0.0.1:{port}/"));
    command
}

fn wrk(port: u16, connections: u32, seconds: u64) -> Wrk {
    parse_wrk(&run(&mut wrk_command(port, connections, seconds)))
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
                 health = {{ path = \"/profile\", attempts = 100, interval_ms = 50 }}\n{switch}\n",
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
        self.wait(answer["deployment_id"].as_i64().expect("a deployment id"))
            .await
    }

    async fn wait(&self, id: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let done = self.json(&format!("/api/deployments/{id}")).await;
            let status = done["deployment"]["status"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            if !["queued", "running"].contains(&status.as_str()) {
                assert_eq!(status, "succeeded", "deployment {id}: {done:#}");
                return done;
            }
            assert!(Instant::now() < deadline, "deployment {id} took over 300 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
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
        records.push(server.deploy().await);
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

#[tokio::main]
async fn main() {
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

    // 2. Throughput and latency: the same backend, directly, through each proxy.
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), Some(a))
        .await
        .unwrap();
    let proxy_port = proxy.local_addr().port();
    let nginx_port = free_port();
    let kept_port = free_port();
    let nginx = NginxServer::start(&dir.path().join("nginx"), nginx_port, a, Some(kept_port));
    let direct = wrk(a, 50, LOAD_SECONDS);
    let through_proxy = wrk(proxy_port, 50, LOAD_SECONDS);
    let through_nginx = wrk(nginx_port, 50, LOAD_SECONDS);
    let through_kept = wrk(kept_port, 50, LOAD_SECONDS);
    row("| measure | built-in proxy | nginx (classic include) | direct to the app |".into());
    row("| --- | --- | --- | --- |".into());
    row(format!(
        "| throughput, 50 keep-alive connections, {LOAD_SECONDS} s (req/s) | {:.0} ({:.2}× nginx, {:.2}× direct) | {:.0} ({:.2}× direct) | {:.0} |",
        through_proxy.rps,
        through_proxy.rps / through_nginx.rps,
        through_proxy.rps / direct.rps,
        through_nginx.rps,
        through_nginx.rps / direct.rps,
        direct.rps
    ));
    row(format!(
        "| … nginx with an `upstream` keep-alive pool instead (req/s, p50 / p99 ms) | {:.2}× this nginx | {:.0}, {:.2} / {:.2} | |",
        through_proxy.rps / through_kept.rps,
        through_kept.rps,
        through_kept.p50_ms,
        through_kept.p99_ms
    ));
    row(format!(
        "| latency p50 / p99 (ms) | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
        through_proxy.p50_ms,
        through_proxy.p99_ms,
        through_nginx.p50_ms,
        through_nginx.p99_ms,
        direct.p50_ms,
        direct.p99_ms
    ));
    let failed_in_throughput =
        through_proxy.failed + through_nginx.failed + through_kept.failed + direct.failed;

    // 3. Switch latency.
    let proxy_switch = switch_latency(proxy.as_ref(), proxy_port, [b, a], ["green", "blue"]).await;
    let nginx_switch = switch_latency(&nginx.switch(), nginx_port, [b, a], ["green", "blue"]).await;
    row(format!(
        "| switch: call returned → first answer of the new version (median of 20) | {:.3} ms | {:.1} ms | |",
        proxy_switch, nginx_switch
    ));
    drop(nginx);
    proxy.shutdown();

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
        row(format!(
            "| failed requests during {DEPLOYS} deploys, {connections} keep-alive connections | {} of {} | {} of {} | |",
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
            "# Benchmarks\n\nProduced by `scripts/bench` on {} ({} cores, {cpu}), {}. Everything runs on \
             loopback on this one machine: wrk, the example app, nginx and nonstop share the cores.\n\n{}\n",
            chrono::Utc::now().format("%Y-%m-%d"),
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            "release build",
            table.join("\n")
        );
        std::fs::write(path, report).unwrap();
    }
}
