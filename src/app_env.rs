//! An app's own environment: its `env` table, its `env_file` and its `secrets`, resolved at
//! each deploy into what its build, hooks and instances get on top of the base allow-list
//! (`process::ChildEnv`). It must never put a value anywhere but a child's environment: not
//! in a log, an error, the database or a bundle. What changed since the last deployment is
//! told by names only, found by comparing keyed hashes of the values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::AppConfig;

/// CodeDeploy's names: a runner sets them for every hook, so an app cannot.
pub const CODEDEPLOY_VARS: [&str; 5] = [
    "LIFECYCLE_EVENT",
    "DEPLOYMENT_ID",
    "DEPLOYMENT_GROUP_ID",
    "DEPLOYMENT_GROUP_NAME",
    "APPLICATION_NAME",
];

/// Why a name cannot be one of an app's env vars, if it cannot.
pub fn refuse_name(name: &str) -> Option<&'static str> {
    let mut bytes = name.bytes();
    let valid = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        Some("is not an env var name (letters, digits and _, not starting with a digit)")
    } else if name.starts_with("NONSTOP_") {
        Some("is nonstop's own (NONSTOP_* is set by the runner)")
    } else if CODEDEPLOY_VARS.contains(&name) {
        Some("is set by the runner for every hook, as CodeDeploy does")
    } else {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppEnvError {
    #[error("env_file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The line's number and what is wrong with it; never the line itself, which may hold a
    /// secret.
    #[error("env_file {}:{line}: {problem}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// One resolved value, and whether it may be shown (only `env`'s values, which the config
/// file and fleet bundles hold anyway, may).
#[derive(Clone)]
struct Value {
    text: String,
    secret: bool,
}

/// The app's env vars for one deployment. `Debug` shows the names only.
#[derive(Clone, Default)]
pub struct AppEnv {
    vars: BTreeMap<String, Value>,
}

impl std::fmt::Debug for AppEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

impl AppEnv {
    /// `env`, then the lines of `env_file` (read now), then `secrets` (read from the server's
    /// environment at start-up); a later one wins a name given twice.
    pub fn resolve(app: &AppConfig) -> Result<Self, AppEnvError> {
        let mut vars: BTreeMap<String, Value> = app
            .env
            .iter()
            .map(|(name, text)| {
                let value = Value {
                    text: text.clone(),
                    secret: false,
                };
                (name.clone(), value)
            })
            .collect();
        if let Some(path) = &app.env_file {
            // The file lives on this host, outside the repository: it is where secrets are
            // kept, so its values are treated as secrets.
            for (name, text) in read_env_file(path)? {
                vars.insert(name, Value { text, secret: true });
            }
        }
        for (name, secret) in &app.secret_values {
            let text = secret.expose().to_owned();
            vars.insert(name.clone(), Value { text, secret: true });
        }
        Ok(Self { vars })
    }

    /// Name and value of every var, for a child's environment only.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.text.as_str()))
    }

    /// The names, space-separated: what deploy.sh passes on to the instance.
    pub fn names(&self) -> String {
        self.vars.keys().cloned().collect::<Vec<_>>().join(" ")
    }

    /// A keyed hash of each value by name: tells a changed value from an unchanged one,
    /// and, without `key` (kept by the server, apart from the database), tells nothing of
    /// the value itself.
    pub fn digest(&self, key: &[u8]) -> BTreeMap<String, String> {
        self.vars
            .iter()
            .map(|(name, value)| {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
                mac.update(name.as_bytes());
                mac.update(&[0]);
                mac.update(value.text.as_bytes());
                (name.clone(), hex::encode(mac.finalize().into_bytes()))
            })
            .collect()
    }

    /// `text` with every secret value (of at least `MIN_REDACTED_BYTES`) replaced by `***`:
    /// a build or hook that prints a secret does not publish it in its log.
    pub fn redact(&self, text: &str) -> String {
        let mut secrets: Vec<&str> = (self.vars.values())
            .filter(|value| value.secret && value.text.len() >= MIN_REDACTED_BYTES)
            .map(|value| value.text.as_str())
            .collect();
        // Longest first: a secret that holds a shorter one would otherwise be cut in two
        // and its rest shown.
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        let mut text = text.to_owned();
        for secret in secrets {
            text = text.replace(secret, "***");
        }
        text
    }
}

/// Shorter secret values are not hidden in logs: a value of two letters would blank out
/// every word holding them, and is no secret worth the name anyway.
const MIN_REDACTED_BYTES: usize = 4;

/// What changed between two digests, by name: `+NEW`, `~CHANGED`, `-GONE`; `None` when
/// nothing did.
pub fn changes(
    before: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> Option<String> {
    let mut changed = Vec::new();
    for (name, hash) in now {
        match before.get(name) {
            None => changed.push(format!("+{name}")),
            Some(old) if old != hash => changed.push(format!("~{name}")),
            Some(_) => {}
        }
    }
    changed.extend(
        before
            .keys()
            .filter(|name| !now.contains_key(*name))
            .map(|name| format!("-{name}")),
    );
    (!changed.is_empty()).then(|| format!("environment changed: {}", changed.join(", ")))
}

/// `KEY=VALUE` lines; blank lines and `#` comments are skipped, the value is taken as it is
/// (no quotes removed, nothing expanded: the file is read, never sourced).
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, AppEnvError> {
    let text = std::fs::read_to_string(path).map_err(|source| AppEnvError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_env_lines(&text).map_err(|(line, problem)| AppEnvError::Line {
        path: path.to_owned(),
        line,
        problem,
    })
}

fn parse_env_lines(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err((index + 1, "expected NAME=value".into()));
        };
        if let Some(problem) = refuse_name(name) {
            // nonstop's own names may be shown; anything else could be a value pasted there.
            let shown = if name.starts_with("NONSTOP_") {
                name
            } else {
                "the name"
            };
            return Err((index + 1, format!("{shown} {problem}")));
        }
        pairs.push((name.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn app(env_file: Option<PathBuf>) -> AppConfig {
        let text = r#"
[[app]]
name = "hello"
repo = "x"
build = "true"
artifact = "hello"
run = "{artifact} --port {port}"
env = { RUST_LOG = "info", APP_MODE = "production" }
"#;
        let mut app = crate::config::Config::parse(text, Path::new("n.toml"))
            .unwrap()
            .apps
            .remove(0);
        app.env_file = env_file;
        app.secret_values = vec![(
            "DATABASE_URL".into(),
            Secret::new("postgres://s3cret".into()),
        )];
        app
    }

    #[test]
    fn env_then_the_file_then_secrets_and_a_later_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hello.env");
        std::fs::write(
            &file,
            "# comment\n\nAPP_MODE=staging\nQUOTED=\"kept as is\" $HOME\nDATABASE_URL=overridden\n",
        )
        .unwrap();
        let env = AppEnv::resolve(&app(Some(file))).unwrap();
        let pairs: BTreeMap<_, _> = env.pairs().collect();
        assert_eq!(
            pairs,
            BTreeMap::from([
                ("APP_MODE", "staging"),
                ("DATABASE_URL", "postgres://s3cret"),
                ("QUOTED", "\"kept as is\" $HOME"),
                ("RUST_LOG", "info"),
            ])
        );
        assert_eq!(env.names(), "APP_MODE DATABASE_URL QUOTED RUST_LOG");
        assert_eq!(
            format!("{env:?}"),
            r#"{"APP_MODE", "DATABASE_URL", "QUOTED", "RUST_LOG"}"#
        );
    }

    #[test]
    fn a_bad_env_file_line_is_named_by_its_number_never_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hello.env");
        for (text, problem) in [
            ("OK=1\nsup3r-secret-value\n", ":2: expected NAME=value"),
            (
                "OK=1\nsup3r secret=x\n",
                ":2: the name is not an env var name",
            ),
            (
                "NONSTOP_SWITCH_TOKEN=sup3r\n",
                ":1: NONSTOP_SWITCH_TOKEN is nonstop's own",
            ),
            ("DEPLOYMENT_ID=sup3r\n", ":1: the name is set by the runner"),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = AppEnv::resolve(&app(Some(file.clone())))
                .unwrap_err()
                .to_string();
            assert!(err.contains(problem), "{text:?}: {err}");
            assert!(!err.contains("sup3r"), "{err}");
        }
        let err = AppEnv::resolve(&app(Some(dir.path().join("missing.env"))))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.env"), "{err}");
    }

    #[test]
    fn changes_are_told_by_name_and_secrets_are_redacted() {
        let key = b"server key";
        let before = AppEnv::resolve(&app(None)).unwrap();
        let mut next = app(None);
        next.env.remove("RUST_LOG");
        next.env.insert("FEATURE".into(), "on".into());
        next.secret_values = vec![("DATABASE_URL".into(), Secret::new("postgres://n3w".into()))];
        let now = AppEnv::resolve(&next).unwrap();
        let (old, new) = (before.digest(key), now.digest(key));
        assert_eq!(
            changes(&old, &new).as_deref(),
            Some("environment changed: ~DATABASE_URL, +FEATURE, -RUST_LOG")
        );
        assert_eq!(changes(&new, &new), None);
        assert!(
            new.values()
                .all(|hash| !hash.contains("n3w") && hash.len() == 64)
        );
        assert_ne!(before.digest(b"another key"), old);

        assert_eq!(
            now.redact("url=postgres://n3w mode=production"),
            "url=*** mode=production",
            "only secret values are hidden"
        );
    }

    #[test]
    fn a_secret_holding_a_shorter_one_is_hidden_whole() {
        let mut config = app(None);
        config.secret_values = vec![
            ("A_SHORT".into(), Secret::new("k3y9".into())),
            ("Z_LONG".into(), Secret::new("xk3y9-tail".into())),
        ];
        let env = AppEnv::resolve(&config).unwrap();

        assert_eq!(env.redact("a=xk3y9-tail b=k3y9"), "a=*** b=***");
    }
}
