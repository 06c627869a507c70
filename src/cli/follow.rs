//! What `nonstop deploy` (and `rollback`, `redeploy`) prints while it follows a deployment:
//! pure text from the bus's events and the deployment's record, so every line is tested
//! without a server. It never reads the network or the clock: the caller feeds it what the
//! server said, and it answers the lines to print and, once the record is final, the outcome.
//!
//! The record is the truth (durations, the final reason); events only say *when* to look and
//! carry the one thing the record does not keep, the port traffic left. Every line is printed
//! once, whichever of the two told it first, so a stream that drops and a poll that catches
//! up never repeat or skip a stage.

use std::collections::HashSet;

use serde::Deserialize;

use crate::domain::{DeploymentId, DeploymentStatus, Stage, StageStatus};
use crate::elapsed::human;
use crate::events::Event;

/// How many lines of a finished stage's log `--verbose` shows.
pub const LOG_TAIL_LINES: usize = 20;

/// The part of `GET /api/deployments/{id}` the follower reads.
#[derive(Clone, Debug, Deserialize)]
pub struct Record {
    pub deployment: DeploymentView,
    #[serde(default)]
    pub stages: Vec<StageView>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DeploymentView {
    pub id: DeploymentId,
    pub app: String,
    pub status: DeploymentStatus,
    pub version: Option<String>,
    pub port: Option<u16>,
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub ci_waiting_for: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct StageView {
    pub name: Stage,
    pub status: StageStatus,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    #[serde(default)]
    pub log: String,
}

/// How a followed deployment ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Failed, interrupted, superseded or rolled back: the reason is the last line printed.
    Failed,
}

/// One deployment being followed: what was printed so far.
pub struct Follower {
    id: DeploymentId,
    verbose: bool,
    /// The app's live port when following started: the switch's `from` if no event told it.
    live_before: Option<u16>,
    started: HashSet<Stage>,
    ended: HashSet<Stage>,
    switch_shown: bool,
    waiting_shown: bool,
    outcome: Option<Outcome>,
    /// The console streams the stages' lines as they are printed, so a finished stage's
    /// tail is not shown again.
    streaming: bool,
}

impl Follower {
    pub fn new(id: DeploymentId, live_before: Option<u16>, verbose: bool) -> Self {
        Self {
            id,
            verbose,
            live_before,
            started: HashSet::new(),
            ended: HashSet::new(),
            switch_shown: false,
            waiting_shown: false,
            outcome: None,
            streaming: false,
        }
    }

    /// The line for a stage the console says started, unless it was printed already.
    pub fn on_stage_started(&mut self, stage: Stage) -> Vec<String> {
        if self.outcome.is_none() && self.started.insert(stage) {
            vec![format!("{stage} started")]
        } else {
            Vec::new()
        }
    }

