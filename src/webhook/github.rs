//! GitHub webhooks: `X-Hub-Signature-256` (HMAC-SHA256 of the raw body, hex, compared in
//! constant time), the `push` event, and for apps gated on GitHub's checks the events that
//! report them (`check_run`, `status`, `check_suite`, `workflow_run`). The signature is
//! checked before a byte is parsed; then the body is decoded by its content type (GitHub
//! offers JSON and a form field `payload`), and only then is the JSON read.

use std::borrow::Cow;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::WebhookError;
use crate::config::{AppConfig, TriggerMode};
use crate::domain::{self, CheckKind, CheckReport, CheckState, CommitSha, Trigger, TriggerKind};
use crate::gate::Evidence;

pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const EVENT_HEADER: &str = "x-github-event";
pub const DELIVERY_HEADER: &str = "x-github-delivery";

/// The two ways GitHub's webhook settings offer to send a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// `application/json`: the body is the JSON document.
    Json,
    /// `application/x-www-form-urlencoded`, which GitHub preselects: the body is
    /// `payload=<url-encoded JSON>`.
    Form,
}

/// What a 415 tells the sender to use instead.
const ACCEPTED_CONTENT_TYPES: &str = "application/json or application/x-www-form-urlencoded";

/// A rejected content type is echoed back at most this long, so an answer stays one short line.
const MAX_ECHOED_CONTENT_TYPE: usize = 100;

impl ContentType {
    /// Reads the `Content-Type` header's raw value; parameters (`; charset=utf-8`) and case
    /// do not matter. GitHub always sends the header; a request without one is read as JSON,
    /// which is what GitHub's API, its redelivery tools and a hand-written `curl -d @push.json`
    /// mean.
    pub fn from_header(header: Option<&[u8]>) -> Result<Self, WebhookError> {
        let Some(header) = header else {
            return Ok(Self::Json);
        };
        let text = String::from_utf8_lossy(header);
        let essence = text.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case("application/json") {
            Ok(Self::Json)
        } else if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            Ok(Self::Form)
        } else {
            let given: String = text.chars().take(MAX_ECHOED_CONTENT_TYPE).collect();
            Err(WebhookError::UnsupportedContentType {
                given: format!("{given:?}"),
                accepted: ACCEPTED_CONTENT_TYPES,
            })
        }
    }
}

/// The JSON document of a verified `event` delivery, whichever way it was carried. Call it
/// after `verify`: the signature is over the body as sent, not over the decoded document.
pub fn payload<'a>(
    content_type: ContentType,
    event: &str,
    body: &'a [u8],
) -> Result<Cow<'a, [u8]>, WebhookError> {
    match content_type {
        ContentType::Json => Ok(Cow::Borrowed(body)),
        ContentType::Form => match super::form_payload(body) {
            Some(json) => Ok(Cow::Owned(json.into_bytes())),
            // `curl -d` labels a JSON body as a form; say how to send it instead.
            None => Err(malformed(
                event,
                "no form field `payload` (a JSON body is sent as application/json)",
            )),
        },
    }
}

fn malformed(event: &str, reason: impl ToString) -> WebhookError {
    WebhookError::malformed(format!("{event} payload"), reason)
}

/// A delivery whose signature verified, decoded: what GitHub says it is, and its JSON.
#[derive(Debug)]
pub struct Delivery<'a> {
    /// `X-GitHub-Event`: `push`, `ping`, …
    pub event: &'a str,
    /// `X-GitHub-Delivery` and the body's sha256: what makes a redelivery, or a captured
    /// body replayed under a new id, a duplicate.
    pub delivery: domain::Delivery,
    pub document: Cow<'a, [u8]>,
}

impl<'a> Delivery<'a> {
    /// Reads the headers' raw values and decodes `body` by its content type.
    pub fn decode(
        content_type: Option<&[u8]>,
        event: Option<&'a str>,
        id: Option<&'a str>,
        body: &'a [u8],
    ) -> Result<Self, WebhookError> {
        let content_type = ContentType::from_header(content_type)?;
        let event = event.ok_or(WebhookError::MissingHeader("X-GitHub-Event"))?;
        let id = id.ok_or(WebhookError::MissingHeader("X-GitHub-Delivery"))?;
        Ok(Self {
            event,
            delivery: domain::Delivery {
                source: "github",
                id: id.to_owned(),
                body_sha256: Some(hex::encode(Sha256::digest(body))),
            },
            document: payload(content_type, event, body)?,
        })
    }

