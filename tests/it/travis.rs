//! The Travis CI gate against the real server: build notifications signed with a key made
//! here, refused when the signature is missing, forged or the payload tampered with; a push
//! to a `trigger = "travis"` app waits (across a restart) until its build passes, and a
//! failed build is recorded and deploys nothing.

use base64::Engine;
use rsa::PrivateKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{Value, json};

use crate::common::{self, Extra, REPOSITORY, TestApp, spawn_app_with};

/// The OS random source, as the `rsa` crate's key generation wants it.
struct OsRandom;

impl rsa::rand_core::TryRng for OsRandom {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(getrandom::u32().unwrap())
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(getrandom::u64().unwrap())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        getrandom::fill(dst).unwrap();
        Ok(())
    }
}

impl rsa::rand_core::TryCryptoRng for OsRandom {}

/// A key pair standing in for Travis's (1024 bits: generation in a debug build is slow).
fn key() -> PrivateKey {
    PrivateKey::new(&mut OsRandom, 1024).unwrap()
}

fn sign(key: &PrivateKey, payload: &str) -> String {
    let signature = key.pkcs1v15_sign::<sha1::Sha1>(payload.as_bytes()).unwrap();
    base64::engine::general_purpose::STANDARD.encode(signature)
}

/// nonstop with a `trigger = "travis"` app that trusts `key`.
async fn spawn_travis_app(key: &PrivateKey) -> TestApp {
    let pem = key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    spawn_app_with(Extra {
        app: "trigger = \"travis\"\n".into(),
        tables: "[travis]\npublic_key_env = \"NONSTOP_TEST_TRAVIS_KEY\"\n".into(),
        env: vec![("NONSTOP_TEST_TRAVIS_KEY".into(), pem)],
        ..Extra::default()
    })
    .await
}

/// Travis's documented notification shape for a push build.
fn build_payload(id: u64, sha: &str, status_message: &str) -> String {
    let (owner, name) = REPOSITORY.split_once('/').unwrap();
    let passed = matches!(status_message, "Passed" | "Fixed");
    json!({
        "id": id,
        "number": id.to_string(),
        "status": if passed { 0 } else { 1 },
        "result": if passed { 0 } else { 1 },
        "status_message": status_message,
        "result_message": status_message,
        "started_at": "2024-05-01T10:00:00Z",
        "finished_at": "2024-05-01T10:03:00Z",
        "duration": 180,
        "build_url": format!("https://travis-ci.com/{REPOSITORY}/builds/{id}"),
        "commit": sha,
        "branch": "main",
        "message": "A change",
        "compare_url": format!("https://github.com/{REPOSITORY}/compare/abc...def"),
        "committed_at": "2024-05-01T09:59:00Z",
        "author_name": "Ada",
        "author_email": "ada@example.com",
        "committer_name": "Ada",
        "committer_email": "ada@example.com",
        "type": "push",
        "pull_request": false,
        "tag": null,
        "repository": { "id": 1, "name": name, "owner_name": owner, "url": null },
        "matrix": []
    })
    .to_string()
}

