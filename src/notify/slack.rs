//! Slack: a Block Kit message to an incoming webhook when a deployment starts, succeeds,
//! fails or is rolled back. The webhook URL is the secret: it is never logged, and request
//! errors are logged without it. Building a message is a pure function (`message`).

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{FailedStage, Kind, Notice, Notifier, NotifyError, status_error, with_retries};
use crate::config::{AppConfig, Secret, SlackConfig};
use crate::domain::{DeploymentId, DeploymentStatus};
use crate::elapsed;

pub struct Slack {
    client: reqwest::Client,
    url: Secret,
    /// The channel per app: the app's override, else `[slack] channel`, else the webhook's.
    channels: HashMap<String, Option<String>>,
}

impl Slack {
    pub fn new(config: &SlackConfig, apps: &[AppConfig]) -> Result<Self, NotifyError> {
        let url = config.webhook_url.clone().ok_or_else(|| {
            NotifyError::Setup("slack.webhook_url_env was not read at start".into())
        })?;
        // No client timeout: `with_retries` cuts every try off after `TIMEOUT`.
        let client = reqwest::Client::builder()
            .build()
            .map_err(|err| NotifyError::Setup(format!("Slack client: {err}")))?;
        let channels = apps
            .iter()
            .map(|app| {
                let own = app.slack.as_ref().and_then(|s| s.channel.clone());
                (app.name.to_string(), own.or_else(|| config.channel.clone()))
            })
            .collect();
        Ok(Self {
            client,
            url,
            channels,
        })
    }

    async fn post(&self, body: &Value) -> Result<(), NotifyError> {
        let response = self
            .client
            .post(self.url.expose())
            .json(body)
            .send()
            .await
            // The URL is the secret: keep it out of the error.
            .map_err(|err| NotifyError::Retryable(describe(err.without_url())))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let detail = response.text().await.unwrap_or_default();
        Err(status_error("Slack", status.as_u16(), &detail))
    }
}

#[async_trait]
impl Notifier for Slack {
    fn name(&self) -> &'static str {
        "slack"
    }

    fn wants(&self, app: &AppConfig) -> bool {
        !app.slack.as_ref().is_some_and(|s| s.mute)
    }

    async fn deliver(&mut self, notice: &Notice) {
        let channel = self
            .channels
            .get(notice.deployment.app.as_str())
            .cloned()
            .flatten();
        let body = message(notice, channel.as_deref());
        let this = &*self;
        with_retries(
            "slack",
            kind_name(notice.kind),
            notice.deployment.id,
            || this.post(&body),
        )
        .await;
    }
}

/// The error and its causes on one line ("error sending request" alone says little).
fn describe(err: reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Started => "started",
        Kind::Succeeded => "succeeded",
        Kind::Failed => "failed",
        Kind::Interrupted => "interrupted",
        Kind::RolledBack => "rolled back",
    }
}

/// The message for `notice`: a one-line `text` (what notifications show) and its blocks.
pub fn message(notice: &Notice, channel: Option<&str>) -> Value {
    let facts = Facts::of(notice);
    let (text, blocks) = match notice.kind {
        Kind::Started => started(notice, &facts),
        Kind::Succeeded => succeeded(facts),
        Kind::Failed => match &notice.failed_stage {
            Some(stage) => failed_at(stage, facts),
            // Nothing ran (CI failed the commit) or the record says why in `error`.
            None => failed_before(notice, facts),
        },
        Kind::Interrupted => interrupted(notice, facts),
        Kind::RolledBack => rolled_back(facts),
    };
    let mut body = json!({ "text": text, "blocks": blocks });
    if let Some(channel) = channel {
        body["channel"] = json!(channel);
    }
    body
}

/// What the messages say of a deployment, escaped for mrkdwn.
struct Facts {
    id: DeploymentId,
    app: String,
    /// The version, or `—` before one was stamped.
    version: String,
    /// The commit's short id, or `branch head` before Fetch resolved it.
    short: String,
    /// The short id and the subject of the commit message.
    commit: String,
    duration: String,
    /// What serves the app now.
    live: String,
    /// The context block linking to the dashboard's page.
    link: Value,
}

