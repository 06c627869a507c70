//! The checks gate's poller (`trigger = "checks"`): asks GitHub's API for the full list of
//! checks on every commit that waits for them — at start, every `POLL_INTERVAL`, and
//! `SETTLE` after a webhook said only the full list can decide — and hands the answer to
//! the queue, which decides (`Queue::checks_reported`). So a push whose checks finished
//! while nonstop was down, or whose webhooks were lost, still deploys, and "every check"
//! never passes on partial news. It must never fail a deployment because of an API error:
//! such an error is logged (never with the token) and the next round waits longer.

use std::sync::Arc;
use std::time::Duration;

use octocrab::Octocrab;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TriggerMode};
use crate::db::{self, CiOutcome, Db, DbError, WaitingCommit};
use crate::domain::{AppName, CommitSha};
use crate::gate::{Evidence, Required};
use crate::github_api::{self, GitHubApiError};
use crate::queue::Queue;
use crate::webhook::github::{CheckRun, CheckSuite, CommitStatus};

/// How often every waiting commit is asked about when nothing else prompts it: webhooks
/// carry the news within seconds; this catches what they missed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(3 * 60);

/// After a webhook asked for the full list, wait this long first: a workflow's jobs end
/// within moments of each other, and their burst of webhooks becomes one round.
pub const SETTLE: Duration = Duration::from_secs(2);

/// After a round with errors the pause doubles, from `POLL_INTERVAL` up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);

/// Each API request ends after this, answered or not.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Check runs read per commit, in pages of `PAGE_SIZE`; a commit with more is not fully
/// listed, and "every check" then waits.
const MAX_CHECK_RUN_PAGES: u32 = 5;
const PAGE_SIZE: usize = 100;

