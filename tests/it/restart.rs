//! Restarting or upgrading nonstop itself must not drop traffic: with the proxies in a
//! `nonstop proxy` process of their own, `serve` comes and goes while clients keep their
//! connections, and deploys keep switching through the restarted server.

use std::sync::atomic::Ordering;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::common::{Extra, Load, spawn_app, spawn_app_with};
use crate::drain::open_talkers;

#[tokio::test]
async fn restarting_serve_three_times_under_load_loses_no_request() {
    let mut app = spawn_app_with(Extra {
        proxy_process: true,
        ..Extra::default()
    })
    .await;
    let first = app.deploy(&app.repo.commit("Before the restarts")).await;

    let load = Load::start(
        format!("{}/", app.proxy()),
        8,
        100_000,
        Duration::from_secs(240),
    );
    load.wait_sent(200).await;
    for signal in [libc::SIGKILL, libc::SIGTERM, libc::SIGKILL] {
        app.restart_with(signal).await;
        let sent = load.sent.load(Ordering::Relaxed);
        load.wait_sent(sent + 200).await;
    }
    // The restarted server still moves traffic, through the same proxy process.
    let last = app.deploy(&app.repo.commit("After the restarts")).await;
    let sent = load.sent.load(Ordering::Relaxed);
    load.wait_sent(sent + 200).await;
    let report = load.finish().await;

    println!(
        "load: {} ok, {} failed, by version: {:?}",
        report.ok, report.failed, report.bodies
    );
    report.assert_none_failed();
    let mut expected = vec![&first, &last];
    expected.sort();
    assert_eq!(
        report.bodies.keys().collect::<Vec<_>>(),
        expected,
        "both versions, nothing else"
    );
    assert_eq!(app.served().await, last);
    let (_, live) = app.get_json("/api/apps/hello/live").await;
    assert_eq!(live["version"], last.as_str());
}

/// The shipped config says nothing about a proxy process, so this is what a newcomer gets:
/// `serve` starts `nonstop proxy` itself, and every later `serve` takes it over.
#[tokio::test]
async fn with_the_default_config_serve_restarts_and_crashes_lose_no_request_and_no_websocket() {
    let mut app = spawn_app().await;
    let first = app.deploy(&app.repo.commit("Before the restarts")).await;
    let proxy_pid = std::fs::read_to_string(app.data_dir().join("proxy.pid"))
        .expect("serve started a proxy process")
        .trim()
        .to_owned();
    assert_ne!(proxy_pid, app.server_pid().to_string());

    let stop = Arc::new(AtomicBool::new(false));
    let talkers = open_talkers(&app, &first, &stop, 5).await;
    let load = Load::start(
        format!("{}/", app.proxy()),
        8,
        100_000,
        Duration::from_secs(300),
    );
    load.wait_sent(200).await;
    for signal in [
        libc::SIGTERM,
        libc::SIGKILL,
        libc::SIGTERM,
        libc::SIGKILL,
        libc::SIGTERM,
        libc::SIGKILL,
    ] {
        app.restart_with(signal).await;
        let sent = load.sent.load(Ordering::Relaxed);
        load.wait_sent(sent + 200).await;
        assert!(
            talkers.iter().all(|t| !t.is_finished()),
            "a WebSocket ended at a restart ({signal})"
        );
    }
    // The same proxy process all along, and the restarted server still moves its traffic.
    let still = std::fs::read_to_string(app.data_dir().join("proxy.pid")).unwrap();
    assert_eq!(still.trim(), proxy_pid);
    let last = app.deploy(&app.repo.commit("After the restarts")).await;
    let sent = load.sent.load(Ordering::Relaxed);
    load.wait_sent(sent + 200).await;
    let report = load.finish().await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for talker in talkers {
        let talked = talker.await.unwrap();
        assert_eq!(
            talked.closed_at, None,
            "a WebSocket was dropped: {talked:?}"
        );
        assert_eq!(talked.wrong_version, None, "{talked:?}");
        answered += talked.answered;
    }

    println!(
        "load: {} ok, {} failed, by version: {:?}; websocket messages answered: {answered}",
        report.ok, report.failed, report.bodies
    );
    report.assert_none_failed();
    assert_eq!(app.served().await, last);

    // Stopping everything is one command.
    let out = app.cli(&["proxy", "--stop"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert_eq!(
        said.trim(),
        format!("stopped the proxy process (pid {proxy_pid})")
    );
    crate::common::wait_port_closed(app.ports.proxy, "the stopped proxy").await;
    let out = app.cli(&["proxy", "--stop"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("no proxy process runs"),
        "{out:?}"
    );
}

/// What the fresh-connection clients saw around a proxy crash.
#[derive(Debug, Default)]
struct Crashed {
    ok: u64,
    /// Connections refused: a listener was missing. Must never happen.
    refused: Vec<String>,
    /// Requests whose connection the dying proxy had already accepted.
    cut: Vec<String>,
    /// Connections made while no proxy ran, and those of them that were not served.
    made_while_down: u64,
    lost_while_down: Vec<String>,
}

/// One request on a new connection (`Connection: close`): its body when it answered 200.
async fn get_on_a_new_connection(port: u16) -> Result<String, (bool, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|err| (true, format!("connect: {err}")))?;
    let exchange = async {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| (false, "no answer in 30 s".to_owned()))?
        .map_err(|err| (false, err.to_string()))?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_owned()),
        _ => Err((false, format!("answer: {answer:?}"))),
    }
}

