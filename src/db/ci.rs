//! The CI gate's rows: a push to an app that deploys only after CI (`trigger = "travis"` or
//! `"checks"`) is recorded `waiting`, with what it waits for; CI's report releases it into
//! the queue or ends it `failed`. For the checks gate, the latest report of each of the
//! commit's checks is kept while it waits (`ci_checks`). Every function runs under the
//! connection's lock, so a check and the change that follows it cannot interleave with
//! another writer.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::locks::lock_of;
use super::now_ms;
use super::queries::{Enqueued, enqueue, record_delivery_of, remember, seen, seen_delivery};
use super::triggers::mark_superseded;
use crate::domain::{
    CheckKind, CheckReport, CheckState, CheckVerdict, CiBuild, CommitSha, Delivery, DeploymentId,
    DeploymentStatus, Stage, Trigger,
};

/// What a CI report did.
#[derive(Debug, PartialEq, Eq)]
pub enum CiOutcome {
    /// A passed build queued deployment `id`; `superseded` were queued or waiting before it.
    Released {
        id: DeploymentId,
        superseded: Vec<DeploymentId>,
    },
    /// A failed build ended deployment `id` (the waiting one, or a new row that records it),
    /// for `reason`.
    Failed { id: DeploymentId, reason: String },
    /// Deployment `id` still waits, for `waiting_for`; `confirm`: ask GitHub for the full
    /// list of the commit's checks, only that can decide.
    Waiting {
        id: DeploymentId,
        waiting_for: String,
        confirm: bool,
    },
    /// CI passed deployment `id`, and the app is locked: it waits for `unlock`.
    Held {
        id: DeploymentId,
        waiting_for: String,
    },
    /// The same report was received before; `id` is what it made then.
    Duplicate { id: Option<DeploymentId> },
    /// Nothing to do, and why.
    Ignored(String),
}

/// A deployment waiting for its commit's checks, as the poller asks about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingCommit {
    pub id: DeploymentId,
    pub commit: CommitSha,
    pub created_at: i64,
}

/// Records a push that waits for CI (`waiting_for` says for what); older waiting pushes of
/// the app are superseded (the newest push wins, as in the queue). With a delivery id, a
/// redelivery changes nothing.
pub fn hold(
    conn: &mut Connection,
    trigger: &Trigger,
    waiting_for: &str,
) -> rusqlite::Result<Enqueued> {
    let tx = conn.transaction()?;
    let now = now_ms();
    if let Some(duplicate) = seen_delivery(&tx, trigger)? {
        return Ok(duplicate);
    }
    let superseded = supersede(
        &tx,
        trigger.app.as_str(),
        "waiting",
        DeploymentId::new(i64::MAX),
        now,
        REPLACED_BEFORE_CI,
    )?;
    let id = insert(&tx, trigger, DeploymentStatus::Waiting, now)?;
    mark_superseded(&tx, &superseded, id)?;
    tx.execute(
        "UPDATE deployments SET ci_waiting_for = ?2 WHERE id = ?1",
        params![id, waiting_for],
    )?;
    insert_stages(&tx, id, "pending")?;
    link_delivery(&tx, trigger, id, now)?;
    forget_settled_checks(&tx, trigger.app.as_str())?;
    tx.commit()?;
    Ok(Enqueued::New { id, superseded })
}

/// A build of `trigger.commit` passed: its waiting deployment joins the queue; with none
/// waiting, a new deployment is queued — unless a newer push already replaced that commit.
pub fn ci_passed(
    conn: &mut Connection,
    trigger: &Trigger,
    build: &CiBuild,
) -> rusqlite::Result<CiOutcome> {
    let now = now_ms();
    if let Some(Enqueued::Duplicate { id }) = seen_delivery(conn, trigger)? {
        return Ok(CiOutcome::Duplicate { id });
    }
    let app = trigger.app.as_str();
    let commit = trigger.commit.as_ref().map(|c| c.as_str());
    if let Some(id) = waiting_for(conn, app, commit)? {
        let tx = conn.transaction()?;
        let outcome = release(&tx, app, id, build, now)?;
        link_delivery(&tx, trigger, id, now)?;
        tx.commit()?;
        return Ok(outcome);
    }
    if let Some((id, status)) = latest_for(conn, app, commit)?
        && status == DeploymentStatus::Superseded.as_str()
    {
        record_delivery_of(conn, trigger, None, now)?;
        return Ok(CiOutcome::Ignored(format!(
            "a newer push replaced this commit (deployment {id} was superseded)"
        )));
    }
    match enqueue(conn, trigger)? {
        Enqueued::New { id, superseded } => {
            set_build(conn, id, build)?;
            Ok(CiOutcome::Released { id, superseded })
        }
        Enqueued::Held { id, waiting_for } => {
            set_build(conn, id, build)?;
            Ok(CiOutcome::Held { id, waiting_for })
        }
        Enqueued::Duplicate { id } => Ok(CiOutcome::Duplicate { id }),
    }
}

