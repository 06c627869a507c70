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
            ("Release", "skipped"),
            ("BeforeSwitch", "skipped"),
            ("ValidateService", "succeeded"),
            ("AfterSwitch", "skipped"),
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

/// What only the server's environment holds: none of it may reach a child, a log, a page
/// or the database.
const SERVER_ONLY: [(&str, &str); 4] = [
    ("AWS_SECRET_ACCESS_KEY", "aws-s3cret-of-the-server"),
    ("AWS_ACCESS_KEY_ID", "AKIASERVERONLYKEYID"),
    ("GITHUB_WEBHOOK_SECRET", "github-s3cret-of-the-server"),
    ("SERVER_ONLY_SETTING", "server-only-value"),
];

/// The app's secrets, as the server's env vars its config names.
const APP_SECRETS: [(&str, &str); 2] = [
    (
        "DATABASE_URL",
        "postgres://app:db-s3cret-value@127.0.0.1/app",
    ),
    ("SESSION_KEY", "session-s3cret-value"),
];

/// A value of the app's env file (treated as a secret).
const FILE_SECRET: (&str, &str) = ("FILE_TOKEN", "file-s3cret-value");

/// The `env` output a build or an instance wrote, by name.
fn env_dump(path: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// An app whose build and instances write their whole environment into `dumps`.
async fn app_dumping_its_env(
    dumps: &std::path::Path,
    env_file: &std::path::Path,
) -> common::TestApp {
    let d = dumps.display();
    let env: Vec<(String, String)> = SERVER_ONLY
        .iter()
        .chain(&APP_SECRETS)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spawn_app_with(Extra {
        build: Some(format!(
            "env > {d}/build.env && echo \"db is $DATABASE_URL\" && cargo build --release --target-dir target"
        )),
        run: Some(format!(
            "sh -c 'env > {d}/instance.env; exec \"$0\" \"$@\"' {{artifact}} --port {{port}} --profile {{profile}}"
        )),
        app: format!(
            "env = {{ RUST_LOG = \"info\", APP_MODE = \"production\" }}\n\
             secrets = [\"DATABASE_URL\", \"SESSION_KEY\"]\n\
             env_file = \"{}\"\n",
            env_file.display()
        ),
        env,
        ..Extra::default()
    })
    .await
}

#[tokio::test]
async fn builds_and_instances_see_the_apps_env_and_secrets_and_nothing_else_of_the_servers() {
    let dumps = tempfile::tempdir().unwrap();
    let env_file = dumps.path().join("hello.env");
    std::fs::write(
        &env_file,
        format!("# the host's own\n{}={}\n", FILE_SECRET.0, FILE_SECRET.1),
    )
    .unwrap();
    let app = app_dumping_its_env(dumps.path(), &env_file).await;

    let id = app.push(&app.repo.commit("Dump the environment")).await;
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");

    let declared: Vec<(&str, &str)> = [
        ("RUST_LOG", "info"),
        ("APP_MODE", "production"),
        FILE_SECRET,
    ]
    .into_iter()
    .chain(APP_SECRETS)
    .collect();
    for (who, dump, own) in [
        ("the build", "build.env", &["CARGO_HOME", "RUSTUP_HOME"][..]),
        (
            "the instance",
            "instance.env",
            &app_env_codedeploy_names()[..],
        ),
    ] {
        let seen = env_dump(&dumps.path().join(dump));
        for (name, value) in &declared {
            assert_eq!(
                seen.get(*name).map(String::as_str),
                Some(*value),
                "{who}: {name} in {seen:?}"
            );
        }
        for name in seen.keys() {
            let allowed = ["PATH", "HOME", "LANG", "TZ"].contains(&name.as_str())
                // What sh itself sets.
                || ["PWD", "OLDPWD", "SHLVL", "_"].contains(&name.as_str())
                || own.contains(&name.as_str())
                || name.starts_with("NONSTOP_")
                || declared.iter().any(|(d, _)| d == name);
            assert!(allowed, "{who} sees {name}, which is the server's own");
        }
        let text = std::fs::read_to_string(dumps.path().join(dump)).unwrap();
        for secret in SERVER_ONLY
            .iter()
            .map(|(_, v)| *v)
            .chain([common::ADMIN_TOKEN, common::SECRET])
        {
            assert!(!text.contains(secret), "{who} sees {secret}");
        }
        assert!(
            !seen.contains_key("NONSTOP_TEST_SECRET") && !seen.contains_key("NONSTOP_ADMIN_TOKEN")
        );
    }
    let instance = env_dump(&dumps.path().join("instance.env"));
    assert!(
        !instance.contains_key("NONSTOP_SWITCH_TOKEN"),
        "{instance:?}"
    );

    // A build that prints a secret does not publish it.
    let build_log = stage(&done, "Build")["log"].as_str().unwrap().to_owned();
    assert!(build_log.contains("db is ***\n"), "{build_log}");

    // The bundle holds the non-secret env only.
    let archive = app
        .data_dir()
        .join(format!("apps/hello/deployments/{id}/deployment-archive"));
    let bundled = std::fs::read_to_string(archive.join("app.env")).unwrap();
    assert!(
        bundled.contains("APP_MODE=production\n") && bundled.contains("RUST_LOG=info\n"),
        "{bundled}"
    );
    assert_secrets_nowhere(
        &app,
        id,
        &[
            &bundled,
            &std::fs::read_to_string(archive.join("nonstop.env")).unwrap(),
        ],
    )
    .await;
}

fn app_env_codedeploy_names() -> [&'static str; 5] {
    nonstop::app_env::CODEDEPLOY_VARS
}

/// No secret value, the app's or the server's, is in the server's log, its API answers, its
/// pages, its SQLite files or `also`.
async fn assert_secrets_nowhere(app: &common::TestApp, id: i64, also: &[&str]) {
    let mut places: Vec<(String, String)> = vec![("the server's log".into(), app.server_log())];
    for path in [
        format!("/api/deployments/{id}"),
        "/api/deployments".into(),
        "/api/apps".into(),
        "/".into(),
        format!("/deployments/{id}"),
    ] {
        let (status, body) = app.get_text(&path).await;
        assert_eq!(status, 200, "{path}");
        places.push((path, body));
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = app.data_dir().join(format!("nonstop.db{suffix}"));
        if let Ok(bytes) = std::fs::read(&file) {
            places.push((
                file.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    places.extend(
        also.iter()
            .map(|text| ("a bundled file".to_owned(), text.to_string())),
    );
    let secrets = APP_SECRETS
        .iter()
        .chain(&SERVER_ONLY)
        .chain([&FILE_SECRET])
        .map(|(_, value)| *value);
    for secret in secrets {
        for (place, text) in &places {
            assert!(!text.contains(secret), "{secret} is in {place}");
        }
    }
}

#[tokio::test]
async fn a_deployment_records_which_env_names_changed_and_never_their_values() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("hello.env");
    std::fs::write(&env_file, "FILE_TOKEN=first-s3cret\nGONE_SOON=1\n").unwrap();
    let app = spawn_app_with(Extra {
        app: format!(
            "env = {{ APP_MODE = \"production\" }}\nenv_file = \"{}\"\n",
            env_file.display()
        ),
        ..Extra::default()
    })
    .await;
    let build_log =
        |done: &serde_json::Value| stage(done, "Build")["log"].as_str().unwrap().to_owned();

    let id = app.push(&app.repo.commit("First")).await;
    let first = app.wait_finished(id).await;
    assert_eq!(first["deployment"]["status"], "succeeded", "{first:#}");
    assert!(
        !build_log(&first).contains("environment changed"),
        "nothing to compare with"
    );

    // The same env: nothing to say.
    let id = app.push(&app.repo.commit("Same env")).await;
    let same = app.wait_finished(id).await;
    assert!(
        !build_log(&same).contains("environment changed"),
        "{}",
        build_log(&same)
    );

    // The env file is read at each deploy.
    std::fs::write(&env_file, "FILE_TOKEN=second-s3cret\nNEW_FLAG=on\n").unwrap();
    let id = app.push(&app.repo.commit("New env")).await;
    let changed = app.wait_finished(id).await;
    assert_eq!(changed["deployment"]["status"], "succeeded", "{changed:#}");
    assert!(
        build_log(&changed)
            .starts_with("environment changed: ~FILE_TOKEN, +NEW_FLAG, -GONE_SOON\n"),
        "{}",
        build_log(&changed)
    );
    let db = std::fs::read(app.db_path()).unwrap_or_default();
    let wal = std::fs::read(app.data_dir().join("nonstop.db-wal")).unwrap_or_default();
    for secret in ["first-s3cret", "second-s3cret"] {
        for bytes in [&db, &wal] {
            assert!(
                !String::from_utf8_lossy(bytes).contains(secret),
                "{secret} is in the database"
            );
        }
    }
}

/// Sends `text` on a WebSocket and returns the answer, within a deadline.
pub async fn say<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>, text: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let exchange = async {
        socket.send(Message::text(text)).await.unwrap();
        loop {
            match socket.next().await.expect("socket open").unwrap() {
                Message::Text(reply) => return reply.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected message {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("an answer in time")
}

/// The next server-sent event's `data:` line of a `/stream` response.
pub async fn next_event_data(stream: &mut reqwest::Response, buffered: &mut String) -> String {
    let read = async {
        loop {
            if let Some(end) = buffered.find("\n\n") {
                let event: String = buffered.drain(..end + 2).collect();
                let data = event.lines().find_map(|line| line.strip_prefix("data: "));
                return data.expect("an event has data").to_owned();
            }
            let chunk = stream.chunk().await.unwrap().expect("stream open");
            buffered.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("an event in time")
}

#[tokio::test]
async fn an_open_websocket_and_event_stream_stay_on_their_version_through_a_deploy() {
    let app = spawn_app().await;
    let first = app.deploy(&app.repo.commit("First")).await;
    let ws_url = format!("ws://127.0.0.1:{}/ws", app.ports.proxy);
    let (mut old_socket, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    assert_eq!(say(&mut old_socket, "hi").await, format!("{first}: hi"));
    let mut old_stream = reqwest::get(format!("{}/stream", app.proxy()))
        .await
        .unwrap();
    assert_eq!(
        old_stream.headers()["content-type"],
        "text/event-stream",
        "{old_stream:?}"
    );
    let mut buffered = String::new();
    assert_eq!(next_event_data(&mut old_stream, &mut buffered).await, first);

    let second = app.deploy(&app.repo.commit("Second")).await;
    assert_ne!(second, first);
    assert_eq!(app.served().await, second);

    // Connections opened before the switch stay on the first version...
    assert_eq!(
        say(&mut old_socket, "still").await,
        format!("{first}: still")
    );
    assert_eq!(next_event_data(&mut old_stream, &mut buffered).await, first);
    // ...and new ones reach the second.
    let (mut new_socket, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    assert_eq!(say(&mut new_socket, "new").await, format!("{second}: new"));
    assert_eq!(say(&mut old_socket, "bye").await, format!("{first}: bye"));

    // The API and the dashboard say who is still on the old instance.
    let old_port = app.ports.app[0];
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    let on_old = live["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|on| on["port"] == old_port)
        .cloned();
    assert_eq!(
        on_old,
        Some(serde_json::json!({ "port": old_port, "requests": 1, "tunnels": 1 })),
        "{live}"
    );
    let (_, page) = app.get_text("/").await;
    assert!(
        page.contains(&format!("2 connections still on {old_port}, v{first}")),
        "{page}"
    );
}
