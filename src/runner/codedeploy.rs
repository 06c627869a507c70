//! The AWS CodeDeploy runner: the fleet is the deployment target. It asks CodeDeploy to
//! deploy the bundle the S3 store holds (CreateDeployment: the app's application and
//! deployment group, an S3 zip revision pinned by eTag/version), then follows the deployment
//! until it ends — GetDeployment for the overall status, ListDeploymentTargets and
//! BatchGetDeploymentTargets for each instance's lifecycle events (ListDeploymentInstances and
//! BatchGetDeploymentInstances where targets are unavailable) — and reports them as the same
//! hook stages the local runner makes, folded per hook across instances as
//! `runner::lifecycle` describes (one log section per instance, the worst status wins).
//!
//! A deployment AWS reports Failed or Stopped ends failed with AWS's reason
//! (`errorInformation`, and the failing instance's diagnostics). Throttling and transient
//! errors are retried with backoff; a poll that still fails is tried again at the next tick.
//! When the runner's future is dropped (shutdown, cancel) it asks AWS to stop the
//! deployment (StopDeployment, best effort, spawned). It never edits traffic itself and never
//! logs a credential.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_codedeploy::Client;
use aws_sdk_codedeploy::types::{
    AutoRollbackConfiguration, AutoRollbackEvent, BundleType, DeploymentStatus, FileExistsBehavior,
    RevisionLocation, RevisionLocationType, S3Location,
};
use tokio::time::Instant;

use super::appspec::MAX_HOOK_TIMEOUT_SECS;
use super::lifecycle::{self, InstanceTarget, StageReport};
use super::step::{self, Done, Failed};
use super::{Interrupted, Job, Progress, Runner, RunnerError};
use crate::aws::{self, AwsFailure, Backoff, Endpoint, FailureKind, Timeouts};
use crate::config::{AppConfig, RunnerConfig};
use crate::domain::{DeploymentId, Hook, StageStatus};
use crate::store::StoreError;
use crate::store::s3::S3Store;

/// What a CodeDeploy deployment can fail with, in one line.
#[derive(Debug, thiserror::Error)]
pub enum CodeDeployError {
    /// The bundle is not in S3 as recorded.
    #[error(transparent)]
    Bundle(#[from] StoreError),
    #[error("CreateDeployment for application `{application}`, group `{group}`: {failure}")]
    Create {
        application: String,
        group: String,
        failure: AwsFailure,
    },
    #[error("CreateDeployment answered without a deployment id")]
    NoDeploymentId,
    /// It ended other than succeeded, or nonstop stopped following it; `event` is the
    /// fleet's first failed lifecycle event.
    #[error("{}", ended_reason(.deployment_id, .standing, .event.as_deref()))]
    Ended {
        deployment_id: String,
        standing: Standing,
        event: Option<String>,
    },
    #[error("deployment {deployment}: could not look for its CodeDeploy deployment: {failure}")]
    LookUp {
        deployment: DeploymentId,
        failure: AwsFailure,
    },
    #[error("deployment {deployment}: could not stop {aws_id}: {failure}")]
    Stop {
        deployment: DeploymentId,
        aws_id: String,
        failure: AwsFailure,
    },
}

/// AWS's reason and the failed event, else the bare fact.
fn ended_reason(deployment_id: &str, standing: &Standing, event: Option<&str>) -> String {
    match (standing.error(), event) {
        (Some(error), Some(event)) => format!("{error} ({event})"),
        (Some(error), None) => error,
        (None, Some(event)) => event.to_owned(),
        (None, None) => format!("deployment {deployment_id} ended {}", standing.word()),
    }
}

/// What `nonstop.toml` says about an app's CodeDeploy runner.
#[derive(Clone, Debug)]
pub struct CodeDeploySettings {
    pub application: String,
    pub group: String,
    pub deployment_config: Option<String>,
    /// `DISALLOW`, `OVERWRITE` or `RETAIN` (validated by config).
    pub file_exists_behavior: Option<String>,
    /// Let CodeDeploy redeploy the last good revision when this deployment fails or stops.
    pub auto_rollback: bool,
    /// How long a deployment may take, queueing included, before nonstop stops it.
    pub timeout: Duration,
    pub endpoint: Endpoint,
}

impl CodeDeploySettings {
    /// The settings of a `codedeploy` runner; `None` for any other kind.
    pub fn from_app(app: &AppConfig) -> Option<Self> {
        match &app.runner {
            RunnerConfig::CodeDeploy {
                application,
                group,
                deployment_config,
                file_exists_behavior,
                auto_rollback,
                endpoint,
                region,
                timeout_secs,
                ..
            } => Some(Self {
                application: application.clone(),
                group: group.clone(),
                deployment_config: deployment_config.clone(),
                file_exists_behavior: file_exists_behavior.clone(),
                auto_rollback: *auto_rollback,
                // Every hook may take its whole timeout; queueing and the agent's own steps
                // get ten minutes more.
                timeout: Duration::from_secs(timeout_secs.unwrap_or_else(|| {
                    app.hook_timeout_secs.min(MAX_HOOK_TIMEOUT_SECS) * Hook::ALL.len() as u64 + 600
                })),
                endpoint: Endpoint {
                    region: region.clone(),
                    url: endpoint.clone(),
                },
            }),
            RunnerConfig::Local { .. } => None,
        }
    }
}

pub struct CodeDeployRunner {
    client: Client,
    settings: CodeDeploySettings,
    store: Arc<S3Store>,
    poll_interval: Duration,
}

/// Where per-instance detail comes from; CodeDeploy's newer target API first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Detail {
    Targets,
    Instances,
    Unavailable,
}

