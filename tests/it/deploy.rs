//! A signed push becomes a live release: the story end to end, with the real binary, real
//! git, a real cargo build of the example app, real child processes and the real proxy.

use std::time::Duration;

use crate::common::{self, Extra, Load, spawn_app, spawn_app_with, stage, wait_port_closed};

#[tokio::test]
async fn a_signed_push_deploys_the_example_app_and_the_proxy_serves_it() {
    let app = spawn_app().await;
    let first = app.repo.commit("Say hello");

    let version = app.deploy(&first).await;

    assert!(version.starts_with("1.0.1-SNAPSHOT-2"), "{version}");
    assert_eq!(app.served().await, version);
    let (status, live) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(status, 200);
    assert_eq!(live["port"], app.ports.app[0]);
    assert_eq!(live["profile"], "real1");
    assert_eq!(live["version"], version);

    // The next push goes to the other port and profile; the first instance keeps running.
    let second = app.repo.commit("Say hello again");
    let next = app.deploy(&second).await;
    assert_ne!(next, version);
    assert_eq!(app.served().await, next);
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(live["port"], app.ports.app[1]);
    assert_eq!(live["profile"], "real2");
    let old = reqwest::get(format!("http://127.0.0.1:{}/", app.ports.app[0]))
        .await
        .unwrap();
    assert_eq!(
        old.text().await.unwrap().trim(),
        version,
        "the old instance is kept for rollback"
    );
}

#[tokio::test]
async fn every_stage_is_recorded_with_its_output() {
    let app = spawn_app().await;
    let sha = app.repo.commit("Record me");
    let id = app.push(&sha).await;
    let done = app.wait_finished(id).await;

    let deployment = &done["deployment"];
    assert_eq!(deployment["status"], "succeeded", "{done:#}");
    assert_eq!(deployment["commit_sha"], sha);
    assert_eq!(deployment["trigger"], "push");
    assert_eq!(deployment["bundle_sha256"].as_str().unwrap().len(), 64);
    let stages: Vec<(&str, &str)> = done["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        stages,
        [
            ("Fetch", "succeeded"),
            ("Build", "succeeded"),
            ("Bundle", "succeeded"),
            ("Upload", "succeeded"),
            ("ApplicationStop", "skipped"),
            ("DownloadBundle", "succeeded"),
            ("BeforeInstall", "succeeded"),
            ("Install", "succeeded"),
            ("AfterInstall", "succeeded"),
            ("ApplicationStart", "succeeded"),
            ("ValidateService", "succeeded"),
        ]
    );
    let log_of = |name: &str| stage(&done, name)["log"].as_str().unwrap().to_owned();
    assert!(
        log_of("Build").contains("Compiling hello"),
        "{}",
        log_of("Build")
    );
    assert!(
        log_of("Bundle").contains("appspec.yml"),
        "{}",
        log_of("Bundle")
    );
    assert!(
        log_of("ValidateService").contains("switched traffic"),
        "{}",
        log_of("ValidateService")
    );
    for stage in done["stages"].as_array().unwrap() {
        if stage["status"] == "succeeded" {
            assert!(
                stage["finished_at"].as_i64() >= stage["started_at"].as_i64(),
                "{stage}"
            );
        }
    }

    // A second deploy runs ApplicationStop from the first revision, as CodeDeploy does.
    let next = app.repo.commit("Again");
    let id = app.push(&next).await;
    let done = app.wait_finished(id).await;
    let stop = stage(&done, "ApplicationStop");
    assert_eq!(stop["status"], "succeeded", "{stop}");
}

