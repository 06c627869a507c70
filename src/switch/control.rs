//! The proxy's control socket, for a proxy that outlives `nonstop serve`. `nonstop proxy`
//! runs every app's built-in proxy in its own process and takes switch commands on a Unix
//! socket; `serve` drives it through [`RemoteProxy`], so restarting or upgrading `serve`
//! never closes a client connection. The protocol is one JSON line each way per
//! connection. The live ports are also kept in a state file beside the socket, so the proxy
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
use super::{OpenOn, SwitchError, TrafficSwitch};

/// A control command takes microseconds; a hung proxy process is a broken host.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// What a proxy process answers a switch once it has handed over to the next one: the
/// next one, now on the socket, takes it (`RemoteProxy` asks again).
const HANDED_OVER: &str = "this proxy process handed over to the next one";

/// Switches are applied one at a time, so the state file always matches the proxies; an
/// upgrade holds the same lock from the moment the next process reads that file until it
/// owns the socket, and then marks this process handed over (`true`).
pub type SwitchOrder = Arc<tokio::sync::Mutex<bool>>;

/// A request is one short JSON line; anything longer is not from `serve`.
const MAX_REQUEST_BYTES: u64 = 4096;

/// One app's proxy in the proxy process, and the two ports it may be pointed at.
pub struct Controlled {
    pub proxy: Arc<Proxy>,
    pub ports: [u16; 2],
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Request {
    pub app: String,
    /// `None`: only ask which port is live.
    pub switch_to: Option<u16>,
    /// End what is still open on this port (not the live one).
    #[serde(default)]
    pub cut: Option<u16>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    pub live: Option<u16>,
    pub error: Option<String>,
    /// What is open on each port, after the command (a proxy process older than this field
    /// sends none).
    #[serde(default)]
    pub connections: Vec<OpenOn>,
    /// How much a `cut` ended.
    #[serde(default)]
    pub cut: Option<usize>,
    /// Where the app's proxy listens (its bound address, when the config says port 0).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// `serve`'s handle on one app's proxy in the `nonstop proxy` process.
pub struct RemoteProxy {
    socket: PathBuf,
    app: String,
    /// The last live port the proxy process reported (0: none), so `live()` needs no I/O.
    live: AtomicU32,
    /// Where the app's proxy listens, as the proxy process said at `connect`.
    listen: Option<std::net::SocketAddr>,
}

impl RemoteProxy {
    /// Connects to the proxy process and learns the app's live port; when the proxy
    /// process has none yet (its first start), it is told `recorded`.
    pub async fn connect(
        socket: PathBuf,
        app: String,
        recorded: Option<u16>,
    ) -> Result<Self, SwitchError> {
        let mut remote = Self {
            socket,
            app,
            live: AtomicU32::new(0),
            listen: None,
        };
        let answer = remote.ask(Request::default()).await?;
        remote.listen = answer.listen;
        let live = answer.live;
        remote.remember(live);
        if let (None, Some(port)) = (live, recorded) {
            remote.switch_to(port).await?;
        }
        Ok(remote)
    }

    /// Where the app's proxy listens.
    pub fn listen(&self) -> Option<std::net::SocketAddr> {
        self.listen
    }

    fn remember(&self, live: Option<u16>) {
        self.live
            .store(live.map(u32::from).unwrap_or(0), Ordering::SeqCst);
    }

    async fn ask(&self, mut request: Request) -> Result<Answer, SwitchError> {
        request.app = self.app.clone();
        let started = std::time::Instant::now();
        loop {
            match self.ask_once(&request).await {
                // Mid-upgrade: the socket leads to the next process in a moment.
                Err(SwitchError::Rejected(error))
                    if error == HANDED_OVER && started.elapsed() < CONTROL_TIMEOUT =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                answer => return answer,
            }
        }
    }

    async fn ask_once(&self, request: &Request) -> Result<Answer, SwitchError> {
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket).await?;
            let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
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

#[async_trait]
impl TrafficSwitch for RemoteProxy {
    fn live(&self) -> Option<u16> {
        u16::try_from(self.live.load(Ordering::SeqCst))
            .ok()
            .filter(|p| *p != 0)
    }

    async fn switch_to(&self, port: u16) -> Result<(), SwitchError> {
        let switch = Request {
            switch_to: Some(port),
            ..Request::default()
        };
        match self.ask(switch).await {
            Ok(answer) => {
                self.remember(answer.live);
                Ok(())
            }
            // The answer may be what was lost (a timeout while the proxy process saved its
            // state): ask where traffic is before calling the switch failed.
            Err(err) => match self.ask(Request::default()).await.map(|a| a.live) {
                Ok(live) => {
                    self.remember(live);
                    if live == Some(port) { Ok(()) } else { Err(err) }
                }
                Err(_) => Err(err),
            },
        }
    }

    async fn open_connections(&self) -> Result<Vec<OpenOn>, SwitchError> {
        let answer = self.ask(Request::default()).await?;
        self.remember(answer.live);
        Ok(answer.connections)
    }

    async fn cut(&self, port: u16) -> Result<usize, SwitchError> {
        let cut = Request {
            cut: Some(port),
            ..Request::default()
        };
        Ok(self.ask(cut).await?.cut.unwrap_or(0))
    }
}

/// Where the proxy process keeps its live ports between its own restarts.
pub fn state_file(socket: &Path) -> PathBuf {
    socket.with_extension("state.json")
}

/// Where the proxy process writes its pid while it runs (`proxy.pid` beside the socket).
pub fn pid_file(socket: &Path) -> PathBuf {
    socket.with_extension("pid")
}

/// How long a proxy process started by `serve` gets to open its control socket.
const PROXY_START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long `nonstop proxy --stop` waits for the proxy process to exit before SIGKILL.
const PROXY_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a proxy process answers on `socket` (it runs and takes commands).
pub async fn answers(socket: &Path) -> bool {
    let question = async {
        let mut stream = UnixStream::connect(socket).await?;
        // Names no app: the answer says so, which is all this needs.
        stream.write_all(b"{\"app\":\"\"}\n").await?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).await?;
        Ok::<_, std::io::Error>(!answer.is_empty())
    };
    matches!(
        tokio::time::timeout(CONTROL_TIMEOUT, question).await,
        Ok(Ok(true))
    )
}

/// Makes sure a proxy process answers on `socket`: the one still running from before (a
/// restart of `serve` takes it over), else a new `nonstop proxy` on `config_file`, started
/// detached (a session of its own, so no signal meant for `serve` reaches it; nothing of
/// `serve`'s environment but the base allow-list and `RUST_LOG`), writing its log to `log`.
pub async fn attach_or_start(
    socket: &Path,
    config_file: &Path,
    log: &Path,
) -> Result<(), SwitchError> {
    if answers(socket).await {
        tracing::info!(socket = %socket.display(), "taking over the running proxy process");
        return Ok(());
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = crate::process::ChildEnv::base()
        .inherit(&["RUST_LOG"])
        .command(binary_on_disk()?);
    command
        .arg("proxy")
        .arg("--config")
        .arg(config_file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file);
    // SAFETY: setsid is async-signal-safe and only changes the child's own session; nothing
    // else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    // Dropped without a kill: it is meant to outlive this process (tokio reaps it if it
    // exits first).
    let mut child = command.spawn()?;
    let started = std::time::Instant::now();
    loop {
        if answers(socket).await {
            tracing::info!(pid = child.id(), socket = %socket.display(), "started the proxy process");
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(SwitchError::Rejected(format!(
                "the proxy process exited ({status}) before it opened {}; its log is {}",
                socket.display(),
                log.display()
            )));
        }
        if started.elapsed() > PROXY_START_TIMEOUT {
            return Err(SwitchError::Rejected(format!(
                "the proxy process did not open {} in {PROXY_START_TIMEOUT:?}; its log is {}",
                socket.display(),
                log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long the next proxy process gets to take over (open the control socket) in an
/// upgrade, and how long `nonstop proxy --upgrade` waits for that.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// An upgrade in place (SIGUSR2): starts the binary now on disk as the next proxy process,
/// handing it every app's listening sockets (one per worker) as systemd would
/// (`LISTEN_FDS`, `LISTEN_FDNAMES` = the app's name), and waits until it has taken over the
/// control socket and the pid file. Its pid, or why not (this process then keeps serving).
pub async fn hand_over(
    config_file: &Path,
    proxies: &[(String, Arc<Proxy>)],
    socket: &Path,
    order: &tokio::sync::Mutex<bool>,
) -> Result<u32, SwitchError> {
    // No switch lands here while the next process reads the live ports, nor after.
    let mut handed_over = order.lock().await;
    let (mut fds, mut names) = (Vec::new(), Vec::new());
    for (app, proxy) in proxies {
        for fd in proxy.listening_fds() {
            fds.push(fd);
            names.push(app.clone());
        }
    }
    let count = fds.len() as libc::c_int;
    let mut command = crate::process::ChildEnv::base()
        .inherit(&["RUST_LOG"])
        .command("sh");
    // `$$` is the shell's pid, which `exec` hands to nonstop: what LISTEN_PID must name.
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" proxy --config \"$1\"")
        .arg(binary_on_disk()?)
        .arg(config_file)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls (setsid, fcntl, dup2, close) on fds this process
    // owns, in the child between fork and exec. Each socket is first copied above the range
    // 3..3+count, so that putting it in place never overwrites one not yet moved.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            let mut above = Vec::with_capacity(fds.len());
            for fd in &fds {
                let copy = libc::fcntl(*fd, libc::F_DUPFD, 3 + count);
                if copy == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                above.push(copy);
            }
            for (index, copy) in above.into_iter().enumerate() {
                if libc::dup2(copy, 3 + index as libc::c_int) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(copy);
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let next = child.id().unwrap_or(0);
    let started = std::time::Instant::now();
    loop {
        if running_pid(socket) == Some(next as i32) && answers(socket).await {
            *handed_over = true;
            return Ok(next);
        }
        if let Some(status) = child.try_wait()? {
            return Err(SwitchError::Rejected(format!(
                "the next proxy process exited ({status}) before it took over"
            )));
        }
        if started.elapsed() > HANDOVER_TIMEOUT {
            let _ = child.start_kill();
            return Err(SwitchError::Rejected(format!(
                "the next proxy process did not take over in {HANDOVER_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `nonstop proxy --upgrade`: SIGUSR2 to the running proxy process, then waits until the
/// next one took over. Returns (old pid, new pid); `None` when no proxy process runs.
pub async fn upgrade_process(socket: &Path) -> Result<Option<(i32, i32)>, SwitchError> {
    let Some(old) = running_pid(socket) else {
        return Ok(None);
    };
    // SAFETY: kill(2) on the pid of the proxy process, checked just above.
    unsafe { libc::kill(old, libc::SIGUSR2) };
    let started = std::time::Instant::now();
    loop {
        if let Some(new) = running_pid(socket).filter(|pid| *pid != old)
            && answers(socket).await
        {
            return Ok(Some((old, new)));
        }
        if started.elapsed() > HANDOVER_TIMEOUT + Duration::from_secs(5) {
            return Err(SwitchError::Rejected(format!(
                "no new proxy process took over in {HANDOVER_TIMEOUT:?}; pid {old} keeps serving (see its log)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This program's binary as it is on disk now: after an upgrade replaced the file, Linux
/// names the running one `<path> (deleted)`, and the new one at `<path>` is what to start.
fn binary_on_disk() -> std::io::Result<PathBuf> {
    let running = std::env::current_exe()?;
    let text = running.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => running,
    })
}

/// The pid in `socket`'s pid file, when that process still runs and is `nonstop proxy`
/// (a pid reused by another program is not it).
pub fn running_pid(socket: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(socket))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_proxy = cmdline.split(|b| *b == 0).any(|arg| arg == b"proxy");
    is_proxy.then_some(pid)
}

/// `nonstop proxy --stop`: SIGTERM to the running proxy process, SIGKILL when it is still
/// there after [`PROXY_STOP_TIMEOUT`]. Returns its pid, or `None` when none ran.
pub async fn stop_process(socket: &Path) -> std::io::Result<Option<i32>> {
    let Some(pid) = running_pid(socket) else {
        return Ok(None);
    };
    let gone = || running_pid(socket) != Some(pid);
    // SAFETY: kill(2) on the pid of the proxy process, checked just above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = std::time::Instant::now();
    while !gone() {
        if started.elapsed() > PROXY_STOP_TIMEOUT {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Some(pid))
}

/// Serves the control socket for `proxies` until `shutdown`. Only processes of this user may
/// talk to it: the socket is 0600 (in a 0700 folder when this makes the folder), and each
/// peer's uid is checked.
pub async fn serve_control(
    socket: PathBuf,
    proxies: HashMap<String, Controlled>,
    shutdown: CancellationToken,
    order: SwitchOrder,
    bound: impl FnOnce(),
) -> std::io::Result<()> {
    let listener = bind_private(&socket)?;
    bound();
    let proxies = Arc::new(proxies);
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
    order: &tokio::sync::Mutex<bool>,
    socket: &Path,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    (&mut reader)
        .take(MAX_REQUEST_BYTES)
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<Request>(&line) {
        Err(err) => Answer {
            error: Some(format!("malformed request: {err}")),
            ..Answer::default()
        },
        Ok(request) => match proxies.get(&request.app) {
            None => Answer {
                error: Some(format!("no proxy for app `{}`", request.app)),
                ..Answer::default()
            },
            Some(controlled) => command(&request, controlled, proxies, order, socket).await,
        },
    };
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    reader.get_mut().write_all(&out).await
}

/// Carries out one app's request: a switch, a cut, or neither (a question).
async fn command(
    request: &Request,
    Controlled { proxy, ports }: &Controlled,
    proxies: &HashMap<String, Controlled>,
    order: &tokio::sync::Mutex<bool>,
    socket: &Path,
) -> Answer {
    let refused = |error: String| Answer {
        live: proxy.live(),
        error: Some(error),
        connections: proxy.open_connections(),
        cut: None,
        listen: Some(proxy.local_addr()),
    };
    let mut cut = None;
    if let Some(port) = request.switch_to.or(request.cut)
        && !ports.contains(&port)
    {
        return refused(format!(
            "port {port} is not one of {}'s ports {ports:?}",
            request.app
        ));
    }
    if let Some(port) = request.switch_to {
        let handed_over = order.lock().await;
        if *handed_over {
            return refused(HANDED_OVER.into());
        }
        if let Err(err) = proxy.switch_to(port).await {
            return refused(err.to_string());
        }
        save_state(socket, proxies).await;
        tracing::info!(app = %request.app, port, "proxy switched");
    }
    if let Some(port) = request.cut {
        match proxy.cut(port) {
            Ok(ended) => cut = Some(ended),
            Err(err) => return refused(err.to_string()),
        }
    }
    Answer {
        live: proxy.live(),
        error: None,
        connections: proxy.open_connections(),
        cut,
        listen: Some(proxy.local_addr()),
    }
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
            SwitchOrder::default(),
            || {},
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
            remote.open_connections().await.unwrap(),
            [OpenOn::none(8082)]
        );
        assert_eq!(remote.cut(8081).await.unwrap(), 0);
        let err = remote.cut(8082).await.unwrap_err();
        assert!(err.to_string().contains("is live"), "{err}");
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