/// A build of `trigger.commit` failed: its waiting deployment ends `failed` with `reason`;
/// with none waiting, a failed row records the build so it shows in the history.
pub fn ci_failed(
    conn: &mut Connection,
    trigger: &Trigger,
    build: &CiBuild,
    reason: &str,
) -> rusqlite::Result<CiOutcome> {
    let tx = conn.transaction()?;
    let now = now_ms();
    if let Some(Enqueued::Duplicate { id }) = seen_delivery(&tx, trigger)? {
        return Ok(CiOutcome::Duplicate { id });
    }
    let app = trigger.app.as_str();
    let id = match waiting_for(&tx, app, trigger.commit.as_ref().map(|c| c.as_str()))? {
        Some(id) => id,
        None => {
            let id = insert(&tx, trigger, DeploymentStatus::Failed, now)?;
            insert_stages(&tx, id, "skipped")?;
            id
        }
    };
    fail(&tx, app, id, build, reason, now)?;
    link_delivery(&tx, trigger, id, now)?;
    tx.commit()?;
    Ok(CiOutcome::Failed {
        id,
        reason: reason.to_owned(),
    })
}

/// News of `commit`'s checks (`reports`, from a webhook's `delivery` or GitHub's API) for
/// the checks gate of `app`: kept with what was heard before (a check's newer run replaces
/// its older one), then `judge` decides over the latest report of every check, and the
/// waiting deployment is released, failed, or told what it waits for. Only a waiting commit
/// is heard; for any other, nothing is kept.
pub fn checks_reported(
    conn: &mut Connection,
    app: &str,
    commit: &CommitSha,
    delivery: Option<&Delivery>,
    reports: &[CheckReport],
    judge: impl FnOnce(&[CheckReport]) -> CheckVerdict,
) -> rusqlite::Result<CiOutcome> {
    let tx = conn.transaction()?;
    let now = now_ms();
    if let Some(id) = delivery.map(|d| seen(&tx, d)).transpose()?.flatten() {
        return Ok(CiOutcome::Duplicate { id });
    }
    let Some(id) = waiting_for(&tx, app, Some(commit.as_str()))? else {
        let reason = match latest_for(&tx, app, Some(commit.as_str()))? {
            Some((id, status)) => format!(
                "nothing waits for the checks of {}: its deployment {id} is {status}",
                commit.short()
            ),
            None => format!(
                "nothing waits for the checks of {}: no push of it was received",
                commit.short()
            ),
        };
        remember(&tx, delivery, None, now)?;
        tx.commit()?;
        return Ok(CiOutcome::Ignored(reason));
    };
    for report in reports {
        keep_check(&tx, app, commit, report, now)?;
    }
    let outcome = match judge(&checks_of(&tx, app, commit)?) {
        CheckVerdict::Passed { passed } => {
            let build = CiBuild {
                check: Some(passed.join(", ")),
                ..CiBuild::default()
            };
            release(&tx, app, id, &build, now)?
        }
        CheckVerdict::Failed { check, reason } => {
            let build = CiBuild {
                number: None,
                url: check.as_ref().and_then(|c| c.url.clone()),
                check: check.map(|c| c.name),
            };
            fail(&tx, app, id, &build, &reason, now)?;
            CiOutcome::Failed { id, reason }
        }
        CheckVerdict::Waiting {
            waiting_for,
            confirm,
        } => {
            tx.execute(
                "UPDATE deployments SET ci_waiting_for = ?2 WHERE id = ?1",
                params![id, waiting_for],
            )?;
            CiOutcome::Waiting {
                id,
                waiting_for,
                confirm,
            }
        }
    };
    remember(&tx, delivery, Some(id), now)?;
    tx.commit()?;
    Ok(outcome)
}

