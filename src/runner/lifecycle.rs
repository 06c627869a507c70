//! CodeDeploy's per-instance lifecycle events, turned into nonstop's stage reports. Pure: no
//! I/O, so recorded AWS answers can be fed straight in by tests.
//!
//! A fleet has many instances but a deployment has one row per hook, so each hook's report
//! folds the instances together:
//! - its **log** has one section per instance (`== i-0abc… (Succeeded)`), each event on a line
//!   with its status, start, end and duration, and for a failed event the agent's diagnostics
//!   (error code, script, message and the script's log tail);
//! - its **status** is the fleet's: `running` once any instance has begun the hook and not
//!   every instance has ended it; once all have ended, `failed` if any failed, else
//!   `succeeded` if any succeeded, else `skipped` — the worst across instances.
//!
//! Events that are not one of nonstop's hook stages are folded into their neighbour: the
//! load-balancer events before the install (BeforeBlockTraffic, BlockTraffic,
//! AfterBlockTraffic) and `Start` into ApplicationStop; those after it (BeforeAllowTraffic,
//! AllowTraffic, AfterAllowTraffic), `End` and any unknown event into ValidateService.

use serde::Deserialize;

use crate::domain::{Hook, StageStatus};

/// `BatchGetDeploymentTargets`' answer, as AWS sends it (JSON 1.1, camelCase, epoch times).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetsResponse {
    #[serde(default)]
    pub deployment_targets: Vec<DeploymentTarget>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentTarget {
    pub deployment_target_type: Option<String>,
    /// Set for EC2/on-premises deployments (the only kind nonstop makes); Lambda and ECS
    /// targets have other fields and are ignored.
    pub instance_target: Option<InstanceTarget>,
}

impl TargetsResponse {
    pub fn instances(&self) -> Vec<InstanceTarget> {
        self.deployment_targets
            .iter()
            .filter_map(|t| t.instance_target.clone())
            .collect()
    }
}

/// One instance of the fleet and its lifecycle events so far.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceTarget {
    /// `i-0abc…` (or an on-premises name).
    pub target_id: String,
    /// Pending, InProgress, Succeeded, Failed, Skipped, Unknown, Ready.
    pub status: Option<String>,
    #[serde(default)]
    pub lifecycle_events: Vec<LifecycleEvent>,
    /// Blue or Green, in blue/green deployments.
    pub instance_label: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleEvent {
    pub lifecycle_event_name: String,
    /// Pending, InProgress, Succeeded, Failed, Skipped, Unknown.
    pub status: Option<String>,
    /// Seconds since the epoch, as AWS JSON sends timestamps.
    pub start_time: Option<f64>,
    pub end_time: Option<f64>,
    pub diagnostics: Option<Diagnostics>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Diagnostics {
    /// Success, ScriptMissing, ScriptNotExecutable, ScriptTimedOut, ScriptFailed, UnknownError.
    pub error_code: Option<String>,
    pub script_name: Option<String>,
    pub message: Option<String>,
    /// The last 4 KB of the script's output, as the agent keeps it.
    pub log_tail: Option<String>,
}

/// What one hook stage shows, for the whole fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageReport {
    pub hook: Hook,
    pub status: StageStatus,
    pub log: String,
}

/// How one event (or one instance's share of a hook) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

impl State {
    fn parse(status: Option<&str>) -> Self {
        match status {
            Some("InProgress") => Self::Running,
            Some("Succeeded") => Self::Succeeded,
            Some("Failed") => Self::Failed,
            Some("Skipped") => Self::Skipped,
            // Pending, Unknown (the agent has not reported yet) and anything new.
            _ => Self::Pending,
        }
    }

    fn is_done(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped)
    }

    /// Several states as one: ended only when all ended; then the worst wins.
    fn combine(states: impl IntoIterator<Item = State>) -> Self {
        let states: Vec<State> = states.into_iter().collect();
        if states.is_empty() {
            return Self::Pending;
        }
        if states.iter().all(|s| s.is_done()) {
            if states.contains(&Self::Failed) {
                Self::Failed
            } else if states.contains(&Self::Succeeded) {
                Self::Succeeded
            } else {
                Self::Skipped
            }
        } else if states.iter().any(|s| *s != Self::Pending) {
            Self::Running
        } else {
            Self::Pending
        }
    }

    fn stage_status(self) -> StageStatus {
        match self {
            Self::Pending => StageStatus::Pending,
            Self::Running => StageStatus::Running,
            Self::Succeeded => StageStatus::Succeeded,
            Self::Failed => StageStatus::Failed,
            Self::Skipped => StageStatus::Skipped,
        }
    }
}

/// The hook stage an event is reported under (see the module doc for the folding).
pub fn stage_of(event: &str) -> Hook {
    if let Some(hook) = Hook::parse(event) {
        return hook;
    }
    match event {
        "Start" | "BeforeBlockTraffic" | "BlockTraffic" | "AfterBlockTraffic" => {
            Hook::ApplicationStop
        }
        _ => Hook::ValidateService,
    }
}

