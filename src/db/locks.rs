//! An app's lock: while it is held, a push is recorded `waiting` with the lock as what it
//! waits for (`held_by_lock`), in the same transaction that would have queued it, so a push
//! and `unlock` cannot cross. `unlock` releases the newest waiting push into the queue and
//! supersedes the older ones. Manual deploys and rollbacks are not stopped here: whether a
//! manual deploy may pass a lock (`force`) is decided before it is queued.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::ci::{insert, insert_stages, supersede};
use super::now_ms;
use super::queries::record_delivery_of;
use super::triggers::mark_superseded;
use crate::domain::{DeploymentId, DeploymentStatus, Trigger};

/// Who locked an app, when and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lock {
    pub reason: String,
    pub actor: String,
    pub locked_at: i64,
}

impl Lock {
    /// What a push held by this lock waits for, in words.
    pub fn waiting_for(&self, app: &str) -> String {
        format!(
            "`{app}` to be unlocked (locked by {}: {})",
            self.actor, self.reason
        )
    }
}

/// What `lock` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Locking {
    Locked(Lock),
    /// It was locked already, by this lock; nothing changed.
    AlreadyLocked(Lock),
}

/// What `unlock` did: the lock it released, the push it queued, the older ones it superseded.
#[derive(Debug, PartialEq, Eq)]
pub struct Unlocked {
    pub lock: Lock,
    pub released: Option<DeploymentId>,
    pub superseded: Vec<DeploymentId>,
}

pub fn lock_of(conn: &Connection, app: &str) -> rusqlite::Result<Option<Lock>> {
    conn.query_row(
        "SELECT reason, actor, locked_at FROM locks WHERE app = ?1",
        [app],
        |row| {
            Ok(Lock {
                reason: row.get(0)?,
                actor: row.get(1)?,
                locked_at: row.get(2)?,
            })
        },
    )
    .optional()
}

pub fn lock(
    conn: &mut Connection,
    app: &str,
    reason: &str,
    actor: &str,
) -> rusqlite::Result<Locking> {
    let tx = conn.transaction()?;
    if let Some(held) = lock_of(&tx, app)? {
        return Ok(Locking::AlreadyLocked(held));
    }
    let lock = Lock {
        reason: reason.to_owned(),
        actor: actor.to_owned(),
        locked_at: now_ms(),
    };
    tx.execute(
        "INSERT INTO locks (app, reason, actor, locked_at) VALUES (?1, ?2, ?3, ?4)",
        params![app, lock.reason, lock.actor, lock.locked_at],
    )?;
    tx.commit()?;
    Ok(Locking::Locked(lock))
}

/// Releases `app`'s lock (`None`: it was not locked) and queues the newest push that waited
/// for it; every older push still waiting, and anything queued before it, is superseded.
pub fn unlock(conn: &mut Connection, app: &str) -> rusqlite::Result<Option<Unlocked>> {
    let tx = conn.transaction()?;
    let Some(lock) = lock_of(&tx, app)? else {
        return Ok(None);
    };
    tx.execute("DELETE FROM locks WHERE app = ?1", [app])?;
    let newest: Option<DeploymentId> = tx
        .query_row(
            "SELECT id FROM deployments WHERE app = ?1 AND status = 'waiting' AND held_by_lock = 1
             ORDER BY id DESC LIMIT 1",
            [app],
            |row| row.get(0),
        )
        .optional()?;
    let mut superseded = Vec::new();
    if let Some(id) = newest {
        let now = now_ms();
        let why = "a newer push was waiting when the app was unlocked";
        superseded = supersede(&tx, app, "queued", id, now, why)?;
        superseded.extend(supersede(&tx, app, "waiting", id, now, why)?);
        tx.execute(
            "UPDATE deployments SET status = 'queued', held_by_lock = 0, ci_waiting_for = NULL
             WHERE id = ?1",
            [id],
        )?;
        mark_superseded(&tx, &superseded, id)?;
    }
    tx.commit()?;
    Ok(Some(Unlocked {
        lock,
        released: newest,
        superseded,
    }))
}

