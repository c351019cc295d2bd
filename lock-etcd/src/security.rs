//! TLS and credentials: the client options they make, and the errors that mean "refused"
//! (wrong password, no permission, untrusted certificate, TLS spoken by one side only)
//! rather than "unreachable", so that they are reported as `LockError::Refused`, never
//! retried.

use crate::config::EtcdConfig;
use etcd_client::ConnectOptions;
use lock_core::{LockError, RefusalKind};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const BACKEND: &str = "etcd";

/// The client URL of an endpoint: `https://` when TLS is configured.
pub(crate) fn endpoint_url(config: &EtcdConfig, endpoint: &str) -> String {
    if config.tls.is_some() {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// The client options of `config`, with its TLS settings and credentials. Reading the
/// certificate files is the only I/O.
pub(crate) fn client_options(config: &EtcdConfig) -> Result<ConnectOptions, LockError> {
    // gRPC keep-alive pings find a dead connection; etcd refuses pings more often than
    // every 5 s, so ping every 10 s. Requests that need a leader fail fast without one.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        options = with_tls(config, tls, options)?;
    }
    if let Some(credentials) = &config.credentials {
        // etcd's simple tokens expire after --auth-token-ttl (5 min by default) without
        // use; a backend idle that long must log in again rather than fail every request.
        options = options
            .with_user(credentials.user.clone(), credentials.password.clone())
            .with_auto_token_refresh(true);
    }
    Ok(options)
}

#[cfg(feature = "tls")]
fn with_tls(
    config: &EtcdConfig,
    tls: &crate::config::EtcdTls,
    options: ConnectOptions,
) -> Result<ConnectOptions, LockError> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let roots_enabled = cfg!(any(
        feature = "tls-native-roots",
        feature = "tls-webpki-roots"
    ));
    if tls.ca.is_none() && !roots_enabled {
        return Err(LockError::InvalidConfig(
            "etcds:// without ca= trusts no certificate: set ca=/path/to/ca.pem \
             (EtcdTls::with_ca), or enable the lock-etcd feature `tls-native-roots` \
             (platform roots) or `tls-webpki-roots` (Mozilla roots)"
                .into(),
        ));
    }
    // The handshake is bounded too: a server that accepts TCP but never answers TLS must
    // not hold a connect past its timeout.
    let mut tls_options = TlsOptions::new()
        .with_enabled_roots()
        .timeout(config.connect_timeout);
    if let Some(ca) = &tls.ca {
        tls_options = tls_options.ca_certificate(Certificate::from_pem(read_pem(ca, "ca")?));
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        tls_options = tls_options.identity(Identity::from_pem(
            read_pem(cert, "cert")?,
            read_pem(key, "key")?,
        ));
    }
    if let Some(name) = &tls.server_name {
        tls_options = tls_options.domain_name(name.clone());
    }
    Ok(options.with_tls(tls_options))
}

#[cfg(not(feature = "tls"))]
fn with_tls(
    _config: &EtcdConfig,
    _tls: &crate::config::EtcdTls,
    _options: ConnectOptions,
) -> Result<ConnectOptions, LockError> {
    Err(LockError::InvalidConfig(
        "TLS (etcds://, EtcdConfig::with_tls) needs the lock-etcd crate feature `tls` \
         (distlock: `etcd-tls`)"
            .into(),
    ))
}

/// Reads a PEM file named by the URL option `option`.
#[cfg(feature = "tls")]
fn read_pem(path: &std::path::Path, option: &str) -> Result<Vec<u8>, LockError> {
    let pem = std::fs::read(path).map_err(|error| {
        LockError::InvalidConfig(format!("etcd {option}= file {}: {error}", path.display()))
    })?;
    if let Some(problem) = lock_core::pem_problem(&pem, option == "key") {
        return Err(LockError::InvalidConfig(format!(
            "etcd {option}= file {} {problem}",
            path.display()
        )));
    }
    Ok(pem)
}

