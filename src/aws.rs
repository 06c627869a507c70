//! What the AWS twins (`store::s3`, `runner::codedeploy`) share: one SDK configuration
//! (the standard credential chain, an optional region and endpoint, timeouts short enough
//! that a dead endpoint fails in seconds), the reading of SDK errors into one clear line, and
//! a retry with backoff for throttling and transient failures. It never logs or formats a
//! credential: errors are described from their code, status and message only.

use std::future::Future;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Where and how to reach AWS (or an S3/CodeDeploy-compatible server).
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    /// `None`: the standard chain (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// `None`: AWS itself. Set for S3-compatible servers and emulators.
    pub url: Option<String>,
}

/// SDK timeouts. Connecting is bounded tightly (a dead endpoint must fail in seconds); reads
/// get longer because a slow S3 part upload is not a dead endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    /// Whole-call limit, retries included; `None` for calls that move large bodies.
    pub operation: Option<Duration>,
}

impl Timeouts {
    /// For S3: bodies can be large, so no limit on the whole call.
    pub const TRANSFER: Timeouts = Timeouts {
        connect: Duration::from_secs(3),
        read: Duration::from_secs(30),
        operation: None,
    };
    /// For control-plane calls (CodeDeploy): small bodies, answered in well under a second.
    pub const CONTROL: Timeouts = Timeouts {
        connect: Duration::from_secs(3),
        read: Duration::from_secs(15),
        operation: Some(Duration::from_secs(45)),
    };
}

/// The SDK configuration for one backend: credentials from the standard chain (env vars,
/// shared profile, web identity, ECS, EC2 instance metadata), never from `nonstop.toml`.
pub async fn sdk_config(endpoint: &Endpoint, timeouts: Timeouts) -> SdkConfig {
    // ring rather than aws-lc: the same TLS, a much lighter build.
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut timeout = TimeoutConfig::builder()
        .connect_timeout(timeouts.connect)
        .read_timeout(timeouts.read);
    if let Some(operation) = timeouts.operation {
        timeout = timeout.operation_timeout(operation);
    }
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .timeout_config(timeout.build())
        // The SDK retries throttling and 5xx itself, a few times with jittered backoff.
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(3)
                .with_max_backoff(Duration::from_secs(5)),
        );
    if let Some(region) = &endpoint.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(url) = &endpoint.url {
        loader = loader.endpoint_url(url.clone());
    }
    loader.load().await
}

/// What kind of failure an AWS call ended with: decides retrying and the words used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Slow down and try again.
    Throttled,
    /// A 5xx, a timeout, a dropped connection: may work next time.
    Transient,
    /// No credentials were found by the standard chain.
    NoCredentials,
    /// Credentials were found but refused (unknown key, bad signature, expired, no permission).
    Denied,
    /// The named resource (bucket, key, application, group, deployment) does not exist.
    NotFound,
    /// Anything else: a bad request, an unparseable answer.
    Other,
}

impl FailureKind {
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Throttled | Self::Transient)
    }
}

/// One AWS failure, read from an SDK error: safe to log (no credential is ever part of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsFailure {
    pub kind: FailureKind,
    pub code: Option<String>,
    pub status: Option<u16>,
    pub message: String,
}

impl std::fmt::Display for AwsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hint = match self.kind {
            FailureKind::NoCredentials => {
                "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role): "
            }
            FailureKind::Denied => "AWS refused the credentials or their permissions: ",
            FailureKind::Throttled => "throttled by AWS: ",
            _ => "",
        };
        f.write_str(hint)?;
        if let Some(code) = &self.code {
            write!(f, "{code}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        Ok(())
    }
}

const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "InvalidToken",
];

const NOT_FOUND_CODES: &[&str] = &[
    "NoSuchBucket",
    "NoSuchKey",
    "NotFound",
    "NoSuchUpload",
    "ApplicationDoesNotExistException",
    "DeploymentGroupDoesNotExistException",
    "DeploymentDoesNotExistException",
];

