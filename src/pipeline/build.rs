//! Build: the app's configured command, run with `sh -c` in the checkout. What the request
//! brought (commit, branch, version) goes in as env vars, never into the command string.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::config::AppConfig;
use crate::process::{self, Exit, SpawnError};
use crate::runner::step::{Done, Failed};

/// What a build can fail with, in one line; its log has the command's output.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("`{command}` {exit}")]
    Command { command: String, exit: Exit },
    #[error("the build did not produce {}", .0.display())]
    NoArtifact(PathBuf),
}

pub struct BuildInput<'a> {
    pub app: &'a AppConfig,
    pub checkout: &'a Path,
    pub version: &'a str,
    pub commit: &'a str,
    pub branch: &'a str,
    pub scrubbed_env: &'a [String],
}

/// Runs the build; on success its value is the artifact's path.
pub async fn run(input: BuildInput<'_>) -> Result<Done<PathBuf>, Failed<BuildError>> {
    let app = input.app;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&app.build)
        .current_dir(input.checkout)
        .env("NONSTOP_VERSION", input.version)
        .env("NONSTOP_COMMIT", input.commit)
        .env("NONSTOP_BRANCH", input.branch)
        .env("NONSTOP_APP", app.name.as_str());
    for name in input.scrubbed_env {
        command.env_remove(name);
    }
    let timeout = Duration::from_secs(app.build_timeout_secs);
    let mut log = format!("$ {}\n", app.build);
    let done = match process::run(command, timeout).await {
        Ok(done) => done,
        Err(err) => return Err(Failed::after(log, err.into())),
    };
    log.push_str(&done.log);
    if !done.success {
        log.push_str(&format!("build ended: {}\n", done.status));
        let error = BuildError::Command {
            command: app.build.clone(),
            exit: done.status,
        };
        return Err(Failed { log, error });
    }
    let artifact = input.checkout.join(&app.artifact);
    match tokio::fs::metadata(&artifact).await {
        Ok(meta) if meta.is_file() => {
            log.push_str(&format!(
                "artifact {} ({} bytes)\n",
                app.artifact.display(),
                meta.len()
            ));
            Ok(Done::new(artifact, log))
        }
        _ => Err(Failed::after(
            log,
            BuildError::NoArtifact(app.artifact.clone()),
        )),
    }
}
