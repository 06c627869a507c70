//! Webhook intake: verify who sent a request (over the raw bytes, before any parsing), then
//! turn it into a `Trigger` or a reason to ignore it. Knows nothing of HTTP routing, queues
//! or the database; `web` calls it and answers.

pub mod github;
pub mod travis;

/// Why a webhook was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("signature does not match")]
    BadSignature,
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The body comes in a form this sender does not use; the string names what it does.
    #[error("content type `{given}` is not accepted; send {accepted}")]
    UnsupportedContentType {
        given: String,
        accepted: &'static str,
    },
}

/// The URL-decoded value of the form field `payload`: how GitHub (when the hook is set to
/// `application/x-www-form-urlencoded`) and Travis CI carry their JSON document.
pub fn form_payload(body: &[u8]) -> Result<String, WebhookError> {
    url::form_urlencoded::parse(body)
        .find(|(name, _)| name == "payload")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| WebhookError::Malformed("no form field `payload`".into()))
}