/// Every message of an error and its sources, joined: rustls, hyper and tonic wrap the
/// cause several layers deep, and the outer layers say only "transport error".
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// The refusal an etcd client error stands for, if it is one (messages name the
/// endpoints, user and prefix of `config`).
pub(crate) fn refusal(config: &EtcdConfig, error: &etcd_client::Error) -> Option<LockError> {
    let chain = error_chain(error);
    let endpoints = config.endpoints.join(",");
    let refused = |kind, message: String| {
        Some(LockError::refused(
            BACKEND,
            kind,
            message,
            Some(Box::new(ChainError(chain.clone()))),
        ))
    };
    let user = config
        .credentials
        .as_ref()
        .map_or_else(|| "(none)".to_owned(), |c| format!("{:?}", c.user));
    if chain.contains("authentication failed") {
        return refused(
            RefusalKind::Authentication,
            format!(
                "etcd at {endpoints} refused user {user}: {}; check the user and password \
                 (etcd[s]://user:password@host, EtcdConfig::with_user)",
                grpc_message(error, &chain)
            ),
        );
    }
    if chain.contains("permission denied") {
        return refused(
            RefusalKind::Authentication,
            format!(
                "etcd at {endpoints}: user {user} may not read and write the key prefix \
                 \"{prefix}/\" ({}); grant one of its roles readwrite on that prefix \
                 (etcdctl role grant-permission --prefix <role> readwrite {prefix}/), or \
                 connect as another user or with another /prefix",
                grpc_message(error, &chain),
                prefix = config.prefix,
            ),
        );
    }
    if chain.contains("user name is empty") || chain.contains("user name not found") {
        return refused(
            RefusalKind::Authentication,
            format!(
                "etcd at {endpoints} has authentication on and knows no user for this \
                 client ({}): give user:password@ in the URL (EtcdConfig::with_user)",
                grpc_message(error, &chain)
            ),
        );
    }
    if chain.contains("invalid peer certificate") {
        let fix = if chain.contains("NotValidForName") || chain.contains("not valid for name") {
            "the certificate does not name the host in the URL: connect by a name it \
             carries, or set server_name= (EtcdTls::with_server_name)"
        } else {
            "set ca= to the PEM file of the authority that signed the server's certificate \
             (EtcdTls::with_ca)"
        };
        return refused(
            RefusalKind::Certificate,
            format!(
                "the server certificate of etcd at {endpoints} is not accepted ({chain}); {fix}"
            ),
        );
    }
    if chain.contains("CertificateRequired")
        || chain.contains("BadCertificate")
        || chain.contains("UnknownCA")
        || chain.contains("certificate required")
    {
        return refused(
            RefusalKind::Certificate,
            format!(
                "etcd at {endpoints} did not accept the client certificate ({chain}); the \
                 server requires one (--client-cert-auth) signed by its --trusted-ca-file: \
                 set cert= and key= (EtcdTls::with_client_cert)"
            ),
        );
    }
    if config.tls.is_some()
        && (chain.contains("InvalidContentType") || chain.contains("corrupt message"))
    {
        return refused(
            RefusalKind::Tls,
            format!(
                "etcd at {endpoints} does not speak TLS ({chain}): use etcd:// (or turn on \
                 TLS on the server: --cert-file, --key-file, https:// client URLs)"
            ),
        );
    }
    None
}

/// The server's own message of a gRPC status (without tonic's decoration), else the chain.
fn grpc_message(error: &etcd_client::Error, chain: &str) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        _ => chain.to_owned(),
    }
}

/// An error message kept as the source of a `Refused` (the original error is not `Clone`,
/// and the refusal may be built from several).
#[derive(Debug)]
struct ChainError(String);

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChainError {}

