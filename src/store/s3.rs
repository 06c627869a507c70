//! The S3 artifact store: bundles at `s3://{bucket}/{prefix}/{app}/{version}.zip`, their
//! sha256 in the object's metadata (`x-amz-meta-sha256`) and checked again on download.
//! Large bundles go up in parts (multipart above a threshold) streamed from the file, never
//! loaded whole into memory. Retention keeps the newest `keep` bundles of each app and never
//! deletes the ones it is told to protect (live and previous). Works against any
//! S3-compatible server when `endpoint` is set (path-style addressing then). Credentials come
//! from the standard chain and are never logged.

use std::path::Path;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{ArtifactStore, StoreError, StoredBundle, beyond_retention, sha256_file};
use crate::aws::{self, AwsFailure, Endpoint, FailureKind, Timeouts};
use crate::config::StoreConfig;

/// S3 refuses parts under 5 MiB (all but the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3 allows at most this many parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// The metadata key holding the bundle's sha256 (sent as `x-amz-meta-sha256`).
pub const SHA256_METADATA: &str = "sha256";

/// When and how a bundle is uploaded in parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Multipart {
    /// Bundles larger than this go up in parts.
    pub threshold: u64,
    /// Size of each part (the last may be smaller); at least `MIN_PART_SIZE`.
    pub part_size: u64,
}

impl Default for Multipart {
    fn default() -> Self {
        Self {
            threshold: 16 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
        }
    }
}

/// What `nonstop.toml` says about an app's S3 store.
#[derive(Clone, Debug)]
pub struct S3Settings {
    pub bucket: String,
    /// Folder inside the bucket, without leading or trailing `/`; may be empty.
    pub prefix: String,
    pub endpoint: Endpoint,
    /// Keep the newest `keep` bundles of each app; `None` keeps all.
    pub keep: Option<u32>,
}

/// Where a stored bundle is, as CodeDeploy wants it named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Object {
    pub bucket: String,
    pub key: String,
    pub e_tag: Option<String>,
    pub version_id: Option<String>,
}

impl S3Settings {
    /// The settings of an `s3` store; `None` for any other kind.
    pub fn from_config(store: &StoreConfig) -> Option<Self> {
        match store {
            StoreConfig::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                keep,
            } => Some(Self {
                bucket: bucket.clone(),
                prefix: prefix.trim_matches('/').to_owned(),
                endpoint: Endpoint {
                    region: region.clone(),
                    url: endpoint.clone(),
                },
                keep: *keep,
            }),
            StoreConfig::Local { .. } => None,
        }
    }
}

pub struct S3Store {
    client: Client,
    settings: S3Settings,
    multipart: Multipart,
}