    /// Whether the console stream is showing the stages' lines (with `verbose`).
    pub fn set_streaming(&mut self, streaming: bool) {
        self.streaming = streaming;
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Whether `event` may change what is printed, so the record is worth reading again.
    pub fn concerns(&self, event: &Event, app: &str) -> bool {
        match event {
            Event::Deployment { id, .. } => *id == self.id,
            Event::Stage { deployment_id, .. } => *deployment_id == self.id,
            Event::Live { app: live_app, .. } => live_app == app,
        }
    }

    /// The lines an event of the bus adds: the switch, as it happens. Stage and deployment
    /// events only say the record changed (see [`Follower::on_record`]).
    pub fn on_event(&mut self, event: &Event, app: &str) -> Vec<String> {
        match event {
            Event::Live {
                app: live_app,
                port,
                from_port,
                ..
            } if live_app == app && !self.switch_shown && self.outcome.is_none() => {
                self.switch_shown = true;
                vec![switch_line(from_port.or(self.live_before), *port)]
            }
            _ => Vec::new(),
        }
    }

    /// The lines the record adds since the last call: each stage's start and end (with its
    /// duration, and with `verbose` its log's tail), and once the deployment is final the
    /// switch if no event showed it, and the outcome as the last line.
    pub fn on_record(&mut self, record: &Record) -> Vec<String> {
        let mut lines = Vec::new();
        if self.outcome.is_some() {
            return lines;
        }
        let deployment = &record.deployment;
        if deployment.status == DeploymentStatus::Waiting && !self.waiting_shown {
            self.waiting_shown = true;
            lines.push(format!(
                "waiting for {}",
                deployment.ci_waiting_for.as_deref().unwrap_or("its turn")
            ));
        }
        for stage in &record.stages {
            self.stage_lines(stage, &mut lines);
        }
        if !deployment.status.is_finished() {
            return lines;
        }
        let succeeded = deployment.status == DeploymentStatus::Succeeded;
        if succeeded
            && !self.switch_shown
            && let Some(port) = deployment.port
            && self.live_before != Some(port)
        {
            self.switch_shown = true;
            lines.push(switch_line(self.live_before, port));
        }
        let took = match (deployment.started_at, deployment.finished_at) {
            (Some(start), Some(end)) => format!(" in {}", human(end - start)),
            _ => String::new(),
        };
        if succeeded {
            let version = deployment.version.as_deref().unwrap_or("?");
            let port = deployment
                .port
                .map(|p| format!(" on {p}"))
                .unwrap_or_default();
            lines.push(format!(
                "deployment {} succeeded{took}: {} {version} is live{port}",
                self.id, deployment.app
            ));
            self.outcome = Some(Outcome::Succeeded);
        } else {
            let reason = deployment
                .error
                .as_deref()
                .map(|e| e.lines().next().unwrap_or(e))
                .filter(|e| !e.is_empty())
                .unwrap_or("no reason recorded");
            lines.push(format!(
                "deployment {} {}{took}: {reason}",
                self.id, deployment.status
            ));
            self.outcome = Some(Outcome::Failed);
        }
        lines
    }

    fn stage_lines(&mut self, stage: &StageView, lines: &mut Vec<String>) {
        let name = stage.name;
        let finished = matches!(
            stage.status,
            StageStatus::Succeeded | StageStatus::Failed | StageStatus::Skipped
        );
        if stage.status == StageStatus::Running && self.started.insert(name) {
            lines.push(format!("{name} started"));
        }
        if !finished || !self.ended.insert(name) {
            return;
        }
        // A stage that began and ended between two looks still gets its start line.
        if stage.status != StageStatus::Skipped && self.started.insert(name) {
            lines.push(format!("{name} started"));
        }
        let took = match (stage.status, stage.started_at, stage.finished_at) {
            (StageStatus::Skipped, ..) => String::new(),
            (_, Some(start), Some(end)) => format!(" in {}", human(end - start)),
            _ => String::new(),
        };
        lines.push(format!("{name} {}{took}", stage.status));
        if self.verbose && !self.streaming && stage.status != StageStatus::Skipped {
            let log: Vec<&str> = stage.log.lines().collect();
            let tail = &log[log.len().saturating_sub(LOG_TAIL_LINES)..];
            lines.extend(tail.iter().map(|line| format!("  | {line}")));
        }
    }

    /// The stage running now and since when (ms), for a terminal's progress line.
    pub fn running(record: &Record) -> Option<(Stage, i64)> {
        record
            .stages
            .iter()
            .find(|s| s.status == StageStatus::Running)
            .map(|s| (s.name, s.started_at.unwrap_or(record.deployment.created_at)))
    }
}

fn switch_line(from: Option<u16>, to: u16) -> String {
    match from {
        Some(from) if from != to => format!("traffic {from} → {to}"),
        _ => format!("traffic → {to}"),
    }
}

/// The events in a stream of server-sent events, fed in chunks as they arrive. Only `data:`
/// lines are read: nonstop sends each event as one line of JSON; the `hello` greeting and
/// anything that is not an event of the bus is skipped.
#[derive(Default)]
pub struct SseReader {
    pending: Vec<u8>,
}

impl SseReader {
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.pending.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:")
                && let Ok(event) = serde_json::from_str::<Event>(data.trim_start())
            {
                events.push(event);
            }
        }
        events
    }
}

/// What the console says: a stage started (its `── Stage` header), or a printed line.
#[derive(Debug, PartialEq)]
pub enum ConsoleItem {
    Started(Stage),
    Line(String),
}

/// `GET /api/deployments/{id}/log?follow=1` read as it arrives: the lines the deployment's
/// processes print, indented under the stage lines, each stage's start (its header: it
/// comes before the stage's first line, which a look at the record may not), and whether
/// the console ended. How a stage ended and the outcome are the record's to tell.
#[derive(Default)]
pub struct ConsoleReader {
    pending: String,
    pub ended: bool,
}

