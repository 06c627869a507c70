//! Typed queries: one function per question or change, each one statement or one transaction.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::locks::{hold_for_lock, lock_of};
use super::now_ms;
use super::triggers::mark_superseded;
use crate::domain::{
    AppName, BundleRef, CommitSha, Delivery, DeploymentId, DeploymentStatus, Stage, StageStatus,
    Trigger, TriggerKind,
};

#[derive(Clone, Debug, Serialize)]
pub struct Deployment {
    pub id: DeploymentId,
    pub app: AppName,
    pub status: DeploymentStatus,
    pub trigger: TriggerKind,
    pub branch: String,
    pub commit_sha: Option<CommitSha>,
    pub commit_message: Option<String>,
    pub author: Option<String>,
    pub version: Option<String>,
    pub port: Option<u16>,
    #[serde(flatten)]
    pub bundle: Option<BundleRef>,
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// For a rollback: the deployment it undoes.
    pub rollback_of: Option<DeploymentId>,
    /// The CI build that let this deployment through or failed it (Travis's number and page).
    pub ci_build_number: Option<String>,
    pub ci_build_url: Option<String>,
    /// With `trigger = "checks"`: the checks that let it through, or the one that failed it
    /// (its page is `ci_build_url`).
    pub ci_check: Option<String>,
    /// While `waiting`: what for (`Travis CI to pass …`, `test (in_progress), lint (queued)`).
    pub ci_waiting_for: Option<String>,
    /// The runner's own name for it elsewhere (the AWS CodeDeploy deployment id).
    pub runner_ref: Option<String>,
    /// When retention deleted its bundle from the store.
    pub bundle_pruned_at: Option<i64>,
}

const DEPLOYMENT_COLUMNS: &str = "id, app, status, trigger, branch, commit_sha, commit_message, \
     author, version, port, bundle_key, bundle_sha256, error, created_at, started_at, finished_at, \
     rollback_of, ci_build_number, ci_build_url, runner_ref, bundle_pruned_at, ci_check, \
     ci_waiting_for";

impl Deployment {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            app: row.get(1)?,
            status: row.get(2)?,
            trigger: row.get(3)?,
            branch: row.get(4)?,
            commit_sha: row.get(5)?,
            commit_message: row.get(6)?,
            author: row.get(7)?,
            version: row.get(8)?,
            port: row.get(9)?,
            bundle: match (row.get(10)?, row.get(11)?) {
                (Some(key), Some(sha256)) => Some(BundleRef { key, sha256 }),
                _ => None,
            },
            error: row.get(12)?,
            created_at: row.get(13)?,
            started_at: row.get(14)?,
            finished_at: row.get(15)?,
            rollback_of: row.get(16)?,
            ci_build_number: row.get(17)?,
            ci_build_url: row.get(18)?,
            runner_ref: row.get(19)?,
            bundle_pruned_at: row.get(20)?,
            ci_check: row.get(21)?,
            ci_waiting_for: row.get(22)?,
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StageRow {
    pub name: Stage,
    pub status: StageStatus,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub log: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Live {
    pub app: String,
    pub port: u16,
    pub profile: String,
    pub version: Option<String>,
    pub deployment_id: Option<DeploymentId>,
    pub since: i64,
}

/// What became of an enqueue request.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    New {
        id: DeploymentId,
        superseded: Vec<DeploymentId>,
    },
    /// The app is locked: the push was recorded `waiting` for the lock, as `id`.
    Held {
        id: DeploymentId,
        waiting_for: String,
    },
    /// The delivery was seen before; `id` is what it made then (None: it made nothing).
    Duplicate { id: Option<DeploymentId> },
}