/// systemd socket activation: the listening socket belongs to the service manager (here
/// the test, passing it as fd 3 with `LISTEN_FDS`), so while the proxy is dead new
/// connections wait in the kernel's backlog and are served once it is back.
#[tokio::test]
async fn a_socket_activated_proxy_killed_under_load_refuses_nothing_and_serves_what_came_meanwhile()
{
    let mut app = spawn_app_with(Extra {
        proxy_process: true,
        socket_activated: true,
        ..Extra::default()
    })
    .await;
    let version = app.deploy(&app.repo.commit("Served across crashes")).await;
    let port = app.ports.proxy;
    let down = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (down, stop, version) = (down.clone(), stop.clone(), version.clone());
            tokio::spawn(async move {
                let mut seen = Crashed::default();
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let while_down = down.load(Ordering::Relaxed);
                    seen.made_while_down += u64::from(while_down);
                    let failure = match get_on_a_new_connection(port).await {
                        Ok(body) if body == version => {
                            seen.ok += 1;
                            continue;
                        }
                        Ok(body) => format!("served {body:?}"),
                        Err((true, err)) => {
                            seen.refused.push(err);
                            continue;
                        }
                        Err((false, err)) => err,
                    };
                    if while_down {
                        seen.lost_while_down.push(failure);
                    } else {
                        seen.cut.push(failure);
                    }
                }
                seen
            })
        })
        .collect();

    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.kill_proxy_process();
        // From here on every new connection is made while no proxy runs.
        down.store(true, Ordering::Relaxed);
        // Long enough for every client to open a connection into the backlog.
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.start_proxy_process_again().await;
        down.store(false, Ordering::Relaxed);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Crashed::default();
    for client in clients {
        let seen = client.await.unwrap();
        total.ok += seen.ok;
        total.refused.extend(seen.refused);
        total.cut.extend(seen.cut);
        total.made_while_down += seen.made_while_down;
        total.lost_while_down.extend(seen.lost_while_down);
    }

    println!(
        "socket activation: {} ok, {} refused, {} cut at a kill, {} made while down ({} lost)",
        total.ok,
        total.refused.len(),
        total.cut.len(),
        total.made_while_down,
        total.lost_while_down.len()
    );
    assert!(total.refused.is_empty(), "refused: {:?}", total.refused);
    assert!(total.made_while_down >= 8, "{total:?}");
    // A request whose connection the killed proxy had accepted is lost with it (at most one
    // per client and kill); every connection made while it was down waited and was served.
    assert!(total.cut.len() <= 8 * 3, "{:?}", total.cut);
    assert!(
        total.lost_while_down.is_empty(),
        "{:?}",
        total.lost_while_down
    );
    assert_eq!(app.served().await, version);
}

fn proxy_pid(app: &crate::common::TestApp) -> i32 {
    std::fs::read_to_string(app.data_dir().join("proxy.pid"))
        .expect("a proxy process runs")
        .trim()
        .parse()
        .unwrap()
}

