//! Every HTTP rule that needs no real process, checked in process: the state `serve::prepare`
//! builds (a temp data dir, a real SQLite file, the app's built-in proxy on port 0) and the
//! real router, driven with `tower::ServiceExt::oneshot`; `MockConnectInfo` stands for the
//! caller's address. No deployment runs here: what a rule needs on record is written into
//! the SQLite file, and each answer is checked for its status and its one-line reason.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use nonstop::web::AppState;
use serde_json::{Value, json};
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::ServiceExt;

use crate::common::unique_port;

const WEBHOOK_SECRET: &str = "routes-webhook-secret";
/// What `ROUTES_METRICS_TOKEN` holds, for the tests that name it as `metrics_token_env`.
const METRICS_TOKEN: &str = "routes-metrics-token-of-32-bytes-or-more";
/// GitHub's cap, which nonstop enforces on both webhook routes.
const MAX_WEBHOOK_BYTES: usize = 25 * 1024 * 1024;

/// A hook's address on this host: the caller of every request unless a test says otherwise.
fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40_000))
}

/// The prepared server, answering through its router only (its listener is never served).
/// Fields drop in order: the queue stops first, the data dir goes last.
struct Routes {
    /// Stops the queue's workers when the test ends.
    _shutdown: DropGuard,
    state: Arc<AppState>,
    /// Holds the proxy while the test runs.
    _server: nonstop::serve::Server,
    /// The app's two instance ports: nothing listens on them.
    ports: [u16; 2],
    dir: tempfile::TempDir,
}

impl Routes {
    async fn start() -> Self {
        Self::start_with("").await
    }

    /// `start`, with `server` added to the `[server]` table.
    async fn start_with(server: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = [unique_port(), unique_port()];
        let path = dir.path().join("nonstop.toml");
        let text = format!(
            r#"[server]
listen = "127.0.0.1:0"
data_dir = "data"
# In this process: the router is driven without the `nonstop` binary.
proxy_process = false
{server}

[[app]]
name = "hello"
repo = "hello-repo"
repository = "acme/hello"
webhook_secret_env = "HELLO_WEBHOOK_SECRET"
build = "true"
artifact = "hello"
run = "{{artifact}} --port {{port}} --profile {{profile}}"
ports = [{a}, {b}]
profiles = ["real1", "real2"]
health = {{ path = "/profile", attempts = 1, interval_ms = 10 }}
switch = {{ kind = "proxy", listen = "127.0.0.1:0" }}
"#,
            a = ports[0],
            b = ports[1],
        );
        let mut config = nonstop::config::Config::parse(&text, &path).unwrap();
        // The secrets come from here, not the process env that other tests share.
        config
            .read_secrets(&path, |name| match name {
                "HELLO_WEBHOOK_SECRET" => Some(WEBHOOK_SECRET.to_owned()),
                "ROUTES_METRICS_TOKEN" => Some(METRICS_TOKEN.to_owned()),
                _ => None,
            })
            .unwrap();
        let shutdown = CancellationToken::new();
        let server = nonstop::serve::prepare(config, shutdown.clone())
            .await
            .unwrap();
        Self {
            _shutdown: shutdown.drop_guard(),
            state: server.state.clone(),
            _server: server,
            ports,
            dir,
        }
    }

    fn admin_token(&self) -> String {
        self.state.admin_token.expose().to_owned()
    }

    /// A GET with the admin token, as a script reads the API.
    fn read(&self, uri: &str) -> Request<Body> {
        with_token(uri, &self.admin_token())
    }

    fn switch_token(&self) -> String {
        self.state.switch_token.expose().to_owned()
    }

    /// Logs in through the form, as a browser does; returns the session cookie (`name=value`).
    async fn log_in(&self) -> String {
        let login = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={}", self.admin_token())))
            .unwrap();
        let response = self.respond(loopback(), login).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        response.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    }

    /// One finished deployment with its Build stage, for the reads to find.
    fn record_a_deployment(&self) {
        self.record(
            "INSERT INTO deployments (id, app, status, trigger, branch, created_at, finished_at)
             VALUES (1, 'hello', 'failed', 'push', 'main', 0, 0);
             INSERT INTO stages (deployment_id, position, name, status, log)
             VALUES (1, 0, 'Build', 'failed', 'error: /srv/builds/hello (pid 4242)');",
        );
    }

    /// Runs `statement` on the real SQLite file, as the records a rule needs.
    fn record(&self, statement: &str) {
        let conn = rusqlite::Connection::open(self.dir.path().join("data/nonstop.db")).unwrap();
        conn.execute_batch(statement).unwrap();
    }