/// Records a deployment and its pending stages, and supersedes the app's queued ones; with a
/// delivery id, a second call for the same delivery changes nothing. A push (or a CI pass)
/// to a locked app is recorded waiting for the lock instead; a manual deploy or a rollback
/// is not held here.
pub fn enqueue(conn: &mut Connection, trigger: &Trigger) -> rusqlite::Result<Enqueued> {
    let tx = conn.transaction()?;
    let now = now_ms();
    if let Some(duplicate) = seen_delivery(&tx, trigger)? {
        return Ok(duplicate);
    }
    if matches!(trigger.kind, TriggerKind::Push | TriggerKind::Travis)
        && let Some(lock) = lock_of(&tx, trigger.app.as_str())?
    {
        let (id, waiting_for) = hold_for_lock(&tx, trigger, &lock, now)?;
        tx.commit()?;
        return Ok(Enqueued::Held { id, waiting_for });
    }
    let superseded = {
        let mut stmt = tx.prepare(
            "UPDATE deployments SET status = 'superseded', finished_at = ?2,
                 error = 'a newer deployment was queued'
             WHERE app = ?1 AND status = 'queued' RETURNING id",
        )?;
        stmt.query_map(params![trigger.app.as_str(), now], |row| row.get(0))?
            .collect::<rusqlite::Result<Vec<DeploymentId>>>()?
    };
    for id in &superseded {
        tx.execute(
            "UPDATE stages SET status = 'skipped' WHERE deployment_id = ?1",
            [id],
        )?;
    }
    let reuse = trigger.reuse.as_ref();
    tx.execute(
        "INSERT INTO deployments (app, status, trigger, branch, commit_sha, commit_message, author,
             created_at, version, bundle_key, bundle_sha256, rollback_of)
         VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            trigger.app.as_str(),
            trigger.kind.as_str(),
            trigger.branch,
            trigger.commit.as_ref().map(|c| c.as_str()),
            trigger.message,
            trigger.author,
            now,
            reuse.map(|r| &r.version),
            reuse.map(|r| &r.bundle.key),
            reuse.map(|r| &r.bundle.sha256),
            reuse.and_then(|r| r.rollback_of),
        ],
    )?;
    let id = DeploymentId::new(tx.last_insert_rowid());
    {
        let mut stmt = tx.prepare(
            "INSERT INTO stages (deployment_id, position, name, status) VALUES (?1, ?2, ?3, 'pending')",
        )?;
        for (position, stage) in Stage::ALL.iter().enumerate() {
            stmt.execute(params![id, position, stage.as_str()])?;
        }
    }
    record_delivery_of(&tx, trigger, Some(id), now)?;
    mark_superseded(&tx, &superseded, id)?;
    tx.commit()?;
    Ok(Enqueued::New { id, superseded })
}

/// What the trigger's delivery made when it (or the same body) was seen before.
pub(super) fn seen_delivery(
    conn: &Connection,
    trigger: &Trigger,
) -> rusqlite::Result<Option<Enqueued>> {
    let Some(delivery) = &trigger.delivery else {
        return Ok(None);
    };
    Ok(seen(conn, delivery)?.map(|id| Enqueued::Duplicate { id }))
}

/// What `delivery` (or the same body) made when it was seen before; `Some(None)`: nothing.
pub(super) fn seen(
    conn: &Connection,
    delivery: &Delivery,
) -> rusqlite::Result<Option<Option<DeploymentId>>> {
    for (source, key) in delivery.keys() {
        let seen: Option<Option<DeploymentId>> = conn
            .query_row(
                "SELECT deployment_id FROM deliveries WHERE source = ?1 AND delivery_id = ?2",
                params![source, key],
                |row| row.get(0),
            )
            .optional()?;
        if seen.is_some() {
            return Ok(seen);
        }
    }
    Ok(None)
}

/// Remembers the trigger's delivery under each of its keys, with what it made.
pub(super) fn record_delivery_of(
    conn: &Connection,
    trigger: &Trigger,
    id: Option<DeploymentId>,
    now: i64,
) -> rusqlite::Result<()> {
    remember(conn, trigger.delivery.as_ref(), id, now)
}

