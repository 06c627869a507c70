//! The AWS twins against real servers: the S3 store and the CodeDeploy runner talk to a
//! `moto_server` each test starts on a loopback port of its own; where moto has no lifecycle events
//! (it never runs a deployment), recorded CodeDeploy answers are served from
//! `tests/fixtures/codedeploy/` by a small loopback stand-in, through the real SDK client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nonstop::aws::{self, Endpoint, Timeouts};
use nonstop::domain::{Hook, Stage, StageStatus};
use nonstop::runner::codedeploy::{CodeDeployRunner, CodeDeploySettings};
use nonstop::runner::lifecycle::{self, TargetsResponse};
use nonstop::runner::{Interrupted, Job, Progress, Runner};
use nonstop::store::s3::{Multipart, S3Settings, S3Store};
use nonstop::store::{ArtifactStore, StoreError, sha256_file};

use crate::common::{self, Extra, spawn_app_with, unique_port};

const REGION: &str = "us-east-1";

/// The SDK reads credentials from the standard chain: dummy ones, in the env. They are set
/// before `main`, while the process has a single thread: in the one test binary other tests
/// run beside these, and C code in the process (SQLite, the resolver) reads the environment
/// without std's lock, so a `set_var` once the tests run could race it. Every process the
/// tests start inherits them, which matters to none but the AWS ones.
#[used]
#[unsafe(link_section = ".init_array")]
static DUMMY_AWS_CREDENTIALS: extern "C" fn() = {
    extern "C" fn set() {
        // SAFETY: runs from the loader's init functions, before `main`, when no other
        // thread exists to read the environment.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        }
    }
    set
};

/// A `moto_server` (S3 + CodeDeploy emulator) on a loopback port of its own, killed on drop.
struct Moto {
    child: Child,
    url: String,
    log: tempfile::NamedTempFile,
}

impl Moto {
    async fn start() -> Moto {
        let port = unique_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "moto_server could not be started ({err}): these tests need it. \
                     Install it with `python3 -m pip install 'moto[server]'` (scripts/test does)"
                )
            });
        let mut moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            if http
                .get(format!("{}/moto-api/", moto.url))
                .send()
                .await
                .is_ok()
            {
                return moto;
            }
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!(
                    "moto_server exited ({status}) before answering:\n{}",
                    moto.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer in 30 s:\n{}",
                moto.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            region: Some(REGION.into()),
            url: Some(self.url.clone()),
        }
    }

    /// A plain S3 client on moto, to arrange and inspect what the store did.
    async fn s3(&self) -> aws_sdk_s3::Client {
        let sdk = aws::sdk_config(&self.endpoint(), Timeouts::CONTROL).await;
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .build(),
        )
    }

    async fn bucket(&self, name: &str) {
        self.s3()
            .await
            .create_bucket()
            .bucket(name)
            .send()
            .await
            .unwrap();
    }

    /// The CodeDeploy application `hello` with its deployment group `fleet`; returns a
    /// client to inspect what nonstop asked of them.
    async fn fleet_group(&self) -> aws_sdk_codedeploy::Client {
        let sdk = aws::sdk_config(&self.endpoint(), Timeouts::CONTROL).await;
        let codedeploy = aws_sdk_codedeploy::Client::new(&sdk);
        codedeploy
            .create_application()
            .application_name("hello")
            .send()
            .await
            .unwrap();
        codedeploy
            .create_deployment_group()
            .application_name("hello")
            .deployment_group_name("fleet")
            .service_role_arn("arn:aws:iam::123456789012:role/codedeploy")
            .send()
            .await
            .unwrap();
        codedeploy
    }

    async fn store(&self, bucket: &str, keep: Option<u32>) -> S3Store {
        S3Store::new(S3Settings {
            bucket: bucket.into(),
            prefix: "nonstop".into(),
            endpoint: self.endpoint(),
            keep,
        })
        .await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one deployment of the `hello` application's `fleet` group, as CodeDeploy has it.
async fn only_deployment(
    codedeploy: &aws_sdk_codedeploy::Client,
) -> aws_sdk_codedeploy::types::DeploymentInfo {
    let listed = codedeploy
        .list_deployments()
        .application_name("hello")
        .deployment_group_name("fleet")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.deployments().len(), 1, "{listed:?}");
    codedeploy
        .get_deployment()
        .deployment_id(&listed.deployments()[0])
        .send()
        .await
        .unwrap()
        .deployment_info
        .unwrap()
}