impl Facts {
    fn of(notice: &Notice) -> Self {
        let deployment = &notice.deployment;
        let short = deployment
            .commit_sha
            .as_deref()
            .map(|sha| &sha[..sha.len().min(7)])
            .unwrap_or("branch head")
            .to_owned();
        let commit = match deployment
            .commit_message
            .as_deref()
            .and_then(|m| m.lines().next())
        {
            Some(subject) => format!("`{short}` {}", escape(&clip(subject, 80))),
            None => format!("`{short}`"),
        };
        Self {
            id: deployment.id,
            app: escape(&deployment.app),
            version: deployment
                .version
                .as_deref()
                .map_or_else(|| "—".into(), escape),
            short,
            commit,
            duration: notice
                .duration_ms()
                .map_or_else(|| "—".into(), elapsed::human),
            live: match &notice.live {
                Some(live) => format!("port {} · {}", live.port, escape(&live.profile)),
                None => "nothing".into(),
            },
            link: context(format!("<{}|Deployment #{}>", notice.link, deployment.id)),
        }
    }
}

fn started(notice: &Notice, facts: &Facts) -> (String, Vec<Value>) {
    let Facts {
        app, short, commit, ..
    } = facts;
    let deployment = &notice.deployment;
    let by = deployment
        .author
        .as_deref()
        .map(|a| format!(" by {}", escape(a)))
        .unwrap_or_default();
    (
        format!("Deploying {app} {short}"),
        vec![
            section(format!(":rocket: *Deploying {app}* {commit}")),
            context(format!(
                "<{}|Deployment #{}> · {}{by}",
                notice.link, deployment.id, deployment.trigger
            )),
        ],
    )
}

fn succeeded(facts: Facts) -> (String, Vec<Value>) {
    let Facts {
        app,
        version,
        commit,
        duration,
        live,
        link,
        ..
    } = facts;
    (
        format!("{app} {version} is live"),
        vec![
            section(format!(":white_check_mark: *{app} {version} is live*")),
            fields(&[
                ("Version", version.clone()),
                ("Commit", commit),
                ("Duration", duration),
                ("Live", live),
            ]),
            link,
        ],
    )
}

/// A stage failed: its name and the end of its output.
fn failed_at(failed: &FailedStage, facts: Facts) -> (String, Vec<Value>) {
    let Facts {
        id,
        app,
        version,
        commit,
        duration,
        link,
        ..
    } = facts;
    let stage = failed.stage.as_str();
    let log = escape(&clip_end(&failed.log_tail.replace("```", "'''"), 2800));
    let log = if log.is_empty() {
        "(no output)".into()
    } else {
        log
    };
    (
        format!("{app} deployment #{id} failed at {stage}"),
        vec![
            section(format!(":x: *{app} deployment failed* at {stage}")),
            fields(&[
                ("Version", version),
                ("Commit", commit),
                ("Duration", duration),
                ("Failed stage", stage.to_owned()),
            ]),
            section(format!("```{log}```")),
            link,
        ],
    )
}

/// It failed before any stage ran; the deployment's `error` says why.
fn failed_before(notice: &Notice, facts: Facts) -> (String, Vec<Value>) {
    let Facts {
        id,
        app,
        commit,
        live,
        link,
        ..
    } = facts;
    let why = escape(&clip(
        notice.deployment.error.as_deref().unwrap_or("failed"),
        500,
    ));
    (
        format!("{app} deployment #{id} failed"),
        vec![
            section(format!(":x: *{app} deployment failed*: {why}")),
            fields(&[("Commit", commit), ("Live", live)]),
            link,
        ],
    )
}

fn interrupted(notice: &Notice, facts: Facts) -> (String, Vec<Value>) {
    let Facts {
        id,
        app,
        version,
        commit,
        live,
        link,
        ..
    } = facts;
    // Stopped by nonstop's own stop, or on someone's request.
    let word = match notice.deployment.status {
        DeploymentStatus::Cancelled => "cancelled",
        _ => "interrupted",
    };
    let why = escape(&clip(
        notice.deployment.error.as_deref().unwrap_or(word),
        500,
    ));
    (
        format!("{app} deployment #{id} was {word}"),
        vec![
            section(format!(":warning: *{app} deployment was {word}*: {why}")),
            fields(&[("Version", version), ("Commit", commit), ("Live", live)]),
            link,
        ],
    )
}

fn rolled_back(facts: Facts) -> (String, Vec<Value>) {
    let Facts {
        app,
        version,
        commit,
        live,
        link,
        ..
    } = facts;
    (
        format!("{app} {version} was rolled back"),
        vec![
            section(format!(
                ":leftwards_arrow_with_hook: *{app} {version} was rolled back*"
            )),
            fields(&[
                ("Version", version.clone()),
                ("Commit", commit),
                ("Live now", live),
            ]),
            link,
        ],
    )
}

fn section(text: String) -> Value {
    json!({ "type": "section", "text": { "type": "mrkdwn", "text": text } })
}