/// Remembers `delivery` (if any) under each of its keys, with what it made.
pub(super) fn remember(
    conn: &Connection,
    delivery: Option<&Delivery>,
    id: Option<DeploymentId>,
    now: i64,
) -> rusqlite::Result<()> {
    for (source, key) in delivery.iter().flat_map(|d| d.keys()) {
        conn.execute(
            "INSERT INTO deliveries (source, delivery_id, deployment_id, received_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (source, delivery_id) DO UPDATE SET deployment_id = ?3",
            params![source, key, id, now],
        )?;
    }
    Ok(())
}

/// Records a webhook delivery that deploys nothing (ignored event), so a redelivery is
/// answered the same way. Returns false when it was already recorded.
pub fn record_delivery(
    conn: &Connection,
    source: &str,
    delivery_id: &str,
) -> rusqlite::Result<bool> {
    let inserted = conn.execute(
        "INSERT OR IGNORE INTO deliveries (source, delivery_id, received_at) VALUES (?1, ?2, ?3)",
        params![source, delivery_id, now_ms()],
    )?;
    Ok(inserted == 1)
}

/// Takes the app's queued deployment (there is at most one) and marks it running.
pub fn claim_next(conn: &mut Connection, app: &str) -> rusqlite::Result<Option<Deployment>> {
    let tx = conn.transaction()?;
    let id: Option<DeploymentId> = tx
        .query_row(
            "SELECT id FROM deployments WHERE app = ?1 AND status = 'queued' ORDER BY id LIMIT 1",
            [app],
            |row| row.get(0),
        )
        .optional()?;
    let Some(id) = id else { return Ok(None) };
    tx.execute(
        "UPDATE deployments SET status = 'running', started_at = ?2 WHERE id = ?1",
        params![id, now_ms()],
    )?;
    let deployment = deployment_in(&tx, id)?;
    tx.commit()?;
    Ok(deployment)
}

pub fn deployment(conn: &Connection, id: DeploymentId) -> rusqlite::Result<Option<Deployment>> {
    deployment_in(conn, id)
}

fn deployment_in(conn: &Connection, id: DeploymentId) -> rusqlite::Result<Option<Deployment>> {
    conn.query_row(
        &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ?1"),
        [id],
        Deployment::from_row,
    )
    .optional()
}

/// Newest first; `app` and `status` filter when given.
pub fn deployments(
    conn: &Connection,
    app: Option<&str>,
    status: Option<DeploymentStatus>,
    limit: u32,
    offset: u32,
) -> rusqlite::Result<Vec<Deployment>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
         WHERE (?1 IS NULL OR app = ?1) AND (?2 IS NULL OR status = ?2)
         ORDER BY id DESC LIMIT ?3 OFFSET ?4"
    ))?;
    stmt.query_map(
        params![app, status.map(|s| s.as_str()), limit, offset],
        Deployment::from_row,
    )?
    .collect()
}

pub fn stages(conn: &Connection, id: DeploymentId) -> rusqlite::Result<Vec<StageRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, status, started_at, finished_at, log FROM stages
         WHERE deployment_id = ?1 ORDER BY position",
    )?;
    stmt.query_map([id], |row| {
        Ok(StageRow {
            name: row.get(0)?,
            status: row.get(1)?,
            started_at: row.get(2)?,
            finished_at: row.get(3)?,
            log: row.get(4)?,
        })
    })?
    .collect()
}

pub fn set_commit(
    conn: &Connection,
    id: DeploymentId,
    sha: &str,
    message: &str,
    author: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE deployments SET commit_sha = ?2, commit_message = ?3, author = ?4 WHERE id = ?1",
        params![id, sha, message, author],
    )?;
    Ok(())
}

/// The time the app's newest version was stamped for, in ms.
pub fn last_stamp(conn: &Connection, app: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT MAX(stamped_at) FROM deployments WHERE app = ?1",
        [app],
        |row| row.get(0),
    )
}

pub fn set_version(
    conn: &Connection,
    id: DeploymentId,
    version: &str,
    stamped_at: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE deployments SET version = ?2, stamped_at = ?3 WHERE id = ?1",
        params![id, version, stamped_at],
    )?;
    Ok(())
}

