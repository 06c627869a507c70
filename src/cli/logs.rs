//! `nonstop logs APP`: an instance's own output (what its `run` command writes), read from
//! the file the local runner sends it to, `<data_dir>/apps/<app>/run/<port>.log`. The CLI runs
//! on the server's host, so it reads the file itself; the API serves no instance output. It
//! only ever reads: a file that is replaced (the instance restarted) is read again from its
//! start.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::CliError;

/// How often `--follow` looks for new output.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// Where the local runner writes the output of the instance on `port`.
pub fn instance_log(data_dir: &Path, app: &str, port: u16) -> PathBuf {
    data_dir
        .join("apps")
        .join(app)
        .join("run")
        .join(format!("{port}.log"))
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> &str {
    if lines == 0 {
        return "";
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    match body.rmatch_indices('\n').nth(lines - 1) {
        Some((at, _)) => &text[at + 1..],
        None => text,
    }
}

/// Prints the file's last `lines` lines, then with `follow` what is added, until killed.
pub async fn show(path: &Path, lines: usize, follow: bool) -> Result<(), CliError> {
    let failed = |source| CliError::Log {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(failed)?;
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(failed)?;
    let mut read = text.len() as u64;
    let mut out = std::io::stdout();
    let _ = out.write_all(tail(&String::from_utf8_lossy(&text), lines).as_bytes());
    let _ = out.flush();
    if !follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        let Ok(length) = std::fs::metadata(path).map(|m| m.len()) else {
            continue;
        };
        if length < read {
            // Shorter than what was read: a new instance started on this port.
            file = std::fs::File::open(path).map_err(failed)?;
            read = 0;
        }
        file.seek(SeekFrom::Start(read)).map_err(failed)?;
        let mut added = Vec::new();
        file.read_to_end(&mut added).map_err(failed)?;
        read += added.len() as u64;
        let _ = out.write_all(&added);
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a\nb\n", 5), "a\nb\n");
        assert_eq!(tail("a\nb\n", 0), "");
        assert_eq!(tail("", 3), "");
    }

    #[test]
    fn an_instance_log_is_named_for_its_port() {
        assert_eq!(
            instance_log(Path::new("data"), "hello", 8082),
            Path::new("data/apps/hello/run/8082.log")
        );
    }
}
