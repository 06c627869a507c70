//! The local runner: this host is the deployment target. Like the CodeDeploy agent it keeps
//! each deployment's archive under `<data_dir>/apps/<app>/deployments/<id>/`, runs
//! ApplicationStop from the last successful revision, unpacks the new bundle (DownloadBundle),
//! copies it into `releases/<version>` (Install) and runs the new revision's scripts for the
//! other hooks, with CodeDeploy's env vars plus nonstop's. It never edits traffic itself:
//! `deploy.sh` asks the switch, through the server's loopback control endpoint.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::appspec::{self, AppSpec, AppSpecError};
use super::step::{self, Done, Failed};
use super::{Interrupted, Job, Progress, PruneError, Runner, RunnerError};
use crate::config::{AppConfig, RunnerConfig, Secret};
use crate::domain::{Hook, Stage};
use crate::process::{self, ChildEnv, Exit, LineSink, SpawnError};
use crate::store::{ArtifactStore, StoreError};
use crate::switch::TrafficSwitch;

/// What a hook of the local runner can fail with, in one line; the hook's log has the rest.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("not a zip bundle: {0}")]
    NotZip(zip::result::ZipError),
    #[error("bad zip entry: {0}")]
    BadEntry(zip::result::ZipError),
    #[error("bundle entry `{0}` points outside the bundle")]
    Outside(String),
    #[error("bundle has no appspec.yml: {0}")]
    NoAppSpec(std::io::Error),
    #[error(transparent)]
    AppSpec(#[from] AppSpecError),
    /// A script gave up; it says why in its last line.
    #[error("{last_line} ({script} {exit})")]
    Script {
        last_line: String,
        script: String,
        exit: Exit,
    },
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("could not install into {path}: {source}")]
    Install {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct LocalRunner {
    /// `<data_dir>/apps/<app>`.
    app_dir: PathBuf,
    group: String,
    store: Arc<dyn ArtifactStore>,
    switch: Arc<dyn TrafficSwitch>,
    switch_url: String,
    switch_token: Secret,
}

/// Where one deployment lives on this host.
struct Folders {
    /// `deployments/<id>`: the bundle's zip while it is unpacked.
    deployment: PathBuf,
    /// `deployments/<id>/deployment-archive`: the unpacked bundle, its scripts run from here.
    archive: PathBuf,
    /// `releases/<version>`: what Install copied, what the instance runs.
    release: PathBuf,
    /// `run`: the instances' pid files and logs, shared by every deployment.
    run: PathBuf,
}

impl LocalRunner {
    pub fn new(
        app_dir: PathBuf,
        group: String,
        store: Arc<dyn ArtifactStore>,
        switch: Arc<dyn TrafficSwitch>,
        switch_url: String,
        switch_token: Secret,
    ) -> Self {
        Self {
            app_dir,
            group,
            store,
            switch,
            switch_url,
            switch_token,
        }
    }

    fn last_revision_marker(&self) -> PathBuf {
        self.app_dir.join("last-successful-archive")
    }

    fn folders(&self, job: &Job) -> Folders {
        let deployment = self
            .app_dir
            .join("deployments")
            .join(job.deployment_id.to_string());
        Folders {
            archive: deployment.join("deployment-archive"),
            deployment,
            release: self.app_dir.join("releases").join(&job.version),
            run: self.app_dir.join("run"),
        }
    }

    /// What the hooks of `job` are told, with `live` as the live port.
    fn context<'a>(
        &'a self,
        job: &'a Job,
        folders: &'a Folders,
        live: Option<u16>,
    ) -> HookContext<'a> {
        HookContext {
            job,
            group: &self.group,
            live,
            release_dir: &folders.release,
            run_dir: &folders.run,
            switch_url: &self.switch_url,
            switch_token: self.switch_token.expose(),
        }
    }

    /// Runs every script the appspec lists for `hook`; the hook's log is all their output.
    async fn run_scripts(
        &self,
        spec: &AppSpec,
        archive: &Path,
        hook: Hook,
        context: &HookContext<'_>,
        progress: Option<&dyn Progress>,
    ) -> Result<String, Failed<LocalError>> {
        let mut console = progress.and_then(|progress| progress.console(hook.into()));
        let env = context.env(hook);
        let default_timeout = Duration::from_secs(context.job.app.hook_timeout_secs);
        let mut log = String::new();
        for script in spec.scripts(hook) {
            let timeout = script
                .timeout
                .map(Duration::from_secs)
                .unwrap_or(default_timeout);
            let mut command = env.command(archive.join(&script.location));
            command.current_dir(archive);
            log.push_str(&format!(
                "$ {} ({hook}, timeout {}s)\n",
                script.location,
                timeout.as_secs()
            ));
            let ran = run_logged(
                command,
                &script.location,
                timeout,
                context,
                &mut console,
                &mut log,
            );
            if let Err(error) = ran.await {
                return Err(Failed { log, error });
            }
        }
        Ok(log)
    }

    /// ApplicationStop runs the previous revision's scripts, as the agent does.
    async fn stop_previous(
        &self,
        context: &HookContext<'_>,
        progress: &dyn Progress,
    ) -> Result<Done<()>, Failed<LocalError>> {
        let previous = tokio::fs::read_to_string(self.last_revision_marker())
            .await
            .ok()
            .map(PathBuf::from);
        let Some(dir) = previous else {
            return Ok(Done::skipped((), NOTHING_TO_STOP));
        };
        let spec = tokio::fs::read_to_string(dir.join("appspec.yml"))
            .await
            .ok()
            .and_then(|text| appspec::parse(&text).ok());
        let Some(spec) = spec else {
            return Ok(Done::skipped((), NOTHING_TO_STOP));
        };
        let log = self
            .run_scripts(&spec, &dir, Hook::ApplicationStop, context, Some(progress))
            .await?;
        Ok(Done::new((), log))
    }

    /// DownloadBundle: fetch from the store (checksum checked) and unpack.
    async fn download(
        &self,
        job: &Job,
        folders: &Folders,
    ) -> Result<Done<AppSpec>, Failed<LocalError>> {
        let zip_path = folders.deployment.join("bundle.zip");
        self.store
            .get(&job.bundle.key, &job.bundle.sha256, &zip_path)
            .await
            .map_err(LocalError::from)?;
        let (zip, dest) = (zip_path.clone(), folders.archive.clone());
        let files = tokio::task::spawn_blocking(move || extract(&zip, &dest))
            .await
            .map_err(LocalError::from)??;
        // Unpacked, the zip is one more copy of the artifact on this host's disk.
        let _ = tokio::fs::remove_file(&zip_path).await;
        // Its scripts run as `run_as`.
        self.hand_over(job, &folders.deployment).await?;
        let spec = read_appspec(&folders.archive).await?;
        let log = format!(
            "fetched {} (sha256 {})\nunpacked {files} files into {}\n",
            job.bundle.key,
            job.bundle.sha256,
            folders.archive.display()
        );
        Ok(Done::new(spec, log))
    }

    /// One of the hooks after DownloadBundle: Install copies the release, the others run
    /// the new revision's scripts.
    async fn hook(
        &self,
        hook: Hook,
        spec: &AppSpec,
        folders: &Folders,
        context: &HookContext<'_>,
        progress: &dyn Progress,
    ) -> Result<Done<()>, Failed<LocalError>> {
        if hook == Hook::Install {
            let files = install(&folders.archive, &folders.release).await?;
            // The instance runs from it as `run_as`.
            self.hand_over(context.job, &folders.release).await?;
            let log = format!("copied {files} files to {}\n", folders.release.display());
            return Ok(Done::new((), log));
        }
        if spec.scripts(hook).is_empty() {
            return Ok(Done::skipped((), "no script for this hook\n"));
        }
        let log = self
            .run_scripts(spec, &folders.archive, hook, context, Some(progress))
            .await?;
        Ok(Done::new((), log))
    }

    /// Release, then BeforeSwitch: the new instance runs, traffic is still on the old one.
    /// Either failing stops the new instance (AfterInstall's scripts stop what runs on the
    /// idle port) and fails the deployment before any traffic reached it.
    async fn before_switch(
        &self,
        spec: &AppSpec,
        folders: &Folders,
        context: &HookContext<'_>,
        progress: &dyn Progress,
    ) -> Result<(), RunnerError> {
        let app = &context.job.app;
        for (stage, command) in [
            (Stage::Release, &app.release),
            (Stage::BeforeSwitch, &app.hooks.before_switch),
        ] {
            let work = self.app_command(stage, command.as_deref(), folders, context, progress);
            if let Err(error) = step::record(progress, stage, work).await {
                let stopped = self
                    .run_scripts(spec, &folders.archive, Hook::AfterInstall, context, None)
                    .await;
                if let Err(failed) = stopped {
                    tracing::warn!(deployment_id = %context.job.deployment_id, error = %failed.error, "could not stop the new instance after {stage} failed");
                }
                return Err(at(stage)(error));
            }
        }
        Ok(())
    }

    /// AfterSwitch, once traffic is on the new version. Its failure is recorded on the
    /// stage; the deployment stays live (the switch is done and the version answers).
    async fn after_switch(
        &self,
        folders: &Folders,
        context: &HookContext<'_>,
        progress: &dyn Progress,
    ) {
        let command = context.job.app.hooks.after_switch.as_deref();
        let work = self.app_command(Stage::AfterSwitch, command, folders, context, progress);
        if let Err(error) = step::record(progress, Stage::AfterSwitch, work).await {
            tracing::warn!(deployment_id = %context.job.deployment_id, error = %error, "after_switch failed; the new version stays live");
        }
    }

    /// One of the app's own commands (`release`, `hooks.*`), run by `sh` in the release's
    /// folder as `run_as`, with the app's env and what it is told of the deployment.
    async fn app_command(
        &self,
        stage: Stage,
        command: Option<&str>,
        folders: &Folders,
        context: &HookContext<'_>,
        progress: &dyn Progress,
    ) -> Result<Done<()>, Failed<LocalError>> {
        let Some(command) = command else {
            return Ok(Done::skipped((), "not configured\n"));
        };
        let mut child = context.release_env(stage).command("sh");
        child.arg("-c").arg(command).current_dir(&folders.release);
        let timeout = Duration::from_secs(context.job.app.hook_timeout_secs);
        let mut log = format!("$ {command} (timeout {}s)\n", timeout.as_secs());
        let mut console = progress.console(stage);
        match run_logged(child, command, timeout, context, &mut console, &mut log).await {
            Ok(()) => Ok(Done::new((), log)),
            Err(error) => Err(Failed { log, error }),
        }
    }

    /// Gives `path` to the app's `run_as` user, when it has one, and lets it pass through
    /// the folders above it up to the app's own.
    async fn hand_over(&self, job: &Job, path: &Path) -> Result<(), LocalError> {
        let Some(user) = job.app.run_user.clone() else {
            return Ok(());
        };
        let (app_dir, path) = (self.app_dir.clone(), path.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut above = path.parent();
            while let Some(dir) = above.filter(|dir| dir.starts_with(&app_dir)) {
                crate::user::pass_through(dir).map_err(io_at(dir))?;
                above = dir.parent();
            }
            user.hand_over(&path).map_err(io_at(&path))
        })
        .await?
    }

    /// The next deployment's ApplicationStop runs from this revision.
    async fn remember_revision(&self, archive: &Path) {
        let marker = self.last_revision_marker();
        if let Err(err) = tokio::fs::write(&marker, archive.display().to_string()).await {
            tracing::warn!(path = %marker.display(), error = %err, "could not record the last revision");
        }
    }

    /// The revision the next ApplicationStop runs from, by its folder's name.
    async fn last_revision(&self) -> Option<String> {
        let archive = tokio::fs::read_to_string(self.last_revision_marker())
            .await
            .ok()?;
        let folder = Path::new(&archive).parent()?.file_name()?;
        Some(folder.to_string_lossy().into_owned())
    }
}

