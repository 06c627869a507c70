//! The local artifact store: `<data_dir>/artifacts/<app>/<version>.zip`. Writes go to a
//! temporary name first and are renamed into place, so a half-written bundle is never seen.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{ArtifactStore, StoreError, StoredBundle, beyond_retention, modified, sha256_file};

pub struct LocalStore {
    root: PathBuf,
    /// The newest bundles kept per app (`store.keep`).
    keep: usize,
}

impl LocalStore {
    pub fn new(root: PathBuf, keep: u32) -> Self {
        Self {
            root,
            keep: keep as usize,
        }
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        // Keys are made by `put` from an app name and a version; refuse anything that could
        // leave the store's folder all the same.
        let safe = !key.is_empty()
            && Path::new(key)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if safe {
            Ok(self.root.join(key))
        } else {
            Err(StoreError::NotFound { key: key.into() })
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[async_trait]
impl ArtifactStore for LocalStore {
    async fn put(&self, app: &str, version: &str, file: &Path) -> Result<StoredBundle, StoreError> {
        let key = format!("{app}/{version}.zip");
        let dest = self.path_of(&key)?;
        let file = file.to_owned();
        tokio::task::spawn_blocking(move || {
            let dir = dest.parent().expect("a key has a folder part");
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            remove_stale_partials(dir);
            let partial = dest.with_extension("zip.partial");
            let written = (|| {
                let size = std::fs::copy(&file, &partial).map_err(io(&partial))?;
                std::fs::File::open(&partial)
                    .and_then(|f| f.sync_all())
                    .map_err(io(&partial))?;
                let sha256 = sha256_file(&partial).map_err(io(&partial))?;
                std::fs::rename(&partial, &dest).map_err(io(&dest))?;
                Ok(StoredBundle { key, sha256, size })
            })();
            if written.is_err() {
                // On a full disk, what was copied must not stay to fill it.
                let _ = std::fs::remove_file(&partial);
            }
            written
        })
        .await
        .map_err(|err| StoreError::Io {
            path: "store task".into(),
            source: std::io::Error::other(err),
        })?
    }

    async fn get(&self, key: &str, sha256: &str, dest: &Path) -> Result<(), StoreError> {
        let source = self.path_of(key)?;
        let (key, sha256, dest) = (key.to_owned(), sha256.to_owned(), dest.to_owned());
        tokio::task::spawn_blocking(move || {
            if !source.exists() {
                return Err(StoreError::NotFound { key });
            }
            std::fs::copy(&source, &dest).map_err(io(&dest))?;
            let actual = sha256_file(&dest).map_err(io(&dest))?;
            if actual != sha256 {
                return Err(StoreError::Checksum {
                    key,
                    expected: sha256,
                    actual,
                });
            }
            Ok(())
        })
        .await
        .map_err(|err| StoreError::Io {
            path: "store task".into(),
            source: std::io::Error::other(err),
        })?
    }

    async fn prune(&self, app: &str, protect: &[String]) -> Result<Vec<String>, StoreError> {
        let dir = self.path_of(app)?;
        let (app, keep, protect) = (app.to_owned(), self.keep, protect.to_vec());
        tokio::task::spawn_blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(err) => return Err(io(&dir)(err)),
            };
            let mut bundles = Vec::new();
            for entry in entries {
                let entry = entry.map_err(io(&dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".zip") {
                    let metadata = entry.metadata().map_err(io(&entry.path()))?;
                    bundles.push((modified(&metadata), format!("{app}/{name}")));
                }
            }
            let doomed = beyond_retention(bundles, keep, &protect);
            for key in &doomed {
                let path = dir.join(key.rsplit('/').next().unwrap_or(key));
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
            Ok(doomed)
        })
        .await
        .map_err(|err| StoreError::Io {
            path: "store task".into(),
            source: std::io::Error::other(err),
        })?
    }
}

/// An app's uploads run one at a time, so a `.partial` already in its folder was cut short
/// by a stop and will never be finished.
fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "partial") {
            tracing::info!(path = %path.display(), "removing an upload cut short by a stop");
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_then_get_round_trips_with_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("artifacts"), 10);
        let bundle = dir.path().join("b.zip");
        std::fs::write(&bundle, b"zip bytes").unwrap();

        let stored = store.put("hello", "1.0.0-1", &bundle).await.unwrap();
        assert_eq!(stored.key, "hello/1.0.0-1.zip");
        assert_eq!(stored.size, 9);

        let copy = dir.path().join("copy.zip");
        store.get(&stored.key, &stored.sha256, &copy).await.unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"zip bytes");
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_and_the_protected_bundles() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("artifacts"), 2);
        assert!(store.prune("hello", &[]).await.unwrap().is_empty());
        let bundle = dir.path().join("b.zip");
        std::fs::write(&bundle, b"zip bytes").unwrap();
        for version in ["v1", "v2", "v3", "v4"] {
            store.put("hello", version, &bundle).await.unwrap();
        }
        let mut doomed = store
            .prune("hello", &["hello/v1.zip".into()])
            .await
            .unwrap();
        doomed.sort();
        assert_eq!(doomed, ["hello/v2.zip"]);
        let mut left: Vec<_> = std::fs::read_dir(dir.path().join("artifacts/hello"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["v1.zip", "v3.zip", "v4.zip"]);
    }

    #[tokio::test]
    async fn a_corrupt_or_missing_bundle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("artifacts"), 10);
        let bundle = dir.path().join("b.zip");
        std::fs::write(&bundle, b"zip bytes").unwrap();
        let stored = store.put("hello", "v1", &bundle).await.unwrap();
        std::fs::write(dir.path().join("artifacts/hello/v1.zip"), b"changed").unwrap();

        let dest = dir.path().join("copy.zip");
        let err = store
            .get(&stored.key, &stored.sha256, &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Checksum { .. }), "{err}");
        let err = store
            .get("hello/v2.zip", &stored.sha256, &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        let err = store
            .get("../escape.zip", &stored.sha256, &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    }
}