/// A push still waiting this long for its checks fails: GitHub itself gives up on a job
/// that stays queued for a day, so no verdict is coming.
pub const WAIT_LIMIT: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, thiserror::Error)]
pub enum ChecksError {
    #[error(transparent)]
    Setup(#[from] GitHubApiError),
    #[error(transparent)]
    Db(#[from] DbError),
    /// `what` is the request, `reason` GitHub's answer or why none came.
    #[error("{what}: {reason}")]
    GitHub { what: String, reason: String },
}

/// The poller's handle: `ask_now` wants the waiting commits asked about soon.
#[derive(Clone, Default)]
pub struct Checks {
    ask: Arc<Notify>,
}

impl Checks {
    /// Starts the poller when an app is gated on checks (its first round runs at once);
    /// otherwise there is nothing to ask about and no task.
    pub fn start(
        config: &Config,
        db: Db,
        queue: Queue,
        shutdown: CancellationToken,
    ) -> Result<Self, ChecksError> {
        let handle = Self::default();
        let gated: Vec<Gated> = config
            .apps
            .iter()
            .filter(|app| app.trigger == TriggerMode::Checks)
            .filter_map(|app| {
                Some(Gated {
                    app: app.name.clone(),
                    repository: app.repository.clone()?,
                    required: Required::of(app),
                })
            })
            .collect();
        let Some(github) = config.github.as_ref().filter(|_| !gated.is_empty()) else {
            return Ok(handle);
        };
        let poller = Poller {
            client: github_api::client(github)?,
            db,
            queue,
            gated,
        };
        tokio::spawn(poller.run(handle.ask.clone(), shutdown));
        Ok(handle)
    }

    /// A webhook left a commit that only GitHub's full list can decide: ask soon (after
    /// `SETTLE`), unless errors have the poller backing off.
    pub fn ask_now(&self) {
        self.ask.notify_one();
    }
}

/// An app gated on its commits' checks.
struct Gated {
    app: AppName,
    /// `owner/name`, which the API's routes name.
    repository: String,
    required: Required,
}

struct Poller {
    client: Octocrab,
    db: Db,
    queue: Queue,
    gated: Vec<Gated>,
}

impl Poller {
    async fn run(self, ask: Arc<Notify>, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let errors = tokio::select! {
                errors = self.round() => errors,
                () = shutdown.cancelled() => return,
            };
            failures = if errors.is_empty() { 0 } else { failures + 1 };
            let pause = pause_after(failures);
            for error in &errors {
                tracing::warn!(error = %error, failures, retry_in = ?pause, "could not ask GitHub about a waiting commit's checks");
            }
            let mut next = Instant::now() + pause;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => break,
                    () = ask.notified() => {
                        // While GitHub fails, a webhook's wish waits for the backoff too.
                        if failures == 0 {
                            next = next.min(Instant::now() + SETTLE);
                        }
                    }
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }

    /// Asks about every waiting commit of every gated app; returns what went wrong. One
    /// commit's error does not keep the others from being asked about.
    async fn round(&self) -> Vec<ChecksError> {
        let mut errors = Vec::new();
        for gated in &self.gated {
            let name = gated.app.to_string();
            let waiting = match self
                .db
                .call(move |conn| db::waiting_commits(conn, &name))
                .await
            {
                Ok(waiting) => waiting,
                Err(err) => {
                    errors.push(err.into());
                    continue;
                }
            };
            for commit in waiting {
                if let Err(err) = self.ask_about(gated, &commit).await {
                    errors.push(err);
                }
            }
        }
        errors
    }

    /// Asks GitHub about one waiting commit and reports the answer; one that has waited
    /// past `WAIT_LIMIT` and is still undecided fails.
    async fn ask_about(&self, gated: &Gated, waiting: &WaitingCommit) -> Result<(), ChecksError> {
        let evidence = self.full_list(&gated.repository, &waiting.commit).await?;
        let report = |evidence| {
            self.queue.checks_reported(
                &gated.app,
                gated.required.clone(),
                waiting.commit.clone(),
                evidence,
                None,
            )
        };
        let outcome = report(evidence).await?;
        let waited = db::now_ms().saturating_sub(waiting.created_at);
        if matches!(outcome, CiOutcome::Waiting { .. }) && waited > WAIT_LIMIT.as_millis() as i64 {
            report(Evidence::OutOfTime {
                limit: format!("{} h", WAIT_LIMIT.as_secs() / 3600),
            })
            .await?;
        }
        Ok(())
    }

    /// The commit's check runs (the latest of each), commit statuses and check suites.
    async fn full_list(
        &self,
        repository: &str,
        commit: &CommitSha,
    ) -> Result<Evidence, ChecksError> {
        let base = format!("/repos/{repository}/commits/{commit}");
        let per_page = PAGE_SIZE.to_string();
        let mut runs = Vec::new();
        let mut listed_all = false;
        for page in 1..=MAX_CHECK_RUN_PAGES {
            let page = page.to_string();
            let list: CheckRunList = self
                .get(
                    &format!("{base}/check-runs"),
                    &[
                        ("filter", "latest"),
                        ("per_page", &per_page),
                        ("page", &page),
                    ],
                )
                .await?;
            let last = list.check_runs.len() < PAGE_SIZE;
            runs.extend(list.check_runs);
            if last || runs.len() as u64 >= list.total_count {
                listed_all = true;
                break;
            }
        }
        let status: CombinedStatus = self
            .get(&format!("{base}/status"), &[("per_page", &per_page)])
            .await?;
        let suites: CheckSuiteList = self
            .get(&format!("{base}/check-suites"), &[("per_page", &per_page)])
            .await?;
        let listed_all = listed_all
            && status.statuses.len() as u64 >= status.total_count
            && suites.check_suites.len() as u64 >= suites.total_count;
        Ok(full_list(
            &runs,
            &status.statuses,
            &suites.check_suites,
            listed_all,
        ))
    }

    async fn get<T: DeserializeOwned>(
        &self,
        route: &str,
        query: &[(&str, &str)],
    ) -> Result<T, ChecksError> {
        let failed = |reason| ChecksError::GitHub {
            what: format!("GET {route}"),
            reason,
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, self.client.get(route, Some(query))).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) => Err(failed(github_api::describe(&err))),
            Err(_) => Err(failed(format!("no answer within {REQUEST_TIMEOUT:?}"))),
        }
    }
}

