//! The pipeline: one deployment from commit to live, stage by stage — Fetch, Build, Bundle,
//! Upload, then the runner's hooks. Every stage is recorded (status, start, end, output) in
//! SQLite and published on the bus as it changes. A failed stage ends the deployment
//! `failed` with its reason; traffic is only ever moved by ValidateService, so a failure
//! before it leaves the previous version serving. Knows nothing of webhooks or HTTP.

pub mod build;
pub mod bundle;
pub mod source;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::apps::App;
use crate::db::{self, Db, Deployment};
use crate::domain::{DeploymentId, DeploymentStatus, Hook, Stage, StageStatus};
use crate::events::{Bus, Event};
use crate::runner::{self, Job, Progress};

#[derive(Clone)]
pub struct Pipeline {
    db: Db,
    bus: Bus,
    data_dir: PathBuf,
    /// Env vars holding nonstop's secrets, removed from builds and hooks.
    scrubbed_env: Arc<Vec<String>>,
}

/// Records one deployment's stages: the database first, then the bus.
struct Recorder {
    db: Db,
    bus: Bus,
    id: DeploymentId,
    app: String,
}

impl Recorder {
    async fn started(&self, stage: Stage) {
        let id = self.id;
        self.write(move |conn| db::stage_started(conn, id, stage))
            .await;
        self.publish(stage, StageStatus::Running);
    }

    async fn finished(&self, stage: Stage, status: StageStatus, log: &str) {
        crate::fault::hold_before_recording_end(self.id, stage).await;
        let (id, log) = (self.id, log.to_owned());
        self.write(move |conn| db::stage_finished(conn, id, stage, status, &log))
            .await;
        self.publish(stage, status);
    }

    fn publish(&self, stage: Stage, status: StageStatus) {
        self.bus.publish(Event::Stage {
            deployment_id: self.id,
            app: self.app.clone(),
            stage,
            status,
        });
    }

    /// A record that cannot be written is logged, not fatal: the deploy itself goes on.
    async fn write<F>(&self, work: F)
    where
        F: FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<()> + Send + 'static,
    {
        if let Err(err) = self.db.call(work).await {
            tracing::error!(deployment_id = self.id, error = %err, "could not record a stage");
        }
    }
}

#[async_trait]
impl Progress for Recorder {
    async fn hook_started(&self, hook: Hook) {
        self.started(hook.into()).await;
    }

    async fn hook_finished(&self, hook: Hook, status: StageStatus, log: &str) {
        self.finished(hook.into(), status, log).await;
    }

    async fn target_port(&self, port: u16) {
        let id = self.id;
        self.write(move |conn| db::set_port(conn, id, port)).await;
    }

    async fn runner_ref(&self, reference: &str) {
        let (id, reference) = (self.id, reference.to_owned());
        self.write(move |conn| db::set_runner_ref(conn, id, &reference))
            .await;
    }

    async fn instance_started(&self, port: u16) {
        let (id, app) = (self.id, self.app.clone());
        let version = self
            .db
            .call(move |conn| Ok(db::deployment(conn, id)?.and_then(|d| d.version)))
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        self.write(move |conn| db::record_instance(conn, &app, port, &version, id))
            .await;
    }
}

/// A stage that failed: its name and a one-line reason.
struct Failed(Stage, String);

impl Pipeline {
    pub fn new(db: Db, bus: Bus, data_dir: PathBuf, scrubbed_env: Vec<String>) -> Self {
        Self {
            db,
            bus,
            data_dir,
            scrubbed_env: Arc::new(scrubbed_env),
        }
    }

    /// Runs a claimed (`running`) deployment to its end and records how it ended.
    pub async fn run(&self, deployment: Deployment, backends: &App) {
        let id = deployment.id;
        let rollback_of = deployment.rollback_of;
        let recorder = Recorder {
            db: self.db.clone(),
            bus: self.bus.clone(),
            id,
            app: deployment.app.clone(),
        };
        self.publish_deployment(id).await;
        let outcome = self.stages(&deployment, backends, &recorder).await;
        if let (Ok(()), Some(undone)) = (&outcome, rollback_of) {
            let marked = self
                .db
                .call(move |conn| db::mark_rolled_back(conn, undone))
                .await;
            if let Err(err) = marked {
                tracing::error!(deployment_id = id, error = %err, "could not mark the undone deployment");
            }
            self.publish_deployment(undone).await;
        }
        let (status, error) = match &outcome {
            Ok(()) => (DeploymentStatus::Succeeded, None),
            Err(Failed(stage, reason)) => (
                DeploymentStatus::Failed,
                Some(format!("{stage} failed: {reason}")),
            ),
        };
        tracing::info!(deployment_id = id, app = %deployment.app, status = %status, error = error.as_deref(), "deployment ended");
        let finished = self
            .db
            .call(move |conn| db::finish(conn, id, status, error.as_deref()))
            .await;
        if let Err(err) = finished {
            tracing::error!(deployment_id = id, error = %err, "could not record the end of a deployment");
        }
        self.publish_deployment(id).await;
    }

