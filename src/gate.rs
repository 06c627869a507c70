//! The checks gate's rule (`trigger = "checks"`): from what GitHub reported about a commit's
//! check runs and commit statuses, whether the commit may deploy, must not, or waits — and
//! for what. Pure: no I/O and no clock, so a webhook, the poller and a restart reach the
//! same verdict from the same reports. It never decides a pass on partial evidence when
//! every check is required: one webhook speaks of one check, and only GitHub's full list
//! of the commit's checks says that no other one runs.

use crate::config::AppConfig;
use crate::domain::{CheckKind, CheckReport, CheckState, CheckVerdict, CommitSha};

/// Which checks must pass before a commit deploys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Required {
    /// Every check run and commit status GitHub shows on the commit, and at least one.
    Every,
    /// These check runs or status contexts, each by name (`checks = ["test", "lint"]`).
    Named(Vec<String>),
}

impl Required {
    pub fn of(app: &AppConfig) -> Self {
        if app.checks.is_empty() {
            Self::Every
        } else {
            Self::Named(app.checks.clone())
        }
    }

    /// What a push of `commit` waits for before any check reported.
    pub fn describe(&self, commit: &CommitSha) -> String {
        match self {
            Self::Every => format!("every check on {} to pass", commit.short()),
            Self::Named(names) => {
                format!("checks {} to pass on {}", names.join(", "), commit.short())
            }
        }
    }
}

/// How much of a commit's checks the reports cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage<'a> {
    /// What webhooks said so far: a check that has not reported yet is unknown.
    Partial,
    /// GitHub's API listed every check on the commit; `running` are the check suites
    /// (workflow runs) not finished yet, which may still start checks of their own (a job
    /// that `needs:` another appears only once that one is done).
    Complete { running: &'a [String] },
}

/// How the gate hears about a waiting commit's checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// A webhook (`check_run`, `status`): one check's latest state.
    Report(CheckReport),
    /// A webhook (`check_suite`, `workflow_run`): the named suite finished. Which checks it
    /// ran, and whether others run, is for GitHub's full list to say.
    SuiteFinished(String),
    /// GitHub's API: every check on the commit, and the suites still running.
    FullList {
        reports: Vec<CheckReport>,
        running: Vec<String>,
    },
    /// The commit waited longer than the gate allows (`limit` in words).
    OutOfTime { limit: String },
}

impl Evidence {
    /// The reports it brings, to be kept with what was heard before.
    pub fn reports(&self) -> &[CheckReport] {
        match self {
            Self::Report(report) => std::slice::from_ref(report),
            Self::FullList { reports, .. } => reports,
            Self::SuiteFinished(_) | Self::OutOfTime { .. } => &[],
        }
    }

    /// The verdict once this evidence is heard; `known` is the latest report per check,
    /// this evidence's included.
    pub fn judge(&self, required: &Required, known: &[CheckReport]) -> CheckVerdict {
        match self {
            Self::Report(_) => decide(required, known, Coverage::Partial),
            Self::SuiteFinished(suite) => match decide(required, known, Coverage::Partial) {
                // A finished suite is the moment to ask for the full list, whatever the
                // webhooks said so far.
                CheckVerdict::Waiting { .. } => CheckVerdict::Waiting {
                    waiting_for: format!(
                        "GitHub's list of every check on the commit ({suite} finished)"
                    ),
                    confirm: true,
                },
                decided => decided,
            },
            Self::FullList { running, .. } => {
                decide(required, known, Coverage::Complete { running })
            }
            Self::OutOfTime { limit } => out_of_time(required, known, limit),
        }
    }
}