#[tokio::test]
async fn five_deploys_under_load_lose_no_request() {
    let app = spawn_app().await;
    let mut versions = vec![app.deploy(&app.repo.commit("Base")).await];

    let load = Load::start(
        format!("{}/", app.proxy()),
        8,
        50_000,
        Duration::from_secs(240),
    );
    load.wait_sent(200).await;
    for round in 0..5 {
        let sha = app.repo.commit(&format!("Round {round}"));
        versions.push(app.deploy(&sha).await);
        // Let each version serve a while so the count shows every one of them.
        let served_before = load.sent.load(std::sync::atomic::Ordering::Relaxed);
        load.wait_sent(served_before + 100).await;
    }
    let report = load.finish().await;

    println!(
        "load: {} ok, {} failed, by version: {:?}",
        report.ok, report.failed, report.bodies
    );
    report.assert_none_failed();
    for version in &versions {
        assert!(
            report.bodies.contains_key(version),
            "{version} was never served: {:?}",
            report.bodies
        );
    }
    assert_eq!(
        report.bodies.len(),
        versions.len(),
        "something else was served: {:?}",
        report.bodies
    );
}

#[tokio::test]
async fn a_version_that_never_becomes_healthy_leaves_the_old_one_serving() {
    let app = spawn_app().await;
    let good = app.deploy(&app.repo.commit("Good")).await;

    let load = Load::start(
        format!("{}/", app.proxy()),
        8,
        50_000,
        Duration::from_secs(240),
    );
    load.wait_sent(100).await;
    let bad = app.repo.commit_unhealthy();
    let id = app.push(&bad).await;
    let done = app.wait_finished(id).await;
    let report = load.finish().await;

    let deployment = &done["deployment"];
    assert_eq!(deployment["status"], "failed", "{done:#}");
    let error = deployment["error"].as_str().unwrap();
    assert!(error.starts_with("ValidateService failed"), "{error}");
    assert!(
        error.contains("not healthy after 40 attempts"),
        "the reason is the script's: {error}"
    );
    let validate = stage(&done, "ValidateService");
    assert_eq!(validate["status"], "failed");
    assert!(
        validate["log"].as_str().unwrap().contains("503"),
        "the hook output is kept: {validate}"
    );

    report.assert_none_failed();
    assert_eq!(
        report.bodies.keys().collect::<Vec<_>>(),
        [&good],
        "only the good version served"
    );
    assert_eq!(app.served().await, good);
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(live["port"], app.ports.app[0]);
    // The failed instance was stopped: nothing answers on the idle port.
    let idle = reqwest::get(format!("http://127.0.0.1:{}/", app.ports.app[1])).await;
    assert!(idle.is_err(), "the failed version still runs: {idle:?}");
}

#[tokio::test]
async fn after_a_restart_the_proxy_serves_the_same_live_port() {
    let mut app = spawn_app().await;
    app.deploy(&app.repo.commit("One")).await;
    let version = app.deploy(&app.repo.commit("Two")).await;
    let (_, before) = app.get_json("/api/apps/hello/live").await;

    app.restart().await;

    assert_eq!(app.served().await, version);
    let (_, after) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(after["port"], before["port"]);
    assert_eq!(after["port"], app.ports.app[1]);
    assert_eq!(after["since"], before["since"], "a restart is not a switch");
}

#[tokio::test]
async fn a_deployment_running_when_the_server_dies_is_interrupted_and_nothing_recorded_is_lost() {
    let mut app = spawn_app().await;
    let version = app.deploy(&app.repo.commit("One")).await;
    let sha = app.repo.commit("Two");
    let id = app.push(&sha).await;
    // Kill it while the deployment runs (Fetch or Build: a cargo build takes a while).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = app.get_json(&format!("/api/deployments/{id}")).await;
        if body["deployment"]["status"] == "running" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ran: {body}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.restart().await;

    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "interrupted", "{done:#}");
    assert_eq!(app.count_rows("deployments"), 2);
    assert_eq!(app.served().await, version);
}

