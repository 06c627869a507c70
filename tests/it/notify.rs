//! Slack and GitHub notifiers against local receivers that record what arrives: the exact
//! messages and deployment statuses of a deploy that succeeds and one that fails, three
//! tries for a flaky receiver, and a hanging receiver that never holds up a deploy.

use std::time::Duration;

use serde_json::json;

use crate::common;
use crate::common::recorder::{Recorded, Recorder, Reply};
use crate::common::{Extra, TestApp, spawn_app_with};

const SLACK_PATH: &str = "/services/T000/B000/slack-secret-part";
const GITHUB_TOKEN: &str = "test-github-token";

/// GitHub's REST API as far as nonstop uses it: deployments get ids 101, 102, …
fn github_api() -> impl FnMut(usize, &Recorded) -> Reply + Send + 'static {
    let mut created = 100;
    move |_, request| {
        if request.path.ends_with("/deployments") {
            created += 1;
            Reply::Status(
                201,
                json!({ "id": created, "sha": request.body["ref"], "environment": "hello" }),
            )
        } else {
            Reply::Status(201, json!({ "id": 1, "state": request.body["state"] }))
        }
    }
}

/// nonstop with Slack and GitHub pointed at the two receivers (GitHub with an Enterprise-style
/// `/api/v3` prefix), a dashboard URL and an app URL.
async fn spawn_notifying_app(slack: &Recorder, github: &Recorder) -> TestApp {
    // Every crate's debug and trace logs too: a secret must not leak from any of them.
    let all_logs = vec![("RUST_LOG".into(), "trace".into())];
    spawn_notifying_app_with(slack, github, all_logs).await
}

/// `spawn_notifying_app`, with more env vars for the server.
async fn spawn_notifying_app_with(
    slack: &Recorder,
    github: &Recorder,
    env: Vec<(String, String)>,
) -> TestApp {
    spawn_app_with(Extra {
        server: "public_url = \"https://deploy.example.com/\"\n".into(),
        app:
            "public_url = \"https://hello.example.com\"\nslack = { channel = \"#hello-deploys\" }\n"
                .into(),
        tables: format!(
            "[slack]\nwebhook_url_env = \"NONSTOP_TEST_SLACK_URL\"\nchannel = \"#deploys\"\n\n\
             [github]\ntoken_env = \"NONSTOP_TEST_GITHUB_TOKEN\"\napi_url = \"{}/api/v3\"\n",
            github.url
        ),
        env: [
            (
                "NONSTOP_TEST_SLACK_URL".into(),
                format!("{}{SLACK_PATH}", slack.url),
            ),
            ("NONSTOP_TEST_GITHUB_TOKEN".into(), GITHUB_TOKEN.into()),
        ]
        .into_iter()
        .chain(env)
        .collect(),
        ..Extra::default()
    })
    .await
}

