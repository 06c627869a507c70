//! `appspec.yml`, the CodeDeploy file that maps lifecycle hooks to scripts. nonstop writes
//! one into every bundle (every hook calls `deploy.sh`) and the local runner reads it back,
//! checked against the agent's rules. Pure functions, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{AppConfig, RunnerConfig};
use crate::domain::Hook;

/// CodeDeploy refuses hook timeouts above an hour.
pub const MAX_HOOK_TIMEOUT_SECS: u64 = 3600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub version: f32,
    pub os: String,
    #[serde(default)]
    pub files: Vec<FileMapping>,
    #[serde(default)]
    pub hooks: BTreeMap<String, Vec<HookScript>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMapping {
    pub source: String,
    pub destination: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookScript {
    pub location: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runas: Option<String>,
}

/// The appspec for `app`'s bundles: the `files` destination and `runas` come from its
/// CodeDeploy runner settings (defaults: `destination_of`, the agent's own user).
pub fn render_for(app: &AppConfig) -> String {
    let runas = match &app.runner {
        RunnerConfig::CodeDeploy { runas, .. } => runas.as_deref(),
        RunnerConfig::Local { .. } => None,
    };
    render_with(&destination_of(app), app.hook_timeout_secs, runas)
}

/// Where the agent installs `app`'s bundles on each host: the runner's `destination`, else
/// `/opt/nonstop/<app>`.
pub fn destination_of(app: &AppConfig) -> String {
    match &app.runner {
        RunnerConfig::CodeDeploy {
            destination: Some(destination),
            ..
        } => destination.clone(),
        _ => format!("/opt/nonstop/{}", app.name),
    }
}

/// `nonstop.env`, bundled beside `deploy.sh`: what the script needs on a host where the
/// CodeDeploy agent runs the hooks and nobody sets nonstop's env vars. deploy.sh reads it
/// (it never sources it) and a variable already set wins, so the local runner's own values
/// always come first. One `NAME=value` per line; values are single lines.
pub fn render_host_env(app: &AppConfig) -> String {
    let destination = destination_of(app);
    let (nginx_include, profile_url, release_host) = match &app.runner {
        RunnerConfig::CodeDeploy {
            nginx_include,
            profile_url,
            release_host,
            ..
        } => (
            nginx_include.as_deref(),
            profile_url.as_deref(),
            release_host.as_deref(),
        ),
        RunnerConfig::Local { .. } => (None, None, None),
    };
    let artifact = app
        .artifact
        .file_name()
        .map(|name| format!("{destination}/{}", name.to_string_lossy()))
        .unwrap_or_default();
    let one_line = |value: &str| value.replace(['\r', '\n'], " ");
    let pairs = [
        ("NONSTOP_RUN_TEMPLATE", one_line(&app.run)),
        ("NONSTOP_ARTIFACT", artifact),
        ("NONSTOP_RUN_DIR", format!("{destination}/run")),
        (
            "NONSTOP_PORTS",
            format!("{} {}", app.ports[0], app.ports[1]),
        ),
        (
            "NONSTOP_PROFILES",
            format!("{} {}", app.profiles[0], app.profiles[1]),
        ),
        ("NONSTOP_HEALTH_PATH", one_line(&app.health.path)),
        ("NONSTOP_HEALTH_ATTEMPTS", app.health.attempts.to_string()),
        (
            "NONSTOP_HEALTH_INTERVAL_MS",
            app.health.interval_ms.to_string(),
        ),
        (
            "NONSTOP_NGINX_INCLUDE",
            nginx_include
                .unwrap_or("/etc/nginx/conf.d/service-url.inc")
                .to_owned(),
        ),
        (
            "NONSTOP_PROFILE_URL",
            profile_url.unwrap_or("http://127.0.0.1/profile").to_owned(),
        ),
    ];
    // The host's own env file, where a fleet host keeps the app's secrets: the same path as
    // on the server.
    let env_file = app
        .env_file
        .as_ref()
        .map(|file| ("NONSTOP_ENV_FILE", one_line(&file.display().to_string())));
    // The app's own commands, for deploy.sh's ValidateService to run around the switch on
    // a fleet host; on this host the local runner runs them as stages of their own, so a
    // local bundle does not carry them.
    let fleet = matches!(app.runner, RunnerConfig::CodeDeploy { .. });
    let commands = [
        ("NONSTOP_RELEASE", app.release.as_deref()),
        ("NONSTOP_RELEASE_HOST", release_host),
        ("NONSTOP_BEFORE_SWITCH", app.hooks.before_switch.as_deref()),
        ("NONSTOP_AFTER_SWITCH", app.hooks.after_switch.as_deref()),
    ]
    .into_iter()
    .filter(|_| fleet)
    .filter_map(|(name, value)| value.map(|value| (name, one_line(value))));
    let mut text = String::from(
        "# Written by nonstop for hosts where the CodeDeploy agent runs this bundle's hooks.\n\
         # deploy.sh reads it (never sources it); a variable already set wins.\n",
    );
    for (name, value) in pairs.into_iter().chain(env_file).chain(commands) {
        text.push_str(&format!("{name}={value}\n"));
    }
    text
}

/// `app.env`: the app's `env` table (never its secrets, nor its env file's values), which
/// deploy.sh gives the instance on hosts where no runner set the app's env.
pub fn render_app_env(app: &AppConfig) -> String {
    let mut text = String::from(
        "# The app's env from nonstop's config (not secret). Secrets reach a fleet host\n\
         # through its own env file (NONSTOP_ENV_FILE in nonstop.env), never through a bundle.\n",
    );
    // Config validation keeps every value on one line.
    for (name, value) in &app.env {
        text.push_str(&format!("{name}={value}\n"));
    }
    text
}

/// The appspec nonstop bundles: every scriptable hook runs `deploy.sh` with `timeout_secs`.
pub fn render(destination: &str, timeout_secs: u64) -> String {
    render_with(destination, timeout_secs, None)
}

/// `render`, with the hooks run as `runas` on each host when given.
pub fn render_with(destination: &str, timeout_secs: u64, runas: Option<&str>) -> String {
    let hooks = Hook::ALL
        .iter()
        .filter(|hook| hook.is_scriptable())
        .map(|hook| {
            let script = HookScript {
                location: "deploy.sh".into(),
                timeout: Some(timeout_secs.min(MAX_HOOK_TIMEOUT_SECS)),
                runas: runas.map(str::to_owned),
            };
            (hook.as_str().to_owned(), vec![script])
        })
        .collect();
    let spec = AppSpec {
        version: 0.0,
        os: "linux".into(),
        files: vec![FileMapping {
            source: "/".into(),
            destination: destination.into(),
        }],
        hooks,
    };
    serde_yaml_ng::to_string(&spec).expect("an appspec always serialises")
}

/// Why an appspec was refused: the CodeDeploy agent's rules, each in one line.
#[derive(Debug, thiserror::Error)]
pub enum AppSpecError {
    #[error("appspec.yml: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("appspec.yml: version must be 0.0, not {0}")]
    Version(f32),
    #[error("appspec.yml: os must be linux, not {0}")]
    Os(String),
    #[error("appspec.yml: files destination {0} must be an absolute path")]
    Destination(String),
    #[error("appspec.yml: unknown hook {0}")]
    UnknownHook(String),
    #[error("appspec.yml: {0} is run by the agent and takes no scripts")]
    AgentHook(Hook),
    #[error("appspec.yml: {hook} script {location} must be a path inside the bundle")]
    Outside { hook: Hook, location: String },
    #[error("appspec.yml: {0} runas must be one user name")]
    RunAs(Hook),
    #[error("appspec.yml: {0} timeout must be 1..={MAX_HOOK_TIMEOUT_SECS} seconds")]
    Timeout(Hook),
}

/// Parses and checks an appspec as the CodeDeploy agent would.
pub fn parse(text: &str) -> Result<AppSpec, AppSpecError> {
    let spec: AppSpec = serde_yaml_ng::from_str(text)?;
    if spec.version != 0.0 {
        return Err(AppSpecError::Version(spec.version));
    }
    if spec.os != "linux" {
        return Err(AppSpecError::Os(spec.os));
    }
    if let Some(file) = spec.files.iter().find(|f| !f.destination.starts_with('/')) {
        return Err(AppSpecError::Destination(file.destination.clone()));
    }
    for (name, scripts) in &spec.hooks {
        let hook = Hook::parse(name).ok_or_else(|| AppSpecError::UnknownHook(name.clone()))?;
        if !hook.is_scriptable() {
            return Err(AppSpecError::AgentHook(hook));
        }
        for script in scripts {
            check_script(hook, script)?;
        }
    }
    Ok(spec)
}

fn check_script(hook: Hook, script: &HookScript) -> Result<(), AppSpecError> {
    let inside = std::path::Path::new(&script.location)
        .components()
        .all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
    if !inside {
        return Err(AppSpecError::Outside {
            hook,
            location: script.location.clone(),
        });
    }
    if script
        .runas
        .as_deref()
        .is_some_and(|u| u.is_empty() || u.contains(char::is_whitespace))
    {
        return Err(AppSpecError::RunAs(hook));
    }
    if script
        .timeout
        .is_some_and(|t| t == 0 || t > MAX_HOOK_TIMEOUT_SECS)
    {
        return Err(AppSpecError::Timeout(hook));
    }
    Ok(())
}

impl AppSpec {
    pub fn scripts(&self, hook: Hook) -> &[HookScript] {
        self.hooks
            .get(hook.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_appspec_follows_the_agents_rules() {
        let text = render("/opt/nonstop/hello", 300);
        let spec = parse(&text).unwrap();
        assert_eq!(spec.os, "linux");
        assert_eq!(spec.files[0].destination, "/opt/nonstop/hello");
        let hooks: Vec<_> = spec.hooks.keys().map(String::as_str).collect();
        for hook in [
            "ApplicationStop",
            "BeforeInstall",
            "AfterInstall",
            "ApplicationStart",
            "ValidateService",
        ] {
            assert!(hooks.contains(&hook), "{hook} missing from {text}");
            assert_eq!(
                spec.scripts(Hook::parse(hook).unwrap())[0].location,
                "deploy.sh"
            );
        }
        assert!(!hooks.contains(&"Install") && !hooks.contains(&"DownloadBundle"));
        assert!(text.contains("version: 0.0"), "{text}");
    }

    #[test]
    fn a_codedeploy_app_gets_its_destination_and_runas_in_every_hook() {
        let text = r#"
[[app]]
name = "hello"
repo = "x"
build = "true"
artifact = "hello"
run = "{artifact} --port {port}"
hook_timeout_secs = 5000
store = { kind = "s3", bucket = "releases" }
runner = { kind = "codedeploy", application = "hello", group = "fleet", destination = "/srv/hello", runas = "deploy" }
"#;
        let config = crate::config::Config::parse(text, std::path::Path::new("n.toml")).unwrap();
        let yaml = render_for(&config.apps[0]);
        let spec = parse(&yaml).unwrap();
        assert_eq!(
            spec.files,
            [FileMapping {
                source: "/".into(),
                destination: "/srv/hello".into()
            }]
        );
        // Every hook the agent runs scripts for, each as `deploy`, within the agent's hour.
        let scriptable: Vec<_> = Hook::ALL.iter().filter(|h| h.is_scriptable()).collect();
        assert_eq!(spec.hooks.len(), scriptable.len(), "{yaml}");
        for hook in scriptable {
            let scripts = spec.scripts(*hook);
            assert_eq!(scripts.len(), 1, "{hook}: {yaml}");
            assert_eq!(scripts[0].runas.as_deref(), Some("deploy"), "{hook}");
            assert_eq!(scripts[0].timeout, Some(MAX_HOOK_TIMEOUT_SECS), "{hook}");
        }
        assert!(yaml.contains("runas: deploy"), "{yaml}");

        let local = crate::config::Config::parse(
            &text.replace("store = {", "#").replace("runner = {", "#"),
            std::path::Path::new("n.toml"),
        )
        .unwrap();
        let spec = parse(&render_for(&local.apps[0])).unwrap();
        assert_eq!(spec.files[0].destination, "/opt/nonstop/hello");
        assert_eq!(spec.scripts(Hook::AfterInstall)[0].runas, None);
    }

    #[test]
    fn the_host_env_tells_deploy_sh_what_a_fleet_host_needs() {
        let text = r#"
[[app]]
name = "hello"
repo = "x"
build = "true"
artifact = "target/release/hello"
run = "{artifact} --port {port} --profile {profile}"
health = { path = "/health", attempts = 7, interval_ms = 300 }
store = { kind = "s3", bucket = "releases" }
runner = { kind = "codedeploy", application = "hello", group = "fleet", destination = "/srv/hello", profile_url = "http://127.0.0.1:81/profile" }
"#;
        let config = crate::config::Config::parse(text, std::path::Path::new("n.toml")).unwrap();
        let env = render_host_env(&config.apps[0]);
        let pairs: BTreeMap<_, _> = env
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_once('=').unwrap())
            .collect();
        assert_eq!(
            pairs,
            BTreeMap::from([
                (
                    "NONSTOP_RUN_TEMPLATE",
                    "{artifact} --port {port} --profile {profile}"
                ),
                ("NONSTOP_ARTIFACT", "/srv/hello/hello"),
                ("NONSTOP_RUN_DIR", "/srv/hello/run"),
                ("NONSTOP_PORTS", "8081 8082"),
                ("NONSTOP_PROFILES", "real1 real2"),
                ("NONSTOP_HEALTH_PATH", "/health"),
                ("NONSTOP_HEALTH_ATTEMPTS", "7"),
                ("NONSTOP_HEALTH_INTERVAL_MS", "300"),
                ("NONSTOP_NGINX_INCLUDE", "/etc/nginx/conf.d/service-url.inc"),
                ("NONSTOP_PROFILE_URL", "http://127.0.0.1:81/profile"),
            ])
        );
    }

    #[test]
    fn timeouts_are_capped_at_an_hour() {
        let spec = parse(&render("/x", 7200)).unwrap();
        assert_eq!(spec.scripts(Hook::ValidateService)[0].timeout, Some(3600));
    }

    #[test]
    fn agent_rule_breaks_are_refused() {
        let base = "version: 0.0\nos: linux\nhooks:\n";
        for (hooks, why) in [
            ("  Install:\n    - location: x.sh\n", "run by the agent"),
            ("  Deploy:\n    - location: x.sh\n", "unknown hook"),
            (
                "  AfterInstall:\n    - location: ../x.sh\n",
                "inside the bundle",
            ),
            (
                "  AfterInstall:\n    - location: x.sh\n      timeout: 3601\n",
                "timeout",
            ),
            (
                "  AfterInstall:\n    - location: x.sh\n      runas: two users\n",
                "runas",
            ),
        ] {
            let err = parse(&format!("{base}{hooks}")).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        assert!(
            parse("version: 1.0\nos: linux\n")
                .unwrap_err()
                .to_string()
                .contains("version")
        );
    }
}
