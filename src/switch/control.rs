//! The proxy's control socket, for a proxy that outlives `nonstop serve`. `nonstop proxy`
//! runs every app's built-in proxy in its own process and takes switch commands on a Unix
//! socket; `serve` drives it through [`RemoteProxy`], so restarting or upgrading `serve`
//! never closes a client connection. The protocol is one JSON line each way per
//! connection; besides switching, `serve` asks it what each instance answered (`measure`),
//! about once a second. The live ports are also kept in a state file beside the socket, so the proxy
//! process itself restarts onto the same targets. This module never decides where traffic
//! goes: it only carries the decision.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::proxy::Proxy;
use super::{InstanceCounts, SwitchError, TrafficSwitch};

/// A control command takes microseconds; a hung proxy process is a broken host.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// A request is one short JSON line; anything longer is not from `serve`.
const MAX_REQUEST_BYTES: u64 = 4096;

/// One app's proxy in the proxy process, and the two ports it may be pointed at.
pub struct Controlled {
    pub proxy: Arc<Proxy>,
    pub ports: [u16; 2],
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub app: String,
    /// `None`: only ask which port is live.
    pub switch_to: Option<u16>,
    /// The version that runs on `switch_to`, for what the proxy measures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Also answer what each instance answered so far.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub measure: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub live: Option<u16>,
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Vec<InstanceCounts>>,
}

impl Answer {
    fn of(live: Option<u16>, error: Option<String>) -> Self {
        Self {
            live,
            error,
            measured: None,
        }
    }
}

/// `serve`'s handle on one app's proxy in the `nonstop proxy` process.
pub struct RemoteProxy {
    socket: PathBuf,
    app: String,
    /// The last live port the proxy process reported (0: none), so `live()` needs no I/O.
    live: AtomicU32,
}

impl RemoteProxy {
    /// Connects to the proxy process and learns the app's live port; when the proxy
    /// process has none yet (its first start), it is told `recorded`.
    pub async fn connect(
        socket: PathBuf,
        app: String,
        recorded: Option<u16>,
    ) -> Result<Self, SwitchError> {
        let remote = Self {
            socket,
            app,
            live: AtomicU32::new(0),
        };
        let live = remote.ask(Request::about(&remote.app)).await?.live;
        remote.remember(live);
        if let (None, Some(port)) = (live, recorded) {
            remote.switch_to(port).await?;
        }
        Ok(remote)
    }

    fn remember(&self, live: Option<u16>) {
        self.live
            .store(live.map(u32::from).unwrap_or(0), Ordering::SeqCst);
    }

    async fn ask(&self, request: Request) -> Result<Answer, SwitchError> {
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket).await?;
            let mut line = serde_json::to_vec(&request).map_err(std::io::Error::other)?;
            line.push(b'\n');
            stream.write_all(&line).await?;
            let mut answer = String::new();
            BufReader::new(stream).read_line(&mut answer).await?;
            serde_json::from_str::<Answer>(&answer).map_err(std::io::Error::other)
        };
        let answer = tokio::time::timeout(CONTROL_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                SwitchError::Rejected(format!(
                    "the proxy process at {} did not answer",
                    self.socket.display()
                ))
            })?
            .map_err(|err| {
                SwitchError::Rejected(format!(
                    "the proxy process at {}: {err}",
                    self.socket.display()
                ))
            })?;
        match answer.error {
            Some(error) => Err(SwitchError::Rejected(error)),
            None => Ok(answer),
        }
    }
}

impl Request {
    /// Asks only which port of `app` is live.
    fn about(app: &str) -> Self {
        Self {
            app: app.to_owned(),
            switch_to: None,
            version: None,
            measure: false,
        }
    }
}

#[async_trait]
impl TrafficSwitch for RemoteProxy {
    fn live(&self) -> Option<u16> {
        u16::try_from(self.live.load(Ordering::SeqCst))
            .ok()
            .filter(|p| *p != 0)
    }

