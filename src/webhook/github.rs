//! GitHub webhooks: `X-Hub-Signature-256` (HMAC-SHA256 of the raw body, hex, compared in
//! constant time) and the `push` event. The signature is checked before a byte is parsed;
//! then the body is decoded by its content type (GitHub offers JSON and a form field
//! `payload`), and only then is the JSON read.

use std::borrow::Cow;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::WebhookError;
use crate::config::AppConfig;
use crate::domain::{CommitSha, Trigger, TriggerKind};

pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const EVENT_HEADER: &str = "x-github-event";
pub const DELIVERY_HEADER: &str = "x-github-delivery";

/// The two ways GitHub's webhook settings offer to send a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// `application/json`: the body is the JSON document.
    Json,
    /// `application/x-www-form-urlencoded`, which GitHub preselects: the body is
    /// `payload=<url-encoded JSON>`.
    Form,
}

/// What a 415 tells the sender to use instead.
const ACCEPTED_CONTENT_TYPES: &str = "application/json or application/x-www-form-urlencoded";

/// A rejected content type is echoed back at most this long, so an answer stays one short line.
const MAX_ECHOED_CONTENT_TYPE: usize = 100;

impl ContentType {
    /// Reads the `Content-Type` header's raw value; parameters (`; charset=utf-8`) and case
    /// do not matter. GitHub always sends the header; a request without one is read as JSON,
    /// which is what GitHub's API, its redelivery tools and a hand-written `curl -d @push.json`
    /// mean.
    pub fn from_header(header: Option<&[u8]>) -> Result<Self, WebhookError> {
        let Some(header) = header else {
            return Ok(Self::Json);
        };
        let text = String::from_utf8_lossy(header);
        let essence = text.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case("application/json") {
            Ok(Self::Json)
        } else if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            Ok(Self::Form)
        } else {
            let given: String = text.chars().take(MAX_ECHOED_CONTENT_TYPE).collect();
            Err(WebhookError::UnsupportedContentType {
                given: format!("{given:?}"),
                accepted: ACCEPTED_CONTENT_TYPES,
            })
        }
    }
}

/// The JSON document of a verified `event` delivery, whichever way it was carried. Call it
/// after `verify`: the signature is over the body as sent, not over the decoded document.
pub fn payload<'a>(
    content_type: ContentType,
    event: &str,
    body: &'a [u8],
) -> Result<Cow<'a, [u8]>, WebhookError> {
    match content_type {
        ContentType::Json => Ok(Cow::Borrowed(body)),
        ContentType::Form => match super::form_payload(body) {
            Some(json) => Ok(Cow::Owned(json.into_bytes())),
            // `curl -d` labels a JSON body as a form; say how to send it instead.
            None => Err(malformed(
                event,
                "no form field `payload` (a JSON body is sent as application/json)",
            )),
        },
    }
}

fn malformed(event: &str, reason: impl ToString) -> WebhookError {
    WebhookError::malformed(format!("{event} payload"), reason)
}

/// A delivery whose signature verified, decoded: what GitHub says it is, and its JSON.
#[derive(Debug)]
pub struct Delivery<'a> {
    /// `X-GitHub-Event`: `push`, `ping`, …
    pub event: &'a str,
    /// `X-GitHub-Delivery`, when sent: what makes a redelivery a duplicate.
    pub id: Option<&'a str>,
    pub document: Cow<'a, [u8]>,
}

impl<'a> Delivery<'a> {
    /// Reads the headers' raw values and decodes `body` by its content type.
    pub fn decode(
        content_type: Option<&[u8]>,
        event: Option<&'a str>,
        id: Option<&'a str>,
        body: &'a [u8],
    ) -> Result<Self, WebhookError> {
        let content_type = ContentType::from_header(content_type)?;
        let event = event.ok_or(WebhookError::MissingHeader("X-GitHub-Event"))?;
        Ok(Self {
            event,
            id,
            document: payload(content_type, event, body)?,
        })
    }

