//! nonstop in front of a real nginx, as in the classic recipe: the switch rewrites the
//! include file, checks it with `nginx -t` and reloads. A config nginx rejects leaves the
//! include as it was and the previous version serving.

use std::path::Path;

use crate::common::nginx::Nginx;
use crate::common::{Extra, Ports, spawn_app_with, stage};

fn nginx_switch(_: &Ports, dir: &Path) -> String {
    format!(
        "switch = {{ kind = \"nginx\", include = \"{}\", conf = \"{}\" }}",
        dir.join("nginx/service-url.inc").display(),
        dir.join("nginx/nginx.conf").display(),
    )
}

#[tokio::test]
async fn deploys_switch_nginx_and_a_rejected_config_keeps_the_old_version() {
    let app = spawn_app_with(Extra {
        switch: Some(nginx_switch),
        ..Extra::default()
    })
    .await;
    let _nginx = Nginx::start(
        &app.dir.path().join("nginx"),
        app.ports.proxy,
        app.ports.app[0],
    );
    let include = app.dir.path().join("nginx/service-url.inc");

    // nginx applies a reload a few milliseconds after `nginx -s reload` returns.
    let first = app.deploy(&app.repo.commit("Through nginx")).await;
    app.wait_served(&first).await;
    assert_eq!(
        std::fs::read_to_string(&include).unwrap(),
        nonstop::switch::nginx::render_include(app.ports.app[0])
    );
    let second = app.deploy(&app.repo.commit("Again")).await;
    app.wait_served(&second).await;
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(live["port"], app.ports.app[1]);

    // Someone breaks nginx.conf: `nginx -t` now fails, so the next switch must not happen.
    let conf = app.dir.path().join("nginx/nginx.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        good.replace("events {", "not_a_directive on;\nevents {"),
    )
    .unwrap();
    let before = std::fs::read_to_string(&include).unwrap();
    let id = app.push(&app.repo.commit("Blocked by nginx -t")).await;
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "failed", "{done:#}");
    let validate = stage(&done, "ValidateService");
    assert!(
        validate["log"]
            .as_str()
            .unwrap()
            .contains("not_a_directive"),
        "nginx's complaint is kept: {validate}"
    );
    assert_eq!(
        std::fs::read_to_string(&include).unwrap(),
        before,
        "the include was restored"
    );
    assert_eq!(
        app.served().await,
        second,
        "the previous version keeps serving"
    );

    // Fixed config: deploys go through again.
    std::fs::write(&conf, good).unwrap();
    let third = app.deploy(&app.repo.commit("Unblocked")).await;
    app.wait_served(&third).await;
}
