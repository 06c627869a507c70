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
use tokio::process::Command;

use super::appspec::{self, AppSpec};
use super::{Interrupted, Job, Progress, Runner, RunnerError};
use crate::config::{AppConfig, RunnerConfig, Secret};
use crate::domain::{Hook, StageStatus};
use crate::process;
use crate::store::ArtifactStore;
use crate::switch::TrafficSwitch;

pub struct LocalRunner {
    /// `<data_dir>/apps/<app>`.
    app_dir: PathBuf,
    group: String,
    store: Arc<dyn ArtifactStore>,
    switch: Arc<dyn TrafficSwitch>,
    switch_url: String,
    switch_token: Secret,
    /// Env vars holding nonstop's own secrets: hooks and apps never see them.
    scrubbed_env: Vec<String>,
}

impl LocalRunner {
    pub fn new(
        app_dir: PathBuf,
        group: String,
        store: Arc<dyn ArtifactStore>,
        switch: Arc<dyn TrafficSwitch>,
        switch_url: String,
        switch_token: Secret,
        scrubbed_env: Vec<String>,
    ) -> Self {
        Self {
            app_dir,
            group,
            store,
            switch,
            switch_url,
            switch_token,
            scrubbed_env,
        }
    }

    fn last_revision_marker(&self) -> PathBuf {
        self.app_dir.join("last-successful-archive")
    }

    /// Runs every script the appspec lists for `hook`; the hook's log is all their output.
    async fn run_scripts(
        &self,
        spec: &AppSpec,
        archive: &Path,
        hook: Hook,
        env: &[(String, String)],
        default_timeout: Duration,
    ) -> Result<String, (String, String)> {
        let mut log = String::new();
        for script in spec.scripts(hook) {
            let path = archive.join(&script.location);
            let timeout = script
                .timeout
                .map(Duration::from_secs)
                .unwrap_or(default_timeout);
            let mut command = Command::new(&path);
            command
                .current_dir(archive)
                .envs(env.iter().map(|(k, v)| (k, v)));
            for name in &self.scrubbed_env {
                command.env_remove(name);
            }
            log.push_str(&format!(
                "$ {} ({hook}, timeout {}s)\n",
                script.location,
                timeout.as_secs()
            ));
            match process::run(command, timeout).await {
                Ok(done) => {
                    log.push_str(&done.log);
                    if !done.success {
                        log.push_str(&format!("{} ended: {}\n", script.location, done.status));
                        // A script says why it gave up in its last line.
                        let reason = format!(
                            "{} ({} {})",
                            last_line(&done.log),
                            script.location,
                            done.status
                        );
                        return Err((log, reason));
                    }
                }
                Err(err) => {
                    log.push_str(&format!("{err}\n"));
                    return Err((log, err.to_string()));
                }
            }
        }
        Ok(log)
    }
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
    /// Everything a hook script is told, as env vars: CodeDeploy's, then nonstop's.
    pub fn env(&self, hook: Hook) -> Vec<(String, String)> {
        let app: &AppConfig = &self.job.app;
        let idle = app.idle_port(self.live);
        let profile = app.profile_of(idle).unwrap_or_default();
        let artifact = self
            .release_dir
            .join(app.artifact.file_name().unwrap_or_default());
        // The run command comes from the operator's config, never from a request.
        let run = app
            .run
            .replace("{artifact}", &artifact.display().to_string())
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
        ];
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

fn last_line(log: &str) -> &str {
    log.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
}

#[async_trait]
impl Runner for LocalRunner {
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
        let archive = self
            .app_dir
            .join("deployments")
            .join(job.deployment_id.to_string())
            .join("deployment-archive");
        let Ok(text) = tokio::fs::read_to_string(archive.join("appspec.yml")).await else {
            return Ok("its bundle was never unpacked: nothing was started".into());
        };
        let spec = appspec::parse(&text).map_err(|reason| RunnerError {
            hook: Hook::AfterInstall,
            reason,
        })?;
        // AfterInstall is the hook that stops whatever runs on the idle port: the same host
        // script cleans up, with the live port as it is now.
        let release_dir = self.app_dir.join("releases").join(&job.version);
        let run_dir = self.app_dir.join("run");
        let context = HookContext {
            job,
            group: &self.group,
            live: self.switch.live(),
            release_dir: &release_dir,
            run_dir: &run_dir,
            switch_url: &self.switch_url,
            switch_token: self.switch_token.expose(),
        };
        let timeout = Duration::from_secs(job.app.hook_timeout_secs);
        self.run_scripts(
            &spec,
            &archive,
            Hook::AfterInstall,
            &context.env(Hook::AfterInstall),
            timeout,
        )
        .await
        .map_err(|(_, reason)| RunnerError {
            hook: Hook::AfterInstall,
            reason,
        })
    }

