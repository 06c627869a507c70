//! Draining: connections left on an instance by a switch keep working until the next
//! deploy stops that instance; then they get the app's `drain_timeout_secs` to close by
//! themselves before nonstop closes them, and the stage log says what happened.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{Extra, TestApp, spawn_app_with, stage};
use crate::deploy::{next_event_data, say};

/// What one WebSocket saw while it talked every 50 ms: how many answers, whether each named
/// the version it opened on, and when (ms since the epoch) it was closed, if it was.
#[derive(Debug)]
pub struct Talked {
    pub answered: u64,
    pub wrong_version: Option<String>,
    pub closed_at: Option<i64>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Opens `n` WebSockets through `app`'s proxy, checks that `version` answers each, and
/// keeps each talking (`keep_talking`) until `stop`.
pub async fn open_talkers(
    app: &TestApp,
    version: &str,
    stop: &Arc<AtomicBool>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Talked>> {
    let ws_url = format!("ws://127.0.0.1:{}/ws", app.ports.proxy);
    let mut talkers = Vec::with_capacity(n);
    for _ in 0..n {
        let (mut socket, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
        assert_eq!(say(&mut socket, "hi").await, format!("{version}: hi"));
        talkers.push(keep_talking(socket, version.to_owned(), stop.clone()));
    }
    talkers
}

/// Talks on `socket` every 50 ms until it is closed or `stop` is set (bounded: 10,000
/// messages).
pub fn keep_talking(
    mut socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    version: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Talked> {
    tokio::spawn(async move {
        let mut talked = Talked {
            answered: 0,
            wrong_version: None,
            closed_at: None,
        };
        for n in 0..10_000u64 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if socket.send(Message::text(n.to_string())).await.is_err() {
                talked.closed_at = Some(now_ms());
                break;
            }
            let reply = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match socket.next().await {
                        Some(Ok(Message::Text(text))) => return Some(text.as_str().to_owned()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        _ => return None,
                    }
                }
            })
            .await
            .expect("an answer or a close in time");
            match reply {
                Some(text) => {
                    talked.answered += 1;
                    if text != format!("{version}: {n}") {
                        talked.wrong_version.get_or_insert(text);
                    }
                }
                None => {
                    talked.closed_at = Some(now_ms());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        talked
    })
}

#[tokio::test]
async fn connections_survive_the_deploy_that_switches_away_and_are_drained_by_the_next() {
    let app = spawn_app_with(Extra {
        app: "drain_timeout_secs = 2".into(),
        ..Extra::default()
    })
    .await;
    let first = app.deploy(&app.repo.commit("First")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let talkers = open_talkers(&app, &first, &stop, 3).await;
    let mut events = reqwest::get(format!("{}/stream", app.proxy()))
        .await
        .unwrap();
    let mut buffered = String::new();
    assert_eq!(next_event_data(&mut events, &mut buffered).await, first);

    // The deploy that switches away from the first instance stops nothing it talks to.
    let second = app.deploy(&app.repo.commit("Second")).await;
    assert_eq!(app.served().await, second);
    assert_eq!(next_event_data(&mut events, &mut buffered).await, first);
    assert!(
        talkers.iter().all(|t| !t.is_finished()),
        "a WebSocket ended at the switch"
    );

    // The next one goes to the first instance's port: it drains it, then stops it.
    let sha = app.repo.commit("Third");
    let id = app.push(&sha).await;
    let done = app.wait_finished(id).await;
    assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
    let after_install = stage(&done, "AfterInstall");
    let log = after_install["log"].as_str().unwrap();
    let old_port = app.ports.app[0];
    assert!(
        log.contains(&format!("port {old_port}: drained 0 in 2."))
            && log.contains(", closed 4 at the deadline"),
        "{log}"
    );
    let drain_started = after_install["started_at"].as_i64().unwrap();

    // The stream ended as a stream does (an EventSource would reconnect)...
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.chunk().await {
                Ok(Some(_)) => {}
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the stream ended in time");
    assert!(end.is_ok(), "the stream was cut, not ended: {end:?}");
    // ...and every WebSocket kept being answered by its version until the drain window
    // was over, then was closed.
    for talker in talkers {
        let talked = talker.await.unwrap();
        assert_eq!(talked.wrong_version, None, "{talked:?}");
        let closed_at = talked.closed_at.expect("closed by the drain");
        assert!(
            closed_at >= drain_started + 2_000,
            "closed {} ms into the 2 s drain: {talked:?}",
            closed_at - drain_started
        );
        assert!(talked.answered >= 10, "{talked:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(live["port"], old_port);
}

/// The story: WebSockets talking every 50 ms across five deploys. Each is answered
/// by the version it opened on until the deploy that stops its instance (two deploys
/// later: the next one that goes to its port) has drained it; none closes earlier.
#[tokio::test]
async fn two_dozen_websockets_across_five_deploys_end_only_at_their_instances_drain() {
    const PER_ROUND: usize = 4;
    let app = spawn_app_with(Extra {
        app: "drain_timeout_secs = 2".into(),
        ..Extra::default()
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    // (round opened, handle); the round's deploy decides the version and the port.
    let mut talkers = Vec::new();
    let mut drain_started = Vec::new();
    for round in 0..=5 {
        let id = app.push(&app.repo.commit(&format!("Round {round}"))).await;
        let done = app.wait_finished(id).await;
        assert_eq!(done["deployment"]["status"], "succeeded", "{done:#}");
        let version = done["deployment"]["version"].as_str().unwrap().to_owned();
        drain_started.push(stage(&done, "AfterInstall")["started_at"].as_i64().unwrap());
        // Everything opened two rounds ago sat on this deploy's port: drained and closed.
        if round >= 2 {
            let log = stage(&done, "AfterInstall")["log"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(
                log.contains(&format!(", closed {PER_ROUND} at the deadline")),
                "{log}"
            );
        }
        let opened = open_talkers(&app, &version, &stop, PER_ROUND).await;
        talkers.extend(opened.into_iter().map(|talker| (round, talker)));
    }
    // Let the last ones talk a little, then stop them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut answered = 0;
    for (round, talker) in talkers {
        let talked = talker.await.unwrap();
        assert_eq!(talked.wrong_version, None, "round {round}: {talked:?}");
        answered += talked.answered;
        match drain_started.get(round + 2) {
            Some(&drained_at) => {
                let closed_at = talked.closed_at.expect("closed by its instance's drain");
                assert!(
                    closed_at >= drained_at + 2_000,
                    "round {round}: closed {} ms into its drain: {talked:?}",
                    closed_at - drained_at
                );
            }
            None => assert_eq!(talked.closed_at, None, "round {round}: {talked:?}"),
        }
    }
    println!("{} websockets, {answered} messages answered", 6 * PER_ROUND);
}