fn paths(requests: &[Recorded]) -> Vec<String> {
    requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

fn states(requests: &[Recorded]) -> Vec<&str> {
    requests
        .iter()
        .map(|r| r.body["state"].as_str().unwrap_or("create"))
        .collect()
}

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn slack_and_github_hear_of_a_deploy_that_succeeds_and_one_that_fails() {
    let slack = Recorder::start(|_, _| Reply::Status(200, json!("ok"))).await;
    let github = Recorder::start(github_api()).await;
    let app = spawn_notifying_app(&slack, &github).await;
    let sha = app.repo.commit("Ship it");
    let short = &sha[..7];
    let id = app.push(&sha).await;
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    let version = done["deployment"]["version"].as_str().unwrap().to_owned();
    let port = app.ports.app[0];
    let link = format!("https://deploy.example.com/deployments/{id}");

    // GitHub: a deployment of the exact commit, then in_progress, then success.
    let calls = github.wait_for(3, WAIT).await;
    let repo = "/api/v3/repos/acme/hello/deployments";
    assert_eq!(
        paths(&calls),
        [
            format!("POST {repo}"),
            format!("POST {repo}/101/statuses"),
            format!("POST {repo}/101/statuses"),
        ]
    );
    assert!(
        calls
            .iter()
            .all(|c| c.authorization.as_deref() == Some(&format!("Bearer {GITHUB_TOKEN}")))
    );
    assert_eq!(
        calls[0].body,
        json!({
            "ref": sha, "environment": "hello", "description": format!("nonstop deployment #{id}"),
            "auto_merge": false, "required_contexts": [], "payload": {"nonstop_deployment_id": id}
        })
    );
    assert_eq!(
        calls[1].body,
        json!({
            "state": "in_progress", "environment": "hello", "log_url": link,
            "environment_url": "https://hello.example.com", "description": format!("Deploying {short}")
        })
    );
    assert_eq!(
        calls[2].body,
        json!({
            "state": "success", "environment": "hello", "log_url": link,
            "environment_url": "https://hello.example.com",
            "description": format!("{version} is live on port {port} (real1)")
        })
    );

    // Slack: started, then succeeded, in the app's own channel.
    let messages = slack.wait_for(2, WAIT).await;
    assert!(
        messages
            .iter()
            .all(|m| m.path == SLACK_PATH && m.content_type.as_deref() == Some("application/json"))
    );
    let started = &messages[0].body;
    assert_eq!(started["channel"], "#hello-deploys");
    assert_eq!(started["text"], format!("Deploying hello {short}"));
    assert_eq!(started["blocks"][0]["type"], "section");
    assert!(
        started["blocks"][1]["elements"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(&format!("<{link}|Deployment #{id}> · push")),
        "{started:#}"
    );
    let mut succeeded = messages[1].body.clone();
    let duration = succeeded["blocks"][1]["fields"][2]["text"].take();
    assert!(
        duration.as_str().unwrap().starts_with("*Duration*\n"),
        "{duration}"
    );
    assert_eq!(
        succeeded,
        json!({
            "channel": "#hello-deploys",
            "text": format!("hello {version} is live"),
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn",
                    "text": format!(":white_check_mark: *hello {version} is live*")}},
                {"type": "section", "fields": [
                    {"type": "mrkdwn", "text": format!("*Version*\n{version}")},
                    {"type": "mrkdwn", "text": format!("*Commit*\n`{short}` Ship it")},
                    {"type": "mrkdwn", "text": null},
                    {"type": "mrkdwn", "text": format!("*Live*\nport {port} · real1")}
                ]},
                {"type": "context", "elements": [{"type": "mrkdwn",
                    "text": format!("<{link}|Deployment #{id}>")}]}
            ]
        })
    );

    // A version that never passes ValidateService: in_progress then failure, and Slack says
    // which stage failed with the end of its output.
    let broken = app.repo.commit_unhealthy();
    let failed_id = app.push(&broken).await;
    let done = app.wait_finished(failed_id).await;
    assert_eq!(done["deployment"]["status"], "failed", "{done:#}");
    let calls = github.wait_for(6, WAIT).await;
    assert_eq!(
        paths(&calls[3..]),
        [
            format!("POST {repo}"),
            format!("POST {repo}/102/statuses"),
            format!("POST {repo}/102/statuses"),
        ]
    );
    assert_eq!(
        states(&calls),
        [
            "create",
            "in_progress",
            "success",
            "create",
            "in_progress",
            "failure"
        ]
    );
    assert_eq!(calls[3].body["ref"], broken);
    assert_eq!(calls[5].body["description"], "ValidateService failed");
    assert_eq!(
        calls[5].body["log_url"],
        format!("https://deploy.example.com/deployments/{failed_id}")
    );

    let messages = slack.wait_for(4, WAIT).await;
    assert_eq!(
        messages[2].body["text"],
        format!("Deploying hello {}", &broken[..7])
    );
    let failure = &messages[3].body;
    assert_eq!(
        failure["text"],
        format!("hello deployment #{failed_id} failed at ValidateService")
    );
    assert_eq!(
        failure["blocks"][1]["fields"][3]["text"],
        "*Failed stage*\nValidateService"
    );
    let log = failure["blocks"][2]["text"]["text"].as_str().unwrap();
    assert!(
        log.starts_with("```") && log.ends_with("```") && log.len() > 6,
        "{failure:#}"
    );
    assert_eq!(
        failure["blocks"][3]["elements"][0]["text"],
        format!("<https://deploy.example.com/deployments/{failed_id}|Deployment #{failed_id}>")
    );

    let log = app.server_log();
    assert!(log.contains("TRACE"), "every crate's logs were on");
    assert!(!log.contains("slack-secret-part") && !log.contains(GITHUB_TOKEN));
}