/// How per-instance detail is being asked for, from one poll to the next.
struct Following {
    source: Detail,
    /// Failures of `source` in a row.
    failures: u32,
    /// Why detail stopped coming, for the stage log.
    note: Option<String>,
}

/// What following a deployment ended with.
struct Followed {
    standing: Standing,
    /// The last per-instance detail that came.
    instances: Option<Vec<InstanceTarget>>,
    note: Option<String>,
}

/// The overall state of a deployment, from GetDeployment.
#[derive(Clone, Debug, PartialEq)]
pub struct Overall {
    pub status: DeploymentStatus,
    /// AWS's `errorInformation`, as `code: message`.
    pub error: Option<String>,
}

impl Overall {
    fn is_done(&self) -> bool {
        matches!(
            self.status,
            DeploymentStatus::Succeeded | DeploymentStatus::Failed | DeploymentStatus::Stopped
        )
    }
}

/// Where a deployment stands once nonstop stops following it: as AWS says, or one of the
/// two ends nonstop adds.
#[derive(Clone, Debug, PartialEq)]
pub enum Standing {
    Aws(Overall),
    /// Not finished at nonstop's timeout; nonstop asked CodeDeploy to stop it.
    TimedOut {
        status: DeploymentStatus,
        after: Duration,
    },
    /// GetDeployment kept failing, or failed in a way that will not pass.
    Lost(AwsFailure),
}

impl Standing {
    fn succeeded(&self) -> bool {
        matches!(self, Self::Aws(overall) if overall.status == DeploymentStatus::Succeeded)
    }

    /// The status the stage log shows: AWS's, or nonstop's own word for its two ends.
    fn word(&self) -> &str {
        match self {
            Self::Aws(overall) => overall.status.as_str(),
            Self::TimedOut { .. } => "TimedOut",
            Self::Lost(_) => "Unknown",
        }
    }

    fn error(&self) -> Option<String> {
        match self {
            Self::Aws(overall) => overall.error.clone(),
            Self::TimedOut { status, after } => Some(format!(
                "still {} after {} s; asked CodeDeploy to stop it",
                status.as_str(),
                after.as_secs()
            )),
            Self::Lost(failure) => Some(format!("lost track of the deployment: {failure}")),
        }
    }
}

/// Asks AWS to stop the deployment if the runner is dropped while following it.
struct StopOnDrop {
    client: Client,
    deployment_id: String,
    armed: bool,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (client, id) = (self.client.clone(), self.deployment_id.clone());
        // Outside a runtime (process exit) there is nobody to send it: best effort.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            tracing::warn!(aws_deployment_id = %id, "deployment abandoned: asking CodeDeploy to stop it");
            runtime.spawn(async move { stop(&client, &id).await });
        }
    }
}