/// `nonstop proxy --upgrade`: the binary on disk takes the listening sockets; the old
/// process finishes its requests and keeps its WebSockets for the drain window.
#[tokio::test]
async fn three_upgrades_of_the_proxy_in_place_under_load_fail_no_request() {
    let app = spawn_app_with(Extra {
        app: "drain_timeout_secs = 3".into(),
        ..Extra::default()
    })
    .await;
    let first = app.deploy(&app.repo.commit("Before the upgrades")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let talkers = open_talkers(&app, &first, &stop, 3).await;
    let load = Load::start(
        format!("{}/", app.proxy()),
        8,
        100_000,
        Duration::from_secs(300),
    );
    load.wait_sent(200).await;

    let mut pids = vec![proxy_pid(&app)];
    let mut first_upgrade_at = None;
    for _ in 0..3 {
        let at = crate::drain::now_ms();
        first_upgrade_at.get_or_insert(at);
        let out = app.cli(&["proxy", "--upgrade"]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = proxy_pid(&app);
        assert_eq!(
            said.trim(),
            format!(
                "upgraded the proxy process: pid {} -> pid {pid}",
                pids.last().unwrap()
            )
        );
        pids.push(pid);
        let sent = load.sent.load(Ordering::Relaxed);
        load.wait_sent(sent + 300).await;
    }
    // The upgraded proxy still takes switches from serve.
    let last = app.deploy(&app.repo.commit("After the upgrades")).await;
    let sent = load.sent.load(Ordering::Relaxed);
    load.wait_sent(sent + 200).await;
    let report = load.finish().await;

    println!(
        "load: {} ok, {} failed over 3 upgrades (pids {pids:?}), by version: {:?}",
        report.ok, report.failed, report.bodies
    );
    report.assert_none_failed();
    assert_eq!(app.served().await, last);
    // The WebSockets sat on the first process: answered until its drain window was over.
    let first_upgrade_at = first_upgrade_at.unwrap();
    for talker in talkers {
        let talked = tokio::time::timeout(Duration::from_secs(60), talker)
            .await
            .expect("closed when the old process left")
            .unwrap();
        assert_eq!(talked.wrong_version, None, "{talked:?}");
        let closed_at = talked.closed_at.expect("closed when the old process left");
        assert!(
            closed_at >= first_upgrade_at + 3_000,
            "closed {} ms after the upgrade: {talked:?}",
            closed_at - first_upgrade_at
        );
    }
    stop.store(true, Ordering::Relaxed);
    // And the old processes are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for pid in &pids[..3] {
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        {
            assert!(std::time::Instant::now() < deadline, "pid {pid} still runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The real tool: `systemd-socket-activate` (Debian's `systemd` package, installed by
/// scripts/test) listens, and on the first connection starts `nonstop proxy` with the socket
/// as systemd passes it. That connection is served by the proxy it started.
#[tokio::test]
async fn systemd_socket_activate_starts_the_proxy_on_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::ports::unique_port();
    let config = dir.path().join("nonstop.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
data_dir = "data"

[[app]]
name = "hello"
repo = "unused"
build = "true"
artifact = "hello"
run = "{{artifact}} --port {{port}}"
switch = {{ kind = "proxy", listen = "127.0.0.1:{port}" }}
"#
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("activate.log")).unwrap();
    let mut activate = std::process::Command::new("systemd-socket-activate")
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--fdname=hello")
        .arg(env!("CARGO_BIN_EXE_nonstop"))
        .arg("--config")
        .arg(&config)
        .arg("proxy")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate (Debian's systemd package; scripts/test installs it)");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let answer = loop {
        // Refused only until the tool listens; from then on the connection waits for the
        // proxy it starts.
        match reqwest::get(format!("http://127.0.0.1:{port}/")).await {
            Ok(answer) => break answer,
            Err(err) => {
                assert!(std::time::Instant::now() < deadline, "{err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let status = answer.status();
    let body = answer.text().await.unwrap();
    let log = std::fs::read_to_string(dir.path().join("activate.log")).unwrap_or_default();
    let _ = activate.kill();
    let _ = activate.wait();
    // Nothing is live yet: the proxy itself answers, on the passed socket.
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (503, "nonstop: no live instance\n"),
        "{log}"
    );
    assert!(
        log.contains("listening on the sockets passed to this process"),
        "{log}"
    );
}

/// One process stays possible: with `proxy_process = false` the proxies run inside
/// `serve`, no proxy process is started, and they stop with it.
#[tokio::test]
async fn with_proxy_process_false_the_proxies_live_and_die_with_serve() {
    let mut app = spawn_app_with(Extra {
        server: "proxy_process = false".into(),
        ..Extra::default()
    })
    .await;
    let version = app.deploy(&app.repo.commit("One process")).await;
    assert_eq!(app.served().await, version);
    assert!(!app.data_dir().join("proxy.pid").exists());
    assert!(!app.data_dir().join("proxy.sock").exists());

    let stopped = app.stop_with(libc::SIGTERM, Duration::from_secs(30));
    assert!(stopped.is_some_and(|(status, _)| status.success()));
    crate::common::wait_port_closed(app.ports.proxy, "the proxy inside the stopped serve").await;
}