    /// The repository the document names, to find its app when the URL names none.
    pub fn repository(&self) -> Option<String> {
        repository_of(&self.document)
    }

    /// What this delivery means for `app`.
    pub fn interpret(&self, app: &AppConfig) -> Result<Outcome, WebhookError> {
        interpret(app, self.event, self.id, &self.document)
    }
}

/// Checks a delivery's signature with `app`'s webhook secret; `None` when it has none.
pub fn verify_for(
    app: &AppConfig,
    header: Option<&str>,
    body: &[u8],
) -> Option<Result<(), WebhookError>> {
    let secret = app.webhook_secret.as_ref()?;
    Some(verify(secret.expose().as_bytes(), header, body))
}

/// The setting an app without a webhook secret is missing.
pub const KEY_SETTING: &str = "webhook_secret_env";

/// Checks `header` (`sha256=<hex>`) against the HMAC of `body` under `secret`.
pub fn verify(secret: &[u8], header: Option<&str>, body: &[u8]) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::MissingSignature("X-Hub-Signature-256"))?;
    let expected = header
        .strip_prefix("sha256=")
        .and_then(|hex_sig| hex::decode(hex_sig).ok())
        .ok_or(WebhookError::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&expected)
        .map_err(|_| WebhookError::BadSignature)
}

/// `sha256=<hex>` for `body`: what GitHub sends (tests and the README's curl use it).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The parts of a `push` payload nonstop uses.
#[derive(Debug, Deserialize)]
pub struct Push {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub after: String,
    #[serde(default)]
    pub deleted: bool,
    pub repository: Repository,
    pub head_commit: Option<HeadCommit>,
}

#[derive(Debug, Deserialize)]
pub struct Repository {
    pub full_name: String,
}

#[derive(Debug, Deserialize)]
pub struct HeadCommit {
    pub message: String,
    pub author: Option<Author>,
}

#[derive(Debug, Deserialize)]
pub struct Author {
    pub name: Option<String>,
    pub username: Option<String>,
}

/// The repository a payload names, to find its app when the URL names none.
pub fn repository_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        repository: Repository,
    }
    serde_json::from_slice::<Probe>(body)
        .ok()
        .map(|probe| probe.repository.full_name)
}

/// What a verified GitHub event means for `app`.
#[derive(Debug)]
pub enum Outcome {
    Pong,
    Deploy(Box<Trigger>),
    Ignored(String),
}

