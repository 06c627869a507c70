//! The nginx switch, as in the classic recipe: nginx proxies to `$service_url`, set by an
//! include file (`set $service_url http://127.0.0.1:8082;`). A switch writes the new file
//! atomically (temp file + rename), asks `nginx -t` whether the config is valid, then
//! reloads. On any failure the previous include is put back and nginx is not reloaded, so
//! traffic stays where it was. It never edits nginx's main config.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use super::{SwitchError, TrafficSwitch};
use crate::process;

/// `nginx -t` and a reload signal take milliseconds; a stuck one is a broken host.
const NGINX_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Nginx {
    include: PathBuf,
    bin: String,
    conf: Option<PathBuf>,
    live: Mutex<Option<u16>>,
}

/// The include file's text for `port`.
pub fn render_include(port: u16) -> String {
    format!("set $service_url http://127.0.0.1:{port};\n")
}

/// The port an include file points at, if it is one nonstop (or the recipe) wrote.
pub fn parse_include(text: &str) -> Option<u16> {
    let url = text
        .lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix("set $service_url "))?
        .split(';')
        .next()?
        .trim();
    let port = url.strip_prefix("http://127.0.0.1:")?.trim_end_matches('/');
    port.parse().ok().filter(|p| *p != 0)
}

impl Nginx {
    /// Reads which port the include points at now (none when the file does not exist yet).
    pub fn new(include: PathBuf, bin: String, conf: Option<PathBuf>) -> Self {
        let live = std::fs::read_to_string(&include)
            .ok()
            .and_then(|t| parse_include(&t));
        Self {
            include,
            bin,
            conf,
            live: Mutex::new(live),
        }
    }

    fn nginx(&self, args: &[&str]) -> Command {
        // nginx is told nothing of the server's environment beyond the base.
        let mut command = crate::process::ChildEnv::base().command(&self.bin);
        if let Some(conf) = &self.conf {
            command.arg("-c").arg(conf);
        }
        command.args(args);
        command
    }

    async fn run(&self, args: &[&str]) -> Result<(), NginxFailed> {
        let done = process::run(self.nginx(args), NGINX_TIMEOUT)
            .await
            .map_err(|err| NginxFailed(err.to_string()))?;
        if done.success {
            Ok(())
        } else {
            let output = done.log.trim().replace('\n', " | ");
            Err(NginxFailed(format!(
                "{} {} ({}): {output}",
                self.bin,
                args.join(" "),
                done.status
            )))
        }
    }

    async fn restore(&self, previous: Option<&str>) {
        let restored = match previous {
            Some(text) => write_atomically(&self.include, text).await,
            None => tokio::fs::remove_file(&self.include).await,
        };
        if let Err(err) = restored {
            tracing::error!(include = %self.include.display(), error = %err, "could not restore the nginx include");
        }
    }
}

/// nginx could not be started, or said no: its command, exit and output on one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NginxFailed(String);

async fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.nonstop-tmp"));
    tokio::fs::write(&temp, text).await?;
    tokio::fs::rename(&temp, path).await
}

#[async_trait]
impl TrafficSwitch for Nginx {
    fn live(&self) -> Option<u16> {
        *self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn switch_to(&self, port: u16) -> Result<(), SwitchError> {
        if port == 0 {
            return Err(SwitchError::Rejected("port 0 is not an instance".into()));
        }
        let previous = tokio::fs::read_to_string(&self.include).await.ok();
        write_atomically(&self.include, &render_include(port)).await?;
        if let Err(reason) = self.run(&["-t"]).await {
            self.restore(previous.as_deref()).await;
            return Err(SwitchError::Rejected(format!(
                "nginx rejected the new include, restored the old one: {reason}"
            )));
        }
        if let Err(reason) = self.run(&["-s", "reload"]).await {
            self.restore(previous.as_deref()).await;
            return Err(SwitchError::Rejected(format!(
                "nginx did not reload, restored the old include: {reason}"
            )));
        }
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(port);
        tracing::info!(include = %self.include.display(), port, "nginx switched");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_include_round_trips() {
        assert_eq!(
            render_include(8082),
            "set $service_url http://127.0.0.1:8082;\n"
        );
        assert_eq!(parse_include(&render_include(8082)), Some(8082));
        assert_eq!(
            parse_include("  set $service_url http://127.0.0.1:8081;  # blue\n"),
            Some(8081)
        );
        assert_eq!(
            parse_include("set $service_url http://10.0.0.1:8081;"),
            None
        );
        assert_eq!(parse_include(""), None);
    }

    #[tokio::test]
    async fn a_rejected_config_restores_the_include_and_skips_the_reload() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("service-url.inc");
        std::fs::write(&include, render_include(8081)).unwrap();
        // A stand-in nginx whose `-t` fails, recording every call.
        let calls = dir.path().join("calls");
        let fake = dir.path().join("nginx");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho \"$@\" >> {}\n[ \"$1\" = -t ] && {{ echo 'emerg: bad' >&2; exit 1; }}\nexit 0\n", calls.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();

        let nginx = Nginx::new(include.clone(), fake.display().to_string(), None);
        assert_eq!(nginx.live(), Some(8081));
        let err = nginx.switch_to(8082).await.unwrap_err().to_string();
        assert!(
            err.contains("rejected") && err.contains("emerg: bad"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&include).unwrap(),
            render_include(8081)
        );
        assert_eq!(nginx.live(), Some(8081));
        assert_eq!(
            std::fs::read_to_string(&calls).unwrap(),
            "-t\n",
            "no reload after a failed test"
        );
    }
}
