//! Fetch: the exact commit into a cached clone per app, checked out clean. Ignored files
//! (a build's `target/`) survive between deploys so builds stay incremental, as a CI cache.
//! A repo URL's credentials (`https://user:token@host/…`) never leave this module: every
//! command line, git output and error it gives out has them replaced by `***`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::process::{self, ChildEnv, Exit, SpawnError};
use crate::runner::step::{Done, Failed};
use crate::user::User;

/// Git talks to the network at most this long per command.
const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// What getting the source can fail with, in one line; the stage log has git's output.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{}: {source}", path.display())]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("git {args} ({exit}){}", said_of(said))]
    Git {
        args: String,
        exit: Exit,
        /// What git said of why, in its own words (its last `fatal:`/`error:` line).
        said: String,
    },
    #[error("git log printed no commit id: {0}")]
    NoCommit(String),
    #[error("copying {} to {}: {source}", seed.display(), repo.display())]
    Seed {
        seed: PathBuf,
        repo: PathBuf,
        source: std::io::Error,
    },
    #[error("copying the seed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Making the repository from its seed failed; `log` is what git printed.
    #[error("{error}\n{log}")]
    Seeding {
        error: Box<SourceError>,
        log: String,
    },
}

/// The commit a Fetch checked out.
#[derive(Debug)]
pub struct Fetched {
    pub sha: String,
    pub message: String,
    pub author: String,
}

/// A git URL as is; a local path resolved against the config file's folder.
pub fn resolve_repo(repo: &str, base_dir: &Path) -> String {
    let is_url = repo.contains("://") || repo.starts_with("git@");
    if is_url || Path::new(repo).is_absolute() {
        repo.to_owned()
    } else {
        base_dir.join(repo).display().to_string()
    }
}

/// What git gets of the server's environment besides the base: the ssh agent's socket, so
/// an `ssh://` or `git@` repo can use the key the agent holds. `HOME` (in the base) is where
/// git finds its config and credential helpers; nothing else of the server's reaches git.
pub const GIT_ENV: [&str; 1] = ["SSH_AUTH_SOCK"];

/// A git command in `dir`, run as `user` when given (the app's `build_as`: then its home's
/// git config and credentials are the ones used).
fn git(dir: Option<&Path>, user: Option<&User>) -> Command {
    let mut env = ChildEnv::base().inherit(&GIT_ENV);
    // Never wait for a password prompt nobody will answer.
    env.set("GIT_TERMINAL_PROMPT", "0");
    let mut command = env.command("git");
    if let Some(user) = user {
        user.apply(&mut command);
    }
    if let Some(dir) = dir {
        command.arg("-C").arg(dir);
    }
    command
}

/// `text` with the userinfo of every URL in it (`user:token@` after `scheme://`) replaced
/// by `***`, so that a repo URL's credentials are never shown: git prints the URL it was
/// given in its errors, and a stage log is read by whoever can see the dashboard.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The authority ends where the path, query or fragment starts, or the URL does.
        let end = after
            .find(|c: char| {
                c == '/' || c == '?' || c == '#' || c.is_whitespace() || "'\"<>`".contains(c)
            })
            .unwrap_or(after.len());
        match after[..end].rfind('@') {
            Some(userinfo_end) => {
                out.push_str("***");
                rest = &after[userinfo_end..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// Runs one git command, its line and output added to `log` with credentials redacted;
/// returns its output.
async fn run_git(command: Command, log: &mut String) -> Result<String, SourceError> {
    let args: Vec<_> = command
        .as_std()
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let args = redact_credentials(&args.join(" "));
    log.push_str(&format!("$ git {args}\n"));
    let done = process::run(command, GIT_TIMEOUT).await?;
    let output = redact_credentials(&done.log);
    log.push_str(&output);
    if done.success {
        Ok(output)
    } else {
        Err(SourceError::Git {
            args,
            exit: done.status,
            said: why_git_failed(&output),
        })
    }
}

/// Git's own reason in `output`: its last `fatal:` or `error:` line, else its last line,
/// cut to one readable line.
fn why_git_failed(output: &str) -> String {
    let mut lines = output
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty());
    let said = lines
        .clone()
        .rfind(|line| line.starts_with("fatal:") || line.starts_with("error:"))
        .or_else(|| lines.next_back())
        .unwrap_or_default();
    match said.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &said[..cut]),
        None => said.to_owned(),
    }
}

fn said_of(said: &str) -> String {
    if said.is_empty() {
        String::new()
    } else {
        format!(": {said}")
    }
}