async fn stop(client: &Client, deployment_id: &str) {
    match client
        .stop_deployment()
        .deployment_id(deployment_id)
        .send()
        .await
    {
        Ok(answer) => tracing::info!(
            aws_deployment_id = deployment_id,
            status = answer.status().map(|s| s.as_str()).unwrap_or("unknown"),
            "asked CodeDeploy to stop the deployment"
        ),
        Err(err) => tracing::warn!(
            aws_deployment_id = deployment_id,
            error = %aws::classify(&err),
            "could not stop the CodeDeploy deployment"
        ),
    }
}

/// How nonstop describes its CodeDeploy deployments; the version makes it unique.
fn description_of(job: &Job) -> String {
    format!(
        "nonstop deployment {} of {} {}",
        job.deployment_id, job.app.name, job.version
    )
}

impl CodeDeployRunner {
    /// The CodeDeploy deployment made for `job` whose id never reached the record (the stop
    /// came while CreateDeployment was on its way): found by its description among the
    /// group's unfinished deployments.
    async fn find_unrecorded(&self, job: &Job) -> Result<Option<String>, AwsFailure> {
        let listed = self
            .client
            .list_deployments()
            .application_name(&self.settings.application)
            .deployment_group_name(&self.settings.group)
            .set_include_only_statuses(Some(vec![
                DeploymentStatus::Created,
                DeploymentStatus::Queued,
                DeploymentStatus::InProgress,
                DeploymentStatus::Ready,
            ]))
            .send()
            .await
            .map_err(|err| aws::classify(&err))?;
        let description = description_of(job);
        // BatchGetDeployments takes 25 ids at a time.
        for ids in listed.deployments().chunks(25) {
            let found = self
                .client
                .batch_get_deployments()
                .set_deployment_ids(Some(ids.to_vec()))
                .send()
                .await
                .map_err(|err| aws::classify(&err))?;
            if let Some(info) = found
                .deployments_info()
                .iter()
                .find(|info| info.description() == Some(description.as_str()))
            {
                return Ok(info.deployment_id().map(str::to_owned));
            }
        }
        Ok(None)
    }

    pub async fn new(settings: CodeDeploySettings, store: Arc<S3Store>) -> Self {
        let sdk = aws::sdk_config(&settings.endpoint, Timeouts::CONTROL).await;
        Self {
            client: Client::new(&sdk),
            settings,
            store,
            poll_interval: Duration::from_secs(3),
        }
    }

