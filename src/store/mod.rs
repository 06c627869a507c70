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

/// Retention, pure: of `items` (last-modified, name), the names to delete so that the newest
/// `keep` stay, plus every name in `protect` whatever its age. Ties in time are broken by
/// name, which sorts by version for nonstop's stamped versions. Stores prune bundles with
/// it, the local runner its revisions and releases.
pub fn beyond_retention(
    mut items: Vec<(Option<(i64, u32)>, String)>,
    keep: usize,
    protect: &[String],
) -> Vec<String> {
    items.sort_by(|a, b| b.cmp(a));
    items
        .into_iter()
        .skip(keep)
        .map(|(_, name)| name)
        .filter(|name| !protect.contains(name))
        .collect()
}

/// A file's or folder's last-modified time, as `beyond_retention` sorts it.
pub fn modified(metadata: &std::fs::Metadata) -> Option<(i64, u32)> {
    let since_epoch = metadata
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some((since_epoch.as_secs() as i64, since_epoch.subsec_nanos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_and_every_protected_bundle() {
        let bundles = (1..=6)
            .map(|n| (Some((1_000 + n, 0)), format!("p/hello/v{n}.zip")))
            .collect();
        let protect = ["p/hello/v1.zip".to_owned()];
        let doomed = beyond_retention(bundles, 3, &protect);
        assert_eq!(doomed, ["p/hello/v3.zip", "p/hello/v2.zip"]);

        // Same second: the key (the stamped version) decides.
        let bundles = vec![
            (Some((5, 0)), "a/v2.zip".to_owned()),
            (Some((5, 0)), "a/v3.zip".to_owned()),
            (Some((5, 0)), "a/v1.zip".to_owned()),
        ];
        assert_eq!(beyond_retention(bundles, 2, &[]), ["a/v1.zip"]);
        assert!(beyond_retention(Vec::new(), 0, &[]).is_empty());
    }
}
