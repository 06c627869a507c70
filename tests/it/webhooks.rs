//! The GitHub webhook's guard: signatures, duplicates, ignored events and bad input, checked
//! against the real server and its real SQLite file.

use crate::common::{self, REPOSITORY, form_encoded, push_payload, sign, spawn_app};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

#[tokio::test]
async fn forged_missing_and_tampered_signatures_are_refused_and_nothing_is_written() {
    let app = spawn_app().await;
    let body = push_payload("refs/heads/main", SHA, REPOSITORY);
    let forged = nonstop::webhook::github::sign(b"not the secret", &body);
    let mut tampered = body.clone();
    tampered[10] ^= 1;

    for (what, payload, signature) in [
        ("forged", &body, Some(forged.as_str())),
        ("missing", &body, None),
        ("tampered", &tampered, Some(sign(&body)).as_deref()),
        ("garbage", &body, Some("sha256=nothex")),
    ] {
        let (status, answer) = app
            .webhook("push", &format!("d-{what}"), payload, signature)
            .await;
        assert_eq!(status, 401, "{what}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.contains('\n')),
            "{what}: {answer}"
        );
    }
    assert_eq!(app.count_rows("deployments"), 0);
    assert_eq!(app.count_rows("deliveries"), 0);
}

#[tokio::test]
async fn a_redelivered_push_makes_one_deployment() {
    let app = spawn_app().await;
    let sha = app.repo.commit("Once");
    let body = push_payload("refs/heads/main", &sha, REPOSITORY);
    let signature = sign(&body);

    let answers = futures_util::future::join_all(
        (0..10).map(|_| app.webhook("push", "same-delivery", &body, Some(&signature))),
    )
    .await;

    let accepted: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == 202)
        .collect();
    assert_eq!(accepted.len(), 1, "{answers:?}");
    let id = &accepted[0].1["deployment_id"];
    for (status, answer) in &answers {
        assert!(*status == 202 || *status == 200, "{answer}");
        assert_eq!(&answer["deployment_id"], id, "{answer}");
    }
    assert_eq!(app.count_rows("deployments"), 1);
}

#[tokio::test]
async fn pushes_that_deploy_nothing_are_answered_with_a_reason() {
    let app = spawn_app().await;
    let cases = [
        (
            "push",
            push_payload("refs/heads/feature", SHA, REPOSITORY),
            "push to feature",
        ),
        (
            "push",
            push_payload("refs/heads/main", SHA, "someone/else"),
            "deploys from acme/hello",
        ),
        (
            "push",
            push_payload("refs/tags/v1.0", SHA, REPOSITORY),
            "not a branch",
        ),
        (
            "issues",
            br#"{"action":"opened"}"#.to_vec(),
            "`issues` is not deployed",
        ),
    ];
    for (index, (event, body, reason)) in cases.iter().enumerate() {
        let (status, answer) = app
            .webhook(event, &format!("ignored-{index}"), body, Some(&sign(body)))
            .await;
        assert_eq!(status, 202, "{answer}");
        assert!(
            answer["ignored"].as_str().unwrap().contains(reason),
            "{answer}"
        );
    }
    let deleted = serde_json::json!({
        "ref": "refs/heads/main", "after": "0".repeat(40), "deleted": true,
        "repository": {"full_name": REPOSITORY}, "head_commit": null
    })
    .to_string()
    .into_bytes();
    let (status, answer) = app
        .webhook("push", "deleted", &deleted, Some(&sign(&deleted)))
        .await;
    assert_eq!(
        (status, answer["ignored"].as_str().is_some()),
        (202, true),
        "{answer}"
    );

    let ping = br#"{"zen":"Keep it logically awesome."}"#;
    let (status, answer) = app.webhook("ping", "ping-1", ping, Some(&sign(ping))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(app.count_rows("deployments"), 0);
}

#[tokio::test]
async fn bad_input_gets_its_own_status_and_a_one_line_reason() {
    let app = spawn_app().await;
    let url = format!("{}/hooks/github", app.base());

    // Malformed, but signed: 400.
    let junk = b"{not json";
    let (status, answer) = app.webhook("push", "junk", junk, Some(&sign(junk))).await;
    assert_eq!(status, 400, "{answer}");

    // Unknown app: 404.
    let body = push_payload("refs/heads/main", SHA, REPOSITORY);
    let response = app
        .http
        .post(format!("{url}?app=nope"))
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", sign(&body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "no app named `nope`");

    // Over 25 MB: 413 with nonstop's own reason.
    let huge = vec![b' '; 25 * 1024 * 1024 + 1];
    let response = app
        .http
        .post(&url)
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", sign(&huge))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("over 26214400 bytes"),
        "{answer}"
    );
    assert_eq!(app.count_rows("deployments"), 0);
}

