//! Notifiers: Slack messages and GitHub deployment statuses, fed by the event bus. When a
//! deployment starts or ends, the dispatcher reads what to report from the database and
//! hands a `Notice` to each notifier's own task, which delivers notices one at a time (so
//! GitHub sees `in_progress` before `success`) with a timeout and retries with backoff.
//! A notifier must never fail, block or slow a deploy: a slow or dead receiver only costs
//! its own task time, and a notice it cannot deliver ends as a logged warning. Secrets (the
//! Slack URL, the GitHub token) never appear in a log line.

pub mod github;
pub mod slack;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{AppConfig, Config};
use crate::db::{self, Db, Deployment, Live};
use crate::domain::{DeploymentId, DeploymentStatus, Stage, StageStatus};
use crate::events::{Bus, Event};

/// Tries per notice, each cut off after `TIMEOUT`; the pause doubles between tries.
pub const TRIES: u32 = 3;
pub const TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Notices waiting for one slow receiver; past this, new ones are dropped with a warning
/// rather than held in memory without bound.
const BACKLOG: usize = 256;
/// Lines of a failed stage's output that a notice carries.
const LOG_TAIL_LINES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// Could not set a notifier up (start-up only).
    #[error("{0}")]
    Setup(String),
    /// Worth another try: no answer, a connection error, 429 or 5xx.
    #[error("{0}")]
    Retryable(String),
    /// The receiver refused the request; another try would be refused too.
    #[error("{0}")]
    Rejected(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Started,
    Succeeded,
    Failed,
    /// nonstop stopped while it ran (reported after the restart), or it was cancelled.
    Interrupted,
    RolledBack,
}

/// One thing to tell about a deployment, with what the database knows of it.
#[derive(Clone, Debug)]
pub struct Notice {
    pub kind: Kind,
    pub deployment: Deployment,
    /// The stage that failed and the last lines of its output.
    pub failed_stage: Option<FailedStage>,
    /// What serves the app now.
    pub live: Option<Live>,
    /// The dashboard's page of this deployment.
    pub link: String,
    /// Where users reach the app.
    pub app_url: String,
}

#[derive(Clone, Debug)]
pub struct FailedStage {
    pub stage: Stage,
    pub log_tail: String,
}

impl Notice {
    /// How long the pipeline ran, in ms, once it has ended.
    pub fn duration_ms(&self) -> Option<i64> {
        Some(self.deployment.finished_at? - self.deployment.started_at?)
    }
}

/// A receiver of notices. Each one runs in its own task and gets notices in order.
#[async_trait]
pub trait Notifier: Send + 'static {
    fn name(&self) -> &'static str;
    /// Whether this notifier reports on `app` (configured for it and not muted).
    fn wants(&self, app: &AppConfig) -> bool;
    /// Delivers one notice; failures are logged here, never returned.
    async fn deliver(&mut self, notice: &Notice);
}

/// Builds the configured notifiers and starts their tasks. Subscribes to the bus before it
/// returns, so nothing published afterwards is missed.
pub fn start(
    config: &Config,
    dashboard_url: &str,
    db: Db,
    bus: &Bus,
    shutdown: CancellationToken,
) -> Result<(), NotifyError> {
    let mut notifiers: Vec<Box<dyn Notifier>> = Vec::new();
    if let Some(slack) = &config.slack {
        notifiers.push(Box::new(slack::Slack::new(slack, &config.apps)?));
    }
    if let Some(github) = &config.github {
        notifiers.push(Box::new(github::GitHub::new(
            github,
            &config.apps,
            db.clone(),
        )?));
    }
    if notifiers.is_empty() {
        return Ok(());
    }
    let mut sinks = Vec::new();
    for mut notifier in notifiers {
        let apps: HashSet<String> = config
            .apps
            .iter()
            .filter(|app| notifier.wants(app))
            .map(|app| app.name.to_string())
            .collect();
        let name = notifier.name();
        tracing::info!(notifier = name, apps = ?apps, "notifier started");
        let (sender, mut notices) = mpsc::channel::<Arc<Notice>>(BACKLOG);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let notice = tokio::select! {
                    notice = notices.recv() => notice,
                    () = stop.cancelled() => None,
                };
                let Some(notice) = notice else { return };
                notifier.deliver(&notice).await;
            }
        });
        sinks.push(Sink { name, apps, sender });
    }
    let app_urls = config
        .apps
        .iter()
        .map(|app| (app.name.to_string(), app.public_url()))
        .collect();
    let dispatcher = Dispatcher {
        db,
        sinks,
        dashboard_url: dashboard_url.trim_end_matches('/').to_owned(),
        app_urls,
        started: HashSet::new(),
    };
    tokio::spawn(dispatcher.run(bus.subscribe(), shutdown));
    Ok(())
}

/// The dispatcher's end of one notifier's task.
struct Sink {
    name: &'static str,
    apps: HashSet<String>,
    sender: mpsc::Sender<Arc<Notice>>,
}

/// Turns bus events into notices.
struct Dispatcher {
    db: Db,
    sinks: Vec<Sink>,
    dashboard_url: String,
    app_urls: HashMap<String, String>,
    /// Deployments already announced as started (`running` is published more than once).
    started: HashSet<DeploymentId>,
}