/// A file of `size` bytes that is not all the same (so a misplaced part would show).
fn bundle_file(dir: &Path, name: &str, size: usize) -> PathBuf {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..size)
        .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test]
async fn s3_store_round_trips_a_bundle_with_its_sha256_in_metadata() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let store = moto.store("releases", None).await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_file(dir.path(), "b.zip", 10_000);

    let stored = store
        .put("hello", "1.0.1-SNAPSHOT-20261125140000", &bundle)
        .await
        .unwrap();
    assert_eq!(
        stored.key,
        "nonstop/hello/1.0.1-SNAPSHOT-20261125140000.zip"
    );
    assert_eq!(stored.size, 10_000);
    assert_eq!(stored.sha256, sha256_file(&bundle).unwrap());

    let head = moto
        .s3()
        .await
        .head_object()
        .bucket("releases")
        .key(&stored.key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.metadata().unwrap()["sha256"], stored.sha256);
    assert_eq!(head.content_length(), Some(10_000));

    let copy = dir.path().join("copy.zip");
    store.get(&stored.key, &stored.sha256, &copy).await.unwrap();
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&bundle).unwrap()
    );
}

#[tokio::test]
async fn s3_store_refuses_a_changed_bundle_a_wrong_checksum_and_a_missing_key() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let store = moto.store("releases", None).await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_file(dir.path(), "b.zip", 2_000);
    let stored = store.put("hello", "v1", &bundle).await.unwrap();
    let dest = dir.path().join("copy.zip");

    // Someone replaced the bytes but kept the metadata: the download's own hash catches it.
    moto.s3()
        .await
        .put_object()
        .bucket("releases")
        .key(&stored.key)
        .metadata("sha256", &stored.sha256)
        .body(b"tampered".to_vec().into())
        .send()
        .await
        .unwrap();
    let err = store
        .get(&stored.key, &stored.sha256, &dest)
        .await
        .unwrap_err();
    match &err {
        StoreError::Checksum {
            expected, actual, ..
        } => {
            assert_eq!(expected, &stored.sha256);
            assert_ne!(actual, &stored.sha256);
        }
        other => panic!("expected a checksum error, got {other}"),
    }

    // A deployment that expects another bundle than the one stored.
    let stored = store.put("hello", "v2", &bundle).await.unwrap();
    let err = store
        .get(&stored.key, &"0".repeat(64), &dest)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Checksum { .. }), "{err}");

    let err = store
        .get("nonstop/hello/v9.zip", &stored.sha256, &dest)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn s3_store_uploads_a_large_bundle_in_parts_and_it_comes_back_whole() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let part = 5 * 1024 * 1024;
    let store = moto
        .store("releases", None)
        .await
        .with_multipart(Multipart {
            threshold: part as u64,
            part_size: part as u64,
        });
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_file(dir.path(), "big.zip", 2 * part + 123_457);

    let stored = store.put("hello", "v-big", &bundle).await.unwrap();
    let head = moto
        .s3()
        .await
        .head_object()
        .bucket("releases")
        .key(&stored.key)
        .send()
        .await
        .unwrap();
    // S3's ETag of a multipart object ends with the number of parts.
    let e_tag = head.e_tag().unwrap().trim_matches('"').to_owned();
    assert!(e_tag.ends_with("-3"), "not a 3-part upload: ETag {e_tag}");
    assert_eq!(head.metadata().unwrap()["sha256"], stored.sha256);

    let copy = dir.path().join("copy.zip");
    store.get(&stored.key, &stored.sha256, &copy).await.unwrap();
    assert_eq!(sha256_file(&copy).unwrap(), sha256_file(&bundle).unwrap());
}

