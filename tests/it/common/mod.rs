//! Test helpers: a real `nonstop serve` process on loopback ports the kernel picks (port 0,
//! read back from what it prints) with its own data dir, a git repository of the example app
//! to push from, signed webhooks, polling with a deadline, and a bounded keep-alive load loop.

pub mod nginx;
pub mod ports;
pub mod recorder;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub use ports::unique_port;

pub const SECRET: &str = "test-webhook-secret";
pub const ADMIN_TOKEN: &str = "test-admin-token-of-at-least-32-bytes";
pub const REPOSITORY: &str = "acme/hello";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Test", "-c", "user.email=test@localhost"])
        // A test may hand the repository to another user (`build_as`).
        .args(["-c", "safe.directory=*"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A git repository holding the example app, to commit and push from.
pub struct Repo {
    pub path: PathBuf,
}

impl Repo {
    pub fn new(path: PathBuf) -> Self {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
        std::fs::create_dir_all(path.join("src")).unwrap();
        for file in ["Cargo.toml", ".gitignore", "src/main.rs"] {
            std::fs::copy(example.join(file), path.join(file)).unwrap();
        }
        git(&path, &["init", "--quiet", "-b", "main"]);
        let repo = Self { path };
        repo.commit_all("First version");
        repo
    }

    pub fn commit_all(&self, message: &str) -> String {
        git(&self.path, &["add", "--all"]);
        git(
            &self.path,
            &["commit", "--quiet", "--allow-empty", "-m", message],
        );
        git(&self.path, &["rev-parse", "HEAD"])
    }

    /// A new commit that changes nothing the build sees (a new version all the same).
    pub fn commit(&self, message: &str) -> String {
        std::fs::write(self.path.join("NOTES"), message).unwrap();
        self.commit_all(message)
    }

    /// A commit whose build never passes its health check.
    pub fn commit_unhealthy(&self) -> String {
        let main = self.path.join("src/main.rs");
        let source = std::fs::read_to_string(&main).unwrap();
        let broken = source.replace(
            "const HEALTHY: bool = true;",
            "const HEALTHY: bool = false;",
        );
        assert_ne!(
            source, broken,
            "the example app no longer has the HEALTHY switch"
        );
        std::fs::write(&main, broken).unwrap();
        self.commit_all("Break the health check")
    }
}

/// Where a test's processes listen. `server` and a built-in `proxy` are 0 until the process
/// that binds them said where it did; `proxy` is a `unique_port` when something else (nginx)
/// listens there; the app's two instance ports are always `unique_port`s.
pub struct Ports {
    pub server: u16,
    pub proxy: u16,
    pub app: [u16; 2],
}

/// What `nonstop serve` or `nonstop proxy` printed on stdout about its listeners.
#[derive(Debug)]
enum Announced {
    Server(SocketAddr),
    Proxy { app: String, addr: SocketAddr },
}

impl Announced {
    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("nonstop: ")?;
        if let Some(addr) = rest.strip_prefix("listening on ") {
            return Some(Self::Server(addr.parse().ok()?));
        }
        let (app, addr) = rest.strip_prefix("proxy ")?.split_once(" on ")?;
        Some(Self::Proxy {
            app: app.to_owned(),
            addr: addr.parse().ok()?,
        })
    }
}

/// Copies a child's stdout into `log` on a thread of its own (so the child never blocks on
/// a full pipe) and sends each address it announces.
fn read_announcements(stdout: ChildStdout, log: PathBuf) -> mpsc::Receiver<Announced> {
    let (sender, announced) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = writeln!(log, "{line}");
            if let Some(announcement) = Announced::parse(&line) {
                // The test may have stopped listening; the copy to the log goes on.
                let _ = sender.send(announcement);
            }
        }
    });
    announced
}

