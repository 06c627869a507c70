//! The client half of the `nonstop` command: it talks to a running server through its HTTP
//! API with the admin token, follows a deployment to its end (`follow`), lists an app's
//! deployments and reads its instances' own output (`logs`). It never changes anything the
//! server has not been asked to change through the API, and never prints the token.

pub mod follow;
pub mod logs;

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::domain::DeploymentId;
use crate::elapsed::human;
use follow::{ConsoleItem, ConsoleReader, Follower, Outcome, Record, SseReader};

/// One request of the API that is not the event stream: the server answers in milliseconds,
/// so a minute without an answer means it is gone (and following falls back to polling).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a terminal's progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How often the record is read again while the stream is quiet, in case an event was lost
/// (a subscriber that falls behind skips events) or the stream dropped.
const RECORD_EVERY: Duration = Duration::from_secs(2);
/// How often the record is read once the stream is gone: it is then the only news.
const POLL_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the server at {url}: is `nonstop serve` running?")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{status}: {reason}")]
    Refused {
        status: reqwest::StatusCode,
        reason: String,
    },
    #[error("{url} did not answer the JSON nonstop sends")]
    BadAnswer {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("deployment {id} is still not finished after {waited}; it goes on without me: {url}")]
    StillRunning {
        id: DeploymentId,
        waited: String,
        url: String,
    },
    #[error("the server has no app `{0}`")]
    UnknownApp(String),
    #[error("{path}: {source}")]
    Log {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The running server, as the CLI reaches it.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: String, token: String) -> Self {
        Self {
            base,
            token,
            http: reqwest::Client::new(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// GETs `path`; the JSON answer, or the server's one-line reason.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|source| CliError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let response = refused_unless_success(response).await?;
        response
            .json()
            .await
            .map_err(|source| CliError::BadAnswer { url, source })
    }

    /// POSTs an action; its JSON answer, or the server's one-line reason.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, CliError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .timeout(REQUEST_TIMEOUT)
            .json(body)
            .send()
            .await
            .map_err(|source| CliError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let response = refused_unless_success(response).await?;
        Ok(response.json().await.unwrap_or_default())
    }

    /// The app's live port, `None` before its first deployment.
    pub async fn live_port(&self, app: &str) -> Result<Option<u16>, CliError> {
        match self
            .get_json::<serde_json::Value>(&format!("/api/apps/{app}/live"))
            .await
        {
            Ok(live) => Ok(live["port"].as_u64().and_then(|p| u16::try_from(p).ok())),
            Err(CliError::Refused { status, .. }) if status == reqwest::StatusCode::NOT_FOUND => {
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// Subscribes to the event stream. Called before the action, so no event of the
    /// deployment it starts can be missed.
    pub async fn events(&self) -> Result<EventStream, CliError> {
        let url = format!("{}/events", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| CliError::Unreachable { url, source })?;
        let response = refused_unless_success(response).await?;
        Ok(EventStream {
            response,
            reader: SseReader::default(),
        })
    }
}

async fn refused_unless_success(
    response: reqwest::Response,
) -> Result<reqwest::Response, CliError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    Err(CliError::Refused {
        status,
        reason: body["error"]
            .as_str()
            .unwrap_or("no reason given")
            .to_owned(),
    })
}

impl Client {
    /// Follows deployment `id`'s console (`--verbose`); `None` when the server does not
    /// offer one.
    async fn console(&self, id: DeploymentId) -> Option<ConsoleStream> {
        let url = format!("{}/api/deployments/{id}/log?follow=1", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        let response = refused_unless_success(response).await.ok()?;
        Some(ConsoleStream {
            response,
            reader: ConsoleReader::default(),
        })
    }
}

/// A deployment's console, read as it arrives.
struct ConsoleStream {
    response: reqwest::Response,
    reader: ConsoleReader,
}

impl ConsoleStream {
    /// The lines of the next chunk; `None` once the console ended, or its stream broke.
    async fn next(&mut self) -> Option<Vec<ConsoleItem>> {
        if self.reader.ended {
            return None;
        }
        match self.response.chunk().await {
            Ok(Some(chunk)) => Some(self.reader.feed(&chunk)),
            Ok(None) | Err(_) => None,
        }
    }
}

/// The next lines of the console; never, once it is gone.
async fn next_console(console: &mut Option<ConsoleStream>) -> Option<Vec<ConsoleItem>> {
    match console {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// `GET /events`, read as it arrives.
pub struct EventStream {
    response: reqwest::Response,
    reader: SseReader,
}

impl EventStream {
    /// The events of the next chunk; `None` when the stream ended or broke.
    async fn next(&mut self) -> Option<Vec<crate::events::Event>> {
        match self.response.chunk().await {
            Ok(Some(chunk)) => Some(self.reader.feed(&chunk)),
            Ok(None) | Err(_) => None,
        }
    }
}

/// How to follow.
pub struct FollowOptions {
    /// Show each finished stage's log tail.
    pub verbose: bool,
    /// Stop following (the deployment goes on) after this long.
    pub timeout: Duration,
}

/// Follows deployment `id` of `app` to its final status, printing each stage as it starts
/// and ends, the switch, and the outcome as the last line. Uses the event stream while it
/// lasts and polls the record when it drops (the server may restart meanwhile).
pub async fn follow(
    client: &Client,
    app: &str,
    id: DeploymentId,
    live_before: Option<u16>,
    mut events: Option<EventStream>,
    options: &FollowOptions,
) -> Result<Outcome, CliError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + options.timeout;
    let mut screen = Screen::new();
    let mut follower = Follower::new(id, live_before, options.verbose);
    // With --verbose, the stages' lines as they are printed; after a server restart the
    // finished stages' tails stand in for them.
    let mut console = match options.verbose {
        true => client.console(id).await,
        false => None,
    };
    follower.set_streaming(console.is_some());
    let mut record: Option<Record> = None;
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    let mut last_read = Instant::now() - RECORD_EVERY;
    loop {
        let every = if events.is_some() {
            RECORD_EVERY
        } else {
            POLL_EVERY
        };
        let stale = last_read.elapsed() >= every;
        if stale || record.is_none() {
            last_read = Instant::now();
            // A server that is restarting answers nothing for a while: keep polling.
            if let Ok(read) = client
                .get_json::<Record>(&format!("/api/deployments/{id}"))
                .await
            {
                screen.lines(&follower.on_record(&read));
                record = Some(read);
            }
        }
        if let Some(outcome) = follower.outcome() {
            screen.clear();
            return Ok(outcome.clone());
        }
        let mut reread = false;
        tokio::select! {
            batch = next_events(&mut events) => match batch {
                Some(batch) => {
                    for event in &batch {
                        if !follower.concerns(event, app) {
                            continue;
                        }
                        screen.lines(&follower.on_event(event, app));
                        reread |= !matches!(event, crate::events::Event::Live { .. });
                    }
                }
                None => events = None,
            },
            lines = next_console(&mut console) => match lines {
                Some(items) => {
                    for item in items {
                        let lines = match item {
                            ConsoleItem::Started(stage) => follower.on_stage_started(stage),
                            ConsoleItem::Line(line) => vec![line],
                        };
                        screen.lines(&lines);
                    }
                }
                None => {
                    // Ended with its deployment: every line was shown. Broken: the record's
                    // tails show the stages still to end.
                    let ended = console.as_ref().is_some_and(|c| c.reader.ended);
                    console = None;
                    follower.set_streaming(ended);
                }
            },
            _ = progress.tick() => {
                if let Some((stage, since)) = record.as_ref().and_then(Follower::running) {
                    screen.progress(&format!("{stage} … {}", human(now_ms() - since)));
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                screen.clear();
                return Err(CliError::StillRunning {
                    id,
                    waited: human(started.elapsed().as_millis() as i64),
                    url: format!("{}/deployments/{id}", client.base()),
                });
            }
        }
        if reread {
            last_read = Instant::now() - RECORD_EVERY;
        }
    }
}

/// The next batch of the stream; never, once it is gone (the select's other arms go on).
async fn next_events(events: &mut Option<EventStream>) -> Option<Vec<crate::events::Event>> {
    match events {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Standard output: plain lines, and on a terminal one progress line kept below them.
struct Screen {
    terminal: bool,
    progress_shown: bool,
}

impl Screen {
    fn new() -> Self {
        Self {
            terminal: std::io::stdout().is_terminal(),
            progress_shown: false,
        }
    }

    fn lines(&mut self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        self.clear();
        let mut out = std::io::stdout().lock();
        for line in lines {
            // A closed stdout (piped into `head`) must not stop the following.
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    fn progress(&mut self, text: &str) {
        if !self.terminal {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r\x1b[2K{text}");
        let _ = out.flush();
        self.progress_shown = true;
    }

    fn clear(&mut self) {
        if self.progress_shown {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K");
            let _ = out.flush();
            self.progress_shown = false;
        }
    }
}

/// `nonstop history APP`: one line per deployment, newest first.
pub async fn history(client: &Client, app: &str, limit: u32) -> Result<Vec<String>, CliError> {
    // The list filters by name, so an app that does not exist would read as one never deployed.
    let apps: Vec<serde_json::Value> = client.get_json("/api/apps").await?;
    if !apps.iter().any(|a| a["name"] == app) {
        return Err(CliError::UnknownApp(app.to_owned()));
    }
    let app_query: String = url::form_urlencoded::byte_serialize(app.as_bytes()).collect();
    let rows: Vec<serde_json::Value> = client
        .get_json(&format!("/api/deployments?app={app_query}&limit={limit}"))
        .await?;
    Ok(history_lines(&rows))
}

fn history_lines(rows: &[serde_json::Value]) -> Vec<String> {
    let text = |row: &serde_json::Value, key: &str| row[key].as_str().unwrap_or("").to_owned();
    // Versions are as long as their template makes them: the column fits the longest.
    let version_width = rows
        .iter()
        .map(|row| text(row, "version").chars().count())
        .max()
        .unwrap_or(0)
        .max("VERSION".len());
    let line = |id: &str,
                status: &str,
                trigger: &str,
                version: &str,
                commit: &str,
                created: &str,
                took: &str,
                error: &str| {
        format!(
            "{id:<6} {status:<11} {trigger:<8} {version:<version_width$} {commit:<8} {created:<16} {took:>10}  {error}"
        )
        .trim_end()
        .to_owned()
    };
    let mut lines = vec![line(
        "ID",
        "STATUS",
        "TRIGGER",
        "VERSION",
        "COMMIT",
        "CREATED (UTC)",
        "TOOK",
        "ERROR",
    )];
    for row in rows {
        let created = row["created_at"]
            .as_i64()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default();
        let took = match (row["started_at"].as_i64(), row["finished_at"].as_i64()) {
            (Some(start), Some(end)) => human(end - start),
            _ => String::new(),
        };
        let commit: String = text(row, "commit_sha").chars().take(8).collect();
        let error = text(row, "error");
        lines.push(line(
            &format!("#{}", row["id"]),
            &text(row, "status"),
            &text(row, "trigger"),
            &text(row, "version"),
            &commit,
            &created,
            &took,
            error.lines().next().unwrap_or(""),
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_a_table_with_one_line_per_deployment() {
        let rows = [
            serde_json::json!({
                "id": 2, "status": "failed", "trigger": "push", "version": "20261201-abc",
                "commit_sha": "0123456789abcdef", "created_at": 1_764_604_800_000_i64,
                "started_at": 1_000, "finished_at": 13_300,
                "error": "ValidateService: health check failed\nmore",
            }),
            serde_json::json!({ "id": 1, "status": "queued", "trigger": "manual" }),
        ];
        let lines = history_lines(&rows);
        assert!(lines[0].starts_with("ID     STATUS"), "{lines:?}");
        assert!(lines[0].contains(" VERSION      COMMIT "), "{lines:?}");
        assert!(lines[1].starts_with("#2     failed      push     20261201-abc 01234567"));
        assert!(
            lines[1].contains(" 01234567 2025-12-01 16:00"),
            "{}",
            lines[1]
        );
        assert!(
            lines[1].ends_with("12.3 s  ValidateService: health check failed"),
            "{}",
            lines[1]
        );
        assert_eq!(lines[2], "#1     queued      manual");
    }
}
