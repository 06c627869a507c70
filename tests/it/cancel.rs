//! `nonstop cancel APP` stops the running deployment at once, wherever it is, under load:
//! the previous version serves throughout, what the deployment started is gone, and the
//! record says `cancelled` and by whom.

use std::time::{Duration, Instant};

use crate::common::{Extra, Load, TestApp, spawn_app_with, stage};

/// A commit holding SLOW_BUILD builds for a minute (a child that writes its pid first), so a
/// cancel finds it in Build.
async fn app_whose_builds_may_hang(pids: &std::path::Path) -> TestApp {
    spawn_app_with(Extra {
        build: Some(format!(
            "if [ -f SLOW_BUILD ]; then sh -c 'echo $$ > {}/build.pid; exec sleep 60'; fi; \
             cargo build --release --target-dir target",
            pids.display()
        )),
        ..Extra::default()
    })
    .await
}

async fn wait_for_stage(app: &TestApp, id: i64, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, record) = app.get_json(&format!("/api/deployments/{id}")).await;
        if stage(&record, name)["status"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never ran: {record:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cancel(app: &TestApp) -> String {
    let out = app.cli(&["cancel", "hello"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test]
async fn a_cancel_during_build_kills_the_build_and_the_live_version_serves_on() {
    let pids = tempfile::tempdir().unwrap();
    let app = app_whose_builds_may_hang(pids.path()).await;
    let live = app.deploy(&app.repo.commit("Live")).await;
    let load = Load::start(
        format!("{}/", app.proxy()),
        4,
        50_000,
        Duration::from_secs(120),
    );
    load.wait_sent(100).await;
    std::fs::write(app.repo.path.join("SLOW_BUILD"), "").unwrap();
    let id = app.push(&app.repo.commit_all("Hangs in its build")).await;
    wait_for_stage(&app, id, "Build").await;
    let pid_file = pids.path().join("build.pid");
    wait_until("the build never started its child", || pid_file.exists()).await;
    let build: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(build));

    let said = cancel(&app);

    let report = load.finish().await;
    report.assert_none_failed();
    assert_eq!(report.bodies.keys().collect::<Vec<_>>(), [&live]);
    assert!(
        said.starts_with(&format!("cancelling deployment {id} of hello\n")),
        "{said}"
    );
    assert!(
        said.contains(&format!("deployment {id} cancelled: cancelled by ")),
        "{said}"
    );
    wait_until("the build's child still runs", || !alive(build)).await;
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "cancelled", "{done:#}");
    assert!(
        done["deployment"]["error"]
            .as_str()
            .unwrap()
            .starts_with("cancelled by "),
        "{done:#}"
    );
    assert_eq!(stage(&done, "ApplicationStart")["status"], "skipped");
    assert_eq!(app.served().await, live);
    let (_, why) = app.get_json("/api/deliveries?app=hello").await;
    assert!(
        why.as_array()
            .unwrap()
            .iter()
            .any(|t| t["decision"] == "cancelled" && t["deployment_id"] == id),
        "{why:#}"
    );

    // The next deployment runs as usual.
    std::fs::remove_file(app.repo.path.join("SLOW_BUILD")).unwrap();
    app.deploy(&app.repo.commit_all("Builds again")).await;
}

#[tokio::test]
async fn a_cancel_after_its_instance_started_stops_it_and_the_live_version_serves_on() {
    let pids = tempfile::tempdir().unwrap();
    let app = app_whose_builds_may_hang(pids.path()).await;
    let live = app.deploy(&app.repo.commit("Live")).await;
    let load = Load::start(
        format!("{}/", app.proxy()),
        4,
        50_000,
        Duration::from_secs(120),
    );
    load.wait_sent(100).await;
    // Never healthy: ValidateService waits for it, with its instance up on the idle port.
    let id = app.push(&app.repo.commit_unhealthy()).await;
    wait_for_stage(&app, id, "ValidateService").await;
    let (_, record) = app.get_json(&format!("/api/deployments/{id}")).await;
    let idle = record["deployment"]["port"].as_u64().unwrap() as u16;
    let answers = || std::net::TcpStream::connect(("127.0.0.1", idle)).is_ok();
    wait_until("the new instance never listened", answers).await;

    cancel(&app);

    wait_until("the cancelled deployment's instance still runs", || {
        !answers()
    })
    .await;
    let report = load.finish().await;
    report.assert_none_failed();
    assert_eq!(report.bodies.keys().collect::<Vec<_>>(), [&live]);
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "cancelled", "{done:#}");
    assert_eq!(app.served().await, live);
    let (_, now) = app.get_json("/api/apps/hello/live").await;
    assert_ne!(now["port"], idle, "{now:#}");
}