    /// How often the deployment is polled (tests poll faster).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    async fn create(&self, job: &Job) -> Result<String, CodeDeployError> {
        let object = self
            .store
            .locate(&job.bundle.key, &job.bundle.sha256)
            .await?;
        let location = S3Location::builder()
            .bucket(&object.bucket)
            .key(&object.key)
            .bundle_type(BundleType::Zip)
            .set_e_tag(object.e_tag.clone())
            .set_version(object.version_id.clone())
            .build();
        let revision = RevisionLocation::builder()
            .revision_type(RevisionLocationType::S3)
            .s3_location(location)
            .build();
        let description = description_of(job);
        // Throttling only: a create that may have reached AWS must not be sent twice.
        let created = aws::retry(
            Backoff::POLL,
            |err: &AwsFailure| err.kind == FailureKind::Throttled,
            || async {
                let mut request = self
                    .client
                    .create_deployment()
                    .application_name(&self.settings.application)
                    .deployment_group_name(&self.settings.group)
                    .revision(revision.clone())
                    .description(&description)
                    .set_deployment_config_name(self.settings.deployment_config.clone());
                if let Some(behavior) = &self.settings.file_exists_behavior {
                    request =
                        request.file_exists_behavior(FileExistsBehavior::from(behavior.as_str()));
                }
                request = request.auto_rollback_configuration(
                    AutoRollbackConfiguration::builder()
                        .enabled(self.settings.auto_rollback)
                        .events(AutoRollbackEvent::DeploymentFailure)
                        .events(AutoRollbackEvent::DeploymentStopOnRequest)
                        .build(),
                );
                request.send().await.map_err(|err| aws::classify(&err))
            },
        )
        .await
        .map_err(|failure| CodeDeployError::Create {
            application: self.settings.application.clone(),
            group: self.settings.group.clone(),
            failure,
        })?;
        created
            .deployment_id()
            .map(str::to_owned)
            .ok_or(CodeDeployError::NoDeploymentId)
    }

    async fn overall(&self, deployment_id: &str) -> Result<Overall, AwsFailure> {
        let answer = aws::retry(
            Backoff::POLL,
            |err: &AwsFailure| err.kind.is_retryable(),
            || async {
                self.client
                    .get_deployment()
                    .deployment_id(deployment_id)
                    .send()
                    .await
                    .map_err(|err| aws::classify(&err))
            },
        )
        .await?;
        let info = answer.deployment_info();
        let status = info
            .and_then(|i| i.status())
            .cloned()
            .unwrap_or(DeploymentStatus::Created);
        let error = info.and_then(|i| i.error_information()).and_then(|e| {
            let code = e.code().map(|c| c.as_str());
            let message = e.message();
            match (code, message) {
                (None, None) => None,
                (code, message) => Some(format!(
                    "{}{}",
                    code.map(|c| format!("{c}: ")).unwrap_or_default(),
                    message.unwrap_or("no message")
                )),
            }
        });
        Ok(Overall { status, error })
    }

    /// Each instance's lifecycle events, from the targets API (paged; 25 per batch).
    async fn targets(&self, deployment_id: &str) -> Result<Vec<InstanceTarget>, AwsFailure> {
        let mut ids = Vec::new();
        let mut token = None;
        // Bounded: 20 pages is thousands of instances.
        for _ in 0..20 {
            let page = self
                .client
                .list_deployment_targets()
                .deployment_id(deployment_id)
                .set_next_token(token.take())
                .customize()
                .config_override(no_retries())
                .send()
                .await
                .map_err(|err| aws::classify(&err))?;
            ids.extend(page.target_ids().iter().cloned());
            match page.next_token() {
                Some(next) => token = Some(next.to_owned()),
                None => break,
            }
        }
        let mut instances = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(25) {
            let batch = self
                .client
                .batch_get_deployment_targets()
                .deployment_id(deployment_id)
                .set_target_ids(Some(chunk.to_vec()))
                .customize()
                .config_override(no_retries())
                .send()
                .await
                .map_err(|err| aws::classify(&err))?;
            instances.extend(
                batch
                    .deployment_targets()
                    .iter()
                    .filter_map(|t| t.instance_target())
                    .map(lifecycle::from_sdk_target),
            );
        }
        Ok(instances)
    }

    /// The same from the older instances API (paged; 100 per batch). AWS deprecated it for
    /// the targets API, but some deployments and emulators only answer this one.
    #[allow(deprecated)]
    async fn instances(&self, deployment_id: &str) -> Result<Vec<InstanceTarget>, AwsFailure> {
        let mut ids = Vec::new();
        let mut token = None;
        for _ in 0..20 {
            let page = self
                .client
                .list_deployment_instances()
                .deployment_id(deployment_id)
                .set_next_token(token.take())
                .customize()
                .config_override(no_retries())
                .send()
                .await
                .map_err(|err| aws::classify(&err))?;
            ids.extend(page.instances_list().iter().cloned());
            match page.next_token() {
                Some(next) => token = Some(next.to_owned()),
                None => break,
            }
        }
        let mut instances = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(100) {
            let batch = self
                .client
                .batch_get_deployment_instances()
                .deployment_id(deployment_id)
                .set_instance_ids(Some(chunk.to_vec()))
                .customize()
                .config_override(no_retries())
                .send()
                .await
                .map_err(|err| aws::classify(&err))?;
            instances.extend(
                batch
                    .instances_summary()
                    .iter()
                    .map(lifecycle::from_sdk_instance),
            );
        }
        Ok(instances)
    }

    /// Per-instance detail with fallback: targets, else instances, else none. A source is
    /// given up after two failures in a row (one may be a blip); throttling never counts.
    async fn detail(
        &self,
        deployment_id: &str,
        following: &mut Following,
    ) -> Option<Vec<InstanceTarget>> {
        let Following {
            source,
            failures,
            note,
        } = following;
        loop {
            let answer = match *source {
                Detail::Targets => self.targets(deployment_id).await,
                Detail::Instances => self.instances(deployment_id).await,
                Detail::Unavailable => return None,
            };
            match answer {
                Ok(instances) => {
                    *failures = 0;
                    return Some(instances);
                }
                Err(failure) if failure.kind == FailureKind::Throttled => return None,
                Err(failure) => {
                    *failures += 1;
                    tracing::debug!(aws_deployment_id = deployment_id, source = ?source, error = %failure, "per-instance detail failed");
                    if *failures < 2 {
                        return None;
                    }
                    *failures = 0;
                    *source = match *source {
                        Detail::Targets => Detail::Instances,
                        _ => Detail::Unavailable,
                    };
                    if *source == Detail::Unavailable {
                        tracing::warn!(aws_deployment_id = deployment_id, error = %failure, "no per-instance lifecycle events from CodeDeploy: following the overall status only");
                        *note = Some(format!(
                            "per-instance lifecycle events unavailable ({failure})"
                        ));
                    }
                }
            }
        }
    }
}

