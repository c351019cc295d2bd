//! Endpoints, key prefix, timeouts, TLS and credentials, and the `etcd://` / `etcds://` URL
//! that carries them.

use lock_core::LockError;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Key prefix used when the URL names none.
pub const DEFAULT_PREFIX: &str = "distlock";

/// How to reach etcd and where to keep the lock keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` of each member (the client balances over them).
    pub endpoints: Vec<String>,
    /// Key prefix: every lock key lives under `<prefix>/`. Prefixes of two deployments must
    /// not be prefixes of one another.
    pub prefix: String,
    /// Bound on connecting (TCP, TLS handshake, authentication) and on the first request
    /// that proves the server answers.
    pub connect_timeout: Duration,
    /// Bound on every single request (a paused or partitioned server must not hang a call).
    pub request_timeout: Duration,
    /// TLS to every member (`etcds://`); `None`: plain HTTP/2 (`etcd://`). Needs the crate
    /// feature `tls`.
    pub tls: Option<EtcdTls>,
    /// User name and password for etcd's role-based access control; `None`: no
    /// authentication request (etcd then allows everything while auth is disabled, or maps a
    /// client certificate's common name to a user when it runs with `--client-cert-auth`).
    pub credentials: Option<Credentials>,
}

/// TLS settings: which authorities to trust and which certificate to present.
///
/// The server is verified against `ca` plus the roots of the crate features
/// `tls-native-roots` (the platform's) and `tls-webpki-roots` (Mozilla's, compiled in); with
/// neither feature a `ca` is required. The name verified is the endpoint's host (an IP
/// address must be in the certificate's IP SANs) unless `server_name` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM file with the certificate authorities to trust (URL `ca=`).
    pub ca: Option<PathBuf>,
    /// PEM file with the client certificate (chain) for mutual TLS (URL `cert=`).
    pub cert: Option<PathBuf>,
    /// PEM file with the client certificate's private key (URL `key=`).
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against instead of the endpoint's host (URL
    /// `server_name=`), e.g. when members are reached by IP address but certified by name.
    pub server_name: Option<String>,
}

impl EtcdTls {
    /// TLS trusting only the roots enabled by crate features (see the type's docs).
    pub fn new() -> Self {
        EtcdTls::default()
    }

    /// The same settings, also trusting the authorities in the PEM file `ca`.
    pub fn with_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.ca = Some(ca.into());
        self
    }

    /// The same settings, presenting the client certificate `cert` with its key `key` (PEM
    /// files), for servers started with `--client-cert-auth`.
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert = Some(cert.into());
        self.key = Some(key.into());
        self
    }

    /// The same settings, verifying the server certificate against `name`.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