impl ConsoleReader {
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<ConsoleItem> {
        self.pending.push_str(&String::from_utf8_lossy(chunk));
        let mut lines = Vec::new();
        while let Some(end) = self.pending.find("\n\n") {
            let block: String = self.pending.drain(..end + 2).collect();
            let mut event = "message";
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    event = if name.trim() == "end" { "end" } else { "lines" };
                } else if let Some(text) = line.strip_prefix("data:") {
                    data.push(text.strip_prefix(' ').unwrap_or(text));
                }
            }
            match event {
                "end" => self.ended = true,
                "lines" => lines.extend(data.iter().filter_map(
                    |line| match line.strip_prefix("── ") {
                        Some(header) => Stage::parse(header).map(ConsoleItem::Started),
                        None if line.is_empty() => None,
                        None => Some(ConsoleItem::Line(format!("  | {line}"))),
                    },
                )),
                _ => {}
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: &str, stages: &[(&str, &str, Option<i64>, Option<i64>)]) -> Record {
        let stages: Vec<_> = stages
            .iter()
            .map(|(name, status, start, end)| {
                serde_json::json!({
                    "name": name, "status": status, "started_at": start,
                    "finished_at": end, "log": "line one\nline two\n",
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "deployment": {
                "id": 7, "app": "hello", "status": status, "version": "v2", "port": 8082,
                "error": if status == "failed" { serde_json::json!("ValidateService: health check failed: 503\nmore") } else { serde_json::Value::Null },
                "created_at": 1_000, "started_at": 1_000,
                "finished_at": if status == "running" { serde_json::Value::Null } else { serde_json::json!(13_300) },
                "branch": "main", "trigger": "manual",
            },
            "stages": stages,
        }))
        .unwrap()
    }

    fn id(n: i64) -> DeploymentId {
        serde_json::from_value(serde_json::json!(n)).unwrap()
    }

    #[test]
    fn each_stage_starts_and_ends_once_with_its_duration() {
        let mut follower = Follower::new(id(7), Some(8081), false);
        let running = record("running", &[("Fetch", "running", Some(1_000), None)]);
        assert_eq!(follower.on_record(&running), ["Fetch started"]);
        assert!(follower.on_record(&running).is_empty(), "printed twice");
        let later = record(
            "running",
            &[
                ("Fetch", "succeeded", Some(1_000), Some(1_850)),
                ("Build", "succeeded", Some(1_850), Some(4_250)),
                ("Bundle", "pending", None, None),
            ],
        );
        assert_eq!(
            follower.on_record(&later),
            [
                "Fetch succeeded in 850 ms",
                "Build started",
                "Build succeeded in 2.4 s"
            ]
        );
        assert_eq!(follower.outcome(), None);
    }

    #[test]
    fn a_skipped_stage_says_so_without_a_start_or_a_duration() {
        let mut follower = Follower::new(id(7), None, true);
        let lines = follower.on_record(&record(
            "running",
            &[("Build", "skipped", Some(1_000), Some(1_000))],
        ));
        assert_eq!(lines, ["Build skipped"]);
    }

    #[test]
    fn the_switch_is_shown_when_traffic_moves_and_success_is_the_last_line() {
        let mut follower = Follower::new(id(7), Some(8081), false);
        let live = Event::Live {
            app: "hello".into(),
            port: 8082,
            profile: "blue".into(),
            version: Some("v2".into()),
            from_port: Some(8081),
        };
        assert!(follower.concerns(&live, "hello"));
        assert_eq!(follower.on_event(&live, "hello"), ["traffic 8081 → 8082"]);
        let done = record(
            "succeeded",
            &[("ValidateService", "succeeded", Some(2_000), Some(3_000))],
        );
        let lines = follower.on_record(&done);
        assert_eq!(
            lines,
            [
                "ValidateService started",
                "ValidateService succeeded in 1.0 s",
                "deployment 7 succeeded in 12.3 s: hello v2 is live on 8082"
            ]
        );
        assert_eq!(follower.outcome(), Some(&Outcome::Succeeded));
        assert!(follower.on_record(&done).is_empty());
        assert!(follower.on_event(&live, "hello").is_empty());
    }

    #[test]
    fn without_the_live_event_the_switch_comes_from_the_record() {
        let mut follower = Follower::new(id(7), Some(8081), false);
        let lines = follower.on_record(&record("succeeded", &[]));
        assert_eq!(lines[0], "traffic 8081 → 8082");
        let mut first = Follower::new(id(7), None, false);
        assert_eq!(
            first.on_record(&record("succeeded", &[]))[0],
            "traffic → 8082"
        );
    }

    #[test]
    fn a_failure_ends_on_its_reason_and_keeps_traffic_unmentioned() {
        let mut follower = Follower::new(id(7), Some(8081), false);
        let lines = follower.on_record(&record(
            "failed",
            &[("ValidateService", "failed", Some(2_000), Some(3_000))],
        ));
        assert_eq!(
            lines.last().unwrap(),
            "deployment 7 failed in 12.3 s: ValidateService: health check failed: 503"
        );
        assert!(!lines.iter().any(|l| l.starts_with("traffic")), "{lines:?}");
        assert_eq!(follower.outcome(), Some(&Outcome::Failed));
    }

    #[test]
    fn verbose_shows_a_finished_stage_log_tail() {
        let mut follower = Follower::new(id(7), None, true);
        let lines = follower.on_record(&record(
            "running",
            &[("Build", "succeeded", Some(1_000), Some(2_000))],
        ));
        assert_eq!(
            lines,
            [
                "Build started",
                "Build succeeded in 1.0 s",
                "  | line one",
                "  | line two"
            ]
        );
    }

    #[test]
    fn with_the_console_streaming_a_finished_stage_shows_no_tail_again() {
        let mut follower = Follower::new(id(7), None, true);
        follower.set_streaming(true);
        let lines = follower.on_record(&record(
            "running",
            &[("Build", "succeeded", Some(1_000), Some(2_000))],
        ));
        assert_eq!(lines, ["Build started", "Build succeeded in 1.0 s"]);
    }

    #[test]
    fn the_console_shows_printed_lines_indented_and_hears_its_end() {
        let mut reader = ConsoleReader::default();
        let first = reader.feed(
            b"event: lines\ndata: \xe2\x94\x80\xe2\x94\x80 Build\ndata: Compiling hello\ndata: ",
        );
        assert!(
            first.is_empty(),
            "half an event waits for its end: {first:?}"
        );
        let lines = reader.feed(
            b"\n\n: keep-alive\n\nevent: lines\ndata: done\ndata: \xe2\x94\x80\xe2\x94\x80 Build succeeded\ndata: \n\n",
        );
        assert_eq!(
            lines,
            [
                ConsoleItem::Started(Stage::Build),
                ConsoleItem::Line("  | Compiling hello".into()),
                ConsoleItem::Line("  | done".into()),
            ]
        );
        let mut follower = Follower::new(id(7), None, true);
        assert_eq!(follower.on_stage_started(Stage::Build), ["Build started"]);
        let record = record("running", &[("Build", "running", Some(1_000), None)]);
        assert!(follower.on_record(&record).is_empty(), "told once");
        assert!(!reader.ended);
        assert!(reader.feed(b"event: end\ndata: {}\n\n").is_empty());
        assert!(reader.ended);
    }

    #[test]
    fn other_deployments_events_do_not_concern_it() {
        let follower = Follower::new(id(7), None, false);
        let other = Event::Stage {
            deployment_id: id(8),
            app: "hello".into(),
            stage: Stage::Build,
            status: StageStatus::Running,
        };
        assert!(!follower.concerns(&other, "hello"));
        let other_app = Event::Live {
            app: "world".into(),
            port: 9000,
            profile: "blue".into(),
            version: None,
            from_port: None,
        };
        assert!(!follower.concerns(&other_app, "hello"));
    }

    #[test]
    fn the_sse_reader_joins_chunks_and_skips_the_greeting() {
        let mut reader = SseReader::default();
        assert!(
            reader
                .feed(b"event: hello\ndata: {}\nretry: 500\n\ndata: {\"type\":\"stage\",")
                .is_empty()
        );
        let events = reader.feed(
            b"\"deployment_id\":7,\"app\":\"hello\",\"stage\":\"Build\",\"status\":\"running\"}\r\n\n:\n",
        );
        assert_eq!(
            events,
            [Event::Stage {
                deployment_id: id(7),
                app: "hello".into(),
                stage: Stage::Build,
                status: StageStatus::Running,
            }]
        );
    }
}
