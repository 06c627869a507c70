//! SQLite: the record of every deployment, stage, log, delivery and live port. Schema changes
//! are numbered files in `migrations/`, applied in order at open. One connection behind a
//! mutex, used from `spawn_blocking`: nonstop writes a few rows a second, and a single writer
//! keeps every multi-row change (dedupe + supersede + insert) one transaction.
//! This module knows rows and states, never HTTP or processes.

mod ci;
mod guards;
mod locks;
mod queries;
mod sql;
mod triggers;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub use ci::*;
pub use guards::*;
pub use locks::*;
pub use queries::*;
pub use triggers::*;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("database migration {version}: {source}")]
    Migration {
        version: usize,
        source: rusqlite::Error,
    },
}

/// Each file runs once, in order; `PRAGMA user_version` remembers how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_redeploys.sql"),
    include_str!("../../migrations/0003_ci_builds.sql"),
    include_str!("../../migrations/0004_github_deployments.sql"),
    include_str!("../../migrations/0005_runner_ref.sql"),
    include_str!("../../migrations/0006_bundle_pruned.sql"),
    include_str!("../../migrations/0007_sessions.sql"),
    include_str!("../../migrations/0008_ci_checks.sql"),
    include_str!("../../migrations/0009_triggers_and_locks.sql"),
    include_str!("../../migrations/0010_deployment_env.sql"),
    include_str!("../../migrations/0011_guard.sql"),
    include_str!("../../migrations/0012_session_actor.sql"),
];

#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, DbError> {
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, DbError> {
            let mut conn = Connection::open(path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            migrate(&mut conn)?;
            Ok(conn)
        })
        .await??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `work` on the connection off the async threads.
    pub async fn call<T, F>(&self, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a half-done transaction behind
            // (rusqlite rolls back on drop), so a poisoned lock is still safe to use.
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut conn)
        })
        .await?
        .map_err(DbError::from)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), DbError> {
    let done: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let version = index + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .and_then(|()| tx.pragma_update(None, "user_version", version))
            .map_err(|source| DbError::Migration { version, source })?;
        tx.commit()?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, the unit of every time column.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