/// Makes `checkout` hold `commit` (or the head of `branch` when no commit is given); git
/// runs as `user` when given, in a checkout handed over to it.
pub async fn fetch(
    repo: &str,
    checkout: &Path,
    branch: &str,
    commit: Option<&str>,
    user: Option<&User>,
) -> Result<Done<Fetched>, Failed<SourceError>> {
    let mut log = String::new();
    match fetch_logged(repo, checkout, branch, commit, user, &mut log).await {
        Ok(fetched) => Ok(Done::new(fetched, log)),
        Err(error) => Err(Failed { log, error }),
    }
}

async fn fetch_logged(
    repo: &str,
    checkout: &Path,
    branch: &str,
    commit: Option<&str>,
    user: Option<&User>,
    log: &mut String,
) -> Result<Fetched, SourceError> {
    if let Some(user) = user {
        hand_over(checkout, user).await?;
    }
    if !checkout.join(".git").exists() {
        clone(repo, checkout, user, log).await?;
    }
    let mut fetch = git(Some(checkout), user);
    // The branch first: a commit pushed to it is then known even where the server refuses
    // fetching a bare sha.
    fetch
        .args(["fetch", "--quiet", "--force", "origin"])
        .arg(format!("+refs/heads/{branch}:refs/remotes/origin/{branch}"));
    run_git(fetch, log).await?;
    let wanted = match commit {
        Some(sha) => {
            let mut has = git(Some(checkout), user);
            has.args(["cat-file", "-e"])
                .arg(format!("{sha}^{{commit}}"));
            if run_git(has, log).await.is_err() {
                let mut by_sha = git(Some(checkout), user);
                by_sha.args(["fetch", "--quiet", "origin", sha]);
                run_git(by_sha, log).await?;
            }
            sha.to_owned()
        }
        None => format!("refs/remotes/origin/{branch}"),
    };
    let mut checkout_cmd = git(Some(checkout), user);
    checkout_cmd.args(["checkout", "--quiet", "--force", "--detach", &wanted]);
    run_git(checkout_cmd, log).await?;
    let mut clean = git(Some(checkout), user);
    clean.args(["clean", "-ffd", "--quiet"]);
    run_git(clean, log).await?;
    head_commit(checkout, user, log).await
}

/// The checkout belongs to `user` (all of it, once, when it did not): git and the build
/// write there as that user, and git refuses a repository another user owns.
async fn hand_over(checkout: &Path, user: &User) -> Result<(), SourceError> {
    use std::os::unix::fs::MetadataExt;
    let (checkout, user) = (checkout.to_owned(), user.clone());
    tokio::task::spawn_blocking(move || {
        let failed = |source| SourceError::Folder {
            path: checkout.clone(),
            source,
        };
        std::fs::create_dir_all(&checkout).map_err(failed)?;
        let owner = std::fs::metadata(&checkout).map_err(failed)?.uid();
        if owner != user.uid {
            user.hand_over(&checkout).map_err(failed)?;
        }
        Ok(())
    })
    .await?
}

async fn clone(
    repo: &str,
    checkout: &Path,
    user: Option<&User>,
    log: &mut String,
) -> Result<(), SourceError> {
    if let Some(parent) = checkout.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|source| SourceError::Folder {
                path: parent.to_owned(),
                source,
            })?;
    }
    let mut clone = git(None, user);
    clone
        .arg("clone")
        .arg("--quiet")
        .arg("--no-checkout")
        .arg(repo)
        .arg(checkout);
    run_git(clone, log).await?;
    Ok(())
}

/// The commit checked out in `checkout`.
async fn head_commit(
    checkout: &Path,
    user: Option<&User>,
    log: &mut String,
) -> Result<Fetched, SourceError> {
    let mut show = git(Some(checkout), user);
    show.args(["log", "-1", "--format=%H%n%an%n%s", "HEAD"]);
    let shown = run_git(show, log).await?;
    let mut lines = shown.lines();
    let sha = lines.next().unwrap_or_default().to_owned();
    let author = lines.next().unwrap_or_default().to_owned();
    let message = lines.next().unwrap_or_default().to_owned();
    if sha.len() != 40 {
        return Err(SourceError::NoCommit(shown));
    }
    Ok(Fetched {
        sha,
        message,
        author,
    })
}

