//! The `nonstop` command as a script or a person at a terminal uses it: `deploy`, `redeploy`
//! and `rollback` follow the deployment to its end and exit with its outcome; `history` and
//! `logs` read what the server recorded and what the instances wrote.

use std::time::{Duration, Instant};

use crate::common::{spawn_app, stage};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything the command said, for a failing assertion.
fn said(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn deploy_follows_the_release_to_the_switch_and_exits_0() {
    let app = spawn_app().await;
    let first = app.deploy(&app.repo.commit("First, pushed")).await;
    app.repo.commit("Second, from the CLI");

    let out = app.cli(&["deploy", "hello"]);

    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("deployment 2 queued for hello: http://"),
        "{text}"
    );
    // It returned after the end: the record is final and the new version is served.
    let done = app.wait_finished(2).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    let version = done["deployment"]["version"].as_str().unwrap();
    assert_ne!(version, first);
    assert_eq!(app.served().await, version);
    // Every stage that ran has its start and its end with a duration, in order.
    for stage in done["stages"].as_array().unwrap() {
        let name = stage["name"].as_str().unwrap();
        if stage["status"] == "skipped" {
            continue;
        }
        let start = lines.iter().position(|l| *l == format!("{name} started"));
        let end = lines
            .iter()
            .position(|l| l.starts_with(&format!("{name} succeeded in ")));
        assert!(
            start.is_some() && end.is_some() && start < end,
            "{name}:\n{text}"
        );
    }
    let [from, to] = app.ports.app;
    let switch = format!("traffic {from} → {to}");
    let switched = lines.iter().position(|l| *l == switch);
    assert!(switched.is_some(), "no `{switch}`:\n{text}");
    assert_eq!(
        *lines.last().unwrap(),
        format!(
            "deployment 2 succeeded in {}: hello {version} is live on {to}",
            human_took(&done)
        ),
        "{text}"
    );

    // `redeploy ID` follows the same way: the first version is live again.
    let out = app.cli(&["redeploy", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("redeploy of #1 queued as deployment 3 for hello: "),
        "{text}"
    );
    assert!(text.contains(&format!("traffic {to} → {from}")), "{text}");
    assert_eq!(app.served().await, first);

    // `history` lists them, newest first.
    let out = app.cli(&["history", "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let text = stdout(&out);
    let rows: Vec<&str> = text.lines().collect();
    assert!(rows[0].starts_with("ID "), "{text}");
    assert!(
        rows[1].starts_with("#3 ") && rows[1].contains(" succeeded "),
        "{text}"
    );
    assert!(
        rows[2].starts_with("#2 ") && rows[2].contains(version),
        "{text}"
    );
    assert!(
        rows[3].starts_with("#1 ") && rows[3].contains(" push "),
        "{text}"
    );

    // `logs` prints the instances' own output: the live one, and the one traffic left.
    let out = app.cli(&["logs", "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    assert!(
        stdout(&out).contains(&format!("hello {first} listening on 127.0.0.1:{from}")),
        "{}",
        said(&out)
    );
    let out = app.cli(&["logs", "hello", "--instance", "previous", "-n", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    assert_eq!(
        stdout(&out).trim_end(),
        format!("hello {version} listening on 127.0.0.1:{to} as real2"),
        "{}",
        said(&out)
    );
}

/// The deployment's duration as the CLI writes it.
fn human_took(done: &serde_json::Value) -> String {
    let ms = done["deployment"]["finished_at"].as_i64().unwrap()
        - done["deployment"]["started_at"].as_i64().unwrap();
    match ms {
        ..=0 => "0 ms".into(),
        1..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

#[tokio::test]
async fn deploy_of_an_unhealthy_version_exits_1_with_the_reason_last() {
    let app = spawn_app().await;
    let healthy = app.deploy(&app.repo.commit("Healthy")).await;
    app.repo.commit_unhealthy();

    let out = app.cli(&["deploy", "hello"]);

    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let done = app.wait_finished(2).await;
    assert_eq!(done["deployment"]["status"], "failed", "{done:#}");
    let reason = done["deployment"]["error"].as_str().unwrap();
    let text = stdout(&out);
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with("deployment 2 failed in ")
            && last.ends_with(reason.lines().next().unwrap()),
        "the reason `{reason}` is not the last line:\n{}",
        said(&out)
    );
    assert!(!text.contains("traffic"), "{text}");
    assert_eq!(app.served().await, healthy, "the previous version serves");
}

#[tokio::test]
async fn deploy_detach_returns_once_queued_and_usage_errors_exit_2() {
    let app = spawn_app().await;
    app.repo.commit("Detached");

    let out = app.cli(&["deploy", "hello", "--detach"]);

    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("deployment 1 queued for hello: "),
        "{text}"
    );
    // It did not wait: the build of the example app has barely begun.
    let (_, now) = app.get_json("/api/deployments/1").await;
    let status = now["deployment"]["status"].as_str().unwrap();
    assert!(["queued", "running"].contains(&status), "{now:#}");
    let done = app.wait_finished(1).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");

    for usage in [
        &["deploy"][..],
        &["redeploy", "first"],
        &["logs", "hello", "--instance", "newest"],
        &["deploy", "hello", "--timeout", "soon"],
    ] {
        let out = app.cli(usage);
        assert_eq!(out.status.code(), Some(2), "{usage:?}: {}", said(&out));
    }
    // Asking about an app the server does not know is not a usage error: one line, exit 1.
    let out = app.cli(&["history", "nope"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(
        stderr.starts_with("nonstop: ") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[tokio::test]
async fn deploy_keeps_following_through_a_server_restart() {
    let mut app = spawn_app().await;
    app.deploy(&app.repo.commit("Healthy")).await;
    // An unhealthy version spends seconds in ValidateService: time to kill the server there.
    app.repo.commit_unhealthy();
    let mut cli = app.cli_started(&["deploy", "hello"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, now) = app.get_json("/api/deployments/2").await;
        if !now.is_null() && stage(&now, "ValidateService")["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "never validating: {now:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    app.restart().await;

    let done = app.wait_finished(2).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while cli.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the CLI still follows a finished deployment"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = cli.wait_with_output().unwrap();
    let status = done["deployment"]["status"].as_str().unwrap();
    assert_ne!(status, "succeeded", "{done:#}");
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let text = stdout(&out);
    let last = text.lines().last().unwrap();
    let reason = done["deployment"]["error"].as_str().unwrap();
    assert!(
        last.starts_with(&format!("deployment 2 {status}"))
            && last.ends_with(reason.lines().next().unwrap()),
        "`{status}: {reason}` is not the last line:\n{}",
        said(&out)
    );
    assert!(text.contains("ValidateService started"), "{text}");
}

#[tokio::test]
async fn deploy_verbose_streams_the_running_stages_lines_as_they_are_printed() {
    let app = crate::common::spawn_app_with(crate::common::Extra {
        build: Some(
            "for i in $(seq 1 30); do echo \"line $i\"; sleep 0.1; done; \
             cargo build --release --target-dir target"
                .into(),
        ),
        ..crate::common::Extra::default()
    })
    .await;
    app.repo.commit("Slow build");
    let mut cli = app.cli_started(&["deploy", "hello", "--verbose"]);
    let stdout = cli.stdout.take().unwrap();

    // Read on a thread of its own: each line as the command prints it.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = lines_tx.send(line.unwrap());
        }
    });
    let mut printed = Vec::new();
    let mut build_running_at_line_5 = None;
    while let Some(line) = tokio::time::timeout(Duration::from_secs(180), lines.recv())
        .await
        .expect("the command goes on printing")
    {
        if line == "  | line 5" {
            let (_, record) = app.get_json("/api/deployments/1").await;
            build_running_at_line_5 = Some(stage(&record, "Build")["status"].clone());
        }
        printed.push(line);
    }
    let out = cli.wait_with_output().unwrap();

    assert_eq!(out.status.code(), Some(0), "{printed:#?}");
    assert_eq!(
        build_running_at_line_5,
        Some(serde_json::json!("running")),
        "line 5 was printed while the build ran: {printed:#?}"
    );
    let streamed: Vec<&str> = printed
        .iter()
        .filter_map(|line| line.strip_prefix("  | line "))
        .collect();
    let expected: Vec<String> = (1..=30).map(|i| i.to_string()).collect();
    assert_eq!(streamed, expected, "each line once, in order: {printed:#?}");
    let started = printed.iter().position(|l| l == "Build started").unwrap();
    let first = printed.iter().position(|l| l == "  | line 1").unwrap();
    assert!(started < first, "{printed:#?}");
    assert!(
        printed
            .last()
            .unwrap()
            .starts_with("deployment 1 succeeded in "),
        "{printed:#?}"
    );
}
