//! The fault suite: each fault ends with the previous version serving, no client request
//! lost while traffic flowed, and the deployment recorded with its reason.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;

use crate::common::{
    Extra, Load, REPOSITORY, TestApp, deterministic_runner, push_payload, send_from_property, sign,
    spawn_app, spawn_app_with, stage, wait_port_closed,
};

/// Commits a change to the example app's source; the replacement must apply.
fn commit_source_change(app: &TestApp, from: &str, to: &str, message: &str) -> String {
    let main = app.repo.path.join("src/main.rs");
    let source = std::fs::read_to_string(&main).unwrap();
    assert!(
        source.contains(from),
        "the example app changed: `{from}` is gone"
    );
    std::fs::write(&main, source.replacen(from, to, 1)).unwrap();
    app.repo.commit_all(message)
}

/// Pushes `sha` under load and checks the release failed safely; returns the error.
async fn fails_safely(app: &TestApp, good: &str, sha: &str) -> String {
    let (_, live_before) = app.get_json("/api/apps/hello/live").await;
    let load = Load::start(
        format!("{}/", app.proxy()),
        8,
        50_000,
        Duration::from_secs(240),
    );
    load.wait_sent(100).await;
    let id = app.push(sha).await;
    let done = app.wait_finished(id).await;
    let report = load.finish().await;

    assert_eq!(done["deployment"]["status"], "failed", "{done:#}");
    report.assert_none_failed();
    assert_eq!(
        report.bodies.keys().collect::<Vec<_>>(),
        [good],
        "only the good version served"
    );
    assert_eq!(app.served().await, good);
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(live["port"], live_before["port"]);
    done["deployment"]["error"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_version_that_exits_at_start_never_gets_traffic() {
    let app = spawn_app().await;
    let good = app.deploy(&app.repo.commit("Good")).await;
    let sha = commit_source_change(
        &app,
        "fn main() -> ExitCode {",
        "fn main() -> ExitCode {\n    if std::env::args().count() > 0 {\n        return ExitCode::from(3);\n    }",
        "Exit at start",
    );
    let error = fails_safely(&app, &good, &sha).await;
    assert!(error.starts_with("ValidateService failed"), "{error}");
    assert!(error.contains("exited before it became healthy"), "{error}");
}

#[tokio::test]
async fn a_version_that_dies_right_after_its_health_check_never_gets_traffic() {
    let app = spawn_app().await;
    let good = app.deploy(&app.repo.commit("Good")).await;
    let sha = commit_source_change(
        &app,
        "        if !keep_alive {\n            return Ok(());\n        }",
        "        writer.flush()?;\n        if request.target == \"/profile\" {\n            std::process::exit(9);\n        }\n        if !keep_alive {\n            return Ok(());\n        }",
        "Die after the first health check",
    );
    let error = fails_safely(&app, &good, &sha).await;
    assert!(error.starts_with("ValidateService failed"), "{error}");
}

#[tokio::test]
async fn an_unwritable_bundle_or_store_folder_fails_clearly_and_loses_nothing() {
    let app = spawn_app().await;
    let good = app.deploy(&app.repo.commit("Good")).await;

    // Where Bundle writes is a file now, not a folder (root ignores permission bits, so a
    // path that cannot be a folder is how this machine makes a write fail).
    let tmp = app.data_dir().join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, "in the way").unwrap();
    let error = fails_safely(&app, &good, &app.repo.commit("Cannot bundle")).await;
    assert!(
        error.starts_with("Bundle failed:") && error.contains("tmp"),
        "{error}"
    );
    std::fs::remove_file(&tmp).unwrap();

    let store = app.data_dir().join("artifacts/hello");
    std::fs::remove_dir_all(&store).unwrap();
    std::fs::write(&store, "in the way").unwrap();
    let error = fails_safely(&app, &good, &app.repo.commit("Cannot store")).await;
    assert!(
        error.starts_with("Upload failed:") && error.contains("artifacts"),
        "{error}"
    );
    std::fs::remove_file(&store).unwrap();

    // Nothing recorded was lost, and the next deploy goes through.
    let next = app.deploy(&app.repo.commit("Fixed")).await;
    assert_eq!(app.served().await, next);
    assert_eq!(app.count_rows("deployments"), 4);
    let (_, failed) = app.get_json("/api/deployments?status=failed").await;
    assert_eq!(failed.as_array().unwrap().len(), 2);
}

/// The names of the files in `dir`, sorted.
fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_full_disk_during_bundle_or_upload_fails_clearly_and_loses_nothing() {
    let app = spawn_app_with(Extra {
        tmpfs: &[("data/tmp", "32m"), ("data/artifacts", "32m")],
        ..Extra::default()
    })
    .await;
    let good = app.deploy(&app.repo.commit("Good")).await;
    let stored = app.as_server_sees(&app.data_dir().join("artifacts/hello"));
    let good_bundle = file_names(&stored);
    assert_eq!(good_bundle.len(), 1, "{good_bundle:?}");

    let tmp = app.data_dir().join("tmp");
    let filler = app.fill_disk(&tmp);
    let error = fails_safely(&app, &good, &app.repo.commit("No room to bundle")).await;
    assert!(
        error.starts_with("Bundle failed:") && error.contains("No space left on device"),
        "{error}"
    );
    assert_eq!(
        file_names(&app.as_server_sees(&tmp)),
        ["filler"],
        "the half-written bundle was removed"
    );
    std::fs::remove_file(&filler).unwrap();

    let filler = app.fill_disk(&app.data_dir().join("artifacts"));
    let error = fails_safely(&app, &good, &app.repo.commit("No room to store")).await;
    assert!(
        error.starts_with("Upload failed:") && error.contains("No space left on device"),
        "{error}"
    );
    assert_eq!(
        file_names(&stored),
        good_bundle,
        "the half-stored bundle was removed"
    );
    std::fs::remove_file(&filler).unwrap();

    // Nothing recorded was lost, and with room again the next deploy goes through.
    app.assert_database_intact();
    let next = app.deploy(&app.repo.commit("Room again")).await;
    assert_eq!(app.served().await, next);
    assert_eq!(app.count_rows("deployments"), 4);
    let (_, failed) = app.get_json("/api/deployments?status=failed").await;
    assert_eq!(failed.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_bundle_key_the_record_refuses_fails_upload_and_the_previous_version_serves() {
    let app = spawn_app().await;
    let good = app.deploy(&app.repo.commit("Good")).await;

    // The record refuses the bundle's key, as a failing disk would: a bundle stored but not
    // recorded could not be found again by a rollback, a redeploy or retention.
    let conn = rusqlite::Connection::open(app.db_path()).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER refuse_bundle_key BEFORE UPDATE OF bundle_key ON deployments \
         BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END;",
    )
    .unwrap();
    let error = fails_safely(&app, &good, &app.repo.commit("Unrecorded bundle")).await;
    assert!(
        error.starts_with("Upload failed: stored hello/")
            && error.contains("could not record it")
            && error.contains("disk I/O error"),
        "{error}"
    );
    let (_, failed) = app.get_json("/api/deployments?status=failed").await;
    let id = failed[0]["id"].as_i64().unwrap();
    let (_, failed) = app.get_json(&format!("/api/deployments/{id}")).await;
    let upload = stage(&failed, "Upload");
    assert_eq!(upload["status"], "failed", "{failed:#}");
    assert!(
        upload["log"]
            .as_str()
            .unwrap()
            .contains("could not record it"),
        "{upload:#}"
    );
    assert_eq!(
        stage(&failed, "ApplicationStop")["status"],
        "skipped",
        "no hook ran"
    );

    conn.execute_batch("DROP TRIGGER refuse_bundle_key")
        .unwrap();
    let next = app.deploy(&app.repo.commit("Recorded again")).await;
    assert_eq!(app.served().await, next);
}

#[tokio::test]
async fn killed_during_validate_service_the_half_started_instance_is_cleaned_up() {
    let mut app = spawn_app().await;
    let good = app.deploy(&app.repo.commit("Good")).await;
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    let idle = if live["port"] == app.ports.app[0] {
        app.ports.app[1]
    } else {
        app.ports.app[0]
    };

    let id = app.push(&app.repo.commit_unhealthy()).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) = app.get_json(&format!("/api/deployments/{id}")).await;
        if stage(&body, "ValidateService")["status"] == "running" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ValidateService never ran: {body:#}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Started by ApplicationStart; it may still be binding its port when ValidateService
    // begins.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://127.0.0.1:{idle}/"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the new instance never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    app.restart().await;

    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "interrupted");
    wait_port_closed(idle, "the half-started instance").await;
    assert_eq!(app.served().await, good);
    let (_, after) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(after["port"], live["port"]);
    assert_eq!(app.count_rows("deployments"), 2, "history intact");
}

#[tokio::test]
async fn simultaneous_and_repeated_webhooks_make_one_deployment_each() {
    let app = spawn_app().await;
    let first = app.repo.commit("First");
    let second = app.repo.commit("Second");
    let (a, b) = tokio::join!(app.push(&first), app.push(&second));
    assert_ne!(a, b);

    let third = app.repo.commit("Third");
    let body = push_payload("refs/heads/main", &third, REPOSITORY);
    let signature = sign(&body);
    let answers = futures_util::future::join_all(
        (0..100).map(|_| app.webhook("push", "one-delivery-id", &body, Some(&signature))),
    )
    .await;
    let new: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == 202)
        .collect();
    assert_eq!(new.len(), 1, "{answers:?}");
    assert!(
        answers.iter().all(|(status, answer)| *status == 202
            || (*status == 200 && answer["duplicate"].is_string()))
    );
    assert_eq!(app.count_rows("deployments"), 3);
    // Each delivery is remembered by its id and by its body's digest.
    assert_eq!(app.count_rows("deliveries"), 6);
}

