//! The app's own release command and hooks: `release` and `hooks.before_switch` run once
//! per deployment with the new instance up and traffic still on the old version,
//! `hooks.after_switch` once traffic moved; each is a stage of its own, and a failing
//! release leaves the old version serving.

use std::time::{Duration, Instant};

use crate::common::{Extra, Load, TestApp, spawn_app_with, stage};

/// An app whose release and hooks each append a line to `marks`: which command, what it
/// was told, and what the proxy served at that moment.
async fn app_with_release(marks: &std::path::Path, release: &str) -> TestApp {
    let log = marks.join("marks.log");
    let mark = |what: &str| {
        format!(
            "echo \"{what} $NONSTOP_STAGE $NONSTOP_VERSION prev=$NONSTOP_PREVIOUS_VERSION idle=$NONSTOP_IDLE_PORT live=$NONSTOP_LIVE_PORT commit=$NONSTOP_COMMIT mode=$APP_MODE served=$(curl -s $PROXY/)\" >> {}",
            log.display()
        )
    };
    let mut app = spawn_app_with(Extra::default()).await;
    // The proxy's address is known once the app is spawned: written into the config, then
    // the server restarted to read it.
    let proxy = app.proxy();
    let release = if release.is_empty() {
        mark("release")
    } else {
        release.to_owned()
    };
    app.set_app_config(&format!(
        "env = {{ APP_MODE = \"production\", PROXY = \"{proxy}\" }}\n\
         release = '{release}'\n\
         hooks = {{ before_switch = '{}', after_switch = '{}' }}\n",
        mark("before"),
        mark("after")
    ))
    .await;
    app
}

#[tokio::test]
async fn release_and_hooks_run_once_each_around_the_switch_with_the_deployment_in_their_env() {
    let marks = tempfile::tempdir().unwrap();
    let app = app_with_release(marks.path(), "").await;
    let first = app.deploy(&app.repo.commit("First")).await;
    let log = marks.path().join("marks.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let [from, to] = app.ports.app;
    assert!(
        lines[0].starts_with(&format!(
            "release Release {first} prev= idle={from} live= commit="
        )),
        "{text}"
    );
    assert!(lines[0].contains("mode=production"), "{text}");
    assert!(lines[1].starts_with("before BeforeSwitch "), "{text}");
    assert!(lines[2].starts_with("after AfterSwitch "), "{text}");
    assert!(lines[2].ends_with(&format!("served={first}")), "{text}");
    std::fs::remove_file(&log).unwrap();

    let sha = app.repo.commit("Second");
    let second = app.deploy(&sha).await;

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "once per deployment: {text}");
    assert_eq!(
        lines[0],
        format!(
            "release Release {second} prev={first} idle={to} live={from} commit={sha} mode=production served={first}"
        ),
        "the release runs before the switch, told of both versions"
    );
    assert!(lines[1].ends_with(&format!("served={first}")), "{text}");
    assert!(lines[2].ends_with(&format!("served={second}")), "{text}");
    let (_, done) = app.get_json("/api/deployments/2").await;
    let names: Vec<&str> = done["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let at = |name| names.iter().position(|n| *n == name).unwrap();
    assert!(at("ApplicationStart") < at("Release"));
    assert!(at("BeforeSwitch") < at("ValidateService"));
    assert!(at("ValidateService") < at("AfterSwitch"));
    for name in ["Release", "BeforeSwitch", "AfterSwitch"] {
        assert_eq!(
            stage(&done, name)["status"],
            "succeeded",
            "{name}: {done:#}"
        );
    }
    assert!(
        stage(&done, "Release")["log"]
            .as_str()
            .unwrap()
            .starts_with("$ echo \"release"),
        "{done:#}"
    );
}

#[tokio::test]
async fn a_failing_release_leaves_the_old_version_serving_and_fails_with_its_output() {
    let marks = tempfile::tempdir().unwrap();
    let app = app_with_release(marks.path(), "").await;
    let live = app.deploy(&app.repo.commit("Live")).await;
    let failing = "echo migrating; echo \"relation users does not exist\" >&2; exit 3";
    let mut app = app;
    app.set_app_config(&format!("release = '{failing}'\n"))
        .await;
    let load = Load::start(
        format!("{}/", app.proxy()),
        4,
        50_000,
        Duration::from_secs(120),
    );
    load.wait_sent(100).await;

    let id = app.push(&app.repo.commit("Needs a migration")).await;
    let done = app.wait_finished(id).await;

    let report = load.finish().await;
    report.assert_none_failed();
    assert_eq!(report.bodies.keys().collect::<Vec<_>>(), [&live]);
    let deployment = &done["deployment"];
    assert_eq!(deployment["status"], "failed", "{done:#}");
    assert_eq!(
        deployment["error"],
        format!("Release failed: relation users does not exist ({failing} exit code 3)")
    );
    let release = stage(&done, "Release");
    assert_eq!(release["status"], "failed");
    assert!(
        release["log"].as_str().unwrap().contains("migrating\n"),
        "{release:#}"
    );
    for never in ["BeforeSwitch", "ValidateService", "AfterSwitch"] {
        assert_eq!(stage(&done, never)["status"], "skipped", "{never}");
    }
    assert_eq!(app.served().await, live);
    // The new instance was stopped: nothing answers on the idle port.
    let idle = deployment["port"].as_u64().unwrap() as u16;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", idle)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the new instance still runs on {idle}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