/// Per-instance detail is best effort and asked again at the next poll anyway: one try
/// each, so an API that is missing (some emulators) costs one quick answer, not a backoff.
fn no_retries() -> aws_sdk_codedeploy::config::Builder {
    aws_sdk_codedeploy::config::Builder::default()
        .retry_config(aws_sdk_codedeploy::config::retry::RetryConfig::disabled())
}

/// What has been told to `Progress` so far, so each hook is started and finished once.
#[derive(Default)]
struct Told {
    started: Vec<Hook>,
    finished: Vec<Hook>,
}

impl Told {
    async fn report(&mut self, progress: &dyn Progress, report: &StageReport) {
        if self.finished.contains(&report.hook) || report.status == StageStatus::Pending {
            return;
        }
        if !self.started.contains(&report.hook) {
            progress.stage_started(report.hook.into()).await;
            self.started.push(report.hook);
        }
        if report.status != StageStatus::Running {
            progress
                .stage_finished(report.hook.into(), report.status, &report.log)
                .await;
            self.finished.push(report.hook);
        }
    }
}

/// The reports to give when the deployment has ended, from the last known instance detail.
/// Pure. Hooks still open are closed: on success as succeeded (AWS says the fleet got there;
/// without per-instance detail every hook is so), on failure the first open hook carries
/// AWS's reason and the rest are left unreported, as the local runner leaves them.
fn final_reports(
    instances: Option<&[InstanceTarget]>,
    standing: &Standing,
    deployment_id: &str,
    note: Option<&str>,
) -> (Vec<StageReport>, Option<(Hook, CodeDeployError)>) {
    let mut reports = lifecycle::stage_reports(instances.unwrap_or(&[]));
    let header = format!(
        "CodeDeploy deployment {deployment_id}: {}{}\n{}",
        standing.word(),
        standing
            .error()
            .map(|e| format!(" — {e}"))
            .unwrap_or_default(),
        note.map(|n| format!("{n}\n")).unwrap_or_default()
    );
    if standing.succeeded() {
        for report in &mut reports {
            if matches!(report.status, StageStatus::Pending | StageStatus::Running) {
                report.status = StageStatus::Succeeded;
                report.log.insert_str(0, &header);
            }
        }
        return (reports, None);
    }
    let reason = CodeDeployError::Ended {
        deployment_id: deployment_id.to_owned(),
        standing: standing.clone(),
        event: lifecycle::first_failure(instances.unwrap_or(&[])).map(|(_, event)| event),
    };
    // The hook to blame: the failed one, else the first that did not succeed.
    let blamed = reports
        .iter()
        .find(|r| r.status == StageStatus::Failed)
        .or_else(|| {
            reports
                .iter()
                .find(|r| !matches!(r.status, StageStatus::Succeeded | StageStatus::Skipped))
        })
        .map(|r| r.hook)
        .unwrap_or(Hook::ValidateService);
    let mut open = false;
    for report in &mut reports {
        if report.hook == blamed {
            report.status = StageStatus::Failed;
            report.log.insert_str(0, &header);
            open = true;
        } else if open {
            // After the failure: whatever the instances show, it did not complete.
            if matches!(report.status, StageStatus::Running) {
                report.status = StageStatus::Failed;
            }
        }
    }
    (reports, Some((blamed, reason)))
}