    async fn publish_deployment(&self, id: DeploymentId) {
        if let Ok(Some(deployment)) = self.db.call(move |conn| db::deployment(conn, id)).await {
            self.bus.publish(Event::Deployment {
                id,
                app: deployment.app,
                status: deployment.status,
                version: deployment.version.unwrap_or_default(),
            });
        }
    }

    async fn stages(
        &self,
        deployment: &Deployment,
        backends: &App,
        recorder: &Recorder,
    ) -> Result<(), Failed> {
        let app = &backends.config;
        let id = deployment.id;
        if let (Some(version), Some(key), Some(sha256)) = (
            &deployment.version,
            &deployment.bundle_key,
            &deployment.bundle_sha256,
        ) {
            // A redeploy or rollback: the bundle is in the store already.
            let log = format!("reusing the stored bundle {key} ({version})\n");
            for stage in [Stage::Fetch, Stage::Build, Stage::Bundle, Stage::Upload] {
                recorder.finished(stage, StageStatus::Skipped, &log).await;
            }
            let job = Job {
                deployment_id: id,
                app: app.clone(),
                version: version.clone(),
                bundle_key: key.clone(),
                bundle_sha256: sha256.clone(),
            };
            return self.run_hooks(&job, backends, recorder).await;
        }
        let app_dir = self.data_dir.join("apps").join(app.name.as_str());

        recorder.started(Stage::Fetch).await;
        let checkout = app_dir.join("checkout");
        let fetched = source::fetch(
            &backends.repo,
            &checkout,
            &deployment.branch,
            deployment.commit_sha.as_deref(),
        )
        .await;
        let fetched = self
            .stage_result(
                recorder,
                Stage::Fetch,
                fetched.map(|f| {
                    let log = f.log.clone();
                    (f, log)
                }),
            )
            .await?;

        // The version is stamped once the commit is known ({sha} may be part of it); the
        // app's deployments run one at a time, so reading the last stamp here is race-free.
        let version = {
            let (sha, message, author) = (
                fetched.sha.clone(),
                fetched.message.clone(),
                fetched.author.clone(),
            );
            let (app_name, pattern, branch) = (
                app.name.to_string(),
                app.version.clone(),
                deployment.branch.clone(),
            );
            let stamped = self
                .db
                .call(move |conn| {
                    db::set_commit(conn, id, &sha, &message, &author)?;
                    let previous = db::last_stamp(conn, &app_name)?
                        .and_then(DateTime::<Utc>::from_timestamp_millis);
                    let at = crate::version::next_stamp_time(Utc::now(), previous);
                    let version = crate::version::render(&pattern, at, &sha, &branch);
                    db::set_version(conn, id, &version, at.timestamp_millis())?;
                    Ok(version)
                })
                .await;
            stamped
                .map_err(|err| Failed(Stage::Build, format!("could not stamp a version: {err}")))?
        };
        self.publish_deployment(id).await;

        recorder.started(Stage::Build).await;
        let built = build::run(build::BuildInput {
            app,
            checkout: &checkout,
            version: &version,
            commit: &fetched.sha,
            branch: &deployment.branch,
            scrubbed_env: &self.scrubbed_env,
        })
        .await;
        let artifact = self.stage_result(recorder, Stage::Build, built).await?;

        recorder.started(Stage::Bundle).await;
        let bundle_path = self
            .data_dir
            .join("tmp")
            .join(format!("{}-{id}.zip", app.name));
        let appspec = runner::appspec::render_for(app);
        let host_env = runner::appspec::render_host_env(app);
        let bundled = {
            let (path, version) = (bundle_path.clone(), version.clone());
            tokio::task::spawn_blocking(move || {
                let contents = bundle::BundleContents {
                    appspec: &appspec,
                    host_env: &host_env,
                    artifact: &artifact,
                    version: &version,
                };
                bundle::create(&contents, &path)
            })
            .await
            .unwrap_or_else(|err| Err(format!("bundle task failed: {err}")))
            .map(|(sha256, listing)| {
                let log = format!("{listing}sha256 {sha256}\n");
                (sha256, log)
            })
            .map_err(|reason| (format!("{reason}\n"), reason))
        };
        if let Err(failed) = self.stage_result(recorder, Stage::Bundle, bundled).await {
            // A half-written zip (a full disk, say) must not take the space of the next try.
            let _ = tokio::fs::remove_file(&bundle_path).await;
            return Err(failed);
        }

        recorder.started(Stage::Upload).await;
        let uploaded = backends
            .store
            .put(app.name.as_str(), &version, &bundle_path)
            .await
            .map(|stored| {
                let log = format!(
                    "stored {} ({} bytes, sha256 {})\n",
                    stored.key, stored.size, stored.sha256
                );
                (stored, log)
            })
            .map_err(|err| (format!("{err}\n"), err.to_string()));
        let _ = tokio::fs::remove_file(&bundle_path).await;
        let stored = self.stage_result(recorder, Stage::Upload, uploaded).await?;
        {
            let (key, sha256) = (stored.key.clone(), stored.sha256.clone());
            let _ = self
                .db
                .call(move |conn| db::set_bundle(conn, id, &key, &sha256))
                .await;
        }

        let job = Job {
            deployment_id: id,
            app: app.clone(),
            version,
            bundle_key: stored.key,
            bundle_sha256: stored.sha256,
        };
        self.run_hooks(&job, backends, recorder).await
    }

