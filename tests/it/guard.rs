//! The guard: a version that passes its health check and then fails or slows down its real
//! traffic is caught by what the proxy measures, and traffic goes back to the version before
//! with nothing dropped; a good version ends `succeeded` when its window passes.

use std::time::{Duration, Instant};

use crate::common::{Extra, Load, TestApp, spawn_app, spawn_app_with, wait_port_closed};

const GUARD: &str =
    "guard = { secs = 30, max_error_ratio = 0.05, min_requests = 20, max_p99_ratio = 3.0 }";

async fn guarded(guard: &'static str) -> TestApp {
    spawn_app_with(Extra {
        guard: Some(guard),
        ..Extra::default()
    })
    .await
}

#[tokio::test]
async fn error_every_makes_a_version_that_passes_health_and_fails_every_nth_request() {
    let app = spawn_app().await;
    let bad = app.repo.commit_error_every(3);

    let version = app.deploy(&bad).await;

    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = app
            .http
            .get(format!("{}/", app.proxy()))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        2,
        "{statuses:?} of {version}"
    );
    let profile = app
        .http
        .get(format!("{}/profile", app.proxy()))
        .send()
        .await
        .unwrap();
    assert_eq!(profile.status(), 200);
}

/// Deploys a first version (no guard: nothing was live before) and starts a load on it.
async fn base_under_load(app: &TestApp) -> (String, Load) {
    let base = app.deploy(&app.repo.commit("Base")).await;
    let load = Load::start(
        format!("{}/", app.proxy()),
        4,
        20_000,
        Duration::from_secs(120),
    );
    load.wait_sent(200).await;
    // The previous version's p99 comes from the seconds sampled before the switch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    (base, load)
}

#[tokio::test]
async fn a_version_failing_a_third_of_its_requests_is_switched_back_within_the_window() {
    let app = guarded(GUARD).await;
    let (base, load) = base_under_load(&app).await;

    let id = app.push(&app.repo.commit_error_every(3)).await;
    let done = app.wait_finished(id).await;

    let deployment = &done["deployment"];
    assert_eq!(deployment["status"], "rolled_back", "{done:#}");
    let reason = deployment["error"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("5xx ") && reason.ends_with("after the switch; limit 5%"),
        "{reason}"
    );
    let window = &done["guard"]["window"];
    assert_eq!(window["outcome"], "tripped", "{done:#}");
    assert!(
        deployment["finished_at"].as_i64().unwrap() < window["ends_at"].as_i64().unwrap(),
        "switched back within the window: {done:#}"
    );
    app.wait_served(&base).await;
    wait_port_closed(app.ports.app[1], "the version the guard switched away from").await;
    let report = load.finish().await;
    assert_eq!(report.connection_errors, 0, "{:?}", report.failures);
    let statuses: Vec<u16> = report.statuses.keys().copied().collect();
    assert_eq!(statuses, [200, 500], "only the bad version's own 500s");
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(live["version"], base.as_str());
    // The page keeps the chart that made the guard decide: both versions, the bad one's errors.
    let (status, page) = app.get_text(&format!("/deployments/{id}")).await;
    assert_eq!(status, 200);
    assert!(page.contains(r#"data-guard-outcome="tripped""#), "{page}");
    let bad = deployment["version"].as_str().unwrap();
    for line in [
        format!(r#"data-version="{base}""#),
        format!(r#"data-version="{bad}""#),
        format!(r#"data-errors="{bad}""#),
    ] {
        assert!(page.contains(&line), "no {line} in the chart: {page}");
    }
}

#[tokio::test]
async fn a_good_version_stays_live_guarding_with_a_countdown_then_succeeds() {
    let app = guarded("guard = { secs = 3 }").await;
    let (_, load) = base_under_load(&app).await;

    let id = app.push(&app.repo.commit("Good")).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let secs_left = loop {
        let (_, now) = app.get_json(&format!("/api/deployments/{id}")).await;
        if now["deployment"]["status"] == "guarding" {
            break now["guard"]["secs_left"].as_i64().unwrap();
        }
        assert!(
            ["queued", "running"].contains(&now["deployment"]["status"].as_str().unwrap()),
            "{now:#}"
        );
        assert!(Instant::now() < deadline, "never guarding: {now:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!((1..=3).contains(&secs_left), "{secs_left}");
    // Its console ended with its pipeline: following it while it guards gets the record
    // and the end, never a stream left open.
    let console = tokio::time::timeout(
        Duration::from_secs(30),
        app.http
            .get(format!("{}/api/deployments/{id}/log?follow=1", app.base()))
            .bearer_auth(crate::common::ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text(),
    )
    .await
    .expect("the follow of a guarding deployment ends")
    .unwrap();
    assert!(console.contains("ValidateService succeeded"), "{console}");
    assert!(
        console.trim_end().ends_with("event: end\ndata: {}"),
        "{console}"
    );
    let done = app.wait_finished(id).await;

    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    assert_eq!(done["guard"]["window"]["outcome"], "passed", "{done:#}");
    let version = done["deployment"]["version"].as_str().unwrap();
    assert_eq!(app.served().await, version);
    let report = load.finish().await;
    report.assert_none_failed();
}

#[tokio::test]
async fn a_version_that_is_only_slow_trips_the_p99_limit() {
    let app = guarded(GUARD).await;
    let (base, load) = base_under_load(&app).await;

    let id = app.push(&app.repo.commit_slow(300)).await;
    let done = app.wait_finished(id).await;

    assert_eq!(done["deployment"]["status"], "rolled_back", "{done:#}");
    let reason = done["deployment"]["error"].as_str().unwrap_or_default();
    assert!(reason.starts_with("p99 "), "{reason}");
    app.wait_served(&base).await;
    let report = load.finish().await;
    report.assert_none_failed();
}

#[tokio::test]
async fn a_window_open_at_a_restart_resumes_and_still_switches_a_bad_version_back() {
    let mut app = guarded(GUARD).await;
    let base = app.deploy(&app.repo.commit("Base")).await;
    // No traffic yet: the bad version has nothing to be judged by before the restart.
    let id = app.push(&app.repo.commit_error_every(3)).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, now) = app.get_json(&format!("/api/deployments/{id}")).await;
        if now["deployment"]["status"] == "guarding" {
            break;
        }
        assert!(Instant::now() < deadline, "never guarding: {now:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    app.restart().await;

    let (_, now) = app.get_json(&format!("/api/deployments/{id}")).await;
    assert_eq!(now["deployment"]["status"], "guarding", "{now:#}");
    let load = Load::start(
        format!("{}/", app.proxy()),
        4,
        20_000,
        Duration::from_secs(120),
    );
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "rolled_back", "{done:#}");
    app.wait_served(&base).await;
    let report = load.finish().await;
    assert_eq!(report.connection_errors, 0, "{:?}", report.failures);
}
