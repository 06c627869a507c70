//! GitHub deployments: when a deployment starts, a GitHub Deployment of its commit to the
//! environment named after the app, then deployment statuses `in_progress`, `success`,
//! `failure` (or `inactive` when rolled back), each with `log_url` at the dashboard's page
//! and `environment_url` at the app. Talks to the REST API through `octocrab` (token auth,
//! a configurable base URI for GitHub Enterprise); the request bodies are pure functions.

use std::collections::HashMap;

use async_trait::async_trait;
use octocrab::Octocrab;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Kind, Notice, Notifier, NotifyError, status_error, with_retries};
use crate::config::{AppConfig, GitHubConfig};
use crate::db::{self, Db};

pub struct GitHub {
    client: Octocrab,
    /// `owner/name` per app that reports to GitHub.
    repositories: HashMap<String, String>,
    /// Where nonstop's deployment id → GitHub's is kept, from creation until the last
    /// status (a live deployment's until it is rolled back), so a restart loses nothing.
    db: Db,
}

#[derive(Deserialize)]
struct Created {
    id: u64,
}

impl GitHub {
    pub fn new(config: &GitHubConfig, apps: &[AppConfig], db: Db) -> Result<Self, NotifyError> {
        let client =
            crate::github_api::client(config).map_err(|err| NotifyError::Setup(err.to_string()))?;
        let repositories = apps
            .iter()
            .filter_map(|app| Some((app.name.to_string(), app.repository.clone()?)))
            .collect();
        Ok(Self {
            client,
            repositories,
            db,
        })
    }

    async fn create(&self, repository: &str, notice: &Notice) -> Option<u64> {
        let route = format!("/repos/{repository}/deployments");
        let body = deployment_request(notice);
        let created: Created = with_retries(
            "github",
            "create deployment",
            notice.deployment.id,
            || async {
                self.client
                    .post::<_, Created>(&route, Some(&body))
                    .await
                    .map_err(classify)
            },
        )
        .await?;
        Some(created.id)
    }

    async fn status(&self, repository: &str, github_id: u64, notice: &Notice, state: &str) {
        let route = format!("/repos/{repository}/deployments/{github_id}/statuses");
        let body = status_request(notice, state);
        with_retries("github", state, notice.deployment.id, || async {
            self.client
                .post::<_, serde::de::IgnoredAny>(&route, Some(&body))
                .await
                .map(|_| ())
                .map_err(classify)
        })
        .await;
    }
}

#[async_trait]
impl Notifier for GitHub {
    fn name(&self) -> &'static str {
        "github"
    }

    fn wants(&self, app: &AppConfig) -> bool {
        app.repository.is_some() && !app.github.as_ref().is_some_and(|g| g.mute)
    }

    async fn deliver(&mut self, notice: &Notice) {
        let id = notice.deployment.id;
        // A deployment that never ran (CI failed its commit) has nothing to show on GitHub.
        if notice.deployment.started_at.is_none() {
            return;
        }
        let Some(repository) = self
            .repositories
            .get(notice.deployment.app.as_str())
            .cloned()
        else {
            return;
        };
        let state = match notice.kind {
            Kind::Started => "in_progress",
            Kind::Succeeded => "success",
            Kind::Failed | Kind::GuardTripped => "failure",
            // GitHub's word for a deployment that ended without a verdict.
            Kind::Interrupted => "error",
            Kind::RolledBack => "inactive",
        };
        let known = self
            .db
            .call(move |conn| db::github_deployment(conn, id))
            .await
            .unwrap_or_else(|err| {
                tracing::warn!(deployment_id = %id, error = %err, "cannot read the GitHub deployment id");
                None
            });
        let github_id = match known {
            Some(github_id) => github_id,
            // A rollback only marks what GitHub already shows; GitHub itself set the older
            // deployment inactive when the newer one succeeded.
            None if notice.kind == Kind::RolledBack => return,
            // Not created at start (GitHub was down, or the start notice was lost): now.
            None => match self.create(&repository, notice).await {
                Some(github_id) => github_id,
                None => return,
            },
        };
        // A deployment that went live may still be rolled back: its id stays until then.
        let kept = if matches!(notice.kind, Kind::Started | Kind::Succeeded) {
            self.db
                .call(move |conn| db::set_github_deployment(conn, id, github_id))
                .await
        } else {
            self.db
                .call(move |conn| db::forget_github_deployment(conn, id))
                .await
        };
        if let Err(err) = kept {
            tracing::warn!(deployment_id = %id, error = %err, "cannot keep the GitHub deployment id");
        }
        self.status(&repository, github_id, notice, state).await;
    }
}

/// octocrab's error as retryable or not; the token is never part of it.
fn classify(err: octocrab::Error) -> NotifyError {
    match err {
        octocrab::Error::GitHub { source, .. } => {
            status_error("GitHub", source.status_code.as_u16(), &source.message)
        }
        other => NotifyError::Retryable(format!("GitHub request failed: {other}")),
    }
}

