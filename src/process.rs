//! Child processes (git, builds, hooks): always with a timeout, stdout and stderr captured
//! into one log in the order lines arrive, and the whole process group killed on timeout or
//! when the caller goes away. Commands are built from arguments and env vars; request data
//! never goes into a shell string.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Logs are kept to their last this-many bytes: the tail is where a failure explains itself.
pub const MAX_LOG_BYTES: usize = 512 * 1024;

#[derive(Debug)]
pub struct Finished {
    pub success: bool,
    /// `exit code N`, `killed by signal N` or `timed out after Ns`.
    pub status: String,
    pub log: String,
}

#[derive(Debug, thiserror::Error)]
#[error("could not start `{program}`: {source}")]
pub struct SpawnError {
    pub program: String,
    pub source: std::io::Error,
}

/// Runs `command` to its end or until `timeout`, whichever comes first.
pub async fn run(mut command: Command, timeout: Duration) -> Result<Finished, SpawnError> {
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let mut child = command.spawn().map_err(|source| SpawnError {
        program: program.clone(),
        source,
    })?;
    let pid = child.id();
    let mut group = GroupGuard(pid);

    let (lines_tx, mut lines_rx) = mpsc::unbounded_channel();
    let stdout = child
        .stdout
        .take()
        .map(|out| tokio::spawn(forward(out, lines_tx.clone())));
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(forward(err, lines_tx)));
    let mut log = Log::default();

    let status = tokio::time::timeout(timeout, async {
        // Read until both pipes close, then reap: a child that exits early but leaves a
        // grandchild holding the pipe is still waited for, bounded by the same timeout.
        while let Some(line) = lines_rx.recv().await {
            log.push(&line);
        }
        child.wait().await
    })
    .await;

    // Ended on its own: what it left in its group is not killed. A daemon it started may not
    // have reached its own `setsid` yet (deploy.sh's app instance, on a loaded host).
    if status.is_ok() {
        group.0 = None;
    }
    let (success, status) = match status {
        Ok(Ok(status)) => (status.success(), describe(status)),
        Ok(Err(err)) => (false, format!("could not wait for it: {err}")),
        Err(_) => {
            kill_group(pid);
            let _ = child.kill().await;
            while let Ok(line) = lines_rx.try_recv() {
                log.push(&line);
            }
            (false, format!("timed out after {}s", timeout.as_secs_f32()))
        }
    };
    for task in [stdout, stderr].into_iter().flatten() {
        task.abort();
    }
    Ok(Finished {
        success,
        status,
        log: log.into_string(),
    })
}

async fn forward(pipe: impl AsyncRead + Unpin, lines: mpsc::UnboundedSender<String>) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if lines
                    .send(String::from_utf8_lossy(&buf).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "ended".into(),
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

/// A log that keeps only its last `MAX_LOG_BYTES`.
#[derive(Default)]
struct Log {
    text: String,
    dropped: usize,
}

impl Log {
    fn push(&mut self, line: &str) {
        self.text.push_str(line);
        if self.text.len() > MAX_LOG_BYTES {
            let mut cut = self.text.len() - MAX_LOG_BYTES;
            while !self.text.is_char_boundary(cut) {
                cut += 1;
            }
            self.dropped += cut;
            self.text.drain(..cut);
        }
    }

    fn into_string(self) -> String {
        if self.dropped == 0 {
            self.text
        } else {
            format!("[… {} earlier bytes not kept]\n{}", self.dropped, self.text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(done.status, "exit code 3");
        assert!(
            done.log.contains("out\n") && done.log.contains("err\n"),
            "{}",
            done.log
        );
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let done = run(sh(&script), Duration::from_millis(500)).await.unwrap();
        assert!(!done.success);
        assert!(done.status.starts_with("timed out"), "{}", done.status);
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
        let mut log = Log::default();
        for i in 0..100_000 {
            log.push(&format!("line {i}\n"));
        }
        let text = log.into_string();
        assert!(text.starts_with("[… "), "{}", &text[..40]);
        assert!(text.ends_with("line 99999\n"));
        assert!(text.len() < MAX_LOG_BYTES + 100);
    }
}