/// The app's deployments waiting for CI, oldest first (at most one per app, unless a
/// redelivered push raced its replacement).
pub fn waiting_commits(conn: &Connection, app: &str) -> rusqlite::Result<Vec<WaitingCommit>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, commit_sha, created_at FROM deployments
         WHERE app = ?1 AND status = 'waiting' AND held_by_lock = 0 AND commit_sha IS NOT NULL
         ORDER BY id",
    )?;
    stmt.query_map([app], |row| {
        Ok(WaitingCommit {
            id: row.get(0)?,
            commit: parsed(row, 1, |text| CommitSha::parse(text).ok())?,
            created_at: row.get(2)?,
        })
    })?
    .collect()
}

/// The latest report of each check kept for `commit`.
pub fn checks_of(
    conn: &Connection,
    app: &str,
    commit: &CommitSha,
) -> rusqlite::Result<Vec<CheckReport>> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, name, github_id, state, word, url FROM ci_checks
         WHERE app = ?1 AND commit_sha = ?2 ORDER BY name, kind",
    )?;
    stmt.query_map(params![app, commit.as_str()], |row| {
        Ok(CheckReport {
            kind: parsed(row, 0, CheckKind::parse)?,
            name: row.get(1)?,
            github_id: row.get(2)?,
            state: parsed(row, 3, CheckState::parse)?,
            word: row.get(4)?,
            url: row.get(5)?,
        })
    })?
    .collect()
}

/// Column `index` read through `parse`; a value it refuses is a read error, not a default.
fn parsed<T>(
    row: &Row<'_>,
    index: usize,
    parse: impl Fn(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            format!("`{text}` is not a value this column holds").into(),
        )
    })
}

/// Keeps `report` unless what is kept is newer: a higher GitHub id (a re-run, a newer
/// status), or the same run already concluded (its `in_progress` webhook came late).
fn keep_check(
    conn: &Connection,
    app: &str,
    commit: &CommitSha,
    report: &CheckReport,
    now: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO ci_checks (app, commit_sha, kind, name, github_id, state, word, url, reported_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (app, commit_sha, kind, name) DO UPDATE SET
             github_id = excluded.github_id, state = excluded.state, word = excluded.word,
             url = excluded.url, reported_at = excluded.reported_at
         WHERE excluded.github_id > ci_checks.github_id
            OR (excluded.github_id = ci_checks.github_id
                AND (excluded.state != 'pending' OR ci_checks.state = 'pending'))",
        params![
            app,
            commit.as_str(),
            report.kind.as_str(),
            report.name,
            report.github_id,
            report.state.as_str(),
            report.word,
            report.url,
            now
        ],
    )?;
    Ok(())
}

/// Reports are kept only while their commit waits: a released, failed or replaced push's
/// checks are forgotten.
fn forget_settled_checks(conn: &Connection, app: &str) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM ci_checks WHERE app = ?1 AND commit_sha NOT IN
             (SELECT commit_sha FROM deployments
              WHERE app = ?1 AND status = 'waiting' AND commit_sha IS NOT NULL)",
        [app],
    )?;
    Ok(())
}

/// Moves waiting deployment `id` into the queue with the CI that passed it; what was queued,
/// and older pushes still waiting, are superseded. While the app is locked it waits on, for
/// the lock now (`unlock` releases it).
fn release(
    conn: &Connection,
    app: &str,
    id: DeploymentId,
    build: &CiBuild,
    now: i64,
) -> rusqlite::Result<CiOutcome> {
    set_build(conn, id, build)?;
    if let Some(lock) = lock_of(conn, app)? {
        let waiting_for = lock.waiting_for(app);
        conn.execute(
            "UPDATE deployments SET held_by_lock = 1, ci_waiting_for = ?2 WHERE id = ?1",
            params![id, waiting_for],
        )?;
        return Ok(CiOutcome::Held { id, waiting_for });
    }
    let why = "a newer deployment was queued";
    let mut superseded = supersede(conn, app, "queued", DeploymentId::new(i64::MAX), now, why)?;
    // An older push still waiting would deploy older code after this one: drop it.
    superseded.extend(supersede(
        conn,
        app,
        "waiting",
        id,
        now,
        REPLACED_BEFORE_CI,
    )?);
    conn.execute(
        "UPDATE deployments SET status = 'queued', ci_waiting_for = NULL WHERE id = ?1",
        [id],
    )?;
    mark_superseded(conn, &superseded, id)?;
    forget_settled_checks(conn, app)?;
    Ok(CiOutcome::Released { id, superseded })
}

