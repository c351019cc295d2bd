//! TLS settings for `rediss://` servers, the one function that builds every `redis::Client`
//! from a URL and those settings ([`build_client`]), and the mapping of refusals (wrong
//! password, untrusted certificate, TLS spoken by one side only) to `LockError::Refused`.
//!
//! Single node, Redlock, Sentinel and Cluster all build their clients here, so a URL means
//! the same TLS settings whichever topology reads it.

use lock_core::{LockError, RefusalKind};
use std::path::PathBuf;

/// A PEM document: a file read when the client is built, or the PEM itself.
#[derive(Clone, PartialEq, Eq)]
enum Pem {
    File(PathBuf),
    Inline(Vec<u8>),
}

impl Pem {
    #[cfg(feature = "tls")]
    fn read(&self, what: &str) -> Result<Vec<u8>, LockError> {
        let pem = match self {
            Pem::Inline(pem) => pem.clone(),
            Pem::File(path) => std::fs::read(path).map_err(|error| {
                LockError::InvalidConfig(format!(
                    "redis TLS: cannot read the {what} file {}: {error}",
                    path.display()
                ))
            })?,
        };
        // The redis crate takes a CA file without a certificate in it for an empty trust
        // store, and every handshake then fails as "certificate not accepted".
        if let Some(problem) = lock_core::pem_problem(&pem, what == "tls_key") {
            let source = match self {
                Pem::File(path) => format!("the {what} file {}", path.display()),
                Pem::Inline(_) => format!("the {what} given"),
            };
            return Err(LockError::InvalidConfig(format!(
                "redis TLS: {source} {problem}"
            )));
        }
        Ok(pem)
    }
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pem::File(path) => write!(f, "File({})", path.display()),
            // A private key must not end up in a log.
            Pem::Inline(_) => f.write_str("Inline(<redacted>)"),
        }
    }
}

/// TLS settings for `rediss://` / `redlocks://` URLs (part of [`crate::RedisOptions`]).
///
/// Without any setting the server's certificate is checked against the roots of the `redis`
/// crate's rustls (the platform's, or Mozilla's with feature `tls-webpki-roots`). A CA set
/// here *replaces* those roots (as the `redis` crate does): a private CA is trusted alone.
/// URL parameters `tls_ca`, `tls_cert` and `tls_key` (file paths) set the same things.
///
/// ```
/// use lock_redis::{RedisOptions, RedisTls};
/// let options = RedisOptions::default().tls(
///     RedisTls::default()
///         .ca_file("/etc/redis/ca.crt")
///         .client_cert_files("/etc/app/client.crt", "/etc/app/client.key"),
/// );
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    ca: Option<Pem>,
    client_cert: Option<Pem>,
    client_key: Option<Pem>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .finish()
    }
}

