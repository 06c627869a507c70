//! The why log (`triggers`): one row for every trigger nonstop heard — a webhook delivery, a
//! CLI or dashboard action — with what it decided and why in one line, who sent it, the
//! status it was answered with and the deployment it made. It never holds a request's body.
//! Refusals cost nothing to send, so only the newest `MAX_REFUSALS` of them are kept.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::now_ms;
use crate::domain::{AppName, Decision, DeploymentId, DeploymentStatus};

/// Refused triggers kept; older ones are deleted as new ones arrive, so a flood of forged
/// deliveries cannot grow the table without bound. Everything else is kept for good.
pub const MAX_REFUSALS: u32 = 10_000;

/// The longest reason kept, in characters; the names a sender chose (event, delivery id)
/// are kept to `MAX_NAME_CHARS`.
const MAX_REASON_CHARS: usize = 500;
const MAX_NAME_CHARS: usize = 100;

/// A trigger as it is heard, before it is recorded.
#[derive(Clone, Debug)]
pub struct NewTrigger {
    pub app: Option<AppName>,
    /// `github`, `travis`, `api` (the admin token) or `dashboard` (a session).
    pub source: &'static str,
    pub event: Option<String>,
    pub delivery_id: Option<String>,
    /// Who: `admin`, `dashboard`, `github`, `travis`, `anonymous`.
    pub actor: String,
    pub decision: Decision,
    pub reason: String,
    pub status: u16,
    pub deployment_id: Option<DeploymentId>,
}

/// A recorded trigger, with what became of its deployment since.
#[derive(Clone, Debug, Serialize)]
pub struct TriggerRow {
    pub id: i64,
    pub received_at: i64,
    pub app: Option<AppName>,
    pub source: String,
    pub event: Option<String>,
    pub delivery_id: Option<String>,
    pub actor: String,
    pub decision: Decision,
    pub reason: String,
    pub status: u16,
    pub deployment_id: Option<DeploymentId>,
    pub deployment_status: Option<DeploymentStatus>,
}

const TRIGGER_COLUMNS: &str = "t.id, t.received_at, t.app, t.source, t.event, t.delivery_id, \
     t.actor, t.decision, t.reason, t.status, t.deployment_id, d.status";

impl TriggerRow {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            received_at: row.get(1)?,
            app: row.get(2)?,
            source: row.get(3)?,
            event: row.get(4)?,
            delivery_id: row.get(5)?,
            actor: row.get(6)?,
            decision: row.get(7)?,
            reason: row.get(8)?,
            status: row.get(9)?,
            deployment_id: row.get(10)?,
            deployment_status: row.get(11)?,
        })
    }
}

/// One line of at most `max` characters, control characters (a newline a sender put in a
/// header) shown as spaces.
fn one_line(text: &str, max: usize) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max + 1)
        .collect();
    if line.chars().count() > max {
        line = line.chars().take(max - 1).collect();
        line.push('…');
    }
    line
}

/// Records `trigger`; a refusal deletes the refusals beyond the newest `MAX_REFUSALS`.
pub fn record_trigger(conn: &Connection, trigger: &NewTrigger) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO triggers (received_at, app, source, event, delivery_id, actor, decision,
             reason, status, deployment_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            now_ms(),
            trigger.app,
            trigger.source,
            trigger
                .event
                .as_deref()
                .map(|e| one_line(e, MAX_NAME_CHARS)),
            trigger
                .delivery_id
                .as_deref()
                .map(|d| one_line(d, MAX_NAME_CHARS)),
            one_line(&trigger.actor, MAX_NAME_CHARS),
            trigger.decision,
            one_line(&trigger.reason, MAX_REASON_CHARS),
            trigger.status,
            trigger.deployment_id,
        ],
    )?;
    let id = conn.last_insert_rowid();
    if trigger.decision == Decision::Refused {
        conn.prepare_cached(
            "DELETE FROM triggers WHERE decision = 'refused' AND id <=
                 (SELECT id FROM triggers WHERE decision = 'refused'
                  ORDER BY id DESC LIMIT 1 OFFSET ?1)",
        )?
        .execute([MAX_REFUSALS])?;
    }
    Ok(id)
}

