//! Restarting or upgrading nonstop itself must not drop traffic: with the proxies in a
//! `nonstop proxy` process of their own, `serve` comes and goes while clients keep their
//! connections, and deploys keep switching through the restarted server.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{Extra, Load, spawn_app_with};

#[tokio::test]
async fn restarting_serve_three_times_under_load_loses_no_request() {
    let mut app = spawn_app_with(Extra {
        proxy_process: true,
        ..Extra::default()
    })
    .await;
    let first = app.deploy(&app.repo.commit("Before the restarts")).await;

    let load = Load::start(
        format!("{}/", app.proxy()),
        8,
        100_000,
        Duration::from_secs(240),
    );
    load.wait_sent(200).await;
    for signal in [libc::SIGKILL, libc::SIGTERM, libc::SIGKILL] {
        app.restart_with(signal).await;
        let sent = load.sent.load(Ordering::Relaxed);
        load.wait_sent(sent + 200).await;
    }
    // The restarted server still moves traffic, through the same proxy process.
    let last = app.deploy(&app.repo.commit("After the restarts")).await;
    let sent = load.sent.load(Ordering::Relaxed);
    load.wait_sent(sent + 200).await;
    let report = load.finish().await;

    println!(
        "load: {} ok, {} failed, by version: {:?}",
        report.ok, report.failed, report.bodies
    );
    report.assert_none_failed();
    let mut expected = vec![&first, &last];
    expected.sort();
    assert_eq!(
        report.bodies.keys().collect::<Vec<_>>(),
        expected,
        "both versions, nothing else"
    );
    assert_eq!(app.served().await, last);
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(live["version"], last.as_str());
}
