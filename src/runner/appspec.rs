//! `appspec.yml`, the CodeDeploy file that maps lifecycle hooks to scripts. nonstop writes
//! one into every bundle (every hook calls `deploy.sh`) and the local runner reads it back,
//! checked against the agent's rules. Pure functions, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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

/// The appspec nonstop bundles: every scriptable hook runs `deploy.sh` with `timeout_secs`.
pub fn render(destination: &str, timeout_secs: u64) -> String {
    let hooks = Hook::ALL
        .iter()
        .filter(|hook| hook.is_scriptable())
        .map(|hook| {
            let script = HookScript {
                location: "deploy.sh".into(),
                timeout: Some(timeout_secs.min(MAX_HOOK_TIMEOUT_SECS)),
                runas: None,
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

/// Parses and checks an appspec as the CodeDeploy agent would.
pub fn parse(text: &str) -> Result<AppSpec, String> {
    let spec: AppSpec =
        serde_yaml_ng::from_str(text).map_err(|err| format!("appspec.yml: {err}"))?;
    if spec.version != 0.0 {
        return Err(format!(
            "appspec.yml: version must be 0.0, not {}",
            spec.version
        ));
    }
    if spec.os != "linux" {
        return Err(format!("appspec.yml: os must be linux, not {}", spec.os));
    }
    for (name, scripts) in &spec.hooks {
        let hook = Hook::parse(name).ok_or_else(|| format!("appspec.yml: unknown hook {name}"))?;
        if !hook.is_scriptable() {
            return Err(format!(
                "appspec.yml: {name} is run by the agent and takes no scripts"
            ));
        }
        for script in scripts {
            let path = std::path::Path::new(&script.location);
            let inside = path.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::CurDir
                )
            });
            if !inside {
                return Err(format!(
                    "appspec.yml: {name} script {} must be a path inside the bundle",
                    script.location
                ));
            }
            if script
                .timeout
                .is_some_and(|t| t == 0 || t > MAX_HOOK_TIMEOUT_SECS)
            {
                return Err(format!(
                    "appspec.yml: {name} timeout must be 1..={MAX_HOOK_TIMEOUT_SECS} seconds"
                ));
            }
        }
    }
    Ok(spec)
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
        ] {
            let err = parse(&format!("{base}{hooks}")).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        assert!(
            parse("version: 1.0\nos: linux\n")
                .unwrap_err()
                .contains("version")
        );
    }
}