/// GitHub's own limit on a webhook body, which nonstop keeps.
const MAX_WEBHOOK_BYTES: usize = 25 * 1024 * 1024;

/// One abusive request to `/hooks/github`.
#[derive(Debug, Clone)]
struct Abuse {
    body: Vec<u8>,
    signature: Option<String>,
    event: String,
    content_type: String,
    query: String,
}

fn abuse() -> impl Strategy<Value = Abuse> {
    let valid = push_payload("refs/heads/main", &"a".repeat(40), REPOSITORY);
    let good_signature = sign(&valid);
    let tampered = {
        let valid = valid.clone();
        (0..valid.len(), 1..=255u8).prop_map(move |(at, by)| {
            let mut body = valid.clone();
            body[at] = body[at].wrapping_add(by);
            body
        })
    };
    let unsigned_body = prop_oneof![
        8 => vec(any::<u8>(), 0..4096),
        8 => tampered,
        2 => Just(Vec::new()),
        // One byte over the limit: 413, never read as a push.
        1 => Just(vec![b'{'; MAX_WEBHOOK_BYTES + 1]),
    ];
    let wrong_signature = prop_oneof![
        Just(None),
        // The signature of the untampered push: right for another body than this one.
        Just(Some(good_signature)),
        vec(any::<u8>(), 32).prop_map(|b| Some(format!("sha256={}", hex::encode(b)))),
        Just(Some(sign(b"some other body"))),
        ".{0,80}".prop_map(Some),
        (0..20_000usize).prop_map(|n| Some(format!("sha256={}", "f".repeat(n)))),
        vec(any::<u8>(), 20).prop_map(|b| Some(format!("sha1={}", hex::encode(b)))),
    ];
    // Signed with the right secret, so the body gets parsed: bytes that are no push.
    let signed_garbage = vec(any::<u8>(), 0..4096).prop_map(|body| {
        let signature = Some(sign(&body));
        (body, signature)
    });
    let body_and_signature = prop_oneof![
        6 => (unsigned_body, wrong_signature),
        1 => signed_garbage,
    ];
    let event = prop_oneof![
        Just("push".to_owned()),
        Just("ping".to_owned()),
        "[ -~]{0,30}",
    ];
    let content_type = prop_oneof![
        Just("application/json".to_owned()),
        Just("application/x-www-form-urlencoded".to_owned()),
        "[ -~]{0,60}",
    ];
    let query = prop_oneof![
        3 => Just(String::new()),
        2 => Just("?app=hello".to_owned()),
        1 => "[a-z]{1,12}".prop_map(|app| format!("?app={app}")),
    ];
    (body_and_signature, event, content_type, query).prop_map(
        |((body, signature), event, content_type, query)| Abuse {
            body,
            signature,
            event,
            content_type,
            query,
        },
    )
}

