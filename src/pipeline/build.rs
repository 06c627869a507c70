//! Build: the app's configured command, run with `sh -c` in the checkout. What the request
//! brought (commit, branch, version) goes in as env vars, never into the command string.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::config::AppConfig;
use crate::process;

pub struct BuildInput<'a> {
    pub app: &'a AppConfig,
    pub checkout: &'a Path,
    pub version: &'a str,
    pub commit: &'a str,
    pub branch: &'a str,
    pub scrubbed_env: &'a [String],
}

/// Runs the build; on success returns the artifact's path and the build's output.
pub async fn run(input: BuildInput<'_>) -> Result<(PathBuf, String), (String, String)> {
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
    let done = process::run(command, timeout)
        .await
        .map_err(|err| (format!("{log}{err}\n"), err.to_string()))?;
    log.push_str(&done.log);
    if !done.success {
        log.push_str(&format!("build ended: {}\n", done.status));
        return Err((log, format!("`{}` {}", app.build, done.status)));
    }
    let artifact = input.checkout.join(&app.artifact);
    match tokio::fs::metadata(&artifact).await {
        Ok(meta) if meta.is_file() => {
            log.push_str(&format!(
                "artifact {} ({} bytes)\n",
                app.artifact.display(),
                meta.len()
            ));
            Ok((artifact, log))
        }
        _ => {
            let reason = format!("the build did not produce {}", app.artifact.display());
            log.push_str(&format!("{reason}\n"));
            Err((log, reason))
        }
    }
}