#[tokio::test]
async fn s3_retention_keeps_the_newest_and_never_the_protected_ones() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let store = moto.store("releases", Some(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_file(dir.path(), "b.zip", 100);
    for n in 1..=5 {
        store.put("hello", &format!("v{n}"), &bundle).await.unwrap();
    }
    // Another app's bundles are not this app's to prune.
    store.put("other", "v1", &bundle).await.unwrap();

    let protect = ["nonstop/hello/v1.zip".to_owned()];
    let mut deleted = store.prune("hello", &protect).await.unwrap();
    deleted.sort();
    assert_eq!(deleted, ["nonstop/hello/v2.zip", "nonstop/hello/v3.zip"]);

    let listed = moto
        .s3()
        .await
        .list_objects_v2()
        .bucket("releases")
        .send()
        .await
        .unwrap();
    let mut keys: Vec<_> = listed.contents().iter().filter_map(|o| o.key()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "nonstop/hello/v1.zip",
            "nonstop/hello/v4.zip",
            "nonstop/hello/v5.zip",
            "nonstop/other/v1.zip"
        ]
    );
    assert!(store.prune("hello", &protect).await.unwrap().is_empty());
}

#[tokio::test]
async fn s3_errors_name_the_missing_bucket_and_a_dead_endpoint_fails_in_seconds() {
    let moto = Moto::start().await;
    let store = moto.store("nonstop-missing", None).await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_file(dir.path(), "b.zip", 100);
    let err = store
        .put("hello", "v1", &bundle)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bucket `nonstop-missing` does not exist"),
        "{err}"
    );
    assert!(
        err.contains("s3://nonstop-missing/nonstop/hello/v1.zip"),
        "{err}"
    );

    // Nothing listens on this port: the store gives up quickly with a reason.
    let dead = S3Store::new(S3Settings {
        bucket: "releases".into(),
        prefix: String::new(),
        endpoint: Endpoint {
            region: Some(REGION.into()),
            url: Some(format!("http://127.0.0.1:{}", unique_port())),
        },
        keep: None,
    })
    .await;
    let started = Instant::now();
    let err = dead
        .put("hello", "v1", &bundle)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.starts_with("S3 PutObject s3://releases/hello/v1.zip: "),
        "{err}"
    );
    assert!(
        err.to_lowercase().contains("connect") || err.contains("dispatch"),
        "{err}"
    );
}

/// What a runner told the pipeline, in order.
#[derive(Default)]
struct Recorded {
    events: Mutex<Vec<(Hook, StageStatus, String)>>,
    runner_ref: Mutex<Option<String>>,
}

#[async_trait]
impl Progress for Recorded {
    async fn stage_started(&self, stage: Stage) {
        let hook = Hook::parse(stage.as_str()).expect("a fleet reports hooks only");
        self.events
            .lock()
            .unwrap()
            .push((hook, StageStatus::Running, String::new()));
    }
    async fn stage_finished(&self, stage: Stage, status: StageStatus, log: &str) {
        let hook = Hook::parse(stage.as_str()).expect("a fleet reports hooks only");
        self.events
            .lock()
            .unwrap()
            .push((hook, status, log.to_owned()));
    }
    async fn target_port(&self, _port: u16) {}
    async fn instance_started(&self, _port: u16) {}
    async fn runner_ref(&self, reference: &str) {
        *self.runner_ref.lock().unwrap() = Some(reference.to_owned());
    }
}

impl Recorded {
    fn finished(&self) -> Vec<(Hook, StageStatus, String)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s, _)| *s != StageStatus::Running)
            .cloned()
            .collect()
    }
}

fn job(bundle_key: &str, sha256: &str) -> Job {
    let text = r#"
[[app]]
name = "hello"
repo = "x"
build = "true"
artifact = "hello"
run = "{artifact} --port {port}"
store = { kind = "s3", bucket = "releases", prefix = "nonstop" }
runner = { kind = "codedeploy", application = "hello", group = "fleet" }
"#;
    let config = nonstop::config::Config::parse(text, Path::new("nonstop.toml")).unwrap();
    Job {
        deployment_id: nonstop::domain::DeploymentId::new(1),
        app: Arc::new(config.apps[0].clone()),
        version: "v1".into(),
        commit: None,
        previous_version: None,
        bundle: nonstop::domain::BundleRef {
            key: bundle_key.into(),
            sha256: sha256.into(),
        },
        env: Arc::default(),
    }
}