/// Property: whatever the bytes, headers and content type, the hook answers a client error
/// unless the body is signed (then it is parsed: a ping or an ignored event is a 2xx),
/// and nothing ever deploys: no valid push is signed here. The cases are the
/// same on every run (a fixed seed); a failure is shrunk to the smallest request showing it.
#[test]
fn webhook_abuse_never_panics_and_never_deploys() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(spawn_app());
    let mut runner = deterministic_runner(400);
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::new());
    let case = AtomicU64::new(0);
    let outcome = runner.run(&abuse(), |abuse| {
        let mut request = app
            .http
            .post(format!("{}/hooks/github{}", app.base(), abuse.query))
            .header("X-GitHub-Event", abuse.event.as_str())
            .header(
                "X-GitHub-Delivery",
                format!("fuzz-{}", case.fetch_add(1, Ordering::Relaxed)),
            )
            .header("Content-Type", abuse.content_type.as_str())
            .body(abuse.body.clone());
        if let Some(signature) = abuse
            .signature
            .as_deref()
            .filter(|s| reqwest::header::HeaderValue::from_str(s).is_ok())
        {
            request = request.header("X-Hub-Signature-256", signature);
        }
        let (status, answer) = send_from_property(&runtime, request)?;
        let signed = abuse.signature.as_deref() == Some(&sign(&abuse.body));
        let refused = [400, 401, 404, 413, 415, 431].contains(&status);
        // A signed ping is a 200, another signed event is acknowledged and ignored (202,
        // as GitHub expects); nothing deploys.
        let ignored = [200, 202].contains(&status) && !answer.contains("deployment_id");
        prop_assert!(refused || (signed && ignored), "{status} {answer}");
        *statuses.borrow_mut().entry(status).or_insert(0) += 1;
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    println!("statuses: {:?}", statuses.borrow());
    assert_eq!(app.count_rows("deployments"), 0);
    let health = runtime
        .block_on(app.http.get(format!("{}/healthz", app.base())).send())
        .unwrap();
    assert_eq!(health.status(), 200, "the server survived");
}