impl S3Store {
    /// Builds the S3 client (no call is made yet: a bad credential shows at the first upload).
    pub async fn new(settings: S3Settings) -> Self {
        let sdk = aws::sdk_config(&settings.endpoint, Timeouts::TRANSFER).await;
        let mut config = aws_sdk_s3::config::Builder::from(&sdk);
        if settings.endpoint.url.is_some() {
            // S3-compatible servers rarely resolve `bucket.host` names, and many refuse the
            // SDK's newer default request checksums; we check our own sha256 anyway.
            config = config.force_path_style(true).request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            );
        }
        Self {
            client: Client::from_conf(config.build()),
            settings,
            multipart: Multipart::default(),
        }
    }

    /// Changes when bundles are uploaded in parts (tests use a small threshold).
    pub fn with_multipart(mut self, multipart: Multipart) -> Self {
        self.multipart = Multipart {
            threshold: multipart.threshold,
            part_size: multipart.part_size.max(MIN_PART_SIZE),
        };
        self
    }

    pub fn bucket(&self) -> &str {
        &self.settings.bucket
    }

    /// `{prefix}/{app}/{version}.zip` (no leading `/` when the prefix is empty).
    pub fn key_of(&self, app: &str, version: &str) -> String {
        format!("{}{app}/{version}.zip", self.app_folder_prefix())
    }

    fn app_folder_prefix(&self) -> String {
        let prefix = self.settings.prefix.trim_matches('/');
        if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        }
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.settings.bucket)
    }

    fn remote(&self, operation: &'static str, key: &str, failure: AwsFailure) -> StoreError {
        let message = match (failure.kind, failure.code.as_deref()) {
            (_, Some("NoSuchBucket")) => format!(
                "bucket `{}` does not exist (create it, or fix `store.bucket`)",
                self.settings.bucket
            ),
            _ => failure.to_string(),
        };
        StoreError::Remote {
            operation,
            target: self.url(key),
            message,
        }
    }

    /// Where `key` is and which version of it, as CodeDeploy's S3 revision wants it; checks
    /// that the stored object's sha256 is the one expected.
    pub async fn locate(&self, key: &str, sha256: &str) -> Result<S3Object, StoreError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map_err(|err| {
                let failure = aws::classify(&err);
                if failure.kind == FailureKind::NotFound && failure.code.is_none() {
                    StoreError::NotFound { key: key.into() }
                } else {
                    self.remote("S3 HeadObject", key, failure)
                }
            })?;
        if let Some(stored) = head.metadata().and_then(|m| m.get(SHA256_METADATA))
            && stored != sha256
        {
            return Err(StoreError::Checksum {
                key: key.into(),
                expected: sha256.into(),
                actual: stored.clone(),
            });
        }
        Ok(S3Object {
            bucket: self.settings.bucket.clone(),
            key: key.into(),
            e_tag: head.e_tag().map(|t| t.trim_matches('"').to_owned()),
            version_id: head.version_id().map(str::to_owned),
        })
    }

    async fn put_whole(
        &self,
        key: &str,
        file: &Path,
        size: u64,
        sha256: &str,
    ) -> Result<(), StoreError> {
        let body = ByteStream::from_path(file)
            .await
            .map_err(|err| StoreError::Io {
                path: file.display().to_string(),
                source: std::io::Error::other(err),
            })?;
        self.client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .content_type("application/zip")
            .content_length(size as i64)
            .metadata(SHA256_METADATA, sha256)
            .body(body)
            .send()
            .await
            .map_err(|err| self.remote("S3 PutObject", key, aws::classify(&err)))?;
        Ok(())
    }

    async fn put_in_parts(
        &self,
        key: &str,
        file: &Path,
        size: u64,
        sha256: &str,
    ) -> Result<u32, StoreError> {
        // A part size that keeps the upload under S3's part count limit.
        let part_size = self
            .multipart
            .part_size
            .max(size.div_ceil(MAX_PARTS))
            .max(MIN_PART_SIZE);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(key)
            .content_type("application/zip")
            .metadata(SHA256_METADATA, sha256)
            .send()
            .await
            .map_err(|err| self.remote("S3 CreateMultipartUpload", key, aws::classify(&err)))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let uploaded = self
            .upload_parts(key, file, size, part_size, &upload_id)
            .await;
        let completed = match uploaded {
            Ok(parts) => {
                let count = parts.len() as u32;
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.settings.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map(|_| count)
                    .map_err(|err| {
                        self.remote("S3 CompleteMultipartUpload", key, aws::classify(&err))
                    })
            }
            Err(err) => Err(err),
        };
        if completed.is_err() {
            // Unfinished uploads are billed until aborted: abort, best effort.
            if let Err(err) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.settings.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(key, error = %aws::classify(&err), "could not abort a failed multipart upload");
            }
        }
        completed
    }

    async fn upload_parts(
        &self,
        key: &str,
        file: &Path,
        size: u64,
        part_size: u64,
        upload_id: &str,
    ) -> Result<Vec<CompletedPart>, StoreError> {
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut number = 1;
        // Bounded: `part_size` is at least `size / MAX_PARTS`.
        while offset < size {
            let length = part_size.min(size - offset);
            // Each part streams its slice of the file: memory stays at the SDK's buffer size.
            let body = ByteStream::read_from()
                .path(file)
                .offset(offset)
                .length(Length::Exact(length))
                .build()
                .await
                .map_err(|err| StoreError::Io {
                    path: file.display().to_string(),
                    source: std::io::Error::other(err),
                })?;
            let part = self
                .client
                .upload_part()
                .bucket(&self.settings.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(length as i64)
                .body(body)
                .send()
                .await
                .map_err(|err| self.remote("S3 UploadPart", key, aws::classify(&err)))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .build(),
            );
            offset += length;
            number += 1;
        }
        Ok(parts)
    }
}

