//! Child processes (git, builds, hooks): always with a timeout, stdout and stderr captured
//! into one log in the order they were printed, and the whole process group killed on timeout
//! or when the caller goes away. Commands are built from arguments and env vars; request data
//! never goes into a shell string.
//!
//! Capture is bounded whatever the child prints, and costs each line only its own length.
//! Both streams share one pipe, so their lines interleave as they were written (as on a
//! terminal). The pipe is read in chunks and cut into whole lines of at most
//! `MAX_LINE_BYTES`; they cross a bounded channel (a child printing faster than its lines are
//! taken waits in its own write: the pipe pushes back) into the `Tail` the log keeps, and into
//! an optional `LineSink` that sees every line as it is printed. It never holds a whole
//! output in memory, and never a whole line longer than the cap.
//!
//! A child never inherits nonstop's environment (which holds its own secrets and whatever
//! cloud credentials the host gave it): every command is made by `ChildEnv::command`, which
//! clears it and passes only an allow-list plus what the caller adds.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// A log keeps the last this-many bytes of output: the tail is where a failure explains
/// itself. What came before is counted in one line at its top.
pub const MAX_LOG_BYTES: usize = 512 * 1024;

/// A line longer than this is cut, with a marker saying how much of it was not kept: a line
/// that long is a dump (minified code, a binary), not a message anyone reads whole.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// How much of the pipe is read at once; one read becomes one batch of lines.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Batches of lines read ahead of the sink: what the capture holds in flight is bounded by
/// this many reads (each at most `READ_CHUNK_BYTES` plus one cut line).
const BATCHES_IN_FLIGHT: usize = 8;

/// What every child gets of the server's own environment, when the server has it: where
/// programs are, the home folder (git's and cargo's config, credential helpers), language and
/// time zone. Nothing else of the server's environment reaches a child.
pub const BASE_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

/// `PATH` for a child when the server has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The environment of one child, built from nothing: `ChildEnv::base()` and what the caller
/// adds. `Debug` shows the names only, never a value.
#[derive(Clone, Default)]
pub struct ChildEnv {
    vars: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChildEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

impl ChildEnv {
    /// `BASE_ENV`, from the server's environment (a default `PATH` when it has none).
    pub fn base() -> Self {
        let mut env = Self::default().inherit(&BASE_ENV);
        env.vars
            .entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        env
    }

    /// Adds those of `names` the server's environment has (a value that is not UTF-8 is
    /// left out).
    pub fn inherit(mut self, names: &[&str]) -> Self {
        for name in names {
            if let Ok(value) = std::env::var(name) {
                self.vars.insert((*name).to_owned(), value);
            }
        }
        self
    }

    /// Sets `name` (over any value it had).
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// Sets every pair, in order (a later one wins).
    pub fn extend<K: Into<String>, V: Into<String>>(
        &mut self,
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> &mut Self {
        for (name, value) in pairs {
            self.set(name, value);
        }
        self
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    /// A command for `program` whose environment is exactly this one.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env_clear().envs(&self.vars);
        command
    }
}

/// How a child ended.
#[derive(Debug)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Still running at its timeout: its process group was killed.
    TimedOut(Duration),
    /// Waiting for it failed; it is killed when the caller lets go of it.
    Lost(std::io::Error),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit code {code}"),
            Self::Signal(signal) => write!(f, "killed by signal {signal}"),
            Self::TimedOut(after) => write!(f, "timed out after {}s", after.as_secs_f32()),
            Self::Lost(err) => write!(f, "could not wait for it: {err}"),
        }
    }
}

impl Exit {
    fn of(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(signal),
            // Neither is only possible for a stopped child, which `wait` does not report.
            (None, None) => Self::Lost(std::io::Error::other("no exit code nor signal")),
        }
    }
}

#[derive(Debug)]
pub struct Finished {
    /// It exited with code 0.
    pub success: bool,
    pub status: Exit,
    /// Its output's `Tail`: at most `MAX_LOG_BYTES` plus the line saying what was dropped.
    pub log: String,
}