const REPLACED_BEFORE_CI: &str = "a newer push replaced this one before CI passed it";

/// Ends deployment `id` (waiting, or just recorded) `failed` for `reason`: none of its
/// stages will run.
fn fail(
    conn: &Connection,
    app: &str,
    id: DeploymentId,
    build: &CiBuild,
    reason: &str,
    now: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE stages SET status = 'skipped' WHERE deployment_id = ?1",
        [id],
    )?;
    conn.execute(
        "UPDATE deployments SET status = 'failed', error = ?2, finished_at = ?3,
             ci_waiting_for = NULL
         WHERE id = ?1",
        params![id, reason, now],
    )?;
    set_build(conn, id, build)?;
    forget_settled_checks(conn, app)
}

fn link_delivery(
    conn: &Connection,
    trigger: &Trigger,
    id: DeploymentId,
    now: i64,
) -> rusqlite::Result<()> {
    record_delivery_of(conn, trigger, Some(id), now)
}

/// Ends the app's rows in `status` older than `before` as superseded, for `why`; returns
/// their ids.
pub(super) fn supersede(
    conn: &Connection,
    app: &str,
    status: &str,
    before: DeploymentId,
    now: i64,
    why: &str,
) -> rusqlite::Result<Vec<DeploymentId>> {
    let ids = conn
        .prepare(
            "UPDATE deployments SET status = 'superseded', finished_at = ?4, error = ?5,
                 ci_waiting_for = NULL, held_by_lock = 0
             WHERE app = ?1 AND status = ?2 AND id < ?3 RETURNING id",
        )?
        .query_map(params![app, status, before, now, why], |row| row.get(0))?
        .collect::<rusqlite::Result<Vec<DeploymentId>>>()?;
    for id in &ids {
        conn.execute(
            "UPDATE stages SET status = 'skipped' WHERE deployment_id = ?1",
            [id],
        )?;
    }
    Ok(ids)
}

pub(super) fn insert(
    conn: &Connection,
    trigger: &Trigger,
    status: DeploymentStatus,
    now: i64,
) -> rusqlite::Result<DeploymentId> {
    conn.execute(
        "INSERT INTO deployments (app, status, trigger, branch, commit_sha, commit_message, author, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            trigger.app.as_str(),
            status.as_str(),
            trigger.kind.as_str(),
            trigger.branch,
            trigger.commit.as_ref().map(|c| c.as_str()),
            trigger.message,
            trigger.author,
            now
        ],
    )?;
    Ok(DeploymentId::new(conn.last_insert_rowid()))
}

pub(super) fn insert_stages(
    conn: &Connection,
    id: DeploymentId,
    status: &str,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO stages (deployment_id, position, name, status) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (position, stage) in Stage::ALL.iter().enumerate() {
        stmt.execute(params![id, position, stage.as_str(), status])?;
    }
    Ok(())
}

fn set_build(conn: &Connection, id: DeploymentId, build: &CiBuild) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE deployments SET ci_build_number = ?2, ci_build_url = ?3, ci_check = ?4
         WHERE id = ?1",
        params![id, build.number, build.url, build.check],
    )?;
    Ok(())
}

fn waiting_for(
    conn: &Connection,
    app: &str,
    commit: Option<&str>,
) -> rusqlite::Result<Option<DeploymentId>> {
    conn.query_row(
        "SELECT id FROM deployments WHERE app = ?1 AND commit_sha = ?2 AND status = 'waiting'
         ORDER BY id DESC LIMIT 1",
        params![app, commit],
        |row| row.get(0),
    )
    .optional()
}