    async fn run_hooks(
        &self,
        job: &Job,
        backends: &App,
        recorder: &Recorder,
    ) -> Result<(), Failed> {
        backends
            .runner
            .run(job, recorder)
            .await
            .map_err(|err| Failed(err.hook.into(), err.reason.to_string()))?;
        self.prune(backends, job.deployment_id, &job.bundle_key)
            .await;
        self.prune_host(backends, job).await;
        Ok(())
    }

    /// Host retention once a deployment went live: the runner's older revisions and
    /// releases go, never the version an instance on one of the app's ports runs.
    async fn prune_host(&self, backends: &App, job: &Job) {
        let (app, ports) = (backends.config.name.to_string(), backends.config.ports);
        let running = self
            .db
            .call(move |conn| {
                let mut versions = Vec::new();
                for port in ports {
                    versions.extend(db::instance(conn, &app, port)?.map(|i| i.version));
                }
                Ok(versions)
            })
            .await;
        let running = match running {
            Ok(running) => running,
            Err(err) => {
                tracing::warn!(deployment_id = job.deployment_id, error = %err, "could not read the running instances; nothing pruned on this host");
                return;
            }
        };
        match backends.runner.prune(job, &running).await {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(deployment_id = job.deployment_id, deleted = ?deleted, "old revisions deleted on this host")
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(deployment_id = job.deployment_id, error = %err, "could not prune old revisions on this host")
            }
        }
    }

    /// Retention once a deployment went live: its bundle and the previous live one are
    /// protected. A store that cannot prune is a warning, never a failed deployment.
    async fn prune(&self, backends: &App, id: DeploymentId, live_key: &str) {
        let app = backends.config.name.to_string();
        let previous = self
            .db
            .call(move |conn| db::last_succeeded(conn, &app, id))
            .await
            .ok()
            .flatten()
            .and_then(|d| d.bundle_key);
        let protect: Vec<String> = std::iter::once(live_key.to_owned())
            .chain(previous)
            .collect();
        match backends
            .store
            .prune(backends.config.name.as_str(), &protect)
            .await
        {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(deployment_id = id, app = %backends.config.name, deleted = ?deleted, "old bundles deleted");
                let app = backends.config.name.to_string();
                let marked = self
                    .db
                    .call(move |conn| db::mark_bundles_pruned(conn, &app, &deleted))
                    .await;
                if let Err(err) = marked {
                    tracing::warn!(deployment_id = id, error = %err, "could not record which bundles were deleted");
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(deployment_id = id, app = %backends.config.name, error = %err, "could not prune old bundles")
            }
        }
    }

    /// Records how a stage ended and passes its value on.
    async fn stage_result<T>(
        &self,
        recorder: &Recorder,
        stage: Stage,
        result: Result<(T, String), (String, String)>,
    ) -> Result<T, Failed> {
        match result {
            Ok((value, log)) => {
                recorder.finished(stage, StageStatus::Succeeded, &log).await;
                Ok(value)
            }
            Err((log, reason)) => {
                recorder.finished(stage, StageStatus::Failed, &log).await;
                Err(Failed(stage, reason))
            }
        }
    }
}