/// An etcd user and its password. `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The etcd user name.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl EtcdConfig {
    /// A configuration for `endpoints` with the default prefix and timeouts, plain HTTP/2,
    /// no credentials.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(3),
            tls: None,
            credentials: None,
        }
    }

    /// The same configuration with another key prefix (leading and trailing `/` are dropped).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().trim_matches('/').to_owned();
        self
    }

    /// The same configuration with another connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The same configuration with another per-request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The same configuration speaking TLS to every member (needs the crate feature `tls`).
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The same configuration authenticating as `user` (etcd RBAC). The client obtains a
    /// token at connect time and obtains a new one whenever etcd says it has expired.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// Parses `etcd[s]://[user:password@]host:port[,host:port…][/prefix][?option=value&…]`.
    ///
    /// `etcds://` speaks TLS (crate feature `tls`); its options are `ca=<PEM file>`,
    /// `cert=<PEM file>` with `key=<PEM file>` (a client certificate), and
    /// `server_name=<name>`. User, password and option values are percent-decoded (the
    /// prefix is taken as written). An unknown
    /// option, a TLS option on `etcd://`, or `etcds://` in a build without `tls` is
    /// `LockError::InvalidConfig`.
    pub fn from_url(url: &str) -> Result<Self, LockError> {
        let shown = lock_core::redact_url(url);
        let invalid = |why: &str| LockError::InvalidConfig(format!("etcd URL {shown:?}: {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            invalid("expected etcd[s]://[user:password@]host:port[,host:port…][/prefix][?options]")
        })?;
        let secure = if scheme.eq_ignore_ascii_case("etcds") {
            true
        } else if scheme.eq_ignore_ascii_case("etcd") {
            false
        } else {
            return Err(invalid("the scheme must be etcd:// or etcds:// (TLS)"));
        };
        if secure && !cfg!(feature = "tls") {
            return Err(invalid(
                "etcds:// (TLS) needs the lock-etcd crate feature `tls` (distlock: `etcd-tls`)",
            ));
        }
        if rest.contains('#') {
            return Err(invalid("fragments are not supported"));
        }
        // An '@' after a '/' or '?': a password holding one of those unescaped (the parse
        // would take part of it for an endpoint, the key prefix or an option, and echo it),
        // or an '@' in the prefix or an option. Refused without repeating the URL's parts.
        if matches!(rest.rsplit_once('@'), Some((before, _)) if before.contains(['/', '?'])) {
            return Err(invalid(
                "an '@' follows a '/' or '?': percent-encode '/', '?' and '#' in the user name \
                 and password (%2F, %3F, %23); a key prefix or option cannot hold an '@'",
            ));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, prefix) = match rest.split_once('/') {
            Some((authority, prefix)) => (authority, prefix.trim_matches('/')),
            None => (rest, ""),
        };
        // The last '@' ends the credentials: a password may contain '@' only encoded, but
        // host names never contain one.
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (
                Some(parse_userinfo(userinfo).map_err(|why| invalid(&why))?),
                hosts,
            ),
            None => (None, authority),
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            endpoints.push(parse_endpoint(host).map_err(|why| invalid(&why))?);
        }
        // The prefix is taken as written (as before credentials and options existed).
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX
        } else {
            prefix
        };
        let mut config = EtcdConfig::new(endpoints).with_prefix(prefix);
        config.credentials = credentials;
        let mut tls = EtcdTls::new();
        let mut seen = std::collections::HashSet::new();
        for pair in query.into_iter().flat_map(|query| query.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            // Given twice, the last value would win without a word.
            if !seen.insert(name) {
                return Err(invalid(&format!("option {name}= is given more than once")));
            }
            let value =
                percent_decode(value, &format!("option {name}=")).map_err(|why| invalid(&why))?;
            if value.is_empty() {
                return Err(invalid(&format!("option {name}= has no value")));
            }
            let slot = match name {
                "ca" => &mut tls.ca,
                "cert" => &mut tls.cert,
                "key" => &mut tls.key,
                "server_name" => {
                    tls.server_name = Some(value);
                    continue;
                }
                _ => {
                    return Err(invalid(&format!(
                        "unknown option {name:?} (known: ca, cert, key, server_name)"
                    )));
                }
            };
            *slot = Some(PathBuf::from(value));
        }
        if secure {
            config.tls = Some(tls);
        } else if tls != EtcdTls::default() {
            return Err(invalid(
                "ca=, cert=, key= and server_name= are TLS options: use etcds://",
            ));
        }
        config.validate().map_err(|why| invalid(&why))?;
        Ok(config)
    }

    /// Checks what can be checked without the network: a client certificate comes with its
    /// key.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(tls) = &self.tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            return Err(
                "a client certificate needs both cert= and key= (EtcdTls::with_client_cert)".into(),
            );
        }
        if let Some(credentials) = &self.credentials
            && credentials.user.is_empty()
        {
            return Err("an empty user name".into());
        }
        if let Some(why) = lock_core::timeout_problem(&[
            ("connect timeout", self.connect_timeout),
            ("request timeout", self.request_timeout),
        ]) {
            return Err(why);
        }
        Ok(())
    }
}

fn parse_userinfo(userinfo: &str) -> Result<Credentials, String> {
    let (user, password) = userinfo
        .split_once(':')
        .ok_or("credentials must be user:password@ (a password is required)")?;
    let user = percent_decode(user, "the user name")?;
    if user.is_empty() {
        return Err("an empty user name in user:password@".into());
    }
    Ok(Credentials {
        user,
        password: percent_decode(password, "the password")?,
    })
}

/// Decodes `%XX` escapes (UTF-8); anything else is taken as it is. `what` names the part in
/// errors, which never quote the text: it may be a password.
fn percent_decode(text: &str, what: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            // Two hex digits exactly (`from_str_radix` alone would take "+1").
            let hex = bytes
                .get(index + 1..index + 3)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| {
                    format!(
                        "a bad percent escape in {what} (at byte {index}: '%' must be followed \
                         by two hex digits; write '%25' for a '%')"
                    )
                })?;
            out.push(hex);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the percent escapes in {what} are not UTF-8"))
}

