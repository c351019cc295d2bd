//! The one error type every backend and the client return.

use std::time::Duration;

/// A boxed error kept as the `source` of [`LockError::Backend`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong when taking, keeping or giving up a lock.
///
/// The variants separate what the caller does next: `Timeout` (try later or give up), `Lost`
/// (stop the critical section now), the `Invalid*` family (fix the input; retrying cannot
/// help) and `Backend` (the server or the connection failed; [`LockError::is_retryable`] says
/// whether another attempt may succeed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The lock was not acquired before the wait deadline.
    #[error("lock {key:?} not acquired within {waited:?}: another holder kept it")]
    Timeout {
        /// The key that was asked for.
        key: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The lease is no longer ours: it expired, was taken over, or the backend forgot it.
    #[error("lock {key:?} was lost: {reason}")]
    Lost {
        /// The key whose lease was lost.
        key: String,
        /// Why the lease is considered lost.
        reason: String,
    },
    /// The key is not acceptable (empty, too long, contains NUL).
    #[error("invalid lock key: {0}")]
    InvalidKey(String),
    /// The TTL is not acceptable (zero, too large to represent, or too short to use).
    #[error("invalid TTL {ttl:?}: {reason}")]
    InvalidTtl {
        /// The TTL that was given.
        ttl: Duration,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value (URL, option) is not acceptable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The connection was refused for its credentials or certificates: a wrong password or
    /// user, a server certificate the client does not trust (or that does not name the host),
    /// a client certificate the server does not accept, TLS required by one side and not
    /// spoken by the other. Never retryable: the configuration must change.
    #[error("{backend} backend refused the connection ({kind}): {message}")]
    Refused {
        /// Which backend reported it.
        backend: &'static str,
        /// Which check failed.
        kind: RefusalKind,
        /// What failed, for humans (names the URL option to fix where there is one).
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend (server, connection, protocol) failed.
    #[error("{backend} backend error{}: {message}", if *.retryable { " (may succeed if retried)" } else { "" })]
    Backend {
        /// Which backend reported it (`redis`, `postgres`, …).
        backend: &'static str,
        /// What failed, for humans.
        message: String,
        /// Whether a later attempt may succeed (connection refused, timeout) or not
        /// (authentication, protocol error).
        retryable: bool,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
}

impl LockError {
    /// A backend failure with a source error.
    pub fn backend(
        backend: &'static str,
        message: impl Into<String>,
        retryable: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        LockError::Backend {
            backend,
            message: message.into(),
            retryable,
            source: Some(source.into()),
        }
    }

    /// A backend failure without a source error.
    pub fn backend_msg(backend: &'static str, message: impl Into<String>, retryable: bool) -> Self {
        LockError::Backend {
            backend,
            message: message.into(),
            retryable,
            source: None,
        }
    }

    /// A refused connection (see [`LockError::Refused`]).
    pub fn refused(
        backend: &'static str,
        kind: RefusalKind,
        message: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        LockError::Refused {
            backend,
            kind,
            message: message.into(),
            source,
        }
    }

    /// Whether the server or the client refused the connection for its credentials or
    /// certificates ([`LockError::Refused`]).
    pub fn is_refused(&self) -> bool {
        matches!(self, LockError::Refused { .. })
    }

    /// A `Lost` error for `key`.
    pub fn lost(key: impl Into<String>, reason: impl Into<String>) -> Self {
        LockError::Lost {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// Whether trying the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            LockError::Backend { retryable, .. } => *retryable,
            LockError::Timeout { .. } => true,
            _ => false,
        }
    }

    /// Whether this error says the lease is gone.
    pub fn is_lost(&self) -> bool {
        matches!(self, LockError::Lost { .. })
    }

    /// Whether this error is a wait timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, LockError::Timeout { .. })
    }
}

/// Which check refused a connection ([`LockError::Refused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalKind {
    /// Wrong user name or password, or a user without the needed permission.
    Authentication,
    /// The server's certificate is not trusted by the configured roots, has expired, or does
    /// not name the host; or the server did not accept the client's certificate.
    Certificate,
    /// TLS itself: one side requires it and the other does not speak it, or the handshake
    /// failed for another reason.
    Tls,
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RefusalKind::Authentication => "authentication failed",
            RefusalKind::Certificate => "certificate not accepted",
            RefusalKind::Tls => "TLS failed",
        })
    }
}

/// `url` with the password of its user info replaced by `***`, for error messages and logs
/// (`redis://app:s3cret@h:6379/0` reads `redis://app:***@h:6379/0`), and the value of every
/// query parameter named `pass` or ending in `password` (`?password=`, `sentinel_password=`)
/// too. Everything else is kept, several hosts included; a URL without a password is
/// returned as it is.
///
/// The user info ends at the *last* `@`: a password may hold a `/`, `?` or `#` that should
/// have been percent-encoded, and which a parser would take for the path, query or fragment.
/// An `@` in a query value then hides what comes before it too: hiding too much beats
/// showing a password.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL at all (a scheme forgotten): hide whatever comes before an `@`.
        return match url.rsplit_once('@') {
            Some((_, hosts)) => format!("***@{}", redact_password_parameters(hosts)),
            None => redact_password_parameters(url),
        };
    };
    let shown = match rest.rsplit_once('@') {
        Some((userinfo, after)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{after}"),
            None => format!("{userinfo}@{after}"),
        },
        None => rest.to_owned(),
    };
    format!("{scheme}://{}", redact_password_parameters(&shown))
}