#[derive(Debug, thiserror::Error)]
#[error("could not start `{program}`: {source}")]
pub struct SpawnError {
    pub program: String,
    pub source: std::io::Error,
}

/// Where a child's output goes as it is printed, besides the tail `Finished` keeps.
#[async_trait]
pub trait LineSink: Send {
    /// `lines` is one or more whole lines, each ending in `\n` and at most `MAX_LINE_BYTES`
    /// (plus the marker of a cut line), in the order the child printed them. The pipe is read
    /// at most `BATCHES_IN_FLIGHT` reads ahead of this call: a slow sink slows the child down,
    /// it never fills memory.
    async fn lines(&mut self, lines: &str);
}

/// A sink for output nobody follows.
pub struct Discard;

#[async_trait]
impl LineSink for Discard {
    async fn lines(&mut self, _lines: &str) {}
}

/// A sink that hands lines on after `redact` (whole lines in, whole lines out).
pub struct Redacting<'a, F> {
    pub sink: &'a mut dyn LineSink,
    pub redact: F,
}

#[async_trait]
impl<F: Fn(&str) -> String + Send + Sync> LineSink for Redacting<'_, F> {
    async fn lines(&mut self, lines: &str) {
        let lines = (self.redact)(lines);
        self.sink.lines(&lines).await;
    }
}

/// Runs `command` to its end or until `timeout`, whichever comes first.
pub async fn run(command: Command, timeout: Duration) -> Result<Finished, SpawnError> {
    run_with_sink(command, timeout, None).await
}

/// `run`, with every line also given to `sink` as it is printed.
pub async fn run_with_sink(
    command: Command,
    timeout: Duration,
    sink: Option<&mut dyn LineSink>,
) -> Result<Finished, SpawnError> {
    let (mut child, output) = spawn(command)?;
    let pid = child.id();
    let mut group = GroupGuard(pid);
    let (batches_tx, mut batches) = mpsc::channel(BATCHES_IN_FLIGHT);
    let reader = tokio::spawn(read_lines(output, batches_tx));
    let mut taken = Taken {
        tail: Tail::default(),
        sink,
    };

    let ended = tokio::time::timeout(timeout, async {
        // Read until the pipe closes, then reap: a child that exits early but leaves a
        // grandchild holding the pipe is still waited for, bounded by the same timeout.
        while let Some(lines) = batches.recv().await {
            taken.take(&lines).await;
        }
        child.wait().await
    })
    .await;

    // Ended on its own: what it left in its group is not killed. A daemon it started may not
    // have reached its own `setsid` yet (deploy.sh's app instance, on a loaded host).
    if ended.is_ok() {
        group.0 = None;
    }
    let status = match ended {
        Ok(Ok(status)) => Exit::of(status),
        Ok(Err(err)) => Exit::Lost(err),
        Err(_) => {
            kill_group(pid);
            let _ = child.kill().await;
            while let Ok(lines) = batches.try_recv() {
                taken.take(&lines).await;
            }
            Exit::TimedOut(timeout)
        }
    };
    reader.abort();
    Ok(Finished {
        success: matches!(status, Exit::Code(0)),
        status,
        log: taken.tail.into_string(),
    })
}

/// Starts `command` in its own process group, both its streams into one pipe; returns the
/// child and the pipe's read end.
fn spawn(mut command: Command) -> Result<(Child, pipe::Receiver), SpawnError> {
    let program = command.as_std().get_program().to_owned();
    let spawn_error = |source| SpawnError {
        program: program.to_string_lossy().into_owned(),
        source,
    };
    let output = Output::open().map_err(spawn_error)?;
    command
        .stdin(Stdio::null())
        .stdout(output.stdout)
        .stderr(output.stderr)
        // Its own process group, so a timeout also stops what a script started in the
        // foreground; daemons that `setsid` themselves (the app instances) are not touched.
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent. If nonstop
    // itself is killed (SIGKILL skips every destructor) its children die with it instead of
    // running on unobserved; daemons they start do not inherit this setting.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let spawned = command.spawn().map_err(spawn_error);
    // The command holds this side's copies of the pipe's write end: until they are closed
    // the pipe never reports the end of the output.
    drop(command);
    Ok((spawned?, output.reader))
}