/// GitHub's settings page preselects `application/x-www-form-urlencoded`; a hook left at
/// that default must deploy, not only answer its ping.
#[tokio::test]
async fn a_form_encoded_push_deploys_its_commit() {
    let app = spawn_app().await;
    let sha = app.repo.commit("Sent as a form");
    let body = form_encoded(&push_payload("refs/heads/main", &sha, REPOSITORY));
    let (status, answer) = app
        .webhook_as(
            Some("application/x-www-form-urlencoded"),
            "push",
            "form-push",
            &body,
            Some(&sign(&body)),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["deployment_id"].as_i64().expect("a deployment id");
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    assert_eq!(done["deployment"]["commit_sha"], sha.as_str(), "{done:#}");
    let version = done["deployment"]["version"].as_str().unwrap();
    assert_eq!(app.served().await, version);
}

/// Every event means the same whether GitHub sends it as JSON, as a form field `payload`,
/// or (as a hand-written request may) with no content type at all, which is read as JSON.
#[tokio::test]
async fn json_and_form_encoded_deliveries_get_the_same_answers() {
    let app = spawn_app().await;
    let cases = [
        ("push", push_payload("refs/heads/main", SHA, REPOSITORY)),
        ("push", push_payload("refs/heads/feature", SHA, REPOSITORY)),
        ("push", push_payload("refs/heads/main", SHA, "someone/else")),
        (
            "ping",
            br#"{"zen":"Keep it logically awesome.","hook_id":1}"#.to_vec(),
        ),
        ("issues", br#"{"action":"opened"}"#.to_vec()),
        ("push", b"{not json".to_vec()),
    ];
    let mut deployments = Vec::new();
    for (index, (event, json)) in cases.iter().enumerate() {
        let mut answers = Vec::new();
        for (content_type, body) in [
            (Some("application/json"), json.clone()),
            (
                Some("application/x-www-form-urlencoded"),
                form_encoded(json),
            ),
            // A trailing newline keeps it valid JSON but another body: the same body under
            // another delivery id would be a replay, and deploy nothing.
            (None, [json.as_slice(), b"\n"].concat()),
        ] {
            let delivery = format!("same-{index}-{content_type:?}");
            let (status, mut answer) = app
                .webhook_as(content_type, event, &delivery, &body, Some(&sign(&body)))
                .await;
            // Each delivery is a deployment of its own; its id is the one thing that differs.
            if let Some(id) = answer.get_mut("deployment_id") {
                deployments.push(id.as_i64().expect("a numeric deployment id"));
                *id = serde_json::json!("(id)");
            }
            answers.push((status, answer));
        }
        assert!([200, 202, 400].contains(&answers[0].0), "{answers:?}");
        assert!(
            answers.iter().all(|answer| *answer == answers[0]),
            "{event} {}: {answers:?}",
            String::from_utf8_lossy(json)
        );
    }
    assert_eq!(deployments.len(), 3, "only the push to main deploys");
    deployments.sort_unstable();
    deployments.dedup();
    assert_eq!(deployments.len(), 3, "three deliveries, three deployments");
    assert_eq!(app.count_rows("deployments"), 3);
}

#[tokio::test]
async fn a_third_content_type_is_refused_with_415_naming_the_two_accepted() {
    let app = spawn_app().await;
    let json = push_payload("refs/heads/main", SHA, REPOSITORY);
    for (content_type, body) in [
        ("text/plain", json.clone()),
        ("multipart/form-data; boundary=x", json.clone()),
        ("application/xml", b"<push/>".to_vec()),
    ] {
        for event in ["push", "ping"] {
            let (status, answer) = app
                .webhook_as(
                    Some(content_type),
                    event,
                    "typed",
                    &body,
                    Some(&sign(&body)),
                )
                .await;
            assert_eq!(status, 415, "{content_type} {event}: {answer}");
            let reason = answer["error"].as_str().unwrap_or_default();
            assert!(
                reason.contains("application/json")
                    && reason.contains("application/x-www-form-urlencoded")
                    && !reason.contains('\n'),
                "{reason}"
            );
        }
    }
    // Who sent it is settled first: an unsigned body of any type is a 401.
    let (status, answer) = app
        .webhook_as(Some("text/plain"), "push", "unsigned", &json, None)
        .await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(app.count_rows("deployments"), 0);
    assert_eq!(app.count_rows("deliveries"), 0);
}

#[tokio::test]
async fn the_switch_endpoint_needs_its_token_and_a_port_of_the_app() {
    let app = spawn_app().await;
    let url = format!("{}/api/apps/hello/switch", app.base());
    let response = app
        .http
        .post(&url)
        .json(&serde_json::json!({"port": app.ports.app[0]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = app
        .http
        .post(&url)
        .bearer_auth(common::ADMIN_TOKEN)
        .json(&serde_json::json!({"port": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let (status, _) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(status, 404, "nothing is live after refused switches");
}

/// The why log: every delivery and action — refused, ignored, blocked by the lock,
/// superseded, duplicate, deployed — is one entry with its decision and a one-line reason,
/// and never the body it came with.
#[tokio::test]
async fn every_trigger_is_in_the_why_log_once_with_its_decision_and_reason() {
    let app = spawn_app().await;
    let body = push_payload("refs/heads/main", SHA, REPOSITORY);
    let forged = nonstop::webhook::github::sign(b"not the secret", &body);
    assert_eq!(
        app.webhook("push", "forged", &body, Some(&forged)).await.0,
        401
    );
    let junk = b"{not json";
    assert_eq!(
        app.webhook("push", "junk", junk, Some(&sign(junk))).await.0,
        400
    );
    let typed = app
        .webhook_as(
            Some("text/plain"),
            "push",
            "typed",
            &body,
            Some(&sign(&body)),
        )
        .await;
    assert_eq!(typed.0, 415);
    let huge = vec![b' '; 25 * 1024 * 1024 + 1];
    let response = app
        .http
        .post(format!("{}/hooks/github", app.base()))
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", "huge")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let unknown = app
        .http
        .post(format!("{}/hooks/github?app=nope", app.base()))
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", sign(&body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    for (index, (event, payload)) in [
        ("push", push_payload("refs/heads/feature", SHA, REPOSITORY)),
        ("push", push_payload("refs/heads/main", SHA, "someone/else")),
        ("push", push_payload("refs/tags/v1.0", SHA, REPOSITORY)),
        ("issues", br#"{"action":"opened"}"#.to_vec()),
        ("ping", br#"{"zen":"Keep it logically awesome."}"#.to_vec()),
    ]
    .iter()
    .enumerate()
    {
        let (status, answer) = app
            .webhook(
                event,
                &format!("ignored-{index}"),
                payload,
                Some(&sign(payload)),
            )
            .await;
        assert!([200, 202].contains(&status), "{answer}");
    }

    let locked = app.cli(&["lock", "hello", "--reason", "release freeze"]);
    assert!(locked.status.success(), "{locked:?}");
    let a = app.repo.commit("A, held by the lock");
    let held_a = app.push(&a).await;
    let again = push_payload("refs/heads/main", &a, REPOSITORY);
    let (status, _) = app
        .webhook(
            "push",
            &format!("delivery-{a}"),
            &again,
            Some(&sign(&again)),
        )
        .await;
    assert_eq!(status, 200, "a redelivery");
    let b = app.repo.commit("B, held by the lock");
    let held_b = app.push(&b).await;
    let refused = app.cli(&["deploy", "hello"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("409") && stderr.contains("--force"),
        "{stderr}"
    );
    let unlocked = app.cli(&["unlock", "hello"]);
    let stdout = String::from_utf8_lossy(&unlocked.stdout);
    assert!(
        unlocked.status.success() && stdout.contains(&format!("deployment {held_b}")),
        "{unlocked:?}"
    );
    let done = app.wait_finished(held_b).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    let (status, answer) = app
        .webhook(
            "push",
            "live-again",
            &again_of(&b),
            Some(&sign(&again_of(&b))),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let c = app.repo.commit("C");
    let queued_c = app.push(&c).await;

    let (status, log) = app.get_json("/api/deliveries?limit=100").await;
    assert_eq!(status, 200, "{log}");
    let mut entries = log.as_array().unwrap().clone();
    entries.reverse();
    let seen: Vec<(String, String, u64, String)> = entries
        .iter()
        .map(|t| {
            (
                format!(
                    "{} {}",
                    t["source"].as_str().unwrap(),
                    t["event"].as_str().unwrap()
                ),
                t["decision"].as_str().unwrap().to_owned(),
                t["status"].as_u64().unwrap(),
                t["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: &[(&str, &str, u64, &str)] = &[
        ("github push", "refused", 401, "signature"),
        ("github push", "refused", 400, ""),
        ("github push", "refused", 415, "application/json"),
        ("github push", "refused", 413, "over 26214400 bytes"),
        ("github push", "refused", 404, "no app named `nope`"),
        ("github push", "ignored", 202, "push to feature"),
        ("github push", "ignored", 202, "deploys from acme/hello"),
        ("github push", "ignored", 202, "not a branch"),
        ("github issues", "ignored", 202, "`issues` is not deployed"),
        ("github ping", "ignored", 200, "ping"),
        ("api lock", "locked", 200, "locked: release freeze"),
        (
            "github push",
            "superseded",
            202,
            &format!("superseded by #{held_b} before it ran"),
        ),
        (
            "github push",
            "ignored",
            200,
            &format!("duplicate: this delivery was already received (it made #{held_a})"),
        ),
        (
            "github push",
            "blocked",
            202,
            "to be unlocked (locked by admin: release freeze)",
        ),
        ("api deploy", "refused", 409, "is locked by admin"),
        (
            "api unlock",
            "unlocked",
            200,
            &format!("the newest waiting push is queued as #{held_b}"),
        ),
        ("github push", "ignored", 202, "is already live"),
        (
            "github push",
            "deployed",
            202,
            &format!("queued as #{queued_c}"),
        ),
    ];
    assert_eq!(seen.len(), expected.len(), "{seen:#?}");
    for (got, want) in seen.iter().zip(expected) {
        assert!(
            got.0 == want.0 && got.1 == want.1 && got.2 == want.2 && got.3.contains(want.3),
            "{got:?} is not {want:?}\n{seen:#?}"
        );
        assert!(
            !got.3.contains('\n') && !got.3.contains("A change"),
            "{got:?}"
        );
    }
    let actors: Vec<&str> = entries
        .iter()
        .map(|t| t["actor"].as_str().unwrap())
        .collect();
    assert_eq!(actors[10], "admin", "{actors:?}");
    assert_eq!(actors[13], "github", "{actors:?}");
    assert_eq!(entries[13]["deployment_id"], held_b);
    assert_eq!(entries[13]["deployment_status"], "succeeded");
    assert_eq!(entries[11]["deployment_status"], "superseded");
    assert!(
        entries[4]["app"].is_null(),
        "an unknown app is not recorded"
    );

    // Filtered by app, limited; the deployment's page links the delivery that made it.
    let (_, hello) = app.get_json("/api/deliveries?app=hello&limit=3").await;
    assert_eq!(hello.as_array().unwrap().len(), 3, "{hello:#}");
    let (status, _) = app.get_json("/api/deliveries?app=nope").await;
    assert_eq!(status, 404);
    let trigger_b = entries[13]["id"].as_i64().unwrap();
    let (_, page) = app.get_text(&format!("/deployments/{held_b}")).await;
    assert!(
        page.contains(&format!("/deliveries?app=hello#trigger-{trigger_b}")),
        "{page}"
    );
    let (status, page) = app.get_text("/deliveries?app=hello").await;
    assert_eq!(status, 200);
    assert!(
        page.contains(&format!("id=\"trigger-{trigger_b}\""))
            && page.contains(&format!("superseded by #{held_b}")),
        "{page}"
    );
    assert_eq!(
        app.get_as_stranger("/api/deliveries").await.status(),
        401,
        "the why log is private"
    );
}

/// A push of `sha` to main, as a new delivery (another body than `push`'s).
fn again_of(sha: &str) -> Vec<u8> {
    let mut body = push_payload("refs/heads/main", sha, REPOSITORY);
    body.push(b'\n');
    body
}