/// Posts a Travis notification: the payload as the form field Travis uses.
async fn notify(app: &TestApp, payload: &str, signature: Option<&str>) -> (u16, Value) {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", payload)
        .finish();
    let mut request = app
        .http
        .post(format!("{}/hooks/travis", app.base()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Travis-Repo-Slug", REPOSITORY)
        .body(body);
    if let Some(signature) = signature {
        request = request.header("Signature", signature);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn deployment(app: &TestApp, id: i64) -> Value {
    let (status, body) = app.get_json(&format!("/api/deployments/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body["deployment"].clone()
}

#[tokio::test]
async fn travis_notifications_must_carry_a_signature_of_travis_key() {
    let travis = key();
    let app = spawn_travis_app(&travis).await;
    let sha = app.repo.commit("Checked by CI");
    let payload = build_payload(101, &sha, "Broken");
    let good = sign(&travis, &payload);
    let forged = sign(&key(), &payload);
    let tampered = payload.replace("\"Broken\"", "\"Passed\"");

    for (what, body, signature) in [
        ("missing", payload.as_str(), None),
        ("another key", payload.as_str(), Some(forged.as_str())),
        ("tampered payload", tampered.as_str(), Some(good.as_str())),
        ("not base64", payload.as_str(), Some("%%%")),
    ] {
        let (status, answer) = notify(&app, body, signature).await;
        assert_eq!(status, 401, "{what}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.contains('\n')),
            "{what}: {answer}"
        );
    }
    // Signed but not a build, or no payload field at all: 400.
    let junk = "{not json";
    let (status, answer) = notify(&app, junk, Some(&sign(&travis, junk))).await;
    assert_eq!(status, 400, "{answer}");
    let response = app
        .http
        .post(format!("{}/hooks/travis", app.base()))
        .header("Signature", good.as_str())
        .body("other=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(app.count_rows("deployments"), 0);
    assert_eq!(app.count_rows("deliveries"), 0);

    // The genuine notification is accepted (a failed build: recorded, nothing deploys).
    let (status, answer) = notify(&app, &payload, Some(&good)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(app.count_rows("deployments"), 1);
}

#[tokio::test]
async fn a_failed_build_is_recorded_with_its_number_and_page_and_deploys_nothing() {
    let travis = key();
    let app = spawn_travis_app(&travis).await;
    let sha = app.repo.commit("Breaks the tests");
    let id = app.push(&sha).await;
    assert_eq!(deployment(&app, id).await["status"], "waiting");

    // A build that has not finished changes nothing.
    let started = build_payload(202, &sha, "Pending");
    let (status, answer) = notify(&app, &started, Some(&sign(&travis, &started))).await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer["ignored"].as_str().is_some(), "{answer}");
    assert_eq!(deployment(&app, id).await["status"], "waiting");

    let failed = build_payload(202, &sha, "Failed");
    let (status, answer) = notify(&app, &failed, Some(&sign(&travis, &failed))).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["deployment_id"], id, "{answer}");

    let (_, list) = app.get_json("/api/deployments?app=hello").await;
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{list:#}");
    let row = &rows[0];
    assert_eq!(row["status"], "failed", "{row:#}");
    assert_eq!(row["commit_sha"], sha);
    assert_eq!(row["ci_build_number"], "202");
    assert_eq!(
        row["ci_build_url"],
        format!("https://travis-ci.com/{REPOSITORY}/builds/202")
    );
    assert!(
        row["error"]
            .as_str()
            .unwrap()
            .starts_with("Travis CI build #202 Failed"),
        "{row:#}"
    );
    assert!(
        row["started_at"].is_null(),
        "the pipeline never ran: {row:#}"
    );
    let (status, _) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(status, 404, "nothing went live");
    let (_, page) = app.get_text(&format!("/deployments/{id}")).await;
    assert!(
        page.contains(&format!(
            "<a href=\"https://travis-ci.com/{REPOSITORY}/builds/202\">build #202</a>"
        )),
        "{page}"
    );

    // The same notification again is answered without a second record.
    let (status, answer) = notify(&app, &failed, Some(&sign(&travis, &failed))).await;
    assert_eq!(
        (status, &answer["deployment_id"]),
        (200, &json!(id)),
        "{answer}"
    );
    assert_eq!(app.count_rows("deployments"), 1);

    // The why log: the push waited for CI, the pending build changed nothing, the failed one
    // failed it, and its redelivery was a duplicate; each names its build.
    let (_, log) = app.get_json("/api/deliveries?app=hello").await;
    let mut seen: Vec<(String, String, String)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["decision"].as_str().unwrap().to_owned(),
                t["delivery_id"].as_str().unwrap_or("").to_owned(),
                t["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.reverse();
    let decisions: Vec<&str> = seen.iter().map(|(d, ..)| d.as_str()).collect();
    assert_eq!(
        decisions,
        ["waiting", "ignored", "failed", "ignored"],
        "{seen:#?}"
    );
    assert!(
        seen[0].2.contains("waits for Travis CI to pass"),
        "{seen:#?}"
    );
    assert_eq!(seen[2].1, "build 202", "{seen:#?}");
    assert!(
        seen[2].2.contains("Travis CI build #202 Failed"),
        "{seen:#?}"
    );
    assert!(seen[3].2.starts_with("duplicate: "), "{seen:#?}");
}

#[tokio::test]
async fn a_push_waits_for_travis_across_a_restart_and_deploys_when_its_build_passes() {
    let travis = key();
    let mut app = spawn_travis_app(&travis).await;
    let sha = app.repo.commit("Wait for CI");
    let id = app.push(&sha).await;

    // Waiting is recorded, not queued: a restart keeps it waiting and runs nothing.
    app.restart().await;
    let waiting = deployment(&app, id).await;
    assert_eq!(waiting["status"], "waiting", "{waiting:#}");
    assert!(waiting["started_at"].is_null(), "{waiting:#}");
    let (_, list) = app.get_json("/api/deployments?status=waiting").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list:#}");

    let passed = build_payload(303, &sha, "Passed");
    let (status, answer) = notify(&app, &passed, Some(&sign(&travis, &passed))).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["deployment_id"], id,
        "the waiting push is what deploys"
    );

    let done = app.wait_finished(id).await;
    let deployed = &done["deployment"];
    assert_eq!(deployed["status"], "succeeded", "{done:#}");
    assert_eq!(deployed["commit_sha"], sha);
    assert_eq!(deployed["ci_build_number"], "303");
    assert_eq!(app.served().await, deployed["version"].as_str().unwrap());

    // Travis alone (no push seen) deploys the exact commit it built.
    let next = app.repo.commit("Straight from CI");
    let fixed = build_payload(304, &next, "Fixed");
    let (status, answer) = notify(&app, &fixed, Some(&sign(&travis, &fixed))).await;
    assert_eq!(status, 202, "{answer}");
    let next_id = answer["deployment_id"].as_i64().unwrap();
    let done = app.wait_finished(next_id).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    assert_eq!(done["deployment"]["commit_sha"], next);
    assert_eq!(done["deployment"]["trigger"], "travis");

    // A build of a commit that a newer push replaced does not deploy old code.
    let old = app.repo.commit("Old");
    let old_id = app.push(&old).await;
    let newer = app.repo.commit("Newer");
    let newer_id = app.push(&newer).await;
    assert_eq!(deployment(&app, old_id).await["status"], "superseded");
    let late = build_payload(305, &old, "Passed");
    let (status, answer) = notify(&app, &late, Some(&sign(&travis, &late))).await;
    assert_eq!(status, 202, "{answer}");
    assert!(
        answer["ignored"].as_str().unwrap().contains("newer push"),
        "{answer}"
    );
    assert_eq!(deployment(&app, newer_id).await["status"], "waiting");
}

/// One abusive Travis notification: a body, maybe a `Signature`, a repository slug.
#[derive(Debug, Clone)]
struct Abuse {
    body: Vec<u8>,
    signature: Option<String>,
    slug: String,
}

fn form(payload: &str) -> Vec<u8> {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", payload)
        .finish()
        .into_bytes()
}

/// Property: without Travis's signature over the very payload it carries, a notification
/// never deploys nor records anything, whatever its body, signature and slug. The cases are
/// the same on every run (a fixed seed); a failure is shrunk to the smallest one.
#[test]
fn travis_notification_abuse_never_deploys() {
    use proptest::collection::vec;
    use proptest::prelude::*;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let travis = key();
    let app = runtime.block_on(spawn_travis_app(&travis));
    let passed = build_payload(7, &"a".repeat(40), "Passed");
    let good = sign(&travis, &passed);
    let forged = sign(&key(), &passed);

    let tampered = {
        let passed = passed.clone();
        (0..passed.len(), 0x20u8..0x7f).prop_map(move |(at, byte)| {
            let mut payload = passed.clone().into_bytes();
            payload[at] = byte;
            form(&String::from_utf8(payload).unwrap())
        })
    };
    let body = prop_oneof![
        4 => tampered,
        2 => ".{0,500}".prop_map(|payload| form(&payload)),
        2 => vec(any::<u8>(), 0..2048),
        1 => Just(form(&passed)),
        1 => Just(b"other=1".to_vec()),
    ];
    let signature = prop_oneof![
        Just(None),
        Just(Some(good.clone())),
        Just(Some(forged)),
        vec(any::<u8>(), 128)
            .prop_map(|b| { Some(base64::engine::general_purpose::STANDARD.encode(b)) }),
        "[ -~]{0,100}".prop_map(Some),
    ];
    let slug = prop_oneof![Just(REPOSITORY.to_owned()), "[a-z/]{0,20}"];
    let untouched = form(&passed);
    let abuse = (body, signature, slug)
        .prop_filter(
            "a genuine notification is not abuse",
            move |(body, signature, _)| {
                !(*body == untouched && signature.as_deref() == Some(good.as_str()))
            },
        )
        .prop_map(|(body, signature, slug)| Abuse {
            body,
            signature,
            slug,
        });

    let mut runner = common::deterministic_runner(300);
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::new());
    let outcome = runner.run(&abuse, |abuse| {
        let mut request = app
            .http
            .post(format!("{}/hooks/travis", app.base()))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Travis-Repo-Slug", abuse.slug.as_str())
            .body(abuse.body.clone());
        if let Some(signature) = &abuse.signature {
            request = request.header("Signature", signature.as_str());
        }
        let (status, answer) = common::send_from_property(&runtime, request)?;
        prop_assert!([400, 401, 404, 413].contains(&status), "{status} {answer}");
        *statuses.borrow_mut().entry(status).or_insert(0) += 1;
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    println!("statuses: {:?}", statuses.borrow());
    assert_eq!(statuses.borrow().values().sum::<u32>(), 300);
    assert_eq!(app.count_rows("deployments"), 0);
    assert_eq!(app.count_rows("deliveries"), 0);
}