/// Maps a verified event to a deploy or a reason to ignore it.
pub fn interpret(
    app: &AppConfig,
    event: &str,
    delivery_id: Option<&str>,
    body: &[u8],
) -> Result<Outcome, WebhookError> {
    match event {
        "ping" => return Ok(Outcome::Pong),
        "push" => {}
        other => return Ok(Outcome::Ignored(format!("event `{other}` is not deployed"))),
    }
    let push: Push = serde_json::from_slice(body).map_err(|err| malformed(event, err))?;
    if let Some(expected) = &app.repository
        && !push.repository.full_name.eq_ignore_ascii_case(expected)
    {
        return Ok(Outcome::Ignored(format!(
            "push to {} but {} deploys from {expected}",
            push.repository.full_name, app.name
        )));
    }
    let Some(branch) = push.git_ref.strip_prefix("refs/heads/") else {
        return Ok(Outcome::Ignored(format!(
            "{} is not a branch",
            push.git_ref
        )));
    };
    if push.deleted {
        return Ok(Outcome::Ignored(format!("branch {branch} was deleted")));
    }
    if branch != app.branch {
        return Ok(Outcome::Ignored(format!(
            "push to {branch}; {} deploys {}",
            app.name, app.branch
        )));
    }
    let commit = CommitSha::parse(&push.after).map_err(|reason| malformed(event, reason))?;
    let head = push.head_commit;
    Ok(Outcome::Deploy(Box::new(Trigger {
        app: app.name.clone(),
        commit: Some(commit),
        branch: branch.to_owned(),
        kind: TriggerKind::Push,
        delivery: delivery_id.map(|id| ("github".to_owned(), id.to_owned())),
        message: head.as_ref().map(|h| h.message.clone()),
        author: head
            .and_then(|h| h.author)
            .and_then(|a| a.username.or(a.name)),
        reuse: None,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn app() -> AppConfig {
        let text = r#"
[[app]]
name = "hello"
repo = "x"
repository = "acme/hello"
build = "true"
artifact = "hello"
run = "{artifact} --port {port}"
"#;
        Config::parse(text, std::path::Path::new("n.toml"))
            .unwrap()
            .apps
            .remove(0)
    }

    fn push(git_ref: &str, repo: &str, deleted: bool) -> Vec<u8> {
        serde_json::json!({
            "ref": git_ref, "after": SHA, "deleted": deleted,
            "repository": {"full_name": repo},
            "head_commit": {"message": "Say hi", "author": {"name": "Ada", "username": "ada"}}
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn accepts_githubs_own_example_signature() {
        // The example from GitHub's "Validating webhook deliveries" documentation.
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(
            verify(
                b"It's a Secret to Everybody",
                Some(header),
                b"Hello, World!"
            ),
            Ok(())
        );
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            header
        );
    }

    #[test]
    fn rejects_missing_forged_and_tampered_signatures() {
        let body = b"{}";
        let good = sign(b"secret", body);
        assert_eq!(
            verify(b"secret", None, body),
            Err(WebhookError::MissingSignature("X-Hub-Signature-256"))
        );
        assert_eq!(
            verify(b"other", Some(&good), body),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(b"secret", Some(&good), b"{ }"),
            Err(WebhookError::BadSignature)
        );
        for bad in [
            "",
            "sha256=",
            "sha1=abcd",
            "sha256=zz",
            &good[..good.len() - 2],
        ] {
            assert_eq!(
                verify(b"secret", Some(bad), body),
                Err(WebhookError::BadSignature),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_push_to_the_branch_deploys_that_commit() {
        let outcome = interpret(
            &app(),
            "push",
            Some("d-1"),
            &push("refs/heads/main", "acme/hello", false),
        );
        let Ok(Outcome::Deploy(trigger)) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(trigger.commit.unwrap().as_str(), SHA);
        assert_eq!(trigger.delivery, Some(("github".into(), "d-1".into())));
        assert_eq!(trigger.message.as_deref(), Some("Say hi"));
        assert_eq!(trigger.author.as_deref(), Some("ada"));
    }

    #[test]
    fn other_branches_repositories_tags_and_deletions_are_ignored() {
        let app = app();
        let cases = [
            (
                "push",
                push("refs/heads/dev", "acme/hello", false),
                "push to dev",
            ),
            (
                "push",
                push("refs/heads/main", "evil/hello", false),
                "deploys from acme/hello",
            ),
            (
                "push",
                push("refs/tags/v1", "acme/hello", false),
                "not a branch",
            ),
            (
                "push",
                push("refs/heads/main", "acme/hello", true),
                "was deleted",
            ),
            ("issues", b"{}".to_vec(), "`issues` is not deployed"),
        ];
        for (event, body, reason) in cases {
            match interpret(&app, event, None, &body) {
                Ok(Outcome::Ignored(why)) => assert!(why.contains(reason), "{why}"),
                other => panic!("{reason}: {other:?}"),
            }
        }
        assert!(matches!(
            interpret(&app, "ping", None, b"{}"),
            Ok(Outcome::Pong)
        ));
    }

    #[test]
    fn a_malformed_push_is_an_error() {
        assert!(matches!(
            interpret(&app(), "push", None, b"not json"),
            Err(WebhookError::Malformed { .. })
        ));
    }

    fn form(json: &[u8]) -> Vec<u8> {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", std::str::from_utf8(json).unwrap())
            .finish()
            .into_bytes()
    }

    #[test]
    fn json_and_form_content_types_are_read_and_others_refused_naming_both() {
        for (header, expected) in [
            (None, ContentType::Json),
            (Some("application/json"), ContentType::Json),
            (Some("Application/JSON; charset=utf-8"), ContentType::Json),
            (Some("application/x-www-form-urlencoded"), ContentType::Form),
            (
                Some(" application/x-www-form-urlencoded ; charset=UTF-8"),
                ContentType::Form,
            ),
        ] {
            assert_eq!(
                ContentType::from_header(header.map(str::as_bytes)),
                Ok(expected),
                "{header:?}"
            );
        }
        for header in ["text/plain", "", "multipart/form-data", "application/jsonx"] {
            let Err(err) = ContentType::from_header(Some(header.as_bytes())) else {
                panic!("{header} accepted")
            };
            let reason = err.to_string();
            assert!(matches!(err, WebhookError::UnsupportedContentType { .. }));
            assert!(
                reason.contains("application/json")
                    && reason.contains("application/x-www-form-urlencoded"),
                "{reason}"
            );
        }
        let long = ContentType::from_header(Some("x".repeat(10_000).as_bytes()))
            .unwrap_err()
            .to_string();
        assert!(long.len() < 300, "{long}");
    }

    #[test]
    fn a_form_payload_is_the_url_decoded_json_document() {
        let json = push("refs/heads/main", "acme/hello", false);
        assert_eq!(
            payload(ContentType::Form, "push", &form(&json)).unwrap(),
            json
        );
        assert_eq!(payload(ContentType::Json, "push", &json).unwrap(), json);
        let Err(err) = payload(ContentType::Form, "push", &json) else {
            panic!("a JSON body read as a form")
        };
        assert!(
            err.to_string()
                .starts_with("malformed push payload: no form field `payload`"),
            "{err}"
        );
    }

    #[test]
    fn both_content_types_mean_the_same_for_every_event() {
        let app = app();
        let cases = [
            ("push", push("refs/heads/main", "acme/hello", false)),
            ("push", push("refs/heads/dev", "acme/hello", false)),
            ("ping", br#"{"zen":"Design for failure."}"#.to_vec()),
            ("issues", br#"{"action":"opened"}"#.to_vec()),
            ("push", b"{not json".to_vec()),
        ];
        for (event, json) in cases {
            let form = form(&json);
            let read = |content_type: &str, body| {
                Delivery::decode(Some(content_type.as_bytes()), Some(event), Some("d"), body)
                    .and_then(|delivery| delivery.interpret(&app))
            };
            let as_json = read("application/json", &json);
            let as_form = read("application/x-www-form-urlencoded", &form);
            assert_eq!(
                format!("{as_json:?}"),
                format!("{as_form:?}"),
                "{event} {}",
                String::from_utf8_lossy(&json)
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        const SECRET: &[u8] = b"s3cret";

        proptest! {
            #[test]
            fn only_the_signature_of_this_very_body_verifies(
                body in vec(any::<u8>(), 0..512),
                other in vec(any::<u8>(), 0..512),
                header in ".{0,100}",
            ) {
                let own = sign(SECRET, &body);
                prop_assert!(verify(SECRET, Some(&own), &body).is_ok());
                prop_assert_eq!(
                    verify(SECRET, Some(&sign(SECRET, &other)), &body).is_ok(),
                    other == body
                );
                // hex is read in either case; anything else is refused.
                prop_assert_eq!(
                    verify(SECRET, Some(&header), &body).is_ok(),
                    header.eq_ignore_ascii_case(&own)
                );
            }

            #[test]
            fn any_event_and_body_is_answered_without_a_panic(
                event in prop_oneof![Just("push".to_owned()), Just("ping".to_owned()), ".{0,20}"],
                body in vec(any::<u8>(), 0..2048),
            ) {
                let _ = interpret(&app(), &event, Some("d"), &body);
                let _ = repository_of(&body);
                if let Ok(document) = payload(ContentType::Form, &event, &body) {
                    let _ = interpret(&app(), &event, Some("d"), &document);
                }
            }
        }
    }
}