/// One report per hook, in CodeDeploy's order, for the fleet as `instances` describe it.
pub fn stage_reports(instances: &[InstanceTarget]) -> Vec<StageReport> {
    Hook::ALL
        .iter()
        .map(|&hook| {
            let mut log = String::new();
            let mut states = Vec::with_capacity(instances.len());
            for instance in instances {
                let events: Vec<&LifecycleEvent> = instance
                    .lifecycle_events
                    .iter()
                    .filter(|e| stage_of(&e.lifecycle_event_name) == hook)
                    .collect();
                let state =
                    State::combine(events.iter().map(|e| State::parse(e.status.as_deref())));
                states.push(state);
                log.push_str(&instance_section(instance, &events, state));
            }
            StageReport {
                hook,
                status: State::combine(states).stage_status(),
                log,
            }
        })
        .collect()
}

fn instance_section(instance: &InstanceTarget, events: &[&LifecycleEvent], state: State) -> String {
    let label = instance
        .instance_label
        .as_deref()
        .map(|l| format!(", {l}"))
        .unwrap_or_default();
    let mut text = format!(
        "== {} ({}{label})\n",
        instance.target_id,
        state.stage_status()
    );
    if events.is_empty() {
        text.push_str("no event reported yet\n");
    }
    for event in events {
        text.push_str(&format!(
            "{} {}",
            event.lifecycle_event_name,
            event.status.as_deref().unwrap_or("Unknown")
        ));
        if let Some(start) = event.start_time {
            text.push_str(&format!(" {}", timestamp(start)));
            if let Some(end) = event.end_time {
                text.push_str(&format!(
                    " → {} ({:.1} s)",
                    timestamp(end),
                    (end - start).max(0.0)
                ));
            }
        }
        text.push('\n');
        // The agent reports diagnostics on every event it ran; only a failure's are news.
        if let Some(d) = &event.diagnostics
            && d.error_code.as_deref().is_some_and(|c| c != "Success")
        {
            text.push_str(&format!(
                "{} in {}: {}\n",
                d.error_code.as_deref().unwrap_or("UnknownError"),
                d.script_name.as_deref().unwrap_or("(no script)"),
                d.message.as_deref().unwrap_or("no message").trim()
            ));
            if let Some(tail) = d.log_tail.as_deref().filter(|t| !t.trim().is_empty()) {
                text.push_str("--- log tail ---\n");
                text.push_str(tail.trim_end());
                text.push_str("\n---\n");
            }
        }
    }
    text
}

fn timestamp(epoch: f64) -> String {
    chrono::DateTime::from_timestamp_millis((epoch * 1000.0).round() as i64)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| format!("{epoch}"))
}

/// The first failed event of the fleet, as one line: why the deployment failed, in the
/// agent's words (`i-0abc ValidateService ScriptFailed in deploy.sh: …`).
pub fn first_failure(instances: &[InstanceTarget]) -> Option<(Hook, String)> {
    instances.iter().find_map(|instance| {
        instance
            .lifecycle_events
            .iter()
            .find(|e| e.status.as_deref() == Some("Failed"))
            .map(|event| {
                let detail = event
                    .diagnostics
                    .as_ref()
                    .map(|d| {
                        format!(
                            " {} in {}: {}",
                            d.error_code.as_deref().unwrap_or("UnknownError"),
                            d.script_name.as_deref().unwrap_or("(no script)"),
                            d.message.as_deref().unwrap_or("no message").trim()
                        )
                    })
                    .unwrap_or_default();
                (
                    stage_of(&event.lifecycle_event_name),
                    format!(
                        "{} {}{detail}",
                        instance.target_id, event.lifecycle_event_name
                    ),
                )
            })
    })
}

/// Converts the SDK's instance target (BatchGetDeploymentTargets) into the plain model.
pub fn from_sdk_target(target: &aws_sdk_codedeploy::types::InstanceTarget) -> InstanceTarget {
    InstanceTarget {
        target_id: target.target_id().unwrap_or("unknown").to_owned(),
        status: target.status().map(|s| s.as_str().to_owned()),
        lifecycle_events: target
            .lifecycle_events()
            .iter()
            .map(from_sdk_event)
            .collect(),
        instance_label: target.instance_label().map(|l| l.as_str().to_owned()),
    }
}

/// Converts the SDK's instance summary (the older BatchGetDeploymentInstances) likewise.
// Deprecated by AWS in favour of targets; kept as the fallback where targets are unavailable.
#[allow(deprecated)]
pub fn from_sdk_instance(summary: &aws_sdk_codedeploy::types::InstanceSummary) -> InstanceTarget {
    InstanceTarget {
        target_id: summary
            .instance_id()
            .map(short_instance_id)
            .unwrap_or("unknown")
            .to_owned(),
        status: summary.status().map(|s| s.as_str().to_owned()),
        lifecycle_events: summary
            .lifecycle_events()
            .iter()
            .map(from_sdk_event)
            .collect(),
        instance_label: summary.instance_type().map(|t| t.as_str().to_owned()),
    }
}

