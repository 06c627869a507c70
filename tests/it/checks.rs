//! The GitHub checks gate (`trigger = "checks"`) against the real server and a recording
//! stand-in for GitHub's API: a push waits; `check_suite`, `check_run` and `status` webhooks
//! (payloads in GitHub's shapes, from tests/fixtures/github) release it or fail it with the
//! failing check's name and page; a push whose checks passed while nonstop was down deploys
//! after the restart, found by asking the API; an API that fails fails nothing; a push still
//! undecided a day later fails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::recorder::{Recorded, Recorder, Reply};
use crate::common::{Extra, REPOSITORY, TestApp, sign, spawn_app_with};

const GITHUB_TOKEN: &str = "test-github-token-for-checks";
const WAIT: Duration = Duration::from_secs(60);
/// The commit the fixtures name, replaced by the one a test pushed.
const FIXTURE_SHA: &str = "d6fde92930d4715a2b49857d24b940956b26d2d3";

/// What the stand-in GitHub lists for one commit.
#[derive(Default, Clone)]
struct Listed {
    check_runs: Vec<Value>,
    statuses: Vec<Value>,
    check_suites: Vec<Value>,
}

/// GitHub's REST API as far as nonstop uses it: deployments (answered with ids) and the
/// checks of commits (what `listed` holds, nothing for any other); with `down`, every
/// checks question is answered 500.
#[derive(Clone, Default)]
struct FakeGitHub {
    listed: Arc<Mutex<HashMap<String, Listed>>>,
    down: Arc<Mutex<bool>>,
}

impl FakeGitHub {
    async fn start(&self) -> Recorder {
        let fake = self.clone();
        Recorder::start(move |_, request| fake.answer(request)).await
    }

    fn list(&self, sha: &str, listed: Listed) {
        self.listed.lock().unwrap().insert(sha.to_owned(), listed);
    }

    fn set_down(&self, down: bool) {
        *self.down.lock().unwrap() = down;
    }

    fn answer(&self, request: &Recorded) -> Reply {
        let Some(rest) = request.path.strip_prefix("/api/v3/repos/acme/hello/") else {
            return Reply::Status(404, json!({ "message": "Not Found" }));
        };
        if let Some(commit) = rest.strip_prefix("commits/") {
            if *self.down.lock().unwrap() {
                return Reply::Status(500, json!({ "message": "Server Error" }));
            }
            let (sha, list) = commit.split_once('/').unwrap_or((commit, ""));
            let listed = self
                .listed
                .lock()
                .unwrap()
                .get(sha)
                .cloned()
                .unwrap_or_default();
            return Reply::Status(200, api_answer(list, sha, &listed));
        }
        // Deployments and their statuses, as the notifier posts them.
        Reply::Status(201, json!({ "id": 1, "state": request.body["state"] }))
    }
}

/// The API's answer to `GET /repos/…/commits/{sha}/{list}`, in GitHub's shape
/// (tests/fixtures/github/api).
fn api_answer(list: &str, sha: &str, listed: &Listed) -> Value {
    let mut answer = api_fixture(list, sha);
    let (key, items) = match list {
        "check-runs" => ("check_runs", &listed.check_runs),
        "status" => ("statuses", &listed.statuses),
        _ => ("check_suites", &listed.check_suites),
    };
    answer[key] = Value::Array(items.clone());
    answer["total_count"] = json!(items.len());
    if list == "status" {
        // GitHub says `pending` when no status was ever set.
        answer["state"] = json!(if items.is_empty() {
            "pending"
        } else {
            "success"
        });
    }
    answer
}

fn fixture_text(name: &str, sha: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/github/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text.replace(FIXTURE_SHA, sha)).unwrap()
}

fn api_fixture(list: &str, sha: &str) -> Value {
    fixture_text(&format!("api/{list}.json"), sha)
}

/// A check run as the API lists it: the fixture's first, renamed and set.
fn check_run(sha: &str, id: u64, name: &str, status: &str, conclusion: Option<&str>) -> Value {
    let mut run = api_fixture("check-runs", sha)["check_runs"][0].clone();
    run["id"] = json!(id);
    run["name"] = json!(name);
    run["status"] = json!(status);
    run["conclusion"] = json!(conclusion);
    run["html_url"] = json!(format!("https://github.com/{REPOSITORY}/runs/{id}"));
    run
}

