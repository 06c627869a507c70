//! Runs the dashboard's browser tests (tests/browser, playwright-core driving headless
//! Chromium) against a real nonstop with the example app already live.

mod common;

use std::process::Command;

use common::{ADMIN_TOKEN, REPOSITORY, SECRET, spawn_app};

#[tokio::test]
async fn the_dashboard_in_a_real_browser() {
    let app = spawn_app().await;
    app.deploy(&app.repo.commit("First live version")).await;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run scripts/test, which installs it (npm ci in tests/browser)"
    );
    let shots = std::env::var("NONSTOP_SHOTS")
        .unwrap_or_else(|_| dir.join("screenshots").display().to_string());
    let mut command = Command::new("node");
    command
        .args(["--test", "--test-concurrency=1", "dashboard.test.mjs"])
        .current_dir(&dir)
        .env("NONSTOP_BASE", app.base())
        .env("NONSTOP_PROXY", app.proxy())
        .env("NONSTOP_REPO", &app.repo.path)
        .env("NONSTOP_SECRET", SECRET)
        .env("NONSTOP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("NONSTOP_REPOSITORY", REPOSITORY)
        .env(
            "NONSTOP_PORTS",
            format!("{},{}", app.ports.app[0], app.ports.app[1]),
        )
        .env("NONSTOP_SHOTS", &shots);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("node runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    assert!(
        output.status.success(),
        "browser tests failed:\n{report}\nserver log:\n{}",
        app.server_log()
    );
    assert!(
        report.contains("# pass 3") && report.contains("# fail 0"),
        "not all browser tests ran:\n{report}"
    );
}
