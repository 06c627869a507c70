//! Artifact stores: where bundles are kept between Upload and the runner's DownloadBundle.
//! `local` (a folder under `data_dir`) is the default; the S3 twin sits beside it. A store
//! only moves files and checks their sha256; it never decides what to deploy.

pub mod local;
pub mod s3;

use std::path::Path;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bundle {key} not found in the store")]
    NotFound { key: String },
    #[error("bundle {key} is corrupt: sha256 {actual}, expected {expected}")]
    Checksum {
        key: String,
        expected: String,
        actual: String,
    },
    #[error("store I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A remote store (S3) refused or failed a call; `message` is one line, safe to log.
    #[error("{operation} {target}: {message}")]
    Remote {
        operation: &'static str,
        target: String,
        message: String,
    },
}

/// A bundle as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBundle {
    /// Where it is in the store, e.g. `hello/1.0.1-SNAPSHOT-20261125140000.zip`.
    pub key: String,
    pub sha256: String,
    pub size: u64,
}

#[async_trait]
pub trait ArtifactStore: Send + Sync {
    /// Stores the bundle at `file` for `app`/`version`.
    async fn put(&self, app: &str, version: &str, file: &Path) -> Result<StoredBundle, StoreError>;
    /// Copies the bundle `key` to `dest`, checking it against `sha256`.
    async fn get(&self, key: &str, sha256: &str, dest: &Path) -> Result<(), StoreError>;
    /// Retention: deletes `app`'s older bundles as the store's settings say, never one of
    /// `protect` (the live and previous bundles). Returns the deleted keys. Stores without a
    /// retention setting keep everything.
    async fn prune(&self, app: &str, protect: &[String]) -> Result<Vec<String>, StoreError> {
        let _ = (app, protect);
        Ok(Vec::new())
    }
}

/// The sha256 of a file, hex, read in chunks (bundles can be large).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let read = file.read(&mut buf)?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}