    /// The repository the document names, to find its app when the URL names none.
    pub fn repository(&self) -> Option<String> {
        repository_of(&self.document)
    }

    /// What this delivery means for `app`.
    pub fn interpret(&self, app: &AppConfig) -> Result<Outcome, WebhookError> {
        interpret(app, self.event, Some(&self.delivery), &self.document)
    }
}

/// Checks a delivery's signature with `app`'s webhook secret; `None` when it has none.
pub fn verify_for(
    app: &AppConfig,
    header: Option<&str>,
    body: &[u8],
) -> Option<Result<(), WebhookError>> {
    let secret = app.webhook_secret.as_ref()?;
    Some(verify(secret.expose().as_bytes(), header, body))
}

/// The setting an app without a webhook secret is missing.
pub const KEY_SETTING: &str = "webhook_secret_env";

/// Checks `header` (`sha256=<hex>`) against the HMAC of `body` under `secret`.
pub fn verify(secret: &[u8], header: Option<&str>, body: &[u8]) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::MissingSignature("X-Hub-Signature-256"))?;
    let expected = header
        .strip_prefix("sha256=")
        .and_then(|hex_sig| hex::decode(hex_sig).ok())
        .ok_or(WebhookError::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&expected)
        .map_err(|_| WebhookError::BadSignature)
}

/// `sha256=<hex>` for `body`: what GitHub sends (tests and the README's curl use it).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The parts of a `push` payload nonstop uses.
#[derive(Debug, Deserialize)]
pub struct Push {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub after: String,
    #[serde(default)]
    pub deleted: bool,
    pub repository: Repository,
    pub head_commit: Option<HeadCommit>,
}

#[derive(Debug, Deserialize)]
pub struct Repository {
    pub full_name: String,
}

#[derive(Debug, Deserialize)]
pub struct HeadCommit {
    pub message: String,
    pub author: Option<Author>,
}

#[derive(Debug, Deserialize)]
pub struct Author {
    pub name: Option<String>,
    pub username: Option<String>,
}

/// The repository a payload names, to find its app when the URL names none.
pub fn repository_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        repository: Repository,
    }
    serde_json::from_slice::<Probe>(body)
        .ok()
        .map(|probe| probe.repository.full_name)
}

/// What a verified GitHub event means for `app`.
#[derive(Debug)]
pub enum Outcome {
    Pong,
    Deploy(Box<Trigger>),
    /// News of a commit's checks, for an app that deploys once they pass.
    Checks(Box<CheckNews>),
    Ignored(String),
}

/// What a `check_run`, `status`, `check_suite` or `workflow_run` delivery says of a commit.
#[derive(Debug, PartialEq, Eq)]
pub struct CheckNews {
    pub commit: CommitSha,
    pub evidence: Evidence,
}

/// A check run as GitHub sends it, in a `check_run` webhook and in the API's list of a
/// commit's check runs alike.
#[derive(Debug, Deserialize)]
pub struct CheckRun {
    pub id: i64,
    pub name: String,
    pub head_sha: String,
    /// `queued`, `in_progress`, `completed`, `waiting`, `requested`, `pending`.
    pub status: String,
    /// Once completed: `success`, `failure`, `neutral`, `cancelled`, `skipped`, `timed_out`,
    /// `action_required`, `stale`, `startup_failure`.
    pub conclusion: Option<String>,
    pub html_url: Option<String>,
    pub details_url: Option<String>,
}

impl CheckRun {
    pub fn report(&self) -> CheckReport {
        let (state, word) = match (self.status.as_str(), self.conclusion.as_deref()) {
            ("completed", Some(conclusion)) => (conclusion_state(conclusion), conclusion),
            (status, _) => (CheckState::Pending, status),
        };
        CheckReport {
            kind: CheckKind::Run,
            name: self.name.clone(),
            github_id: self.id,
            state,
            word: word.to_owned(),
            url: self.html_url.clone().or_else(|| self.details_url.clone()),
        }
    }
}

/// What a check run's conclusion means for the gate. One GitHub adds later counts as a
/// failure: a deploy that does not happen is seen and fixed; a wrong one is not undone.
fn conclusion_state(conclusion: &str) -> CheckState {
    match conclusion {
        "success" | "neutral" | "skipped" => CheckState::Passed,
        _ => CheckState::Failed,
    }
}

