//! Debug builds only: a place where the fault suite can stop a deployment in the middle of
//! a stage and kill the server there. With `NONSTOP_TEST_HOLD=<Stage>@<deployment id>`, that
//! deployment waits forever once the stage's work is done, just before its end is recorded:
//! whatever the stage did has happened, and the record still says it runs. Release builds
//! compile none of it.

use crate::domain::{DeploymentId, Stage};

pub const HOLD_ENV: &str = "NONSTOP_TEST_HOLD";

#[cfg(debug_assertions)]
pub async fn hold_before_recording_end(deployment_id: DeploymentId, stage: Stage) {
    let asked = std::env::var(HOLD_ENV).is_ok_and(|v| v == format!("{stage}@{deployment_id}"));
    if asked {
        tracing::warn!(%deployment_id, %stage, "{HOLD_ENV}: holding before the end of the stage is recorded");
        std::future::pending::<()>().await;
    }
}

#[cfg(not(debug_assertions))]
pub async fn hold_before_recording_end(_: DeploymentId, _: Stage) {}