    async fn prune(&self, job: &Job, running: &[String]) -> Result<Vec<String>, String> {
        let keep = match &job.app.runner {
            RunnerConfig::Local { keep, .. } => *keep as usize,
            RunnerConfig::CodeDeploy { .. } => return Ok(Vec::new()),
        };
        let app_dir = self.app_dir.clone();
        // The revision the next ApplicationStop runs from, and this one, always stay.
        let mut revisions = vec![job.deployment_id.to_string()];
        if let Some(last) = tokio::fs::read_to_string(self.last_revision_marker())
            .await
            .ok()
            .and_then(|archive| Some(Path::new(&archive).parent()?.file_name()?.to_owned()))
        {
            revisions.push(last.to_string_lossy().into_owned());
        }
        let running = running.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut deleted = prune_folder(&app_dir.join("deployments"), keep, &revisions)?;
            deleted.extend(prune_folder(&app_dir.join("releases"), keep, &running)?);
            Ok(deleted)
        })
        .await
        .map_err(|err| err.to_string())?
    }

    async fn run(&self, job: &Job, progress: &dyn Progress) -> Result<(), RunnerError> {
        let fail = |hook: Hook, reason: String| RunnerError { hook, reason };
        let deployment_dir = self
            .app_dir
            .join("deployments")
            .join(job.deployment_id.to_string());
        let archive = deployment_dir.join("deployment-archive");
        let release_dir = self.app_dir.join("releases").join(&job.version);
        let run_dir = self.app_dir.join("run");
        for dir in [&deployment_dir, &run_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|err| fail(Hook::ApplicationStop, format!("{}: {err}", dir.display())))?;
        }
        // Idle and live are fixed once per deployment: the hooks of one deploy must agree.
        let live = self.switch.live();
        progress.target_port(job.app.idle_port(live)).await;
        let default_timeout = Duration::from_secs(job.app.hook_timeout_secs);
        let context = HookContext {
            job,
            group: &self.group,
            live,
            release_dir: &release_dir,
            run_dir: &run_dir,
            switch_url: &self.switch_url,
            switch_token: self.switch_token.expose(),
        };
        let env = |hook: Hook| context.env(hook);

        // ApplicationStop runs the previous revision's scripts, as the agent does.
        progress.hook_started(Hook::ApplicationStop).await;
        let previous = tokio::fs::read_to_string(self.last_revision_marker())
            .await
            .ok()
            .map(PathBuf::from);
        let previous_spec = match &previous {
            Some(dir) => tokio::fs::read_to_string(dir.join("appspec.yml"))
                .await
                .ok()
                .and_then(|t| appspec::parse(&t).ok()),
            None => None,
        };
        match (previous, previous_spec) {
            (Some(dir), Some(spec)) => {
                match self
                    .run_scripts(
                        &spec,
                        &dir,
                        Hook::ApplicationStop,
                        &env(Hook::ApplicationStop),
                        default_timeout,
                    )
                    .await
                {
                    Ok(log) => {
                        progress
                            .hook_finished(Hook::ApplicationStop, StageStatus::Succeeded, &log)
                            .await
                    }
                    Err((log, reason)) => {
                        progress
                            .hook_finished(Hook::ApplicationStop, StageStatus::Failed, &log)
                            .await;
                        return Err(fail(Hook::ApplicationStop, reason));
                    }
                }
            }
            _ => {
                let log = "no previous revision on this host: nothing to stop\n";
                progress
                    .hook_finished(Hook::ApplicationStop, StageStatus::Skipped, log)
                    .await;
            }
        }

        // DownloadBundle: fetch from the store (checksum checked) and unpack.
        progress.hook_started(Hook::DownloadBundle).await;
        let zip_path = deployment_dir.join("bundle.zip");
        let downloaded = async {
            self.store
                .get(&job.bundle_key, &job.bundle_sha256, &zip_path)
                .await
                .map_err(|err| err.to_string())?;
            let (zip, dest) = (zip_path.clone(), archive.clone());
            let files = tokio::task::spawn_blocking(move || extract(&zip, &dest))
                .await
                .map_err(|err| err.to_string())??;
            // Unpacked, the zip is one more copy of the artifact on this host's disk.
            let _ = tokio::fs::remove_file(&zip_path).await;
            let text = tokio::fs::read_to_string(archive.join("appspec.yml"))
                .await
                .map_err(|err| format!("bundle has no appspec.yml: {err}"))?;
            let spec = appspec::parse(&text)?;
            Ok::<_, String>((spec, files))
        }
        .await;
        let spec = match downloaded {
            Ok((spec, files)) => {
                let log = format!(
                    "fetched {} (sha256 {})\nunpacked {files} files into {}\n",
                    job.bundle_key,
                    job.bundle_sha256,
                    archive.display()
                );
                progress
                    .hook_finished(Hook::DownloadBundle, StageStatus::Succeeded, &log)
                    .await;
                spec
            }
            Err(reason) => {
                progress
                    .hook_finished(
                        Hook::DownloadBundle,
                        StageStatus::Failed,
                        &format!("{reason}\n"),
                    )
                    .await;
                return Err(fail(Hook::DownloadBundle, reason));
            }
        };

        for hook in [
            Hook::BeforeInstall,
            Hook::Install,
            Hook::AfterInstall,
            Hook::ApplicationStart,
            Hook::ValidateService,
        ] {
            progress.hook_started(hook).await;
            let outcome = if hook == Hook::Install {
                install(&archive, &release_dir).await
            } else if spec.scripts(hook).is_empty() {
                progress
                    .hook_finished(hook, StageStatus::Skipped, "no script for this hook\n")
                    .await;
                continue;
            } else {
                self.run_scripts(&spec, &archive, hook, &env(hook), default_timeout)
                    .await
            };
            match outcome {
                Ok(log) => {
                    progress
                        .hook_finished(hook, StageStatus::Succeeded, &log)
                        .await
                }
                Err((log, reason)) => {
                    progress
                        .hook_finished(hook, StageStatus::Failed, &log)
                        .await;
                    return Err(fail(hook, reason));
                }
            }
            if hook == Hook::ApplicationStart {
                progress.instance_started(job.app.idle_port(live)).await;
            }
        }

        // The next deployment's ApplicationStop runs from this revision.
        let marker = self.last_revision_marker();
        if let Err(err) = tokio::fs::write(&marker, archive.display().to_string()).await {
            tracing::warn!(path = %marker.display(), error = %err, "could not record the last revision");
        }
        Ok(())
    }
}

