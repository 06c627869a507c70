//! Runs the dashboard's browser tests (tests/browser, playwright-core driving headless
//! Chromium) against a real nonstop with the example app already live.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{ADMIN_TOKEN, Extra, REPOSITORY, SECRET, spawn_app_with};

#[tokio::test]
async fn the_dashboard_in_a_real_browser() {
    // A commit holding a file named SLOW_BUILD builds slowly, printing as it goes: the
    // console test watches its lines appear.
    let mut app = spawn_app_with(Extra {
        build: Some(
            "if [ -f SLOW_BUILD ]; then for i in $(seq 1 30); do echo \"line $i\"; sleep 0.1; done; fi; \
             cargo build --release --target-dir target"
                .into(),
        ),
        ..Extra::default()
    })
    .await;
    app.deploy(&app.repo.commit("First live version")).await;
    let started = Instant::now();

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run scripts/test, which installs it (npm ci in tests/browser)"
    );
    let shots = std::env::var("NONSTOP_SHOTS")
        .unwrap_or_else(|_| dir.join("screenshots").display().to_string());
    // The browser tests ask for a server restart by leaving a file here (see restartServer).
    let handshake = tempfile::tempdir().unwrap();
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
        .env("NONSTOP_SHOTS", &shots)
        .env("NONSTOP_HANDSHAKE", handshake.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let node = command.spawn().expect("node runs");
    let pid = node.id();
    let output = tokio::task::spawn_blocking(move || node.wait_with_output());
    tokio::pin!(output);
    let output = loop {
        tokio::select! {
            done = &mut output => break done.unwrap().expect("node ran"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        let request = handshake.path().join("restart");
        if request.exists() {
            std::fs::remove_file(&request).unwrap();
            app.restart().await;
            std::fs::write(handshake.path().join("restarted"), "").unwrap();
        }
        if started.elapsed() > Duration::from_secs(600) {
            // SAFETY: kill(2) on the node process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!(
                "the browser tests ran for 10 minutes:\n{}",
                app.server_log()
            );
        }
    };
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
        report.contains("# pass 6") && report.contains("# fail 0"),
        "not all browser tests ran:\n{report}"
    );
}
