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
use crate::db::{self, CiOutcome, Db, DbError, Deployment, Enqueued, Unlocked};
use crate::domain::{
    AppName, CiBuild, CommitSha, Delivery, DeploymentId, DeploymentStatus, Trigger,
};
use crate::events::{Bus, Event};
use crate::gate::{Evidence, Required};
use crate::pipeline::Pipeline;
use crate::traffic::Traffic;

#[derive(Clone)]
pub struct Queue {
    db: Db,
    bus: Bus,
    wake: Arc<HashMap<String, Arc<Notify>>>,
    running: Running,
}

/// The deployment each app's worker runs now, and how to stop it.
#[derive(Clone, Default)]
struct Running(Arc<std::sync::Mutex<HashMap<String, Run>>>);

struct Run {
    id: DeploymentId,
    cancel: CancellationToken,
    /// Who asked for it to stop, once someone did.
    cancelled_by: Option<String>,
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Queue {
    /// Starts one worker per app; each first waits for its app's task in `before` (the
    /// clean-up after an interrupted deployment), then runs what was left queued.
    pub fn start(
        db: Db,
        bus: Bus,
        pipeline: Pipeline,
        traffic: Traffic,
        apps: &Apps,
        mut before: HashMap<String, JoinHandle<()>>,
        shutdown: CancellationToken,
    ) -> Self {
        let mut wake = HashMap::new();
        let running = Running::default();
        for backends in apps.iter() {
            let notify = Arc::new(Notify::new());
            wake.insert(backends.config.name.to_string(), notify.clone());
            let worker = Worker {
                db: db.clone(),
                bus: bus.clone(),
                pipeline: pipeline.clone(),
                traffic: traffic.clone(),
                backends: backends.clone(),
                running: running.clone(),
            };
            tokio::spawn(worker.run(
                before.remove(backends.config.name.as_str()),
                notify,
                shutdown.clone(),
            ));
        }
        Self {
            db,
            bus,
            wake: Arc::new(wake),
            running,
        }
    }

    /// Stops `app`'s running deployment at once, for `actor`: its processes are killed,
    /// traffic it moved goes back, what it started is stopped, and it ends `cancelled`.
    /// Returns its id (the clean-up goes on in the app's worker); `None` when none runs.
    pub fn cancel(&self, app: &AppName, actor: &str) -> Option<DeploymentId> {
        let mut running = self.running.lock();
        let run = running.get_mut(app.as_str())?;
        run.cancelled_by.get_or_insert_with(|| actor.to_owned());
        run.cancel.cancel();
        Some(run.id)
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

/// One app's worker: runs its deployments one at a time.
struct Worker {
    db: Db,
    bus: Bus,
    pipeline: Pipeline,
    traffic: Traffic,
    backends: Arc<App>,
    running: Running,
}

impl Worker {
    async fn run(
        self,
        before: Option<JoinHandle<()>>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        let app = self.backends.config.name.to_string();
        if let Some(before) = before {
            tokio::select! {
                _ = before => {}
                () = shutdown.cancelled() => return,
            }
        }
        loop {
            loop {
                let name = app.clone();
                match self.db.call(move |conn| db::claim_next(conn, &name)).await {
                    Ok(Some(deployment)) => {
                        if !self.one(deployment, &shutdown).await {
                            return;
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

    /// Runs one deployment to its end, or until it is cancelled; false at shutdown.
    async fn one(&self, deployment: Deployment, shutdown: &CancellationToken) -> bool {
        let (id, app) = (deployment.id, self.backends.config.name.to_string());
        let cancel = CancellationToken::new();
        self.running.lock().insert(
            app.clone(),
            Run {
                id,
                cancel: cancel.clone(),
                cancelled_by: None,
            },
        );
        let span = tracing::info_span!("deployment", deployment_id = %id, app = %app);
        // A cancel waits for a switch in progress to be recorded: dropped between the
        // switch and its record, the run would leave the way back unknown.
        let stop = async {
            cancel.cancelled().await;
            self.backends.moving.lock().await
        };
        let go_on = tokio::select! {
            () = self.pipeline.run(deployment, &self.backends).instrument(span) => true,
            // Dropping the run kills its child processes (their whole process groups).
            not_moving = stop => {
                drop(not_moving);
                let actor = self.running.lock().get(&app).and_then(|run| run.cancelled_by.clone());
                self.cancelled(id, actor.as_deref().unwrap_or("someone")).await;
                true
            }
            // The next start marks the deployment interrupted and undoes it.
            () = shutdown.cancelled() => false,
        };
        self.running.lock().remove(&app);
        go_on
    }

    /// Records `id` cancelled, then undoes it as a restart undoes an interrupted one.
    async fn cancelled(&self, id: DeploymentId, actor: &str) {
        let reason = format!("cancelled by {actor}");
        tracing::info!(deployment_id = %id, actor, "deployment cancelled");
        let cut = {
            let reason = reason.clone();
            self.db
                .call(move |conn| db::cancel_running(conn, id, &reason))
                .await
        };
        let output = self.bus.output();
        output.push(id, &format!("── cancelled: {reason}\n"));
        output.end(id);
        match cut {
            Ok(Some((deployment, started_instances))) => {
                self.publish(&deployment, DeploymentStatus::Cancelled);
                let cut = crate::recovery::Cut {
                    deployment,
                    started_instances,
                };
                crate::recovery::put_back(&self.traffic, &self.backends, cut).await;
            }
            Ok(None) => {}
            Err(err) => {
                tracing::error!(deployment_id = %id, error = %err, "could not record a cancelled deployment");
            }
        }
    }

    fn publish(&self, deployment: &Deployment, status: DeploymentStatus) {
        self.bus.publish(Event::Deployment {
            id: deployment.id,
            app: deployment.app.to_string(),
            status,
            version: deployment.version.clone().unwrap_or_default(),
        });
    }
}