    async fn switch_to(&self, port: u16) -> Result<(), SwitchError> {
        self.switch(port, None).await
    }

    async fn switch_to_version(&self, port: u16, version: &str) -> Result<(), SwitchError> {
        self.switch(port, Some(version.to_owned())).await
    }

    async fn measured(&self) -> Result<Vec<InstanceCounts>, SwitchError> {
        let request = Request {
            measure: true,
            ..Request::about(&self.app)
        };
        let answer = self.ask(request).await?;
        self.remember(answer.live);
        Ok(answer.measured.unwrap_or_default())
    }
}

impl RemoteProxy {
    async fn switch(&self, port: u16, version: Option<String>) -> Result<(), SwitchError> {
        let request = Request {
            switch_to: Some(port),
            version,
            ..Request::about(&self.app)
        };
        match self.ask(request).await {
            Ok(answer) => {
                self.remember(answer.live);
                Ok(())
            }
            // The answer may be what was lost (a timeout while the proxy process saved its
            // state): ask where traffic is before calling the switch failed.
            Err(err) => match self.ask(Request::about(&self.app)).await {
                Ok(Answer { live, .. }) => {
                    self.remember(live);
                    if live == Some(port) { Ok(()) } else { Err(err) }
                }
                Err(_) => Err(err),
            },
        }
    }
}

/// Where the proxy process keeps its live ports between its own restarts.
pub fn state_file(socket: &Path) -> PathBuf {
    socket.with_extension("state.json")
}

/// Serves the control socket for `proxies` until `shutdown`. Only processes of this user may
/// talk to it: the socket is 0600 (in a 0700 folder when this makes the folder), and each
/// peer's uid is checked.
pub async fn serve_control(
    socket: PathBuf,
    proxies: HashMap<String, Controlled>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = bind_private(&socket)?;
    let proxies = Arc::new(proxies);
    // Switches are applied one at a time so the state file always matches the proxies.
    let order = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = shutdown.cancelled() => return Ok(()),
        };
        if !same_user(&stream) {
            tracing::warn!(peer = ?stream.peer_cred().ok(), "refused a control connection from another user");
            continue;
        }
        let (proxies, order, socket) = (proxies.clone(), order.clone(), socket.clone());
        tokio::spawn(async move {
            let handled =
                tokio::time::timeout(CONTROL_TIMEOUT, handle(stream, &proxies, &order, &socket));
            match handled.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(error = %err, "control connection failed"),
                Err(_) => tracing::warn!("control connection sent no request in time"),
            }
        });
    }
}

/// Binds the control socket so that only this user can connect: the folder is made 0700
/// when missing, and the socket is bound under a umask that leaves it 0600.
fn bind_private(socket: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    // A socket file left by a killed proxy process would make bind fail.
    let _ = std::fs::remove_file(socket);
    // SAFETY: umask only swaps the process's file mode mask; it is put back at once, and
    // the proxy process binds this socket before it starts anything else that makes files.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(socket);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    bound
}

fn same_user(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    stream.peer_cred().is_ok_and(|peer| peer.uid() == me)
}

async fn handle(
    stream: UnixStream,
    proxies: &HashMap<String, Controlled>,
    order: &tokio::sync::Mutex<()>,
    socket: &Path,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    (&mut reader)
        .take(MAX_REQUEST_BYTES)
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<Request>(&line) {
        Err(err) => Answer::of(None, Some(format!("malformed request: {err}"))),
        Ok(request) => match proxies.get(&request.app) {
            None => Answer::of(None, Some(format!("no proxy for app `{}`", request.app))),
            Some(Controlled { proxy, ports }) => {
                let mut answer = match request.switch_to {
                    None => Answer::of(proxy.live(), None),
                    Some(port) if !ports.contains(&port) => Answer::of(
                        proxy.live(),
                        Some(format!(
                            "port {port} is not one of {}'s ports {ports:?}",
                            request.app
                        )),
                    ),
                    Some(port) => {
                        let _one_at_a_time = order.lock().await;
                        match proxy.switch_with_version(port, request.version.as_deref()) {
                            Ok(()) => {
                                save_state(socket, proxies).await;
                                tracing::info!(app = %request.app, port, "proxy switched");
                                Answer::of(Some(port), None)
                            }
                            Err(err) => Answer::of(proxy.live(), Some(err.to_string())),
                        }
                    }
                };
                if request.measure {
                    answer.measured = Some(proxy.readings());
                }
                answer
            }
        },
    };
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    reader.get_mut().write_all(&out).await
}

