//! `nonstop serve` killed with SIGKILL in the middle of each stage of a deployment, while
//! clients keep sending requests through the `nonstop proxy` process. On restart: the
//! history is intact, that deployment is `interrupted`, the previous version serves from the
//! port it served before, whatever the deployment started is stopped, no client request
//! failed, and the next deploy goes through.
//!
//! The deployment is held where the test wants it by debug builds' `NONSTOP_TEST_HOLD`
//! (`src/fault.rs`): after the stage's work, before its end is recorded, which is the worst
//! moment to die, since the work happened and the record says it still runs.

use std::time::{Duration, Instant};

use crate::common::{self, Extra, Load, spawn_app_with, wait_port_closed};

async fn killed_in(stage: &str) {
    let mut app = spawn_app_with(Extra {
        env: vec![("NONSTOP_TEST_HOLD".into(), format!("{stage}@2"))],
        proxy_process: true,
        ..Extra::default()
    })
    .await;
    let good = app.deploy(&app.repo.commit("Good")).await;
    let (_, live_before) = app.get_json("/api/apps/hello/live").await;
    let live_port = live_before["port"].as_u64().unwrap() as u16;
    let idle = *app.ports.app.iter().find(|&&p| p != live_port).unwrap();
    let load = Load::start(
        format!("{}/", app.proxy()),
        2,
        100_000,
        Duration::from_secs(240),
    );
    load.wait_sent(50).await;

    let id = app.push(&app.repo.commit("Cut short")).await;
    assert_eq!(id, 2, "the hold is set for deployment 2");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !app.server_log().contains("NONSTOP_TEST_HOLD: holding") {
        let (_, body) = app.get_json(&format!("/api/deployments/{id}")).await;
        let status = body["deployment"]["status"].as_str().unwrap_or("");
        assert!(["queued", "running"].contains(&status), "{body:#}");
        assert!(Instant::now() < deadline, "{stage} never held: {body:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, held) = app.get_json(&format!("/api/deployments/{id}")).await;
    let status_of = |body: &serde_json::Value, name: &str| {
        common::stage(body, name)["status"]
            .as_str()
            .unwrap_or("no such stage")
            .to_owned()
    };
    assert_eq!(status_of(&held, stage), "running", "{held:#}");
    let cut_short = held["deployment"]["version"].as_str().map(str::to_owned);

    app.restart().await;

    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "interrupted", "{done:#}");
    assert!(
        done["deployment"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("stopped while this deployment ran")),
        "{done:#}"
    );
    // What was recorded before the stop is all there.
    let stages = done["stages"].as_array().unwrap();
    let names: Vec<_> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    let at = names.iter().position(|n| *n == stage).unwrap();
    for earlier in &names[..at] {
        assert!(
            ["succeeded", "skipped"].contains(&status_of(&done, earlier).as_str()),
            "{earlier}: {done:#}"
        );
    }
    let (_, first) = app.get_json("/api/deployments/1").await;
    assert_eq!(first["deployment"]["status"], "succeeded");
    assert_eq!(app.count_rows("deployments"), 2, "history intact");
    app.assert_database_intact();

    // The previous version serves, from the port it served before, and nothing the
    // interrupted deployment started still runs.
    app.wait_served(&good).await;
    // Traffic moves before its record is written: the record follows within moments.
    let deadline = Instant::now() + Duration::from_secs(30);
    let live = loop {
        let (_, live) = app.get_json("/api/apps/hello/live").await;
        if live["port"] == live_before["port"] || Instant::now() > deadline {
            break live;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(live["port"], live_before["port"], "{live:#}");
    assert_eq!(live["version"], good.as_str(), "{live:#}");
    wait_port_closed(idle, &format!("what deployment {id} started")).await;
    assert!(
        !app.data_dir()
            .join("tmp")
            .read_dir()
            .is_ok_and(|mut d| d.any(|e| e
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "zip"))),
        "a bundle in the making was left behind"
    );

    let next = app.deploy(&app.repo.commit("After the stop")).await;
    assert_eq!(app.served().await, next);
    let report = load.finish().await;
    println!(
        "killed in {stage}: {} requests answered, {} failed",
        report.ok, report.failed
    );
    report.assert_none_failed();
    // Only ValidateService moves traffic: cut short after it, its version served for the
    // moment between the switch and the restart, then traffic went back.
    for version in report.bodies.keys() {
        assert!(
            *version == good || *version == next || Some(version) == cut_short.as_ref(),
            "served {version}, which is none of {good}, {next} or {cut_short:?}"
        );
        if Some(version) == cut_short.as_ref() {
            assert_eq!(stage, "ValidateService", "{:?}", report.bodies);
        }
    }
    assert!(report.bodies.contains_key(&good), "{:?}", report.bodies);
}

macro_rules! killed_in {
    ($($test:ident => $stage:literal,)*) => {$(
        #[tokio::test]
        async fn $test() {
            killed_in($stage).await;
        }
    )*};
}

killed_in! {
    killed_in_fetch => "Fetch",
    killed_in_build => "Build",
    killed_in_bundle => "Bundle",
    killed_in_upload => "Upload",
    killed_in_application_stop => "ApplicationStop",
    killed_in_download_bundle => "DownloadBundle",
    killed_in_before_install => "BeforeInstall",
    killed_in_install => "Install",
    killed_in_after_install => "AfterInstall",
    killed_in_application_start => "ApplicationStart",
    killed_in_validate_service => "ValidateService",
}