fn settings(endpoint: Endpoint, timeout: Duration) -> CodeDeploySettings {
    CodeDeploySettings {
        application: "hello".into(),
        group: "fleet".into(),
        deployment_config: Some("CodeDeployDefault.AllAtOnce".into()),
        file_exists_behavior: Some("OVERWRITE".into()),
        auto_rollback: true,
        timeout,
        endpoint,
    }
}

#[tokio::test]
async fn a_codedeploy_deployment_is_created_in_moto_and_followed_until_nonstop_gives_up() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let store = Arc::new(moto.store("releases", None).await);
    let dir = tempfile::tempdir().unwrap();
    let stored = store
        .put("hello", "v1", &bundle_file(dir.path(), "b.zip", 1_000))
        .await
        .unwrap();
    let codedeploy = moto.fleet_group().await;

    let runner = CodeDeployRunner::new(
        settings(moto.endpoint(), Duration::from_secs(3)),
        store.clone(),
    )
    .await
    .with_poll_interval(Duration::from_millis(200));
    let progress = Recorded::default();
    let started = Instant::now();
    let err = runner
        .run(&job(&stored.key, &stored.sha256), &progress)
        .await
        .unwrap_err();

    // moto records the deployment but never runs it (it stays Created, and it has no
    // targets, instances or StopDeployment): nonstop follows it until its timeout.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.stage, Hook::ApplicationStop.into());
    let reason = err.reason.to_string();
    assert!(reason.contains("still Created after 3 s"), "{reason}");
    let finished = progress.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    let (hook, status, log) = &finished[0];
    assert_eq!(
        (*hook, *status),
        (Hook::ApplicationStop, StageStatus::Failed)
    );
    assert!(log.contains("TimedOut"), "{log}");
    assert!(
        log.contains("per-instance lifecycle events unavailable"),
        "{log}"
    );

    // What CodeDeploy was asked: the S3 zip revision pinned by its ETag, and the settings.
    let info = only_deployment(&codedeploy).await;
    assert_eq!(info.status().unwrap().as_str(), "Created");
    let s3 = info.revision().unwrap().s3_location().unwrap();
    assert_eq!(s3.bucket(), Some("releases"));
    assert_eq!(s3.key(), Some(stored.key.as_str()));
    assert_eq!(s3.bundle_type().map(|b| b.as_str()), Some("zip"));
    let head = moto
        .s3()
        .await
        .head_object()
        .bucket("releases")
        .key(&stored.key)
        .send()
        .await
        .unwrap();
    assert_eq!(s3.e_tag(), head.e_tag().map(|t| t.trim_matches('"')));
    assert_eq!(
        info.deployment_config_name(),
        Some("CodeDeployDefault.AllAtOnce")
    );
    assert_eq!(
        info.file_exists_behavior().map(|b| b.as_str()),
        Some("OVERWRITE")
    );
    assert!(info.auto_rollback_configuration().unwrap().enabled());
    assert!(
        info.description()
            .unwrap()
            .contains("nonstop deployment 1 of hello v1")
    );
}

#[tokio::test]
async fn a_missing_deployment_group_fails_with_codedeploys_words() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let store = Arc::new(moto.store("releases", None).await);
    let dir = tempfile::tempdir().unwrap();
    let stored = store
        .put("hello", "v1", &bundle_file(dir.path(), "b.zip", 10))
        .await
        .unwrap();
    let sdk = aws::sdk_config(&moto.endpoint(), Timeouts::CONTROL).await;
    aws_sdk_codedeploy::Client::new(&sdk)
        .create_application()
        .application_name("hello")
        .send()
        .await
        .unwrap();

    let runner =
        CodeDeployRunner::new(settings(moto.endpoint(), Duration::from_secs(3)), store).await;
    let progress = Recorded::default();
    let err = runner
        .run(&job(&stored.key, &stored.sha256), &progress)
        .await
        .unwrap_err();
    assert_eq!(err.stage, Hook::ApplicationStop.into());
    let reason = err.reason.to_string();
    assert!(
        reason.contains("CreateDeployment for application `hello`, group `fleet`"),
        "{reason}"
    );
    assert!(
        reason.contains("DeploymentGroupDoesNotExistException"),
        "{reason}"
    );
    assert_eq!(progress.finished()[0].1, StageStatus::Failed);
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/codedeploy")
            .join(name),
    )
    .unwrap()
}