async fn save_state(socket: &Path, proxies: &HashMap<String, Controlled>) {
    let state: HashMap<&str, Option<u16>> = proxies
        .iter()
        .map(|(app, c)| (app.as_str(), c.proxy.live()))
        .collect();
    let path = state_file(socket);
    let temp = path.with_extension("tmp");
    let text = serde_json::to_string(&state).unwrap_or_default();
    let saved = async {
        tokio::fs::write(&temp, text).await?;
        tokio::fs::rename(&temp, &path).await
    };
    if let Err(err) = saved.await {
        tracing::error!(path = %path.display(), error = %err, "could not save the proxy state");
    }
}

/// The live ports saved by the last run of the proxy process.
pub fn load_state(socket: &Path) -> HashMap<String, u16> {
    std::fs::read_to_string(state_file(socket))
        .ok()
        .and_then(|text| serde_json::from_str::<HashMap<String, Option<u16>>>(&text).ok())
        .map(|state| {
            state
                .into_iter()
                .filter_map(|(app, port)| Some((app, port?)))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_remote_proxy_switches_the_proxy_process_and_its_state_survives() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("proxy.sock");
        let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_control(
            socket.clone(),
            HashMap::from([(
                "hello".to_owned(),
                Controlled {
                    proxy: proxy.clone(),
                    ports: [8081, 8082],
                },
            )]),
            shutdown.clone(),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(&socket).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the control socket never opened"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // First contact: the proxy process knows nothing, so it takes the recorded port.
        let remote = RemoteProxy::connect(socket.clone(), "hello".into(), Some(8081))
            .await
            .unwrap();
        assert_eq!((remote.live(), proxy.live()), (Some(8081), Some(8081)));
        remote.switch_to(8082).await.unwrap();
        assert_eq!((remote.live(), proxy.live()), (Some(8082), Some(8082)));
        assert_eq!(
            load_state(&socket),
            HashMap::from([("hello".to_owned(), 8082)])
        );

        // A second `serve` finds the proxy process's port, not its own stale record.
        let again = RemoteProxy::connect(socket.clone(), "hello".into(), Some(8081))
            .await
            .unwrap();
        assert_eq!(again.live(), Some(8082));

        let err = RemoteProxy::connect(socket.clone(), "nope".into(), None)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("no proxy for app `nope`"), "{err}");
        assert!(remote.switch_to(0).await.is_err());
        let err = remote.switch_to(22).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "port 22 is not one of hello's ports [8081, 8082]"
        );
        assert_eq!(proxy.live(), Some(8082), "a refused switch moves nothing");
        // A switch names its version, and the proxy's counts come back over the socket.
        remote.switch_to_version(8081, "v7").await.unwrap();
        assert_eq!(proxy.live(), Some(8081));
        let measured = remote.measured().await.unwrap();
        assert!(
            measured.iter().any(|c| c.port == 8081 && c.version == "v7"),
            "{measured:?}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

        // A request that never ends is cut at the cap and answered, not read forever.
        let mut flood = UnixStream::connect(&socket).await.unwrap();
        flood.write_all(&[b'x'; 64 * 1024]).await.ok();
        let mut answer = String::new();
        let mut reader = BufReader::new(flood);
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut answer));
        read.await.expect("answered in time").ok();
        assert!(answer.contains("malformed request"), "{answer:?}");

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
