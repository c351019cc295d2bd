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

/// A failed connect as a [`LockError`]: a refusal for credentials, certificates or TLS
/// becomes [`LockError::Refused`] (never retryable, the message names the URL option to fix),
/// anything else goes through [`map_error`].
pub(crate) fn connect_error(
    context: &str,
    options: &PgConnectOptions,
    error: sqlx::Error,
) -> LockError {
    match refusal(options, &error) {
        Some((kind, why)) => LockError::refused(
            BACKEND,
            kind,
            format!(
                "{context} at {} as user {:?}: {why}",
                target(options),
                options.get_username()
            ),
            Some(Box::new(error)),
        ),
        None => map_error(context, error),
    }
}

/// Where `options` connect to, for messages.
pub(crate) fn target(options: &PgConnectOptions) -> String {
    match options.get_socket() {
        Some(socket) => format!("{} (port {})", socket.display(), options.get_port()),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    }
}

/// Which check refused the connection and what to change, or `None` for other failures.
fn refusal(options: &PgConnectOptions, error: &sqlx::Error) -> Option<(RefusalKind, String)> {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code()?;
            let message = db.message();
            let lower = message.to_ascii_lowercase();
            match code.as_ref() {
                // With scram-sha-256 the server answers an unknown role the same way, so as
                // not to tell which roles exist.
                "28P01" => Some((
                    RefusalKind::Authentication,
                    format!(
                        "{message} (SQLSTATE 28P01): check the user name and password in the \
                         URL (postgres://USER:PASSWORD@host/db, special characters \
                         percent-encoded; or the `password` URL parameter)"
                    ),
                )),
                "28000" if lower.contains("no encryption") => Some((
                    RefusalKind::Tls,
                    format!(
                        "{message} (SQLSTATE 28000): the server accepts this user only over \
                         TLS: set sslmode=verify-full and sslrootcert=<CA certificate file> \
                         (or sslmode=require){}",
                        feature_hint()
                    ),
                )),
                "28000" if lower.contains("certificate") => Some((
                    RefusalKind::Certificate,
                    format!(
                        "{message} (SQLSTATE 28000): the server authenticates this user by \
                         client certificate: set sslcert=<certificate file> and \
                         sslkey=<key file> to a certificate signed by a CA in the server's \
                         ssl_ca_file whose common name is the user name{}",
                        feature_hint()
                    ),
                )),
                "28000" => Some((
                    RefusalKind::Authentication,
                    format!(
                        "{message} (SQLSTATE 28000): check the user name and database in the \
                         URL, and sslmode, against the server's roles and pg_hba.conf"
                    ),
                )),
                _ => None,
            }
        }
        sqlx::Error::Tls(inner) => {
            #[cfg(feature = "tls")]
            if let Some(found) = rustls_refusal(options, inner.as_ref()) {
                return Some(found);
            }
            let text = inner.to_string();
            if text.contains("does not support TLS") {
                Some((
                    RefusalKind::Tls,
                    format!(
                        "sslmode={} demands TLS but the server does not offer it (PostgreSQL \
                         with ssl = off): turn TLS on at the server, or set sslmode=prefer or \
                         sslmode=disable",
                        ssl_mode_name(options.get_ssl_mode())
                    ),
                ))
            } else {
                Some((
                    RefusalKind::Tls,
                    format!("{text}: check sslmode, sslrootcert, sslcert and sslkey in the URL"),
                ))
            }
        }
        #[cfg(feature = "tls")]
        sqlx::Error::Io(io) => rustls_refusal(options, io),
        _ => None,
    }
}

/// The rustls error somewhere in `error`'s chain (sqlx wraps handshake failures in an
/// `io::Error`, whose `source()` skips the error it carries), read as a refusal.
#[cfg(feature = "tls")]
fn rustls_refusal(
    options: &PgConnectOptions,
    error: &(dyn std::error::Error + 'static),
) -> Option<(RefusalKind, String)> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    let mut next = Some(error);
    let found = loop {
        let current = next?;
        if let Some(found) = current.downcast_ref::<rustls::Error>() {
            break found;
        }
        next = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    };
    Some(match found {
        rustls::Error::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        ) => (
            RefusalKind::Certificate,
            format!(
                "the server's certificate does not name the host {:?} ({found}): connect with \
                 a host name the certificate lists, or set sslmode=verify-ca (checks the CA \
                 only)",
                options.get_host()
            ),
        ),
        rustls::Error::InvalidCertificate(
            Cert::Expired | Cert::ExpiredContext { .. } | Cert::NotValidYet,
        ) => (
            RefusalKind::Certificate,
            format!("the server's certificate is not valid now ({found}): renew it"),
        ),
        rustls::Error::InvalidCertificate(_) => (
            RefusalKind::Certificate,
            format!(
                "the server's certificate is not trusted ({found}): set sslrootcert=<file> to \
                 the CA certificate that signed it (trusted besides {})",
                default_roots()
            ),
        ),
        rustls::Error::AlertReceived(
            Alert::BadCertificate
            | Alert::UnsupportedCertificate
            | Alert::CertificateRevoked
            | Alert::CertificateExpired
            | Alert::CertificateUnknown
            | Alert::UnknownCA
            | Alert::CertificateRequired
            | Alert::AccessDenied,
        ) => (
            RefusalKind::Certificate,
            format!(
                "the server did not accept the client certificate ({found}): set sslcert and \
                 sslkey to a certificate and key signed by a CA in the server's ssl_ca_file"
            ),
        ),
        other => (
            RefusalKind::Tls,
            format!(
                "the TLS handshake failed ({other}): check sslmode, sslrootcert, sslcert and \
                 sslkey in the URL"
            ),
        ),
    })
}

/// The roots trusted without `sslrootcert`, as built.
#[cfg(feature = "tls")]
fn default_roots() -> &'static str {
    if cfg!(feature = "tls-native-roots") {
        "the platform's roots, feature tls-native-roots"
    } else {
        "the bundled Mozilla roots"
    }
}

/// What to add to a message that asks for TLS, in a build without it.
fn feature_hint() -> &'static str {
    if cfg!(feature = "tls") {
        ""
    } else {
        " (this build of lock-postgres has no TLS: enable its Cargo feature `tls`)"
    }
}

/// `mode` as written in a URL.
pub(crate) fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// A build without the `tls` feature cannot honour an sslmode that demands TLS: say so at
/// once instead of at the first connect (sqlx's own error names its features, not ours).
/// `prefer` (sqlx's default) and `allow` fall back to plain connections and are fine.
pub(crate) fn check_tls_available(options: &PgConnectOptions) -> Result<(), LockError> {
    let mode = options.get_ssl_mode();
    if cfg!(feature = "tls")
        || !matches!(
            mode,
            PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
        )
    {
        return Ok(());
    }
    Err(LockError::InvalidConfig(format!(
        "sslmode={} needs TLS, but lock-postgres was built without it: enable its Cargo \
         feature `tls` (or `tls-native-roots` / `tls-webpki-roots`; the distlock facade's \
         `postgres-tls`)",
        ssl_mode_name(mode)
    )))
}
