//! Automatic certificates (RFC 8555) for the sites with `tls = { acme = true }`: one
//! certificate per site covering its names, proven by HTTP-01 on the edge's plain listener
//! ([`Challenges`]), or by TLS-ALPN-01 on its TLS listener when there is no plain one. At start, every site without a certificate valid past the renewal
//! window is issued one; each is renewed `renew_before` its expiry; a failure is retried
//! with a doubling backoff and shown with the certificate (`Certificates::set_error`). The
//! account key and the certificates live under `data_dir/acme`, every file 0600. This
//! module never serves a request and never touches a certificate the operator gave.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tokio::sync::watch;

use super::{Certificates, Challenges};
use crate::config::AcmeConfig;

/// The first retry after a failure; each next one waits twice as long, up to the cap.
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(60 * 60);

/// How often a certificate's expiry is looked at when nothing else is due.
const CHECK_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// How long ACME may take to validate and to issue, each.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("ACME: authorization for {name} is {status:?}")]
    Authorization {
        name: String,
        status: AuthorizationStatus,
    },
    #[error("ACME: {name} offers no {kind} challenge")]
    NoChallenge { name: String, kind: &'static str },
    #[error("ACME: the TLS-ALPN-01 certificate for {name}: {reason}")]
    AlpnCertificate { name: String, reason: String },
    #[error("ACME: the order ended {0:?}")]
    Order(OrderStatus),
    #[error("ACME: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ACME: stored account {path}: {source}")]
    Account {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Where ACME keeps the certificate and key of `owner` (`app.hello`, `server`).
pub fn cert_files(data_dir: &Path, owner: &str) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("acme").join(owner);
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// One site whose certificate ACME keeps.
#[derive(Debug, Clone)]
pub struct AcmeSite {
    pub owner: String,
    pub names: Vec<String>,
}

/// Whether a certificate expiring at `not_after` (none: there is none) must be issued at
/// `now` (Unix seconds), renewing `renew_before` ahead.
pub fn due(not_after: Option<i64>, now: i64, renew_before: Duration) -> bool {
    let ahead = i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX);
    not_after.is_none_or(|expiry| expiry.saturating_sub(ahead) <= now)
}

/// The backoff after `failures` failed attempts in a row.
pub fn retry_after(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_RETRY)
}

/// How the sites prove they own their names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// A file under `/.well-known/acme-challenge/` on the plain listener.
    Http01,
    /// A certificate for the `acme-tls/1` protocol on the TLS listener.
    TlsAlpn01,
}