/// Retention deleted these bundles of `app` from the store.
pub fn mark_bundles_pruned(conn: &Connection, app: &str, keys: &[String]) -> rusqlite::Result<()> {
    let mut update = conn.prepare_cached(
        "UPDATE deployments SET bundle_pruned_at = ?3
         WHERE app = ?1 AND bundle_key = ?2 AND bundle_pruned_at IS NULL",
    )?;
    let now = now_ms();
    for key in keys {
        update.execute(params![app, key, now])?;
    }
    Ok(())
}

pub fn set_runner_ref(
    conn: &Connection,
    id: DeploymentId,
    reference: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE deployments SET runner_ref = ?2 WHERE id = ?1",
        params![id, reference],
    )?;
    Ok(())
}

pub fn set_port(conn: &Connection, id: DeploymentId, port: u16) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE deployments SET port = ?2 WHERE id = ?1",
        params![id, port],
    )?;
    Ok(())
}

/// The version the newest deployment that went live on `port` started there: what still
/// runs on the app's other port while it is kept for a rollback.
pub fn version_on(conn: &Connection, app: &str, port: u16) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT version FROM deployments
         WHERE app = ?1 AND port = ?2 AND version IS NOT NULL
           AND status IN ('succeeded', 'rolled_back')
         ORDER BY id DESC LIMIT 1",
        params![app, port],
        |row| row.get(0),
    )
    .optional()
}

pub fn set_bundle(
    conn: &Connection,
    id: DeploymentId,
    key: &str,
    sha256: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE deployments SET bundle_key = ?2, bundle_sha256 = ?3 WHERE id = ?1",
        params![id, key, sha256],
    )?;
    Ok(())
}

/// Records the app env's digest (names and keyed hashes, never values) that deployment `id`
/// runs with; returns the one the app's last deployment before it ran with, if any.
pub fn swap_env_digest(
    conn: &Connection,
    id: DeploymentId,
    app: &str,
    digest: &str,
) -> rusqlite::Result<Option<String>> {
    let before = conn
        .query_row(
            "SELECT digest FROM deployment_env WHERE app = ?1 AND deployment_id < ?2
             ORDER BY deployment_id DESC LIMIT 1",
            params![app, id],
            |row| row.get(0),
        )
        .optional()?;
    conn.execute(
        "INSERT OR REPLACE INTO deployment_env (deployment_id, app, digest) VALUES (?1, ?2, ?3)",
        params![id, app, digest],
    )?;
    Ok(before)
}

pub fn stage_started(conn: &Connection, id: DeploymentId, stage: Stage) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE stages SET status = 'running', started_at = ?3 WHERE deployment_id = ?1 AND name = ?2",
        params![id, stage.as_str(), now_ms()],
    )?;
    Ok(())
}

/// A running stage's log so far (its end writes the whole of it).
pub fn stage_output(
    conn: &Connection,
    id: DeploymentId,
    stage: Stage,
    log: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE stages SET log = ?3 WHERE deployment_id = ?1 AND name = ?2 AND status = 'running'",
        params![id, stage.as_str(), log],
    )?;
    Ok(())
}

pub fn stage_finished(
    conn: &Connection,
    id: DeploymentId,
    stage: Stage,
    status: StageStatus,
    log: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE stages SET status = ?3, finished_at = ?4, log = ?5,
             started_at = COALESCE(started_at, ?4)
         WHERE deployment_id = ?1 AND name = ?2",
        params![id, stage.as_str(), status.as_str(), now_ms(), log],
    )?;
    Ok(())
}

/// Ends a deployment; stages that never ran become `skipped`.
pub fn finish(
    conn: &mut Connection,
    id: DeploymentId,
    status: DeploymentStatus,
    error: Option<&str>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute(
        "UPDATE deployments SET status = ?2, error = ?3, finished_at = ?4 WHERE id = ?1",
        params![id, status.as_str(), error, now_ms()],
    )?;
    tx.execute(
        "UPDATE stages SET status = 'skipped' WHERE deployment_id = ?1 AND status = 'pending'",
        [id],
    )?;
    tx.execute(
        "UPDATE stages SET status = 'failed', finished_at = ?2
         WHERE deployment_id = ?1 AND status = 'running'",
        params![id, now_ms()],
    )?;
    tx.commit()
}