#[async_trait]
impl ArtifactStore for S3Store {
    async fn put(&self, app: &str, version: &str, file: &Path) -> Result<StoredBundle, StoreError> {
        let key = self.key_of(app, version);
        let path = file.to_owned();
        let (sha256, size) = tokio::task::spawn_blocking(move || {
            let size = std::fs::metadata(&path)?.len();
            Ok::<_, std::io::Error>((sha256_file(&path)?, size))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| StoreError::Io {
            path: file.display().to_string(),
            source,
        })?;
        if size > self.multipart.threshold {
            let parts = self.put_in_parts(&key, file, size, &sha256).await?;
            tracing::info!(bucket = %self.settings.bucket, key, size, parts, "bundle uploaded in parts");
        } else {
            self.put_whole(&key, file, size, &sha256).await?;
            tracing::info!(bucket = %self.settings.bucket, key, size, "bundle uploaded");
        }
        Ok(StoredBundle { key, sha256, size })
    }

    async fn get(&self, key: &str, sha256: &str, dest: &Path) -> Result<(), StoreError> {
        let object = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map_err(|err| {
                let failure = aws::classify(&err);
                if failure.code.as_deref() == Some("NoSuchKey") {
                    StoreError::NotFound { key: key.into() }
                } else {
                    self.remote("S3 GetObject", key, failure)
                }
            })?;
        if let Some(stored) = object.metadata().and_then(|m| m.get(SHA256_METADATA))
            && stored != sha256
        {
            return Err(StoreError::Checksum {
                key: key.into(),
                expected: sha256.into(),
                actual: stored.clone(),
            });
        }
        let io = |source: std::io::Error| StoreError::Io {
            path: dest.display().to_string(),
            source,
        };
        let mut out = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut body = object.body;
        let mut hasher = Sha256::new();
        // Streamed: chunk by chunk into the file and the hash, never whole in memory.
        while let Some(chunk) = body.try_next().await.map_err(|err| StoreError::Remote {
            operation: "S3 GetObject",
            target: self.url(key),
            message: format!("download interrupted: {err}"),
        })? {
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io)?;
        }
        out.flush().await.map_err(io)?;
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            return Err(StoreError::Checksum {
                key: key.into(),
                expected: sha256.into(),
                actual,
            });
        }
        Ok(())
    }

    async fn prune(&self, app: &str, protect: &[String]) -> Result<Vec<String>, StoreError> {
        let Some(keep) = self.settings.keep else {
            return Ok(Vec::new());
        };
        let folder = format!("{}{app}/", self.app_folder_prefix());
        let mut bundles = Vec::new();
        let mut token = None;
        // Bounded: 100 pages of 1000 keys is far beyond any sane retention.
        for _ in 0..100 {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.settings.bucket)
                .prefix(&folder)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|err| self.remote("S3 ListObjectsV2", &folder, aws::classify(&err)))?;
            for object in page.contents() {
                if let Some(key) = object.key().filter(|k| k.ends_with(".zip")) {
                    let modified = object.last_modified().map(|t| (t.secs(), t.subsec_nanos()));
                    bundles.push((modified, key.to_owned()));
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        let doomed = beyond_retention(bundles, keep as usize, protect);
        for chunk in doomed.chunks(1000) {
            let objects = chunk
                .iter()
                .map(|key| ObjectIdentifier::builder().key(key).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| StoreError::Remote {
                    operation: "S3 DeleteObjects",
                    target: self.url(&folder),
                    message: err.to_string(),
                })?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|err| StoreError::Remote {
                    operation: "S3 DeleteObjects",
                    target: self.url(&folder),
                    message: err.to_string(),
                })?;
            let answer = self
                .client
                .delete_objects()
                .bucket(&self.settings.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|err| self.remote("S3 DeleteObjects", &folder, aws::classify(&err)))?;
            if let Some(error) = answer.errors().first() {
                return Err(StoreError::Remote {
                    operation: "S3 DeleteObjects",
                    target: self.url(error.key().unwrap_or(&folder)),
                    message: format!(
                        "{}: {}",
                        error.code().unwrap_or("error"),
                        error.message().unwrap_or("not deleted")
                    ),
                });
            }
        }
        if !doomed.is_empty() {
            tracing::info!(bucket = %self.settings.bucket, app, deleted = doomed.len(), keep, "pruned old bundles");
        }
        Ok(doomed)
    }
}