const NOTHING_TO_STOP: &str = "no previous revision on this host: nothing to stop\n";

async fn read_appspec(archive: &Path) -> Result<AppSpec, LocalError> {
    let text = tokio::fs::read_to_string(archive.join("appspec.yml"))
        .await
        .map_err(LocalError::NoAppSpec)?;
    Ok(appspec::parse(&text)?)
}

/// What the hooks of one deployment are told; fixed when the deployment starts, so all
/// its hooks agree on which port is live and which is idle.
pub struct HookContext<'a> {
    pub job: &'a Job,
    pub group: &'a str,
    pub live: Option<u16>,
    pub release_dir: &'a Path,
    pub run_dir: &'a Path,
    pub switch_url: &'a str,
    pub switch_token: &'a str,
}

impl HookContext<'_> {
    /// A script's output as its log may show it: neither the app's secrets nor the token
    /// that lets a hook move traffic, should a script print its environment.
    fn redact(&self, output: &str) -> String {
        let output = self.job.env.redact(output);
        match self.switch_token {
            // Real tokens are long; a short one (tests) would blank out ordinary words.
            token if token.len() >= 16 => output.replace(token, "***"),
            _ => output,
        }
    }

    /// A hook's whole environment: the base allow-list, the app's own env, then what
    /// `vars` tells every hook, and the names of the app's env (deploy.sh passes those on to
    /// the instance, and nothing else of the hook's).
    pub fn env(&self, hook: Hook) -> ChildEnv {
        let mut env = ChildEnv::base();
        env.extend(self.job.env.pairs());
        env.extend(self.vars(hook));
        env.set("NONSTOP_APP_ENV", self.job.env.names());
        env
    }

    /// The environment of the app's own commands (`release`, `hooks.*`): the base, the app's
    /// env, and the deployment in five names. `NONSTOP_IDLE_PORT` is the new version's port
    /// and `NONSTOP_LIVE_PORT` the previous one's, before the switch and after it alike; no
    /// switch token (they do not move traffic).
    pub fn release_env(&self, stage: Stage) -> ChildEnv {
        let app: &AppConfig = &self.job.app;
        let mut env = ChildEnv::base();
        env.extend(self.job.env.pairs());
        env.extend([
            ("NONSTOP_STAGE", stage.as_str().to_owned()),
            ("NONSTOP_VERSION", self.job.version.clone()),
            (
                "NONSTOP_COMMIT",
                self.job.commit.clone().unwrap_or_default(),
            ),
            (
                "NONSTOP_PREVIOUS_VERSION",
                self.job.previous_version.clone().unwrap_or_default(),
            ),
            ("NONSTOP_IDLE_PORT", app.idle_port(self.live).to_string()),
            (
                "NONSTOP_LIVE_PORT",
                self.live.map(|p| p.to_string()).unwrap_or_default(),
            ),
            (
                "NONSTOP_RELEASE_DIR",
                self.release_dir.display().to_string(),
            ),
        ]);
        env.set("NONSTOP_APP_ENV", self.job.env.names());
        env
    }

    /// What a hook script is told of its deployment, as env vars: CodeDeploy's, then
    /// nonstop's.
    pub fn vars(&self, hook: Hook) -> Vec<(String, String)> {
        let app: &AppConfig = &self.job.app;
        let idle = app.idle_port(self.live);
        let profile = app.profile_of(idle).unwrap_or_default();
        let artifact = self
            .release_dir
            .join(app.artifact.file_name().unwrap_or_default());
        // The run command comes from the operator's config, never from a request; it is
        // read by `sh`, so the artifact's path goes in as one quoted word.
        let run = app
            .run
            .replace("{artifact}", &shell_quote(&artifact.display().to_string()))
            .replace("{port}", &idle.to_string())
            .replace("{profile}", profile);
        let pairs = [
            ("LIFECYCLE_EVENT", hook.as_str().to_owned()),
            (
                "DEPLOYMENT_ID",
                format!("d-nonstop-{}", self.job.deployment_id),
            ),
            (
                "DEPLOYMENT_GROUP_ID",
                format!("nonstop-{}-{}", app.name, self.group),
            ),
            ("APPLICATION_NAME", app.name.to_string()),
            ("DEPLOYMENT_GROUP_NAME", self.group.to_owned()),
            ("NONSTOP_VERSION", self.job.version.clone()),
            (
                "NONSTOP_RELEASE_DIR",
                self.release_dir.display().to_string(),
            ),
            (
                "NONSTOP_LIVE_PORT",
                self.live.map(|p| p.to_string()).unwrap_or_default(),
            ),
            ("NONSTOP_IDLE_PORT", idle.to_string()),
            ("NONSTOP_IDLE_PROFILE", profile.to_owned()),
            (
                "NONSTOP_PORTS",
                format!("{} {}", app.ports[0], app.ports[1]),
            ),
            (
                "NONSTOP_PROFILES",
                format!("{} {}", app.profiles[0], app.profiles[1]),
            ),
            ("NONSTOP_RUN", run),
            ("NONSTOP_RUN_DIR", self.run_dir.display().to_string()),
            (
                "NONSTOP_HEALTH_URL",
                format!("http://127.0.0.1:{idle}{}", app.health.path),
            ),
            ("NONSTOP_HEALTH_ATTEMPTS", app.health.attempts.to_string()),
            (
                "NONSTOP_HEALTH_INTERVAL_MS",
                app.health.interval_ms.to_string(),
            ),
            (
                "NONSTOP_SWITCH_URL",
                format!("{}/api/apps/{}/switch", self.switch_url, app.name),
            ),
            ("NONSTOP_SWITCH_TOKEN", self.switch_token.to_owned()),
            (
                "NONSTOP_DRAIN_URL",
                format!("{}/api/apps/{}/drain", self.switch_url, app.name),
            ),
            (
                "NONSTOP_DRAIN_TIMEOUT_SECS",
                app.drain_timeout_secs.to_string(),
            ),
        ];
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

/// `text` as one word for `sh`: as it is when it holds nothing `sh` reads specially,
/// else in single quotes (a `'` in it written as `'\''`).
pub fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,=@%".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

fn last_line(log: &str) -> &str {
    log.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
}

/// Runs `command` (an appspec script, or the app's `release` or `hooks`, named `what`) as
/// `run_as` to its end or `timeout`: its lines onto `console` as they are printed and its
/// output onto `log`, redacted both; a failure's error is its last line.
async fn run_logged(
    mut command: tokio::process::Command,
    what: &str,
    timeout: Duration,
    context: &HookContext<'_>,
    console: &mut Option<Box<dyn LineSink>>,
    log: &mut String,
) -> Result<(), LocalError> {
    if let Some(user) = &context.job.app.run_user {
        user.apply(&mut command);
    }
    let done = match console {
        Some(console) => {
            let mut console = process::Redacting {
                sink: console.as_mut(),
                redact: |lines: &str| context.redact(lines),
            };
            process::run_with_sink(command, timeout, Some(&mut console)).await
        }
        None => process::run(command, timeout).await,
    };
    let done = done.map_err(|err| {
        log.push_str(&format!("{err}\n"));
        LocalError::from(err)
    })?;
    let output = context.redact(&done.log);
    log.push_str(&output);
    if done.success {
        return Ok(());
    }
    log.push_str(&format!("{what} ended: {}\n", done.status));
    Err(LocalError::Script {
        last_line: last_line(&output).to_owned(),
        script: what.to_owned(),
        exit: done.status,
    })
}

/// Ties a step's error to its stage, as the pipeline records it.
fn at(stage: impl Into<Stage>) -> impl FnOnce(LocalError) -> RunnerError {
    let stage = stage.into();
    move |error| RunnerError {
        stage,
        reason: error.into(),
    }
}

#[async_trait]
impl Runner for LocalRunner {
    async fn run(&self, job: &Job, progress: &dyn Progress) -> Result<(), RunnerError> {
        let folders = self.folders(job);
        for dir in [&folders.deployment, &folders.run] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io_at(dir))
                .map_err(at(Hook::ApplicationStop))?;
        }
        // The instances write their pid files and logs here, as `run_as`.
        self.hand_over(job, &folders.run)
            .await
            .map_err(at(Hook::ApplicationStop))?;
        // Idle and live are fixed once per deployment: the hooks of one deploy must agree.
        let live = self.switch.live();
        let idle = job.app.idle_port(live);
        progress.target_port(idle).await;
        let context = self.context(job, &folders, live);

        step::record(
            progress,
            Hook::ApplicationStop,
            self.stop_previous(&context, progress),
        )
        .await
        .map_err(at(Hook::ApplicationStop))?;
        let spec = step::record(progress, Hook::DownloadBundle, self.download(job, &folders))
            .await
            .map_err(at(Hook::DownloadBundle))?;
        for hook in [
            Hook::BeforeInstall,
            Hook::Install,
            Hook::AfterInstall,
            Hook::ApplicationStart,
            Hook::ValidateService,
        ] {
            step::record(
                progress,
                hook,
                self.hook(hook, &spec, &folders, &context, progress),
            )
            .await
            .map_err(at(hook))?;
            if hook == Hook::ApplicationStart {
                progress.instance_started(idle).await;
                self.before_switch(&spec, &folders, &context, progress)
                    .await?;
            }
        }
        self.remember_revision(&folders.archive).await;
        self.after_switch(&folders, &context, progress).await;
        Ok(())
    }

    async fn clean_up_interrupted(
        &self,
        job: &Job,
        record: Interrupted<'_>,
    ) -> Result<String, RunnerError> {
        // Before AfterInstall, what runs on the idle port is the previous version, kept for
        // an instant rollback: it stays.
        if !record.started_instances {
            return Ok("no hook that starts instances had begun: nothing to stop".into());
        }
        let folders = self.folders(job);
        let Ok(text) = tokio::fs::read_to_string(folders.archive.join("appspec.yml")).await else {
            return Ok("its bundle was never unpacked: nothing was started".into());
        };
        let spec = appspec::parse(&text).map_err(|err| at(Hook::AfterInstall)(err.into()))?;
        // AfterInstall is the hook that stops whatever runs on the idle port: the same host
        // script cleans up, with the live port as it is now.
        let context = self.context(job, &folders, self.switch.live());
        self.run_scripts(&spec, &folders.archive, Hook::AfterInstall, &context, None)
            .await
            .map_err(|failed| at(Hook::AfterInstall)(failed.error))
    }

    async fn prune(&self, job: &Job, running: &[String]) -> Result<Vec<PathBuf>, PruneError> {
        let keep = match &job.app.runner {
            RunnerConfig::Local { keep, .. } => *keep as usize,
            RunnerConfig::CodeDeploy { .. } => return Ok(Vec::new()),
        };
        // The revision the next ApplicationStop runs from, and this one, always stay.
        let revisions: Vec<String> = std::iter::once(job.deployment_id.to_string())
            .chain(self.last_revision().await)
            .collect();
        let (app_dir, running) = (self.app_dir.clone(), running.to_vec());
        tokio::task::spawn_blocking(move || {
            let mut deleted = prune_folder(&app_dir.join("deployments"), keep, &revisions)?;
            deleted.extend(prune_folder(&app_dir.join("releases"), keep, &running)?);
            Ok(deleted)
        })
        .await
        .map_err(|err| PruneError {
            path: self.app_dir.clone(),
            source: std::io::Error::other(err),
        })?
    }
}