fn parse_endpoint(host: &str) -> Result<String, String> {
    if host.is_empty() {
        return Err("an empty endpoint (expected host:port)".into());
    }
    let (name, port) = host
        .rsplit_once(':')
        .ok_or_else(|| format!("endpoint {host:?} has no port (expected host:port)"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("endpoint {host:?}: {port:?} is not a port number"))?;
    if port == 0 {
        return Err(format!("endpoint {host:?}: port 0"));
    }
    let bracketed = name.starts_with('[') && name.ends_with(']') && name.len() > 2;
    if name.is_empty()
        || (!bracketed && name.contains([':', '[', ']']))
        || name.contains(|c: char| c.is_whitespace() || c == '/')
    {
        return Err(format!("endpoint {host:?}: {name:?} is not a host name"));
    }
    Ok(format!("{name}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let config = EtcdConfig::from_url("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(config.endpoints, vec!["127.0.0.1:2379"]);
        assert_eq!(config.prefix, DEFAULT_PREFIX);
        let config = EtcdConfig::from_url("etcd://a:1,b:2,[::1]:3/app/locks/").unwrap();
        assert_eq!(config.endpoints, vec!["a:1", "b:2", "[::1]:3"]);
        assert_eq!(config.prefix, "app/locks");
    }

    #[test]
    fn parses_credentials_and_tls_options() {
        let config = EtcdConfig::from_url("etcd://app:p%40ss%3Aw@a:1,b:2/locks").unwrap();
        assert_eq!(
            config.credentials,
            Some(Credentials {
                user: "app".into(),
                password: "p@ss:w".into()
            })
        );
        assert_eq!(config.endpoints, vec!["a:1", "b:2"]);
        assert_eq!(config.prefix, "locks");
        assert!(config.tls.is_none());
        assert!(!format!("{config:?}").contains("p@ss"));
        if cfg!(feature = "tls") {
            let config = EtcdConfig::from_url(
                "etcds://u:p@a:1/x?ca=/etc/ca.pem&cert=/c%20d.pem&key=/k.pem&server_name=etcd.local",
            )
            .unwrap();
            assert_eq!(
                config.tls,
                Some(
                    EtcdTls::new()
                        .with_ca("/etc/ca.pem")
                        .with_client_cert("/c d.pem", "/k.pem")
                        .with_server_name("etcd.local")
                )
            );
            assert_eq!(config.prefix, "x");
            let config = EtcdConfig::from_url("etcds://a:1").unwrap();
            assert_eq!(config.tls, Some(EtcdTls::new()));
        } else {
            match EtcdConfig::from_url("etcds://a:1?ca=/x") {
                Err(LockError::InvalidConfig(message)) => {
                    assert!(message.contains("feature `tls`"), "{message}")
                }
                other => panic!("etcds:// without the tls feature: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_do_not_show_the_password() {
        let Err(LockError::InvalidConfig(message)) =
            EtcdConfig::from_url("etcd://app:secret@a:1?nope=1")
        else {
            panic!("accepted");
        };
        assert!(!message.contains("secret"), "{message}");
        assert!(message.contains("app:***@a:1"), "{message}");
        // Unescaped '/', '?' or '#' in a password: no part of it is shown.
        for url in [
            "etcd://u:s3/cret@a:1",
            "etcd://u:s3?cret@a:1",
            "etcd://u:s3#cret@a:1",
            "etcd://root:2024/s3cret@h:2379",
            "etcd://u:s3?x=cret@a:1",
            // A bad escape in the password (the message once quoted the password).
            "etcd://u:s3cr%et@a:1",
            "etcd://u:s3cret%FF@a:1",
            "etcd://u:s3cret%+1@a:1",
        ] {
            let Err(LockError::InvalidConfig(message)) = EtcdConfig::from_url(url) else {
                panic!("{url} accepted");
            };
            assert!(
                !message.contains("s3") && !message.contains("cret"),
                "{url}: {message}"
            );
        }
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "",
            "etcd://",
            "redis://a:1",
            "etcd://a",
            "etcd://a:x",
            "etcd://a:0",
            "etcd://a:1,",
            "etcd://:1",
            "etcd://a:99999",
            "etcd://u@a:1",
            "etcd://:p@a:1",
            "etcd://a:1?x=y",
            "etcd://a:1?ca=/x",
            "etcd://a:1?ca=",
            "etcd://u:%zz@a:1",
            "etcd://u:%+1@a:1",
            "etcds://a:1?ca=/x&ca=/y",
            "etcd://u:p@a:1?ca=%-1",
            "127.0.0.1:2379",
            "etcd://::1:2379",
            "etcds://a:1?cert=/c",
            "etcds://a:1?key=/k",
            "etcd://a:1#f",
        ] {
            assert!(
                matches!(EtcdConfig::from_url(bad), Err(LockError::InvalidConfig(_))),
                "{bad:?} was accepted"
            );
        }
    }
}
