//! How sqlx errors become [`LockError`]s, and which of them mean a connection pooler.

use super::*;

/// Whether the error means the connection (and so the session and its locks) is gone or
/// unusable, rather than one statement failing.
pub(crate) fn is_connection_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08: connection exception; 57: operator intervention (terminated, shutdown).
            code.starts_with("08") || code.starts_with("57")
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

pub(crate) fn map_error(context: &str, error: sqlx::Error) -> LockError {
    match &error {
        sqlx::Error::Configuration(_) => LockError::InvalidConfig(format!("{context}: {error}")),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default().to_string();
            // 28: authentication; 3D000: no such database; 42: syntax/privileges.
            let permanent = code.starts_with("28") || code == "3D000" || code.starts_with("42");
            LockError::backend(BACKEND, format!("{context}: {error}"), !permanent, error)
        }
        _ => LockError::backend(BACKEND, format!("{context}: {error}"), true, error),
    }
}

/// Errors that only a connection pooler between us and PostgreSQL causes: PgBouncer's
/// statement pooling refusing a transaction, or a named prepared statement found missing
/// (`26000`) or already there (`42P05`) because two statements ran in different server
/// sessions, or in one shared with another client.
pub(crate) fn is_pooler_error(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    matches!(db.code().as_deref(), Some("26000" | "42P05"))
        || db.message().to_ascii_lowercase().contains("pooling mode")
}

/// The refusal for a connection pooler that switches server sessions; `what` is the evidence.
pub(crate) fn pooler_refusal(what: &str) -> LockError {
    LockError::InvalidConfig(format!(
        "{what}: this looks like PgBouncer (or another pooler) in transaction or statement \
         pooling mode, which breaks session advisory locks. Connect to PostgreSQL directly or \
         through session pooling."
    ))
}

pub(crate) fn timed_out(context: &str, after: Duration) -> LockError {
    LockError::backend_msg(
        BACKEND,
        format!("{context}: no answer within {after:?}"),
        true,
    )
}