impl RedisTls {
    /// Trust only the CA certificate(s) in this PEM file (URL: `tls_ca=/path`).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(Pem::File(path.into()));
        self
    }

    /// Trust only the CA certificate(s) in this PEM text.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca = Some(Pem::Inline(pem.into()));
        self
    }

    /// Present this client certificate and key (PEM files; URL: `tls_cert=/path&tls_key=/path`)
    /// to servers that ask for one (`tls-auth-clients yes|optional`).
    pub fn client_cert_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some(Pem::File(cert.into()));
        self.client_key = Some(Pem::File(key.into()));
        self
    }

    /// [`Self::client_cert_files`] with the PEM text itself.
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client_cert = Some(Pem::Inline(cert.into()));
        self.client_key = Some(Pem::Inline(key.into()));
        self
    }

    /// Whether nothing is set (the defaults of the `redis` crate apply).
    pub fn is_default(&self) -> bool {
        *self == RedisTls::default()
    }

    pub(crate) fn set_ca_file(&mut self, path: &str) {
        self.ca = Some(Pem::File(path.into()));
    }

    pub(crate) fn set_client_cert_file(&mut self, path: &str) {
        self.client_cert = Some(Pem::File(path.into()));
    }

    pub(crate) fn set_client_key_file(&mut self, path: &str) {
        self.client_key = Some(Pem::File(path.into()));
    }

    /// A certificate needs its key and a key its certificate.
    pub(crate) fn validate(&self) -> Result<(), LockError> {
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => Err(LockError::InvalidConfig(
                "redis TLS: a client certificate (tls_cert) needs its key (tls_key)".into(),
            )),
            (None, Some(_)) => Err(LockError::InvalidConfig(
                "redis TLS: a client key (tls_key) needs its certificate (tls_cert)".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The certificates in the form `redis::Client::build_with_tls` and the cluster client
    /// builder take, or `None` when nothing is set (the crate's default roots then apply).
    #[cfg(feature = "tls")]
    pub(crate) fn certificates(&self) -> Result<Option<redis::TlsCertificates>, LockError> {
        self.validate()?;
        if self.is_default() {
            return Ok(None);
        }
        let root_cert = self.ca.as_ref().map(|ca| ca.read("tls_ca")).transpose()?;
        let client_tls = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: cert.read("tls_cert")?,
                client_key: key.read("tls_key")?,
            }),
            _ => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

/// Whether `info` asks for TLS (`rediss://`).
pub(crate) fn is_tls(info: &redis::ConnectionInfo) -> bool {
    matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
}

/// The error for a TLS URL in a build without TLS.
pub(crate) fn tls_not_built(url: &str) -> LockError {
    let url = lock_core::redact_url(url);
    LockError::InvalidConfig(format!(
        "redis URL {url:?} asks for TLS, but lock-redis was built without its `tls` feature \
         (enable `lock-redis/tls`, or `redis-tls` on the distlock crate)"
    ))
}

/// Builds the client for one server: `info` as parsed from a node URL (TCP settings already
/// applied) and the TLS settings. TLS settings on a plain `redis://` address are refused, so
/// that a forgotten `s` cannot silently turn TLS off.
pub(crate) fn build_client(
    info: redis::ConnectionInfo,
    tls: &RedisTls,
) -> Result<redis::Client, LockError> {
    tls.validate()?;
    let bad = |error: redis::RedisError| {
        LockError::InvalidConfig(format!("redis TLS settings for {}: {error}", info.addr()))
    };
    if !is_tls(&info) {
        if !tls.is_default() {
            return Err(LockError::InvalidConfig(format!(
                "redis TLS settings (tls_ca, tls_cert, tls_key) were given for {}, which is not \
                 a TLS address: use rediss:// (or redlocks://)",
                info.addr()
            )));
        }
        return redis::Client::open(info.clone()).map_err(bad);
    }
    #[cfg(feature = "tls")]
    {
        install_crypto_provider();
        match tls.certificates()? {
            None => redis::Client::open(info.clone()).map_err(bad),
            Some(certificates) => {
                redis::Client::build_with_tls(info.clone(), certificates).map_err(bad)
            }
        }
    }
    #[cfg(not(feature = "tls"))]
    Err(tls_not_built(&info.addr().to_string()))
}

/// The `redis` crate's rustls takes the process's default crypto provider. Pick `ring` (the
/// one this crate compiles in) unless the application already chose one: with several
/// providers compiled into one program (another crate may enable `aws-lc-rs`) rustls cannot
/// choose by itself and would panic.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install one meanwhile; then theirs is used, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// What to check when connecting failed in a way a TLS mismatch causes: a TLS server resets
/// a plain client's connection at its first bytes; a plain server waits for the end of a
/// line that a TLS handshake never sends, so a `rediss://` client hears nothing (`error`
/// `None`: the connect timeout ran out). Empty when the failure says nothing of the kind.
pub(crate) fn mismatch_hint(
    client: &redis::Client,
    error: Option<&redis::RedisError>,
) -> &'static str {
    let tls = is_tls(client.get_connection_info());
    let reset = error.is_some_and(|error| {
        error.is_io_error()
            && (error.is_connection_dropped() || error.to_string().contains("reset by peer"))
    });
    match (tls, error) {
        (true, None) => {
            " (a plain, non-TLS server never answers a TLS handshake: if this port \
                          does not speak TLS, use redis:// instead of rediss://)"
        }
        (false, Some(_)) if reset => {
            " (a TLS-only server resets plain connections: if this \
                                       port speaks TLS, use rediss:// instead of redis://)"
        }
        _ => "",
    }
}

/// `error` with `hint` appended to its message (a `Backend` error; others are returned as
/// they are: a refusal already says what to fix).
pub(crate) fn with_hint(error: LockError, hint: &str) -> LockError {
    match error {
        LockError::Backend {
            backend,
            message,
            retryable,
            source,
        } if !hint.is_empty() => LockError::Backend {
            backend,
            message: message + hint,
            retryable,
            source,
        },
        other => other,
    }
}

/// If `error` is a refusal (credentials, certificates, TLS spoken by one side only), the
/// `LockError::Refused` for it; `context` says what was being done (e.g. `connecting to
/// 127.0.0.1:6380`).
pub(crate) fn refusal(context: &str, error: &redis::RedisError) -> Option<LockError> {
    let (kind, advice) = classify(error)?;
    Some(LockError::refused(
        "redis",
        kind,
        format!("{context}: {error}; {advice}"),
        Some(Box::new(error.clone())),
    ))
}

fn classify(error: &redis::RedisError) -> Option<(RefusalKind, &'static str)> {
    if error.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("WRONGPASS" | "NOAUTH"))
    {
        return Some((
            RefusalKind::Authentication,
            "check the user and password in the URL (rediss://user:password@host:port)",
        ));
    }
    if error.code() == Some("NOPERM") {
        return Some((
            RefusalKind::Authentication,
            "the URL's ACL user lacks a permission distlock needs (keys ~<prefix>*, channels \
             &<prefix>*, EVALSHA, SCRIPT LOAD, PUBLISH, SUBSCRIBE, PING)",
        ));
    }
    classify_tls(error)
}