/// Deletes the folders in `dir` beyond the newest `keep` (by last change: a deployment's
/// folder and a release are made as it runs), except those named in `protect`. Returns
/// their paths. A folder that is not there has nothing to prune.
fn prune_folder(dir: &Path, keep: usize, protect: &[String]) -> Result<Vec<String>, String> {
    let describe = |err: std::io::Error| format!("{}: {err}", dir.display());
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(describe(err)),
    };
    let mut folders = Vec::new();
    for entry in entries {
        let entry = entry.map_err(describe)?;
        let metadata = entry.metadata().map_err(describe)?;
        if metadata.is_dir() {
            let name = entry.file_name().to_string_lossy().into_owned();
            folders.push((crate::store::modified(&metadata), name));
        }
    }
    let mut deleted = Vec::new();
    for name in crate::store::beyond_retention(folders, keep, protect) {
        let path = dir.join(&name);
        std::fs::remove_dir_all(&path).map_err(|err| format!("{}: {err}", path.display()))?;
        deleted.push(path.display().to_string());
    }
    Ok(deleted)
}

/// Install: the bundle's files go to `releases/<version>` (the appspec's `files` destination
/// is for fleet hosts; on this host every release lives under the data dir).
async fn install(archive: &Path, release_dir: &Path) -> Result<String, (String, String)> {
    let (from, to) = (archive.to_owned(), release_dir.to_owned());
    let copied = tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
        if to.exists() {
            std::fs::remove_dir_all(&to)?;
        }
        copy_tree(&from, &to)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    match copied {
        Ok(files) => Ok(format!(
            "copied {files} files to {}\n",
            release_dir.display()
        )),
        Err(err) => {
            let reason = format!("could not install into {}: {err}", release_dir.display());
            Err((format!("{reason}\n"), reason))
        }
    }
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
pub fn extract(zip: &Path, dest: &Path) -> Result<usize, String> {
    let file = std::fs::File::open(zip).map_err(|err| format!("{}: {err}", zip.display()))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|err| format!("not a zip bundle: {err}"))?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|err| format!("{}: {err}", dest.display()))?;
    }
    let mut files = 0;
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|err| format!("bad zip entry: {err}"))?;
        let name = entry.name().to_owned();
        let relative = Path::new(&name);
        let safe = relative
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !safe || name.contains('\\') {
            return Err(format!("bundle entry `{name}` points outside the bundle"));
        }
        let target = dest.join(relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&target)
                .map_err(|err| format!("{}: {err}", target.display()))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|err| format!("{}: {err}", parent.display()))?;
        }
        let mut out =
            std::fs::File::create(&target).map_err(|err| format!("{}: {err}", target.display()))?;
        std::io::copy(&mut entry, &mut out)
            .map_err(|err| format!("{}: {err}", target.display()))?;
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o777))
                .map_err(|err| format!("{}: {err}", target.display()))?;
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
            deployment_id: 7,
            app: Arc::new(app),
            version: "1.0.1-SNAPSHOT-20261125140000".into(),
            bundle_key: "hello/v.zip".into(),
            bundle_sha256: "0".repeat(64),
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
            context.env(Hook::ApplicationStart).into_iter().collect();
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

        let first = HookContext {
            live: None,
            ..context
        };
        let env: std::collections::HashMap<_, _> =
            first.env(Hook::AfterInstall).into_iter().collect();
        assert_eq!(
            (
                env["NONSTOP_LIVE_PORT"].as_str(),
                env["NONSTOP_IDLE_PORT"].as_str()
            ),
            ("", "8081")
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
            assert!(err.contains("outside the bundle"), "{evil}: {err}");
            assert!(!dest.path().join("evil.sh").exists());
        }
    }
}