#[tokio::test]
async fn a_flaky_receiver_gets_three_tries_and_a_hanging_one_never_holds_up_a_deploy() {
    let slack = Recorder::start(|_, _| Reply::Hang).await;
    let mut api = github_api();
    let github = Recorder::start(move |n, request| {
        if n < 2 {
            Reply::Status(500, json!({ "message": "Server Error" }))
        } else {
            api(n, request)
        }
    })
    .await;
    let app = spawn_notifying_app(&slack, &github).await;
    let sha = app.repo.commit("Despite Slack");
    let id = app.push(&sha).await;

    let done = app.wait_finished(id).await;
    // The deployment ended while Slack had not answered a single request.
    let (slack_seen, slack_answered) = (slack.requests().len(), slack.answered());
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    assert!(slack_seen >= 1, "the start message was sent");
    assert_eq!(slack_answered, 0);

    // GitHub answered 500 twice: the same deployment was asked for three times, then the
    // statuses followed in order.
    let calls = github.wait_for(5, WAIT).await;
    assert_eq!(
        states(&calls),
        ["create", "create", "create", "in_progress", "success"]
    );
    assert!(calls[..3].iter().all(|c| c.body == calls[0].body));
    assert!(calls[3].path.ends_with("/deployments/101/statuses"));

    // Slack: each try was given up after the 5 s timeout, three tries in all.
    let tries = slack.wait_for(3, WAIT).await;
    assert!(tries[..3].iter().all(|t| t.body == tries[0].body));
    assert_eq!(
        tries[0].body["text"],
        format!("Deploying hello {}", &sha[..7])
    );
    // At least the timeout apart; how much more depends on the machine's load, and the
    // three tries arriving within WAIT already shows no try hung.
    for pair in tries[..3].windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_secs(5), "{gap:?} between tries");
    }
    let log = app.server_log();
    assert!(log.contains("notification failed; trying again"), "{log}");
    assert!(
        !log.contains("slack-secret-part"),
        "the Slack URL was logged"
    );
}

