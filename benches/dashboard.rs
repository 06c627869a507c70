//! Server time of the dashboard's pages with 10,000 deployments on record.
//! `cargo bench --bench dashboard`: fills a fresh SQLite file (11 stages with output per
//! deployment, like real ones), then times each page through the real router, in process.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const DEPLOYMENTS: i64 = 10_000;
const RUNS: usize = 50;

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config_path = dir.path().join("nonstop.toml");
    std::fs::write(
        &config_path,
        r#"[server]
listen = "127.0.0.1:0"
data_dir = "data"
proxy_process = false

[[app]]
name = "hello"
repo = "unused"
build = "true"
artifact = "hello"
run = "{artifact} --port {port}"
switch = { kind = "proxy", listen = "127.0.0.1:0" }
"#,
    )
    .expect("config written");
    let config = nonstop::config::Config::load(&config_path).expect("a valid config");
    let server = nonstop::serve::prepare(config, CancellationToken::new())
        .await
        .expect("the server prepares");
    let state = server.state.clone();

    let started = Instant::now();
    state.db.call(fill).await.expect("rows written");
    println!(
        "filled {DEPLOYMENTS} deployments in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Reading needs the admin token (server.public_read is off), as a script sends it.
    let token = format!("Bearer {}", state.admin_token.expose());
    let router = nonstop::web::router(state);
    println!("{:<34} {:>9} {:>9} {:>9}", "page", "median", "p95", "bytes");
    for path in [
        "/",
        "/deployments",
        "/deployments?page=150",
        "/deployments?app=hello&status=failed",
        "/deployments/5000",
        "/api/deployments?limit=50",
    ] {
        let mut times = Vec::with_capacity(RUNS);
        let mut bytes = 0;
        for run in 0..RUNS + 5 {
            let request = Request::get(path)
                .header("authorization", &token)
                .body(Body::empty())
                .expect("a request");
            let begun = Instant::now();
            let response = router.clone().oneshot(request).await.expect("an answer");
            assert!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
            bytes = response
                .into_body()
                .collect()
                .await
                .expect("a body")
                .to_bytes()
                .len();
            // The first few warm SQLite's page cache and the statement cache.
            if run >= 5 {
                times.push(begun.elapsed());
            }
        }
        times.sort();
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
        println!(
            "{:<34} {:>9} {:>9} {:>9}",
            path,
            ms(times[times.len() / 2]),
            ms(times[times.len() * 95 / 100]),
            bytes
        );
    }
}

fn fill(conn: &mut rusqlite::Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let statuses = [
        "succeeded",
        "succeeded",
        "succeeded",
        "failed",
        "rolled_back",
        "superseded",
    ];
    let log: String = (0..40)
        .map(|i| format!("line {i} of a stage's output\n"))
        .collect();
    let start = 1_790_000_000_000_i64;
    for id in 1..=DEPLOYMENTS {
        let at = start + id * 60_000;
        tx.execute(
            "INSERT INTO deployments (id, app, status, trigger, branch, commit_sha, commit_message, author,
                 version, stamped_at, port, bundle_key, bundle_sha256, created_at, started_at, finished_at)
             VALUES (?1, 'hello', ?2, 'push', 'main', ?3, 'A change', 'ada', ?4, ?5, 8081, ?6, ?7, ?5, ?5, ?8)",
            rusqlite::params![
                id,
                statuses[id as usize % statuses.len()],
                format!("{id:040x}"),
                format!("1.0.1-SNAPSHOT-{id:014}"),
                at,
                format!("hello/{id}.zip"),
                "0".repeat(64),
                at + 9_000
            ],
        )?;
        for (position, stage) in nonstop::domain::Stage::ALL.iter().enumerate() {
            tx.execute(
                "INSERT INTO stages (deployment_id, position, name, status, started_at, finished_at, log)
                 VALUES (?1, ?2, ?3, 'succeeded', ?4, ?5, ?6)",
                rusqlite::params![id, position, stage.as_str(), at, at + 500, log],
            )?;
        }
    }
    tx.commit()
}