/// At start: whatever was running when the server went away ends `interrupted`. Returns
/// those deployments as they were, with whether a hook that starts instances had begun.
pub fn interrupt_running(conn: &mut Connection) -> rusqlite::Result<Vec<(Deployment, bool)>> {
    let running: Vec<Deployment> = conn
        .prepare(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE status = 'running'"
        ))?
        .query_map([], Deployment::from_row)?
        .collect::<rusqlite::Result<_>>()?;
    let mut interrupted = Vec::with_capacity(running.len());
    for deployment in running {
        let started_instances = started_instances(conn, deployment.id)?;
        finish(
            conn,
            deployment.id,
            DeploymentStatus::Interrupted,
            Some("nonstop stopped while this deployment ran"),
        )?;
        interrupted.push((deployment, started_instances));
    }
    Ok(interrupted)
}

/// Whether a hook that starts instances (AfterInstall or later) had begun.
fn started_instances(conn: &Connection, id: DeploymentId) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) > 0 FROM stages WHERE deployment_id = ?1
         AND name IN ('AfterInstall', 'ApplicationStart', 'ValidateService') AND status != 'pending'",
        [id],
        |row| row.get(0),
    )
}

/// Ends the running deployment `id` as `cancelled` with `reason`; returns it as it was,
/// with whether a hook that starts instances had begun. `None` when it no longer runs.
pub fn cancel_running(
    conn: &mut Connection,
    id: DeploymentId,
    reason: &str,
) -> rusqlite::Result<Option<(Deployment, bool)>> {
    let Some(deployment) = deployment(conn, id)? else {
        return Ok(None);
    };
    if deployment.status != DeploymentStatus::Running {
        return Ok(None);
    }
    let started_instances = started_instances(conn, id)?;
    finish(conn, id, DeploymentStatus::Cancelled, Some(reason))?;
    Ok(Some((deployment, started_instances)))
}

/// The newest deployment of `app` that went live, other than `except`.
pub fn last_succeeded(
    conn: &Connection,
    app: &str,
    except: DeploymentId,
) -> rusqlite::Result<Option<Deployment>> {
    conn.query_row(
        &format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
             WHERE app = ?1 AND status = 'succeeded' AND id != ?2 ORDER BY id DESC LIMIT 1"
        ),
        params![app, except],
        Deployment::from_row,
    )
    .optional()
}

/// Remembers which version was started on `port` (and by which deployment).
pub fn record_instance(
    conn: &Connection,
    app: &str,
    port: u16,
    version: &str,
    id: DeploymentId,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO instances (app, port, version, deployment_id, started_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (app, port) DO UPDATE SET version = ?3, deployment_id = ?4, started_at = ?5",
        params![app, port, version, id, now_ms()],
    )?;
    conn.execute(
        "UPDATE deployments SET port = ?2 WHERE id = ?1",
        params![id, port],
    )?;
    Ok(())
}

