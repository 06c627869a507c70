//! Guard windows: one row per deployment whose switch is watched, open while `outcome` is
//! NULL. Each end (passed, tripped, ended early) is one transaction with the deployment's
//! status, so a deployment never shows `guarding` for a window that is over, and the
//! pipeline's own end and the guard's cannot overwrite each other.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::now_ms;
use crate::domain::{DeploymentId, DeploymentStatus};

/// An open or closed guard window.
#[derive(Clone, Debug, Serialize)]
pub struct GuardWindow {
    pub deployment_id: DeploymentId,
    pub app: String,
    pub from_port: u16,
    pub to_port: u16,
    pub version: String,
    pub started_at: i64,
    pub ends_at: i64,
    pub outcome: Option<String>,
    pub reason: Option<String>,
}

/// How a guard window closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardOutcome {
    /// The window passed with the version within its limits.
    Passed,
    /// A limit was crossed and traffic went back.
    Tripped,
    /// Something else moved on first: a rollback, a newer deployment.
    Ended,
}

impl GuardOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Tripped => "tripped",
            Self::Ended => "ended",
        }
    }
}

const COLUMNS: &str =
    "deployment_id, app, from_port, to_port, version, started_at, ends_at, outcome, reason";

fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<GuardWindow> {
    Ok(GuardWindow {
        deployment_id: row.get(0)?,
        app: row.get(1)?,
        from_port: row.get(2)?,
        to_port: row.get(3)?,
        version: row.get(4)?,
        started_at: row.get(5)?,
        ends_at: row.get(6)?,
        outcome: row.get(7)?,
        reason: row.get(8)?,
    })
}

/// Opens a window for `deployment`'s switch from `from_port` to `to_port`, `secs` long.
pub fn open_guard(
    conn: &Connection,
    deployment: DeploymentId,
    app: &str,
    (from_port, to_port): (u16, u16),
    version: &str,
    secs: u64,
) -> rusqlite::Result<GuardWindow> {
    let now = now_ms();
    let ends_at = now + i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX / 2);
    conn.execute(
        "INSERT OR REPLACE INTO guards (deployment_id, app, from_port, to_port, version, started_at, ends_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![deployment, app, from_port, to_port, version, now, ends_at],
    )?;
    Ok(GuardWindow {
        deployment_id: deployment,
        app: app.to_owned(),
        from_port,
        to_port,
        version: version.to_owned(),
        started_at: now,
        ends_at,
        outcome: None,
        reason: None,
    })
}

pub fn guard_of(
    conn: &Connection,
    deployment: DeploymentId,
) -> rusqlite::Result<Option<GuardWindow>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM guards WHERE deployment_id = ?1"),
        [deployment],
        read,
    )
    .optional()
}

/// Every window still open, oldest first (at start: the ones to resume).
pub fn open_guards(conn: &Connection) -> rusqlite::Result<Vec<GuardWindow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM guards WHERE outcome IS NULL ORDER BY deployment_id"
    ))?;
    stmt.query_map([], read)?.collect()
}

/// Closes `deployment`'s window with `outcome`; a deployment still `guarding` ends
/// `succeeded` (passed, ended) or `rolled_back` with `reason` (tripped). Returns the status
/// the deployment has now, or `None` when the window was closed already.
pub fn close_guard(
    conn: &mut Connection,
    deployment: DeploymentId,
    outcome: GuardOutcome,
    reason: Option<&str>,
) -> rusqlite::Result<Option<DeploymentStatus>> {
    let tx = conn.transaction()?;
    let now = now_ms();
    let closed = tx.execute(
        "UPDATE guards SET outcome = ?2, reason = ?3, finished_at = ?4
         WHERE deployment_id = ?1 AND outcome IS NULL",
        params![deployment, outcome.as_str(), reason, now],
    )?;
    if closed == 0 {
        return Ok(None);
    }
    let status = match outcome {
        GuardOutcome::Tripped => DeploymentStatus::RolledBack,
        GuardOutcome::Passed | GuardOutcome::Ended => DeploymentStatus::Succeeded,
    };
    // A tripped window records its reason whatever the rollback already wrote.
    tx.execute(
        "UPDATE deployments SET status = ?2, finished_at = ?3
         WHERE id = ?1 AND status = 'guarding'",
        params![deployment, status.as_str(), now],
    )?;
    if outcome == GuardOutcome::Tripped {
        tx.execute(
            "UPDATE deployments SET error = ?2 WHERE id = ?1",
            params![deployment, reason],
        )?;
    }
    let now_status: String = tx.query_row(
        "SELECT status FROM deployments WHERE id = ?1",
        [deployment],
        |row| row.get(0),
    )?;
    tx.commit()?;
    Ok(DeploymentStatus::parse(&now_status))
}

/// The pipeline's end of a deployment that succeeded: `guarding` while its window is open,
/// else what the window's end made of it. Returns the status recorded.
pub fn finish_succeeded(
    conn: &mut Connection,
    id: DeploymentId,
) -> rusqlite::Result<DeploymentStatus> {
    let guard = guard_of(conn, id)?;
    let (status, error) = match guard
        .as_ref()
        .map(|g| (g.outcome.as_deref(), g.reason.clone()))
    {
        None => (DeploymentStatus::Succeeded, None),
        Some((None, _)) => (DeploymentStatus::Guarding, None),
        Some((Some("tripped"), reason)) => (DeploymentStatus::RolledBack, reason),
        Some((Some(_), _)) => (DeploymentStatus::Succeeded, None),
    };
    super::finish(conn, id, status, error.as_deref())?;
    if status == DeploymentStatus::Guarding {
        // Not over yet: the guard's end sets the time.
        conn.execute(
            "UPDATE deployments SET finished_at = NULL WHERE id = ?1",
            [id],
        )?;
    }
    Ok(status)
}

/// Keeps the traffic chart of `deployment`'s window as it was when the window ended.
pub fn set_guard_chart(
    conn: &Connection,
    deployment: DeploymentId,
    chart: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE guards SET chart = ?2 WHERE deployment_id = ?1",
        params![deployment, chart],
    )?;
    Ok(())
}

/// The chart kept at the end of `deployment`'s window, if any.
pub fn guard_chart(
    conn: &Connection,
    deployment: DeploymentId,
) -> rusqlite::Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT chart FROM guards WHERE deployment_id = ?1",
            [deployment],
            |row| row.get::<_, Option<String>>(0),
        )
        .optional()?
        .flatten())
}
