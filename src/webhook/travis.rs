//! Travis CI webhooks: the build notification is a form field `payload` (JSON) signed with
//! Travis's RSA key — `Signature` is base64 of a PKCS#1 v1.5 SHA-1 signature over the raw
//! `payload` value. The signature is checked before the JSON is parsed. A passed build of the
//! app's repository and branch deploys that exact commit; a failed one is recorded.

use base64::Engine;
use serde::Deserialize;
use sha1::Sha1;

use super::WebhookError;
use crate::config::{AppConfig, TriggerMode};
use crate::domain::{CiBuild, CommitSha, Delivery, Trigger, TriggerKind};

pub const SIGNATURE_HEADER: &str = "signature";

/// The raw value of the form field `payload` (what Travis signed), URL-decoded.
pub fn payload_of(body: &[u8]) -> Result<String, WebhookError> {
    super::form_payload(body).ok_or_else(|| malformed("no form field `payload`"))
}

fn malformed(reason: impl ToString) -> WebhookError {
    WebhookError::malformed("payload", reason)
}

/// Checks a notification's signature over `payload` with `app`'s Travis CI key; `None` when
/// it has none.
pub fn verify_for(
    app: &AppConfig,
    header: Option<&str>,
    payload: &[u8],
) -> Option<Result<(), WebhookError>> {
    let key = app.travis_key.as_ref()?;
    Some(verify(key, header, payload))
}

/// What an app without a Travis CI key is missing.
pub const KEY_SETTING: &str = "Travis CI key";

/// Checks `header` (base64 signature) over `payload` with Travis's public key.
pub fn verify(
    key: &rsa::PublicKey,
    header: Option<&str>,
    payload: &[u8],
) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::MissingSignature("Signature"))?;
    let compact: String = header.split_whitespace().collect();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|_| WebhookError::BadSignature)?;
    key.pkcs1v15_verify::<Sha1>(payload, &signature)
        .map_err(|_| WebhookError::BadSignature)
}

/// The parts of Travis's build notification nonstop uses.
#[derive(Debug, Deserialize)]
pub struct Build {
    pub id: u64,
    #[serde(default, deserialize_with = "text_or_number")]
    pub number: Option<String>,
    pub status_message: Option<String>,
    pub state: Option<String>,
    pub branch: String,
    pub commit: String,
    pub message: Option<String>,
    pub author_name: Option<String>,
    pub build_url: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub pull_request: bool,
    pub tag: Option<String>,
    pub repository: Repository,
}

#[derive(Debug, Deserialize)]
pub struct Repository {
    pub name: String,
    pub owner_name: String,
}

impl Build {
    /// `owner/name`, as an app's `repository` names it.
    pub fn slug(&self) -> String {
        format!("{}/{}", self.repository.owner_name, self.repository.name)
    }

    pub fn verdict(&self) -> Verdict {
        let message = self.status_message.as_deref().unwrap_or("");
        let state = self.state.as_deref().unwrap_or("");
        if matches!(message, "Passed" | "Fixed") || state == "passed" {
            Verdict::Passed
        } else if matches!(
            message,
            "Broken" | "Failed" | "Still Failing" | "Errored" | "Canceled"
        ) || matches!(state, "failed" | "errored" | "canceled")
        {
            Verdict::Failed
        } else {
            Verdict::Pending
        }
    }
}

/// Travis sends `number` as a string; tolerate a number too.
fn text_or_number<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    Ok(
        match Option::<serde_json::Value>::deserialize(deserializer)? {
            Some(serde_json::Value::String(text)) => Some(text),
            Some(serde_json::Value::Number(number)) => Some(number.to_string()),
            _ => None,
        },
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed,
    /// Started, created or pending: not finished yet.
    Pending,
}

pub fn parse(payload: &[u8]) -> Result<Build, WebhookError> {
    serde_json::from_slice(payload).map_err(malformed)
}

/// What a verified build notification means for `app`.
#[derive(Debug)]
pub enum Outcome {
    Passed(Trigger, CiBuild),
    /// The trigger names the commit; the string says why it failed.
    Failed(Trigger, CiBuild, String),
    Ignored(String),
}