#[tokio::test]
async fn a_rollback_switches_back_while_the_old_instance_runs_and_redeploys_its_bundle_once_it_is_gone()
 {
    let app = spawn_app().await;
    let first = app.deploy(&app.repo.commit("One")).await;
    app.deploy(&app.repo.commit("Two")).await;
    let rollback = |app: &common::TestApp| {
        app.http
            .post(format!("{}/api/apps/hello/rollback", app.base()))
            .bearer_auth(common::ADMIN_TOKEN)
            .send()
    };

    // The first instance still runs: rolling back is one switch.
    let response = rollback(&app).await.unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<serde_json::Value>().await.unwrap()["deployment_id"]
        .as_i64()
        .unwrap();
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["trigger"], "rollback");
    assert_eq!(done["deployment"]["rollback_of"], 2);
    assert_eq!(app.served().await, first);
    let (_, undone) = app.get_json("/api/deployments/2").await;
    assert_eq!(undone["deployment"]["status"], "rolled_back");

    // Deploy again, then take the previous instance away: the rollback must rebuild nothing,
    // it redeploys the stored bundle of the version that was live before.
    let third = app.deploy(&app.repo.commit("Three")).await;
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    let other = if live["port"] == app.ports.app[0] {
        app.ports.app[1]
    } else {
        app.ports.app[0]
    };
    let pid_file = app.data_dir().join(format!("apps/hello/run/{other}.pid"));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the instance this test's server started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_port_closed(other, "the killed old instance").await;

    let response = rollback(&app).await.unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<serde_json::Value>().await.unwrap()["deployment_id"]
        .as_i64()
        .unwrap();
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    assert_eq!(
        done["deployment"]["version"],
        first.as_str(),
        "the version live before {third} was {first}"
    );
    let skipped: Vec<_> = done["stages"].as_array().unwrap()[..4]
        .iter()
        .map(|s| s["status"].clone())
        .collect();
    assert_eq!(skipped, ["skipped"; 4], "nothing rebuilt: {done:#}");
    assert_eq!(app.served().await, first);
}

#[tokio::test]
async fn old_bundles_revisions_and_releases_are_pruned_but_never_the_live_or_previous_one() {
    let app = spawn_app_with(Extra {
        app: "store = { kind = \"local\", keep = 2 }\nrunner = { kind = \"local\", keep = 2 }"
            .into(),
        ..Extra::default()
    })
    .await;
    let mut versions = Vec::new();
    for n in 1..=4 {
        versions.push(app.deploy(&app.repo.commit(&format!("Release {n}"))).await);
    }
    let names = |dir: &str| {
        let mut names: Vec<String> = std::fs::read_dir(app.data_dir().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let (live, previous) = (&versions[3], &versions[2]);
    assert_eq!(
        names("artifacts/hello"),
        [format!("{previous}.zip"), format!("{live}.zip")]
    );
    assert_eq!(
        names("apps/hello/releases"),
        [previous.clone(), live.clone()]
    );
    assert_eq!(names("apps/hello/deployments"), ["3", "4"]);
    assert_eq!(
        names("apps/hello/deployments/4"),
        ["deployment-archive"],
        "the zip went once unpacked"
    );

    // What retention deleted is recorded, and can no longer be redeployed.
    for (id, pruned) in [(1, true), (2, true), (3, false), (4, false)] {
        let (_, body) = app.get_json(&format!("/api/deployments/{id}")).await;
        assert_eq!(
            body["deployment"]["bundle_pruned_at"].is_i64(),
            pruned,
            "{body:#}"
        );
    }
    let refused = app
        .http
        .post(format!("{}/api/deployments/1/redeploy", app.base()))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let reason = refused.json::<serde_json::Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("deleted by retention"), "{reason}");

    // The previous instance still runs from its release: rolling back (from the CLI) is
    // one switch.
    let out = app.cli(&["rollback", "hello"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.starts_with("rollback of hello: deployment 5,"),
        "{said}"
    );
    assert_eq!(
        app.wait_finished(5).await["deployment"]["status"],
        "succeeded"
    );
    assert_eq!(app.served().await, *previous);
    // `status` reads the API with the admin token, as `deploy` and `rollback` act with it.
    let out = app.cli(&["status", "hello"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.starts_with(&format!("hello  live on {} (real", app.ports.app[0]))
            || said.starts_with(&format!("hello  live on {} (real", app.ports.app[1])),
        "{said}"
    );
    assert!(said.contains(&format!("version {previous}")), "{said}");
    assert!(said.contains("  #5 "), "{said}");

    // An app the server does not know: the CLI says so in one line.
    let out = app.cli(&["rollback", "nope"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.starts_with("nonstop: 404") && said.lines().count() == 1,
        "{said}"
    );
}