/// Reads an SDK error into an `AwsFailure`. Pure: no I/O.
pub fn classify<E>(err: &SdkError<E, HttpResponse>) -> AwsFailure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    match err {
        SdkError::ServiceError(service) => {
            let inner = service.err();
            let code = inner.code().map(str::to_owned);
            let message = inner
                .message()
                .map(str::to_owned)
                .unwrap_or_else(|| match status {
                    Some(404) => "not found".into(),
                    Some(403) => "forbidden".into(),
                    _ => "no message".into(),
                });
            let kind = kind_of(code.as_deref(), status);
            AwsFailure {
                kind,
                code,
                status,
                message: one_line(&message),
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            let text = DisplayErrorContext(err).to_string();
            let kind = if mentions_missing_credentials(&text) {
                FailureKind::NoCredentials
            } else {
                FailureKind::Transient
            };
            AwsFailure {
                kind,
                code: None,
                status,
                message: one_line(&text),
            }
        }
        SdkError::ConstructionFailure(_) => {
            let text = DisplayErrorContext(err).to_string();
            let kind = if mentions_missing_credentials(&text) {
                FailureKind::NoCredentials
            } else {
                FailureKind::Other
            };
            AwsFailure {
                kind,
                code: None,
                status,
                message: one_line(&text),
            }
        }
        // A response that could not be parsed: some servers answer unsupported calls with
        // an HTML 5xx page; 5xx stays transient, anything else is not worth retrying.
        SdkError::ResponseError(_) => AwsFailure {
            kind: match status {
                Some(s) if s >= 500 => FailureKind::Transient,
                _ => FailureKind::Other,
            },
            code: None,
            status,
            message: one_line(&DisplayErrorContext(err).to_string()),
        },
        _ => AwsFailure {
            kind: FailureKind::Other,
            code: None,
            status,
            message: one_line(&DisplayErrorContext(err).to_string()),
        },
    }
}

fn kind_of(code: Option<&str>, status: Option<u16>) -> FailureKind {
    if let Some(code) = code {
        if THROTTLING_CODES.contains(&code) {
            return FailureKind::Throttled;
        }
        if DENIED_CODES.contains(&code) {
            return FailureKind::Denied;
        }
        if NOT_FOUND_CODES.contains(&code) {
            return FailureKind::NotFound;
        }
        if matches!(
            code,
            "InternalError" | "InternalFailure" | "ServiceUnavailable" | "RequestTimeout"
        ) {
            return FailureKind::Transient;
        }
    }
    match status {
        Some(429) => FailureKind::Throttled,
        Some(403) => FailureKind::Denied,
        Some(404) => FailureKind::NotFound,
        Some(500 | 502 | 503 | 504) => FailureKind::Transient,
        _ => FailureKind::Other,
    }
}

fn mentions_missing_credentials(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("no credentials") || text.contains("credentials provider was not enabled")
}

fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // HTML error pages and long chains say nothing more after a few hundred characters.
    match line.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// How often, and how patiently, a call is tried again.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Tries in all, the first included.
    pub attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// For polls that may meet a throttling spell: about a minute of patience.
    pub const POLL: Backoff = Backoff {
        attempts: 6,
        initial: Duration::from_secs(1),
        max: Duration::from_secs(20),
    };

    /// The wait after failed try `n` (0-based): doubling from `initial`, capped at `max`,
    /// with up to a quarter of jitter so a fleet of callers does not retry in step.
    pub fn delay(&self, n: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(2u32.saturating_pow(n.min(16)))
            .min(self.max);
        let mut byte = [0u8; 1];
        let jitter = match getrandom::fill(&mut byte) {
            Ok(()) => base / 4 * u32::from(byte[0]) / 255,
            Err(_) => Duration::ZERO,
        };
        base.saturating_sub(jitter)
    }
}

