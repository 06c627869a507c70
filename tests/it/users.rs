//! Named users: `[[user]]` tokens of their own, for the CLI, the API and a dashboard login;
//! every action, lock and cancel names who took it.

use serde_json::json;

use crate::common::{ADMIN_TOKEN, Extra, TestApp, spawn_app_with};

const ADA: &str = "ada-0123456789abcdef0123456789abcdef";
const GRACE: &str = "grace-0123456789abcdef0123456789abcd";

async fn app_with_users() -> TestApp {
    spawn_app_with(Extra {
        tables: "[[user]]\nname = \"ada\"\ntoken_env = \"ADA_TOKEN\"\n\n\
                 [[user]]\nname = \"grace\"\ntoken_env = \"GRACE_TOKEN\"\n"
            .into(),
        env: vec![
            ("ADA_TOKEN".into(), ADA.into()),
            ("GRACE_TOKEN".into(), GRACE.into()),
        ],
        ..Extra::default()
    })
    .await
}

async fn why_actors(app: &TestApp) -> Vec<(String, String)> {
    let (_, why) = app.get_json("/api/deliveries?app=hello").await;
    why.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["event"].as_str().unwrap_or_default().to_owned(),
                t["actor"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn each_users_token_acts_under_their_name_in_the_cli_the_api_and_the_dashboard() {
    let app = app_with_users().await;

    // The CLI with Ada's token: the lock says it is hers.
    let out = app.cli_as(ADA, &["lock", "hello", "--reason", "release freeze"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (_, apps) = app.get_json("/api/apps").await;
    assert_eq!(apps[0]["lock"]["actor"], "ada", "{apps:#}");
    let out = app.cli_as(GRACE, &["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("locked by ada: release freeze"),
        "{out:?}"
    );

    // The API with Grace's token, and a dashboard login with Ada's.
    let unlocked = app
        .http
        .post(format!("{}/api/apps/hello/unlock", app.base()))
        .bearer_auth(GRACE)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unlocked.status(), 200);
    let (cookie, csrf) = app.log_in_with(ADA).await;
    let locked = app
        .http
        .post(format!("{}/api/apps/hello/lock", app.base()))
        .header("Cookie", &cookie)
        .header("X-CSRF-Token", &csrf)
        .json(&json!({ "reason": "from the dashboard" }))
        .send()
        .await
        .unwrap();
    assert_eq!(locked.status(), 200);
    let (_, apps) = app.get_json("/api/apps").await;
    assert_eq!(apps[0]["lock"]["actor"], "ada");
    // The admin token is still `admin`.
    let unlocked = app
        .http
        .post(format!("{}/api/apps/hello/unlock", app.base()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unlocked.status(), 200);

    let actors = why_actors(&app).await;
    // Newest first.
    assert_eq!(
        actors,
        [
            ("unlock".to_owned(), "admin".to_owned()),
            ("lock".to_owned(), "ada".to_owned()),
            ("unlock".to_owned(), "grace".to_owned()),
            ("lock".to_owned(), "ada".to_owned()),
        ]
    );
    // A token nobody holds is refused; no user's token reaches a page or the database.
    let (status, _) = {
        let response = app
            .http
            .get(format!("{}/api/apps", app.base()))
            .bearer_auth("nobody-0123456789abcdef0123456789ab")
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), ())
    };
    assert_eq!(status, 401);
    let db = std::fs::read(app.db_path()).unwrap();
    let db = String::from_utf8_lossy(&db);
    assert!(!db.contains(ADA) && !db.contains(GRACE));
}

#[tokio::test]
async fn a_user_holding_the_admin_token_or_a_short_one_stops_the_start() {
    let mut app = app_with_users().await;
    app.stop_with(libc::SIGTERM, std::time::Duration::from_secs(30))
        .unwrap();

    let (status, said) = app.serve_refused(&[("ADA_TOKEN", ADMIN_TOKEN)]);
    assert!(!status.success());
    assert!(
        said.contains("user.ada.token_env holds the admin token"),
        "{said}"
    );
    let (status, said) = app.serve_refused(&[("GRACE_TOKEN", "short")]);
    assert!(!status.success());
    assert!(said.contains("user.grace.token_env"), "{said}");
    assert!(said.contains("at least 32"), "{said}");
    assert!(!said.contains("short\n") && !said.contains(ADA), "{said}");
}