#[tokio::test]
async fn a_deployment_cut_short_by_a_stop_gets_its_last_status_after_the_restart() {
    let slack = Recorder::start(|_, _| Reply::Status(200, json!("ok"))).await;
    let github = Recorder::start(github_api()).await;
    // Debug builds hold deployment 1 in Build (src/fault.rs), so the stop lands mid-deploy.
    let mut app = spawn_notifying_app_with(
        &slack,
        &github,
        vec![("NONSTOP_TEST_HOLD".into(), "Build@1".into())],
    )
    .await;
    let id = app.push(&app.repo.commit("Cut short")).await;
    let calls = github.wait_for(2, WAIT).await;
    assert_eq!(states(&calls), ["create", "in_progress"]);
    let deadline = std::time::Instant::now() + WAIT;
    while !app.server_log().contains("NONSTOP_TEST_HOLD: holding") {
        assert!(std::time::Instant::now() < deadline, "Build never held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    app.restart().await;

    // The GitHub deployment made before the stop gets the last word, not a new one.
    let calls = github.wait_for(3, WAIT).await;
    let repo = "/api/v3/repos/acme/hello/deployments";
    assert_eq!(paths(&calls[2..]), [format!("POST {repo}/101/statuses")]);
    assert_eq!(calls[2].body["state"], "error");
    assert_eq!(
        calls[2].body["description"],
        "nonstop stopped while this deployment ran"
    );
    let messages = slack.wait_for(2, WAIT).await;
    assert_eq!(
        messages[1].body["text"],
        format!("hello deployment #{id} was interrupted")
    );
    assert_eq!(
        app.wait_finished(id).await["deployment"]["status"],
        "interrupted"
    );
    assert_eq!(
        app.count_rows("github_deployments"),
        0,
        "nothing left to say"
    );
}

#[tokio::test]
async fn a_rollback_marks_the_undone_deployment_inactive_on_github_and_tells_slack() {
    let slack = Recorder::start(|_, _| Reply::Status(200, json!("ok"))).await;
    let github = Recorder::start(github_api()).await;
    let app = spawn_notifying_app(&slack, &github).await;
    let first = app.deploy(&app.repo.commit("One")).await;
    let second = app.deploy(&app.repo.commit("Two")).await;
    github.wait_for(6, WAIT).await;

    let response = app
        .http
        .post(format!("{}/api/apps/hello/rollback", app.base()))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(app.served().await, first);

    // The rollback is a deployment of the first version's commit that succeeds at once, and
    // the deployment it undid (GitHub's 102) turns inactive.
    let calls = github.wait_for(9, WAIT).await;
    let repo = "/api/v3/repos/acme/hello/deployments";
    let mut last: Vec<_> = calls[6..]
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c.path,
                c.body["state"].as_str().unwrap_or("create")
            )
        })
        .collect();
    last.sort();
    assert_eq!(
        last,
        [
            format!("{repo} create"),
            format!("{repo}/102/statuses inactive"),
            format!("{repo}/103/statuses success"),
        ]
    );
    let inactive = calls
        .iter()
        .find(|c| c.body["state"] == "inactive")
        .unwrap();
    assert_eq!(
        inactive.body["description"],
        format!("{second} was rolled back")
    );

    let messages = slack.wait_for(6, WAIT).await;
    let texts: Vec<_> = messages[4..]
        .iter()
        .map(|m| m.body["text"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        texts.contains(&format!("hello {second} was rolled back")),
        "{texts:?}"
    );
    assert!(
        texts.contains(&format!("hello {first} is live")),
        "{texts:?}"
    );
}

#[tokio::test]
async fn a_guard_switch_back_is_a_github_failure_and_a_slack_message_with_the_reason() {
    let slack = Recorder::start(|_, _| Reply::Status(200, json!("ok"))).await;
    let github = Recorder::start(github_api()).await;
    let app = spawn_app_with(Extra {
        server: "public_url = \"https://deploy.example.com/\"\n".into(),
        guard: Some("guard = { secs = 30 }"),
        tables: format!(
            "[slack]\nwebhook_url_env = \"NONSTOP_TEST_SLACK_URL\"\n\n\
             [github]\ntoken_env = \"NONSTOP_TEST_GITHUB_TOKEN\"\napi_url = \"{}/api/v3\"\n",
            github.url
        ),
        env: vec![
            (
                "NONSTOP_TEST_SLACK_URL".into(),
                format!("{}{SLACK_PATH}", slack.url),
            ),
            ("NONSTOP_TEST_GITHUB_TOKEN".into(), GITHUB_TOKEN.into()),
        ],
        ..Extra::default()
    })
    .await;
    app.deploy(&app.repo.commit("One")).await;
    let load = common::Load::start(format!("{}/", app.proxy()), 2, 5_000, WAIT);
    load.wait_sent(50).await;

    let id = app.push(&app.repo.commit_error_every(3)).await;
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "rolled_back", "{done:#}");
    let reason = done["deployment"]["error"].as_str().unwrap().to_owned();

    let deadline = std::time::Instant::now() + WAIT;
    let failure = loop {
        let found = github
            .requests()
            .into_iter()
            .find(|c| c.body["state"] == "failure");
        if let Some(found) = found {
            break found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failure status: {:?}",
            paths(&github.requests())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        failure.body["description"],
        format!("switched back: {reason}")
    );
    let told = loop {
        let texts: Vec<String> = slack
            .requests()
            .iter()
            .filter_map(|m| m.body["text"].as_str().map(str::to_owned))
            .collect();
        if let Some(text) = texts
            .iter()
            .find(|t| t.contains("switched back by the guard"))
        {
            break text.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no Slack message: {texts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(told.ends_with(&reason), "{told}");
    load.finish().await;
}