/// Deletes the folders in `dir` beyond the newest `keep` (by last change: a deployment's
/// folder and a release are made as it runs), except those named in `protect`. Returns
/// their paths. A folder that is not there has nothing to prune.
fn prune_folder(dir: &Path, keep: usize, protect: &[String]) -> Result<Vec<PathBuf>, PruneError> {
    let failed = |source| PruneError {
        path: dir.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(failed(err)),
    };
    let mut folders = Vec::new();
    for entry in entries {
        let entry = entry.map_err(failed)?;
        let metadata = entry.metadata().map_err(failed)?;
        if metadata.is_dir() {
            let name = entry.file_name().to_string_lossy().into_owned();
            folders.push((crate::store::modified(&metadata), name));
        }
    }
    let mut deleted = Vec::new();
    for name in crate::store::beyond_retention(folders, keep, protect) {
        let path = dir.join(&name);
        std::fs::remove_dir_all(&path).map_err(|source| PruneError {
            path: path.clone(),
            source,
        })?;
        deleted.push(path);
    }
    Ok(deleted)
}

/// Install: the bundle's files go to `releases/<version>` (the appspec's `files` destination
/// is for fleet hosts; on this host every release lives under the data dir). Returns how
/// many files it copied.
async fn install(archive: &Path, release_dir: &Path) -> Result<usize, LocalError> {
    let (from, to) = (archive.to_owned(), release_dir.to_owned());
    tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
        if to.exists() {
            std::fs::remove_dir_all(&to)?;
        }
        copy_tree(&from, &to)
    })
    .await?
    .map_err(|source| LocalError::Install {
        path: release_dir.to_owned(),
        source,
    })
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(to)?;
    let mut files = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            files += copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            files += 1;
        }
    }
    Ok(files)
}

