//! Webhook intake: verify who sent a request (over the raw bytes, before any parsing), then
//! turn it into a `Trigger` or a reason to ignore it. Knows nothing of HTTP routing, queues
//! or the database; `web` calls it and maps a `WebhookError` to its status.

pub mod github;
pub mod travis;

use crate::config::AppConfig;

/// Why a webhook was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    /// The sender's signature header is missing: who sent it is unknown.
    #[error("missing {0} header")]
    MissingSignature(&'static str),
    #[error("signature does not match")]
    BadSignature,
    /// The URL names an app that has no key to check this sender's signature with.
    #[error("app `{app}` has no {key} configured")]
    NoKey { app: String, key: &'static str },
    /// A header other than the signature is missing (GitHub's event name).
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// `what` is the document that could not be read (`push payload`, `payload`).
    #[error("malformed {what}: {reason}")]
    Malformed { what: String, reason: String },
    /// The body comes in a form this sender does not use; `accepted` names what it does.
    #[error("content type {given} is not accepted; send {accepted}")]
    UnsupportedContentType {
        given: String,
        accepted: &'static str,
    },
    /// Several apps share the key that signed it, and none of them deploys the repository it
    /// names.
    #[error("no app deploys repository {0}; add ?app=NAME to the webhook URL or set `repository`")]
    NoAppForRepository(String),
}

impl WebhookError {
    pub fn malformed(what: impl Into<String>, reason: impl ToString) -> Self {
        Self::Malformed {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// The URL-decoded value of the form field `payload`: how GitHub (when the hook is set to
/// `application/x-www-form-urlencoded`) and Travis CI carry their JSON document. `None`
/// when the form has no such field.
pub fn form_payload(body: &[u8]) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(name, _)| name == "payload")
        .map(|(_, value)| value.into_owned())
}

/// Of the apps whose key signed a delivery (`config` reads an app's settings), the one it is
/// for: a single app decides itself (a push from another repository is then ignored, with
/// its reason); of several sharing a key, the one whose `repository` the payload names.
pub fn app_for_repository<'a, A>(
    signed_by: &[&'a A],
    repository: Option<&str>,
    config: impl Fn(&A) -> &AppConfig,
) -> Result<&'a A, WebhookError> {
    if let [only] = signed_by {
        return Ok(only);
    }
    signed_by
        .iter()
        .copied()
        .find(|app| {
            config(app)
                .repository
                .as_deref()
                .zip(repository)
                .is_some_and(|(configured, named)| configured.eq_ignore_ascii_case(named))
        })
        .ok_or_else(|| {
            WebhookError::NoAppForRepository(repository.unwrap_or("(none named)").to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn apps() -> Vec<AppConfig> {
        let text = r#"
[[app]]
name = "one"
repo = "x"
repository = "acme/one"
build = "true"
artifact = "a"
run = "{artifact} --port {port}"
ports = [8081, 8082]
switch = { kind = "proxy", listen = "127.0.0.1:8090" }

[[app]]
name = "two"
repo = "x"
repository = "Acme/Two"
build = "true"
artifact = "a"
run = "{artifact} --port {port}"
ports = [8083, 8084]
switch = { kind = "proxy", listen = "127.0.0.1:8091" }
"#;
        Config::parse(text, std::path::Path::new("n.toml"))
            .unwrap()
            .apps
    }

    #[test]
    fn apps_sharing_a_key_are_told_apart_by_repository() {
        let apps = apps();
        let both: Vec<&AppConfig> = apps.iter().collect();
        let pick = |signed: &[&AppConfig], repository| {
            app_for_repository(signed, repository, |app| app).map(|app| app.name.to_string())
        };
        assert_eq!(pick(&both, Some("acme/two")), Ok("two".into()));
        assert_eq!(pick(&both, Some("ACME/ONE")), Ok("one".into()));
        assert_eq!(
            pick(&both, Some("evil/one")),
            Err(WebhookError::NoAppForRepository("evil/one".into()))
        );
        assert_eq!(
            pick(&both, None),
            Err(WebhookError::NoAppForRepository("(none named)".into()))
        );
        // One app decides itself, whatever repository the payload names.
        assert_eq!(pick(&both[..1], Some("evil/one")), Ok("one".into()));
    }

    #[test]
    fn the_form_field_payload_is_url_decoded() {
        assert_eq!(
            form_payload(b"payload=%7B%22a%22%3A+%22b%26c%22%7D&x=1").as_deref(),
            Some("{\"a\": \"b&c\"}")
        );
        assert_eq!(form_payload(b"other=1"), None);
        assert_eq!(form_payload(b"{\"payload\": 1}"), None);
    }
}