/// `GET /repos/{owner}/{repo}/commits/{ref}/check-runs`.
#[derive(Debug, Deserialize)]
struct CheckRunList {
    total_count: u64,
    check_runs: Vec<CheckRun>,
}

/// `GET /repos/{owner}/{repo}/commits/{ref}/status`: the latest status of each context.
/// Its `state` is `pending` when there are no statuses at all, so only `statuses` is read.
#[derive(Debug, Deserialize)]
struct CombinedStatus {
    total_count: u64,
    statuses: Vec<CommitStatus>,
}

/// `GET /repos/{owner}/{repo}/commits/{ref}/check-suites`.
#[derive(Debug, Deserialize)]
struct CheckSuiteList {
    total_count: u64,
    check_suites: Vec<CheckSuite>,
}

/// What GitHub's lists say of a commit: every check's report, and the suites still
/// running. A suite without a check run is an app that runs none here (GitHub makes one
/// for every app that could): it is not waited for. `listed_all`: GitHub listed
/// everything; if not, what was left out counts as still running.
fn full_list(
    runs: &[CheckRun],
    statuses: &[CommitStatus],
    suites: &[CheckSuite],
    listed_all: bool,
) -> Evidence {
    let reports = runs
        .iter()
        .map(CheckRun::report)
        .chain(statuses.iter().map(CommitStatus::report))
        .collect();
    let mut running: Vec<String> = suites
        .iter()
        .filter(|suite| {
            suite.latest_check_runs_count > 0 && suite.status.as_deref() != Some("completed")
        })
        .map(CheckSuite::name)
        .collect();
    if !listed_all {
        running.push("the checks past the first pages of GitHub's list".into());
    }
    Evidence::FullList { reports, running }
}

/// The pause before the next round after `failures` failed rounds in a row.
fn pause_after(failures: u32) -> Duration {
    POLL_INTERVAL
        .saturating_mul(1 << failures.min(16))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CheckKind, CheckState};

    fn fixture<T: DeserializeOwned>(name: &str) -> T {
        let path = format!(
            "{}/tests/fixtures/github/api/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn githubs_lists_become_every_checks_report_and_the_suites_still_running() {
        let runs: CheckRunList = fixture("check-runs.json");
        let status: CombinedStatus = fixture("status.json");
        let suites: CheckSuiteList = fixture("check-suites.json");
        let Evidence::FullList { reports, running } = full_list(
            &runs.check_runs,
            &status.statuses,
            &suites.check_suites,
            true,
        ) else {
            panic!()
        };
        let seen: Vec<_> = reports
            .iter()
            .map(|r| (r.kind, r.name.as_str(), r.state, r.word.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (CheckKind::Run, "test", CheckState::Passed, "success"),
                (CheckKind::Run, "lint", CheckState::Pending, "in_progress"),
                (
                    CheckKind::Status,
                    "ci/jenkins",
                    CheckState::Passed,
                    "success"
                ),
            ]
        );
        // Dependabot's suite has no check run: only GitHub Actions' is waited for.
        assert_eq!(running, ["GitHub Actions"]);

        let Evidence::FullList { running, .. } = full_list(&[], &[], &[], false) else {
            panic!()
        };
        assert_eq!(
            running.len(),
            1,
            "an unfinished list leaves something to wait for"
        );
    }

    #[test]
    fn errors_double_the_pause_up_to_the_cap_and_a_good_round_resets_it() {
        assert_eq!(pause_after(0), POLL_INTERVAL);
        assert_eq!(pause_after(1), 2 * POLL_INTERVAL);
        assert_eq!(pause_after(2), 4 * POLL_INTERVAL);
        assert_eq!(pause_after(4), MAX_BACKOFF);
        assert_eq!(pause_after(u32::MAX), MAX_BACKOFF);
    }
}
