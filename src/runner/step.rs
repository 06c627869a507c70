//! One step of a deployment, recorded the same way wherever it runs: a pipeline stage
//! (Fetch, Build, Bundle, Upload) or a runner's hook. `record` tells its start, does its work
//! and tells its end — succeeded or skipped with its log, or failed with its log — and hands
//! the value or the error on. A step's log (what the dashboard shows under the stage) is kept
//! apart from its error (the one-line reason the deployment ends with). It never decides
//! what a failure means for the deployment: the caller does, with the error it gets back.

use std::fmt::Display;
use std::future::Future;

use async_trait::async_trait;

use super::Progress;
use crate::domain::{Hook, Stage, StageStatus};

/// What hears of a step's start and end: any `Progress` for a runner's hooks, the
/// pipeline's recorder for its own stages.
#[async_trait]
pub trait Steps<S>: Send + Sync {
    async fn step_started(&self, step: S);
    async fn step_finished(&self, step: S, status: StageStatus, log: &str);
}

#[async_trait]
impl<P: Progress + ?Sized> Steps<Hook> for P {
    async fn step_started(&self, hook: Hook) {
        self.stage_started(hook.into()).await;
    }

    async fn step_finished(&self, hook: Hook, status: StageStatus, log: &str) {
        self.stage_finished(hook.into(), status, log).await;
    }
}

#[async_trait]
impl<P: Progress + ?Sized> Steps<Stage> for P {
    async fn step_started(&self, stage: Stage) {
        self.stage_started(stage).await;
    }

    async fn step_finished(&self, stage: Stage, status: StageStatus, log: &str) {
        self.stage_finished(stage, status, log).await;
    }
}

/// A step that ended well: what it made, and its log.
#[derive(Debug)]
pub struct Done<T> {
    pub value: T,
    pub log: String,
    /// It had nothing to do (no script for the hook, no previous revision to stop).
    pub skipped: bool,
}

impl<T> Done<T> {
    pub fn new(value: T, log: impl Into<String>) -> Self {
        Self {
            value,
            log: log.into(),
            skipped: false,
        }
    }

    pub fn skipped(value: T, log: impl Into<String>) -> Self {
        Self {
            skipped: true,
            ..Self::new(value, log)
        }
    }
}

/// A step that failed: its log, recorded with the stage, and its error.
#[derive(Debug)]
pub struct Failed<E> {
    pub log: String,
    pub error: E,
}

impl<E: Display> Failed<E> {
    /// A failure whose whole log is its reason (nothing ran that printed anything).
    pub fn new(error: E) -> Self {
        Self {
            log: format!("{error}\n"),
            error,
        }
    }

    /// A failure after `log`, which ends with the reason's line.
    pub fn after(mut log: String, error: E) -> Self {
        log.push_str(&format!("{error}\n"));
        Self { log, error }
    }
}

impl<E: Display> From<E> for Failed<E> {
    fn from(error: E) -> Self {
        Self::new(error)
    }
}

/// Records `step` around `work`: started, then finished as its outcome says.
pub async fn record<S, T, E>(
    to: &(impl Steps<S> + ?Sized),
    step: S,
    work: impl Future<Output = Result<Done<T>, Failed<E>>>,
) -> Result<T, E>
where
    S: Copy + Send,
{
    to.step_started(step).await;
    finish(to, step, work.await).await
}

/// Records how `step` ended when its start was told already (or needs no telling).
pub async fn finish<S, T, E>(
    to: &(impl Steps<S> + ?Sized),
    step: S,
    outcome: Result<Done<T>, Failed<E>>,
) -> Result<T, E>
where
    S: Copy + Send,
{
    match outcome {
        Ok(done) => {
            let status = if done.skipped {
                StageStatus::Skipped
            } else {
                StageStatus::Succeeded
            };
            to.step_finished(step, status, &done.log).await;
            Ok(done.value)
        }
        Err(failed) => {
            to.step_finished(step, StageStatus::Failed, &failed.log)
                .await;
            Err(failed.error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Heard(Mutex<Vec<(Stage, StageStatus, String)>>);

    #[async_trait]
    impl Progress for Heard {
        async fn stage_started(&self, stage: Stage) {
            self.0
                .lock()
                .unwrap()
                .push((stage, StageStatus::Running, String::new()));
        }
        async fn stage_finished(&self, stage: Stage, status: StageStatus, log: &str) {
            self.0.lock().unwrap().push((stage, status, log.to_owned()));
        }
        async fn target_port(&self, _: u16) {}
        async fn instance_started(&self, _: u16) {}
    }

    #[tokio::test]
    async fn a_step_is_told_started_then_finished_with_its_log_and_its_error_goes_back() {
        let heard = Heard::default();
        let progress: &dyn Progress = &heard;
        let value = record(progress, Hook::Install, async {
            Ok::<_, Failed<String>>(Done::new(3, "copied 3 files\n"))
        })
        .await;
        assert_eq!(value, Ok(3));
        let skipped = record(progress, Hook::BeforeInstall, async {
            Ok::<_, Failed<String>>(Done::skipped((), "no script for this hook\n"))
        })
        .await;
        assert_eq!(skipped, Ok(()));
        let failed: Result<(), _> = record(progress, Hook::AfterInstall, async {
            Err(Failed::after(
                "$ deploy.sh\nstopping\n".into(),
                "exit code 1",
            ))
        })
        .await;
        assert_eq!(failed, Err("exit code 1"));

        let heard = heard.0.into_inner().unwrap();
        let running = StageStatus::Running;
        assert_eq!(
            heard,
            [
                (Stage::Install, running, String::new()),
                (
                    Stage::Install,
                    StageStatus::Succeeded,
                    "copied 3 files\n".into()
                ),
                (Stage::BeforeInstall, running, String::new()),
                (
                    Stage::BeforeInstall,
                    StageStatus::Skipped,
                    "no script for this hook\n".into()
                ),
                (Stage::AfterInstall, running, String::new()),
                (
                    Stage::AfterInstall,
                    StageStatus::Failed,
                    "$ deploy.sh\nstopping\nexit code 1\n".into()
                ),
            ]
        );
    }
}