/// `POST /repos/{owner}/{repo}/deployments`: the exact commit, the app as environment.
pub fn deployment_request(notice: &Notice) -> Value {
    let deployment = &notice.deployment;
    json!({
        "ref": deployment.commit_sha.as_deref().unwrap_or(&deployment.branch),
        "environment": deployment.app,
        "description": clip(&format!("nonstop deployment #{}", deployment.id)),
        // nonstop already decided to deploy this commit: no merging, no status checks.
        "auto_merge": false,
        "required_contexts": [],
        "payload": { "nonstop_deployment_id": deployment.id },
    })
}

/// `POST /repos/{owner}/{repo}/deployments/{id}/statuses`.
pub fn status_request(notice: &Notice, state: &str) -> Value {
    let deployment = &notice.deployment;
    let version = deployment.version.as_deref().unwrap_or("a new version");
    let description = match notice.kind {
        // The version may not be stamped yet when a deployment starts; the commit is known.
        Kind::Started => format!(
            "Deploying {}",
            deployment
                .commit_sha
                .as_deref()
                .map_or("", |sha| &sha[..sha.len().min(7)])
        ),
        Kind::Succeeded => match &notice.live {
            Some(live) => format!("{version} is live on port {} ({})", live.port, live.profile),
            None => format!("{version} is live"),
        },
        Kind::Failed => match &notice.failed_stage {
            Some(failed) => format!("{} failed", failed.stage),
            None => deployment.error.clone().unwrap_or_else(|| "failed".into()),
        },
        Kind::Interrupted => deployment
            .error
            .clone()
            .unwrap_or_else(|| "interrupted".into()),
        Kind::RolledBack => format!("{version} was rolled back"),
        Kind::GuardTripped => format!(
            "switched back: {}",
            deployment.error.as_deref().unwrap_or("the guard tripped")
        ),
    };
    json!({
        "state": state,
        "environment": deployment.app,
        "log_url": notice.link,
        "environment_url": notice.app_url,
        "description": clip(&description),
    })
}

/// GitHub caps descriptions at 140 characters.
fn clip(text: &str) -> String {
    text.chars().take(140).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Deployment;
    use crate::domain::DeploymentStatus;

    fn notice(kind: Kind) -> Notice {
        Notice {
            kind,
            deployment: Deployment {
                id: crate::domain::DeploymentId::new(3),
                app: crate::domain::AppName::parse("hello").unwrap(),
                status: DeploymentStatus::Running,
                trigger: crate::domain::TriggerKind::Push,
                branch: "main".into(),
                commit_sha: Some(
                    crate::domain::CommitSha::parse("0123456789abcdef0123456789abcdef01234567")
                        .unwrap(),
                ),
                commit_message: None,
                author: None,
                version: Some("1.0.1-SNAPSHOT-20240501100000".into()),
                port: None,
                bundle: None,
                error: None,
                created_at: 0,
                started_at: Some(1),
                finished_at: None,
                ci_build_number: None,
                ci_build_url: None,
                ci_check: None,
                ci_waiting_for: None,
                rollback_of: None,
                runner_ref: None,
                bundle_pruned_at: None,
            },
            failed_stage: None,
            live: None,
            link: "https://deploy.example/deployments/3".into(),
            app_url: "https://hello.example".into(),
        }
    }

    #[test]
    fn a_deployment_is_of_the_exact_commit_to_the_apps_environment() {
        assert_eq!(
            deployment_request(&notice(Kind::Started)),
            json!({
                "ref": "0123456789abcdef0123456789abcdef01234567",
                "environment": "hello",
                "description": "nonstop deployment #3",
                "auto_merge": false,
                "required_contexts": [],
                "payload": {"nonstop_deployment_id": 3}
            })
        );
    }

    #[test]
    fn statuses_link_the_dashboard_and_the_app() {
        assert_eq!(
            status_request(&notice(Kind::Started), "in_progress"),
            json!({
                "state": "in_progress",
                "environment": "hello",
                "log_url": "https://deploy.example/deployments/3",
                "environment_url": "https://hello.example",
                "description": "Deploying 0123456"
            })
        );
        let long = Notice {
            deployment: Deployment {
                error: Some("x".repeat(500)),
                ..notice(Kind::Failed).deployment
            },
            ..notice(Kind::Failed)
        };
        let body = status_request(&long, "failure");
        assert_eq!(body["description"].as_str().unwrap().chars().count(), 140);
    }

    #[test]
    fn a_guard_switch_back_is_a_failure_with_its_reason() {
        let tripped = Notice {
            deployment: Deployment {
                error: Some("5xx 33% of 212 requests in 4.2 s after the switch; limit 5%".into()),
                ..notice(Kind::GuardTripped).deployment
            },
            ..notice(Kind::GuardTripped)
        };
        let body = status_request(&tripped, "failure");
        assert_eq!(body["state"], "failure");
        assert_eq!(
            body["description"],
            "switched back: 5xx 33% of 212 requests in 4.2 s after the switch; limit 5%"
        );
    }
}