    /// Sends `request` from this host; returns the status and the JSON body (`Null` if none).
    async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        self.send_from(loopback(), request).await
    }

    async fn send_from(&self, peer: SocketAddr, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.respond(peer, request).await;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// The router's whole answer to `request` from `peer`.
    async fn respond(&self, peer: SocketAddr, request: Request<Body>) -> Response {
        let router = nonstop::web::router(self.state.clone()).layer(MockConnectInfo(peer));
        router.oneshot(request).await.unwrap()
    }

    fn count_deployments(&self) -> i64 {
        let conn = rusqlite::Connection::open(self.dir.path().join("data/nonstop.db")).unwrap();
        conn.query_row("SELECT COUNT(*) FROM deployments", [], |row| row.get(0))
            .unwrap()
    }
}

/// A GET with neither a token nor a login.
fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

/// A GET with `token` as its bearer.
fn with_token(uri: &str, token: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap()
}

/// A JSON POST with `token` as its bearer, when given.
fn post(uri: &str, token: Option<&str>, body: Value) -> Request<Body> {
    let mut request = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    request.body(Body::from(body.to_string())).unwrap()
}

fn error(reason: &str) -> Value {
    json!({ "error": reason })
}

/// A GitHub webhook; `signature` as given (`None`: no signature header).
fn github_hook(
    query: &str,
    event: Option<&str>,
    signature: Option<&str>,
    body: Vec<u8>,
) -> Request<Body> {
    let mut request = Request::post(format!("/hooks/github{query}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("X-GitHub-Delivery", "routes-delivery");
    if let Some(event) = event {
        request = request.header("X-GitHub-Event", event);
    }
    if let Some(signature) = signature {
        request = request.header("X-Hub-Signature-256", signature);
    }
    request.body(Body::from(body)).unwrap()
}

fn sign(body: &[u8]) -> String {
    nonstop::webhook::github::sign(WEBHOOK_SECRET.as_bytes(), body)
}

/// A Travis CI notification: a form `body`, with a `Signature` header when given.
fn travis_hook(query: &str, signature: Option<&str>, body: Vec<u8>) -> Request<Body> {
    let mut request = Request::post(format!("/hooks/travis{query}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(signature) = signature {
        request = request.header("Signature", signature);
    }
    request.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn healthz_answers_ok() {
    let routes = Routes::start().await;
    let response = routes.respond(loopback(), get("/healthz")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok\n");
}

#[tokio::test]
async fn every_app_route_answers_404_for_an_app_that_is_not_configured() {
    let routes = Routes::start().await;
    let (admin, switch) = (routes.admin_token(), routes.switch_token());
    let unknown = error("no app named `nope`");
    let push = json!({ "ref": "refs/heads/main", "after": "0".repeat(40) }).to_string();
    let requests = [
        routes.read("/api/apps/nope/live"),
        post("/api/apps/nope/deploy", Some(&admin), json!({})),
        post("/api/apps/nope/rollback", Some(&admin), json!({})),
        post(
            "/api/apps/nope/switch",
            Some(&switch),
            json!({ "port": routes.ports[0] }),
        ),
        github_hook(
            "?app=nope",
            Some("push"),
            Some(&sign(push.as_bytes())),
            push.clone().into_bytes(),
        ),
        travis_hook(
            "?app=nope",
            Some("c2lnbmF0dXJl"),
            b"payload=%7B%7D".to_vec(),
        ),
    ];
    for request in requests {
        let uri = request.uri().to_string();
        assert_eq!(
            routes.send(request).await,
            (StatusCode::NOT_FOUND, unknown.clone()),
            "{uri}"
        );
    }
    assert_eq!(routes.count_deployments(), 0);
}

#[tokio::test]
async fn deploy_rollback_and_redeploy_need_the_admin_token() {
    let routes = Routes::start().await;
    let switch = routes.switch_token();
    for uri in [
        "/api/apps/hello/deploy",
        "/api/apps/hello/rollback",
        "/api/deployments/1/redeploy",
    ] {
        assert_eq!(
            routes.send(post(uri, None, json!({}))).await,
            (
                StatusCode::UNAUTHORIZED,
                error("log in on the dashboard or send the admin token (Authorization: Bearer …)")
            ),
            "{uri} without a token"
        );
        // The switch token is for hooks on this host and opens the switch only.
        for token in ["not-the-token", switch.as_str()] {
            assert_eq!(
                routes.send(post(uri, Some(token), json!({}))).await,
                (
                    StatusCode::UNAUTHORIZED,
                    error("the admin token is not valid")
                ),
                "{uri} with a wrong token"
            );
        }
    }
    assert_eq!(routes.count_deployments(), 0);
}

#[tokio::test]
async fn a_dashboard_session_acts_only_with_its_csrf_token() {
    let routes = Routes::start().await;
    let cookie = routes.log_in().await;

    for csrf in [None, Some("forged")] {
        let mut request = Request::post("/api/apps/hello/deploy")
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(csrf) = csrf {
            request = request.header("X-CSRF-Token", csrf);
        }
        assert_eq!(
            routes.send(request.body(Body::empty()).unwrap()).await,
            (StatusCode::FORBIDDEN, error("missing or wrong CSRF token")),
            "CSRF token {csrf:?}"
        );
    }
    assert_eq!(routes.count_deployments(), 0);
}

#[tokio::test]
async fn the_switch_needs_the_switch_or_admin_token() {
    let routes = Routes::start().await;
    let body = json!({ "port": routes.ports[0] });
    for token in [None, Some("not-the-token")] {
        assert_eq!(
            routes
                .send(post("/api/apps/hello/switch", token, body.clone()))
                .await,
            (
                StatusCode::UNAUTHORIZED,
                error("a switch or admin token is needed")
            ),
            "token {token:?}"
        );
    }
}

#[tokio::test]
async fn the_switch_answers_callers_on_this_host_only() {
    let routes = Routes::start().await;
    let switch = routes.switch_token();
    // A documentation address (TEST-NET-1): only ever a label on the request, never dialled.
    let elsewhere = SocketAddr::from(([192, 0, 2, 7], 40_000));
    for token in [None, Some(switch.as_str())] {
        let request = post(
            "/api/apps/hello/switch",
            token,
            json!({ "port": routes.ports[0] }),
        );
        assert_eq!(
            routes.send_from(elsewhere, request).await,
            (
                StatusCode::FORBIDDEN,
                error("only callers on this host may switch traffic")
            ),
            "token {token:?}"
        );
    }

    // From this host (IPv4 or IPv6) with either token, the request gets past the guard to
    // the switch's own checks: a port that is not the app's, one where nothing answers.
    let ipv6_loopback = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 40_000));
    let (a, b) = (routes.ports[0], routes.ports[1]);
    for (peer, token) in [
        (loopback(), switch.clone()),
        (ipv6_loopback, routes.admin_token()),
    ] {
        let request = post("/api/apps/hello/switch", Some(&token), json!({ "port": 1 }));
        assert_eq!(
            routes.send_from(peer, request).await,
            (
                StatusCode::BAD_REQUEST,
                error(&format!("port 1 is not one of hello's ports [{a}, {b}]"))
            ),
            "from {peer}"
        );
    }
    let (status, body) = routes
        .send(post(
            "/api/apps/hello/switch",
            Some(&switch),
            json!({ "port": a }),
        ))
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::BAD_GATEWAY,
            error(&format!(
                "port {a} does not answer /profile; traffic stays where it was"
            ))
        )
    );
    let (status, body) = routes
        .send(post(
            "/api/apps/hello/switch",
            Some(&switch),
            json!({ "prt": a }),
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("expected {\"port\": N}: ")),
        "{body}"
    );
    // Where traffic is, as deploy.sh asks after a lost answer: this host and a hook's
    // token only, like the switch itself.
    let asked = with_token("/api/apps/hello/switch", &switch);
    assert_eq!(
        routes.send(asked).await,
        (StatusCode::OK, json!({ "port": null }))
    );
    let asked = with_token("/api/apps/hello/switch", &switch);
    assert_eq!(
        routes.send_from(elsewhere, asked).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        routes.send(get("/api/apps/hello/switch")).await,
        (
            StatusCode::UNAUTHORIZED,
            error("a switch or admin token is needed")
        )
    );
    // Nothing moved.
    assert_eq!(
        routes.send(routes.read("/api/apps/hello/live")).await,
        (
            StatusCode::NOT_FOUND,
            error("`hello` has no live instance yet")
        )
    );
}

#[tokio::test]
async fn github_webhooks_without_a_valid_signature_are_refused() {
    let routes = Routes::start().await;
    let body = json!({ "ref": "refs/heads/main", "after": "0".repeat(40) })
        .to_string()
        .into_bytes();
    let other_secret = nonstop::webhook::github::sign(b"another secret", &body);
    let cases = [
        ("", None, "missing X-Hub-Signature-256 header"),
        ("", Some("sha256=00"), "signature does not match"),
        ("", Some("not-even-hex"), "signature does not match"),
        ("", Some(other_secret.as_str()), "signature does not match"),
        ("?app=hello", None, "missing X-Hub-Signature-256 header"),
        (
            "?app=hello",
            Some(other_secret.as_str()),
            "signature does not match",
        ),
    ];
    for (query, signature, reason) in cases {
        assert_eq!(
            routes
                .send(github_hook(query, Some("push"), signature, body.clone()))
                .await,
            (StatusCode::UNAUTHORIZED, error(reason)),
            "{query} signature {signature:?}"
        );
    }
    assert_eq!(routes.count_deployments(), 0);
}

#[tokio::test]
async fn github_webhooks_over_25_mb_or_malformed_are_refused_with_a_reason() {
    let routes = Routes::start().await;
    let oversize = vec![b' '; MAX_WEBHOOK_BYTES + 1];
    let signature = sign(&oversize);
    assert_eq!(
        routes
            .send(github_hook("", Some("push"), Some(&signature), oversize))
            .await,
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            error(&format!("webhook body is over {MAX_WEBHOOK_BYTES} bytes"))
        )
    );

    let not_json = b"{not json".to_vec();
    let (status, body) = routes
        .send(github_hook(
            "",
            Some("push"),
            Some(&sign(&not_json)),
            not_json,
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let reason = body["error"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("malformed push payload: ") && !reason.contains('\n'),
        "{body}"
    );

    let push = json!({ "ref": "refs/heads/main" }).to_string().into_bytes();
    assert_eq!(
        routes
            .send(github_hook("", None, Some(&sign(&push)), push))
            .await,
        (
            StatusCode::BAD_REQUEST,
            error("missing X-GitHub-Event header")
        )
    );
    assert_eq!(routes.count_deployments(), 0);
}

#[tokio::test]
async fn travis_notifications_unsigned_oversize_or_malformed_are_refused() {
    let routes = Routes::start().await;
    let payload = b"payload=%7B%7D".to_vec();
    assert_eq!(
        routes.send(travis_hook("", None, payload.clone())).await,
        (StatusCode::UNAUTHORIZED, error("missing Signature header"))
    );
    // No app here has Travis CI's key, so no signature can be Travis's.
    assert_eq!(
        routes
            .send(travis_hook("", Some("c2lnbmF0dXJl"), payload))
            .await,
        (StatusCode::UNAUTHORIZED, error("signature does not match"))
    );
    assert_eq!(
        routes
            .send(travis_hook("", Some("c2lnbmF0dXJl"), b"build=1".to_vec()))
            .await,
        (
            StatusCode::BAD_REQUEST,
            error("malformed payload: no form field `payload`")
        )
    );
    assert_eq!(
        routes
            .send(travis_hook(
                "",
                Some("c2lnbmF0dXJl"),
                vec![b'a'; MAX_WEBHOOK_BYTES + 1]
            ))
            .await,
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            error(&format!("webhook body is over {MAX_WEBHOOK_BYTES} bytes"))
        )
    );
    assert_eq!(routes.count_deployments(), 0);
}

#[tokio::test]
async fn deployments_that_do_not_exist_and_unknown_statuses_get_their_reason() {
    let routes = Routes::start().await;
    assert_eq!(
        routes
            .send(routes.read("/api/deployments?status=bogus"))
            .await,
        (StatusCode::BAD_REQUEST, error("unknown status `bogus`"))
    );
    assert_eq!(
        routes.send(routes.read("/api/deployments/999")).await,
        (StatusCode::NOT_FOUND, error("no deployment 999"))
    );
    assert_eq!(
        routes
            .send(post(
                "/api/deployments/999/redeploy",
                Some(&routes.admin_token()),
                json!({})
            ))
            .await,
        (StatusCode::NOT_FOUND, error("no deployment 999"))
    );
    assert_eq!(
        routes
            .send(routes.read("/api/deployments?status=succeeded"))
            .await,
        (StatusCode::OK, json!([]))
    );
}

#[tokio::test]
async fn a_rollback_that_cannot_happen_is_refused_with_its_reason() {
    let routes = Routes::start().await;
    let rollback = || {
        post(
            "/api/apps/hello/rollback",
            Some(&routes.admin_token()),
            json!({}),
        )
    };
    assert_eq!(
        routes.send(rollback()).await,
        (
            StatusCode::CONFLICT,
            error("nothing of `hello` is live to roll back from")
        )
    );

    // Live, but with no other instance and no earlier bundle to go back to.
    let a = routes.ports[0];
    routes.record(&format!(
        "INSERT INTO live (app, port, profile, version, deployment_id, since)
         VALUES ('hello', {a}, 'real1', NULL, NULL, 0);"
    ));
    assert_eq!(
        routes.send(rollback()).await,
        (
            StatusCode::CONFLICT,
            error(
                "`hello` has no earlier version: the previous instance is gone and no earlier bundle is stored"
            )
        )
    );

    routes.record(
        "INSERT INTO deployments (id, app, status, trigger, branch, created_at, started_at)
         VALUES (7, 'hello', 'running', 'push', 'main', 0, 0);",
    );
    assert_eq!(
        routes.send(rollback()).await,
        (
            StatusCode::CONFLICT,
            error("deployment 7 is running; roll back when it ends")
        )
    );
}

#[tokio::test]
async fn a_redeploy_is_refused_without_a_stored_bundle() {
    let routes = Routes::start().await;
    routes.record(
        "INSERT INTO deployments (id, app, status, trigger, branch, version, created_at, finished_at)
         VALUES (1, 'hello', 'failed', 'push', 'main', '1.0.1-SNAPSHOT-20261201000000', 0, 0);
         INSERT INTO deployments (id, app, status, trigger, branch, version, bundle_key, bundle_sha256,
                                  bundle_pruned_at, created_at, finished_at)
         VALUES (2, 'hello', 'succeeded', 'push', 'main', '1.0.1-SNAPSHOT-20261201000100',
                 'hello/2.zip', 'abc', 0, 0, 0);",
    );
    let redeploy = |id: i64| {
        post(
            &format!("/api/deployments/{id}/redeploy"),
            Some(&routes.admin_token()),
            json!({}),
        )
    };
    assert_eq!(
        routes.send(redeploy(1)).await,
        (
            StatusCode::CONFLICT,
            error("deployment 1 has no stored bundle to redeploy")
        )
    );
    assert_eq!(
        routes.send(redeploy(2)).await,
        (
            StatusCode::CONFLICT,
            error(
                "deployment 2's bundle was deleted by retention (store.keep): deploy its commit instead"
            )
        )
    );
    assert_eq!(routes.count_deployments(), 2, "nothing was queued");
}

#[tokio::test]
async fn an_app_on_port_0_shows_where_its_proxy_really_listens() {
    let routes = Routes::start().await;
    let (status, apps) = routes.send(routes.read("/api/apps")).await;
    assert_eq!(status, StatusCode::OK);
    let entry = apps[0]["entry"].as_str().unwrap_or_default();
    let addr: SocketAddr = entry
        .strip_prefix("proxy ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("entry {entry:?} is not `proxy ADDR`"));
    assert_ne!(addr.port(), 0, "{entry}");
    // The proxy is there, with nothing live behind it yet.
    let response = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_request_for_a_host_name_that_is_not_ours_is_refused() {
    let routes = Routes::start().await;
    let for_host = |host: &str| {
        Request::get("/healthz")
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        routes.send(for_host("evil.example:9000")).await,
        (
            StatusCode::BAD_REQUEST,
            error("host `evil.example:9000` is not served here")
        )
    );
    for ours in ["localhost:9000", "127.0.0.1:9000", "[::1]:9000"] {
        let response = routes.respond(loopback(), for_host(ours)).await;
        assert_eq!(response.status(), StatusCode::OK, "{ours}");
    }
}

/// The pages a person reads (a browser without a login is sent to log in first), and
/// where the login sends it back to.
const PAGES: [(&str, &str); 4] = [
    ("/", "/login"),
    (
        "/deployments?app=hello",
        "/login?next=%2Fdeployments%3Fapp%3Dhello",
    ),
    ("/deployments/1", "/login?next=%2Fdeployments%2F1"),
    (
        "/deployments/1/stages/Build/log",
        "/login?next=%2Fdeployments%2F1%2Fstages%2FBuild%2Flog",
    ),
];

/// What scripts read: refused with 401 and the reason.
const READS: [&str; 6] = [
    "/api/apps",
    "/api/apps/hello/live",
    "/api/deployments",
    "/api/deployments/1",
    "/events",
    "/metrics",
];

const NOT_LOGGED_IN: &str =
    "log in on the dashboard or send the admin token (Authorization: Bearer …)";

/// A ping GitHub signed: what the hook answers shows the request got past the gate.
fn signed_ping() -> Request<Body> {
    let body =
        json!({ "zen": "Keep it logically awesome.", "repository": { "full_name": "acme/hello" } })
            .to_string()
            .into_bytes();
    github_hook("", Some("ping"), Some(&sign(&body)), body)
}

#[tokio::test]
async fn without_a_login_or_the_admin_token_nothing_but_hooks_healthz_and_the_login_page_answers() {
    let routes = Routes::start().await;
    routes.record_a_deployment();

    for (page, login) in PAGES {
        let response = routes.respond(loopback(), get(page)).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{page}");
        assert_eq!(response.headers()[header::LOCATION], login, "{page}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "{page} gave away {body:?}");
    }
    for read in READS {
        assert_eq!(
            routes.send(get(read)).await,
            (StatusCode::UNAUTHORIZED, error(NOT_LOGGED_IN)),
            "{read}"
        );
    }
    // A wrong token, or the switch token (for hooks on this host), reads nothing either.
    for token in ["not-the-token".to_owned(), routes.switch_token()] {
        for uri in ["/", "/api/deployments/1", "/metrics"] {
            assert_eq!(
                routes.send(with_token(uri, &token)).await,
                (
                    StatusCode::UNAUTHORIZED,
                    error("the admin token is not valid")
                ),
                "{uri}"
            );
        }
    }

    // Open to anyone: liveness, webhooks (their signature decides), the login page and
    // what it loads; the favicon without the newest deployment's colour.
    assert_eq!(
        routes.respond(loopback(), get("/healthz")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        routes.send(signed_ping()).await,
        (StatusCode::OK, json!({ "ok": "pong", "app": "hello" }))
    );
    let push = b"{}".to_vec();
    assert_eq!(
        routes.send(github_hook("", Some("push"), None, push)).await,
        (
            StatusCode::UNAUTHORIZED,
            error("missing X-Hub-Signature-256 header")
        )
    );
    for open in ["/login", "/static/style.css", "/static/live.js"] {
        let response = routes.respond(loopback(), get(open)).await;
        assert_eq!(response.status(), StatusCode::OK, "{open}");
    }
    let favicon = routes.respond(loopback(), get("/favicon.svg")).await;
    let favicon = favicon.into_body().collect().await.unwrap().to_bytes();
    let favicon = String::from_utf8_lossy(&favicon);
    assert!(favicon.contains("#6e7781"), "not grey: {favicon}");

    // The admin token, or a login, reads them all.
    let cookie = routes.log_in().await;
    for uri in PAGES.iter().map(|(page, _)| *page).chain(READS) {
        let uri = if uri == "/events" { "/healthz" } else { uri }; // a stream never ends
        let response = routes.respond(loopback(), routes.read(uri)).await;
        let by_token = response.status();
        let session = Request::get(uri)
            .header(header::COOKIE, &cookie)
            .body(Body::empty())
            .unwrap();
        let by_session = routes.respond(loopback(), session).await.status();
        let expected = if uri == "/api/apps/hello/live" {
            StatusCode::NOT_FOUND // nothing is live: an answer past the gate
        } else {
            StatusCode::OK
        };
        assert_eq!((by_token, by_session), (expected, expected), "{uri}");
    }
    let events = Request::get("/events")
        .header(header::COOKIE, &cookie)
        .body(Body::empty())
        .unwrap();
    let events = routes.respond(loopback(), events).await;
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()[header::CONTENT_TYPE], "text/event-stream");
    let favicon = Request::get("/favicon.svg")
        .header(header::COOKIE, &cookie)
        .body(Body::empty())
        .unwrap();
    let favicon = routes.respond(loopback(), favicon).await;
    let favicon = favicon.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&favicon).contains("#cf222e"),
        "a reader sees the failed deployment's red"
    );
}

#[tokio::test]
async fn with_public_read_every_read_answers_without_a_login() {
    let routes = Routes::start_with("public_read = true").await;
    routes.record_a_deployment();
    for uri in PAGES.iter().map(|(page, _)| *page).chain(READS) {
        let uri = if uri == "/events" { "/healthz" } else { uri };
        let expected = if uri == "/api/apps/hello/live" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        assert_eq!(
            routes.respond(loopback(), get(uri)).await.status(),
            expected,
            "{uri}"
        );
    }
    let (status, deployment) = routes.send(get("/api/deployments/1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deployment["deployment"]["status"], "failed", "{deployment}");
    let events = routes.respond(loopback(), get("/events")).await;
    assert_eq!(events.headers()[header::CONTENT_TYPE], "text/event-stream");
    // Acting still needs the token.
    assert_eq!(
        routes
            .send(post("/api/apps/hello/deploy", None, json!({})))
            .await,
        (StatusCode::UNAUTHORIZED, error(NOT_LOGGED_IN))
    );
    assert_eq!(routes.count_deployments(), 1);
}

#[tokio::test]
async fn the_metrics_token_reads_metrics_and_nothing_else() {
    let routes = Routes::start_with(r#"metrics_token_env = "ROUTES_METRICS_TOKEN""#).await;
    routes.record_a_deployment();
    for token in [METRICS_TOKEN.to_owned(), routes.admin_token()] {
        let response = routes
            .respond(loopback(), with_token("/metrics", &token))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&text)
                .contains("nonstop_deployments_total{app=\"hello\",status=\"failed\"} 1"),
            "{text:?}"
        );
    }
    for uri in [
        "/api/deployments",
        "/api/deployments/1",
        "/events",
        "/",
        "/deployments/1",
    ] {
        assert_eq!(
            routes.send(with_token(uri, METRICS_TOKEN)).await,
            (
                StatusCode::FORBIDDEN,
                error("the metrics token may read /metrics only")
            ),
            "{uri}"
        );
    }
    assert_eq!(
        routes
            .send(post(
                "/api/apps/hello/deploy",
                Some(METRICS_TOKEN),
                json!({})
            ))
            .await,
        (
            StatusCode::UNAUTHORIZED,
            error("the admin token is not valid")
        )
    );
    assert_eq!(
        routes.send(get("/metrics")).await,
        (
            StatusCode::UNAUTHORIZED,
            error("send the admin or the metrics token (Authorization: Bearer …)")
        )
    );
    assert_eq!(routes.count_deployments(), 1);
}

#[tokio::test]
async fn a_login_goes_back_to_the_page_it_was_asked_for_and_never_to_another_site() {
    let routes = Routes::start().await;
    let asked = "/deployments?app=hello&status=failed";
    let response = routes.respond(loopback(), get(asked)).await;
    let login = response.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        login,
        "/login?next=%2Fdeployments%3Fapp%3Dhello%26status%3Dfailed"
    );

    let page = routes.respond(loopback(), get(&login)).await;
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.into_body().collect().await.unwrap().to_bytes();
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains(r#"name="next" value="/deployments?app=hello&#38;status=failed""#)
            || page.contains(r#"name="next" value="/deployments?app=hello&amp;status=failed""#),
        "{page}"
    );

    let log_in = |token: &str, next: &str| {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("next", next)
            .finish();
        Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap()
    };
    let admin = routes.admin_token();
    for (next, goes_to) in [
        (asked, asked),
        ("/deployments/7", "/deployments/7"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("/login?next=/", "/"),
        ("", "/"),
    ] {
        let response = routes.respond(loopback(), log_in(&admin, next)).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{next}");
        assert_eq!(response.headers()[header::LOCATION], goes_to, "{next}");
    }
    // A wrong token keeps the way back for the next try, and only a local one.
    for (next, kept) in [(asked, true), ("//evil.example/", false)] {
        let response = routes.respond(loopback(), log_in("wrong", next)).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let page = response.into_body().collect().await.unwrap().to_bytes();
        let page = String::from_utf8_lossy(&page);
        assert_eq!(page.contains("/deployments?app=hello"), kept, "{page}");
        assert!(!page.contains("evil.example"), "{page}");
    }
}

#[tokio::test]
async fn cancel_refuses_unknown_apps_and_strangers_and_says_when_nothing_runs() {
    let routes = Routes::start().await;
    let admin = routes.admin_token();

    assert_eq!(
        routes
            .send(post("/api/apps/nope/cancel", Some(&admin), json!({})))
            .await,
        (StatusCode::NOT_FOUND, error("no app named `nope`"))
    );
    assert_eq!(
        routes
            .send(post("/api/apps/hello/cancel", None, json!({})))
            .await,
        (
            StatusCode::UNAUTHORIZED,
            error("log in on the dashboard or send the admin token (Authorization: Bearer …)")
        )
    );
    assert_eq!(
        routes
            .send(post("/api/apps/hello/cancel", Some(&admin), json!({})))
            .await,
        (
            StatusCode::CONFLICT,
            error("no deployment of `hello` is running")
        )
    );
}

#[tokio::test]
async fn lock_unlock_and_the_why_log_refuse_unknown_apps_strangers_and_deploys_while_locked() {
    let routes = Routes::start().await;
    let admin = routes.admin_token();
    let reason = json!({ "reason": "release freeze" });
    let unknown = error("no app named `nope`");
    for request in [
        post("/api/apps/nope/lock", Some(&admin), reason.clone()),
        post("/api/apps/nope/unlock", Some(&admin), json!({})),
        routes.read("/api/deliveries?app=nope"),
    ] {
        let uri = request.uri().to_string();
        assert_eq!(
            routes.send(request).await,
            (StatusCode::NOT_FOUND, unknown.clone()),
            "{uri}"
        );
    }
    let not_logged_in =
        error("log in on the dashboard or send the admin token (Authorization: Bearer …)");
    for request in [
        post("/api/apps/hello/lock", None, reason.clone()),
        post("/api/apps/hello/unlock", None, json!({})),
        get("/api/deliveries"),
    ] {
        let uri = request.uri().to_string();
        assert_eq!(
            routes.send(request).await,
            (StatusCode::UNAUTHORIZED, not_logged_in.clone()),
            "{uri}"
        );
    }
    let page = routes.respond(loopback(), get("/deliveries")).await;
    assert_eq!(
        page.status(),
        StatusCode::SEE_OTHER,
        "a stranger goes to the login"
    );
    assert_eq!(
        routes
            .send(post(
                "/api/apps/hello/lock",
                Some(&admin),
                json!({ "reason": " " })
            ))
            .await,
        (
            StatusCode::BAD_REQUEST,
            error("a lock needs a reason (--reason \"…\")")
        )
    );
    assert_eq!(
        routes
            .send(post("/api/apps/hello/unlock", Some(&admin), json!({})))
            .await,
        (StatusCode::CONFLICT, error("`hello` is not locked"))
    );

    let (status, locked) = routes
        .send(post("/api/apps/hello/lock", Some(&admin), reason.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{locked}");
    assert_eq!(locked["lock"]["actor"], "admin");
    assert_eq!(locked["lock"]["reason"], "release freeze");
    let (status, twice) = routes
        .send(post("/api/apps/hello/lock", Some(&admin), reason.clone()))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{twice}");
    assert!(
        twice["error"]
            .as_str()
            .unwrap()
            .starts_with("`hello` is already locked by admin since "),
        "{twice}"
    );
    let (_, apps) = routes.send(routes.read("/api/apps")).await;
    assert_eq!(apps[0]["lock"]["reason"], "release freeze", "{apps}");

    // A manual deploy and a redeploy are refused while locked; a rollback is not stopped by
    // the lock (here it is refused for its own reason: nothing is live).
    routes.record(
        "INSERT INTO deployments (id, app, status, trigger, branch, created_at, finished_at,
             version, bundle_key, bundle_sha256)
         VALUES (1, 'hello', 'succeeded', 'push', 'main', 0, 0, 'v1', 'hello/v1.zip', 'ab');",
    );
    for uri in ["/api/apps/hello/deploy", "/api/deployments/1/redeploy"] {
        let (status, answer) = routes.send(post(uri, Some(&admin), json!({}))).await;
        assert_eq!(status, StatusCode::CONFLICT, "{uri}: {answer}");
        let reason = answer["error"].as_str().unwrap();
        assert!(
            reason.starts_with("`hello` is locked by admin since ")
                && reason.ends_with(": release freeze; deploy with --force to deploy anyway"),
            "{reason}"
        );
    }
    assert_eq!(routes.count_deployments(), 1);
    assert_eq!(
        routes
            .send(post("/api/apps/hello/rollback", Some(&admin), json!({})))
            .await,
        (
            StatusCode::CONFLICT,
            error("nothing of `hello` is live to roll back from")
        )
    );
    let (status, forced) = routes
        .send(post(
            "/api/apps/hello/deploy",
            Some(&admin),
            json!({ "force": true }),
        ))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{forced}");
    assert_eq!(routes.count_deployments(), 2);

    let (status, unlocked) = routes
        .send(post("/api/apps/hello/unlock", Some(&admin), json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{unlocked}");
    assert_eq!(
        unlocked["deployment_id"],
        Value::Null,
        "no push was waiting"
    );

    // Every one of those actions is in the why log, refusals with their status and reason.
    let (status, log) = routes
        .send(routes.read("/api/deliveries?app=hello&limit=500"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut decisions: Vec<(String, String, u64)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["event"].as_str().unwrap().to_owned(),
                t["decision"].as_str().unwrap().to_owned(),
                t["status"].as_u64().unwrap(),
            )
        })
        .collect();
    decisions.reverse();
    let expected = [
        ("lock", "refused", 404),
        ("unlock", "refused", 404),
        ("lock", "refused", 401),
        ("unlock", "refused", 401),
        ("lock", "refused", 400),
        ("unlock", "refused", 409),
        ("lock", "locked", 200),
        ("lock", "refused", 409),
        ("deploy", "refused", 409),
        ("redeploy", "refused", 409),
        ("rollback", "refused", 409),
        ("deploy", "deployed", 202),
        ("unlock", "unlocked", 200),
    ];
    let expected: Vec<(String, String, u64)> = expected
        .iter()
        .map(|(e, d, s)| (e.to_string(), d.to_string(), *s))
        .collect();
    // The unknown app's refusals are kept without an app: not in `hello`'s log.
    assert_eq!(decisions, expected[2..], "{log:#}");
    let anonymous = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["actor"] == "anonymous")
        .count();
    assert_eq!(anonymous, 2, "{log:#}");
}