/// On first run, turns `seed` (a folder of files) into a git repository at `repo` with one
/// commit on `branch`, so the shipped example deploys without any setup.
pub async fn init_from_seed(repo: &Path, seed: &Path, branch: &str) -> Result<(), SourceError> {
    if repo.exists() {
        return Ok(());
    }
    let copy = {
        let (seed, repo) = (seed.to_owned(), repo.to_owned());
        tokio::task::spawn_blocking(move || copy_dir(&seed, &repo))
    };
    copy.await?.map_err(|source| SourceError::Seed {
        seed: seed.to_owned(),
        repo: repo.to_owned(),
        source,
    })?;
    let mut log = String::new();
    for args in [
        vec!["init", "--quiet", "-b", branch],
        vec!["add", "--all"],
        vec![
            "-c",
            "user.name=nonstop",
            "-c",
            "user.email=nonstop@localhost",
            "commit",
            "--quiet",
            "-m",
            "First version, made by nonstop from its example",
        ],
    ] {
        let mut command = git(Some(repo), None);
        command.args(args);
        if let Err(error) = run_git(command, &mut log).await {
            return Err(SourceError::Seeding {
                error: Box::new(error),
                log,
            });
        }
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        // The example's own build output is not part of its source.
        if name == "target" {
            continue;
        }
        let target: PathBuf = to.join(&name);
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_redacted_wherever_they_appear() {
        for (text, shown) in [
            (
                "$ git clone --quiet https://user:tok3n@127.0.0.1:1/x.git /data/checkout",
                "$ git clone --quiet https://***@127.0.0.1:1/x.git /data/checkout",
            ),
            (
                "fatal: unable to access 'https://tok3n@github.com/a/b.git/': refused",
                "fatal: unable to access 'https://***@github.com/a/b.git/': refused",
            ),
            ("ssh://git:p@ss@host:22/repo", "ssh://***@host:22/repo"),
            (
                "https://a:b@h?q=c@d and http://e:f@g",
                "https://***@h?q=c@d and http://***@g",
            ),
            // Nothing to hide: the text stays as it is.
            (
                "https://github.com/a/b.git, git@github.com:a/b.git",
                "https://github.com/a/b.git, git@github.com:a/b.git",
            ),
            ("a://", "a://"),
            ("no url at all", "no url at all"),
        ] {
            assert_eq!(redact_credentials(text), shown, "{text}");
        }
    }

    #[test]
    fn local_paths_are_relative_to_the_config_and_urls_stay() {
        let base = Path::new("/srv/nonstop");
        assert_eq!(
            resolve_repo("examples/hello", base),
            "/srv/nonstop/examples/hello"
        );
        assert_eq!(
            resolve_repo("https://github.com/a/b.git", base),
            "https://github.com/a/b.git"
        );
        assert_eq!(
            resolve_repo("git@github.com:a/b.git", base),
            "git@github.com:a/b.git"
        );
        assert_eq!(resolve_repo("/abs/repo", base), "/abs/repo");
    }

    #[tokio::test]
    async fn fetches_a_seeded_repository_at_its_head_and_at_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        std::fs::write(seed.join("file.txt"), "one").unwrap();
        let repo = dir.path().join("repo");
        init_from_seed(&repo, &seed, "main").await.unwrap();

        let checkout = dir.path().join("checkout");
        let first = fetch(&repo.display().to_string(), &checkout, "main", None, None)
            .await
            .unwrap()
            .value;
        assert_eq!(
            first.message,
            "First version, made by nonstop from its example"
        );
        assert_eq!(
            std::fs::read_to_string(checkout.join("file.txt")).unwrap(),
            "one"
        );

        std::fs::write(checkout.join("stray.txt"), "left over").unwrap();
        let again = fetch(
            &repo.display().to_string(),
            &checkout,
            "main",
            Some(&first.sha),
            None,
        )
        .await
        .unwrap()
        .value;
        assert_eq!(again.sha, first.sha);
        assert!(
            !checkout.join("stray.txt").exists(),
            "the tree was not cleaned"
        );
    }

    #[tokio::test]
    async fn an_unknown_commit_fails_with_the_git_output() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        std::fs::write(seed.join("f"), "x").unwrap();
        let repo = dir.path().join("repo");
        init_from_seed(&repo, &seed, "main").await.unwrap();
        let missing = "0".repeat(40);
        let Failed { log, error } = fetch(
            &repo.display().to_string(),
            &dir.path().join("co"),
            "main",
            Some(&missing),
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(error, SourceError::Git { .. }), "{error}");
        // The reason is git's own, after the command that failed.
        let reason = error.to_string();
        assert!(reason.starts_with("git -C "), "{reason}");
        assert!(reason.contains("(exit code "), "{reason}");
        assert!(
            reason.contains(": fatal: ") || reason.contains(": error: "),
            "{reason}"
        );
        assert!(!reason.contains('\n'), "{reason}");
        assert!(log.contains(&missing), "{log}");
    }
}