fn commit_status(sha: &str, id: u64, context: &str, state: &str) -> Value {
    let mut status = api_fixture("status", sha)["statuses"][0].clone();
    status["id"] = json!(id);
    status["context"] = json!(context);
    status["state"] = json!(state);
    status
}

fn finished_suite(sha: &str) -> Value {
    let mut suite = api_fixture("check-suites", sha)["check_suites"][0].clone();
    suite["status"] = json!("completed");
    suite["conclusion"] = json!("success");
    suite
}

/// nonstop with a `trigger = "checks"` app (`checks` its extra line) asking `github`.
async fn spawn_checks_app(github: &Recorder, checks: &str) -> TestApp {
    spawn_app_with(Extra {
        app: format!("trigger = \"checks\"\n{checks}\n"),
        tables: format!(
            "[github]\ntoken_env = \"NONSTOP_TEST_GITHUB_TOKEN\"\napi_url = \"{}/api/v3\"\n",
            github.url
        ),
        env: vec![
            ("NONSTOP_TEST_GITHUB_TOKEN".into(), GITHUB_TOKEN.into()),
            // Every crate's logs: the token must not leak from any of them.
            ("RUST_LOG".into(), "trace".into()),
        ],
        ..Extra::default()
    })
    .await
}

/// Sends a GitHub webhook built from a fixture for commit `sha`, signed.
async fn deliver(app: &TestApp, event: &str, delivery: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string().into_bytes();
    app.webhook(event, delivery, &body, Some(&sign(&body)))
        .await
}