/// Maps a verified build to a deploy, a failure to record, or a reason to ignore it.
pub fn interpret(app: &AppConfig, build: &Build) -> Result<Outcome, WebhookError> {
    if let Some(reason) = not_for(app, build) {
        return Ok(Outcome::Ignored(reason));
    }
    let verdict = build.verdict();
    let number = build.number.clone().unwrap_or_else(|| build.id.to_string());
    if verdict == Verdict::Pending {
        return Ok(Outcome::Ignored(format!(
            "build #{number} has not finished ({})",
            build.status_message.as_deref().unwrap_or("no status")
        )));
    }
    let commit = CommitSha::parse(&build.commit).map_err(malformed)?;
    let trigger = Trigger {
        app: app.name.clone(),
        commit: Some(commit),
        branch: build.branch.clone(),
        kind: TriggerKind::Travis,
        // A restarted build keeps its id, so the verdict is part of what makes it new.
        delivery: Some(Delivery {
            source: "travis",
            id: format!("{}:{}", build.id, verdict_word(verdict)),
            body_sha256: None,
        }),
        message: build.message.clone(),
        author: build.author_name.clone(),
        reuse: None,
    };
    let ci = CiBuild {
        number: Some(number.clone()),
        check: None,
        url: build.build_url.clone(),
    };
    Ok(match verdict {
        Verdict::Passed => Outcome::Passed(trigger, ci),
        _ => {
            let status = build
                .status_message
                .clone()
                .or_else(|| build.state.clone())
                .unwrap_or_default();
            let reason = match &build.build_url {
                Some(url) => format!("Travis CI build #{number} {status}: {url}"),
                None => format!("Travis CI build #{number} {status}"),
            };
            Outcome::Failed(trigger, ci, reason)
        }
    })
}

/// Why a build says nothing about what `app` deploys: another repository, an app that
/// does not wait for Travis, a pull request, a tag or another branch.
fn not_for(app: &AppConfig, build: &Build) -> Option<String> {
    let slug = build.slug();
    if let Some(expected) = &app.repository
        && !slug.eq_ignore_ascii_case(expected)
    {
        return Some(format!(
            "build of {slug} but {} deploys from {expected}",
            app.name
        ));
    }
    match app.trigger {
        TriggerMode::Travis => {}
        TriggerMode::Push => {
            return Some(format!(
                "{} deploys on push; set trigger = \"travis\" to deploy after CI",
                app.name
            ));
        }
        TriggerMode::Checks => {
            return Some(format!(
                "{} waits for the checks GitHub shows, not for Travis CI's webhook",
                app.name
            ));
        }
    }
    if build.pull_request || build.kind.as_deref() == Some("pull_request") {
        return Some("pull request builds do not deploy".into());
    }
    if let Some(tag) = build.tag.as_deref().filter(|t| !t.is_empty()) {
        return Some(format!("tag {tag} builds do not deploy"));
    }
    (build.branch != app.branch).then(|| {
        format!(
            "build of {}; {} deploys {}",
            build.branch, app.name, app.branch
        )
    })
}

fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Passed => "passed",
        Verdict::Failed => "failed",
        Verdict::Pending => "pending",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use rsa::PrivateKey;
    use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn app(trigger: &str) -> AppConfig {
        let text = format!(
            r#"
[[app]]
name = "hello"
repo = "x"
repository = "acme/hello"
trigger = "{trigger}"
build = "true"
artifact = "hello"
run = "{{artifact}} --port {{port}}"

[travis]
public_key_env = "TRAVIS_PUBLIC_KEY"
"#
        );
        Config::parse(&text, std::path::Path::new("n.toml"))
            .unwrap()
            .apps
            .remove(0)
    }

    /// Travis's documented payload shape.
    fn payload(status_message: &str, branch: &str, kind: &str) -> String {
        serde_json::json!({
            "id": 77, "number": "12", "status": 0, "result": 0,
            "status_message": status_message, "result_message": status_message,
            "branch": branch, "commit": SHA, "message": "Say hi",
            "author_name": "Ada", "build_url": "https://travis-ci.com/acme/hello/builds/77",
            "type": kind, "pull_request": kind == "pull_request",
            "repository": {"id": 1, "name": "hello", "owner_name": "acme", "url": null}
        })
        .to_string()
    }

    /// The OS random source, as the `rsa` crate's key generation wants it.
    struct OsRandom;

    impl rsa::rand_core::TryRng for OsRandom {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(getrandom::u32().unwrap())
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Ok(getrandom::u64().unwrap())
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            getrandom::fill(dst).unwrap();
            Ok(())
        }
    }

    impl rsa::rand_core::TryCryptoRng for OsRandom {}

    fn key_pair() -> (PrivateKey, rsa::PublicKey) {
        // 1024 bits, the smallest the crate takes: generation in an unoptimised build is slow.
        let private = PrivateKey::new(&mut OsRandom, 1024).unwrap();
        let public = private.to_public_key();
        (private, public)
    }

    fn sign(key: &PrivateKey, payload: &str) -> String {
        let signature = key.pkcs1v15_sign::<Sha1>(payload.as_bytes()).unwrap();
        base64::engine::general_purpose::STANDARD.encode(signature)
    }

    #[test]
    fn the_payload_is_the_url_decoded_form_field() {
        let body = format!(
            "payload={}",
            url::form_urlencoded::byte_serialize(b"{\"a\": \"b&c\"}").collect::<String>()
        );
        assert_eq!(payload_of(body.as_bytes()).unwrap(), "{\"a\": \"b&c\"}");
        assert!(matches!(
            payload_of(b"other=1"),
            Err(WebhookError::Malformed { .. })
        ));
    }

    #[test]
    fn signatures_are_checked_with_the_public_key() {
        let (private, public) = key_pair();
        let (_, other) = key_pair();
        let body = payload("Passed", "main", "push");
        let good = sign(&private, &body);
        assert_eq!(verify(&public, Some(&good), body.as_bytes()), Ok(()));
        assert_eq!(
            verify(&other, Some(&good), body.as_bytes()),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(&public, Some(&good), body.replace("Ada", "Eve").as_bytes()),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(&public, None, body.as_bytes()),
            Err(WebhookError::MissingSignature("Signature"))
        );
        assert_eq!(
            verify(&public, Some("%%%"), body.as_bytes()),
            Err(WebhookError::BadSignature)
        );
        // The key survives a PEM round trip, the form Travis publishes it in.
        let pem = public
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap();
        let parsed = rsa::PublicKey::from_public_key_pem(&pem).unwrap();
        assert_eq!(verify(&parsed, Some(&good), body.as_bytes()), Ok(()));
    }

    #[test]
    fn a_passed_build_of_the_branch_deploys_that_commit() {
        for message in ["Passed", "Fixed"] {
            let build = parse(payload(message, "main", "push").as_bytes()).unwrap();
            let Ok(Outcome::Passed(trigger, ci)) = interpret(&app("travis"), &build) else {
                panic!("{message}")
            };
            assert_eq!(trigger.commit.unwrap().as_str(), SHA);
            assert_eq!(trigger.kind, TriggerKind::Travis);
            assert_eq!(
                trigger.delivery,
                Some(Delivery {
                    source: "travis",
                    id: "77:passed".into(),
                    body_sha256: None,
                })
            );
            assert_eq!(ci.number.as_deref(), Some("12"));
            assert_eq!(
                ci.url.as_deref(),
                Some("https://travis-ci.com/acme/hello/builds/77")
            );
        }
    }

    #[test]
    fn a_failed_build_is_a_failure_with_its_number_and_page() {
        for message in ["Broken", "Failed", "Still Failing", "Errored"] {
            let build = parse(payload(message, "main", "push").as_bytes()).unwrap();
            let Ok(Outcome::Failed(_, _, reason)) = interpret(&app("travis"), &build) else {
                panic!("{message}")
            };
            assert_eq!(
                reason,
                format!(
                    "Travis CI build #12 {message}: https://travis-ci.com/acme/hello/builds/77"
                )
            );
        }
    }

    #[test]
    fn other_branches_pull_requests_pending_builds_and_push_apps_are_ignored() {
        let cases = [
            ("travis", payload("Passed", "dev", "push"), "build of dev"),
            (
                "travis",
                payload("Passed", "main", "pull_request"),
                "pull request",
            ),
            ("travis", payload("Pending", "main", "push"), "not finished"),
            ("push", payload("Passed", "main", "push"), "deploys on push"),
            (
                "travis",
                payload("Passed", "main", "push").replace("acme", "evil"),
                "deploys from acme/hello",
            ),
        ];
        for (trigger, body, reason) in cases {
            let build = parse(body.as_bytes()).unwrap();
            match interpret(&app(trigger), &build) {
                Ok(Outcome::Ignored(why)) => assert!(why.contains(reason), "{why}"),
                other => panic!("{reason}: {other:?}"),
            }
        }
    }

    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_body_is_answered_without_a_panic(body in vec(any::<u8>(), 0..2048)) {
                let _ = payload_of(&body);
                if let Ok(build) = parse(&body) {
                    let _ = interpret(&app("travis"), &build);
                }
            }
        }
    }
}