#[test]
fn recorded_lifecycle_events_become_one_report_per_hook_across_instances() {
    let running: TargetsResponse =
        serde_json::from_str(&fixture("targets-in-progress.json")).unwrap();
    let reports = lifecycle::stage_reports(&running.instances());
    let statuses: Vec<_> = reports.iter().map(|r| (r.hook, r.status)).collect();
    // The first instance is in ApplicationStart; the second (one at a time) has not begun.
    use StageStatus::*;
    assert_eq!(
        statuses,
        [
            (Hook::ApplicationStop, Running),
            (Hook::DownloadBundle, Running),
            (Hook::BeforeInstall, Running),
            (Hook::Install, Running),
            (Hook::AfterInstall, Running),
            (Hook::ApplicationStart, Running),
            (Hook::ValidateService, Pending),
        ]
    );
    let start = &reports[5].log;
    assert!(start.contains("== i-0a1b2c3d4e5f60718 (running)\nApplicationStart InProgress 2025-11-25T14:00:10.000Z\n"), "{start}");
    assert!(
        start.contains("== i-0f9e8d7c6b5a43210 (pending)\nApplicationStart Pending\n"),
        "{start}"
    );

    let failed: TargetsResponse =
        serde_json::from_str(&fixture("targets-failed-validate.json")).unwrap();
    let instances = failed.instances();
    let reports = lifecycle::stage_reports(&instances);
    for report in &reports[..6] {
        assert_eq!(report.status, Succeeded, "{}: {}", report.hook, report.log);
        assert_eq!(report.log.matches("== i-").count(), 2, "{}", report.log);
        assert!(
            !report.log.contains("Success in"),
            "success diagnostics are not news: {}",
            report.log
        );
    }
    let validate = &reports[6];
    assert_eq!(
        (validate.hook, validate.status),
        (Hook::ValidateService, Failed)
    );
    let log = &validate.log;
    assert!(log.contains("== i-0a1b2c3d4e5f60718 (succeeded)\nValidateService Succeeded 2025-11-25T14:00:12.000Z → 2025-11-25T14:00:13.250Z (1.2 s)\n"), "{log}");
    assert!(log.contains("== i-0f9e8d7c6b5a43210 (failed)\nValidateService Failed 2025-11-25T14:00:32.000Z → 2025-11-25T14:00:37.500Z (5.5 s)\n"), "{log}");
    assert!(log.contains("ScriptFailed in deploy.sh: Script at specified location: deploy.sh run as user root failed with exit code 1\n"), "{log}");
    assert!(log.contains("--- log tail ---\n[stdout]ValidateService: checking http://127.0.0.1:8082/profile\n[stdout]health check failed after 20 attempts\n[stderr]curl: (7) Failed to connect"), "{log}");
    let (hook, why) = lifecycle::first_failure(&instances).unwrap();
    assert_eq!(hook, Hook::ValidateService);
    assert!(
        why.starts_with("i-0f9e8d7c6b5a43210 ValidateService ScriptFailed in deploy.sh: "),
        "{why}"
    );
}

/// A loopback stand-in for the CodeDeploy API that answers with recorded responses: the
/// deployment runs for a few polls, then fails ValidateService on one instance.
struct RecordedCodeDeploy {
    url: String,
    /// Each call's operation and JSON body.
    calls: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
    server: tokio::task::JoinHandle<()>,
}