/// Where the lines read go: always the tail, and the sink when there is one.
struct Taken<'a> {
    tail: Tail,
    sink: Option<&'a mut dyn LineSink>,
}

impl Taken<'_> {
    async fn take(&mut self, lines: &str) {
        self.tail.push(lines);
        if let Some(sink) = self.sink.as_mut() {
            sink.lines(lines).await;
        }
    }
}

/// The one pipe a child writes both its streams into.
struct Output {
    reader: pipe::Receiver,
    stdout: Stdio,
    stderr: Stdio,
}

impl Output {
    fn open() -> std::io::Result<Self> {
        // Both ends are close-on-exec; the child gets the write end as its fds 1 and 2 only.
        let (reader, writer) = std::io::pipe()?;
        let stderr = writer.try_clone()?;
        Ok(Self {
            reader: pipe::Receiver::from_owned_fd(reader.into())?,
            stdout: writer.into(),
            stderr: stderr.into(),
        })
    }
}

/// Reads `pipe` to its end and sends its output on as whole lines, one batch per read;
/// waits (reads no further) while the channel is full.
async fn read_lines(mut pipe: impl AsyncRead + Unpin, batches: mpsc::Sender<String>) {
    let mut chunk = vec![0; READ_CHUNK_BYTES];
    let mut cutter = LineCutter::default();
    loop {
        // A read error on a pipe is its end as far as the log is concerned.
        let read = pipe.read(&mut chunk).await.unwrap_or(0);
        let lines = match read {
            0 => cutter.finish(),
            n => cutter.split(&chunk[..n]),
        };
        if !lines.is_empty() && batches.send(lines).await.is_err() {
            return;
        }
        if read == 0 {
            return;
        }
    }
}

/// Cuts a stream of bytes into whole lines of at most `MAX_LINE_BYTES`, marking the cut ones.
#[derive(Default)]
struct LineCutter {
    /// The kept start of a line whose end has not been read yet.
    partial: Vec<u8>,
    /// The bytes of that line beyond the cap, dropped.
    cut: u64,
}

impl LineCutter {
    /// The lines `bytes` completes, as text (invalid UTF-8 replaced).
    fn split(&mut self, mut bytes: &[u8]) -> String {
        let mut out = Vec::with_capacity(bytes.len() + self.partial.len());
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let (line, rest) = bytes.split_at(end + 1);
            if self.partial.is_empty() && self.cut == 0 && end <= MAX_LINE_BYTES {
                out.extend_from_slice(line);
            } else {
                self.keep(&line[..end]);
                self.end_line(&mut out);
            }
            bytes = rest;
        }
        self.keep(bytes);
        text(out)
    }

    /// The last line, when the output did not end with a newline: it gets one.
    fn finish(&mut self) -> String {
        let mut out = Vec::new();
        if !self.partial.is_empty() || self.cut > 0 {
            self.end_line(&mut out);
        }
        text(out)
    }

    fn keep(&mut self, bytes: &[u8]) {
        let kept = bytes.len().min(MAX_LINE_BYTES - self.partial.len());
        self.partial.extend_from_slice(&bytes[..kept]);
        self.cut += (bytes.len() - kept) as u64;
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.partial);
        if self.cut > 0 {
            out.extend_from_slice(format!(" [… line cut: {} more bytes]", self.cut).as_bytes());
        }
        out.push(b'\n');
        self.partial.clear();
        self.cut = 0;
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
}