/// Waits (at most 30 s) until `child` announced its server address, or with `proxy_only`
/// its proxy for the app `hello`; returns the server's and the proxy's ports as announced.
async fn wait_announced(
    child: &mut Child,
    announced: &mpsc::Receiver<Announced>,
    proxy_only: bool,
    log: &Path,
) -> (Option<u16>, Option<u16>) {
    let (mut server, mut proxy) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        while let Ok(announcement) = announced.try_recv() {
            match announcement {
                Announced::Server(addr) => server = Some(addr.port()),
                Announced::Proxy { app, addr } if app == "hello" => proxy = Some(addr.port()),
                Announced::Proxy { .. } => {}
            }
        }
        if server.is_some() || (proxy_only && proxy.is_some()) {
            return (server, proxy);
        }
        let log = || std::fs::read_to_string(log).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "nonstop exited ({status}) before it said where it listens:\n{}",
                log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "nonstop did not say where it listens in 30 s:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The stage `name` of a deployment as `/api/deployments/{id}` answers it; `Null` when it
/// has no such stage.
pub fn stage(deployment: &Value, name: &str) -> Value {
    deployment["stages"]
        .as_array()
        .and_then(|stages| stages.iter().find(|s| s["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// A proptest runner whose cases are the same on every run (a fixed seed), that shrinks a
/// failure to its smallest case and writes nothing to disk.
pub fn deterministic_runner(cases: u32) -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

/// Sends `request` from a property (synchronous code) on `runtime`: the status and the body
/// as text, or a failed case when nothing answered.
pub fn send_from_property(
    runtime: &tokio::runtime::Runtime,
    request: reqwest::RequestBuilder,
) -> Result<(u16, String), proptest::test_runner::TestCaseError> {
    runtime
        .block_on(async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            Ok::<_, reqwest::Error>((status, response.text().await?))
        })
        .map_err(|err| proptest::test_runner::TestCaseError::fail(format!("no answer: {err}")))
}

/// Polls until nothing answers HTTP on `port` (at most 30 s); `what` says what should have
/// stopped, for the failure message.
pub async fn wait_port_closed(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://127.0.0.1:{port}/"))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "{what} still answers on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `nonstop serve` with its own folder, config and repository.
pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub repo: Repo,
    pub ports: Ports,
    pub http: reqwest::Client,
    server: Option<Child>,
    /// `nonstop proxy`, when the proxies run apart from the server.
    proxy_process: Option<Child>,
    /// The proxy's listening socket, held by the test as systemd holds a socket unit's
    /// (`Extra::socket_activated`).
    activation_socket: Option<std::net::TcpListener>,
    /// What the test added to the config, kept to write it again once the ports are known.
    extra: Extra,
}

impl TestApp {
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.server)
    }

    pub fn proxy(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.proxy)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir().join("nonstop.db")
    }

    /// Where the proxy process's control socket is, relative to the test's folder.
    pub fn proxy_socket(&self) -> &'static str {
        self.extra.proxy_socket.unwrap_or("proxy.sock")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nonstop.toml")
    }

    /// Writes the config with the ports as far as they are known: 0 for a listener whose
    /// process has not yet said where it listens, the bound port once it has (so the CLI, and
    /// a restarted server, find the same addresses as a real deployment's config would say).
    fn write_config(&self) {
        let extra = &self.extra;
        let ports = &self.ports;
        let config = format!(
            r#"[server]
listen = "127.0.0.1:{server}"
data_dir = "data"
{proxy_socket}
{extra_server}

[[app]]
name = "hello"
repo = "{repo}"
repository = "{REPOSITORY}"
branch = "main"
webhook_secret_env = "NONSTOP_TEST_SECRET"
build = "{build}"
artifact = "target/release/hello"
version = "1.0.1-SNAPSHOT-{{timestamp}}"
run = "{run}"
ports = [{a}, {b}]
profiles = ["real1", "real2"]
health = {{ path = "/profile", attempts = 40, interval_ms = 100 }}
hook_timeout_secs = 60
{switch}
{extra_app}
{extra_tables}"#,
            repo = extra.repo.unwrap_or("hello-repo"),
            build = extra
                .build
                .as_deref()
                .unwrap_or("cargo build --release --target-dir target")
                .replace('\\', "\\\\")
                .replace('"', "\\\""),
            run = extra
                .run
                .as_deref()
                .unwrap_or("{artifact} --port {port} --profile {profile}")
                .replace('\\', "\\\\")
                .replace('"', "\\\""),
            extra_server = extra.server,
            extra_app = extra.app,
            extra_tables = extra.tables,
            server = ports.server,
            proxy_socket = if extra.proxy_process {
                format!("proxy_socket = \"{}\"", self.proxy_socket())
            } else {
                String::new()
            },
            switch = match extra.switch {
                Some(switch) => switch(ports, self.dir.path()),
                None => format!(
                    "switch = {{ kind = \"proxy\", listen = \"127.0.0.1:{}\" }}",
                    ports.proxy
                ),
            },
            a = ports.app[0],
            b = ports.app[1],
        );
        std::fs::write(self.config_path(), config).unwrap();
    }

    /// Starts `nonstop serve` and waits until it said where it listens; takes those ports.
    async fn start_server(&mut self) {
        let log_path = self.dir.path().join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let bin = env!("CARGO_BIN_EXE_nonstop");
        let mut command = if self.extra.capless {
            // As root, a process without capabilities: what any other process of nonstop's
            // user is, towards it. Another user has none to drop.
            let mut command = Command::new("setpriv");
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                command.args(["--bounding-set=-all", "--inh-caps=-all"]);
            }
            command.arg(bin);
            command
        } else if self.extra.tmpfs.is_empty() {
            Command::new(bin)
        } else {
            // A mount namespace of its own, so the small filesystems go away with the server.
            let mounts: String = self
                .extra
                .tmpfs
                .iter()
                .map(|(dir, size)| {
                    let dir = self.dir.path().join(dir);
                    format!(
                        "mkdir -p '{d}' && mount -t tmpfs -o size={size} tmpfs '{d}' && ",
                        d = dir.display()
                    )
                })
                .collect();
            let mut command = Command::new("unshare");
            command
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(format!("{mounts}exec \"$@\""))
                .args(["sh", bin]);
            command
        };
        if let Some((soft, hard)) = self.extra.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child being
            // started; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .env("NONSTOP_TEST_SECRET", SECRET)
            .env("NONSTOP_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .envs(self.extra.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let announced = read_announcements(child.stdout.take().unwrap(), log_path.clone());
        let (server, proxy) = wait_announced(&mut child, &announced, false, &log_path).await;
        self.server = Some(child);
        self.ports.server = server.expect("the server announced its address");
        if let Some(proxy) = proxy {
            self.ports.proxy = proxy;
        }
    }

    /// Waits until the server answers `/healthz`.
    pub async fn wait_ready(&mut self) {
        let url = format!("{}/healthz", self.base());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = self.http.get(&url).send().await
                && response.status().is_success()
            {
                return;
            }
            if let Some(status) = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "nonstop exited ({status}) before it was ready:\n{}",
                    self.server_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nonstop not ready in 30 s:\n{}",
                self.server_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs the `nonstop` CLI against this server (its config, the admin token).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_nonstop"))
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env("NONSTOP_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap()
    }

    /// `cli`, started and left running: its output is piped, for `wait_with_output`.
    pub fn cli_started(&self, args: &[&str]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_nonstop"))
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env("NONSTOP_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `path` as the server sees it, its own mounts included (see `Extra::tmpfs`).
    pub fn as_server_sees(&self, path: &Path) -> PathBuf {
        let pid = self.server.as_ref().expect("the server runs").id();
        PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap())
    }

    /// Fills the filesystem that holds `dir` (a path inside the test's folder, as the server
    /// sees it) until the kernel answers ENOSPC; returns the filler file to remove later.
    pub fn fill_disk(&self, dir: &Path) -> PathBuf {
        use std::io::Write;
        let filler = self.as_server_sees(dir).join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let full = loop {
            if let Err(err) = file.write_all(&chunk).and_then(|()| file.sync_data()) {
                break err;
            }
        };
        assert_eq!(
            full.raw_os_error(),
            Some(libc::ENOSPC),
            "filling {}: {full}",
            dir.display()
        );
        filler
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Replaces the lines added to the `[[app]]` table and restarts the server (SIGTERM, so
    /// nothing is cut short) to read them.
    pub async fn set_app_config(&mut self, lines: &str) {
        self.extra.app = lines.to_owned();
        self.write_config();
        self.restart_with(libc::SIGTERM).await;
    }

    /// Stops the server the hard way (SIGKILL) and starts it again on the same folder.
    pub async fn restart(&mut self) {
        self.restart_with(libc::SIGKILL).await;
    }

    /// Stops the server with `signal`, waits until it is gone, and starts it again on the
    /// same addresses.
    pub async fn restart_with(&mut self, signal: i32) {
        let stopped = self.stop_with(signal, Duration::from_secs(60));
        assert!(stopped.is_some(), "the server did not stop in 60 s");
        self.start_again().await;
    }

    /// Sends `signal` to the server and waits for it to exit, at most `deadline`; returns
    /// its exit status and how long it took, or `None` (and kills it) when it outlived the
    /// deadline.
    pub fn stop_with(
        &mut self,
        signal: i32,
        deadline: Duration,
    ) -> Option<(std::process::ExitStatus, Duration)> {
        let mut child = self.server.take()?;
        let started = Instant::now();
        // SAFETY: kill(2) on the server process this helper started.
        unsafe { libc::kill(child.id() as i32, signal) };
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some((status, started.elapsed()));
            }
            if started.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again after `stop_with`, on the same addresses.
    pub async fn start_again(&mut self) {
        let (server, proxy) = (self.ports.server, self.ports.proxy);
        self.start_server().await;
        assert_eq!(
            (self.ports.server, self.ports.proxy),
            (server, proxy),
            "the restarted server listens where the config says"
        );
        self.wait_ready().await;
    }

    /// Runs `nonstop serve` on this app's config (no server may be running) with `env` on
    /// top of the usual, for a start that must be refused: waits at most 30 s for it to
    /// exit; returns its exit status and what it wrote on stderr.
    pub fn serve_refused(&self, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
        assert!(self.server.is_none(), "stop the server first");
        let stderr = self.dir.path().join("refused.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_nonstop"))
            .arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .env("NONSTOP_TEST_SECRET", SECRET)
            .env("NONSTOP_ADMIN_TOKEN", ADMIN_TOKEN)
            .envs(self.extra.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "nonstop serve was not refused in 30 s:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (status, std::fs::read_to_string(&stderr).unwrap_or_default())
    }

    /// The running server's process id.
    pub fn server_pid(&self) -> u32 {
        self.server.as_ref().expect("the server runs").id()
    }

    /// A memory figure of the server from `/proc/<pid>/status` in KiB: `VmRSS` (now) or
    /// `VmHWM` (the peak resident set since it started).
    pub fn server_memory_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.server_pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status:\n{status}"))
    }

    /// Starts `nonstop proxy` and waits until it said where the proxy listens and opened
    /// its control socket.
    async fn start_proxy_process(&mut self) {
        let log_path = self.dir.path().join("proxy.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_nonstop"));
        if self.extra.socket_activated {
            if self.activation_socket.is_none() {
                let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                self.ports.proxy = socket.local_addr().unwrap().port();
                self.activation_socket = Some(socket);
                self.write_config();
            }
            let fd = std::os::fd::AsRawFd::as_raw_fd(self.activation_socket.as_ref().unwrap());
            // `$$` is the shell's pid, which `exec` hands to nonstop: what LISTEN_PID must name.
            command = Command::new("sh");
            command.arg("-c").arg(
                "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=hello exec \"$0\" proxy --config \"$1\"",
            );
            command.arg(env!("CARGO_BIN_EXE_nonstop"));
            use std::os::unix::process::CommandExt;
            // SAFETY: dup2 is async-signal-safe; it puts the listening socket at fd 3 (and,
            // unlike the original, without close-on-exec) in the child only.
            unsafe {
                command.pre_exec(move || {
                    if libc::dup2(fd, 3) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        } else {
            command.arg("proxy").arg("--config");
        }
        let mut child = command
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let announced = read_announcements(child.stdout.take().unwrap(), log_path.clone());
        let (_, proxy) = wait_announced(&mut child, &announced, true, &log_path).await;
        self.proxy_process = Some(child);
        self.ports.proxy = proxy.expect("the proxy process announced its address");
        let socket = self.dir.path().join(self.proxy_socket());
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "nonstop proxy did not open {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the `nonstop proxy` process the test started and waits until it is gone.
    pub fn kill_proxy_process(&mut self) {
        let mut child = self.proxy_process.take().expect("a proxy process runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts `nonstop proxy` again after `kill_proxy_process` (on the same held socket
    /// when socket-activated).
    pub async fn start_proxy_process_again(&mut self) {
        self.start_proxy_process().await;
    }

    /// Sends a signed GitHub webhook as JSON; returns the status and JSON body.
    pub async fn webhook(
        &self,
        event: &str,
        delivery: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> (u16, Value) {
        self.webhook_as(Some("application/json"), event, delivery, body, signature)
            .await
    }

    /// Sends a GitHub webhook whose body is already in `content_type`'s form (none: no
    /// `Content-Type` header); returns the status and JSON body.
    pub async fn webhook_as(
        &self,
        content_type: Option<&str>,
        event: &str,
        delivery: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/hooks/github", self.base()))
            .header("X-GitHub-Event", event)
            .header("X-GitHub-Delivery", delivery)
            .body(body.to_vec());
        if let Some(content_type) = content_type {
            request = request.header("Content-Type", content_type);
        }
        if let Some(signature) = signature {
            request = request.header("X-Hub-Signature-256", signature);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// A push of `sha` to `branch`, signed with the right secret; returns the deployment id.
    pub async fn push(&self, sha: &str) -> i64 {
        let body = push_payload("refs/heads/main", sha, REPOSITORY);
        let (status, answer) = self
            .webhook(
                "push",
                &format!("delivery-{sha}"),
                &body,
                Some(&sign(&body)),
            )
            .await;
        assert_eq!(status, 202, "push not accepted: {answer}");
        answer["deployment_id"].as_i64().expect("a deployment id")
    }

    /// Logs in through the form; returns the session cookie and the page's CSRF token.
    pub async fn log_in(&self) -> (String, String) {
        self.log_in_with(ADMIN_TOKEN).await
    }

    /// Logs in through the form with `token`; returns the session cookie and the page's
    /// CSRF token.
    pub async fn log_in_with(&self, token: &str) -> (String, String) {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let response = client
            .post(format!("{}/login", self.base()))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 303);
        let set_cookie = response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
            "{set_cookie}"
        );
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        let page = client
            .get(format!("{}/", self.base()))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let csrf = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a logged-in page carries a CSRF token")
            .to_owned();
        (cookie, csrf)
    }

    /// GETs a page of the server with the admin token (reading needs it, as
    /// `server.public_read` is off); returns the status and the body as text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// GETs `path` as a stranger would: no token, no login, and a redirect is the answer
    /// (not followed).
    pub async fn get_as_stranger(&self, path: &str) -> reqwest::Response {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .get(format!("{}{path}", self.base()))
            .send()
            .await
            .unwrap()
    }

    /// GETs a JSON answer with the admin token; `Null` when the body is not JSON.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.get_text(path).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Polls the deployment until it is finished; returns it with its stages.
    pub async fn wait_finished(&self, id: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let (_, body) = self.get_json(&format!("/api/deployments/{id}")).await;
            let status = body["deployment"]["status"].as_str().unwrap_or("");
            if !["", "queued", "running"].contains(&status) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "deployment {id} still {status} after 180 s: {body:#}\n{}",
                self.server_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pushes `sha`, waits, and asserts the deployment succeeded; returns its version.
    pub async fn deploy(&self, sha: &str) -> String {
        let id = self.push(sha).await;
        let done = self.wait_finished(id).await;
        assert_eq!(
            done["deployment"]["status"], "succeeded",
            "deployment failed: {done:#}"
        );
        done["deployment"]["version"].as_str().unwrap().to_owned()
    }

    /// What the proxy serves at `/` now (the live version).
    pub async fn served(&self) -> String {
        let response = self
            .http
            .get(format!("{}/", self.proxy()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap().trim().to_owned()
    }

    /// Polls until the proxy serves `version` (nginx applies a reload a little later).
    /// A poll that fails is polled again: an nginx reload closes idle keep-alive connections,
    /// and one may be reused just then; the built-in proxy's drops are counted by `Load`.
    pub async fn wait_served(&self, version: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = match self.http.get(format!("{}/", self.proxy())).send().await {
                Ok(response) if response.status() == 200 => match response.text().await {
                    Ok(text) => text.trim().to_owned(),
                    Err(err) => format!("(body failed: {err})"),
                },
                Ok(response) => format!("(status {})", response.status()),
                Err(err) => format!("(request failed: {err})"),
            };
            if now == version {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still serving {now}, not {version}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Counts rows of `table` in the real SQLite file.
    pub fn count_rows(&self, table: &str) -> i64 {
        let conn = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .unwrap()
    }

    /// Asserts SQLite finds the real database file sound (`PRAGMA integrity_check`).
    pub fn assert_database_intact(&self) {
        let conn = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let verdict: String = conn
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(verdict, "ok", "the database file is damaged");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        for mut child in [self.server.take(), self.proxy_process.take()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        // So is the proxy process `serve` starts (it outlives `serve`): stop it by its pid file.
        for pid_file in [
            self.data_dir().join("proxy.pid"),
            self.dir
                .path()
                .join(self.proxy_socket())
                .with_extension("pid"),
        ] {
            if let Ok(pid) = std::fs::read_to_string(pid_file)
                .unwrap_or_default()
                .trim()
                .parse::<i32>()
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == b"proxy"))
            {
                // SAFETY: kill(2) on the proxy process this test's server started.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        // The app instances are detached on purpose (they outlive nonstop): stop them here.
        let run_dir = self.data_dir().join("apps/hello/run");
        for entry in std::fs::read_dir(run_dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "pid")
                && let Ok(pid) = std::fs::read_to_string(entry.path())
                    .unwrap_or_default()
                    .trim()
                    .parse::<i32>()
            {
                // SAFETY: kill(2) on a pid this test's server started.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

pub fn sign(body: &[u8]) -> String {
    nonstop::webhook::github::sign(SECRET.as_bytes(), body)
}

/// `payload=<url-encoded JSON>`: the body GitHub sends when a hook's content type is
/// `application/x-www-form-urlencoded`, the one its settings page preselects.
pub fn form_encoded(json: &[u8]) -> Vec<u8> {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair(
            "payload",
            std::str::from_utf8(json).expect("a JSON document is UTF-8"),
        )
        .finish()
        .into_bytes()
}

pub fn push_payload(git_ref: &str, sha: &str, repository: &str) -> Vec<u8> {
    json!({
        "ref": git_ref,
        "before": "0".repeat(40),
        "after": sha,
        "deleted": false,
        "repository": { "full_name": repository, "clone_url": "https://github.com/acme/hello.git" },
        "pusher": { "name": "ada" },
        "head_commit": { "id": sha, "message": "A change", "author": { "name": "Ada", "username": "ada" } }
    })
    .to_string()
    .into_bytes()
}

/// Starts nonstop on fresh ports with the example app's repository, behind the built-in
/// proxy.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(Extra::default()).await
}

/// Additions to the test config: lines for `[server]` and for the app, tables after the app
/// (`[slack]`, `[travis]`, …), env vars for the server process, the app's `switch = …` line
/// (given the ports and the folder; the built-in proxy when `None`), and whether the proxy
/// runs in a `nonstop proxy` process of its own.
#[derive(Default)]
pub struct Extra {
    /// The app's `build` and `run` lines instead of the example's (written into the TOML
    /// string quoted).
    pub build: Option<String>,
    pub run: Option<String>,
    /// The app's `repo` instead of the test's own repository.
    pub repo: Option<&'static str>,
    pub server: String,
    pub app: String,
    pub tables: String,
    pub env: Vec<(String, String)>,
    pub switch: Option<fn(&Ports, &Path) -> String>,
    pub proxy_process: bool,
    /// With `proxy_process`: the test binds the proxy's listening socket itself and passes
    /// it to `nonstop proxy` as systemd's socket activation does (fd 3, `LISTEN_FDS=1`,
    /// `LISTEN_PID`, `LISTEN_FDNAMES=hello`), keeping it open while the proxy is down.
    pub socket_activated: bool,
    /// Where `server.proxy_socket` is (relative to the test's folder); `proxy.sock` if `None`.
    pub proxy_socket: Option<&'static str>,
    /// Folders (relative to the test's folder) that the server sees as small filesystems
    /// of their own, with their sizes (`"8m"`): a disk that can fill up.
    pub tmpfs: &'static [(&'static str, &'static str)],
    /// The server runs without any capability (root's dropped), as any other process of
    /// its user would.
    pub capless: bool,
    /// The server's open-file limit (soft, hard), as `ulimit -n` sets it before `exec`:
    /// systemd's default of 1024 is what a host gives a service unless told otherwise.
    pub nofile: Option<(u64, u64)>,
}

/// `spawn_app` with `extra` added to the config and the environment.
pub async fn spawn_app_with(extra: Extra) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::new(dir.path().join("hello-repo"));
    let ports = Ports {
        server: 0,
        // The built-in proxy binds port 0; anything else in front (nginx) is told its port.
        proxy: if extra.switch.is_some() {
            unique_port()
        } else {
            0
        },
        app: [unique_port(), unique_port()],
    };
    let mut app = TestApp {
        dir,
        repo,
        ports,
        // The server closes a keep-alive connection idle for its header timeout (10 s); a
        // test that blocked its runtime meanwhile (waiting for the CLI) would otherwise send
        // on a connection it has not yet seen closed.
        http: reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
        server: None,
        proxy_process: None,
        activation_socket: None,
        extra,
    };
    app.write_config();
    if app.extra.proxy_process {
        app.start_proxy_process().await;
        app.write_config();
    }
    app.start_server().await;
    app.write_config();
    app.wait_ready().await;
    app
}

/// What a load loop saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<String>,
    pub bodies: std::collections::BTreeMap<String, u64>,
}

impl LoadReport {
    /// Fails the test with the first few failures when any request failed.
    pub fn assert_none_failed(&self) {
        let shown = &self.failures[..self.failures.len().min(10)];
        assert_eq!(self.failed, 0, "failed requests: {shown:?}");
    }
}

/// A bounded load loop: `clients` keep-alive clients hit `url` until `stop` is set, each at
/// most `max_per_client` requests and never longer than `max_time`.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadReport>>,
    pub sent: Arc<AtomicU64>,
}

impl Load {
    pub fn start(url: String, clients: usize, max_per_client: u64, max_time: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + max_time;
        let tasks = (0..clients)
            .map(|_| {
                let (url, stop, sent) = (url.clone(), stop.clone(), sent.clone());
                tokio::spawn(async move {
                    // One client each, one pooled connection each: keep-alive as a browser.
                    let client = reqwest::Client::builder()
                        .pool_max_idle_per_host(1)
                        .build()
                        .unwrap();
                    let mut report = LoadReport::default();
                    for _ in 0..max_per_client {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        match client.get(&url).send().await {
                            Ok(response) if response.status() == 200 => match response.text().await
                            {
                                Ok(body) => {
                                    report.ok += 1;
                                    *report.bodies.entry(body.trim().to_owned()).or_default() += 1;
                                }
                                Err(err) => {
                                    report.failed += 1;
                                    report.failures.push(format!("body: {err}"));
                                }
                            },
                            Ok(response) => {
                                report.failed += 1;
                                let status = response.status();
                                report.failures.push(format!(
                                    "{status}: {}",
                                    response.text().await.unwrap_or_default()
                                ));
                            }
                            Err(err) => {
                                report.failed += 1;
                                report.failures.push(format!("{err:?}"));
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        Self { stop, tasks, sent }
    }

    /// Waits until at least `n` requests were sent (so the load is really flowing).
    pub async fn wait_sent(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sent.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "the load loop did not get going");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadReport::default();
        for task in self.tasks {
            let report = task.await.unwrap();
            total.ok += report.ok;
            total.failed += report.failed;
            total.failures.extend(report.failures);
            for (body, count) in report.bodies {
                *total.bodies.entry(body).or_default() += count;
            }
        }
        total
    }
}