/// Whether `bytes` look like PEM (a `-----BEGIN ` line somewhere): the check every backend
/// makes of a certificate or key file when its URL is read, since the TLS libraries read such
/// files only at the first handshake, where garbage looks like a refused connection or an
/// empty trust store.
pub fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|window| window == b"-----BEGIN ")
}

/// What is wrong with a PEM file given for a TLS option, if anything: no PEM at all, or not
/// the kind asked for (a certificate where a private key belongs, or the other way round). A
/// TLS stack finds that only when it builds its configuration, where the error reads like a
/// failed connection.
pub fn pem_problem(bytes: &[u8], private_key: bool) -> Option<&'static str> {
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|window| window == needle);
    if !looks_like_pem(bytes) {
        Some("holds no PEM data (no -----BEGIN line)")
    } else if private_key && !has(b"PRIVATE KEY-----") {
        Some("holds no private key (no -----BEGIN …PRIVATE KEY----- block)")
    } else if !private_key && !has(b"-----BEGIN CERTIFICATE-----") {
        Some("holds no certificate (no -----BEGIN CERTIFICATE----- block)")
    } else {
        None
    }
}

/// Whether a query parameter named `name` carries a password (a name with a percent escape
/// may spell one: hidden too).
fn is_password_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "pass" || name.ends_with("password") || name.contains('%')
}

/// `…?a=b&password=secret&…` with the values of password parameters hidden. Every `?`, `&`
/// and `#` after the first `?` starts a new parameter, so that a value cannot carry a second
/// query past the check.
fn redact_password_parameters(text: &str) -> String {
    let Some(start) = text.find('?') else {
        return text.to_owned();
    };
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..=start]);
    let mut rest = &text[start + 1..];
    loop {
        let mut end = rest.find(['&', '?', '#']).unwrap_or(rest.len());
        // A password's value runs to the next '&': an unescaped '?' or '#' may be part of it.
        if let Some((name, _)) = rest[..end].split_once('=')
            && is_password_parameter(name)
        {
            end = rest.find('&').unwrap_or(rest.len());
        }
        let (parameter, tail) = rest.split_at(end);
        match parameter.split_once('=') {
            Some((name, _)) if is_password_parameter(name) => {
                out.push_str(name);
                out.push_str("=***");
            }
            _ => out.push_str(parameter),
        }
        let Some(separator) = tail.chars().next() else {
            break;
        };
        out.push(separator);
        rest = &tail[separator.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn passwords_are_hidden_and_the_rest_kept() {
        for (url, shown) in [
            ("redis://app:s3cret@h:6379/0", "redis://app:***@h:6379/0"),
            ("redis://:s3cret@h:6379", "redis://:***@h:6379"),
            (
                "redlock://u:p%40ss@h1:1,h2:2/0?prefix=x",
                "redlock://u:***@h1:1,h2:2/0?prefix=x",
            ),
            ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
            ("postgres://u@db/x", "postgres://u@db/x"),
            // An `@` in a query value: what precedes it could be user info.
            ("etcd://h:2379/p?a=b@c", "etcd://h:***@c"),
            ("etcd://h:2379/p?a=b", "etcd://h:2379/p?a=b"),
            // Unescaped `#`, `?`, `/` in a password.
            ("redis://app:pa#ss@h:6379/0", "redis://app:***@h:6379/0"),
            ("redis://app:pa?ss@h:6379/0", "redis://app:***@h:6379/0"),
            ("etcd://u:pa#ss@h:2379/p", "etcd://u:***@h:2379/p"),
            (
                "redis+sentinel://h:1/m?sentinel_password=s3cret&prefix=x",
                "redis+sentinel://h:1/m?sentinel_password=***&prefix=x",
            ),
            (
                "redis+unix:///r.sock?db=1&pass=s3cret",
                "redis+unix:///r.sock?db=1&pass=***",
            ),
            (
                "postgres://db/x?a=1?password=s3cret",
                "postgres://db/x?a=1?password=***",
            ),
            (
                "postgres://db/x?password=s3#cret&a=1",
                "postgres://db/x?password=***&a=1",
            ),
            (
                "postgres://db/x?pass%77ord=s3cret",
                "postgres://db/x?pass%77ord=***",
            ),
            ("nope", "nope"),
            ("app:s3cret@h:6379", "***@h:6379"),
            ("redis://u:a/b@h:1/0", "redis://u:***@h:1/0"),
            (
                "postgres://u@db/x?password=s3cret&sslmode=require",
                "postgres://u@db/x?password=***&sslmode=require",
            ),
            (
                "postgres://db/x?sslmode=require&password=s3cret",
                "postgres://db/x?sslmode=require&password=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