#[async_trait]
impl Runner for CodeDeployRunner {
    async fn clean_up_interrupted(
        &self,
        job: &Job,
        record: Interrupted<'_>,
    ) -> Result<String, RunnerError> {
        // Nothing of a fleet deployment runs on this host. One nonstop no longer follows
        // must not go on unwatched: AWS stops it (rolling back as the group is set to).
        let fail = |error: CodeDeployError| RunnerError {
            stage: Hook::ApplicationStop.into(),
            reason: error.into(),
        };
        let aws_id = match record.runner_ref {
            Some(aws_id) => aws_id.to_owned(),
            // The stop may have come while CreateDeployment was on its way.
            None => match self.find_unrecorded(job).await {
                Ok(Some(aws_id)) => aws_id,
                Ok(None) => {
                    return Ok("no CodeDeploy deployment was created: nothing to stop".into());
                }
                Err(failure) => {
                    return Err(fail(CodeDeployError::LookUp {
                        deployment: job.deployment_id,
                        failure,
                    }));
                }
            },
        };
        let aws_id = aws_id.as_str();
        match self
            .client
            .stop_deployment()
            .deployment_id(aws_id)
            .auto_rollback_enabled(self.settings.auto_rollback)
            .send()
            .await
        {
            Ok(answer) => Ok(format!(
                "asked CodeDeploy to stop {aws_id}: {}",
                answer.status().map(|s| s.as_str()).unwrap_or("no status")
            )),
            Err(err) => {
                let failure = aws::classify(&err);
                if failure.code.as_deref() == Some("DeploymentAlreadyCompletedException") {
                    return Ok(format!("{aws_id} had already ended"));
                }
                Err(fail(CodeDeployError::Stop {
                    deployment: job.deployment_id,
                    aws_id: aws_id.to_owned(),
                    failure,
                }))
            }
        }
    }

    async fn run(&self, job: &Job, progress: &dyn Progress) -> Result<(), RunnerError> {
        let at = |hook: Hook| {
            move |error: CodeDeployError| RunnerError {
                stage: hook.into(),
                reason: error.into(),
            }
        };
        let deployment_id = match self.create(job).await {
            Ok(id) => id,
            // Nothing ran on the fleet: the first hook stage carries why.
            Err(error) => {
                let created = async { Err::<Done<()>, _>(Failed::new(error)) };
                return step::record(progress, Hook::ApplicationStop, created)
                    .await
                    .map_err(at(Hook::ApplicationStop));
            }
        };
        tracing::info!(deployment_id = %job.deployment_id, app = %job.app.name, aws_deployment_id = %deployment_id, application = %self.settings.application, group = %self.settings.group, "CodeDeploy deployment created");
        progress.runner_ref(&deployment_id).await;
        let mut guard = StopOnDrop {
            client: self.client.clone(),
            deployment_id: deployment_id.clone(),
            armed: true,
        };
        let mut told = Told::default();
        let followed = self.follow(&deployment_id, progress, &mut told).await;
        // The deployment ended (or was stopped): nothing to stop on drop any more, except
        // when it was lost, where stopping is the safe side.
        guard.armed = matches!(followed.standing, Standing::Lost(_));
        let (reports, failure) = final_reports(
            followed.instances.as_deref(),
            &followed.standing,
            &deployment_id,
            followed.note.as_deref(),
        );
        for report in &reports {
            told.report(progress, report).await;
        }
        tracing::info!(deployment_id = %job.deployment_id, aws_deployment_id = %deployment_id, status = followed.standing.word(), error = followed.standing.error().as_deref(), "CodeDeploy deployment ended");
        match failure {
            None => Ok(()),
            Some((hook, error)) => Err(at(hook)(error)),
        }
    }
}

