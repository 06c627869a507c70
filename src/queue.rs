//! The deployment queue: a row in SQLite per request, one worker task per app that runs them
//! one at a time. A newer request supersedes a queued one (never a running one). Enqueueing
//! only writes a row and wakes the worker, so a webhook is answered within milliseconds.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::{self, Db, DbError, Enqueued};
use crate::domain::{DeploymentStatus, Trigger};
use crate::events::{Bus, Event};
use crate::pipeline::{AppBackends, Pipeline};

#[derive(Clone)]
pub struct Queue {
    db: Db,
    bus: Bus,
    wake: Arc<HashMap<String, Arc<Notify>>>,
}

impl Queue {
    /// Starts one worker per app; each first runs what was left queued.
    pub fn start(
        db: Db,
        bus: Bus,
        pipeline: Pipeline,
        apps: &[Arc<AppBackends>],
        shutdown: CancellationToken,
    ) -> Self {
        let mut wake = HashMap::new();
        for backends in apps {
            let notify = Arc::new(Notify::new());
            wake.insert(backends.app.name.to_string(), notify.clone());
            tokio::spawn(worker(
                db.clone(),
                pipeline.clone(),
                backends.clone(),
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
            tracing::info!(deployment_id = id, app = %app, branch = %branch, "deployment queued");
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
        Ok(enqueued)
    }
}

async fn worker(
    db: Db,
    pipeline: Pipeline,
    backends: Arc<AppBackends>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let app = backends.app.name.to_string();
    loop {
        loop {
            let name = app.clone();
            match db.call(move |conn| db::claim_next(conn, &name)).await {
                Ok(Some(deployment)) => {
                    let span = tracing::info_span!("deployment", deployment_id = deployment.id, app = %app);
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