/// ListDeploymentInstances names instances by ARN; the id is the last part.
fn short_instance_id(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

fn from_sdk_event(event: &aws_sdk_codedeploy::types::LifecycleEvent) -> LifecycleEvent {
    let seconds = |t: &aws_smithy_types::DateTime| t.as_secs_f64();
    LifecycleEvent {
        lifecycle_event_name: event.lifecycle_event_name().unwrap_or("Unknown").to_owned(),
        status: event.status().map(|s| s.as_str().to_owned()),
        start_time: event.start_time().map(seconds),
        end_time: event.end_time().map(seconds),
        diagnostics: event.diagnostics().map(|d| Diagnostics {
            error_code: d.error_code().map(|c| c.as_str().to_owned()),
            script_name: d.script_name().map(str::to_owned),
            message: d.message().map(str::to_owned),
            log_tail: d.log_tail().map(str::to_owned),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, status: &str) -> LifecycleEvent {
        LifecycleEvent {
            lifecycle_event_name: name.into(),
            status: Some(status.into()),
            start_time: Some(1_764_079_200.0),
            end_time: (status != "InProgress" && status != "Pending").then_some(1_764_079_202.5),
            diagnostics: None,
        }
    }

    fn instance(id: &str, events: &[(&str, &str)]) -> InstanceTarget {
        InstanceTarget {
            target_id: id.into(),
            status: None,
            lifecycle_events: events.iter().map(|(n, s)| event(n, s)).collect(),
            instance_label: None,
        }
    }

    fn status_of(reports: &[StageReport], hook: Hook) -> StageStatus {
        reports.iter().find(|r| r.hook == hook).unwrap().status
    }

    #[test]
    fn a_hook_runs_until_every_instance_ended_it_and_the_worst_wins() {
        let fleet = [
            instance(
                "i-1",
                &[
                    ("ApplicationStop", "Succeeded"),
                    ("DownloadBundle", "Failed"),
                ],
            ),
            instance(
                "i-2",
                &[
                    ("ApplicationStop", "InProgress"),
                    ("DownloadBundle", "Pending"),
                ],
            ),
        ];
        let reports = stage_reports(&fleet);
        assert_eq!(reports.len(), Hook::ALL.len());
        assert_eq!(
            status_of(&reports, Hook::ApplicationStop),
            StageStatus::Running
        );
        assert_eq!(
            status_of(&reports, Hook::DownloadBundle),
            StageStatus::Running
        );
        assert_eq!(status_of(&reports, Hook::Install), StageStatus::Pending);

        let fleet = [
            instance(
                "i-1",
                &[
                    ("ApplicationStop", "Succeeded"),
                    ("DownloadBundle", "Failed"),
                ],
            ),
            instance(
                "i-2",
                &[
                    ("ApplicationStop", "Skipped"),
                    ("DownloadBundle", "Succeeded"),
                ],
            ),
        ];
        let reports = stage_reports(&fleet);
        assert_eq!(
            status_of(&reports, Hook::ApplicationStop),
            StageStatus::Succeeded
        );
        assert_eq!(
            status_of(&reports, Hook::DownloadBundle),
            StageStatus::Failed
        );
        let log = &reports[1].log;
        assert!(log.contains("== i-1 (failed)\nDownloadBundle Failed 2025-11-25T14:00:00.000Z → 2025-11-25T14:00:02.500Z (2.5 s)\n"), "{log}");
        assert!(log.contains("== i-2 (succeeded)\n"), "{log}");
    }

    #[test]
    fn traffic_events_fold_into_the_neighbouring_stage() {
        assert_eq!(stage_of("BlockTraffic"), Hook::ApplicationStop);
        assert_eq!(stage_of("AllowTraffic"), Hook::ValidateService);
        assert_eq!(stage_of("Install"), Hook::Install);
        let fleet = [instance(
            "i-1",
            &[("ValidateService", "Succeeded"), ("AllowTraffic", "Failed")],
        )];
        let reports = stage_reports(&fleet);
        assert_eq!(
            status_of(&reports, Hook::ValidateService),
            StageStatus::Failed
        );
        assert!(
            reports[6].log.contains("AllowTraffic Failed"),
            "{}",
            reports[6].log
        );
    }

    #[test]
    fn no_instances_means_every_hook_is_pending() {
        let reports = stage_reports(&[]);
        assert!(
            reports
                .iter()
                .all(|r| r.status == StageStatus::Pending && r.log.is_empty())
        );
        assert_eq!(first_failure(&[]), None);
    }
}
