//! Rollback and redeploy: putting back what was live before. A rollback switches back to the
//! previous instance when it still runs and answers (instant, through `traffic`), else
//! redeploys the previous stored bundle through the queue; a redeploy deploys any past
//! deployment's stored bundle again. The rules of what may be rolled back live here, apart
//! from HTTP; this module never moves traffic itself.

use crate::apps::App;
use crate::db::{self, Db, DbError, Deployment, Enqueued};
use crate::domain::{DeploymentId, DeploymentStatus, Reuse, Trigger, TriggerKind};
use crate::queue::Queue;
use crate::traffic::{Traffic, TrafficError};

/// Why there is nothing to roll back to, or redeploy. Traffic is where it was.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("deployment {0} is running; roll back when it ends")]
    Running(DeploymentId),
    #[error("nothing of `{0}` is live to roll back from")]
    NothingLive(String),
    #[error(
        "`{0}` has no earlier version: the previous instance is gone and no earlier bundle is stored"
    )]
    NoEarlierVersion(String),
    #[error(
        "deployment {0}'s bundle was deleted by retention (store.keep): deploy its commit instead"
    )]
    BundlePruned(DeploymentId),
    #[error("deployment {0} has no stored bundle to redeploy")]
    NoBundle(DeploymentId),
    #[error("queueing the redeploy found a delivery of the same id, which an action cannot be")]
    Duplicate,
    #[error(transparent)]
    Traffic(#[from] TrafficError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What the record says a rollback of `app` can go back to.
struct Record {
    live: Option<db::Live>,
    running: Option<DeploymentId>,
    /// The instance on the other port, when its deployment once went live.
    previous_instance: Option<db::Instance>,
    previous_bundle: Option<Deployment>,
}

/// Undoes `app`'s live deployment: switches back to the previous instance when it still
/// runs and answers its health check, else queues a redeploy of the previous bundle.
/// Returns the deployment that records the rollback.
pub async fn roll_back(
    db: &Db,
    traffic: &Traffic,
    queue: &Queue,
    app: &App,
) -> Result<DeploymentId, RollbackError> {
    let record = read_record(db, app).await?;
    if let Some(running) = record.running {
        return Err(RollbackError::Running(running));
    }
    let live = record
        .live
        .ok_or_else(|| RollbackError::NothingLive(app.config.name.to_string()))?;
    let undone = live.deployment_id;
    if let Some(instance) = record.previous_instance {
        match traffic.switch_back(app, instance, undone).await {
            Ok(id) => return Ok(id),
            // Gone or not answering: the stored bundle is the way back.
            Err(TrafficError::Unhealthy { .. }) => {}
            Err(err) => return Err(err.into()),
        }
    }
    let previous = record
        .previous_bundle
        .ok_or_else(|| RollbackError::NoEarlierVersion(app.config.name.to_string()))?;
    let trigger = redeploy_of(&previous, app, TriggerKind::Rollback, undone)?;
    enqueue(queue, trigger).await
}

/// Queues a deployment of past deployment `id`'s stored bundle.
pub async fn redeploy(
    queue: &Queue,
    app: &App,
    past: &Deployment,
) -> Result<DeploymentId, RollbackError> {
    let trigger = redeploy_of(past, app, TriggerKind::Manual, None)?;
    enqueue(queue, trigger).await
}

async fn read_record(db: &Db, app: &App) -> Result<Record, DbError> {
    let config = app.config.clone();
    db.call(move |conn| {
        let name = config.name.as_str();
        let live = db::live(conn, name)?;
        let running = db::running_deployment(conn, name)?;
        let other = config.idle_port(live.as_ref().map(|l| l.port));
        // Only an instance whose deployment went live is a version to go back to.
        let previous_instance = match db::instance(conn, name, other)? {
            Some(instance) => {
                let went_live = match instance.deployment_id {
                    Some(id) => db::deployment(conn, id)?.is_some_and(|d| {
                        matches!(
                            d.status,
                            DeploymentStatus::Succeeded | DeploymentStatus::RolledBack
                        )
                    }),
                    None => false,
                };
                went_live.then_some(instance)
            }
            None => None,
        };
        let undone = live.as_ref().and_then(|l| l.deployment_id);
        let previous_bundle = db::previous_live_bundle(conn, name, undone)?;
        Ok(Record {
            live,
            running,
            previous_instance,
            previous_bundle,
        })
    })
    .await
}

/// A trigger that deploys `past`'s stored bundle again.
fn redeploy_of(
    past: &Deployment,
    app: &App,
    kind: TriggerKind,
    rollback_of: Option<DeploymentId>,
) -> Result<Trigger, RollbackError> {
    if past.bundle_pruned_at.is_some() {
        return Err(RollbackError::BundlePruned(past.id));
    }
    let (Some(version), Some(bundle)) = (&past.version, &past.bundle) else {
        return Err(RollbackError::NoBundle(past.id));
    };
    Ok(Trigger {
        app: app.config.name.clone(),
        commit: past.commit_sha.clone(),
        branch: past.branch.clone(),
        kind,
        delivery: None,
        message: past.commit_message.clone(),
        author: past.author.clone(),
        reuse: Some(Reuse {
            from: past.id,
            version: version.clone(),
            bundle: bundle.clone(),
            rollback_of,
        }),
    })
}

async fn enqueue(queue: &Queue, trigger: Trigger) -> Result<DeploymentId, RollbackError> {
    match queue.enqueue(trigger).await? {
        // A rollback or a redeploy is never held by a lock (`db::enqueue`).
        Enqueued::New { id, .. } | Enqueued::Held { id, .. } => Ok(id),
        Enqueued::Duplicate { .. } => Err(RollbackError::Duplicate),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::apps::Apps;
    use crate::domain::AppName;
    use crate::pipeline::Pipeline;
    use crate::switch::TrafficSwitch;
    use crate::traffic::fixture::{Fixture, fixture};

    /// A deployment of `hello` that ran and left an instance on `port`, ended `status`.
    async fn deployed(f: &Fixture, port: u16, status: DeploymentStatus) -> DeploymentId {
        f.db.call(move |conn| {
            let trigger = Trigger {
                app: AppName::parse("hello").unwrap(),
                commit: None,
                branch: "main".into(),
                kind: TriggerKind::Manual,
                delivery: None,
                message: None,
                author: None,
                reuse: None,
            };
            let Enqueued::New { id, .. } = db::enqueue(conn, &trigger)? else {
                unreachable!("no delivery id, so never a duplicate")
            };
            db::claim_next(conn, "hello")?;
            db::record_instance(conn, "hello", port, &format!("v{id}"), id)?;
            if status.is_finished() {
                db::finish(conn, id, status, None)?;
            }
            Ok(id)
        })
        .await
        .unwrap()
    }

    async fn live_on(f: &Fixture, port: u16, by: DeploymentId) {
        f.db.call(move |conn| db::set_live(conn, "hello", port, "real", Some(by)).map(drop))
            .await
            .unwrap();
    }

    fn queue(f: &Fixture) -> Queue {
        let pipeline = Pipeline::new(
            f.db.clone(),
            f.bus.clone(),
            "unused".into(),
            crate::config::Secret::new("k".into()),
        );
        let no_apps = Apps::default();
        Queue::start(
            f.db.clone(),
            f.bus.clone(),
            pipeline,
            f.traffic.clone(),
            &no_apps,
            HashMap::new(),
            CancellationToken::new(),
        )
    }

    async fn status_of(f: &Fixture, id: DeploymentId) -> DeploymentStatus {
        f.db.call(move |conn| db::deployment(conn, id))
            .await
            .unwrap()
            .unwrap()
            .status
    }

    #[tokio::test]
    async fn a_previous_instance_that_answers_takes_traffic_back_at_once() {
        let f = fixture().await;
        let first = deployed(&f, f.healthy, DeploymentStatus::Succeeded).await;
        let second = deployed(&f, f.gone, DeploymentStatus::Succeeded).await;
        live_on(&f, f.gone, second).await;

        let id = roll_back(&f.db, &f.traffic, &queue(&f), &f.app)
            .await
            .unwrap();

        assert!(id > second && id != first);
        assert_eq!(f.proxy.live(), Some(f.healthy));
        assert_eq!(status_of(&f, id).await, DeploymentStatus::Succeeded);
        assert_eq!(status_of(&f, second).await, DeploymentStatus::RolledBack);
    }

    #[tokio::test]
    async fn with_the_previous_instance_gone_and_no_bundle_there_is_no_way_back() {
        let f = fixture().await;
        deployed(&f, f.gone, DeploymentStatus::Succeeded).await;
        let second = deployed(&f, f.healthy, DeploymentStatus::Succeeded).await;
        live_on(&f, f.healthy, second).await;

        let err = roll_back(&f.db, &f.traffic, &queue(&f), &f.app)
            .await
            .unwrap_err();

        assert!(matches!(err, RollbackError::NoEarlierVersion(_)), "{err}");
        assert_eq!(f.proxy.live(), None, "traffic was not touched");
        assert_eq!(status_of(&f, second).await, DeploymentStatus::Succeeded);
    }

    #[tokio::test]
    async fn nothing_is_rolled_back_while_a_deployment_runs_or_before_anything_went_live() {
        let f = fixture().await;
        let err = roll_back(&f.db, &f.traffic, &queue(&f), &f.app)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "nothing of `hello` is live to roll back from"
        );

        let running = deployed(&f, f.healthy, DeploymentStatus::Running).await;
        let err = roll_back(&f.db, &f.traffic, &queue(&f), &f.app)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RollbackError::Running(id) if id == running),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_bundle_deleted_by_retention_is_not_redeployed() {
        let f = fixture().await;
        let id = deployed(&f, f.healthy, DeploymentStatus::Succeeded).await;
        f.db.call(move |conn| {
            db::set_bundle(conn, id, "hello/v1.zip", "00")?;
            db::mark_bundles_pruned(conn, "hello", &["hello/v1.zip".to_owned()])
        })
        .await
        .unwrap();
        let past =
            f.db.call(move |conn| db::deployment(conn, id))
                .await
                .unwrap()
                .unwrap();

        let err = redeploy(&queue(&f), &f.app, &past).await.unwrap_err();

        assert!(
            matches!(err, RollbackError::BundlePruned(i) if i == id),
            "{err}"
        );
    }
}