/// A commit status as GitHub sends it: the `status` webhook, or one of the API's combined
/// status of a commit (`sha` is then absent).
#[derive(Debug, Deserialize)]
pub struct CommitStatus {
    pub id: i64,
    pub sha: Option<String>,
    pub context: String,
    /// `pending`, `success`, `failure`, `error`.
    pub state: String,
    pub target_url: Option<String>,
}

impl CommitStatus {
    pub fn report(&self) -> CheckReport {
        CheckReport {
            kind: CheckKind::Status,
            name: self.context.clone(),
            github_id: self.id,
            state: match self.state.as_str() {
                "success" => CheckState::Passed,
                "pending" => CheckState::Pending,
                _ => CheckState::Failed,
            },
            word: self.state.clone(),
            url: self.target_url.clone().filter(|url| !url.is_empty()),
        }
    }
}

/// A check suite: the checks one app (GitHub Actions: one workflow run) runs on a commit.
#[derive(Debug, Deserialize)]
pub struct CheckSuite {
    pub id: i64,
    pub head_sha: String,
    /// `requested`, `queued`, `in_progress`, `completed`.
    pub status: Option<String>,
    pub app: Option<CheckApp>,
    /// Apps that never run a check on the commit still get a suite (it stays `queued`).
    #[serde(default)]
    pub latest_check_runs_count: u64,
}

#[derive(Debug, Deserialize)]
pub struct CheckApp {
    pub name: String,
}

impl CheckSuite {
    /// What the dashboard calls it: the app that runs it.
    pub fn name(&self) -> String {
        self.app.as_ref().map_or_else(
            || format!("check suite {}", self.id),
            |app| app.name.clone(),
        )
    }
}

#[derive(Debug, Deserialize)]
struct CheckRunEvent {
    action: String,
    check_run: CheckRun,
}

#[derive(Debug, Deserialize)]
struct CheckSuiteEvent {
    action: String,
    check_suite: CheckSuite,
}

#[derive(Debug, Deserialize)]
struct WorkflowRunEvent {
    action: String,
    workflow_run: WorkflowRun,
    workflow: Option<Workflow>,
}

#[derive(Debug, Deserialize)]
struct WorkflowRun {
    name: Option<String>,
    head_sha: String,
}

#[derive(Debug, Deserialize)]
struct Workflow {
    name: String,
}

/// Maps a verified event to a deploy or a reason to ignore it.
pub fn interpret(
    app: &AppConfig,
    event: &str,
    delivery: Option<&domain::Delivery>,
    body: &[u8],
) -> Result<Outcome, WebhookError> {
    match event {
        "ping" => return Ok(Outcome::Pong),
        "push" => {}
        "check_run" | "status" | "check_suite" | "workflow_run" => {
            return checks(app, event, body);
        }
        other => return Ok(Outcome::Ignored(format!("event `{other}` is not deployed"))),
    }
    let push: Push = serde_json::from_slice(body).map_err(|err| malformed(event, err))?;
    if let Some(ignored) = other_repository(app, &push.repository, "push to") {
        return Ok(ignored);
    }
    let Some(branch) = push.git_ref.strip_prefix("refs/heads/") else {
        return Ok(Outcome::Ignored(format!(
            "{} is not a branch",
            push.git_ref
        )));
    };
    if push.deleted {
        return Ok(Outcome::Ignored(format!("branch {branch} was deleted")));
    }
    if branch != app.branch {
        return Ok(Outcome::Ignored(format!(
            "push to {branch}; {} deploys {}",
            app.name, app.branch
        )));
    }
    let commit = CommitSha::parse(&push.after).map_err(|reason| malformed(event, reason))?;
    let head = push.head_commit;
    Ok(Outcome::Deploy(Box::new(Trigger {
        app: app.name.clone(),
        commit: Some(commit),
        branch: branch.to_owned(),
        kind: TriggerKind::Push,
        delivery: delivery.cloned(),
        message: head.as_ref().map(|h| h.message.clone()),
        author: head
            .and_then(|h| h.author)
            .and_then(|a| a.username.or(a.name)),
        reuse: None,
    })))
}

/// Ignored, when `repository` is not the one `app` deploys from; `what` is what came from it.
fn other_repository(app: &AppConfig, repository: &Repository, what: &str) -> Option<Outcome> {
    let expected = app.repository.as_ref()?;
    (!repository.full_name.eq_ignore_ascii_case(expected)).then(|| {
        Outcome::Ignored(format!(
            "{what} {} but {} deploys from {expected}",
            repository.full_name, app.name
        ))
    })
}

