//! Recovery at start: what the last stop cut short is marked `interrupted`, announced, and
//! undone before the app's queue runs again — traffic that an interrupted deployment moved
//! goes back (through `traffic`) to the instance it came from when that one still answers,
//! and what the deployment started is stopped by its runner. Never stops the live instance,
//! and never leaves an app half-switched: when the way back is gone, traffic stays.

use std::collections::HashMap;
use std::path::Path;

use tokio::task::JoinHandle;

use crate::apps::{App, Apps};
use crate::db::{self, Db, DbError, Deployment};
use crate::domain::{DeploymentId, DeploymentStatus};
use crate::events::{Bus, Event};
use crate::runner::Interrupted;
use crate::traffic::{Traffic, TrafficError};

/// A deployment the last stop cut short, as the record had it.
pub struct Cut {
    pub deployment: Deployment,
    /// A hook that starts instances (AfterInstall or later) had begun.
    pub started_instances: bool,
}

/// Marks every deployment that was running when the server went away `interrupted`, and
/// removes the bundles they were writing. Runs before anything else touches the record.
pub async fn mark_interrupted(db: &Db, data_dir: &Path) -> Result<Vec<Cut>, DbError> {
    remove_leftover_bundles(&data_dir.join("tmp"));
    let cut: Vec<Cut> = db
        .call(db::interrupt_running)
        .await?
        .into_iter()
        .map(|(deployment, started_instances)| Cut {
            deployment,
            started_instances,
        })
        .collect();
    if !cut.is_empty() {
        let ids: Vec<_> = cut.iter().map(|c| c.deployment.id).collect();
        tracing::warn!(deployments = ?ids, "marked deployments interrupted by the last stop");
    }
    Ok(cut)
}

/// Reports what the last stop cut short as ended (GitHub's `in_progress` must not stay
/// forever); call once the notifiers listen.
pub fn announce(bus: &Bus, cut: &[Cut]) {
    for Cut { deployment, .. } in cut {
        bus.publish(Event::Deployment {
            id: deployment.id,
            app: deployment.app.to_string(),
            status: DeploymentStatus::Interrupted,
            version: deployment.version.clone().unwrap_or_default(),
        });
    }
}

/// Puts each app back where it was before the deployments the last stop cut short, in the
/// background (the server answers meanwhile). Returns, per app, the task its queue must
/// wait for, so no new deployment races the clean-up.
pub fn undo(apps: &Apps, cut: Vec<Cut>, traffic: &Traffic) -> HashMap<String, JoinHandle<()>> {
    let mut by_app: HashMap<String, Vec<Cut>> = HashMap::new();
    for c in cut {
        by_app
            .entry(c.deployment.app.to_string())
            .or_default()
            .push(c);
    }
    by_app
        .into_iter()
        .filter_map(|(name, cut)| {
            let app = apps.get(&name)?.clone();
            let traffic = traffic.clone();
            let task = tokio::spawn(async move {
                for c in cut {
                    put_back(&traffic, &app, c).await;
                }
            });
            Some((name, task))
        })
        .collect()
}

/// Undoes one deployment cut short (by a stop, or cancelled): traffic it moved goes back,
/// then what it started is stopped. Whatever still serves traffic is never stopped.
pub async fn put_back(traffic: &Traffic, app: &App, cut: Cut) {
    if move_traffic_back(traffic, app, cut.deployment.id).await {
        stop_half_started(app, cut).await;
    }
}

/// When the interrupted deployment `id` had moved traffic (its last switch is still live),
/// moves it back to where it came from. False when it stays, because the instance it came
/// from no longer answers: the live instance is then kept, whoever started it.
async fn move_traffic_back(traffic: &Traffic, app: &App, id: DeploymentId) -> bool {
    let moved = match traffic.last_switch_of(id).await {
        Ok(Some(moved)) if app.switch.live() == Some(moved.to_port) => moved,
        Ok(_) => return true,
        Err(err) => {
            tracing::error!(deployment_id = %id, error = %err, "could not read the switches of an interrupted deployment");
            return false;
        }
    };
    let Some(from) = moved.from_port else {
        tracing::warn!(deployment_id = %id, app = %app.config.name, port = moved.to_port, "an interrupted deployment made the first switch: traffic stays");
        return false;
    };
    match traffic.go_live(app, from, None).await {
        Ok(_) => {
            tracing::info!(deployment_id = %id, app = %app.config.name, port = from, "moved traffic back from an interrupted deployment");
            true
        }
        Err(TrafficError::Unhealthy { .. }) => {
            tracing::warn!(deployment_id = %id, app = %app.config.name, port = moved.to_port, "an interrupted deployment moved traffic and the instance before it is gone: traffic stays");
            false
        }
        // The switch happened; only its record is missing, and the instance it left is idle.
        Err(TrafficError::Record { .. }) => true,
        Err(err) => {
            tracing::error!(deployment_id = %id, app = %app.config.name, port = from, error = %err, "could not move traffic back from an interrupted deployment");
            false
        }
    }
}

/// Stops what an interrupted deployment may have started on the idle port, or on a fleet.
async fn stop_half_started(app: &App, cut: Cut) {
    let Cut {
        deployment,
        started_instances,
    } = cut;
    // Hooks start instances, and CodeDeploy deploys, only from a stored bundle.
    // Cleaning up stops instances, it starts none: the app's own env is of no use to it.
    let env = Default::default();
    let Some(job) = crate::pipeline::stored_job(&deployment, &app.config, env) else {
        tracing::info!(deployment_id = %deployment.id, "cut short before its bundle was stored: nothing to clean up");
        return;
    };
    let record = Interrupted {
        started_instances,
        runner_ref: deployment.runner_ref.as_deref(),
    };
    match app.runner.clean_up_interrupted(&job, record).await {
        Ok(log) => {
            tracing::info!(deployment_id = %job.deployment_id, output = %log.trim(), "cleaned up after an interrupted deployment")
        }
        Err(err) => {
            tracing::warn!(deployment_id = %job.deployment_id, error = %err, "could not clean up after an interrupted deployment")
        }
    }
}

/// Bundles being written when the last stop came (in `tmp`, which only in-flight
/// deployments use) are of no use to anyone now.
fn remove_leftover_bundles(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "zip") && path.is_file() {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a bundle left by the last stop")
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "could not remove a leftover bundle")
                }
            }
        }
    }
}