/// For a connection that failed with a retryable error (`failure`): whether the server
/// speaks another protocol than the client (TLS against plain HTTP/2, or the reverse), or
/// closed the connection right after a TLS handshake (which a TLS server does when it does
/// not accept the client's certificate, or got none: the client sees only "connection
/// closed"). Each endpoint is probed once, all together, bounded by `within`.
pub(crate) async fn diagnose(
    config: &EtcdConfig,
    failure: &LockError,
    within: Duration,
) -> Option<LockError> {
    if within.is_zero() {
        return None;
    }
    let tls = config.tls.is_some();
    let mut probes = tokio::task::JoinSet::new();
    for endpoint in config.endpoints.clone() {
        probes.spawn(async move {
            let other = if tls {
                speaks_plain_http2(&endpoint).await
            } else {
                speaks_tls(&endpoint).await
            };
            let answer = if other {
                Some(true)
            } else if tls && speaks_tls(&endpoint).await {
                Some(false)
            } else {
                None
            };
            (endpoint, answer)
        });
    }
    let mut answers = Vec::new();
    let _ = timeout(within, async {
        while let Some(Ok(answer)) = probes.join_next().await {
            answers.push(answer);
        }
    })
    .await;
    answers.sort();
    let other_protocol: Vec<&str> = answers
        .iter()
        .filter(|(_, answer)| *answer == Some(true))
        .map(|(endpoint, _)| endpoint.as_str())
        .collect();
    if !other_protocol.is_empty() {
        let message = if tls {
            format!(
                "etcd at {} does not speak TLS (it answers plain HTTP/2): use etcd://, or turn \
                 on TLS on the server (--cert-file, --key-file, https:// client URLs)",
                other_protocol.join(",")
            )
        } else {
            format!(
                "etcd at {} serves TLS only: use etcds:// (with ca=/path/to/ca.pem, and cert= \
                 and key= if it requires client certificates; lock-etcd feature `tls`)",
                other_protocol.join(",")
            )
        };
        return Some(LockError::refused(BACKEND, RefusalKind::Tls, message, None));
    }
    let text = failure.to_string();
    // hyper says "stream closed because of a broken pipe", the OS "Broken pipe".
    let lowered = text.to_lowercase();
    let closed = [
        "connection closed",
        "tls handshake eof",
        "reset by peer",
        "broken pipe",
    ]
    .iter()
    .any(|sign| lowered.contains(sign));
    let tls_servers: Vec<&str> = answers
        .iter()
        .filter(|(_, answer)| *answer == Some(false))
        .map(|(endpoint, _)| endpoint.as_str())
        .collect();
    if tls && closed && !tls_servers.is_empty() {
        let given = match config.tls.as_ref().and_then(|tls| tls.cert.as_ref()) {
            Some(cert) => format!("the one given ({}) is not accepted", cert.display()),
            None => "none was given".to_owned(),
        };
        return Some(LockError::refused(
            BACKEND,
            RefusalKind::Certificate,
            format!(
                "etcd at {} speaks TLS but closed the connection right after the handshake: it \
                 requires a client certificate signed by its --trusted-ca-file \
                 (--client-cert-auth), and {given}; set cert= and key= \
                 (EtcdTls::with_client_cert) [{text}]",
                tls_servers.join(",")
            ),
            None,
        ));
    }
    None
}

/// Whether `endpoint` answers the HTTP/2 connection preface with a SETTINGS frame, as a
/// plain (h2c) etcd does.
async fn speaks_plain_http2(endpoint: &str) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let Ok(mut socket) = tokio::net::TcpStream::connect(endpoint).await else {
        return false;
    };
    if socket.write_all(PREFACE).await.is_err() {
        return false;
    }
    let mut header = [0u8; 9];
    if socket.read_exact(&mut header).await.is_err() {
        return false;
    }
    // Frame type SETTINGS (4) on stream 0.
    header[3] == 0x04 && header[5..9] == [0, 0, 0, 0]
}

/// A TLS 1.2 ClientHello (no SNI), enough to make a TLS server answer with a
/// ServerHello or an alert. A plain HTTP/2 server answers with HTTP/2 or HTTP/1 bytes, or
/// closes.
const CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x00, 0x43, // record: handshake, TLS 1.0 compatible, 67 bytes
    0x01, 0x00, 0x00, 0x3f, // ClientHello, 63 bytes
    0x03, 0x03, // TLS 1.2
    // 32 bytes of "random"
    0x44, 0x4c, 0x4f, 0x43, 0x4b, 0x44, 0x4c, 0x4f, 0x43, 0x4b, 0x44, 0x4c, 0x4f, 0x43, 0x4b, 0x44,
    0x4c, 0x4f, 0x43, 0x4b, 0x44, 0x4c, 0x4f, 0x43, 0x4b, 0x44, 0x4c, 0x4f, 0x43, 0x4b, 0x44,
    0x4c, //
    0x00, // no session id
    0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f, // ECDHE-ECDSA/RSA-AES128-GCM-SHA256
    0x01, 0x00, // no compression
    0x00, 0x12, // extensions, 18 bytes
    0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17, // supported groups: P-256
    0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01, // signature algorithms
];

async fn speaks_tls(endpoint: &str) -> bool {
    let Ok(mut socket) = tokio::net::TcpStream::connect(endpoint).await else {
        return false;
    };
    if socket.write_all(CLIENT_HELLO).await.is_err() {
        return false;
    }
    let mut head = [0u8; 2];
    if socket.read_exact(&mut head).await.is_err() {
        return false;
    }
    // A handshake (0x16) or alert (0x15) record of TLS 1.x.
    matches!(head, [0x15 | 0x16, 0x03])
}