impl RecordedCodeDeploy {
    async fn start(polls_before_failure: usize) -> Self {
        use axum::http::{HeaderMap, header};
        let calls: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
        let seen = calls.clone();
        let answer = move |headers: HeaderMap, body: axum::body::Bytes| {
            let calls = seen.clone();
            async move {
                let target = headers
                    .get("x-amz-target")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .trim_start_matches("CodeDeploy_20141006.")
                    .to_owned();
                let polls = {
                    let mut calls = calls.lock().unwrap();
                    let body = serde_json::from_slice(&body).unwrap_or_default();
                    calls.push((target.clone(), body));
                    calls.iter().filter(|(c, _)| c == "GetDeployment").count()
                };
                let failed = polls > polls_before_failure;
                let body = match target.as_str() {
                    "CreateDeployment" => r#"{"deploymentId":"d-8K3SZ7QXA"}"#.to_owned(),
                    "GetDeployment" if failed => fixture("get-deployment-failed.json"),
                    "GetDeployment" => fixture("get-deployment-in-progress.json"),
                    "ListDeploymentTargets" => {
                        r#"{"targetIds":["i-0a1b2c3d4e5f60718","i-0f9e8d7c6b5a43210"]}"#.to_owned()
                    }
                    "BatchGetDeploymentTargets" if failed => {
                        fixture("targets-failed-validate.json")
                    }
                    "BatchGetDeploymentTargets" => fixture("targets-in-progress.json"),
                    "StopDeployment" => {
                        r#"{"status":"Pending","statusMessage":"stopping"}"#.to_owned()
                    }
                    "ListDeployments" => r#"{"deployments":["d-OTHER0001","d-8K3SZ7QXA"]}"#.to_owned(),
                    "BatchGetDeployments" => r#"{"deploymentsInfo":[
                        {"deploymentId":"d-OTHER0001","description":"nonstop deployment 1 of hello v0","status":"InProgress"},
                        {"deploymentId":"d-8K3SZ7QXA","description":"nonstop deployment 1 of hello v1","status":"InProgress"}
                    ]}"#
                    .to_owned(),
                    _ => r#"{"__type":"UnknownOperationException"}"#.to_owned(),
                };
                ([(header::CONTENT_TYPE, "application/x-amz-json-1.1")], body)
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new().route("/", axum::routing::post(answer));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { url, calls, server }
    }

    fn calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(operation, _)| operation.clone())
            .collect()
    }

    fn bodies_of(&self, operation: &str) -> Vec<serde_json::Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, _)| o == operation)
            .map(|(_, body)| body.clone())
            .collect()
    }
}

impl Drop for RecordedCodeDeploy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test]
async fn a_deployment_aws_reports_failed_ends_failed_with_its_reason_and_every_hook_reported() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let store = Arc::new(moto.store("releases", None).await);
    let dir = tempfile::tempdir().unwrap();
    let stored = store
        .put("hello", "v1", &bundle_file(dir.path(), "b.zip", 10))
        .await
        .unwrap();
    let codedeploy = RecordedCodeDeploy::start(3).await;
    let endpoint = Endpoint {
        region: Some(REGION.into()),
        url: Some(codedeploy.url.clone()),
    };
    let runner = CodeDeployRunner::new(settings(endpoint, Duration::from_secs(30)), store)
        .await
        .with_poll_interval(Duration::from_millis(50));
    let progress = Recorded::default();
    let err = runner
        .run(&job(&stored.key, &stored.sha256), &progress)
        .await
        .unwrap_err();

    assert_eq!(err.stage, Hook::ValidateService.into());
    assert_eq!(
        progress.runner_ref.lock().unwrap().as_deref(),
        Some("d-8K3SZ7QXA"),
        "the AWS id is kept as soon as it exists"
    );
    let reason = err.reason.to_string();
    assert!(
        reason.starts_with("HEALTH_CONSTRAINTS: The overall deployment failed"),
        "{reason}"
    );
    assert!(
        reason.contains("(i-0f9e8d7c6b5a43210 ValidateService ScriptFailed in deploy.sh: "),
        "{reason}"
    );

    // Each hook started once (while running on the fleet) and finished once.
    let events = progress.events.lock().unwrap().clone();
    for hook in Hook::ALL {
        let of_hook: Vec<_> = events
            .iter()
            .filter(|(h, ..)| h == hook)
            .map(|(_, s, _)| *s)
            .collect();
        let expected = if *hook == Hook::ValidateService {
            StageStatus::Failed
        } else {
            StageStatus::Succeeded
        };
        assert_eq!(
            of_hook,
            [StageStatus::Running, expected],
            "{hook}: {events:?}"
        );
    }
    let started_before_end = events
        .iter()
        .position(|(h, s, _)| *h == Hook::ApplicationStart && *s == StageStatus::Running)
        .unwrap();
    let first_finish = events
        .iter()
        .position(|(_, s, _)| *s != StageStatus::Running)
        .unwrap();
    assert!(
        started_before_end < first_finish,
        "hooks were started while the fleet ran them: {events:?}"
    );
    let validate = &progress.finished()[6].2;
    assert!(
        validate.starts_with("CodeDeploy deployment d-8K3SZ7QXA: Failed — HEALTH_CONSTRAINTS"),
        "{validate}"
    );
    assert!(validate.contains("--- log tail ---"), "{validate}");

    let calls = codedeploy.calls();
    assert_eq!(calls[0], "CreateDeployment");
    assert!(
        calls.contains(&"BatchGetDeploymentTargets".to_owned()),
        "{calls:?}"
    );
    assert!(
        !calls.contains(&"StopDeployment".to_owned()),
        "an ended deployment is not stopped: {calls:?}"
    );
}