#[cfg(feature = "tls")]
fn classify_tls(error: &redis::RedisError) -> Option<(RefusalKind, &'static str)> {
    use rustls::{AlertDescription, Error as TlsError};
    let not_trusted = "the server's certificate is not signed by a trusted CA or does not name \
                       the host: set tls_ca to the CA that signed it (or RedisTls::ca_file)";
    let client_cert = "the server did not accept the client certificate: set tls_cert and \
                       tls_key to a certificate its CA signed (RedisTls::client_cert_files)";
    let not_tls = "the server did not answer in TLS: is this a plain port? Use redis:// for \
                   a server without TLS";
    match rustls_error(error)? {
        TlsError::InvalidCertificate(_) => Some((RefusalKind::Certificate, not_trusted)),
        TlsError::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::AccessDenied,
        ) => Some((RefusalKind::Certificate, client_cert)),
        TlsError::InvalidMessage(_) | TlsError::InappropriateMessage { .. } => {
            Some((RefusalKind::Tls, not_tls))
        }
        _ => Some((
            RefusalKind::Tls,
            "the TLS handshake failed: check that the server speaks TLS on this port and \
             shares a protocol version and cipher with rustls",
        )),
    }
}

#[cfg(not(feature = "tls"))]
fn classify_tls(_error: &redis::RedisError) -> Option<(RefusalKind, &'static str)> {
    None
}

/// The rustls error somewhere in `error`'s source chain. The `redis` crate wraps it in an
/// `Arc<dyn Error>` (and usually an `io::Error` inside that), which `source()` walks past, so
/// each level is unwrapped by hand.
#[cfg(feature = "tls")]
fn rustls_error(error: &redis::RedisError) -> Option<&rustls::Error> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    fn inner<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(shared) = error.downcast_ref::<Shared>() {
            let shared: &(dyn std::error::Error + 'static) = shared.as_ref();
            if let Some(found) = inner(shared) {
                return Some(found);
            }
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(wrapped) = io.get_ref()
        {
            let wrapped: &(dyn std::error::Error + 'static) = wrapped;
            if let Some(found) = inner(wrapped) {
                return Some(found);
            }
        }
        error.source().and_then(inner)
    }
    let top: &(dyn std::error::Error + 'static) = error;
    inner(top)
}
