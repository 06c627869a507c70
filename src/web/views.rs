//! What the dashboard's templates show, computed from database rows: formatting (relative
//! times, durations, short ids, log tails) lives here, so templates stay plain markup.

use chrono::DateTime;

use crate::db::{Deployment, Live, Lock, StageRow, Switch};
use crate::domain::{DeploymentStatus, StageStatus};
use crate::elapsed;

/// A stage log's last this-many lines are shown on the page; the rest is a link away.
pub const LOG_TAIL_LINES: usize = 200;

/// `2026-11-25 14:03:07 UTC`.
pub fn utc(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// `just now`, `5 s ago`, `3 min ago`, `2 h ago`, `4 days ago`.
pub fn relative(ms: i64, now_ms: i64) -> String {
    let seconds = (now_ms - ms).max(0) / 1000;
    match seconds {
        0..=4 => "just now".into(),
        5..=59 => format!("{seconds} s ago"),
        60..=3599 => format!("{} min ago", seconds / 60),
        3600..=86_399 => format!("{} h ago", seconds / 3600),
        _ => match seconds / 86_400 {
            1 => "1 day ago".into(),
            days => format!("{days} days ago"),
        },
    }
}

/// A moment shown as relative text with the exact UTC time on hover.
#[derive(Clone)]
pub struct When {
    pub ms: i64,
    pub relative: String,
    pub exact: String,
}

impl When {
    pub fn new(ms: i64, now_ms: i64) -> Self {
        Self {
            ms,
            relative: relative(ms, now_ms),
            exact: utc(ms),
        }
    }
}

pub struct DeploymentView {
    pub id: crate::domain::DeploymentId,
    pub app: String,
    pub status: DeploymentStatus,
    pub version: String,
    pub short_sha: String,
    pub message: String,
    pub author: String,
    pub trigger: String,
    pub created: When,
    pub duration: String,
    pub error: String,
    pub port: String,
    pub can_redeploy: bool,
    /// The CI that gated it, in words (`build #12`, `check lint`, `checks test, lint
    /// passed`), and its page when that is an http(s) link.
    pub ci: String,
    pub ci_build_url: String,
    /// While it waits: what for.
    pub waiting_for: String,
    /// The runner's own id for it elsewhere: the AWS CodeDeploy deployment.
    pub runner_ref: String,
}

impl DeploymentView {
    pub fn new(d: &Deployment, now_ms: i64) -> Self {
        let end = d.finished_at.or(d.started_at.map(|_| now_ms));
        Self {
            id: d.id,
            app: d.app.to_string(),
            status: d.status,
            version: d.version.clone().unwrap_or_default(),
            short_sha: d
                .commit_sha
                .as_deref()
                .map(|s| s.chars().take(7).collect())
                .unwrap_or_default(),
            message: d
                .commit_message
                .as_deref()
                .and_then(|m| m.lines().next())
                .unwrap_or_default()
                .to_owned(),
            author: d.author.clone().unwrap_or_default(),
            trigger: d.trigger.to_string(),
            created: When::new(d.created_at, now_ms),
            duration: match (d.started_at, end) {
                (Some(start), Some(end)) => elapsed::human(end - start),
                _ => String::new(),
            },
            error: d.error.clone().unwrap_or_default(),
            port: d.port.map(|p| p.to_string()).unwrap_or_default(),
            can_redeploy: d.bundle.is_some()
                && d.bundle_pruned_at.is_none()
                && d.status.is_finished(),
            ci_build_url: d
                .ci_build_url
                .clone()
                .filter(|url| url.starts_with("https://") || url.starts_with("http://"))
                .unwrap_or_default(),
            ci: ci_words(d),
            waiting_for: match d.status {
                DeploymentStatus::Waiting => d.ci_waiting_for.clone().unwrap_or_default(),
                _ => String::new(),
            },
            runner_ref: d.runner_ref.clone().unwrap_or_default(),
        }
    }
}

/// What CI said of a deployment, in a few words; empty when no CI gated it.
fn ci_words(d: &Deployment) -> String {
    match (&d.ci_check, &d.ci_build_number) {
        (Some(check), _) if d.status == DeploymentStatus::Failed => format!("check {check}"),
        (Some(checks), _) => format!("checks {checks} passed"),
        (None, Some(number)) => format!("build #{number}"),
        (None, None) => String::new(),
    }
}

pub struct StageView {
    pub name: String,
    pub status: StageStatus,
    pub started: Option<When>,
    pub duration: String,
    /// The last `LOG_TAIL_LINES` lines.
    pub tail: String,
    /// How many earlier lines the tail leaves out (0: the whole log is shown).
    pub hidden_lines: usize,
    pub has_log: bool,
}

impl StageView {
    pub fn new(stage: &StageRow, now_ms: i64) -> Self {
        let lines: Vec<&str> = stage.log.lines().collect();
        let hidden_lines = lines.len().saturating_sub(LOG_TAIL_LINES);
        let end = stage
            .finished_at
            .or((stage.status == StageStatus::Running).then_some(now_ms));
        Self {
            name: stage.name.to_string(),
            status: stage.status,
            started: stage.started_at.map(|ms| When::new(ms, now_ms)),
            duration: match (stage.started_at, end) {
                (Some(start), Some(end)) => elapsed::human(end - start),
                _ => String::new(),
            },
            tail: lines[hidden_lines..].join("\n"),
            hidden_lines,
            has_log: !stage.log.is_empty(),
        }
    }
}

pub struct SwitchView {
    pub from_port: String,
    pub to_port: u16,
    pub at: When,
}

impl SwitchView {
    pub fn new(switch: &Switch, now_ms: i64) -> Self {
        Self {
            from_port: switch
                .from_port
                .map(|p| p.to_string())
                .unwrap_or_else(|| "nothing".into()),
            to_port: switch.to_port,
            at: When::new(switch.at, now_ms),
        }
    }
}

pub struct LiveView {
    pub port: u16,
    pub profile: String,
    pub version: String,
    pub since: When,
}

impl LiveView {
    pub fn new(live: &Live, now_ms: i64) -> Self {
        Self {
            port: live.port,
            profile: live.profile.clone(),
            version: live.version.clone().unwrap_or_else(|| "unknown".into()),
            since: When::new(live.since, now_ms),
        }
    }
}

/// An app's lock: who, since when, why.
pub struct LockView {
    pub actor: String,
    pub reason: String,
    pub since: When,
}

impl LockView {
    pub fn new(lock: &Lock, now_ms: i64) -> Self {
        Self {
            actor: lock.actor.clone(),
            reason: lock.reason.clone(),
            since: When::new(lock.locked_at, now_ms),
        }
    }
}

/// The stages of the running deployment as a compact progress strip.
pub struct Progress {
    pub deployment: DeploymentView,
    pub stages: Vec<StageView>,
    pub done: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_like_a_person_would_say_them() {
        let now = 10_000_000_000;
        assert_eq!(relative(now - 1_000, now), "just now");
        assert_eq!(relative(now - 12_000, now), "12 s ago");
        assert_eq!(relative(now - 150_000, now), "2 min ago");
        assert_eq!(relative(now - 7_200_000, now), "2 h ago");
        assert_eq!(relative(now - 86_400_000, now), "1 day ago");
        assert_eq!(relative(now - 3 * 86_400_000, now), "3 days ago");
        assert_eq!(
            relative(now + 5_000, now),
            "just now",
            "a clock a little ahead is not the future"
        );
    }

    #[test]
    fn durations_pick_their_unit() {
        assert_eq!(elapsed::human(850), "850 ms");
        assert_eq!(elapsed::human(12_345), "12.3 s");
        assert_eq!(elapsed::human(125_000), "2 min 5 s");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn long_logs_show_their_tail() {
        let log: String = (1..=250).map(|i| format!("line {i}\n")).collect();
        let stage = StageRow {
            name: crate::domain::Stage::Build,
            status: StageStatus::Failed,
            started_at: Some(0),
            finished_at: Some(1500),
            log,
        };
        let view = StageView::new(&stage, 2000);
        assert_eq!(view.hidden_lines, 50);
        assert!(view.tail.starts_with("line 51\n") && view.tail.ends_with("line 250"));
        assert_eq!(view.duration, "1.5 s");
    }
}
