//! Every way a request can fail, as a status and a one-line reason in nonstop's
//! `{"error": "..."}` form: `AppError`, and the `From` impls that map each lower module's
//! error to it, once. `AppJson` is the JSON extractor whose rejections take the same form.
//! Nothing here decides *whether* a request fails; it only says how a failure is answered,
//! An internal error's cause is logged, never sent (it may name a file or a query); a bad
//! gateway's reason (which instance failed its health look, what the switch said) is the
//! operator's to act on and is sent.

use axum::Json;
use axum::extract::FromRequest;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::db::DbError;
use crate::rollback::RollbackError;
use crate::traffic::TrafficError;
use crate::webhook::WebhookError;

/// Every way a request can fail, each with its status and a one-line reason.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), reason = %self, "request failed");
        }
        let reason = match self {
            Self::Internal(_) => "internal error".to_owned(),
            _ => self.to_string(),
        };
        let mut response = (status, Json(serde_json::json!({ "error": reason }))).into_response();
        // The why log records a refused trigger with this reason (`why::record`).
        response.extensions_mut().insert(Refusal(reason));
        response
    }
}

/// The one-line reason a request was refused, carried on its answer for the why log.
#[derive(Clone, Debug)]
pub struct Refusal(pub String);

impl From<DbError> for AppError {
    fn from(err: DbError) -> Self {
        tracing::error!(error = %err, "database error while answering a request");
        Self::Internal("the database could not answer".into())
    }
}

impl From<WebhookError> for AppError {
    fn from(err: WebhookError) -> Self {
        let reason = err.to_string();
        match err {
            WebhookError::MissingSignature(_)
            | WebhookError::BadSignature
            | WebhookError::NoKey { .. } => Self::Unauthorized(reason),
            WebhookError::MissingHeader(_) | WebhookError::Malformed { .. } => {
                Self::BadRequest(reason)
            }
            WebhookError::UnsupportedContentType { .. } => Self::UnsupportedMediaType(reason),
            WebhookError::NoAppForRepository(_) => Self::NotFound(reason),
        }
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        let reason = rejection.body_text().replace('\n', " ");
        match rejection.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType(reason),
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge(reason),
            // axum answers well-formed JSON of the wrong shape with 422; to a client both
            // are a request it must fix, and nonstop answers both 400.
            _ => Self::BadRequest(reason),
        }
    }
}

/// `axum::Json`, except that a body it cannot read is answered in nonstop's own error form
/// (415 without `Content-Type: application/json`, 413 over the body limit, 400 otherwise)
/// instead of axum's plain text, as axum's `examples/error-handling` does.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(AppError))]
pub struct AppJson<T>(pub T);

impl<T> IntoResponse for AppJson<T>
where
    Json<T>: IntoResponse,
{
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

impl From<TrafficError> for AppError {
    fn from(err: TrafficError) -> Self {
        match err {
            TrafficError::NotAPort { .. } => Self::BadRequest(err.to_string()),
            TrafficError::Unhealthy { .. } | TrafficError::Switch { .. } => {
                Self::BadGateway(err.to_string())
            }
            TrafficError::Record { source, .. } => source.into(),
        }
    }
}

impl From<crate::switch::SwitchError> for AppError {
    fn from(err: crate::switch::SwitchError) -> Self {
        match err {
            // The live port, or one that is not the app's.
            crate::switch::SwitchError::Rejected(_) => Self::Conflict(err.to_string()),
            _ => Self::BadGateway(err.to_string()),
        }
    }
}

impl From<RollbackError> for AppError {
    fn from(err: RollbackError) -> Self {
        match err {
            RollbackError::Traffic(err) => err.into(),
            RollbackError::Db(err) => err.into(),
            RollbackError::Duplicate => Self::Internal(err.to_string()),
            RollbackError::Running(_)
            | RollbackError::NothingLive(_)
            | RollbackError::NoEarlierVersion(_)
            | RollbackError::BundlePruned(_)
            | RollbackError::NoBundle(_) => Self::Conflict(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::extract::DefaultBodyLimit;
    use axum::http::Request;
    use axum::routing::post;
    use http_body_util::BodyExt;
    use serde::Deserialize;
    use tower::ServiceExt;

    #[derive(Deserialize)]
    struct Port {
        port: u16,
    }

    fn router() -> Router {
        Router::new()
            .route(
                "/",
                post(|AppJson(body): AppJson<Port>| async move {
                    AppJson(serde_json::json!({ "port": body.port }))
                }),
            )
            .layer(DefaultBodyLimit::max(64))
    }

    async fn send(content_type: Option<&str>, body: &str) -> (StatusCode, serde_json::Value) {
        let mut request = Request::post("/");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = router()
            .oneshot(request.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn json_it_cannot_read_is_answered_in_nonstops_error_form() {
        let json = Some("application/json");
        assert_eq!(
            send(json, r#"{"port": 8081}"#).await,
            (StatusCode::OK, serde_json::json!({ "port": 8081 }))
        );
        for (content_type, body, status) in [
            (json, "{not json", StatusCode::BAD_REQUEST),
            (json, r#"{"port": "eighty"}"#, StatusCode::BAD_REQUEST),
            (json, r#"{}"#, StatusCode::BAD_REQUEST),
            (
                None,
                r#"{"port": 8081}"#,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                Some("text/plain"),
                r#"{"port": 8081}"#,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                json,
                &format!(r#"{{"port": 1{}}}"#, " ".repeat(100)),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
        ] {
            let (got, answer) = send(content_type, body).await;
            assert_eq!(got, status, "{content_type:?} {body}: {answer}");
            let reason = answer["error"].as_str().unwrap_or_default();
            assert!(!reason.is_empty() && !reason.contains('\n'), "{answer}");
        }
    }

    #[tokio::test]
    async fn an_internal_errors_cause_is_not_sent() {
        let response = AppError::Internal("no such table: deployments in data/nonstop.db".into())
            .into_response();

        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            serde_json::json!({ "error": "internal error" })
        );
    }

    #[test]
    fn webhook_errors_get_the_status_of_their_cause() {
        let cases = [
            (WebhookError::BadSignature, StatusCode::UNAUTHORIZED),
            (
                WebhookError::MissingSignature("X-Hub-Signature-256"),
                StatusCode::UNAUTHORIZED,
            ),
            (
                WebhookError::NoKey {
                    app: "hello".into(),
                    key: "webhook_secret_env",
                },
                StatusCode::UNAUTHORIZED,
            ),
            (
                WebhookError::MissingHeader("X-GitHub-Event"),
                StatusCode::BAD_REQUEST,
            ),
            (
                WebhookError::malformed("push payload", "expected value"),
                StatusCode::BAD_REQUEST,
            ),
            (
                WebhookError::UnsupportedContentType {
                    given: "\"text/plain\"".into(),
                    accepted: "application/json",
                },
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                WebhookError::NoAppForRepository("acme/hello".into()),
                StatusCode::NOT_FOUND,
            ),
        ];
        for (err, status) in cases {
            let reason = err.to_string();
            let mapped = AppError::from(err);
            assert_eq!((mapped.status(), mapped.to_string()), (status, reason));
        }
    }
}