/// Keeps the certificates of `sites` issued and renewed until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn keep(
    config: AcmeConfig,
    proof: Proof,
    base_dir: PathBuf,
    data_dir: PathBuf,
    sites: Vec<AcmeSite>,
    certificates: Arc<Certificates>,
    challenges: Challenges,
    mut shutdown: watch::Receiver<bool>,
) {
    // rustls needs one process-wide crypto provider for the ACME client's connections;
    // ring, like the rest of nonstop. Already installed is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let renew_before = Duration::from_secs(u64::from(config.renew_before_days) * 24 * 60 * 60);
    let mut account: Option<Account> = None;
    let mut failures = vec![0u32; sites.len()];
    let mut next_try = vec![tokio::time::Instant::now(); sites.len()];
    loop {
        let now = chrono::Utc::now().timestamp();
        let status = certificates.status();
        for (index, site) in sites.iter().enumerate() {
            let not_after = status
                .iter()
                .find(|s| s.owner == site.owner)
                .and_then(|s| s.not_after);
            if !due(not_after, now, renew_before) || tokio::time::Instant::now() < next_try[index] {
                continue;
            }
            tracing::info!(owner = %site.owner, names = ?site.names, "asking ACME for a certificate");
            let issued = async {
                if account.is_none() {
                    account = Some(open_account(&config, &base_dir, &data_dir).await?);
                }
                let Some(account) = &account else {
                    unreachable!("the account was just opened");
                };
                issue(account, site, &data_dir, proof, &challenges, &certificates).await
            };
            match issued.await {
                Ok(()) => {
                    failures[index] = 0;
                    certificates.reload();
                    certificates.set_error(&site.owner, None);
                    tracing::info!(owner = %site.owner, "ACME issued a certificate");
                }
                Err(err) => {
                    failures[index] += 1;
                    let wait = retry_after(failures[index]);
                    next_try[index] = tokio::time::Instant::now() + wait;
                    tracing::warn!(owner = %site.owner, error = %err, retry_in = ?wait, "ACME failed");
                    certificates.set_error(&site.owner, Some(err.to_string()));
                }
            }
            super::save_status(&certificates, &data_dir);
        }
        let soonest = next_try
            .iter()
            .filter(|at| **at > tokio::time::Instant::now())
            .min()
            .copied()
            .unwrap_or_else(|| tokio::time::Instant::now() + CHECK_INTERVAL);
        let wake = soonest.min(tokio::time::Instant::now() + CHECK_INTERVAL);
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// The ACME account kept in `data_dir/acme/account.json`, made on first use.
async fn open_account(
    config: &AcmeConfig,
    base_dir: &Path,
    data_dir: &Path,
) -> Result<Account, AcmeError> {
    let path = data_dir.join("acme").join("account.json");
    let builder = match &config.ca_file {
        Some(ca) => Account::builder_with_root(base_dir.join(ca))?,
        None => Account::builder()?,
    };
    match std::fs::read(&path) {
        Ok(stored) => {
            let credentials: AccountCredentials =
                serde_json::from_slice(&stored).map_err(|source| AcmeError::Account {
                    path: path.clone(),
                    source,
                })?;
            Ok(builder.from_credentials(credentials).await?)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
            let (account, credentials) = builder
                .create(
                    &NewAccount {
                        contact: &contact,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    config.directory.clone(),
                    None,
                )
                .await?;
            let text = serde_json::to_vec(&credentials).map_err(|source| AcmeError::Account {
                path: path.clone(),
                source,
            })?;
            write_private(&path, &text)?;
            tracing::info!(path = %path.display(), "made an ACME account");
            Ok(account)
        }
        Err(source) => Err(AcmeError::Io { path, source }),
    }
}

/// One order for `site`: answer each authorization's HTTP-01 challenge, wait until ACME
/// validated them, finalize with a new key, and write the chain and key.
async fn issue(
    account: &Account,
    site: &AcmeSite,
    data_dir: &Path,
    proof: Proof,
    challenges: &Challenges,
    certificates: &Certificates,
) -> Result<(), AcmeError> {
    let identifiers: Vec<Identifier> = site.names.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut published = Vec::new();
    let answered = async {
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            let name = authorization.identifier().to_string();
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => return Err(AcmeError::Authorization { name, status }),
            }
            let (kind, label) = match proof {
                Proof::Http01 => (ChallengeType::Http01, "http-01"),
                Proof::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
            };
            let mut challenge =
                authorization
                    .challenge(kind)
                    .ok_or_else(|| AcmeError::NoChallenge {
                        name: name.clone(),
                        kind: label,
                    })?;
            let key_authorization = challenge.key_authorization();
            match proof {
                Proof::Http01 => {
                    challenges.publish(
                        challenge.token.clone(),
                        key_authorization.as_str().to_owned(),
                    );
                    published.push(challenge.token.clone());
                }
                Proof::TlsAlpn01 => {
                    certificates
                        .publish_challenge(&name, key_authorization.digest().as_ref())
                        .map_err(|reason| AcmeError::AlpnCertificate {
                            name: name.clone(),
                            reason,
                        })?;
                    published.push(name.clone());
                }
            }
            tracing::info!(%name, ?proof, "ACME challenge answered");
            challenge.set_ready().await?;
        }
        Ok(())
    };
    let answered = answered.await;
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(ORDER_TIMEOUT);
    let ready = match answered {
        Ok(()) => order.poll_ready(&retries).await.map_err(AcmeError::from),
        Err(err) => Err(err),
    };
    for published in &published {
        match proof {
            Proof::Http01 => challenges.withdraw(published),
            Proof::TlsAlpn01 => certificates.withdraw_challenge(published),
        }
    }
    match ready? {
        OrderStatus::Ready => {}
        other => return Err(AcmeError::Order(other)),
    }
    let key = order.finalize().await?;
    let chain = order.poll_certificate(&retries).await?;
    let (cert_file, key_file) = cert_files(data_dir, &site.owner);
    // The key first: the reloader reads a pair only once both files changed, and a
    // certificate without its key would be refused anyway.
    write_private(&key_file, key.as_bytes())?;
    write_private(&cert_file, chain.as_bytes())?;
    Ok(())
}

/// Writes `contents` whole (temp + rename) in a 0700 folder, the file 0600.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), AcmeError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let io = |source| AcmeError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_due_when_missing_or_inside_the_renewal_window() {
        let month = Duration::from_secs(30 * 24 * 60 * 60);
        let now = 1_800_000_000;
        let day = 24 * 60 * 60;
        assert!(due(None, now, month), "none yet");
        assert!(due(Some(now + 29 * day), now, month), "inside the window");
        assert!(due(Some(now - day), now, month), "expired");
        assert!(!due(Some(now + 31 * day), now, month), "not yet");
    }

    #[test]
    fn failures_back_off_doubling_up_to_an_hour() {
        let waits: Vec<u64> = (1..=12).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(
            waits,
            [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
        );
    }
}