/// What `reports` (the latest per check, in any order) decide under `required`. A failed
/// required check fails the commit whatever the coverage; a pass of every check needs
/// complete coverage.
pub fn decide(required: &Required, reports: &[CheckReport], coverage: Coverage) -> CheckVerdict {
    let mut relevant: Vec<&CheckReport> = match required {
        Required::Every => reports.iter().collect(),
        Required::Named(names) => reports
            .iter()
            .filter(|report| names.contains(&report.name))
            .collect(),
    };
    // The same reports give the same verdict and the same words, whatever their order.
    relevant.sort_by(|a, b| (&a.name, a.kind.as_str()).cmp(&(&b.name, b.kind.as_str())));
    if let Some(failed) = relevant.iter().find(|r| r.state == CheckState::Failed) {
        return CheckVerdict::Failed {
            check: Some((*failed).clone()),
            reason: failure(failed),
        };
    }
    let mut waiting: Vec<String> = relevant
        .iter()
        .filter(|r| r.state == CheckState::Pending)
        .map(|r| format!("{} ({})", r.name, r.word))
        .collect();
    let passed = || {
        let mut names: Vec<String> = relevant.iter().map(|r| r.name.clone()).collect();
        names.dedup();
        names
    };
    match required {
        Required::Named(names) => {
            for name in names {
                if !relevant.iter().any(|r| &r.name == name) {
                    waiting.push(format!("{name} (not reported yet)"));
                }
            }
            if waiting.is_empty() {
                return CheckVerdict::Passed {
                    passed: names.clone(),
                };
            }
            wait(waiting.join(", "), false)
        }
        Required::Every if !waiting.is_empty() => wait(waiting.join(", "), false),
        Required::Every => match coverage {
            _ if relevant.is_empty() => wait("a first check to report".into(), false),
            Coverage::Partial => wait(
                "GitHub's list of every check on the commit (those reported so far passed)".into(),
                true,
            ),
            Coverage::Complete { running } if !running.is_empty() => {
                wait(format!("{} to finish", running.join(", ")), false)
            }
            Coverage::Complete { .. } => CheckVerdict::Passed { passed: passed() },
        },
    }
}

/// The verdict on a commit that waited past the gate's limit (`limit` in words, `24 h`):
/// a failed check still fails it for that check, anything else for the time.
pub fn out_of_time(required: &Required, reports: &[CheckReport], limit: &str) -> CheckVerdict {
    match decide(required, reports, Coverage::Partial) {
        failed @ CheckVerdict::Failed { .. } => failed,
        CheckVerdict::Passed { .. } => CheckVerdict::Failed {
            check: None,
            reason: format!("no verdict on its checks within {limit}"),
        },
        CheckVerdict::Waiting { waiting_for, .. } => CheckVerdict::Failed {
            check: None,
            reason: format!("no verdict on its checks within {limit}; it waited for {waiting_for}"),
        },
    }
}

fn wait(waiting_for: String, confirm: bool) -> CheckVerdict {
    CheckVerdict::Waiting {
        waiting_for,
        confirm,
    }
}

