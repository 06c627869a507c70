//! The shared edge: many apps and nonstop itself behind one listener, routed by host, with
//! real clients (curl over HTTP/1.1 and HTTP/2) and the real binary.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{ADMIN_TOKEN, Extra, TestApp, spawn_app_with, unique_port};

/// A second app, `world`, built from the same repository (so one commit serves both) but
/// deployed only by hand (its `repository` is not the one the test pushes to).
fn world_app(hosts: &str, tls: &str) -> String {
    format!(
        r#"
[[app]]
name = "world"
repo = "hello-repo"
repository = "someone/else"
build = "cargo build --release --target-dir target"
artifact = "target/release/hello"
version = "1.0.1-SNAPSHOT-{{timestamp}}"
run = "{{artifact}} --port {{port}} --profile {{profile}}"
ports = [{a}, {b}]
profiles = ["world1", "world2"]
health = {{ path = "/profile", attempts = 40, interval_ms = 100 }}
hook_timeout_secs = 60
hosts = [{hosts}]
{tls}
"#,
        a = unique_port(),
        b = unique_port(),
    )
}

/// The port the server announced for its edge listener `which` (`http`, `https`).
async fn edge_port(app: &TestApp, which: &str) -> u16 {
    let prefix = format!("nonstop: edge {which} on ");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = app.server_log();
        if let Some(addr) = log.lines().find_map(|line| line.strip_prefix(&prefix)) {
            return addr.trim().parse::<std::net::SocketAddr>().unwrap().port();
        }
        assert!(
            Instant::now() < deadline,
            "no edge {which} announced:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What curl saw: status, HTTP version, headers and body.
#[derive(Debug)]
pub struct Seen {
    pub status: u16,
    pub version: String,
    pub headers: String,
    pub body: String,
}

/// Runs curl with `args` (plus `--resolve` of every `names` to loopback on `port`).
pub fn curl(port: u16, names: &[&str], args: &[&str]) -> Seen {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    let mut command = Command::new("curl");
    command.args(["-sS", "--max-time", "20", "-o", "-", "-D"]);
    command.arg(&headers);
    command.args(["-w", "\n%{http_code} %{http_version}"]);
    for name in names {
        command
            .arg("--resolve")
            .arg(format!("{name}:{port}:127.0.0.1"));
    }
    let output = command.args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut tail = tail.split_whitespace();
    let status = tail.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = tail.next().unwrap_or("").to_owned();
    assert!(
        status != 0,
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Seen {
        status,
        version,
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: body.to_owned(),
    }
}

/// Deploys the head of `app` by hand through the API; waits for it to succeed.
async fn deploy_by_hand(test: &TestApp, app: &str) -> String {
    let response = test
        .http
        .post(format!("{}/api/apps/{app}/deploy", test.base()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    let id = answer["deployment_id"].as_i64().unwrap();
    let done = test.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    done["deployment"]["version"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn one_listener_routes_each_host_to_its_own_app_and_nonstop_itself_and_nothing_else() {
    let app = spawn_app_with(Extra {
        server: "proxy_process = false\nhosts = [\"deploy.test\"]".into(),
        app: r#"hosts = ["hello.test", "*.hello.test"]"#.into(),
        tables: format!(
            "[proxy]\nhttp = \"127.0.0.1:0\"\n{}",
            world_app(r#""world.test""#, "")
        ),
        ..Extra::default()
    })
    .await;
    let port = edge_port(&app, "http").await;
    let names = [
        "hello.test",
        "eu.hello.test",
        "world.test",
        "deploy.test",
        "nobody.test",
    ];
    let get = |url: &str| curl(port, &names, &[url]);
    let url = |host: &str, path: &str| format!("http://{host}:{port}{path}");

    // Nothing deployed yet: the host is known, its app has no live instance.
    assert_eq!(get(&url("hello.test", "/")).status, 503);
    let sha = app.repo.commit("Serve both");
    let hello = app.deploy(&sha).await;
    let world = deploy_by_hand(&app, "world").await;

    let seen = get(&url("hello.test", "/"));
    assert_eq!((seen.status, seen.body.trim()), (200, hello.as_str()));
    assert_eq!(seen.version, "1.1");
    // HTTP/2 without TLS, for clients that know the edge speaks it (h2c prior knowledge).
    let h2c = curl(
        port,
        &names,
        &["--http2-prior-knowledge", &url("world.test", "/profile")],
    );
    assert_eq!(
        (h2c.status, h2c.version.as_str(), h2c.body.trim()),
        (200, "2", "world1")
    );
    assert_eq!(get(&url("hello.test", "/profile")).body.trim(), "real1");
    assert_eq!(get(&url("EU.hello.test", "/profile")).body.trim(), "real1");
    let seen = get(&url("world.test", "/profile"));
    assert_eq!((seen.status, seen.body.trim()), (200, "world1"));
    assert_eq!(get(&url("world.test", "/")).body.trim(), world);
    // The app's own listener keeps working beside the edge.
    assert_eq!(app.served().await, hello);

    let unknown = get(&url("nobody.test", "/profile"));
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body.trim(), "404 not found");
    assert!(
        !unknown.headers.to_lowercase().contains("nonstop"),
        "{unknown:?}"
    );

    // nonstop itself, through the edge: its health, its API with the token...
    let health = get(&url("deploy.test", "/healthz"));
    assert_eq!(health.status, 200, "{health:?}");
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let apps = curl(
        port,
        &names,
        &["-H", &bearer, &url("deploy.test", "/api/apps")],
    );
    assert_eq!(apps.status, 200, "{apps:?}");
    assert!(apps.body.contains("\"world\""), "{}", apps.body);
    // ...but never the switch, which only hooks on this host may call, even with the
    // admin token and from this host's own address.
    let switch = url("deploy.test", "/api/apps/hello/switch");
    let body = format!("{{\"port\": {}}}", app.ports.app[1]);
    for attempt in [
        vec!["-H", &bearer, switch.as_str()],
        vec![
            "-H",
            &bearer,
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            &switch,
        ],
        vec![
            "-H",
            &bearer,
            "-H",
            "X-Nonstop-Edge:",
            "-H",
            "Connection: X-Nonstop-Edge",
            &switch,
        ],
    ] {
        let refused = curl(port, &names, &attempt);
        assert_eq!(refused.status, 403, "{attempt:?}: {refused:?}");
    }
    assert_eq!(
        get(&url("hello.test", "/profile")).body.trim(),
        "real1",
        "nothing moved"
    );
}

/// A certificate authority of the test's own, for the edge's certificate files.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `names`: its chain and key, PEM.
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a leaf for `names` to `cert` and `key`, each replaced whole (temp + rename).
    pub fn write_leaf(&self, names: &[&str], cert: &std::path::Path, key: &std::path::Path) {
        let (cert_pem, key_pem) = self.leaf(names);
        for (path, text) in [(key, key_pem), (cert, cert_pem)] {
            let temp = path.with_extension("tmp");
            std::fs::write(&temp, text).unwrap();
            std::fs::rename(&temp, path).unwrap();
        }
    }
}

/// HTTPS load on one host: `clients` keep-alive clients each of HTTP/1.1 and HTTP/2,
/// trusting `ca`, each at most `max_per_client` requests and `max_time`.
struct TlsLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<TlsReport>>,
}

#[derive(Debug, Default)]
struct TlsReport {
    ok: u64,
    failures: Vec<String>,
    by_version: std::collections::BTreeMap<String, u64>,
    bodies: std::collections::BTreeMap<String, u64>,
}

impl TlsLoad {
    fn start(
        url: String,
        host: &str,
        port: u16,
        ca: &str,
        clients: usize,
        max_time: Duration,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let sent = std::sync::Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + max_time;
        let ca = reqwest::Certificate::from_pem(ca.as_bytes()).unwrap();
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let tasks = (0..clients * 2)
            .map(|i| {
                let builder = reqwest::Client::builder()
                    .add_root_certificate(ca.clone())
                    .resolve(host, address)
                    .pool_max_idle_per_host(1);
                // Half speak HTTP/1.1 (keep-alive), half HTTP/2 (chosen by ALPN).
                let client = if i % 2 == 0 {
                    builder.http1_only()
                } else {
                    builder
                }
                .build()
                .unwrap();
                let (url, stop, sent) = (url.clone(), stop.clone(), sent.clone());
                tokio::spawn(async move {
                    let mut report = TlsReport::default();
                    for _ in 0..100_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        match client.get(&url).send().await {
                            Ok(response) if response.status() == 200 => {
                                let version = format!("{:?}", response.version());
                                match response.text().await {
                                    Ok(body) => {
                                        report.ok += 1;
                                        *report.by_version.entry(version).or_default() += 1;
                                        *report
                                            .bodies
                                            .entry(body.trim().to_owned())
                                            .or_default() += 1;
                                    }
                                    Err(err) => report.failures.push(format!("body: {err}")),
                                }
                            }
                            Ok(response) => report.failures.push(format!("{}", response.status())),
                            Err(err) => report.failures.push(format!("{err:?}")),
                        }
                    }
                    report
                })
            })
            .collect();
        Self { stop, sent, tasks }
    }

    async fn wait_sent(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sent.load(std::sync::atomic::Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "the TLS load did not get going");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(self) -> TlsReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = TlsReport::default();
        for task in self.tasks {
            let report = task.await.unwrap();
            total.ok += report.ok;
            total.failures.extend(report.failures);
            for (k, v) in report.by_version {
                *total.by_version.entry(k).or_default() += v;
            }
            for (k, v) in report.bodies {
                *total.bodies.entry(k).or_default() += v;
            }
        }
        total
    }
}

/// The edge with TLS for `hello` (and `world`) from certificate files of `ca`.
async fn spawn_tls_edge(ca: &TestCa, certs: &std::path::Path, extra_proxy: &str) -> TestApp {
    let hello = (certs.join("hello.pem"), certs.join("hello.key"));
    let world = (certs.join("world.pem"), certs.join("world.key"));
    ca.write_leaf(&["hello.test", "*.hello.test"], &hello.0, &hello.1);
    ca.write_leaf(&["world.test"], &world.0, &world.1);
    let tls = |(cert, key): &(std::path::PathBuf, std::path::PathBuf)| {
        format!(
            "tls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
            cert.display(),
            key.display()
        )
    };
    spawn_app_with(Extra {
        server: "proxy_process = false".into(),
        app: format!(
            "hosts = [\"hello.test\", \"*.hello.test\"]\n{}",
            tls(&hello)
        ),
        tables: format!(
            "[proxy]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\n{extra_proxy}\n{}",
            world_app(r#""world.test""#, &tls(&world))
        ),
        ..Extra::default()
    })
    .await
}

#[tokio::test]
async fn https_serves_each_host_its_certificate_over_http2_and_http1_with_the_front_doors_limits() {
    let ca = TestCa::new("Edge Test CA");
    let certs = tempfile::tempdir().unwrap();
    let app = spawn_tls_edge(
        &ca,
        certs.path(),
        "redirect_https = true\nhsts_max_age_secs = 600\n[proxy.limits]\nmax_body_bytes = 1024",
    )
    .await;
    let (http, https) = (
        edge_port(&app, "http").await,
        edge_port(&app, "https").await,
    );
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let ca_arg = ca_file.to_str().unwrap();
    let names = ["hello.test", "eu.hello.test", "world.test", "nobody.test"];
    let tls = |args: &[&str]| {
        let mut all = vec!["--cacert", ca_arg];
        all.extend_from_slice(args);
        curl(https, &names, &all)
    };
    let url = |host: &str, path: &str| format!("https://{host}:{https}{path}");
    let sha = app.repo.commit("Serve over TLS");
    app.deploy(&sha).await;
    deploy_by_hand(&app, "world").await;

    for (host, profile) in [
        ("hello.test", "real1"),
        ("eu.hello.test", "real1"),
        ("world.test", "world1"),
    ] {
        let h2 = tls(&["--http2", &url(host, "/profile")]);
        assert_eq!(
            (h2.status, h2.version.as_str(), h2.body.trim()),
            (200, "2", profile),
            "{host}: {h2:?}"
        );
        assert!(
            h2.headers
                .contains("strict-transport-security: max-age=600"),
            "{h2:?}"
        );
        let h1 = tls(&["--http1.1", &url(host, "/profile")]);
        assert_eq!(
            (h1.status, h1.version.as_str(), h1.body.trim()),
            (200, "1.1", profile),
            "{host}: {h1:?}"
        );
    }
    // A name no certificate covers gets no handshake; a known one asking for an unknown
    // host gets the short 404.
    let refused = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", ca_arg, "--resolve"])
        .arg(format!("nobody.test:{https}:127.0.0.1"))
        .arg(url("nobody.test", "/"))
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a handshake for a name nobody claims"
    );
    for version in ["--http2", "--http1.1"] {
        let unknown = tls(&[version, "-H", "Host: nobody.test", &url("hello.test", "/")]);
        assert_eq!(
            (unknown.status, unknown.body.trim()),
            (404, "404 not found"),
            "{version}"
        );
    }

    // Plain HTTP goes to https, path and query kept.
    let plain = curl(
        http,
        &names,
        &[&format!("http://hello.test:{http}/a/b?c=d")],
    );
    assert_eq!(plain.status, 308, "{plain:?}");
    let location = format!("location: https://hello.test:{https}/a/b?c=d");
    assert!(
        plain.headers.to_lowercase().contains(&location),
        "{plain:?}"
    );
    assert_eq!(
        curl(http, &names, &[&format!("http://nobody.test:{http}/")]).status,
        404
    );

    // Limits: a body over the limit is 413 on both versions, a head over it 431.
    let big = "x".repeat(2048);
    for version in ["--http2", "--http1.1"] {
        let over = tls(&[version, "-d", &big, &url("hello.test", "/")]);
        assert_eq!(over.status, 413, "{version}: {over:?}");
    }
    let small = tls(&["--http2", "-d", "ok", &url("hello.test", "/profile")]);
    assert_ne!(small.status, 413);
    let huge_header = format!("X-Big: {}", "y".repeat(70 * 1024));
    let over = tls(&["--http1.1", "-H", &huge_header, &url("hello.test", "/")]);
    assert_eq!(over.status, 431, "{over:?}");
}

#[tokio::test]
async fn a_replaced_certificate_serves_new_handshakes_and_five_deploys_under_https_load_lose_nothing()
 {
    let ca = TestCa::new("Edge Test CA");
    let certs = tempfile::tempdir().unwrap();
    let app = spawn_tls_edge(&ca, certs.path(), "").await;
    let https = edge_port(&app, "https").await;
    let mut versions = vec![app.deploy(&app.repo.commit("Base")).await];
    let url = format!("https://hello.test:{https}/");

    let load = TlsLoad::start(
        url.clone(),
        "hello.test",
        https,
        &ca.pem(),
        4,
        Duration::from_secs(240),
    );
    load.wait_sent(200).await;

    // Renewal: the files change under open keep-alive and HTTP/2 connections.
    let renewed = TestCa::new("Renewed CA");
    renewed.write_leaf(
        &["hello.test", "*.hello.test"],
        &certs.path().join("hello.pem"),
        &certs.path().join("hello.key"),
    );
    let renewed_ca = certs.path().join("renewed.pem");
    std::fs::write(&renewed_ca, renewed.pem()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fresh = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&renewed_ca)
            .arg("--resolve")
            .arg(format!("hello.test:{https}:127.0.0.1"))
            .arg(&url)
            .output()
            .unwrap();
        if fresh.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // nghttp2's h2load beside the Rust clients: 4 connections of 8 streams each, for a
    // bounded time that spans the deploys.
    let h2load = Command::new("h2load")
        .args(["-D", "10", "-c", "4", "-m", "8", "--connect-to"])
        .arg(format!("127.0.0.1:{https}"))
        .arg(&url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("h2load (Debian's nghttp2-client) is installed");
    for round in 0..5 {
        let sha = app.repo.commit(&format!("Round {round}"));
        versions.push(app.deploy(&sha).await);
        let before = load.sent.load(std::sync::atomic::Ordering::Relaxed);
        load.wait_sent(before + 100).await;
    }
    let report = load.finish().await;
    let h2load = tokio::task::spawn_blocking(move || h2load.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let summary = String::from_utf8_lossy(&h2load.stdout).into_owned();
    println!("h2load: {summary}");
    let counts = |prefix: &str| -> Vec<u64> {
        let line = summary
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in h2load's output: {summary}"));
        line.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    // requests: T total, S started, D done, OK succeeded, F failed, E errored, O timeout
    let requests = counts("requests:");
    assert!(requests[2] > 100, "h2load sent too little: {summary}");
    assert_eq!(&requests[3..], &[requests[2], 0, 0, 0], "{summary}");
    // status codes: N 2xx, 3xx, 4xx, 5xx
    assert_eq!(counts("status codes:")[0], requests[2], "{summary}");

    println!(
        "tls load: {} ok, by version {:?}, bodies {:?}",
        report.ok, report.by_version, report.bodies
    );
    assert!(
        report.failures.is_empty(),
        "failed: {:?}",
        &report.failures[..report.failures.len().min(10)]
    );
    assert_eq!(
        report.by_version.len(),
        2,
        "both HTTP/1.1 and HTTP/2 served: {:?}",
        report.by_version
    );
    for version in &versions {
        assert!(
            report.bodies.contains_key(version),
            "{version} never served: {:?}",
            report.bodies
        );
    }
}

/// A tiny DNS answerer for Pebble: every `A` question is answered `127.0.0.1`, anything
/// else with no records. Returns its port and the names it was asked about.
async fn loopback_dns() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    tokio::spawn(async move {
        let mut packet = [0u8; 512];
        loop {
            let Ok((len, from)) = socket.recv_from(&mut packet).await else {
                return;
            };
            let query = &packet[..len];
            // Header (12 bytes), then one question: labels, a zero, type and class.
            let mut at = 12;
            let mut labels = Vec::new();
            while at < len && query[at] != 0 {
                let size = usize::from(query[at]);
                labels.push(String::from_utf8_lossy(&query[at + 1..at + 1 + size]).into_owned());
                at += 1 + size;
            }
            let question_end = at + 5;
            if question_end > len {
                continue;
            }
            let qtype = u16::from_be_bytes([query[at + 1], query[at + 2]]);
            seen.lock().unwrap().push(labels.join("."));
            let mut answer = Vec::with_capacity(question_end + 16);
            answer.extend_from_slice(&query[..2]);
            answer.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(qtype == 1), 0, 0, 0, 0]);
            answer.extend_from_slice(&query[12..question_end]);
            if qtype == 1 {
                // The name by pointer to the question, A, IN, TTL 60, 4 bytes: 127.0.0.1.
                answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
            }
            let _ = socket.send_to(&answer, from).await;
        }
    });
    (port, asked)
}

/// Pebble, Let's Encrypt's test ACME server, validating HTTP-01 for real on `http_port` and
/// TLS-ALPN-01 on `tls_port` (names resolved by `dns_port`). Killed on drop.
struct Pebble {
    child: std::process::Child,
    dir: tempfile::TempDir,
    acme_port: u16,
    management_port: u16,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pebble {
    async fn start(http_port: u16, tls_port: u16, dns_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Pebble's own TLS");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), key).unwrap();
        let (acme_port, management_port) = (unique_port(), unique_port());
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{management_port}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(dir.path().join("pebble.json"))
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            // No random sleeps before validating, no nonces refused at random.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pebble (Debian's pebble package) is installed");
        let pebble = Self {
            child,
            dir,
            acme_port,
            management_port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", acme_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pebble did not start: {}",
                pebble.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pebble
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The CA that signs Pebble's own HTTPS.
    fn tls_ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The root Pebble issues certificates under, as a file for curl's `--cacert`.
    async fn issuing_root(&self) -> std::path::PathBuf {
        let ca = std::fs::read(self.tls_ca()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap();
        let url = format!("https://127.0.0.1:{}/roots/0", self.management_port);
        let root = client.get(url).send().await.unwrap().text().await.unwrap();
        let path = self.dir.path().join("issuing-root.pem");
        std::fs::write(&path, root).unwrap();
        path
    }
}

#[tokio::test]
async fn acme_issues_certificates_for_two_apps_and_nonstop_itself_and_github_deploys_over_https() {
    use std::os::unix::fs::PermissionsExt;
    let (dns_port, asked) = loopback_dns().await;
    let http = unique_port();
    let pebble = Pebble::start(http, unique_port(), dns_port).await;
    let app = spawn_app_with(Extra {
        server: "proxy_process = false\nhosts = [\"deploy.test\"]\ntls = { acme = true }".into(),
        app: "hosts = [\"hello.test\"]\ntls = { acme = true }".into(),
        tables: format!(
            "[proxy]\nhttp = \"127.0.0.1:{http}\"\nhttps = \"127.0.0.1:0\"\nredirect_https = true\n\
             [proxy.acme]\ndirectory = \"{}\"\ncontact = \"mailto:ops@example.com\"\nca_file = \"{}\"\n{}",
            pebble.directory(),
            pebble.tls_ca().display(),
            world_app(r#""world.test""#, "tls = { acme = true }")
        ),
        ..Extra::default()
    })
    .await;
    let https = edge_port(&app, "https").await;

    // Every site gets its certificate at start, proven over HTTP-01 by Pebble itself.
    let deadline = Instant::now() + Duration::from_secs(120);
    let certificates = loop {
        let (_, edge) = app.get_json("/api/edge").await;
        let certificates = edge["certificates"].as_array().cloned().unwrap_or_default();
        let issued = certificates
            .iter()
            .filter(|c| c["not_after"].is_i64())
            .count();
        if certificates.len() == 3 && issued == 3 {
            break certificates;
        }
        assert!(
            Instant::now() < deadline,
            "not issued in 120 s: {edge:#}\npebble: {}\n{}",
            pebble.log(),
            app.server_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for certificate in &certificates {
        assert!(certificate["error"].is_null(), "{certificate}");
        assert!(
            certificate["issuer"]
                .as_str()
                .unwrap_or("")
                .contains("Pebble"),
            "{certificate}"
        );
        let year = 365 * 24 * 60 * 60;
        let left = certificate["not_after"].as_i64().unwrap() - chrono::Utc::now().timestamp();
        assert!(
            left > 30 * 24 * 60 * 60 && left < 10 * year,
            "{certificate}"
        );
    }
    // Pebble really fetched each challenge from the edge's plain listener (no VA shortcut).
    let log = pebble.log();
    for name in ["hello.test", "world.test", "deploy.test"] {
        let fetched = format!("validate w/ HTTP: http://{name}:{http}/.well-known/acme-challenge/");
        assert!(
            log.contains(&fetched),
            "{name} never validated over HTTP-01:\n{log}"
        );
    }
    assert_eq!(
        log.matches("set VALID by completed challenge").count(),
        3,
        "{log}"
    );
    let asked = asked.lock().unwrap().clone();
    for name in ["hello.test", "world.test", "deploy.test"] {
        assert!(
            asked.iter().any(|a| a == name),
            "Pebble never looked up {name}: {asked:?}"
        );
    }
    let acme_dir = app.data_dir().join("acme");
    for file in [
        "account.json",
        "app.hello/key.pem",
        "app.hello/cert.pem",
        "server/key.pem",
    ] {
        let mode = std::fs::metadata(acme_dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}: {mode:o}");
    }

    // The dashboard shows each certificate: for whom, from where, its issuer and expiry.
    let (status, page) = app.get_text("/").await;
    assert_eq!(status, 200);
    for owner in ["app.hello", "app.world", "server"] {
        assert!(
            page.contains(&format!("data-certificate=\"{owner}\"")),
            "{owner}: {page}"
        );
    }
    assert!(page.contains("Pebble Intermediate CA"), "{page}");

    // GitHub's webhook reaches nonstop over HTTPS through the edge and deploys.
    let root = pebble.issuing_root().await;
    let root = root.to_str().unwrap();
    let names = ["hello.test", "world.test", "deploy.test"];
    let sha = app.repo.commit("Deploy over HTTPS");
    let body = crate::common::push_payload("refs/heads/main", &sha, crate::common::REPOSITORY);
    let body_file = app.dir.path().join("push.json");
    std::fs::write(&body_file, &body).unwrap();
    let signature = format!("X-Hub-Signature-256: {}", crate::common::sign(&body));
    let delivery = format!("X-GitHub-Delivery: over-https-{sha}");
    let data = format!("@{}", body_file.display());
    let hook = curl(
        https,
        &names,
        &[
            "--cacert",
            root,
            "--http2",
            "-H",
            "X-GitHub-Event: push",
            "-H",
            &delivery,
            "-H",
            &signature,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &data,
            &format!("https://deploy.test:{https}/hooks/github"),
        ],
    );
    assert_eq!((hook.status, hook.version.as_str()), (202, "2"), "{hook:?}");
    let answer: Value = serde_json::from_str(&hook.body).unwrap();
    let done = app
        .wait_finished(answer["deployment_id"].as_i64().unwrap())
        .await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    let version = done["deployment"]["version"].as_str().unwrap();
    deploy_by_hand(&app, "world").await;

    for (host, path, expected) in [
        ("hello.test", "/", version),
        ("hello.test", "/profile", "real1"),
        ("world.test", "/profile", "world1"),
    ] {
        for protocol in ["--http2", "--http1.1"] {
            let seen = curl(
                https,
                &names,
                &[
                    "--cacert",
                    root,
                    protocol,
                    &format!("https://{host}:{https}{path}"),
                ],
            );
            assert_eq!(
                (seen.status, seen.body.trim()),
                (200, expected),
                "{host} {protocol}: {seen:?}"
            );
        }
    }
    // The challenge path was answered on plain HTTP despite redirect_https; everything
    // else there is redirected.
    let plain = curl(http, &names, &[&format!("http://hello.test:{http}/")]);
    assert_eq!(plain.status, 308, "{plain:?}");
}

#[tokio::test]
async fn the_edge_runs_in_the_proxy_process_and_follows_its_switches() {
    let http = unique_port();
    let app = spawn_app_with(Extra {
        proxy_process: true,
        app: r#"hosts = ["hello.test"]"#.into(),
        tables: format!("[proxy]\nhttp = \"127.0.0.1:{http}\"\n"),
        ..Extra::default()
    })
    .await;
    let served = || {
        curl(
            http,
            &["hello.test"],
            &[&format!("http://hello.test:{http}/")],
        )
    };
    let first = app.deploy(&app.repo.commit("First")).await;
    assert_eq!(served().body.trim(), first);
    let second = app.deploy(&app.repo.commit("Second")).await;
    assert_eq!(served().body.trim(), second);
    let log = std::fs::read_to_string(app.dir.path().join("proxy.log")).unwrap();
    assert!(log.contains("edge listening"), "{log}");
    assert!(
        !app.server_log().contains("edge listening"),
        "serve runs no edge of its own"
    );
}

#[tokio::test]
async fn an_acme_failure_is_shown_with_the_certificate_and_retried() {
    let app = spawn_app_with(Extra {
        server: "proxy_process = false".into(),
        app: "hosts = [\"hello.test\"]\ntls = { acme = true }".into(),
        // Nothing listens on port 1: every attempt fails at once.
        tables: "[proxy]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\n\
                 [proxy.acme]\ndirectory = \"https://127.0.0.1:1/dir\"\n"
            .into(),
        ..Extra::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let certificate = loop {
        let (_, edge) = app.get_json("/api/edge").await;
        let certificate = edge["certificates"][0].clone();
        if certificate["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("ACME"))
        {
            break certificate;
        }
        assert!(Instant::now() < deadline, "no ACME error shown: {edge:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(certificate["owner"], "app.hello");
    assert!(certificate["not_after"].is_null(), "{certificate}");
    assert_eq!(
        app.get_json("/api/edge").await.1["routes"][0],
        serde_json::json!({ "host": "hello.test", "to": "app.hello" })
    );
    let (_, page) = app.get_text("/").await;
    assert!(page.contains("status-failed\">ACME"), "{page}");
    // The first retry comes 5 s after the first failure.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.server_log().matches("ACME failed").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "never retried:\n{}",
            app.server_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_client_naming_no_host_gets_the_default_apps_certificate_and_app() {
    let ca = TestCa::new("Edge Test CA");
    let certs = tempfile::tempdir().unwrap();
    let app = spawn_tls_edge(&ca, certs.path(), "default_app = \"world\"").await;
    let https = edge_port(&app, "https").await;
    deploy_by_hand(&app, "world").await;
    // An IP address is no SNI name: the default app's certificate (not checked here: it
    // names world.test), and its app for a host nobody claims.
    let seen = curl(
        https,
        &[],
        &[
            "-k",
            "--http2",
            &format!("https://127.0.0.1:{https}/profile"),
        ],
    );
    assert_eq!((seen.status, seen.body.trim()), (200, "world1"), "{seen:?}");
}

#[tokio::test]
async fn without_a_plain_listener_acme_proves_the_names_over_tls_alpn_01() {
    let (dns_port, _) = loopback_dns().await;
    let https = unique_port();
    let pebble = Pebble::start(unique_port(), https, dns_port).await;
    let app = spawn_app_with(Extra {
        server: "proxy_process = false".into(),
        app: "hosts = [\"hello.test\"]\ntls = { acme = true }".into(),
        tables: format!(
            "[proxy]\nhttps = \"127.0.0.1:{https}\"\n[proxy.acme]\ndirectory = \"{}\"\nca_file = \"{}\"\n",
            pebble.directory(),
            pebble.tls_ca().display(),
        ),
        ..Extra::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, edge) = app.get_json("/api/edge").await;
        if edge["certificates"][0]["not_after"].is_i64() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not issued: {edge:#}\npebble: {}\n{}",
            pebble.log(),
            app.server_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // No plain listener: Pebble could only have validated over TLS-ALPN-01.
    let log = pebble.log();
    assert!(log.contains("set VALID by completed challenge"), "{log}");
    assert!(
        app.server_log().contains("TlsAlpn01"),
        "{}",
        app.server_log()
    );
    app.deploy(&app.repo.commit("Over TLS-ALPN-01")).await;
    let root = pebble.issuing_root().await;
    let seen = curl(
        https,
        &["hello.test"],
        &[
            "--cacert",
            root.to_str().unwrap(),
            &format!("https://hello.test:{https}/profile"),
        ],
    );
    assert_eq!((seen.status, seen.body.trim()), (200, "real1"), "{seen:?}");
}
