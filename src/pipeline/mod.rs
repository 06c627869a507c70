//! The pipeline: one deployment from commit to live, stage by stage — Fetch, Build, Bundle,
//! Upload, then the runner's hooks. Every stage is recorded (status, start, end, output) in
//! SQLite and published on the bus as it changes. A failed stage ends the deployment
//! `failed` with its reason; traffic is only ever moved by ValidateService, so a failure
//! before it leaves the previous version serving. Knows nothing of webhooks or HTTP.

pub mod build;
pub mod bundle;
pub mod source;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::app_env::{self, AppEnv, AppEnvError};
use crate::apps::App;
use crate::config::AppConfig;
use crate::config::Secret;
use crate::db::{self, Db, DbError, Deployment};
use crate::domain::{BundleRef, DeploymentId, DeploymentStatus, Stage, StageStatus};
use crate::events::{Bus, Event};
use crate::process::{LineSink, Tail};
use crate::runner::step::{self, Done, Failed};
use crate::runner::{self, Job, Progress, RunnerError};
use crate::store::{StoreError, StoredBundle};
use build::BuildError;
use bundle::BundleError;
use source::{Fetched, SourceError};

/// Why a deployment failed: the stage, then its cause in one line. This is the deployment's
/// recorded error; each stage's log has the rest.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The app's env file could not be read; nothing ran.
    #[error("the app's environment: {0}")]
    Env(#[from] AppEnvError),
    #[error("Fetch failed: {0}")]
    Fetch(#[from] SourceError),
    /// Recording the commit and its version, between Fetch and Build.
    #[error("Build failed: could not stamp a version: {0}")]
    Stamp(DbError),
    #[error("Build failed: {0}")]
    Build(#[from] BuildError),
    #[error("Bundle failed: {0}")]
    Bundle(#[from] BundleError),
    #[error("Upload failed: {0}")]
    Upload(#[from] UploadError),
    /// `{hook} failed: …`, as the runner said.
    #[error(transparent)]
    Hook(#[from] RunnerError),
}

/// What Upload can fail with.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Rollback, redeploy and retention find a bundle by the key recorded with its
    /// deployment: one stored but not recorded could go live and then never be found again.
    #[error("stored {key}, but could not record it with the deployment: {source}")]
    Record { key: String, source: DbError },
}

#[derive(Clone)]
pub struct Pipeline {
    db: Db,
    bus: Bus,
    data_dir: PathBuf,
    /// Keys the hashes of the app env's values kept per deployment (see `app_env::digest`).
    env_key: Secret,
}

/// Records one deployment's stages: the database first, then the bus.
struct Recorder {
    db: Db,
    bus: Bus,
    id: DeploymentId,
    app: String,
    /// Stages whose lines reached the console as they were printed.
    streamed: Arc<Mutex<HashSet<Stage>>>,
}

/// How often a running stage's log so far is written to the database.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// One stage's processes' lines as they are printed (already redacted by the step): onto
/// the deployment's console at once, and into the stage's log in the database every
/// `SAVE_EVERY`, so a restart or another reader sees them before the stage ends.
struct StageConsole {
    db: Db,
    bus: Bus,
    id: DeploymentId,
    stage: Stage,
    streamed: Arc<Mutex<HashSet<Stage>>>,
    log: Tail,
    saved_at: Option<Instant>,
}

#[async_trait]
impl LineSink for StageConsole {
    async fn lines(&mut self, lines: &str) {
        if self.saved_at.is_none() {
            self.streamed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.stage);
            self.saved_at = Some(Instant::now());
        }
        self.bus.output().push(self.id, lines);
        self.log.push(lines);
        if self.saved_at.is_some_and(|at| at.elapsed() >= SAVE_EVERY) {
            self.saved_at = Some(Instant::now());
            let (id, stage, log) = (self.id, self.stage, self.log.kept().to_owned());
            if let Err(err) = self
                .db
                .call(move |conn| db::stage_output(conn, id, stage, &log))
                .await
            {
                tracing::warn!(deployment_id = %id, error = %err, "could not save a stage's output so far");
            }
        }
    }
}

impl Recorder {
    async fn started(&self, stage: Stage) {
        let id = self.id;
        self.write(move |conn| db::stage_started(conn, id, stage))
            .await;
        self.bus.output().push(id, &format!("── {stage}\n"));
        self.publish(stage, StageStatus::Running);
    }

    async fn finished(&self, stage: Stage, status: StageStatus, log: &str) {
        crate::fault::hold_before_recording_end(self.id, stage).await;
        let (id, saved) = (self.id, log.to_owned());
        self.write(move |conn| db::stage_finished(conn, id, stage, status, &saved))
            .await;
        let streamed = self
            .streamed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&stage);
        if !streamed {
            self.bus.output().push(id, log);
        }
        self.bus
            .output()
            .push(id, &format!("── {stage} {status}\n"));
        self.publish(stage, status);
    }

    /// Where `stage`'s processes print: its console, and its log in the database.
    fn console(&self, stage: Stage) -> StageConsole {
        StageConsole {
            db: self.db.clone(),
            bus: self.bus.clone(),
            id: self.id,
            stage,
            streamed: self.streamed.clone(),
            log: Tail::default(),
            saved_at: None,
        }
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
            tracing::error!(deployment_id = %self.id, error = %err, "could not record a stage");
        }
    }
}

#[async_trait]
impl Progress for Recorder {
    async fn stage_started(&self, stage: Stage) {
        self.started(stage).await;
    }

    async fn stage_finished(&self, stage: Stage, status: StageStatus, log: &str) {
        self.finished(stage, status, log).await;
    }

    fn console(&self, stage: Stage) -> Option<Box<dyn LineSink>> {
        Some(Box::new(Recorder::console(self, stage)))
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

impl Pipeline {
    pub fn new(db: Db, bus: Bus, data_dir: PathBuf, env_key: Secret) -> Self {
        Self {
            db,
            bus,
            data_dir,
            env_key,
        }
    }

    /// Runs a claimed (`running`) deployment to its end and records how it ended.
    pub async fn run(&self, deployment: Deployment, backends: &App) {
        let id = deployment.id;
        let recorder = Recorder {
            db: self.db.clone(),
            bus: self.bus.clone(),
            id,
            app: deployment.app.to_string(),
            streamed: Arc::default(),
        };
        self.bus.output().begin(id);
        self.publish_deployment(id).await;
        let outcome = self.stages(&deployment, backends, &recorder).await;
        if let (Ok(()), Some(undone)) = (&outcome, deployment.rollback_of) {
            self.mark_rolled_back(id, undone).await;
        }
        let (status, error) = match &outcome {
            Ok(()) => (DeploymentStatus::Succeeded, None),
            Err(err) => (DeploymentStatus::Failed, Some(err.to_string())),
        };
        tracing::info!(deployment_id = %id, app = %deployment.app, status = %status, error = error.as_deref(), "deployment ended");
        let end = match &error {
            None => format!("── {status}\n"),
            Some(reason) => format!("── {status}: {reason}\n"),
        };
        let finished = self
            .db
            .call(move |conn| db::finish(conn, id, status, error.as_deref()))
            .await;
        if let Err(err) = finished {
            tracing::error!(deployment_id = %id, error = %err, "could not record the end of a deployment");
        }
        self.bus.output().push(id, &end);
        // After the record: a follower that then reads the database finds every stage's log.
        self.bus.output().end(id);
        self.publish_deployment(id).await;
    }

    /// A rollback went live: the deployment it undid is recorded `rolled_back`.
    async fn mark_rolled_back(&self, id: DeploymentId, undone: DeploymentId) {
        let marked = self
            .db
            .call(move |conn| db::mark_rolled_back(conn, undone))
            .await;
        if let Err(err) = marked {
            tracing::error!(deployment_id = %id, error = %err, "could not mark the undone deployment");
        }
        self.publish_deployment(undone).await;
    }

    async fn publish_deployment(&self, id: DeploymentId) {
        if let Ok(Some(deployment)) = self.db.call(move |conn| db::deployment(conn, id)).await {
            self.bus.publish(Event::Deployment {
                id,
                app: deployment.app.to_string(),
                status: deployment.status,
                version: deployment.version.unwrap_or_default(),
            });
        }
    }

    /// The deployment's steps, in order; the first that fails ends it.
    async fn stages(
        &self,
        deployment: &Deployment,
        app: &App,
        recorder: &Recorder,
    ) -> Result<(), PipelineError> {
        // Read at each deploy: an edited env file applies to the next deployment.
        let env = Arc::new(AppEnv::resolve(&app.config)?);
        let env_change = self.record_env(deployment, &env).await;
        if let Some(job) = stored_job(deployment, &app.config, env.clone()) {
            // A redeploy or rollback: the bundle is in the store already.
            let log = format!(
                "{}reusing the stored bundle {} ({})\n",
                env_change.map(|c| c + "\n").unwrap_or_default(),
                job.bundle.key,
                job.version
            );
            for stage in [Stage::Fetch, Stage::Build, Stage::Bundle, Stage::Upload] {
                recorder.finished(stage, StageStatus::Skipped, &log).await;
            }
            return self.run_hooks(&job, app, recorder).await;
        }
        let id = deployment.id;
        let checkout = self
            .data_dir
            .join("apps")
            .join(app.config.name.as_str())
            .join("checkout");
        let commit = deployment.commit_sha.as_deref();
        let build_user = app.config.build_user.as_ref();
        let fetched = source::fetch(&app.repo, &checkout, &deployment.branch, commit, build_user);
        let fetched = step::record(recorder, Stage::Fetch, fetched).await?;
        let version = self
            .stamp_version(deployment, &app.config, &fetched)
            .await?;
        self.publish_deployment(id).await;
        let mut console = recorder.console(Stage::Build);
        let built = build::run(
            build::BuildInput {
                app: &app.config,
                checkout: &checkout,
                version: &version,
                commit: &fetched.sha,
                branch: &deployment.branch,
                env: &env,
                env_change: env_change.as_deref(),
            },
            &mut console,
        );
        let artifact = step::record(recorder, Stage::Build, built).await?;
        let bundle = self
            .data_dir
            .join("tmp")
            .join(format!("{}-{id}.zip", app.config.name));
        let bundled = make_bundle(&app.config, artifact, &version, &bundle);
        step::record(recorder, Stage::Bundle, bundled).await?;
        let uploaded = self.upload(app, id, &version, &bundle);
        let stored = step::record(recorder, Stage::Upload, uploaded).await?;
        let previous_version = {
            let name = app.config.name.to_string();
            self.db
                .call(move |conn| db::live(conn, &name))
                .await
                .ok()
                .flatten()
                .and_then(|live| live.version)
        };
        let job = Job {
            deployment_id: id,
            app: app.config.clone(),
            version,
            commit: Some(fetched.sha.to_string()),
            previous_version,
            bundle: BundleRef {
                key: stored.key,
                sha256: stored.sha256,
            },
            env,
        };
        self.run_hooks(&job, app, recorder).await
    }

    /// Keeps the digest of the env this deployment runs with, and says which names changed
    /// since the app's previous deployment (nothing for the first one recorded). A record
    /// that cannot be read or written only costs the note.
    async fn record_env(&self, deployment: &Deployment, env: &AppEnv) -> Option<String> {
        let now = env.digest(self.env_key.expose().as_bytes());
        let text = serde_json::to_string(&now).ok()?;
        let (id, app) = (deployment.id, deployment.app.to_string());
        let before = self
            .db
            .call(move |conn| db::swap_env_digest(conn, id, &app, &text))
            .await;
        match before {
            Ok(before) => {
                let before: BTreeMap<String, String> = serde_json::from_str(&before?).ok()?;
                app_env::changes(&before, &now)
            }
            Err(err) => {
                tracing::warn!(deployment_id = %id, error = %err, "could not record the app's env digest");
                None
            }
        }
    }

    /// Records the commit Fetch found and stamps the version. The version is stamped once
    /// the commit is known ({sha} may be part of it); the app's deployments run one at a
    /// time, so reading the last stamp here is race-free.
    async fn stamp_version(
        &self,
        deployment: &Deployment,
        app: &AppConfig,
        fetched: &Fetched,
    ) -> Result<String, PipelineError> {
        let id = deployment.id;
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
        self.db
            .call(move |conn| {
                db::set_commit(conn, id, &sha, &message, &author)?;
                let previous = db::last_stamp(conn, &app_name)?
                    .and_then(DateTime::<Utc>::from_timestamp_millis);
                let at = crate::version::next_stamp_time(Utc::now(), previous);
                let version = crate::version::render(&pattern, at, &sha, &branch);
                db::set_version(conn, id, &version, at.timestamp_millis())?;
                Ok(version)
            })
            .await
            .map_err(PipelineError::Stamp)
    }

    /// Upload: the bundle into the app's store, and its key and sha256 into the record.
    async fn upload(
        &self,
        app: &App,
        id: DeploymentId,
        version: &str,
        bundle: &Path,
    ) -> Result<Done<StoredBundle>, Failed<UploadError>> {
        let stored = app
            .store
            .put(app.config.name.as_str(), version, bundle)
            .await;
        let _ = tokio::fs::remove_file(bundle).await;
        let stored = stored.map_err(UploadError::from)?;
        let log = format!(
            "stored {} ({} bytes, sha256 {})\n",
            stored.key, stored.size, stored.sha256
        );
        let (key, sha256) = (stored.key.clone(), stored.sha256.clone());
        let recorded = self
            .db
            .call(move |conn| db::set_bundle(conn, id, &key, &sha256))
            .await;
        match recorded {
            Ok(()) => Ok(Done::new(stored, log)),
            // The stored bundle stays in the store like any older one, for retention to delete.
            Err(source) => Err(Failed::after(
                log,
                UploadError::Record {
                    key: stored.key,
                    source,
                },
            )),
        }
    }

    async fn run_hooks(
        &self,
        job: &Job,
        app: &App,
        recorder: &Recorder,
    ) -> Result<(), PipelineError> {
        app.runner.run(job, recorder).await?;
        self.prune(app, job.deployment_id, &job.bundle.key).await;
        self.prune_host(app, job).await;
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
                tracing::warn!(deployment_id = %job.deployment_id, error = %err, "could not read the running instances; nothing pruned on this host");
                return;
            }
        };
        match backends.runner.prune(job, &running).await {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(deployment_id = %job.deployment_id, deleted = ?deleted, "old revisions deleted on this host")
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(deployment_id = %job.deployment_id, error = %err, "could not prune old revisions on this host")
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
            .and_then(|d| d.bundle)
            .map(|b| b.key);
        let protect: Vec<String> = std::iter::once(live_key.to_owned())
            .chain(previous)
            .collect();
        match backends
            .store
            .prune(backends.config.name.as_str(), &protect)
            .await
        {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(deployment_id = %id, app = %backends.config.name, deleted = ?deleted, "old bundles deleted");
                let app = backends.config.name.to_string();
                let marked = self
                    .db
                    .call(move |conn| db::mark_bundles_pruned(conn, &app, &deleted))
                    .await;
                if let Err(err) = marked {
                    tracing::warn!(deployment_id = %id, error = %err, "could not record which bundles were deleted");
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(deployment_id = %id, app = %backends.config.name, error = %err, "could not prune old bundles")
            }
        }
    }
}

/// The job of a deployment whose bundle is stored already (a redeploy or rollback, or one
/// the last stop cut short after Upload); `None` for one that has not made its bundle yet.
pub fn stored_job(deployment: &Deployment, app: &Arc<AppConfig>, env: Arc<AppEnv>) -> Option<Job> {
    Some(Job {
        deployment_id: deployment.id,
        app: app.clone(),
        version: deployment.version.clone()?,
        commit: deployment.commit_sha.as_ref().map(|sha| sha.to_string()),
        previous_version: None,
        bundle: deployment.bundle.clone()?,
        env,
    })
}

/// Bundle: the zip written off the async threads; a half-written one is removed, so that a
/// full disk, say, does not take the space of the next try.
async fn make_bundle(
    app: &AppConfig,
    artifact: PathBuf,
    version: &str,
    path: &Path,
) -> Result<Done<()>, Failed<BundleError>> {
    let appspec = runner::appspec::render_for(app);
    let host_env = runner::appspec::render_host_env(app);
    let app_env = runner::appspec::render_app_env(app);
    let (dest, version) = (path.to_owned(), version.to_owned());
    let bundled = tokio::task::spawn_blocking(move || {
        let contents = bundle::BundleContents {
            appspec: &appspec,
            host_env: &host_env,
            app_env: &app_env,
            artifact: &artifact,
            version: &version,
        };
        bundle::create(&contents, &dest)
    })
    .await
    .unwrap_or_else(|err| Err(BundleError::Task(err)));
    match bundled {
        Ok(bundled) => Ok(Done::new(
            (),
            format!("{}sha256 {}\n", bundled.listing, bundled.sha256),
        )),
        Err(err) => {
            let _ = tokio::fs::remove_file(path).await;
            Err(Failed::new(err))
        }
    }
}