fn latest_for(
    conn: &Connection,
    app: &str,
    commit: Option<&str>,
) -> rusqlite::Result<Option<(DeploymentId, String)>> {
    conn.query_row(
        "SELECT id, status FROM deployments WHERE app = ?1 AND commit_sha = ?2
         ORDER BY id DESC LIMIT 1",
        params![app, commit],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AppName, TriggerKind};

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        for sql in super::super::MIGRATIONS {
            conn.execute_batch(sql).unwrap();
        }
        conn
    }

    fn trigger(sha: char, kind: TriggerKind, delivery: &str) -> Trigger {
        Trigger {
            app: AppName::parse("hello").unwrap(),
            commit: Some(CommitSha::parse(&sha.to_string().repeat(40)).unwrap()),
            branch: "main".into(),
            kind,
            delivery: Some(Delivery {
                source: "test",
                id: delivery.into(),
                body_sha256: None,
            }),
            message: None,
            author: None,
            reuse: None,
        }
    }

    fn status(conn: &Connection, id: DeploymentId) -> String {
        conn.query_row("SELECT status FROM deployments WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap()
    }

    fn build(number: &str) -> CiBuild {
        CiBuild {
            number: Some(number.into()),
            check: None,
            url: Some(format!("https://ci.example/builds/{number}")),
        }
    }

    #[test]
    fn a_waiting_push_is_released_by_its_build_and_supersedes_older_waiting_ones() {
        let mut conn = conn();
        let Enqueued::New { id: a, .. } = hold(
            &mut conn,
            &trigger('a', TriggerKind::Push, "p1"),
            "CI to pass",
        )
        .unwrap() else {
            panic!()
        };
        let Enqueued::New { id: b, superseded } = hold(
            &mut conn,
            &trigger('b', TriggerKind::Push, "p2"),
            "CI to pass",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(superseded, vec![a]);
        assert_eq!(status(&conn, b), "waiting");

        let outcome = ci_passed(
            &mut conn,
            &trigger('b', TriggerKind::Travis, "t1"),
            &build("7"),
        )
        .unwrap();
        assert_eq!(
            outcome,
            CiOutcome::Released {
                id: b,
                superseded: vec![]
            }
        );
        assert_eq!(status(&conn, b), "queued");
        let (number, url): (String, String) = conn
            .query_row(
                "SELECT ci_build_number, ci_build_url FROM deployments WHERE id = ?1",
                [b],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (number.as_str(), url.as_str()),
            ("7", "https://ci.example/builds/7")
        );

        // The same report again changes nothing; a late pass of the replaced commit is ignored.
        assert_eq!(
            ci_passed(
                &mut conn,
                &trigger('b', TriggerKind::Travis, "t1"),
                &build("7")
            )
            .unwrap(),
            CiOutcome::Duplicate { id: Some(b) }
        );
        assert!(matches!(
            ci_passed(
                &mut conn,
                &trigger('a', TriggerKind::Travis, "t0"),
                &build("6")
            )
            .unwrap(),
            CiOutcome::Ignored(_)
        ));
    }

    #[test]
    fn a_pass_without_a_waiting_push_queues_a_new_deployment() {
        let mut conn = conn();
        let CiOutcome::Released { id, .. } = ci_passed(
            &mut conn,
            &trigger('c', TriggerKind::Travis, "t1"),
            &build("1"),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(status(&conn, id), "queued");
    }

    #[test]
    fn a_failed_build_ends_the_waiting_push_or_records_a_failed_row() {
        let mut conn = conn();
        let Enqueued::New { id, .. } = hold(
            &mut conn,
            &trigger('a', TriggerKind::Push, "p1"),
            "CI to pass",
        )
        .unwrap() else {
            panic!()
        };
        let outcome = ci_failed(
            &mut conn,
            &trigger('a', TriggerKind::Travis, "t1"),
            &build("3"),
            "broken",
        )
        .unwrap();
        assert_eq!(
            outcome,
            CiOutcome::Failed {
                id,
                reason: "broken".into()
            }
        );
        assert_eq!(status(&conn, id), "failed");
        let skipped: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM stages WHERE deployment_id = ?1 AND status = 'skipped'",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(skipped as usize, Stage::ALL.len());

        let CiOutcome::Failed { id: other, .. } = ci_failed(
            &mut conn,
            &trigger('d', TriggerKind::Travis, "t2"),
            &build("4"),
            "errored",
        )
        .unwrap() else {
            panic!()
        };
        assert_ne!(other, id);
        assert_eq!(status(&conn, other), "failed");
    }

    fn sha(c: char) -> CommitSha {
        CommitSha::parse(&c.to_string().repeat(40)).unwrap()
    }

    fn check(name: &str, id: i64, state: CheckState, word: &str) -> CheckReport {
        CheckReport {
            kind: CheckKind::Run,
            name: name.into(),
            github_id: id,
            state,
            word: word.into(),
            url: Some(format!("https://github.com/acme/hello/runs/{id}")),
        }
    }

    fn waiting() -> CheckVerdict {
        CheckVerdict::Waiting {
            waiting_for: "test".into(),
            confirm: false,
        }
    }

    /// Hears `reports` about commit `c` and returns what is kept after, deciding `verdict`.
    fn hear(
        conn: &mut Connection,
        c: char,
        reports: &[CheckReport],
        verdict: CheckVerdict,
    ) -> (CiOutcome, Vec<CheckReport>) {
        let mut kept = Vec::new();
        let outcome = checks_reported(conn, "hello", &sha(c), None, reports, |known| {
            kept = known.to_vec();
            verdict
        })
        .unwrap();
        (outcome, kept)
    }

    #[test]
    fn checks_of_a_commit_nothing_waits_for_are_ignored_and_not_kept() {
        let mut conn = conn();
        let report = check("test", 1, CheckState::Passed, "success");
        let (outcome, _) = hear(&mut conn, 'a', &[report], waiting());
        let CiOutcome::Ignored(reason) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(reason.contains("no push of it was received"), "{reason}");
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM ci_checks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn the_newest_run_of_each_check_is_kept_and_a_late_older_report_changes_nothing() {
        let mut conn = conn();
        hold(&mut conn, &trigger('a', TriggerKind::Push, "p1"), "checks").unwrap();
        let first = check("test", 10, CheckState::Failed, "cancelled");
        let rerun = check("test", 11, CheckState::Pending, "queued");
        let done = check("test", 11, CheckState::Passed, "success");
        let (_, kept) = hear(&mut conn, 'a', std::slice::from_ref(&first), waiting());
        assert_eq!(kept, std::slice::from_ref(&first));
        let (_, kept) = hear(&mut conn, 'a', std::slice::from_ref(&rerun), waiting());
        assert_eq!(
            kept,
            std::slice::from_ref(&rerun),
            "a re-run replaces the old verdict"
        );
        let (_, kept) = hear(&mut conn, 'a', std::slice::from_ref(&done), waiting());
        assert_eq!(kept, std::slice::from_ref(&done));
        // Late webhooks: the old run's, and the re-run's own `queued`.
        let (_, kept) = hear(&mut conn, 'a', &[first, rerun], waiting());
        assert_eq!(kept, [done]);
        let status = CheckReport {
            kind: CheckKind::Status,
            ..check("test", 3, CheckState::Pending, "pending")
        };
        let (_, kept) = hear(&mut conn, 'a', &[status], waiting());
        assert_eq!(
            kept.len(),
            2,
            "a status and a check run of one name are two checks"
        );
    }

    #[test]
    fn a_verdict_releases_or_fails_the_waiting_push_and_forgets_its_checks() {
        let mut conn = conn();
        let Enqueued::New { id, .. } =
            hold(&mut conn, &trigger('a', TriggerKind::Push, "p1"), "checks").unwrap()
        else {
            panic!()
        };
        let passed = check("test", 1, CheckState::Passed, "success");
        let (outcome, _) = hear(
            &mut conn,
            'a',
            &[passed],
            CheckVerdict::Passed {
                passed: vec!["test".into(), "lint".into()],
            },
        );
        assert_eq!(
            outcome,
            CiOutcome::Released {
                id,
                superseded: vec![]
            }
        );
        let row = crate::db::deployment(&conn, id).unwrap().unwrap();
        assert_eq!(row.status, DeploymentStatus::Queued);
        assert_eq!(row.ci_check.as_deref(), Some("test, lint"));
        assert_eq!(row.ci_waiting_for, None);
        assert!(checks_of(&conn, "hello", &sha('a')).unwrap().is_empty());

        let Enqueued::New { id, .. } =
            hold(&mut conn, &trigger('b', TriggerKind::Push, "p2"), "checks").unwrap()
        else {
            panic!()
        };
        let failed = check("lint", 2, CheckState::Failed, "failure");
        let (outcome, _) = hear(
            &mut conn,
            'b',
            std::slice::from_ref(&failed),
            CheckVerdict::Failed {
                check: Some(failed.clone()),
                reason: "lint failed".into(),
            },
        );
        assert_eq!(
            outcome,
            CiOutcome::Failed {
                id,
                reason: "lint failed".into()
            }
        );
        let row = crate::db::deployment(&conn, id).unwrap().unwrap();
        assert_eq!(row.status, DeploymentStatus::Failed);
        assert_eq!(row.error.as_deref(), Some("lint failed"));
        assert_eq!(row.ci_check.as_deref(), Some("lint"));
        assert_eq!(
            row.ci_build_url.as_deref(),
            Some("https://github.com/acme/hello/runs/2")
        );
        assert!(row.started_at.is_none());
    }

    #[test]
    fn a_waiting_push_says_what_for_and_a_newer_push_replaces_it_and_its_checks() {
        let mut conn = conn();
        let Enqueued::New { id: old, .. } = hold(
            &mut conn,
            &trigger('a', TriggerKind::Push, "p1"),
            "every check on aaaaaaa to pass",
        )
        .unwrap() else {
            panic!()
        };
        let row = crate::db::deployment(&conn, old).unwrap().unwrap();
        assert_eq!(
            row.ci_waiting_for.as_deref(),
            Some("every check on aaaaaaa to pass")
        );
        let pending = check("test", 1, CheckState::Pending, "in_progress");
        let (outcome, _) = hear(
            &mut conn,
            'a',
            &[pending],
            CheckVerdict::Waiting {
                waiting_for: "test (in_progress)".into(),
                confirm: true,
            },
        );
        assert_eq!(
            outcome,
            CiOutcome::Waiting {
                id: old,
                waiting_for: "test (in_progress)".into(),
                confirm: true
            }
        );
        let row = crate::db::deployment(&conn, old).unwrap().unwrap();
        assert_eq!(row.ci_waiting_for.as_deref(), Some("test (in_progress)"));
        assert_eq!(
            waiting_commits(&conn, "hello").unwrap(),
            [WaitingCommit {
                id: old,
                commit: sha('a'),
                created_at: row.created_at
            }]
        );

        let Enqueued::New { id, superseded } =
            hold(&mut conn, &trigger('b', TriggerKind::Push, "p2"), "checks").unwrap()
        else {
            panic!()
        };
        assert_eq!(superseded, [old]);
        assert!(checks_of(&conn, "hello", &sha('a')).unwrap().is_empty());
        assert_eq!(waiting_commits(&conn, "hello").unwrap()[0].id, id);
        let (outcome, _) = hear(&mut conn, 'a', &[], waiting());
        assert!(
            matches!(&outcome, CiOutcome::Ignored(why) if why.contains("is superseded")),
            "{outcome:?}"
        );
    }

    #[test]
    fn a_redelivered_check_event_is_a_duplicate() {
        let mut conn = conn();
        let Enqueued::New { id, .. } =
            hold(&mut conn, &trigger('a', TriggerKind::Push, "p1"), "checks").unwrap()
        else {
            panic!()
        };
        let delivery = Delivery {
            source: "github",
            id: "check-1".into(),
            body_sha256: Some("f00d".into()),
        };
        let report = [check("test", 1, CheckState::Pending, "queued")];
        for expected in [
            CiOutcome::Waiting {
                id,
                waiting_for: "test".into(),
                confirm: false,
            },
            CiOutcome::Duplicate { id: Some(id) },
        ] {
            let outcome = checks_reported(
                &mut conn,
                "hello",
                &sha('a'),
                Some(&delivery),
                &report,
                |_| waiting(),
            )
            .unwrap();
            assert_eq!(outcome, expected);
        }
    }
}