/// Runs `op` until it succeeds, fails in a way `retryable` refuses, or `backoff.attempts` are
/// spent; waits `backoff.delay(n)` between tries. Returns the last error.
pub async fn retry<T, E, F, Fut>(
    backoff: Backoff,
    retryable: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut tried = 0;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(err) => {
                tried += 1;
                if tried >= backoff.attempts.max(1) || !retryable(&err) {
                    return Err(err);
                }
                tokio::time::sleep(backoff.delay(tried - 1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_codedeploy::operation::get_deployment::GetDeploymentError;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn service_error(
        status: u16,
        code: &str,
        message: &str,
    ) -> SdkError<GetDeploymentError, HttpResponse> {
        let meta = ErrorMetadata::builder().code(code).message(message).build();
        SdkError::service_error(
            GetDeploymentError::generic(meta),
            HttpResponse::new(status.try_into().unwrap(), SdkBody::empty()),
        )
    }

    #[test]
    fn access_denied_reads_as_refused_credentials_with_aws_words() {
        let failure = classify(&service_error(
            403,
            "AccessDeniedException",
            "User: arn:aws:iam::1:user/ci is not authorized to perform: codedeploy:GetDeployment",
        ));
        assert_eq!(failure.kind, FailureKind::Denied);
        let text = failure.to_string();
        assert!(text.starts_with("AWS refused the credentials"), "{text}");
        assert!(
            text.contains("not authorized to perform: codedeploy:GetDeployment"),
            "{text}"
        );
        assert!(text.ends_with("(HTTP 403)"), "{text}");

        let unknown_key = classify(&service_error(
            403,
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist",
        ));
        assert_eq!(unknown_key.kind, FailureKind::Denied);
    }

    #[test]
    fn throttling_and_5xx_are_retryable_the_rest_is_not() {
        for (status, code, kind) in [
            (400, "ThrottlingException", FailureKind::Throttled),
            (503, "SlowDown", FailureKind::Throttled),
            (429, "Whatever", FailureKind::Throttled),
            (500, "InternalFailure", FailureKind::Transient),
            (502, "", FailureKind::Transient),
            (404, "NoSuchBucket", FailureKind::NotFound),
            (
                400,
                "DeploymentGroupDoesNotExistException",
                FailureKind::NotFound,
            ),
            (400, "InvalidRevisionException", FailureKind::Other),
        ] {
            let failure = classify(&service_error(status, code, "m"));
            assert_eq!(failure.kind, kind, "{status} {code}");
            assert_eq!(
                failure.kind.is_retryable(),
                matches!(kind, FailureKind::Throttled | FailureKind::Transient)
            );
        }
    }

    #[test]
    fn a_missing_credential_is_named_as_such() {
        let err: SdkError<GetDeploymentError, HttpResponse> = SdkError::construction_failure(
            "failed to resolve identity: no credentials provided: the credentials provider was not enabled",
        );
        let failure = classify(&err);
        assert_eq!(failure.kind, FailureKind::NoCredentials);
        assert!(
            failure.to_string().starts_with("no AWS credentials found"),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn throttling_is_retried_with_backoff_until_it_passes() {
        let calls = AtomicU32::new(0);
        let backoff = Backoff {
            attempts: 5,
            initial: Duration::from_millis(1),
            max: Duration::from_millis(4),
        };
        let retryable =
            |e: &SdkError<GetDeploymentError, HttpResponse>| classify(e).kind.is_retryable();
        let answer = retry(backoff, retryable, || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(service_error(400, "ThrottlingException", "Rate exceeded"))
                } else {
                    Ok("deployed")
                }
            }
        })
        .await;
        assert_eq!(answer.unwrap(), "deployed");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "three throttled tries, then success"
        );

        // A throttling spell longer than the patience gives the last error back.
        calls.store(0, Ordering::SeqCst);
        let answer: Result<(), _> = retry(backoff, retryable, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(service_error(400, "ThrottlingException", "Rate exceeded")) }
        })
        .await;
        assert_eq!(classify(&answer.unwrap_err()).kind, FailureKind::Throttled);
        assert_eq!(calls.load(Ordering::SeqCst), 5);

        // Refused credentials are not retried at all.
        calls.store(0, Ordering::SeqCst);
        let answer: Result<(), _> = retry(backoff, retryable, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(service_error(403, "AccessDeniedException", "no")) }
        })
        .await;
        assert!(answer.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_bounded_jitter() {
        let backoff = Backoff {
            attempts: 10,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        for (n, base) in [
            (0, 100),
            (1, 200),
            (2, 400),
            (3, 800),
            (4, 1000),
            (30, 1000),
        ] {
            let delay = backoff.delay(n).as_millis() as u64;
            assert!(
                delay <= base && delay >= base * 3 / 4,
                "try {n}: {delay} ms"
            );
        }
    }
}