impl Dispatcher {
    async fn run(mut self, mut events: broadcast::Receiver<Event>, shutdown: CancellationToken) {
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                () = shutdown.cancelled() => return,
            };
            match event {
                Ok(Event::Deployment {
                    id, app, status, ..
                }) => {
                    self.on_deployment(id, &app, status).await;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::warn!(
                        skipped,
                        "notifiers fell behind the event bus; some notices are lost"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn on_deployment(&mut self, id: DeploymentId, app: &str, status: DeploymentStatus) {
        let kind = match status {
            DeploymentStatus::Running if !self.started.contains(&id) => Kind::Started,
            DeploymentStatus::Succeeded => Kind::Succeeded,
            DeploymentStatus::Failed => Kind::Failed,
            // Ended without a verdict, as an interrupted one: the reason says who.
            DeploymentStatus::Interrupted | DeploymentStatus::Cancelled => Kind::Interrupted,
            DeploymentStatus::RolledBack => Kind::RolledBack,
            _ => return,
        };
        if !self.sinks.iter().any(|sink| sink.apps.contains(app)) {
            return;
        }
        let Some(notice) = self.notice(id, kind).await else {
            return;
        };
        if kind == Kind::Started {
            // A deploy of the branch head learns its commit in Fetch: announce it then.
            if notice.deployment.commit_sha.is_none() {
                return;
            }
            self.started.insert(id);
        } else {
            self.started.remove(&id);
        }
        let notice = Arc::new(notice);
        for sink in &self.sinks {
            if !sink.apps.contains(app) {
                continue;
            }
            if sink.sender.try_send(notice.clone()).is_err() {
                tracing::warn!(
                    notifier = sink.name,
                    deployment_id = %id,
                    "notifier backlog full; notice dropped"
                );
            }
        }
    }

    async fn notice(&self, id: DeploymentId, kind: Kind) -> Option<Notice> {
        let found = self
            .db
            .call(move |conn| {
                let Some(deployment) = db::deployment(conn, id)? else {
                    return Ok(None);
                };
                let stages = db::stages(conn, id)?;
                let live = db::live(conn, &deployment.app)?;
                Ok(Some((deployment, stages, live)))
            })
            .await;
        let (deployment, stages, live) = match found {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(err) => {
                tracing::warn!(deployment_id = %id, error = %err, "cannot read a deployment to report it");
                return None;
            }
        };
        let failed_stage = stages
            .iter()
            .find(|stage| stage.status == StageStatus::Failed)
            .map(|stage| FailedStage {
                stage: stage.name,
                log_tail: tail(&stage.log, LOG_TAIL_LINES),
            });
        Some(Notice {
            kind,
            link: format!("{}/deployments/{id}", self.dashboard_url),
            app_url: self
                .app_urls
                .get(deployment.app.as_str())
                .cloned()
                .unwrap_or_default(),
            deployment,
            failed_stage,
            live,
        })
    }
}

/// The last `lines` lines of `log`.
pub fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `attempt` up to `TRIES` times, each cut off after `TIMEOUT`, pausing (0.5 s, 1 s)
/// between tries; `None` (with a warning) when every try failed or the receiver refused.
pub async fn with_retries<T, F, Fut>(
    notifier: &str,
    what: &str,
    deployment_id: DeploymentId,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, NotifyError>>,
{
    let mut backoff = FIRST_BACKOFF;
    for try_number in 1..=TRIES {
        let result = tokio::time::timeout(TIMEOUT, attempt())
            .await
            .unwrap_or_else(|_| {
                Err(NotifyError::Retryable(format!(
                    "no answer within {} s",
                    TIMEOUT.as_secs()
                )))
            });
        match result {
            Ok(value) => return Some(value),
            Err(NotifyError::Retryable(reason)) if try_number < TRIES => {
                tracing::info!(notifier, what, %deployment_id, try_number, error = %reason, "notification failed; trying again");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(err) => {
                tracing::warn!(notifier, what, %deployment_id, tries = try_number, error = %err, "notification not delivered");
                return None;
            }
        }
    }
    None
}

/// `Retryable` for statuses worth another try (429, 5xx), `Rejected` for the rest.
pub fn status_error(receiver: &str, status: u16, detail: &str) -> NotifyError {
    let detail: String = detail.chars().take(200).collect();
    let message = format!("{receiver} answered {status}: {}", detail.trim());
    if status == 429 || status >= 500 {
        NotifyError::Retryable(message)
    } else {
        NotifyError::Rejected(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_tail_is_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_three_times_with_backoff_and_stops_on_a_refusal() {
        let tries = AtomicU32::new(0);
        let delivered = with_retries("test", "message", DeploymentId::new(1), || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(NotifyError::Retryable("500".into())),
                _ => Ok("ok"),
            }
        })
        .await;
        assert_eq!(delivered, Some("ok"));
        assert_eq!(tries.load(Ordering::SeqCst), 3);

        let tries = AtomicU32::new(0);
        let refused: Option<()> = with_retries("test", "message", DeploymentId::new(1), || async {
            tries.fetch_add(1, Ordering::SeqCst);
            Err(NotifyError::Rejected("404".into()))
        })
        .await;
        assert_eq!((refused, tries.load(Ordering::SeqCst)), (None, 1));

        // A receiver that never answers costs TRIES timeouts plus the pauses, then gives up.
        let started = tokio::time::Instant::now();
        let hung: Option<()> = with_retries(
            "test",
            "message",
            DeploymentId::new(1),
            std::future::pending,
        )
        .await;
        assert_eq!(hung, None);
        assert_eq!(
            started.elapsed(),
            TIMEOUT * TRIES + FIRST_BACKOFF + FIRST_BACKOFF * 2
        );
    }

    #[test]
    fn only_throttling_and_server_errors_are_retried() {
        assert!(matches!(
            status_error("Slack", 500, ""),
            NotifyError::Retryable(_)
        ));
        assert!(matches!(
            status_error("Slack", 429, ""),
            NotifyError::Retryable(_)
        ));
        assert!(matches!(
            status_error("Slack", 404, "no_service"),
            NotifyError::Rejected(_)
        ));
    }
}