impl CodeDeployRunner {
    /// Polls the deployment until it ends, nonstop's timeout passes or it is lost, telling
    /// each hook as the fleet starts and ends it.
    async fn follow(
        &self,
        deployment_id: &str,
        progress: &dyn Progress,
        told: &mut Told,
    ) -> Followed {
        let deadline = Instant::now() + self.settings.timeout;
        let mut following = Following {
            source: Detail::Targets,
            failures: 0,
            note: None,
        };
        let mut instances: Option<Vec<InstanceTarget>> = None;
        let mut overall = Overall {
            status: DeploymentStatus::Created,
            error: None,
        };
        let mut poll_errors = 0u32;
        // Bounded by the deadline; each turn waits `poll_interval`.
        let standing = loop {
            match self.overall(deployment_id).await {
                Ok(now) => {
                    poll_errors = 0;
                    overall = now;
                }
                Err(failure) => {
                    poll_errors += 1;
                    tracing::warn!(aws_deployment_id = %deployment_id, error = %failure, "GetDeployment failed");
                    // Refused credentials or a vanished deployment will not come back.
                    if !failure.kind.is_retryable() || poll_errors >= 5 {
                        break Standing::Lost(failure);
                    }
                }
            }
            if let Some(now) = self.detail(deployment_id, &mut following).await {
                instances = Some(now);
            }
            if overall.is_done() {
                break Standing::Aws(overall);
            }
            if let Some(instances) = &instances {
                for report in lifecycle::stage_reports(instances) {
                    told.report(progress, &report).await;
                }
            }
            if Instant::now() >= deadline {
                stop(&self.client, deployment_id).await;
                break Standing::TimedOut {
                    status: overall.status,
                    after: self.settings.timeout,
                };
            }
            tokio::time::sleep(self.poll_interval.min(deadline - Instant::now())).await;
        };
        Followed {
            standing,
            instances,
            note: following.note,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::lifecycle::LifecycleEvent;

    fn overall(status: &str, error: Option<&str>) -> Standing {
        Standing::Aws(Overall {
            status: status.into(),
            error: error.map(str::to_owned),
        })
    }

    #[test]
    fn a_success_without_instance_detail_closes_every_hook_as_succeeded() {
        let (reports, failure) =
            final_reports(None, &overall("Succeeded", None), "d-1", Some("no detail"));
        assert!(failure.is_none());
        assert!(reports.iter().all(|r| r.status == StageStatus::Succeeded));
        assert!(
            reports[0]
                .log
                .starts_with("CodeDeploy deployment d-1: Succeeded\nno detail\n")
        );
    }

    #[test]
    fn a_failure_blames_the_failed_hook_with_aws_reason() {
        let instances = [InstanceTarget {
            target_id: "i-1".into(),
            lifecycle_events: vec![
                LifecycleEvent {
                    lifecycle_event_name: "ApplicationStop".into(),
                    status: Some("Succeeded".into()),
                    ..Default::default()
                },
                LifecycleEvent {
                    lifecycle_event_name: "DownloadBundle".into(),
                    status: Some("Failed".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }];
        let (reports, failure) = final_reports(
            Some(&instances),
            &overall("Failed", Some("HEALTH_CONSTRAINTS: too many failed")),
            "d-2",
            None,
        );
        let (hook, reason) = failure.unwrap();
        assert_eq!(hook, Hook::DownloadBundle);
        assert_eq!(
            reason.to_string(),
            "HEALTH_CONSTRAINTS: too many failed (i-1 DownloadBundle)"
        );
        assert_eq!(reports[1].status, StageStatus::Failed);
        assert_eq!(reports[2].status, StageStatus::Pending);

        let (_, failure) = final_reports(None, &overall("Stopped", None), "d-3", None);
        let (hook, reason) = failure.unwrap();
        assert_eq!(
            (hook, reason.to_string()),
            (Hook::ApplicationStop, "deployment d-3 ended Stopped".into())
        );
    }
}
