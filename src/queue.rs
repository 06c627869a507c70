//! The deployment queue: a row in SQLite per request, one worker task per app that runs them
//! one at a time. A newer request supersedes a queued one (never a running one). Enqueueing
//! only writes a row and wakes the worker, so a webhook is answered within milliseconds.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::apps::{App, Apps};
use crate::db::{self, CiOutcome, Db, DbError, Enqueued, Unlocked};
use crate::domain::{
    AppName, CiBuild, CommitSha, Delivery, DeploymentId, DeploymentStatus, Trigger,
};
use crate::events::{Bus, Event};
use crate::gate::{Evidence, Required};
use crate::pipeline::Pipeline;

#[derive(Clone)]
pub struct Queue {
    db: Db,
    bus: Bus,
    wake: Arc<HashMap<String, Arc<Notify>>>,
}

impl Queue {
    /// Starts one worker per app; each first waits for its app's task in `before` (the
    /// clean-up after an interrupted deployment), then runs what was left queued.
    pub fn start(
        db: Db,
        bus: Bus,
        pipeline: Pipeline,
        apps: &Apps,
        mut before: HashMap<String, JoinHandle<()>>,
        shutdown: CancellationToken,
    ) -> Self {
        let mut wake = HashMap::new();
        for backends in apps.iter() {
            let notify = Arc::new(Notify::new());
            wake.insert(backends.config.name.to_string(), notify.clone());
            tokio::spawn(worker(
                db.clone(),
                pipeline.clone(),
                backends.clone(),
                before.remove(backends.config.name.as_str()),
                notify,
                shutdown.clone(),
            ));
        }
        Self {
            db,
            bus,
            wake: Arc::new(wake),
        }
    }

    /// Records the deployment and wakes the app's worker.
    pub async fn enqueue(&self, trigger: Trigger) -> Result<Enqueued, DbError> {
        let app = trigger.app.to_string();
        let branch = trigger.branch.clone();
        let enqueued = self
            .db
            .call(move |conn| db::enqueue(conn, &trigger))
            .await?;
        if let Enqueued::New { id, superseded } = &enqueued {
            tracing::info!(deployment_id = %id, app = %app, branch = %branch, "deployment queued");
            for old in superseded {
                self.bus.publish(Event::Deployment {
                    id: *old,
                    app: app.clone(),
                    status: DeploymentStatus::Superseded,
                    version: String::new(),
                });
            }
            self.bus.publish(Event::Deployment {
                id: *id,
                app: app.clone(),
                status: DeploymentStatus::Queued,
                version: String::new(),
            });
            if let Some(notify) = self.wake.get(&app) {
                notify.notify_one();
            }
        }
        if let Enqueued::Held { id, .. } = &enqueued {
            tracing::info!(deployment_id = %id, app = %app, "push waits for the app's lock");
            self.publish_all(&app, &[*id], DeploymentStatus::Waiting);
        }
        Ok(enqueued)
    }

    /// Releases `app`'s lock, and queues the newest push that waited for it (`None`: the
    /// app was not locked).
    pub async fn unlock(&self, app: &AppName) -> Result<Option<Unlocked>, DbError> {
        let name = app.to_string();
        let unlocked = self.db.call(move |conn| db::unlock(conn, &name)).await?;
        if let Some(Unlocked {
            released: Some(id),
            superseded,
            ..
        }) = &unlocked
        {
            let app = app.to_string();
            tracing::info!(deployment_id = %id, app = %app, "unlocked; the newest waiting push is queued");
            self.publish_all(&app, superseded, DeploymentStatus::Superseded);
            self.publish_all(&app, &[*id], DeploymentStatus::Queued);
            if let Some(notify) = self.wake.get(&app) {
                notify.notify_one();
            }
        }
        Ok(unlocked)
    }

    /// Records a push that waits for CI to pass its commit (`trigger = "travis"` or
    /// `"checks"`); `waiting_for` says for what.
    pub async fn hold(&self, trigger: Trigger, waiting_for: String) -> Result<Enqueued, DbError> {
        let app = trigger.app.to_string();
        let held = self
            .db
            .call(move |conn| db::hold(conn, &trigger, &waiting_for))
            .await?;
        if let Enqueued::New { id, superseded } = &held {
            tracing::info!(deployment_id = %id, app = %app, "push waits for CI");
            self.publish_all(&app, superseded, DeploymentStatus::Superseded);
            self.publish_all(&app, &[*id], DeploymentStatus::Waiting);
        }
        Ok(held)
    }