/// Newest first; `app` and `deployment` filter when given.
pub fn triggers(
    conn: &Connection,
    app: Option<&str>,
    deployment: Option<DeploymentId>,
    limit: u32,
) -> rusqlite::Result<Vec<TriggerRow>> {
    conn.prepare_cached(&format!(
        "SELECT {TRIGGER_COLUMNS} FROM triggers t LEFT JOIN deployments d ON d.id = t.deployment_id
         WHERE (?1 IS NULL OR t.app = ?1) AND (?2 IS NULL OR t.deployment_id = ?2)
         ORDER BY t.id DESC LIMIT ?3"
    ))?
    .query_map(params![app, deployment, limit], TriggerRow::from_row)?
    .collect()
}

/// The trigger that made deployment `id`: the first one recorded with it.
pub fn trigger_of(conn: &Connection, id: DeploymentId) -> rusqlite::Result<Option<TriggerRow>> {
    conn.query_row(
        &format!(
            "SELECT {TRIGGER_COLUMNS} FROM triggers t LEFT JOIN deployments d ON d.id = t.deployment_id
             WHERE t.deployment_id = ?1 ORDER BY t.id LIMIT 1"
        ),
        [id],
        TriggerRow::from_row,
    )
    .optional()
}

/// The triggers whose deployments `superseded` were replaced by `by` say so.
pub(super) fn mark_superseded(
    conn: &Connection,
    superseded: &[DeploymentId],
    by: DeploymentId,
) -> rusqlite::Result<()> {
    let mut update = conn.prepare_cached(
        "UPDATE triggers SET decision = 'superseded', reason = ?2
         WHERE deployment_id = ?1 AND decision IN ('deployed', 'waiting', 'blocked')",
    )?;
    for id in superseded {
        update.execute(params![id, format!("superseded by #{by} before it ran")])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        for sql in super::super::MIGRATIONS {
            conn.execute_batch(sql).unwrap();
        }
        conn
    }

    fn refusal(n: usize) -> NewTrigger {
        NewTrigger {
            app: None,
            source: "github",
            event: Some("push\nX-Injected: 1".into()),
            delivery_id: Some(format!("forged-{n}")),
            actor: "github".into(),
            decision: Decision::Refused,
            reason: "x".repeat(2000),
            status: 401,
            deployment_id: None,
        }
    }

    #[test]
    fn refusals_are_kept_to_the_newest_ten_thousand_and_in_one_short_line() {
        let conn = conn();
        let kept = NewTrigger {
            decision: Decision::Ignored,
            status: 202,
            ..refusal(0)
        };
        record_trigger(&conn, &kept).unwrap();
        for n in 1..=(MAX_REFUSALS as usize + 5) {
            record_trigger(&conn, &refusal(n)).unwrap();
        }
        let count = |decision: &str| -> u32 {
            conn.query_row(
                "SELECT COUNT(*) FROM triggers WHERE decision = ?1",
                [decision],
                |row| row.get(0),
            )
            .unwrap()
        };
        assert_eq!(count("refused"), MAX_REFUSALS);
        assert_eq!(count("ignored"), 1, "only refusals are pruned");
        let newest = &triggers(&conn, None, None, 1).unwrap()[0];
        assert_eq!(
            newest.delivery_id.as_deref(),
            Some(format!("forged-{}", MAX_REFUSALS + 5).as_str())
        );
        assert_eq!(newest.event.as_deref(), Some("push X-Injected: 1"));
        assert_eq!(newest.reason.chars().count(), MAX_REASON_CHARS);
        assert!(newest.reason.ends_with('…'));
    }
}