/// Unpacks `zip` into `dest`, refusing entries that would land outside it (`../`, absolute
/// paths); file modes are kept so scripts stay executable. Returns the number of files.
pub fn extract(zip: &Path, dest: &Path) -> Result<usize, LocalError> {
    let file = std::fs::File::open(zip).map_err(io_at(zip))?;
    let mut archive = zip::ZipArchive::new(file).map_err(LocalError::NotZip)?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(io_at(dest))?;
    }
    let mut files = 0;
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).map_err(LocalError::BadEntry)?;
        let name = entry.name().to_owned();
        let relative = Path::new(&name);
        let safe = relative
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !safe || name.contains('\\') {
            return Err(LocalError::Outside(name));
        }
        let target = dest.join(relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&target).map_err(io_at(&target))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        let mut out = std::fs::File::create(&target).map_err(io_at(&target))?;
        std::io::copy(&mut entry, &mut out).map_err(io_at(&target))?;
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o777))
                .map_err(io_at(&target))?;
        }
        files += 1;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_with(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut writer = zip::ZipWriter::new(file.reopen().unwrap());
        for (name, data) in entries {
            let options = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
            writer.start_file(*name, options).unwrap();
            writer.write_all(data).unwrap();
        }
        writer.finish().unwrap();
        file
    }

    fn job() -> Job {
        let text = r#"
[[app]]
name = "hello"
repo = "x"
build = "true"
artifact = "target/release/hello"
run = "{artifact} --port {port} --profile {profile}"
"#;
        let app = crate::config::Config::parse(text, Path::new("n.toml"))
            .unwrap()
            .apps
            .remove(0);
        Job {
            deployment_id: crate::domain::DeploymentId::new(7),
            app: Arc::new(app),
            version: "1.0.1-SNAPSHOT-20261125140000".into(),
            commit: None,
            previous_version: None,
            env: Arc::default(),
            bundle: crate::domain::BundleRef {
                key: "hello/v.zip".into(),
                sha256: "0".repeat(64),
            },
        }
    }

    #[test]
    fn hooks_get_codedeploys_env_and_the_idle_slot() {
        let job = job();
        let context = HookContext {
            job: &job,
            group: "local",
            live: Some(8081),
            release_dir: Path::new("/data/releases/v"),
            run_dir: Path::new("/data/run"),
            switch_url: "http://127.0.0.1:9000",
            switch_token: "t",
        };
        let env: std::collections::HashMap<_, _> =
            context.vars(Hook::ApplicationStart).into_iter().collect();
        assert_eq!(env["LIFECYCLE_EVENT"], "ApplicationStart");
        assert_eq!(env["DEPLOYMENT_ID"], "d-nonstop-7");
        assert_eq!(env["APPLICATION_NAME"], "hello");
        assert_eq!(env["DEPLOYMENT_GROUP_NAME"], "local");
        assert_eq!(env["NONSTOP_LIVE_PORT"], "8081");
        assert_eq!(env["NONSTOP_IDLE_PORT"], "8082");
        assert_eq!(env["NONSTOP_IDLE_PROFILE"], "real2");
        assert_eq!(
            env["NONSTOP_RUN"],
            "/data/releases/v/hello --port 8082 --profile real2"
        );
        assert_eq!(env["NONSTOP_HEALTH_URL"], "http://127.0.0.1:8082/profile");
        assert_eq!(
            env["NONSTOP_SWITCH_URL"],
            "http://127.0.0.1:9000/api/apps/hello/switch"
        );
        assert_eq!(
            env["NONSTOP_DRAIN_URL"],
            "http://127.0.0.1:9000/api/apps/hello/drain"
        );
        assert_eq!(env["NONSTOP_DRAIN_TIMEOUT_SECS"], "30");

        let first = HookContext {
            live: None,
            ..context
        };
        let env: std::collections::HashMap<_, _> =
            first.vars(Hook::AfterInstall).into_iter().collect();
        assert_eq!(
            (
                env["NONSTOP_LIVE_PORT"].as_str(),
                env["NONSTOP_IDLE_PORT"].as_str()
            ),
            ("", "8081")
        );
    }

    #[test]
    fn a_hook_gets_the_base_the_apps_env_and_its_deployment_and_nothing_else() {
        let mut job = job();
        let mut app = (*job.app).clone();
        app.env.insert("APP_MODE".into(), "production".into());
        app.secret_values = vec![("DATABASE_URL".into(), Secret::new("postgres://s".into()))];
        job.env = Arc::new(crate::app_env::AppEnv::resolve(&app).unwrap());
        let context = HookContext {
            job: &job,
            group: "local",
            live: None,
            release_dir: Path::new("/data/releases/v"),
            run_dir: Path::new("/data/run"),
            switch_url: "http://127.0.0.1:9000",
            switch_token: "t",
        };
        let env = context.env(Hook::ApplicationStart);
        assert_eq!(env.get("APP_MODE"), Some("production"));
        assert_eq!(env.get("DATABASE_URL"), Some("postgres://s"));
        assert_eq!(env.get("NONSTOP_APP_ENV"), Some("APP_MODE DATABASE_URL"));
        let deployment: Vec<String> = context
            .vars(Hook::ApplicationStart)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        for name in env.names() {
            assert!(
                crate::process::BASE_ENV.contains(&name)
                    || ["APP_MODE", "DATABASE_URL", "NONSTOP_APP_ENV"].contains(&name)
                    || deployment.iter().any(|d| d == name),
                "{name} is none of the hook's own"
            );
        }
    }

    #[test]
    fn a_hooks_log_hides_the_switch_token_and_the_apps_secrets() {
        let mut job = job();
        let mut app = (*job.app).clone();
        app.secret_values = vec![("DATABASE_URL".into(), Secret::new("postgres://s".into()))];
        job.env = Arc::new(crate::app_env::AppEnv::resolve(&app).unwrap());
        let token = "0123456789abcdef0123";
        let context = HookContext {
            job: &job,
            group: "local",
            live: None,
            release_dir: Path::new("/data/releases/v"),
            run_dir: Path::new("/data/run"),
            switch_url: "http://127.0.0.1:9000",
            switch_token: token,
        };

        let log = context.redact(&format!(
            "NONSTOP_SWITCH_TOKEN={token}\nDATABASE_URL=postgres://s\n"
        ));

        assert_eq!(log, "NONSTOP_SWITCH_TOKEN=***\nDATABASE_URL=***\n");
    }

    #[test]
    fn the_artifacts_path_is_one_word_of_the_run_line_whatever_it_holds() {
        assert_eq!(
            shell_quote("/data/releases/v/hello"),
            "/data/releases/v/hello"
        );
        assert_eq!(
            shell_quote("/my data/it's $(id)"),
            "'/my data/it'\\''s $(id)'"
        );
        assert_eq!(shell_quote(""), "''");
        let job = job();
        let context = HookContext {
            job: &job,
            group: "local",
            live: None,
            release_dir: Path::new("/my data/releases/v"),
            run_dir: Path::new("/data/run"),
            switch_url: "http://127.0.0.1:9000",
            switch_token: "t",
        };
        let vars: std::collections::HashMap<_, _> =
            context.vars(Hook::ApplicationStart).into_iter().collect();
        assert_eq!(
            vars["NONSTOP_RUN"],
            "'/my data/releases/v/hello' --port 8081 --profile real1"
        );
        // sh reads it back as the path it was.
        let words = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf '%s\\n' {}",
                shell_quote("/my data/it's $(id)")
            ))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&words.stdout),
            "/my data/it's $(id)\n"
        );
    }

    #[test]
    fn extracts_files_with_their_modes() {
        let zip = zip_with(&[("deploy.sh", b"#!/bin/sh\n"), ("app/hello", b"bin")]);
        let dest = tempfile::tempdir().unwrap();
        let files = extract(zip.path(), &dest.path().join("out")).unwrap();
        assert_eq!(files, 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dest.path().join("out/deploy.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read(dest.path().join("out/app/hello")).unwrap(),
            b"bin"
        );
    }

    #[test]
    fn refuses_entries_that_escape_the_bundle() {
        for evil in ["../evil.sh", "/etc/evil", "a/../../evil", "..\\evil"] {
            let zip = zip_with(&[("ok.txt", b"ok"), (evil, b"x")]);
            let dest = tempfile::tempdir().unwrap();
            let err = extract(zip.path(), &dest.path().join("out")).unwrap_err();
            assert!(matches!(err, LocalError::Outside(_)), "{evil}: {err}");
            assert!(
                err.to_string().contains("outside the bundle"),
                "{evil}: {err}"
            );
            assert!(!dest.path().join("evil.sh").exists());
        }
    }
}
