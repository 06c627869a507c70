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
}