/// Records `trigger` as a push waiting for `lock` (inside the caller's transaction).
pub(super) fn hold_for_lock(
    conn: &Connection,
    trigger: &Trigger,
    lock: &Lock,
    now: i64,
) -> rusqlite::Result<(DeploymentId, String)> {
    let id = insert(conn, trigger, DeploymentStatus::Waiting, now)?;
    let waiting_for = lock.waiting_for(trigger.app.as_str());
    conn.execute(
        "UPDATE deployments SET held_by_lock = 1, ci_waiting_for = ?2 WHERE id = ?1",
        params![id, waiting_for],
    )?;
    insert_stages(conn, id, "pending")?;
    record_delivery_of(conn, trigger, Some(id), now)?;
    Ok((id, waiting_for))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{CiOutcome, Enqueued, NewTrigger, ci_passed, enqueue, hold, record_trigger};
    use crate::domain::{AppName, CiBuild, CommitSha, Decision, Delivery, TriggerKind};

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        for sql in super::super::MIGRATIONS {
            conn.execute_batch(sql).unwrap();
        }
        conn
    }

    fn push(sha: char, kind: TriggerKind) -> Trigger {
        Trigger {
            app: AppName::parse("hello").unwrap(),
            commit: Some(CommitSha::parse(&sha.to_string().repeat(40)).unwrap()),
            branch: "main".into(),
            kind,
            delivery: Some(Delivery {
                source: "test",
                id: format!("delivery-{sha}"),
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

    fn held(conn: &mut Connection, sha: char) -> DeploymentId {
        match enqueue(conn, &push(sha, TriggerKind::Push)).unwrap() {
            Enqueued::Held { id, waiting_for } => {
                assert_eq!(
                    waiting_for,
                    "`hello` to be unlocked (locked by admin: release freeze)"
                );
                id
            }
            other => panic!("not held: {other:?}"),
        }
    }

    #[test]
    fn pushes_wait_while_locked_and_unlock_queues_the_newest_superseding_the_rest() {
        let mut conn = conn();
        assert!(matches!(
            lock(&mut conn, "hello", "release freeze", "admin").unwrap(),
            Locking::Locked(_)
        ));
        let Locking::AlreadyLocked(first) =
            lock(&mut conn, "hello", "another", "dashboard").unwrap()
        else {
            panic!("locked twice")
        };
        assert_eq!(
            (first.actor.as_str(), first.reason.as_str()),
            ("admin", "release freeze")
        );
        let older = held(&mut conn, 'a');
        let newer = held(&mut conn, 'b');
        for id in [older, newer] {
            assert_eq!(status(&conn, id), "waiting");
            record_trigger(
                &conn,
                &NewTrigger {
                    app: Some(AppName::parse("hello").unwrap()),
                    source: "github",
                    event: Some("push".into()),
                    delivery_id: None,
                    actor: "github".into(),
                    decision: Decision::Blocked,
                    reason: "waits".into(),
                    status: 202,
                    deployment_id: Some(id),
                },
            )
            .unwrap();
        }
        // A manual deploy is not held here (the web layer asks for `force`).
        let mut manual = push('c', TriggerKind::Manual);
        manual.delivery = None;
        assert!(matches!(
            enqueue(&mut conn, &manual).unwrap(),
            Enqueued::New { .. }
        ));

        let unlocked = unlock(&mut conn, "hello").unwrap().expect("it was locked");
        assert_eq!(unlocked.lock, first);
        assert_eq!(unlocked.released, Some(newer));
        assert_eq!(unlocked.superseded, vec![older]);
        assert_eq!(status(&conn, newer), "queued");
        assert_eq!(status(&conn, older), "superseded");
        let reason: String = conn
            .query_row(
                "SELECT decision || ': ' || reason FROM triggers WHERE deployment_id = ?1",
                [older],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            reason,
            format!("superseded: superseded by #{newer} before it ran")
        );
        assert_eq!(lock_of(&conn, "hello").unwrap(), None);
        assert_eq!(
            unlock(&mut conn, "hello").unwrap(),
            None,
            "not locked any more"
        );
    }

    #[test]
    fn a_ci_pass_while_locked_waits_for_the_lock_not_for_ci() {
        let mut conn = conn();
        let Enqueued::New { id, .. } = hold(
            &mut conn,
            &push('a', TriggerKind::Push),
            "Travis CI to pass",
        )
        .unwrap() else {
            panic!()
        };
        lock(&mut conn, "hello", "release freeze", "admin").unwrap();
        let build = CiBuild {
            number: Some("7".into()),
            ..CiBuild::default()
        };
        let mut report = push('a', TriggerKind::Travis);
        report.delivery = None;
        let outcome = ci_passed(&mut conn, &report, &build).unwrap();
        assert!(
            matches!(&outcome, CiOutcome::Held { id: held, .. } if *held == id),
            "{outcome:?}"
        );
        assert_eq!(status(&conn, id), "waiting");
        assert!(
            crate::db::waiting_commits(&conn, "hello")
                .unwrap()
                .is_empty(),
            "the checks poller leaves a push held by the lock alone"
        );
        let unlocked = unlock(&mut conn, "hello").unwrap().unwrap();
        assert_eq!(unlocked.released, Some(id));
        assert_eq!(status(&conn, id), "queued");
    }
}