fn fields(pairs: &[(&str, String)]) -> Value {
    let fields: Vec<Value> = pairs
        .iter()
        .map(|(name, value)| json!({ "type": "mrkdwn", "text": format!("*{name}*\n{value}") }))
        .collect();
    json!({ "type": "section", "fields": fields })
}

fn context(text: String) -> Value {
    json!({ "type": "context", "elements": [{ "type": "mrkdwn", "text": text }] })
}

/// Slack's mrkdwn reserves `&`, `<` and `>`.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` chars of `text`, from its start.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// At most `max` chars of `text`, from its end (a log's last lines matter most); Slack caps
/// a text block at 3000.
fn clip_end(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_owned();
    }
    let skip = text
        .char_indices()
        .nth(count - max)
        .map_or(0, |(cut, _)| cut);
    format!("…{}", &text[skip..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Deployment, Live};
    use crate::domain::{DeploymentStatus, Stage};
    use crate::notify::FailedStage;

    fn notice(kind: Kind) -> Notice {
        Notice {
            kind,
            deployment: Deployment {
                id: DeploymentId::new(7),
                app: crate::domain::AppName::parse("hello").unwrap(),
                status: DeploymentStatus::Succeeded,
                trigger: crate::domain::TriggerKind::Push,
                branch: "main".into(),
                commit_sha: Some(
                    crate::domain::CommitSha::parse("0123456789abcdef0123456789abcdef01234567")
                        .unwrap(),
                ),
                commit_message: Some("Say <hi> & bye\n\nbody".into()),
                author: Some("ada".into()),
                version: Some("1.0.1-SNAPSHOT-20240501100000".into()),
                port: Some(8081),
                bundle: None,
                error: None,
                created_at: 1_000,
                started_at: Some(2_000),
                finished_at: Some(14_300),
                ci_build_number: None,
                ci_build_url: None,
                ci_check: None,
                ci_waiting_for: None,
                rollback_of: None,
                runner_ref: None,
                bundle_pruned_at: None,
            },
            failed_stage: None,
            live: Some(Live {
                app: "hello".into(),
                port: 8081,
                profile: "real1".into(),
                version: Some("1.0.1-SNAPSHOT-20240501100000".into()),
                deployment_id: Some(DeploymentId::new(7)),
                since: 14_000,
            }),
            link: "http://127.0.0.1:9000/deployments/7".into(),
            app_url: "http://127.0.0.1:8080".into(),
        }
    }

    #[test]
    fn a_success_names_version_commit_duration_and_the_live_port() {
        let body = message(&notice(Kind::Succeeded), Some("#deploys"));
        assert_eq!(
            body,
            json!({
                "channel": "#deploys",
                "text": "hello 1.0.1-SNAPSHOT-20240501100000 is live",
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn",
                        "text": ":white_check_mark: *hello 1.0.1-SNAPSHOT-20240501100000 is live*"}},
                    {"type": "section", "fields": [
                        {"type": "mrkdwn", "text": "*Version*\n1.0.1-SNAPSHOT-20240501100000"},
                        {"type": "mrkdwn", "text": "*Commit*\n`0123456` Say &lt;hi&gt; &amp; bye"},
                        {"type": "mrkdwn", "text": "*Duration*\n12.3 s"},
                        {"type": "mrkdwn", "text": "*Live*\nport 8081 · real1"}
                    ]},
                    {"type": "context", "elements": [{"type": "mrkdwn",
                        "text": "<http://127.0.0.1:9000/deployments/7|Deployment #7>"}]}
                ]
            })
        );
    }

    #[test]
    fn a_failure_names_the_stage_and_shows_the_end_of_its_output() {
        let mut failed = notice(Kind::Failed);
        failed.failed_stage = Some(FailedStage {
            stage: Stage::ValidateService,
            log_tail: "health check 20/20 failed\nexit 1".into(),
        });
        let body = message(&failed, None);
        assert!(body.get("channel").is_none());
        assert_eq!(
            body["text"],
            "hello deployment #7 failed at ValidateService"
        );
        assert_eq!(
            body["blocks"][1]["fields"][3]["text"],
            "*Failed stage*\nValidateService"
        );
        assert_eq!(
            body["blocks"][2]["text"]["text"],
            "```health check 20/20 failed\nexit 1```"
        );
    }

    #[test]
    fn start_and_rollback_messages() {
        let started = message(&notice(Kind::Started), None);
        assert_eq!(started["text"], "Deploying hello 0123456");
        assert_eq!(
            started["blocks"][1]["elements"][0]["text"],
            "<http://127.0.0.1:9000/deployments/7|Deployment #7> · push by ada"
        );
        let rolled_back = message(&notice(Kind::RolledBack), None);
        assert_eq!(
            rolled_back["text"],
            "hello 1.0.1-SNAPSHOT-20240501100000 was rolled back"
        );
    }

    #[test]
    fn an_interruption_or_a_failure_before_any_stage_says_why() {
        let mut interrupted = notice(Kind::Interrupted);
        interrupted.deployment.error = Some("nonstop stopped during Build".into());
        let body = message(&interrupted, None);
        assert_eq!(body["text"], "hello deployment #7 was interrupted");
        assert_eq!(
            body["blocks"][0]["text"]["text"],
            ":warning: *hello deployment was interrupted*: nonstop stopped during Build"
        );
        assert_eq!(
            body["blocks"][1]["fields"][2]["text"],
            "*Live*\nport 8081 · real1"
        );

        let mut cancelled = notice(Kind::Interrupted);
        cancelled.deployment.status = DeploymentStatus::Cancelled;
        cancelled.deployment.error = Some("cancelled by admin".into());
        let body = message(&cancelled, None);
        assert_eq!(body["text"], "hello deployment #7 was cancelled");
        assert_eq!(
            body["blocks"][0]["text"]["text"],
            ":warning: *hello deployment was cancelled*: cancelled by admin"
        );

        let mut ci_failed = notice(Kind::Failed);
        ci_failed.deployment.error = Some("Travis CI build #12 Failed: <link>".into());
        let body = message(&ci_failed, None);
        assert_eq!(body["text"], "hello deployment #7 failed");
        assert_eq!(
            body["blocks"][0]["text"]["text"],
            ":x: *hello deployment failed*: Travis CI build #12 Failed: &lt;link&gt;"
        );
        assert_eq!(
            body["blocks"][2]["elements"][0]["text"],
            "<http://127.0.0.1:9000/deployments/7|Deployment #7>"
        );
    }

    #[test]
    fn an_app_may_have_its_own_channel_or_be_muted() {
        let text = r##"
[[app]]
name = "loud"
repo = "x"
build = "true"
artifact = "a"
run = "{artifact} --port {port}"
ports = [8081, 8082]
switch = { kind = "proxy", listen = "127.0.0.1:8080" }
slack = { channel = "#loud" }

[[app]]
name = "plain"
repo = "x"
build = "true"
artifact = "a"
run = "{artifact} --port {port}"
ports = [8083, 8084]
switch = { kind = "proxy", listen = "127.0.0.1:8085" }

[[app]]
name = "quiet"
repo = "x"
build = "true"
artifact = "a"
run = "{artifact} --port {port}"
ports = [8086, 8087]
switch = { kind = "proxy", listen = "127.0.0.1:8088" }
slack = { mute = true }

[slack]
webhook_url_env = "SLACK_URL"
channel = "#deploys"
"##;
        let path = std::path::Path::new("nonstop.toml");
        let mut config = crate::config::Config::parse(text, path).unwrap();
        config
            .read_secrets(path, |_| {
                Some("https://hooks.slack.com/services/T/B/x".into())
            })
            .unwrap();
        let slack = Slack::new(config.slack.as_ref().unwrap(), &config.apps).unwrap();
        let wanted: Vec<bool> = config.apps.iter().map(|a| slack.wants(a)).collect();
        assert_eq!(wanted, [true, true, false]);
        assert_eq!(slack.channels["loud"].as_deref(), Some("#loud"));
        assert_eq!(slack.channels["plain"].as_deref(), Some("#deploys"));
    }

    #[tokio::test]
    async fn a_failed_request_is_described_without_the_url() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let slack = Slack {
            client: reqwest::Client::new(),
            url: Secret::new("http://127.0.0.1:1/services/T0/B0/secret-part".into()),
            channels: HashMap::new(),
        };
        let Err(NotifyError::Retryable(reason)) = slack.post(&json!({})).await else {
            panic!("a refused connection is worth another try")
        };
        assert!(!reason.contains("secret-part"), "{reason}");
        assert!(reason.contains("error sending request: "), "{reason}");
    }

    #[test]
    fn long_logs_keep_their_end_and_durations_read_well() {
        let long = "x".repeat(5000) + "the end";
        let clipped = clip_end(&long, 100);
        assert!(clipped.ends_with("the end") && clipped.chars().count() == 101);
        assert_eq!(elapsed::human(850), "850 ms");
        assert_eq!(elapsed::human(12_345), "12.3 s");
        assert_eq!(elapsed::human(125_000), "2 min 5 s");
    }
}
