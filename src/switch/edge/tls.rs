//! The edge's certificates: one PEM chain and key per site (the operator's files, or the
//! ones ACME keeps under `data_dir`), picked by SNI, and read again whenever a file changes.
//! A new certificate serves new handshakes only; connections already open keep theirs. A
//! file that is missing or does not parse never replaces a certificate that works: the old
//! one stays, and the error is shown with it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::config::HostName;

/// The protocols the TLS listener offers, preferred first; the last one only ever answers
/// ACME's TLS-ALPN-01 validation (RFC 8737), which asks for nothing else.
pub const ALPN: [&[u8]; 3] = [b"h2", b"http/1.1", ACME_TLS_ALPN];

/// ACME's TLS-ALPN-01 protocol name.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// One certificate's place: the names it serves and its files.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Who the certificate is for, as people read it (`app.hello`, `server`).
    pub owner: String,
    pub names: Vec<HostName>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Issued by ACME (else the operator's files).
    pub acme: bool,
}

/// What is known about one certificate, for the API and the dashboard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CertStatus {
    pub owner: String,
    pub names: Vec<String>,
    pub acme: bool,
    /// Unix seconds; `None` while no certificate could be read.
    pub not_after: Option<i64>,
    pub issuer: Option<String>,
    /// Why the files could not be used, the last time they were read.
    pub error: Option<String>,
}

#[derive(Default)]
struct Table {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For a client that names no host (no SNI, or an IP address): the default site's.
    default: Option<Arc<CertifiedKey>>,
}

/// The files' state when they were last read: a change of either means read again.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    cert: Option<(SystemTime, u64)>,
    key: Option<(SystemTime, u64)>,
}

struct Slot {
    spec: CertSpec,
    stamp: Option<Stamp>,
    key: Option<Arc<CertifiedKey>>,
    status: CertStatus,
}

/// Every site's certificate, swapped whole when one changes.
pub struct Certificates {
    table: ArcSwap<Table>,
    /// TLS-ALPN-01 challenge certificates by name, while ACME waits for validation.
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    slots: Mutex<Vec<Slot>>,
    /// Whose certificate a client without SNI gets (`proxy.default_app`'s).
    default_owner: Option<String>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Certificates")
    }
}

impl Certificates {
    /// Reads every file once; what cannot be read yet is retried by [`Self::reload`].
    pub fn load(specs: Vec<CertSpec>, default_owner: Option<String>) -> Arc<Self> {
        let slots = specs
            .into_iter()
            .map(|spec| Slot {
                status: CertStatus {
                    owner: spec.owner.clone(),
                    names: spec.names.iter().map(|n| n.to_string()).collect(),
                    acme: spec.acme,
                    ..CertStatus::default()
                },
                spec,
                stamp: None,
                key: None,
            })
            .collect();
        let certificates = Arc::new(Self {
            table: ArcSwap::from_pointee(Table::default()),
            challenges: Mutex::new(HashMap::new()),
            slots: Mutex::new(slots),
            default_owner,
        });
        certificates.reload();
        certificates
    }

    /// Reads again the files that changed since they were last read; returns whether any
    /// certificate was replaced.
    pub fn reload(&self) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for slot in slots.iter_mut() {
            let stamp = Stamp {
                cert: file_stamp(&slot.spec.cert_file),
                key: file_stamp(&slot.spec.key_file),
            };
            if slot.stamp == Some(stamp) {
                continue;
            }
            slot.stamp = Some(stamp);
            match read_pair(&slot.spec) {
                Ok((key, not_after, issuer)) => {
                    slot.key = Some(Arc::new(key));
                    slot.status.not_after = not_after;
                    slot.status.issuer = issuer;
                    slot.status.error = None;
                    changed = true;
                    tracing::info!(owner = %slot.spec.owner, not_after, "certificate loaded");
                }
                Err(err) => {
                    if slot.key.is_some() || stamp.cert.is_some() {
                        tracing::warn!(owner = %slot.spec.owner, error = %err, "certificate not loaded");
                    }
                    slot.status.error = Some(err);
                }
            }
        }
        if changed {
            let mut table = Table::default();
            for slot in slots.iter() {
                let Some(key) = &slot.key else { continue };
                if self.default_owner.as_deref() == Some(slot.spec.owner.as_str()) {
                    table.default = Some(key.clone());
                }
                for name in &slot.spec.names {
                    match name.as_str().strip_prefix("*.") {
                        Some(below) => table.wildcard.insert(below.to_owned(), key.clone()),
                        None => table.exact.insert(name.to_string(), key.clone()),
                    };
                }
            }
            self.table.store(Arc::new(table));
        }
        changed
    }

    /// Answers TLS-ALPN-01 for `name` with a self-signed certificate carrying the key
    /// authorization's digest (RFC 8737 §3), until [`Self::withdraw_challenge`].
    pub fn publish_challenge(&self, name: &str, digest: &[u8]) -> Result<(), String> {
        let digest: [u8; 32] = digest
            .try_into()
            .map_err(|_| "the key authorization digest is not 32 bytes".to_owned())?;
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der())?;
        let signing =
            rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| e.to_string())?;
        let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing));
        let mut challenges = self.challenges.lock().unwrap_or_else(|p| p.into_inner());
        challenges.insert(name.to_owned(), certified);
        Ok(())
    }

    pub fn withdraw_challenge(&self, name: &str) {
        let mut challenges = self.challenges.lock().unwrap_or_else(|p| p.into_inner());
        challenges.remove(name);
    }

    /// Every certificate's state.
    pub fn status(&self) -> Vec<CertStatus> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.iter().map(|slot| slot.status.clone()).collect()
    }

    /// Notes why a certificate could not be had (an ACME failure), beside what is loaded.
    pub fn set_error(&self, owner: &str, error: Option<String>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for slot in slots.iter_mut().filter(|s| s.spec.owner == owner) {
            slot.status.error.clone_from(&error);
        }
    }

    /// The TLS settings of the edge's listener: these certificates by SNI, h2 and
    /// http/1.1 by ALPN, resumption by tickets.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut offered| offered.all(|p| p == ACME_TLS_ALPN));
        if acme {
            let name = hello.server_name()?;
            let challenges = self.challenges.lock().unwrap_or_else(|p| p.into_inner());
            return challenges.get(name).cloned();
        }
        let table = self.table.load();
        let Some(name) = hello.server_name() else {
            return table.default.clone();
        };
        // rustls hands the SNI name over lowercased already.
        if let Some(key) = table.exact.get(name) {
            return Some(key.clone());
        }
        let (_, below) = name.split_once('.')?;
        table.wildcard.get(below).cloned()
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

type Pair = (CertifiedKey, Option<i64>, Option<String>);

fn read_pair(spec: &CertSpec) -> Result<Pair, String> {
    let chain = CertificateDer::pem_file_iter(&spec.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| format!("{}: {err}", spec.cert_file.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "{}: no certificate in it",
            spec.cert_file.display()
        ));
    };
    let (not_after, issuer) = match super::x509::summary(leaf) {
        Some(summary) => (Some(summary.not_after), summary.issuer),
        None => (None, None),
    };
    let key = PrivateKeyDer::from_pem_file(&spec.key_file)
        .map_err(|err| format!("{}: {err}", spec.key_file.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|err| format!("{}: {err}", spec.key_file.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|err| {
        format!(
            "{} does not match {}: {err}",
            spec.key_file.display(),
            spec.cert_file.display()
        )
    })?;
    Ok((certified, not_after, issuer))
}