/// The end of a log: its last `MAX_LOG_BYTES` of whole lines, and a count of what came
/// before. A line costs O(its length): the text is trimmed only once it holds twice the
/// bound, so each byte is moved at most once.
#[derive(Debug, Default)]
pub struct Tail {
    text: String,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl Tail {
    /// Adds whole lines (each ending in `\n`).
    pub fn push(&mut self, lines: &str) {
        self.text.push_str(lines);
        if self.text.len() > 2 * MAX_LOG_BYTES {
            self.trim();
        }
    }

    /// Drops the oldest lines until at most `MAX_LOG_BYTES` are left.
    fn trim(&mut self) {
        let Some(from) = self
            .text
            .len()
            .checked_sub(MAX_LOG_BYTES)
            .filter(|&f| f > 0)
        else {
            return;
        };
        // The kept text starts after a newline, so it starts at a whole line (and a char).
        let cut = self.text.as_bytes()[from - 1..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(self.text.len(), |at| from + at);
        let dropped = &self.text.as_bytes()[..cut];
        self.dropped_lines += dropped.iter().filter(|&&b| b == b'\n').count() as u64;
        self.dropped_bytes += cut as u64;
        self.text.drain(..cut);
    }

    /// The lines kept so far (a little more than the bound until the next trim).
    pub fn kept(&self) -> &str {
        &self.text
    }

    /// The kept lines, after one line saying how many were dropped (when any were).
    pub fn into_string(mut self) -> String {
        self.trim();
        if self.dropped_bytes == 0 {
            self.text
        } else {
            format!(
                "[… {} earlier lines ({} bytes) not kept]\n{}",
                self.dropped_lines, self.dropped_bytes, self.text
            )
        }
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// Kills the child's process group if the caller is dropped mid-run (server shutdown).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        command
    }

    #[tokio::test]
    async fn captures_both_streams_and_the_exit_code() {
        let done = run(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(!done.success);
        assert_eq!(done.status.to_string(), "exit code 3");
        assert!(
            done.log.contains("out\n") && done.log.contains("err\n"),
            "{}",
            done.log
        );
    }

    #[tokio::test]
    async fn stdout_and_stderr_keep_the_order_they_were_printed() {
        let script = "for i in $(seq 1 200); do echo out$i; echo err$i >&2; done";
        let done = run(sh(script), Duration::from_secs(30)).await.unwrap();
        assert!(done.success, "{}", done.status);
        let expected: String = (1..=200).map(|i| format!("out{i}\nerr{i}\n")).collect();
        assert_eq!(done.log, expected);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let done = run(sh(&script), Duration::from_millis(500)).await.unwrap();
        assert!(!done.success);
        assert!(matches!(done.status, Exit::TimedOut(_)), "{}", done.status);
        assert!(done.status.to_string().starts_with("timed out"));
        // The background child was in the group, so it must be gone too.
        let child: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only asks whether the process exists.
        while unsafe { libc::kill(child, 0) } == 0 && !is_zombie(child) {
            assert!(
                std::time::Instant::now() < deadline,
                "child {child} survived the timeout"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn is_zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| stat.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true)
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let err = run(Command::new("/nonexistent/program"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/program"));
    }

    #[test]
    fn long_logs_keep_their_tail() {
        let mut log = Tail::default();
        for i in 0..100_000 {
            log.push(&format!("line {i}\n"));
        }
        let text = log.into_string();
        assert!(text.starts_with("[… "), "{}", &text[..40]);
        assert!(text.ends_with("line 99999\n"));
        assert!(text.len() < MAX_LOG_BYTES + 100);
    }

    /// Reads the line `[… N earlier lines (M bytes) not kept]` at the top of a log.
    fn dropped(log: &str) -> (u64, u64, &str) {
        let (first, kept) = log.split_once('\n').unwrap();
        let numbers: Vec<u64> = first
            .split(|c: char| !c.is_ascii_digit())
            .filter(|n| !n.is_empty())
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(
            first,
            format!(
                "[… {} earlier lines ({} bytes) not kept]",
                numbers[0], numbers[1]
            )
        );
        (numbers[0], numbers[1], kept)
    }

    #[tokio::test]
    async fn a_flood_of_lines_keeps_a_bounded_tail_and_counts_the_rest() {
        let done = run(sh("yes | head -n 600000"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(done.success, "{}", done.status);
        assert!(done.log.len() <= MAX_LOG_BYTES + 100, "{}", done.log.len());
        let (lines, bytes, kept) = dropped(&done.log);
        assert!(kept.len() <= MAX_LOG_BYTES && kept.len() > MAX_LOG_BYTES - 10);
        assert!(kept.lines().all(|l| l == "y"));
        assert_eq!(lines + kept.lines().count() as u64, 600_000);
        assert_eq!(bytes + kept.len() as u64, 1_200_000);
    }

    #[tokio::test]
    async fn a_30_mb_line_is_cut_at_the_cap_with_a_marker() {
        let script = "head -c 30000000 /dev/zero | tr '\\0' x; echo; echo after";
        let done = run(sh(script), Duration::from_secs(60)).await.unwrap();
        assert!(done.success, "{}", done.status);
        let expected = format!(
            "{} [… line cut: {} more bytes]\nafter\n",
            "x".repeat(MAX_LINE_BYTES),
            30_000_000 - MAX_LINE_BYTES
        );
        assert!(
            done.log == expected,
            "{:?}…",
            &done.log[MAX_LINE_BYTES - 10..]
        );
    }

    #[test]
    fn lines_are_cut_across_reads_and_a_last_line_gets_its_newline() {
        let mut cutter = LineCutter::default();
        assert_eq!(cutter.split(b"one\ntw"), "one\n");
        assert_eq!(cutter.split(b"o\nthr"), "two\n");
        let long = vec![b'z'; MAX_LINE_BYTES + 5];
        assert_eq!(cutter.split(&long), "");
        assert_eq!(
            cutter.split(b"\n\xff\n"),
            format!(
                "thr{} [… line cut: 8 more bytes]\n\u{fffd}\n",
                "z".repeat(MAX_LINE_BYTES - 3)
            )
        );
        assert_eq!(cutter.split(b"four"), "");
        assert_eq!(cutter.finish(), "four\n");
        assert_eq!(cutter.finish(), "");
    }

    /// An output that never ends, counting what was read of it.
    struct Endless(Arc<AtomicUsize>);

    impl AsyncRead for Endless {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = buf.remaining() & !1;
            buf.put_slice(&b"y\n".repeat(n / 2));
            self.0.fetch_add(n, Ordering::SeqCst);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn lines_nobody_takes_stop_the_reading() {
        let read = Arc::new(AtomicUsize::new(0));
        let (batches, taken) = mpsc::channel(BATCHES_IN_FLIGHT);
        let probe = batches.clone();
        let reader = tokio::spawn(read_lines(Endless(read.clone()), batches));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while probe.capacity() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the channel never filled"
            );
            tokio::task::yield_now().await;
        }
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        // Full channel, one read waiting to be sent, and nothing more.
        let bound = (BATCHES_IN_FLIGHT + 1) * READ_CHUNK_BYTES;
        assert!(
            read.load(Ordering::SeqCst) <= bound,
            "{}",
            read.load(Ordering::SeqCst)
        );
        assert!(!reader.is_finished());
        drop((taken, probe));
        reader.await.unwrap();
    }

    /// A sink slower than the child, checking every line arrives once and in order.
    struct SlowCounter {
        next: u64,
        batches: usize,
    }

    #[async_trait]
    impl LineSink for SlowCounter {
        async fn lines(&mut self, lines: &str) {
            for line in lines.lines() {
                assert_eq!(line, self.next.to_string());
                self.next += 1;
            }
            self.batches += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_child_printing_faster_than_its_sink_takes_lines_waits_and_loses_none() {
        let mut sink = SlowCounter {
            next: 1,
            batches: 0,
        };
        let done = run_with_sink(
            sh("seq 1 1000000"),
            Duration::from_secs(120),
            Some(&mut sink),
        )
        .await
        .unwrap();
        assert!(done.success, "{}", done.status);
        assert_eq!(sink.next, 1_000_001);
        assert!(sink.batches > BATCHES_IN_FLIGHT, "{}", sink.batches);
        assert!(done.log.ends_with("\n999999\n1000000\n"));
        assert!(done.log.len() <= MAX_LOG_BYTES + 100);
    }
}