#[tokio::test]
async fn dropping_a_running_deployment_asks_codedeploy_to_stop_it() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let store = Arc::new(moto.store("releases", None).await);
    let dir = tempfile::tempdir().unwrap();
    let stored = store
        .put("hello", "v1", &bundle_file(dir.path(), "b.zip", 10))
        .await
        .unwrap();
    let codedeploy = RecordedCodeDeploy::start(usize::MAX).await;
    let endpoint = Endpoint {
        region: Some(REGION.into()),
        url: Some(codedeploy.url.clone()),
    };
    let runner = CodeDeployRunner::new(settings(endpoint, Duration::from_secs(60)), store)
        .await
        .with_poll_interval(Duration::from_millis(50));
    let progress = Recorded::default();
    let job = job(&stored.key, &stored.sha256);
    let deadline = Instant::now() + Duration::from_secs(20);
    {
        let run = runner.run(&job, &progress);
        tokio::pin!(run);
        // Let it follow the deployment for a few polls, then drop it (as shutdown does).
        loop {
            tokio::select! {
                ended = &mut run => panic!("the deployment never ends here, yet the runner returned {ended:?}"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if codedeploy
                .calls()
                .iter()
                .filter(|c| *c == "GetDeployment")
                .count()
                >= 2
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "runner never polled: {:?}",
                codedeploy.calls()
            );
        }
    }
    while !codedeploy.calls().contains(&"StopDeployment".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "no StopDeployment after the drop: {:?}",
            codedeploy.calls()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn after_a_stop_the_fleet_deployment_nobody_follows_is_stopped_with_its_rollback() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let store = Arc::new(moto.store("releases", None).await);
    let codedeploy = RecordedCodeDeploy::start(usize::MAX).await;
    let endpoint = Endpoint {
        region: Some(REGION.into()),
        url: Some(codedeploy.url.clone()),
    };
    // A runner as `serve` makes it on the next start: it never followed the deployment.
    let runner = CodeDeployRunner::new(settings(endpoint, Duration::from_secs(30)), store).await;
    let job = job("nonstop/hello/v1.zip", "0".repeat(64).as_str());

    let recorded = |runner_ref| Interrupted {
        started_instances: false,
        runner_ref,
    };

    // Interrupted before Upload there is no job at all (recovery asks no runner), so
    // nothing can have reached CodeDeploy.
    let stop = serde_json::json!({"deploymentId": "d-8K3SZ7QXA", "autoRollbackEnabled": true});
    let said = runner
        .clean_up_interrupted(&job, recorded(Some("d-8K3SZ7QXA")))
        .await
        .unwrap();
    assert_eq!(said, "asked CodeDeploy to stop d-8K3SZ7QXA: Pending");
    assert_eq!(
        codedeploy.bodies_of("StopDeployment"),
        std::slice::from_ref(&stop)
    );

    // Its id never recorded (the stop came while CreateDeployment was on its way): found
    // among the group's unfinished deployments by its description, version included.
    let said = runner
        .clean_up_interrupted(&job, recorded(None))
        .await
        .unwrap();
    assert_eq!(said, "asked CodeDeploy to stop d-8K3SZ7QXA: Pending");
    assert_eq!(codedeploy.bodies_of("StopDeployment"), [stop.clone(), stop]);
    let listed = &codedeploy.bodies_of("ListDeployments")[0];
    assert_eq!(listed["applicationName"], "hello");
    assert_eq!(listed["deploymentGroupName"], "fleet");
    assert_eq!(
        listed["includeOnlyStatuses"],
        serde_json::json!(["Created", "Queued", "InProgress", "Ready"])
    );
}

#[tokio::test]
async fn the_server_builds_uploads_to_s3_and_creates_the_codedeploy_deployment_end_to_end() {
    let moto = Moto::start().await;
    moto.bucket("releases").await;
    let codedeploy = moto.fleet_group().await;
    let app = spawn_app_with(Extra {
        app: format!(
            "store = {{ kind = \"s3\", bucket = \"releases\", prefix = \"nonstop\", endpoint = \"{url}\", region = \"{REGION}\" }}\n\
             runner = {{ kind = \"codedeploy\", application = \"hello\", group = \"fleet\", endpoint = \"{url}\", region = \"{REGION}\", timeout_secs = 5, destination = \"/srv/hello\" }}\n",
            url = moto.url
        ),
        env: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
            .into_iter()
            .map(|name| (name.to_owned(), "testing".to_owned()))
            .chain([("AWS_EC2_METADATA_DISABLED".into(), "true".into())])
            .collect(),
        ..Extra::default()
    })
    .await;

    let id = app.push(&app.repo.commit("To the fleet")).await;
    let done = app.wait_finished(id).await;
    let deployment = &done["deployment"];

    // moto records the deployment and never runs it: nonstop gives up after its timeout,
    // with every stage before the fleet's done here.
    assert_eq!(deployment["status"], "failed", "{done:#}");
    let error = deployment["error"].as_str().unwrap();
    assert!(error.starts_with("ApplicationStop failed:"), "{error}");
    assert!(error.contains("still Created after 5 s"), "{error}");
    for stage in ["Fetch", "Build", "Bundle", "Upload"] {
        let status = common::stage(&done, stage)["status"].clone();
        assert_eq!(status, "succeeded", "{stage}: {done:#}");
    }

    // The bundle went to S3, and the CodeDeploy deployment names it and is recorded.
    let version = deployment["version"].as_str().unwrap();
    let key = format!("nonstop/hello/{version}.zip");
    assert_eq!(deployment["bundle_key"], key.as_str());
    let info = only_deployment(&codedeploy).await;
    assert_eq!(deployment["runner_ref"], info.deployment_id().unwrap());
    assert_eq!(
        info.revision().unwrap().s3_location().unwrap().key(),
        Some(key.as_str())
    );
    let object = moto
        .s3()
        .await
        .get_object()
        .bucket("releases")
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        object.metadata().unwrap()["sha256"],
        deployment["bundle_sha256"].as_str().unwrap()
    );
    let bytes = object.body.collect().await.unwrap().into_bytes();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut names: Vec<_> = zip.file_names().map(str::to_owned).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "VERSION",
            "app.env",
            "appspec.yml",
            "deploy.sh",
            "hello",
            "nonstop.env"
        ]
    );
    let mut host_env = String::new();
    std::io::Read::read_to_string(&mut zip.by_name("nonstop.env").unwrap(), &mut host_env).unwrap();
    assert!(
        host_env.contains("NONSTOP_ARTIFACT=/srv/hello/hello\n"),
        "{host_env}"
    );
}