/// `check run `test` failed (timed_out): https://…`.
fn failure(report: &CheckReport) -> String {
    let kind = match report.kind {
        CheckKind::Run => "check run",
        CheckKind::Status => "commit status",
    };
    let what = format!("{kind} `{}` failed ({})", report.name, report.word);
    match &report.url {
        Some(url) => format!("{what}: {url}"),
        None => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(kind: CheckKind, name: &str, id: i64, state: CheckState, word: &str) -> CheckReport {
        CheckReport {
            kind,
            name: name.into(),
            github_id: id,
            state,
            word: word.into(),
            url: Some(format!("https://github.com/acme/hello/runs/{id}")),
        }
    }

    fn run(name: &str, state: CheckState, word: &str) -> CheckReport {
        report(CheckKind::Run, name, 1, state, word)
    }

    fn named(names: &[&str]) -> Required {
        Required::Named(names.iter().map(|n| n.to_string()).collect())
    }

    const DONE: Coverage = Coverage::Complete { running: &[] };

    #[test]
    fn named_checks_pass_once_each_passed_whatever_else_reports() {
        let reports = [
            run("test", CheckState::Passed, "success"),
            report(CheckKind::Status, "lint", 7, CheckState::Passed, "success"),
            run("flaky-extra", CheckState::Failed, "failure"),
        ];
        let required = named(&["test", "lint"]);
        assert_eq!(
            decide(&required, &reports, Coverage::Partial),
            CheckVerdict::Passed {
                passed: vec!["test".into(), "lint".into()]
            }
        );
        assert_eq!(
            decide(&required, &reports[..1], Coverage::Partial),
            CheckVerdict::Waiting {
                waiting_for: "lint (not reported yet)".into(),
                confirm: false
            }
        );
        let running = [run("test", CheckState::Pending, "in_progress")];
        assert_eq!(
            decide(&required, &running, DONE),
            CheckVerdict::Waiting {
                waiting_for: "test (in_progress), lint (not reported yet)".into(),
                confirm: false
            }
        );
    }

    #[test]
    fn a_failed_required_check_fails_the_commit_with_its_name_and_page() {
        let reports = [
            run("test", CheckState::Pending, "queued"),
            report(CheckKind::Run, "lint", 4, CheckState::Failed, "timed_out"),
        ];
        for required in [Required::Every, named(&["lint"])] {
            let CheckVerdict::Failed { check, reason } =
                decide(&required, &reports, Coverage::Partial)
            else {
                panic!("{required:?}")
            };
            assert_eq!(check.unwrap().name, "lint");
            assert_eq!(
                reason,
                "check run `lint` failed (timed_out): https://github.com/acme/hello/runs/4"
            );
        }
        // A check nobody requires may fail.
        assert!(matches!(
            decide(&named(&["test"]), &reports, DONE),
            CheckVerdict::Waiting { .. }
        ));
    }

    #[test]
    fn every_check_passes_only_on_githubs_full_list_with_nothing_still_running() {
        let passed = [
            run("test", CheckState::Passed, "success"),
            run("docs", CheckState::Passed, "skipped"),
        ];
        assert_eq!(
            decide(&Required::Every, &passed, Coverage::Partial),
            CheckVerdict::Waiting {
                waiting_for:
                    "GitHub's list of every check on the commit (those reported so far passed)"
                        .into(),
                confirm: true
            }
        );
        assert_eq!(
            decide(&Required::Every, &passed, DONE),
            CheckVerdict::Passed {
                passed: vec!["docs".into(), "test".into()]
            }
        );
        let running = ["CI".to_owned()];
        assert_eq!(
            decide(
                &Required::Every,
                &passed,
                Coverage::Complete { running: &running }
            ),
            CheckVerdict::Waiting {
                waiting_for: "CI to finish".into(),
                confirm: false
            }
        );
    }

    #[test]
    fn a_commit_without_any_check_waits_even_on_the_full_list() {
        for coverage in [Coverage::Partial, DONE] {
            assert_eq!(
                decide(&Required::Every, &[], coverage),
                CheckVerdict::Waiting {
                    waiting_for: "a first check to report".into(),
                    confirm: false
                }
            );
        }
        assert!(matches!(
            decide(&named(&["test"]), &[], DONE),
            CheckVerdict::Waiting { confirm: false, .. }
        ));
    }

    #[test]
    fn the_verdict_does_not_depend_on_the_order_of_the_reports() {
        let mut reports = vec![
            run("b", CheckState::Failed, "failure"),
            run("a", CheckState::Failed, "cancelled"),
            run("c", CheckState::Pending, "queued"),
        ];
        let first = decide(&Required::Every, &reports, DONE);
        reports.reverse();
        assert_eq!(decide(&Required::Every, &reports, DONE), first);
        let CheckVerdict::Failed { check, .. } = first else {
            panic!()
        };
        assert_eq!(check.unwrap().name, "a");
    }

    #[test]
    fn past_the_limit_a_waiting_commit_fails_saying_what_it_waited_for() {
        let reports = [run("test", CheckState::Pending, "queued")];
        assert_eq!(
            out_of_time(&Required::Every, &reports, "24 h"),
            CheckVerdict::Failed {
                check: None,
                reason: "no verdict on its checks within 24 h; it waited for test (queued)".into()
            }
        );
        let failed = [run("test", CheckState::Failed, "failure")];
        assert!(matches!(
            out_of_time(&Required::Every, &failed, "24 h"),
            CheckVerdict::Failed { check: Some(_), .. }
        ));
    }

    #[test]
    fn a_finished_suite_asks_for_the_full_list_unless_a_check_already_decided() {
        let finished = Evidence::SuiteFinished("CI".into());
        let pending = [run("test", CheckState::Pending, "in_progress")];
        assert_eq!(
            finished.judge(&Required::Every, &pending),
            CheckVerdict::Waiting {
                waiting_for: "GitHub's list of every check on the commit (CI finished)".into(),
                confirm: true
            }
        );
        let passed = [run("test", CheckState::Passed, "success")];
        assert!(matches!(
            finished.judge(&named(&["test"]), &passed),
            CheckVerdict::Passed { .. }
        ));
        assert!(finished.reports().is_empty());
        let full = Evidence::FullList {
            reports: passed.to_vec(),
            running: vec![],
        };
        assert_eq!(full.reports(), passed);
        assert!(matches!(
            full.judge(&Required::Every, &passed),
            CheckVerdict::Passed { .. }
        ));
    }

    #[test]
    fn what_a_push_waits_for_names_the_checks() {
        let sha = CommitSha::parse(&"ab".repeat(20)).unwrap();
        assert_eq!(
            Required::Every.describe(&sha),
            "every check on abababa to pass"
        );
        assert_eq!(
            named(&["test", "lint"]).describe(&sha),
            "checks test, lint to pass on abababa"
        );
    }
}
