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
        server: r#"hosts = ["deploy.test"]"#.into(),
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
