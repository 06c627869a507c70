//! The dashboard over plain HTTP: who may act (login session + CSRF, or the admin token),
//! the pages a person reads, and the event stream that keeps them current.

use std::time::{Duration, Instant};

use crate::common::{self, ADMIN_TOKEN, spawn_app};

#[tokio::test]
async fn a_fresh_server_shows_a_stranger_the_login_page_and_nothing_else_but_the_cli_reads() {
    let app = spawn_app().await;
    for (page, login) in [
        ("/", "/login"),
        ("/deployments/1", "/login?next=%2Fdeployments%2F1"),
    ] {
        let response = app.get_as_stranger(page).await;
        assert_eq!(response.status(), 303, "{page}");
        assert_eq!(response.headers()["location"], login, "{page}");
    }
    for read in [
        "/api/deployments",
        "/api/deployments/1",
        "/events",
        "/metrics",
    ] {
        let response = app.get_as_stranger(read).await;
        assert_eq!(response.status(), 401, "{read}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            answer["error"],
            "log in on the dashboard or send the admin token (Authorization: Bearer …)",
            "{read}"
        );
    }
    for open in ["/healthz", "/login"] {
        assert_eq!(app.get_as_stranger(open).await.status(), 200, "{open}");
    }
    let ping = br#"{"zen":"Anything added dilutes everything else.","repository":{"full_name":"acme/hello"}}"#;
    let (status, answer) = app
        .webhook("ping", "stranger-ping", ping, Some(&common::sign(ping)))
        .await;
    assert_eq!(status, 200, "{answer}");

    // The CLI sends the admin token.
    let out = app.cli(&["status"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        said.trim(),
        format!(
            "hello  nothing live yet (proxy 127.0.0.1:{})",
            app.ports.proxy
        )
    );
}

#[tokio::test]
async fn actions_refuse_without_a_login_or_with_a_forged_csrf_token() {
    let app = spawn_app().await;
    let url = format!("{}/api/apps/hello/rollback", app.base());
    let post = |cookie: Option<&str>, csrf: Option<&str>| {
        let mut request = app.http.post(&url);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(csrf) = csrf {
            request = request.form(&[("csrf", csrf)]);
        }
        request.send()
    };

    assert_eq!(post(None, None).await.unwrap().status(), 401);
    assert_eq!(post(None, Some("forged")).await.unwrap().status(), 401);
    assert_eq!(
        post(Some("nonstop_session=1.2.3"), Some("forged"))
            .await
            .unwrap()
            .status(),
        401
    );

    let (cookie, csrf) = app.log_in().await;
    assert_eq!(post(Some(&cookie), None).await.unwrap().status(), 403);
    assert_eq!(
        post(Some(&cookie), Some("forged")).await.unwrap().status(),
        403
    );
    // With both, the action runs: nothing is live yet, so there is nothing to roll back.
    let response = post(Some(&cookie), Some(&csrf)).await.unwrap();
    assert_eq!(response.status(), 409);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("nothing of `hello` is live"),
        "{answer}"
    );

    // A wrong bearer token is refused even alongside a good session.
    let response = app
        .http
        .post(&url)
        .bearer_auth("wrong")
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        app.count_rows("deployments"),
        0,
        "no refused action wrote anything"
    );
}

#[tokio::test]
async fn buttons_show_only_to_a_logged_in_person() {
    let app = spawn_app().await;
    // The admin token reads the page, but buttons need a login: their forms carry its CSRF token.
    let (_, anonymous) = app.get_text("/").await;
    assert!(
        !anonymous.contains("data-action"),
        "actions shown without a login"
    );
    assert!(anonymous.contains("Log in"));

    let (cookie, _) = app.log_in().await;
    let page = app
        .http
        .get(format!("{}/", app.base()))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let page = page.text().await.unwrap();
    assert!(page.contains("data-action=\"deploy\"") && page.contains("data-action=\"rollback\""));
}

#[tokio::test]
async fn a_logged_in_deploy_form_redirects_to_its_deployment_and_history_lists_it() {
    let app = spawn_app().await;
    let (cookie, csrf) = app.log_in().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client
        .post(format!("{}/api/apps/hello/deploy", app.base()))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(location, "/deployments/1");
    let done = app.wait_finished(1).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    assert_eq!(done["deployment"]["trigger"], "manual");

    let (_, page) = app.get_text(&location).await;
    assert!(
        page.contains("data-switch="),
        "the switch is on the timeline"
    );
    let history = app
        .http
        .get(format!("{}/deployments?status=succeeded", app.base()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let history = history.text().await.unwrap();
    assert!(
        history.contains("data-deployment=\"1\"") && history.contains("1 deployment<"),
        "{history}"
    );
    let (_, none) = app.get_text("/deployments?status=failed").await;
    assert!(none.contains("No deployments yet."));
    let (status, _) = app.get_text("/deployments?status=bogus").await;
    assert_eq!(status, 400);
    let (_, log) = app.get_text("/deployments/1/stages/Build/log").await;
    assert!(log.contains("cargo build"));
    let (_, favicon) = app.get_text("/favicon.svg").await;
    assert!(
        favicon.contains("#1a7f37"),
        "the favicon shows the last deployment succeeded: {favicon}"
    );
}

#[tokio::test]
async fn the_event_stream_announces_deployments_stages_and_switches() {
    let app = spawn_app().await;
    let mut stream = app
        .http
        .get(format!("{}/events", app.base()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let id = app.push(&app.repo.commit("Watch me")).await;

    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(seen.contains("\"type\":\"live\"")
        && seen.contains("\"status\":\"succeeded\",\"version\""))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, stream.chunk())
            .await
            .expect("events in time")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream stays open"),
        ));
    }
    assert!(seen.starts_with("event: hello"), "{seen}");
    assert!(
        seen.contains(&format!(
            "\"deployment_id\":{id},\"app\":\"hello\",\"stage\":\"Build\",\"status\":\"running\""
        )),
        "{seen}"
    );
    assert!(
        seen.contains(&format!("\"port\":{}", app.ports.app[0])),
        "{seen}"
    );
}

#[tokio::test]
async fn a_deployment_shows_the_codedeploy_id_it_ran_under() {
    let app = spawn_app().await;
    let id = app.push(&app.repo.commit("One")).await;
    app.wait_finished(id).await;
    let (_, page) = app.get_text(&format!("/deployments/{id}")).await;
    assert!(
        !page.contains("<dt>CodeDeploy</dt>"),
        "a local deployment has none"
    );

    // What the CodeDeploy runner records (tests/it/aws.rs covers the runner's side).
    rusqlite::Connection::open(app.db_path())
        .unwrap()
        .execute(
            "UPDATE deployments SET runner_ref = 'd-8K3SZ7QXA' WHERE id = ?1",
            [id],
        )
        .unwrap();
    let (_, page) = app.get_text(&format!("/deployments/{id}")).await;
    assert!(
        page.contains("<dt>CodeDeploy</dt><dd class=\"mono\">d-8K3SZ7QXA</dd>"),
        "{page}"
    );
}