/// A verified event about a commit's checks: news for an app gated on them, or a reason to
/// ignore it. Read only for such an app, so a push-deployed app never answers 400 for them.
fn checks(app: &AppConfig, event: &str, body: &[u8]) -> Result<Outcome, WebhookError> {
    if app.trigger != TriggerMode::Checks {
        return Ok(Outcome::Ignored(format!(
            "event `{event}` is not deployed: {} does not wait for checks (trigger = \"checks\")",
            app.name
        )));
    }
    #[derive(Deserialize)]
    struct Sent {
        repository: Repository,
    }
    let read = |err| malformed(event, err);
    let sent: Sent = serde_json::from_slice(body).map_err(read)?;
    if let Some(ignored) = other_repository(app, &sent.repository, "checks of") {
        return Ok(ignored);
    }
    let (sha, evidence) = match event {
        "check_run" => {
            let news: CheckRunEvent = serde_json::from_slice(body).map_err(read)?;
            // A re-run asked for (`rerequested`) reports as a new check run once it exists.
            if !matches!(news.action.as_str(), "created" | "completed") {
                return Ok(Outcome::Ignored(format!(
                    "check run {}: nothing has concluded",
                    news.action
                )));
            }
            let report = news.check_run.report();
            (news.check_run.head_sha, Evidence::Report(report))
        }
        "status" => {
            let status: CommitStatus = serde_json::from_slice(body).map_err(read)?;
            let report = status.report();
            let sha = status.sha.ok_or_else(|| malformed(event, "no `sha`"))?;
            (sha, Evidence::Report(report))
        }
        "check_suite" => {
            let news: CheckSuiteEvent = serde_json::from_slice(body).map_err(read)?;
            if news.action != "completed" {
                return Ok(Outcome::Ignored(format!(
                    "check suite {}: its checks report on their own",
                    news.action
                )));
            }
            let name = news.check_suite.name();
            (news.check_suite.head_sha, Evidence::SuiteFinished(name))
        }
        _ => {
            let news: WorkflowRunEvent = serde_json::from_slice(body).map_err(read)?;
            if news.action != "completed" {
                return Ok(Outcome::Ignored(format!(
                    "workflow run {}: its checks report on their own",
                    news.action
                )));
            }
            let name = news
                .workflow_run
                .name
                .filter(|name| !name.is_empty())
                .or(news.workflow.map(|w| w.name))
                .unwrap_or_else(|| "a workflow run".into());
            (news.workflow_run.head_sha, Evidence::SuiteFinished(name))
        }
    };
    let commit = CommitSha::parse(&sha).map_err(|reason| malformed(event, reason))?;
    Ok(Outcome::Checks(Box::new(CheckNews { commit, evidence })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: &str) -> domain::Delivery {
        domain::Delivery {
            source: "github",
            id: id.to_owned(),
            body_sha256: None,
        }
    }
    use crate::config::Config;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn app() -> AppConfig {
        let text = r#"
[[app]]
name = "hello"
repo = "x"
repository = "acme/hello"
build = "true"
artifact = "hello"
run = "{artifact} --port {port}"
"#;
        Config::parse(text, std::path::Path::new("n.toml"))
            .unwrap()
            .apps
            .remove(0)
    }

    fn checks_app(checks: &str) -> AppConfig {
        let text = format!(
            r#"
[[app]]
name = "hello"
repo = "x"
repository = "acme/hello"
trigger = "checks"
checks = {checks}
build = "true"
artifact = "hello"
run = "{{artifact}} --port {{port}}"

[github]
"#
        );
        Config::parse(&text, std::path::Path::new("n.toml"))
            .unwrap()
            .apps
            .remove(0)
    }

    /// A payload as GitHub sends it (tests/fixtures/github), for commit `SHA`.
    fn fixture(name: &str) -> serde_json::Value {
        let path = format!(
            "{}/tests/fixtures/github/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str(&text.replace("d6fde92930d4715a2b49857d24b940956b26d2d3", SHA))
            .unwrap()
    }

    fn news(app: &AppConfig, event: &str, body: &serde_json::Value) -> Outcome {
        interpret(app, event, None, body.to_string().as_bytes()).unwrap()
    }

    fn evidence(outcome: Outcome) -> Evidence {
        let Outcome::Checks(news) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(news.commit.as_str(), SHA);
        news.evidence
    }

    #[test]
    fn a_check_run_reports_its_name_state_and_page() {
        let app = checks_app("[]");
        let mut run = fixture("check_run.completed.json");
        let Evidence::Report(report) = evidence(news(&app, "check_run", &run)) else {
            panic!()
        };
        assert_eq!(
            report,
            CheckReport {
                kind: CheckKind::Run,
                name: "lint".into(),
                github_id: 32461107741,
                state: CheckState::Failed,
                word: "failure".into(),
                url: Some(
                    "https://github.com/acme/hello/actions/runs/11639810372/job/32461107741".into()
                ),
            }
        );
        for (status, conclusion, state, word) in [
            ("completed", "success", CheckState::Passed, "success"),
            ("completed", "neutral", CheckState::Passed, "neutral"),
            ("completed", "skipped", CheckState::Passed, "skipped"),
            ("completed", "cancelled", CheckState::Failed, "cancelled"),
            ("completed", "timed_out", CheckState::Failed, "timed_out"),
            (
                "completed",
                "action_required",
                CheckState::Failed,
                "action_required",
            ),
            (
                "completed",
                "a_word_from_2030",
                CheckState::Failed,
                "a_word_from_2030",
            ),
            ("in_progress", "", CheckState::Pending, "in_progress"),
            ("queued", "", CheckState::Pending, "queued"),
        ] {
            run["check_run"]["status"] = status.into();
            run["check_run"]["conclusion"] = match conclusion {
                "" => serde_json::Value::Null,
                word => word.into(),
            };
            let Evidence::Report(report) = evidence(news(&app, "check_run", &run)) else {
                panic!()
            };
            assert_eq!(
                (report.state, report.word.as_str()),
                (state, word),
                "{status} {conclusion}"
            );
        }
        run["action"] = "rerequested".into();
        assert!(matches!(news(&app, "check_run", &run), Outcome::Ignored(_)));
    }

    #[test]
    fn a_commit_status_reports_its_context() {
        let app = checks_app("[\"ci/jenkins\"]");
        let mut status = fixture("status.json");
        let Evidence::Report(report) = evidence(news(&app, "status", &status)) else {
            panic!()
        };
        assert_eq!(
            (
                report.kind,
                report.name.as_str(),
                report.state,
                report.github_id
            ),
            (
                CheckKind::Status,
                "ci/jenkins",
                CheckState::Passed,
                30318412455
            )
        );
        assert_eq!(
            report.url.as_deref(),
            Some("https://ci.example.com/acme/hello/builds/877")
        );
        for (state, expected) in [
            ("pending", CheckState::Pending),
            ("failure", CheckState::Failed),
            ("error", CheckState::Failed),
        ] {
            status["state"] = state.into();
            let Evidence::Report(report) = evidence(news(&app, "status", &status)) else {
                panic!()
            };
            assert_eq!(report.state, expected, "{state}");
        }
    }

    #[test]
    fn a_finished_check_suite_or_workflow_run_says_which_suite() {
        let app = checks_app("[]");
        let mut suite = fixture("check_suite.completed.json");
        assert_eq!(
            evidence(news(&app, "check_suite", &suite)),
            Evidence::SuiteFinished("GitHub Actions".into())
        );
        let mut run = fixture("workflow_run.completed.json");
        assert_eq!(
            evidence(news(&app, "workflow_run", &run)),
            Evidence::SuiteFinished("CI".into())
        );
        suite["action"] = "requested".into();
        run["action"] = "in_progress".into();
        assert!(matches!(
            news(&app, "check_suite", &suite),
            Outcome::Ignored(_)
        ));
        assert!(matches!(
            news(&app, "workflow_run", &run),
            Outcome::Ignored(_)
        ));
    }

    #[test]
    fn checks_are_news_only_for_a_checks_gate_of_that_repository() {
        let events = [
            ("check_run", fixture("check_run.completed.json")),
            ("status", fixture("status.json")),
            ("check_suite", fixture("check_suite.completed.json")),
            ("workflow_run", fixture("workflow_run.completed.json")),
        ];
        for (event, body) in &events {
            // A push-deployed app ignores them, however malformed.
            match interpret(&app(), event, None, b"{not json") {
                Ok(Outcome::Ignored(why)) => {
                    assert!(why.contains("does not wait for checks"), "{why}")
                }
                other => panic!("{event}: {other:?}"),
            }
            let mut elsewhere = body.clone();
            elsewhere["repository"]["full_name"] = "evil/hello".into();
            match news(&checks_app("[]"), event, &elsewhere) {
                Outcome::Ignored(why) => assert!(why.contains("deploys from acme/hello"), "{why}"),
                other => panic!("{event}: {other:?}"),
            }
            let mut bad_sha = body.to_string().replace(SHA, "abc");
            assert!(
                matches!(
                    interpret(&checks_app("[]"), event, None, bad_sha.as_bytes()),
                    Err(WebhookError::Malformed { .. })
                ),
                "{event}"
            );
            bad_sha.truncate(10);
            assert!(matches!(
                interpret(&checks_app("[]"), event, None, bad_sha.as_bytes()),
                Err(WebhookError::Malformed { .. })
            ));
        }
    }

    fn push(git_ref: &str, repo: &str, deleted: bool) -> Vec<u8> {
        serde_json::json!({
            "ref": git_ref, "after": SHA, "deleted": deleted,
            "repository": {"full_name": repo},
            "head_commit": {"message": "Say hi", "author": {"name": "Ada", "username": "ada"}}
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn accepts_githubs_own_example_signature() {
        // The example from GitHub's "Validating webhook deliveries" documentation.
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(
            verify(
                b"It's a Secret to Everybody",
                Some(header),
                b"Hello, World!"
            ),
            Ok(())
        );
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            header
        );
    }

    #[test]
    fn rejects_missing_forged_and_tampered_signatures() {
        let body = b"{}";
        let good = sign(b"secret", body);
        assert_eq!(
            verify(b"secret", None, body),
            Err(WebhookError::MissingSignature("X-Hub-Signature-256"))
        );
        assert_eq!(
            verify(b"other", Some(&good), body),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(b"secret", Some(&good), b"{ }"),
            Err(WebhookError::BadSignature)
        );
        for bad in [
            "",
            "sha256=",
            "sha1=abcd",
            "sha256=zz",
            &good[..good.len() - 2],
        ] {
            assert_eq!(
                verify(b"secret", Some(bad), body),
                Err(WebhookError::BadSignature),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_push_to_the_branch_deploys_that_commit() {
        let outcome = interpret(
            &app(),
            "push",
            Some(&delivery("d-1")),
            &push("refs/heads/main", "acme/hello", false),
        );
        let Ok(Outcome::Deploy(trigger)) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(trigger.commit.unwrap().as_str(), SHA);
        assert_eq!(trigger.delivery, Some(delivery("d-1")));
        assert_eq!(trigger.message.as_deref(), Some("Say hi"));
        assert_eq!(trigger.author.as_deref(), Some("ada"));
    }

    #[test]
    fn other_branches_repositories_tags_and_deletions_are_ignored() {
        let app = app();
        let cases = [
            (
                "push",
                push("refs/heads/dev", "acme/hello", false),
                "push to dev",
            ),
            (
                "push",
                push("refs/heads/main", "evil/hello", false),
                "deploys from acme/hello",
            ),
            (
                "push",
                push("refs/tags/v1", "acme/hello", false),
                "not a branch",
            ),
            (
                "push",
                push("refs/heads/main", "acme/hello", true),
                "was deleted",
            ),
            ("issues", b"{}".to_vec(), "`issues` is not deployed"),
        ];
        for (event, body, reason) in cases {
            match interpret(&app, event, None, &body) {
                Ok(Outcome::Ignored(why)) => assert!(why.contains(reason), "{why}"),
                other => panic!("{reason}: {other:?}"),
            }
        }
        assert!(matches!(
            interpret(&app, "ping", None, b"{}"),
            Ok(Outcome::Pong)
        ));
    }

    #[test]
    fn a_malformed_push_is_an_error() {
        assert!(matches!(
            interpret(&app(), "push", None, b"not json"),
            Err(WebhookError::Malformed { .. })
        ));
    }

    fn form(json: &[u8]) -> Vec<u8> {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", std::str::from_utf8(json).unwrap())
            .finish()
            .into_bytes()
    }

    #[test]
    fn json_and_form_content_types_are_read_and_others_refused_naming_both() {
        for (header, expected) in [
            (None, ContentType::Json),
            (Some("application/json"), ContentType::Json),
            (Some("Application/JSON; charset=utf-8"), ContentType::Json),
            (Some("application/x-www-form-urlencoded"), ContentType::Form),
            (
                Some(" application/x-www-form-urlencoded ; charset=UTF-8"),
                ContentType::Form,
            ),
        ] {
            assert_eq!(
                ContentType::from_header(header.map(str::as_bytes)),
                Ok(expected),
                "{header:?}"
            );
        }
        for header in ["text/plain", "", "multipart/form-data", "application/jsonx"] {
            let Err(err) = ContentType::from_header(Some(header.as_bytes())) else {
                panic!("{header} accepted")
            };
            let reason = err.to_string();
            assert!(matches!(err, WebhookError::UnsupportedContentType { .. }));
            assert!(
                reason.contains("application/json")
                    && reason.contains("application/x-www-form-urlencoded"),
                "{reason}"
            );
        }
        let long = ContentType::from_header(Some("x".repeat(10_000).as_bytes()))
            .unwrap_err()
            .to_string();
        assert!(long.len() < 300, "{long}");
    }

    #[test]
    fn a_form_payload_is_the_url_decoded_json_document() {
        let json = push("refs/heads/main", "acme/hello", false);
        assert_eq!(
            payload(ContentType::Form, "push", &form(&json)).unwrap(),
            json
        );
        assert_eq!(payload(ContentType::Json, "push", &json).unwrap(), json);
        let Err(err) = payload(ContentType::Form, "push", &json) else {
            panic!("a JSON body read as a form")
        };
        assert!(
            err.to_string()
                .starts_with("malformed push payload: no form field `payload`"),
            "{err}"
        );
    }

    #[test]
    fn both_content_types_mean_the_same_for_every_event() {
        let app = app();
        let cases = [
            ("push", push("refs/heads/main", "acme/hello", false)),
            ("push", push("refs/heads/dev", "acme/hello", false)),
            ("ping", br#"{"zen":"Design for failure."}"#.to_vec()),
            ("issues", br#"{"action":"opened"}"#.to_vec()),
            ("push", b"{not json".to_vec()),
        ];
        for (event, json) in cases {
            let form = form(&json);
            // The body's digest differs with its encoding; everything else must not.
            let read = |content_type: &str, body| {
                Delivery::decode(Some(content_type.as_bytes()), Some(event), Some("d"), body)
                    .and_then(|delivery| delivery.interpret(&app))
                    .map(|outcome| match outcome {
                        Outcome::Deploy(mut trigger) => {
                            trigger.delivery = None;
                            Outcome::Deploy(trigger)
                        }
                        other => other,
                    })
            };
            let as_json = read("application/json", &json);
            let as_form = read("application/x-www-form-urlencoded", &form);
            assert_eq!(
                format!("{as_json:?}"),
                format!("{as_form:?}"),
                "{event} {}",
                String::from_utf8_lossy(&json)
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        const SECRET: &[u8] = b"s3cret";

        proptest! {
            #[test]
            fn only_the_signature_of_this_very_body_verifies(
                body in vec(any::<u8>(), 0..512),
                other in vec(any::<u8>(), 0..512),
                header in ".{0,100}",
            ) {
                let own = sign(SECRET, &body);
                prop_assert!(verify(SECRET, Some(&own), &body).is_ok());
                prop_assert_eq!(
                    verify(SECRET, Some(&sign(SECRET, &other)), &body).is_ok(),
                    other == body
                );
                // hex is read in either case; anything else is refused.
                prop_assert_eq!(
                    verify(SECRET, Some(&header), &body).is_ok(),
                    header.eq_ignore_ascii_case(&own)
                );
            }

            #[test]
            fn any_event_and_body_is_answered_without_a_panic(
                event in prop_oneof![
                    Just("push".to_owned()),
                    Just("ping".to_owned()),
                    Just("check_run".to_owned()),
                    Just("status".to_owned()),
                    Just("check_suite".to_owned()),
                    Just("workflow_run".to_owned()),
                    ".{0,20}",
                ],
                body in vec(any::<u8>(), 0..2048),
            ) {
                let _ = interpret(&app(), &event, Some(&delivery("d")), &body);
                let _ = interpret(&checks_app("[]"), &event, Some(&delivery("d")), &body);
                let _ = repository_of(&body);
                if let Ok(document) = payload(ContentType::Form, &event, &body) {
                    let _ = interpret(&app(), &event, Some(&delivery("d")), &document);
                }
            }
        }
    }
}