/// Records that traffic of `app` now goes to `port`, switched by deployment `by` (the
/// running one when `None`); returns the new and the previous live row.
pub fn set_live(
    conn: &mut Connection,
    app: &str,
    port: u16,
    profile: &str,
    by: Option<DeploymentId>,
) -> rusqlite::Result<(Live, Option<Live>)> {
    let tx = conn.transaction()?;
    let previous = live_in(&tx, app)?;
    let by = match by {
        Some(id) => Some(id),
        None => running_deployment(&tx, app)?,
    };
    let instance: Option<(String, Option<DeploymentId>)> = tx
        .query_row(
            "SELECT version, deployment_id FROM instances WHERE app = ?1 AND port = ?2",
            params![app, port],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let (version, deployment_id) = instance.unzip();
    let now = now_ms();
    tx.execute(
        "INSERT INTO live (app, port, profile, version, deployment_id, since) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (app) DO UPDATE SET port = ?2, profile = ?3, version = ?4, deployment_id = ?5, since = ?6",
        params![app, port, profile, version, deployment_id.flatten(), now],
    )?;
    tx.execute(
        "INSERT INTO switches (app, from_port, to_port, deployment_id, at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![app, previous.as_ref().map(|l| l.port), port, by, now],
    )?;
    let live = live_in(&tx, app)?.expect("the live row was just written in this transaction");
    tx.commit()?;
    Ok((live, previous))
}

pub fn live(conn: &Connection, app: &str) -> rusqlite::Result<Option<Live>> {
    live_in(conn, app)
}

fn live_in(conn: &Connection, app: &str) -> rusqlite::Result<Option<Live>> {
    conn.query_row(
        "SELECT app, port, profile, version, deployment_id, since FROM live WHERE app = ?1",
        [app],
        |row| {
            Ok(Live {
                app: row.get(0)?,
                port: row.get(1)?,
                profile: row.get(2)?,
                version: row.get(3)?,
                deployment_id: row.get(4)?,
                since: row.get(5)?,
            })
        },
    )
    .optional()
}

/// How many deployments match the filters (for pagination).
pub fn count_deployments(
    conn: &Connection,
    app: Option<&str>,
    status: Option<DeploymentStatus>,
) -> rusqlite::Result<u64> {
    conn.prepare_cached(
        "SELECT COUNT(*) FROM deployments WHERE (?1 IS NULL OR app = ?1) AND (?2 IS NULL OR status = ?2)",
    )?
    .query_row(params![app, status.map(|s| s.as_str())], |row| row.get(0))
}

#[derive(Clone, Debug, Serialize)]
pub struct Instance {
    pub port: u16,
    pub version: String,
    pub deployment_id: Option<DeploymentId>,
    pub started_at: i64,
}

pub fn instance(conn: &Connection, app: &str, port: u16) -> rusqlite::Result<Option<Instance>> {
    conn.query_row(
        "SELECT port, version, deployment_id, started_at FROM instances WHERE app = ?1 AND port = ?2",
        params![app, port],
        |row| {
            Ok(Instance {
                port: row.get(0)?,
                version: row.get(1)?,
                deployment_id: row.get(2)?,
                started_at: row.get(3)?,
            })
        },
    )
    .optional()
}

#[derive(Clone, Debug, Serialize)]
pub struct Switch {
    pub from_port: Option<u16>,
    pub to_port: u16,
    pub at: i64,
}

/// The traffic switches a deployment made.
pub fn switches_of(conn: &Connection, id: DeploymentId) -> rusqlite::Result<Vec<Switch>> {
    conn.prepare_cached(
        "SELECT from_port, to_port, at FROM switches WHERE deployment_id = ?1 ORDER BY id",
    )?
    .query_map([id], |row| {
        Ok(Switch {
            from_port: row.get(0)?,
            to_port: row.get(1)?,
            at: row.get(2)?,
        })
    })?
    .collect()
}

/// Records a rollback that only moved traffic back (no hook ran): a finished deployment
/// row whose stages are all skipped, and the undone deployment marked `rolled_back`.
pub fn record_switch_back(
    conn: &mut Connection,
    app: &str,
    branch: &str,
    instance: &Instance,
    undone: Option<DeploymentId>,
) -> rusqlite::Result<DeploymentId> {
    let tx = conn.transaction()?;
    let now = now_ms();
    tx.execute(
        "INSERT INTO deployments (app, status, trigger, branch, version, port, rollback_of,
             commit_sha, commit_message, author, bundle_key, bundle_sha256,
             created_at, started_at, finished_at)
         SELECT ?1, 'succeeded', 'rollback', ?2, ?3, ?4, ?5,
             d.commit_sha, d.commit_message, d.author, d.bundle_key, d.bundle_sha256, ?6, ?6, ?6
         FROM (SELECT 1) LEFT JOIN deployments d ON d.id = ?7",
        params![
            app,
            branch,
            instance.version,
            instance.port,
            undone,
            now,
            instance.deployment_id
        ],
    )?;
    let id = DeploymentId::new(tx.last_insert_rowid());
    for (position, stage) in Stage::ALL.iter().enumerate() {
        tx.execute(
            "INSERT INTO stages (deployment_id, position, name, status, log) VALUES (?1, ?2, ?3, 'skipped', ?4)",
            params![id, position, stage.as_str(), "not needed: the previous instance still runs"],
        )?;
    }
    if let Some(undone) = undone {
        tx.execute(
            "UPDATE deployments SET status = 'rolled_back' WHERE id = ?1 AND status = 'succeeded'",
            [undone],
        )?;
    }
    tx.commit()?;
    Ok(id)
}

