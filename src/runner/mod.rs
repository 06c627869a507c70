//! Runners execute a stored bundle's appspec hooks in CodeDeploy's in-place order and report
//! each hook as it starts and ends. `local` runs them on this host, as the CodeDeploy agent
//! would; `codedeploy`, its AWS twin, has a fleet run them. A runner never touches the
//! database: it reports through `Progress`, and the pipeline records; `step` records a hook
//! the way the pipeline records its own stages.

pub mod appspec;
pub mod codedeploy;
pub mod lifecycle;
pub mod local;
pub mod step;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::AppConfig;
use crate::domain::{BundleRef, DeploymentId, Stage, StageStatus};

/// One deployment of one bundle.
#[derive(Clone, Debug)]
pub struct Job {
    pub deployment_id: DeploymentId,
    pub app: Arc<AppConfig>,
    pub version: String,
    /// The commit it deploys, when known (a redeploy of an old record may not say).
    pub commit: Option<String>,
    /// What was live when it started: the app's `release` and `hooks` are told.
    pub previous_version: Option<String>,
    pub bundle: BundleRef,
    /// The app's own env vars for this deployment (this host's hooks and instances get them;
    /// a fleet gets the bundle's `env` and its hosts' own env file).
    pub env: Arc<crate::app_env::AppEnv>,
}

/// How a runner tells the pipeline what happens, as it happens.
#[async_trait]
pub trait Progress: Send + Sync {
    async fn stage_started(&self, stage: Stage);
    async fn stage_finished(&self, stage: Stage, status: StageStatus, log: &str);
    /// Where `stage`'s processes print as they run (already redacted), when anyone listens.
    fn console(&self, stage: Stage) -> Option<Box<dyn crate::process::LineSink>> {
        let _ = stage;
        None
    }
    /// The new version will be started on `port` (known before any hook runs, so that a
    /// restart after a crash knows where to clean up).
    async fn target_port(&self, port: u16);
    /// The new version was started on `port` (it may not be live yet).
    async fn instance_started(&self, port: u16);
    /// What the runner calls this deployment elsewhere (the AWS deployment id), as soon as
    /// it exists: after a stop, `clean_up_interrupted` gets it back.
    async fn runner_ref(&self, reference: &str) {
        let _ = reference;
    }
}

/// What the record says of a deployment the last stop cut short.
#[derive(Clone, Copy, Debug)]
pub struct Interrupted<'a> {
    /// A hook that starts instances (AfterInstall or later) had begun.
    pub started_instances: bool,
    /// The runner's own id for it elsewhere, when one was recorded.
    pub runner_ref: Option<&'a str>,
}

/// A hook that failed, with why (its output is already reported through `Progress`).
#[derive(Debug, thiserror::Error)]
#[error("{stage} failed: {reason}")]
pub struct RunnerError {
    pub stage: Stage,
    pub reason: HookError,
}

/// Why a hook failed, in the words of the runner that ran it.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Local(#[from] local::LocalError),
    #[error(transparent)]
    CodeDeploy(#[from] codedeploy::CodeDeployError),
}

/// Retention on a runner's host that stopped half-way: where, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct PruneError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

#[async_trait]
pub trait Runner: Send + Sync {
    async fn run(&self, job: &Job, progress: &dyn Progress) -> Result<(), RunnerError>;

    /// After nonstop died in the middle of `job`: stops what it may have started, the
    /// instance on the idle port (never the live one) or the deployment elsewhere. Returns
    /// what it did, for the log.
    async fn clean_up_interrupted(
        &self,
        job: &Job,
        record: Interrupted<'_>,
    ) -> Result<String, RunnerError>;

    /// Retention once `job` went live: deletes what the runner keeps on its host of older
    /// deployments beyond the app's limit, never a version in `running` (the instances on
    /// the app's ports). Returns what it deleted. Runners whose hosts keep their own
    /// revisions (the CodeDeploy agent) leave this as is.
    async fn prune(&self, job: &Job, running: &[String]) -> Result<Vec<PathBuf>, PruneError> {
        let _ = (job, running);
        Ok(Vec::new())
    }
}
