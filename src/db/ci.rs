//! The CI gate's rows: a push to an app that deploys only after CI (`trigger = "travis"`) is
//! recorded `waiting`; the build's report releases it into the queue or ends it `failed`.
//! Every function runs under the connection's lock, so a check and the change that follows
//! it cannot interleave with another writer.

use rusqlite::{Connection, OptionalExtension, params};

use super::now_ms;
use super::queries::{Enqueued, enqueue, record_delivery_of, seen_delivery};
use crate::domain::{CiBuild, DeploymentId, DeploymentStatus, Stage, Trigger};

/// What a CI report did.
#[derive(Debug, PartialEq, Eq)]
pub enum CiOutcome {
    /// A passed build queued deployment `id`; `superseded` were queued or waiting before it.
    Released {
        id: DeploymentId,
        superseded: Vec<DeploymentId>,
    },
    /// A failed build ended deployment `id` (the waiting one, or a new row that records it).
    Failed { id: DeploymentId },
    /// The same report was received before; `id` is what it made then.
    Duplicate { id: Option<DeploymentId> },
    /// Nothing to do, and why.
    Ignored(String),
}

/// Records a push that waits for CI; older waiting pushes of the app are superseded (the
/// newest push wins, as in the queue). With a delivery id, a redelivery changes nothing.
pub fn hold(conn: &mut Connection, trigger: &Trigger) -> rusqlite::Result<Enqueued> {
    let tx = conn.transaction()?;
    let now = now_ms();
    if let Some(duplicate) = seen_delivery(&tx, trigger)? {
        return Ok(duplicate);
    }
    let superseded = supersede(&tx, trigger.app.as_str(), "waiting", i64::MAX, now)?;
    let id = insert(&tx, trigger, DeploymentStatus::Waiting, now)?;
    insert_stages(&tx, id, "pending")?;
    link_delivery(&tx, trigger, id, now)?;
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
        let mut superseded = supersede(&tx, app, "queued", i64::MAX, now)?;
        // An older push still waiting would deploy older code after this one: drop it.
        superseded.extend(supersede(&tx, app, "waiting", id, now)?);
        tx.execute(
            "UPDATE deployments SET status = 'queued', ci_build_number = ?2, ci_build_url = ?3
             WHERE id = ?1",
            params![id, build.number, build.url],
        )?;
        link_delivery(&tx, trigger, id, now)?;
        tx.commit()?;
        return Ok(CiOutcome::Released { id, superseded });
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
        Some(id) => {
            tx.execute(
                "UPDATE stages SET status = 'skipped' WHERE deployment_id = ?1",
                [id],
            )?;
            id
        }
        None => {
            let id = insert(&tx, trigger, DeploymentStatus::Failed, now)?;
            insert_stages(&tx, id, "skipped")?;
            id
        }
    };
    tx.execute(
        "UPDATE deployments SET status = 'failed', error = ?2, finished_at = ?3,
             ci_build_number = ?4, ci_build_url = ?5
         WHERE id = ?1",
        params![id, reason, now, build.number, build.url],
    )?;
    link_delivery(&tx, trigger, id, now)?;
    tx.commit()?;
    Ok(CiOutcome::Failed { id })
}

fn link_delivery(
    conn: &Connection,
    trigger: &Trigger,
    id: DeploymentId,
    now: i64,
) -> rusqlite::Result<()> {
    record_delivery_of(conn, trigger, Some(id), now)
}

/// Ends the app's rows in `status` older than `before` as superseded; returns their ids.
fn supersede(
    conn: &Connection,
    app: &str,
    status: &str,
    before: DeploymentId,
    now: i64,
) -> rusqlite::Result<Vec<DeploymentId>> {
    let why = if status == "waiting" {
        "a newer push replaced this one before CI passed it"
    } else {
        "a newer deployment was queued"
    };
    let ids = conn
        .prepare(
            "UPDATE deployments SET status = 'superseded', finished_at = ?4, error = ?5
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

fn insert(
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
    Ok(conn.last_insert_rowid())
}

fn insert_stages(conn: &Connection, id: DeploymentId, status: &str) -> rusqlite::Result<()> {
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
        "UPDATE deployments SET ci_build_number = ?2, ci_build_url = ?3 WHERE id = ?1",
        params![id, build.number, build.url],
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
    use crate::domain::{AppName, CommitSha, Delivery, TriggerKind};

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
        let Enqueued::New { id: a, .. } =
            hold(&mut conn, &trigger('a', TriggerKind::Push, "p1")).unwrap()
        else {
            panic!()
        };
        let Enqueued::New { id: b, superseded } =
            hold(&mut conn, &trigger('b', TriggerKind::Push, "p2")).unwrap()
        else {
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
        let Enqueued::New { id, .. } =
            hold(&mut conn, &trigger('a', TriggerKind::Push, "p1")).unwrap()
        else {
            panic!()
        };
        let outcome = ci_failed(
            &mut conn,
            &trigger('a', TriggerKind::Travis, "t1"),
            &build("3"),
            "broken",
        )
        .unwrap();
        assert_eq!(outcome, CiOutcome::Failed { id });
        assert_eq!(status(&conn, id), "failed");
        let skipped: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM stages WHERE deployment_id = ?1 AND status = 'skipped'",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(skipped as usize, Stage::ALL.len());

        let CiOutcome::Failed { id: other } = ci_failed(
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
}
