//! A deployment's console: the lines its build and hooks print reach the follow endpoint
//! (and the record) while the stage runs, in order, none lost, none twice.

use std::time::{Duration, Instant};

use crate::common::{ADMIN_TOKEN, Extra, TestApp, spawn_app_with};

/// A build that prints `line 1` … `line 30`, one every 100 ms, before building.
async fn app_with_a_slow_build() -> TestApp {
    spawn_app_with(Extra {
        build: Some(
            "for i in $(seq 1 30); do echo \"line $i\"; sleep 0.1; done; \
             cargo build --release --target-dir target"
                .into(),
        ),
        ..Extra::default()
    })
    .await
}

/// Server-sent events read off a response as they come: (event, data) pairs.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(app: &TestApp, id: i64) -> Self {
        let response = app
            .http
            .get(format!("{}/api/deployments/{id}/log?follow=1", app.base()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended.
    async fn next(&mut self) -> Option<(String, String)> {
        loop {
            if let Some(at) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..at + 2).collect();
                let (mut event, mut data) = (String::from("message"), Vec::new());
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event = name.to_owned();
                    } else if let Some(text) = line.strip_prefix("data: ") {
                        data.push(text);
                    } else if line == "data:" {
                        data.push("");
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((event, data.join("\n")));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(120), self.response.chunk())
                .await
                .expect("the console goes on within two minutes")
                .unwrap()?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

async fn build_stage(app: &TestApp, id: i64) -> serde_json::Value {
    let (_, record) = app.get_json(&format!("/api/deployments/{id}")).await;
    record["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|stage| stage["name"] == "Build")
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn a_builds_lines_are_followed_as_they_are_printed_in_order_and_saved_while_it_runs() {
    let app = app_with_a_slow_build().await;
    let id = app.push(&app.repo.commit("Slow build")).await;
    let mut events = Events::open(&app, id).await;

    let mut console = String::new();
    let mut checked_while_running = false;
    while let Some((event, data)) = events.next().await {
        if event == "end" {
            break;
        }
        assert_eq!(event, "lines");
        console.push_str(&data);
        if !checked_while_running && console.contains("line 5\n") {
            checked_while_running = true;
            // Printed, and the stage it belongs to has not ended.
            let build = build_stage(&app, id).await;
            assert_eq!(build["status"], "running", "{console}");
            // The record has its lines too before the stage ends (saved every second).
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let build = build_stage(&app, id).await;
                assert_eq!(build["status"], "running", "{build}");
                if build["log"].as_str().unwrap().contains("line 1\n") {
                    break;
                }
                assert!(Instant::now() < deadline, "the record never had the lines");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    assert!(checked_while_running, "{console}");
    let printed: Vec<&str> = console
        .lines()
        .filter(|line| line.starts_with("line "))
        .collect();
    let expected: Vec<String> = (1..=30).map(|i| format!("line {i}")).collect();
    assert_eq!(printed, expected, "every line once, in order");
    let build_at = console.find("── Build\n").expect("the stage's header");
    assert!(build_at < console.find("line 1\n").unwrap(), "{console}");
    assert!(console.contains("── Build succeeded\n"), "{console}");
    assert!(console.contains("── ValidateService"), "{console}");
    assert!(console.ends_with("── succeeded\n"), "{console}");
    app.wait_finished(id).await;
}

#[tokio::test]
async fn a_finished_deployments_console_is_its_record_and_an_unknown_one_is_404() {
    let app = app_with_a_slow_build().await;
    let id = app.push(&app.repo.commit("Slow build")).await;
    app.wait_finished(id).await;

    let mut events = Events::open(&app, id).await;
    let (event, console) = events.next().await.unwrap();
    assert_eq!(event, "lines");
    assert!(console.contains("── Build\n"), "{console}");
    assert!(console.contains("line 30\n"), "{console}");
    assert!(console.ends_with("── succeeded\n"), "{console}");
    assert_eq!(events.next().await.unwrap().0, "end");
    assert!(events.next().await.is_none(), "the stream ends after `end`");

    let (status, text) = app.get_text(&format!("/api/deployments/{id}/log")).await;
    assert_eq!(status, 200);
    assert_eq!(text, console);
    let (status, answer) = app.get_json("/api/deployments/99999/log").await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"], "no deployment 99999");
}