async fn deployment(app: &TestApp, id: i64) -> Value {
    let (status, body) = app.get_json(&format!("/api/deployments/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body["deployment"].clone()
}

/// Polls until deployment `id` no longer waits (at most `WAIT`), then until it finished.
async fn wait_deployed(app: &TestApp, id: i64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = deployment(app, id).await;
        if now["status"] != "waiting" {
            return app.wait_finished(id).await;
        }
        assert!(
            Instant::now() < deadline,
            "deployment {id} still waits: {now:#}\n{}",
            app.server_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The checks questions GitHub got about `sha`.
fn questions_about(github: &Recorder, sha: &str) -> Vec<Recorded> {
    github
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains(&format!("/commits/{sha}/")))
        .collect()
}

/// Polls until GitHub was asked about `sha` at least `n` times (at most `WAIT`).
async fn wait_asked(github: &Recorder, sha: &str, n: usize) -> Vec<Recorded> {
    let deadline = Instant::now() + WAIT;
    loop {
        let asked = questions_about(github, sha);
        if asked.len() >= n {
            return asked;
        }
        assert!(
            Instant::now() < deadline,
            "GitHub was asked about {sha} {} times, not {n}",
            asked.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_push_waits_until_its_commits_checks_pass_and_a_failing_check_run_fails_it() {
    let fake = FakeGitHub::default();
    let github = fake.start().await;
    let app = spawn_checks_app(&github, "").await;
    let sha = app.repo.commit("Checked by Actions");

    let body = common_push(&sha);
    let (status, answer) = app
        .webhook("push", "push-1", &body, Some(&sign(&body)))
        .await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["deployment_id"].as_i64().unwrap();
    assert_eq!(
        answer["waiting"],
        format!("for every check on {} to pass", &sha[..7])
    );
    let waiting = deployment(&app, id).await;
    assert_eq!(waiting["status"], "waiting", "{waiting:#}");
    assert_eq!(
        waiting["ci_waiting_for"],
        format!("every check on {} to pass", &sha[..7])
    );

    // A suite of another commit finishing does nothing: nothing waits for it.
    let other = "0123456789abcdef0123456789abcdef01234567";
    let (status, answer) = deliver(
        &app,
        "check_suite",
        "suite-other",
        &fixture_text("check_suite.completed.json", other),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert!(
        answer["ignored"]
            .as_str()
            .is_some_and(|why| why.contains("nothing waits for the checks of 0123456")),
        "{answer}"
    );
    assert_eq!(deployment(&app, id).await["status"], "waiting");
    assert!(questions_about(&github, other).is_empty());

    // Its own suite finishing: GitHub's full list is asked for, and it says all passed.
    fake.list(
        &sha,
        Listed {
            check_runs: vec![
                check_run(&sha, 71, "test", "completed", Some("success")),
                check_run(&sha, 72, "docs", "completed", Some("skipped")),
            ],
            statuses: vec![commit_status(&sha, 81, "ci/jenkins", "success")],
            check_suites: vec![finished_suite(&sha)],
        },
    );
    let (status, answer) = deliver(
        &app,
        "check_suite",
        "suite-own",
        &fixture_text("check_suite.completed.json", &sha),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["deployment_id"], id, "{answer}");
    let done = wait_deployed(&app, id).await;
    let deployed = &done["deployment"];
    assert_eq!(deployed["status"], "succeeded", "{done:#}");
    assert_eq!(deployed["commit_sha"], sha);
    assert_eq!(deployed["ci_check"], "ci/jenkins, docs, test");
    assert_eq!(app.served().await, deployed["version"].as_str().unwrap());
    let asked = questions_about(&github, &sha);
    let lists: Vec<&str> = asked
        .iter()
        .map(|r| r.path.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        lists,
        ["check-runs", "status", "check-suites"],
        "{asked:#?}"
    );
    assert!(
        asked
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {GITHUB_TOKEN}")))
    );

    // The next push: a failing check run fails it with the check's name and page.
    let next = app.repo.commit("Breaks the linter");
    let body = common_push(&next);
    let (_, answer) = app
        .webhook("push", "push-2", &body, Some(&sign(&body)))
        .await;
    let next_id = answer["deployment_id"].as_i64().unwrap();
    let lint = fixture_text("check_run.completed.json", &next);
    let page = lint["check_run"]["html_url"].as_str().unwrap().to_owned();
    let (status, answer) = deliver(&app, "check_run", "run-lint", &lint).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["deployment_id"], next_id, "{answer}");
    let reason = format!("check run `lint` failed (failure): {page}");
    assert_eq!(answer["failed"], reason, "{answer}");
    let failed = deployment(&app, next_id).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(failed["error"], reason);
    assert_eq!(failed["ci_check"], "lint");
    assert_eq!(failed["ci_build_url"], page);
    assert!(failed["started_at"].is_null(), "{failed:#}");
    let (_, html) = app.get_text(&format!("/deployments/{next_id}")).await;
    assert!(
        html.contains(&format!("<a href=\"{page}\">check lint</a>")),
        "{html}"
    );
    assert_eq!(
        app.served().await,
        deployed["version"].as_str().unwrap(),
        "the previous version still serves"
    );

    let log = app.server_log();
    assert!(log.contains("TRACE"), "every crate's logs were on");
    assert!(!log.contains(GITHUB_TOKEN), "the token reached the log");
}

#[tokio::test]
async fn a_push_whose_checks_passed_while_nonstop_was_down_deploys_after_the_restart() {
    let fake = FakeGitHub::default();
    let github = fake.start().await;
    let mut app = spawn_checks_app(&github, "checks = [\"test\", \"ci/jenkins\"]").await;
    let sha = app.repo.commit("Tested while nonstop was away");
    let id = app.push(&sha).await;
    assert_eq!(
        deployment(&app, id).await["ci_waiting_for"],
        format!("checks test, ci/jenkins to pass on {}", &sha[..7])
    );

    // Back with GitHub's API failing: the first round fails, and fails nothing.
    fake.set_down(true);
    app.restart().await;
    wait_asked(&github, &sha, 1).await;
    let still = deployment(&app, id).await;
    assert_eq!(still["status"], "waiting", "{still:#}");

    // The checks passed meanwhile (a check nobody requires failed); no webhook says so.
    // The next start asks at once, and the waiting push deploys.
    fake.list(
        &sha,
        Listed {
            check_runs: vec![
                check_run(&sha, 91, "test", "completed", Some("success")),
                check_run(&sha, 92, "flaky-extra", "completed", Some("failure")),
            ],
            statuses: vec![commit_status(&sha, 93, "ci/jenkins", "success")],
            check_suites: vec![finished_suite(&sha)],
        },
    );
    fake.set_down(false);
    app.restart().await;
    let done = wait_deployed(&app, id).await;
    let deployed = &done["deployment"];
    assert_eq!(deployed["status"], "succeeded", "{done:#}");
    assert_eq!(deployed["ci_check"], "test, ci/jenkins");
    assert_eq!(app.served().await, deployed["version"].as_str().unwrap());

    let log = app.server_log();
    assert!(
        log.contains("could not ask GitHub about a waiting commit"),
        "the failed round is logged"
    );
    assert!(!log.contains(GITHUB_TOKEN), "the token reached the log");
}

#[tokio::test]
async fn named_checks_deploy_on_webhooks_alone_and_a_newer_push_replaces_a_waiting_one() {
    let fake = FakeGitHub::default();
    let github = fake.start().await;
    let app = spawn_checks_app(&github, "checks = [\"test\", \"ci/jenkins\"]").await;
    let old = app.repo.commit("Old");
    let old_id = app.push(&old).await;
    let sha = app.repo.commit("Newer");
    let id = app.push(&sha).await;
    let replaced = deployment(&app, old_id).await;
    assert_eq!(replaced["status"], "superseded", "{replaced:#}");

    let mut test = fixture_text("check_run.completed.json", &sha);
    test["check_run"]["name"] = json!("test");
    test["check_run"]["conclusion"] = json!("success");
    let (status, answer) = deliver(&app, "check_run", "run-test", &test).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        (&answer["deployment_id"], &answer["waiting"]),
        (&json!(id), &json!("for ci/jenkins (not reported yet)")),
        "{answer}"
    );
    // The same delivery again changes nothing.
    let (status, answer) = deliver(&app, "check_run", "run-test", &test).await;
    assert_eq!(
        (status, &answer["deployment_id"]),
        (200, &json!(id)),
        "{answer}"
    );

    // A check nobody requires may fail; the replaced commit's checks are not heard.
    let mut flaky = test.clone();
    flaky["check_run"]["name"] = json!("flaky-extra");
    flaky["check_run"]["id"] = json!(1);
    flaky["check_run"]["conclusion"] = json!("failure");
    let (status, answer) = deliver(&app, "check_run", "run-flaky", &flaky).await;
    assert_eq!(
        (status, &answer["deployment_id"]),
        (202, &json!(id)),
        "{answer}"
    );
    let jenkins_old = fixture_text("status.json", &old);
    let (_, answer) = deliver(&app, "status", "status-old", &jenkins_old).await;
    assert!(
        answer["ignored"]
            .as_str()
            .is_some_and(|why| why.contains("is superseded")),
        "{answer}"
    );
    assert_eq!(deployment(&app, id).await["status"], "waiting");

    let jenkins = fixture_text("status.json", &sha);
    let (status, answer) = deliver(&app, "status", "status-new", &jenkins).await;
    assert_eq!(
        (status, &answer["deployment_id"]),
        (202, &json!(id)),
        "{answer}"
    );
    assert!(answer["waiting"].is_null(), "{answer}");
    let done = wait_deployed(&app, id).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    assert_eq!(done["deployment"]["ci_check"], "test, ci/jenkins");
    assert!(
        questions_about(&github, &sha).is_empty(),
        "named checks that all reported need no question to GitHub"
    );
}

#[tokio::test]
async fn a_push_still_undecided_a_day_later_fails_saying_what_it_waited_for() {
    let fake = FakeGitHub::default();
    let github = fake.start().await;
    let mut app = spawn_checks_app(&github, "").await;
    let sha = app.repo.commit("Stuck in a queue");
    let id = app.push(&sha).await;
    fake.list(
        &sha,
        Listed {
            check_runs: vec![check_run(&sha, 61, "test", "queued", None)],
            ..Listed::default()
        },
    );
    // As if the push came a little over 24 hours ago.
    let conn = rusqlite::Connection::open(app.db_path()).unwrap();
    conn.execute(
        "UPDATE deployments SET created_at = created_at - 24 * 3600 * 1000 - 60000 WHERE id = ?1",
        [id],
    )
    .unwrap();
    drop(conn);

    app.restart().await;
    let deadline = Instant::now() + WAIT;
    let failed = loop {
        let now = deployment(&app, id).await;
        if now["status"] != "waiting" {
            break now;
        }
        assert!(Instant::now() < deadline, "still waiting: {now:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(
        failed["error"],
        "no verdict on its checks within 24 h; it waited for test (queued)"
    );
    assert!(failed["started_at"].is_null(), "{failed:#}");
}

fn common_push(sha: &str) -> Vec<u8> {
    crate::common::push_payload("refs/heads/main", sha, REPOSITORY)
}
