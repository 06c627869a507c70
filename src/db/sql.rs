//! How domain values are stored: each as its text, and a stored text that is none of the
//! type's values is a read error naming the column's type, never a silent default.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::domain::{
    AppName, CommitSha, Decision, DeploymentId, DeploymentStatus, Stage, StageStatus, TriggerKind,
};

/// The error for a stored text that is not a `what`.
fn not_a(what: &'static str, text: &str) -> FromSqlError {
    FromSqlError::Other(format!("`{text}` is not a {what}").into())
}

macro_rules! stored_as_text {
    ($type:ty, $what:literal, $parse:expr) => {
        impl ToSql for $type {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $type {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                let parse: fn(&str) -> Option<$type> = $parse;
                parse(text).ok_or_else(|| not_a($what, text))
            }
        }
    };
}

stored_as_text!(
    DeploymentStatus,
    "deployment status",
    DeploymentStatus::parse
);
stored_as_text!(StageStatus, "stage status", StageStatus::parse);
stored_as_text!(Decision, "decision", Decision::parse);
stored_as_text!(Stage, "stage", Stage::parse);
stored_as_text!(TriggerKind, "trigger", TriggerKind::parse);
stored_as_text!(AppName, "app name", |text| AppName::parse(text).ok());
stored_as_text!(CommitSha, "commit id", |text| CommitSha::parse(text).ok());

impl ToSql for DeploymentId {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.get()))
    }
}

impl FromSql for DeploymentId {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value.as_i64().map(DeploymentId::new)
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    #[test]
    fn a_stored_value_that_is_not_one_is_a_read_error() {
        let conn = Connection::open_in_memory().unwrap();
        let read = |text: &str| {
            conn.query_row("SELECT ?1", [text], |row| row.get::<_, DeploymentStatus>(0))
        };
        assert_eq!(read("rolled_back").unwrap(), DeploymentStatus::RolledBack);
        let err = read("exploded").unwrap_err().to_string();
        assert!(
            err.contains("`exploded` is not a deployment status"),
            "{err}"
        );
        let back: String = conn
            .query_row("SELECT ?1", [Stage::ValidateService], |row| row.get(0))
            .unwrap();
        assert_eq!(back, "ValidateService");
    }
}