/// After a rollback redeploy went live: the deployment it undid is `rolled_back`.
pub fn mark_rolled_back(conn: &Connection, id: DeploymentId) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE deployments SET status = 'rolled_back' WHERE id = ?1 AND status = 'succeeded'",
        [id],
    )?;
    Ok(())
}

/// Points a deployment's switches at it (the switch endpoint records the running one).
pub fn running_deployment(conn: &Connection, app: &str) -> rusqlite::Result<Option<DeploymentId>> {
    conn.query_row(
        "SELECT id FROM deployments WHERE app = ?1 AND status = 'running' ORDER BY id DESC LIMIT 1",
        [app],
        |row| row.get(0),
    )
    .optional()
}

/// The bundle that was live before deployment `undone`: the newest deployment before it
/// that went live (and was not itself rolled back) with a stored bundle of another version.
pub fn previous_live_bundle(
    conn: &Connection,
    app: &str,
    undone: Option<DeploymentId>,
) -> rusqlite::Result<Option<Deployment>> {
    conn.query_row(
        &format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
             WHERE app = ?1 AND status = 'succeeded' AND bundle_key IS NOT NULL
               AND bundle_pruned_at IS NULL
               AND id < COALESCE(?2, 9223372036854775807)
               AND version IS NOT (SELECT version FROM deployments WHERE id = ?2)
             ORDER BY id DESC LIMIT 1"
        ),
        params![app, undone],
        Deployment::from_row,
    )
    .optional()
}

/// The GitHub Deployment reporting deployment `id`, while it has one.
pub fn github_deployment(conn: &Connection, id: DeploymentId) -> rusqlite::Result<Option<u64>> {
    conn.query_row(
        "SELECT github_id FROM github_deployments WHERE deployment_id = ?1",
        [id],
        |row| row.get(0),
    )
    .optional()
}

pub fn set_github_deployment(
    conn: &Connection,
    id: DeploymentId,
    github_id: u64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO github_deployments (deployment_id, github_id) VALUES (?1, ?2)
         ON CONFLICT (deployment_id) DO UPDATE SET github_id = ?2",
        params![id, github_id],
    )?;
    Ok(())
}

/// Once its last status is sent, a deployment has nothing more to say to GitHub.
pub fn forget_github_deployment(conn: &Connection, id: DeploymentId) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM github_deployments WHERE deployment_id = ?1",
        [id],
    )?;
    Ok(())
}

/// The dashboard sessions that have not expired, by id, with when they expire.
pub fn sessions(conn: &Connection, now: i64) -> rusqlite::Result<Vec<(String, i64)>> {
    conn.execute("DELETE FROM sessions WHERE expires_at <= ?1", [now])?;
    conn.prepare("SELECT id, expires_at FROM sessions")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

pub fn add_session(conn: &Connection, id: &str, expires_at: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO sessions (id, expires_at) VALUES (?1, ?2)",
        params![id, expires_at],
    )?;
    Ok(())
}

pub fn end_session(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM sessions WHERE id = ?1", [id])?;
    Ok(())
}