    /// CI passed `trigger.commit`: its waiting deployment (or a new one) joins the queue.
    pub async fn ci_passed(&self, trigger: Trigger, build: CiBuild) -> Result<CiOutcome, DbError> {
        let app = trigger.app.to_string();
        let outcome = self
            .db
            .call(move |conn| db::ci_passed(conn, &trigger, &build))
            .await?;
        if let CiOutcome::Released { id, superseded } = &outcome {
            tracing::info!(deployment_id = %id, app = %app, "CI passed; deployment queued");
            self.publish_all(&app, superseded, DeploymentStatus::Superseded);
            self.publish_all(&app, &[*id], DeploymentStatus::Queued);
            if let Some(notify) = self.wake.get(&app) {
                notify.notify_one();
            }
        }
        if let CiOutcome::Held { id, .. } = &outcome {
            tracing::info!(deployment_id = %id, app = %app, "CI passed; waits for the app's lock");
            self.publish_all(&app, &[*id], DeploymentStatus::Waiting);
        }
        Ok(outcome)
    }

    /// CI failed `trigger.commit`: recorded as a failed deployment; nothing deploys.
    pub async fn ci_failed(
        &self,
        trigger: Trigger,
        build: CiBuild,
        reason: String,
    ) -> Result<CiOutcome, DbError> {
        let app = trigger.app.to_string();
        let outcome = self
            .db
            .call(move |conn| db::ci_failed(conn, &trigger, &build, &reason))
            .await?;
        if let CiOutcome::Failed { id, .. } = &outcome {
            tracing::info!(deployment_id = %id, app = %app, "CI failed; nothing deploys");
            self.publish_all(&app, &[*id], DeploymentStatus::Failed);
        }
        Ok(outcome)
    }

    /// News of `commit`'s checks for `app`, gated on them (`trigger = "checks"`): kept with
    /// what was heard before and judged under `required`, in one step under the database's
    /// lock, so a webhook and the poller cannot both release (or fail) the same push.
    pub async fn checks_reported(
        &self,
        app: &AppName,
        required: Required,
        commit: CommitSha,
        evidence: Evidence,
        delivery: Option<Delivery>,
    ) -> Result<CiOutcome, DbError> {
        let name = app.to_string();
        let outcome = self
            .db
            .call(move |conn| {
                db::checks_reported(
                    conn,
                    &name,
                    &commit,
                    delivery.as_ref(),
                    evidence.reports(),
                    |known| evidence.judge(&required, known),
                )
            })
            .await?;
        let app = app.to_string();
        match &outcome {
            CiOutcome::Released { id, superseded } => {
                tracing::info!(deployment_id = %id, app = %app, "checks passed; deployment queued");
                self.publish_all(&app, superseded, DeploymentStatus::Superseded);
                self.publish_all(&app, &[*id], DeploymentStatus::Queued);
                if let Some(notify) = self.wake.get(&app) {
                    notify.notify_one();
                }
            }
            CiOutcome::Failed { id, reason } => {
                tracing::info!(deployment_id = %id, app = %app, reason = %reason, "a check failed; nothing deploys");
                self.publish_all(&app, &[*id], DeploymentStatus::Failed);
            }
            // What it waits for may have changed: an open page shows it.
            CiOutcome::Waiting { id, .. } | CiOutcome::Held { id, .. } => {
                self.publish_all(&app, &[*id], DeploymentStatus::Waiting);
            }
            CiOutcome::Duplicate { .. } | CiOutcome::Ignored(_) => {}
        }
        Ok(outcome)
    }

    fn publish_all(&self, app: &str, ids: &[DeploymentId], status: DeploymentStatus) {
        for id in ids {
            self.bus.publish(Event::Deployment {
                id: *id,
                app: app.to_owned(),
                status,
                version: String::new(),
            });
        }
    }
}

async fn worker(
    db: Db,
    pipeline: Pipeline,
    backends: Arc<App>,
    before: Option<JoinHandle<()>>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let app = backends.config.name.to_string();
    if let Some(before) = before {
        tokio::select! {
            _ = before => {}
            () = shutdown.cancelled() => return,
        }
    }
    loop {
        loop {
            let name = app.clone();
            match db.call(move |conn| db::claim_next(conn, &name)).await {
                Ok(Some(deployment)) => {
                    let span = tracing::info_span!("deployment", deployment_id = %deployment.id, app = %app);
                    tokio::select! {
                        () = pipeline.run(deployment, &backends).instrument(span) => {}
                        // Dropping the run kills its child processes; the next start marks
                        // the deployment interrupted.
                        () = shutdown.cancelled() => return,
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::error!(app = %app, error = %err, "could not read the queue");
                    break;
                }
            }
        }
        tokio::select! {
            () = wake.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}
