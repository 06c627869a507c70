//! Build: the app's configured command, run with `sh -c` in the checkout. What the request
//! brought (commit, branch, version) goes in as env vars, never into the command string.
//! The build's environment is built from nothing: the base allow-list, the toolchain's
//! locations, nonstop's `NONSTOP_*` and the app's own env; never the server's secrets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::app_env::AppEnv;
use crate::config::AppConfig;
use crate::process::{self, ChildEnv, Exit, LineSink, Redacting, SpawnError};
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
    pub env: &'a AppEnv,
    /// Which of the app's env names changed since its last deployment, for the log's top.
    pub env_change: Option<&'a str>,
}

/// Where the Rust toolchain and its caches are, when the server was told: tool locations,
/// not secrets, and without them `cargo` under a custom location is not found.
pub const TOOLCHAIN_ENV: [&str; 2] = ["CARGO_HOME", "RUSTUP_HOME"];

/// Everything a build is told, as env vars.
pub fn build_env(input: &BuildInput<'_>) -> ChildEnv {
    let mut env = ChildEnv::base().inherit(&TOOLCHAIN_ENV);
    env.extend(input.env.pairs());
    env.extend([
        ("NONSTOP_VERSION", input.version),
        ("NONSTOP_COMMIT", input.commit),
        ("NONSTOP_BRANCH", input.branch),
        ("NONSTOP_APP", input.app.name.as_str()),
    ]);
    env
}

/// Runs the build; on success its value is the artifact's path.
pub async fn run(
    input: BuildInput<'_>,
    console: &mut dyn LineSink,
) -> Result<Done<PathBuf>, Failed<BuildError>> {
    let app = input.app;
    let mut command = build_env(&input).command("sh");
    command
        .arg("-c")
        .arg(&app.build)
        .current_dir(input.checkout);
    if let Some(user) = &app.build_user {
        user.apply(&mut command);
    }
    let timeout = Duration::from_secs(app.build_timeout_secs);
    let mut log = match input.env_change {
        Some(change) => format!("{change}\n$ {}\n", app.build),
        None => format!("$ {}\n", app.build),
    };
    let mut console = Redacting {
        sink: console,
        redact: |lines: &str| input.env.redact(lines),
    };
    let done = match process::run_with_sink(command, timeout, Some(&mut console)).await {
        Ok(done) => done,
        Err(err) => return Err(Failed::after(log, err.into())),
    };
    log.push_str(&input.env.redact(&done.log));
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
