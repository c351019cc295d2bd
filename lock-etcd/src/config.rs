//! Endpoints, key prefix and timeouts, and the `etcd://` URL that carries them.

use lock_core::LockError;
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
    /// Bound on connecting and on the first request that proves the server answers.
    pub connect_timeout: Duration,
    /// Bound on every single request (a paused or partitioned server must not hang a call).
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// A configuration for `endpoints` with the default prefix and timeouts.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(3),
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

    /// Parses `etcd://host:port[,host:port…][/prefix]`.
    pub fn from_url(url: &str) -> Result<Self, LockError> {
        let invalid = |why: &str| LockError::InvalidConfig(format!("etcd URL {url:?}: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected etcd://host:port[,host:port…][/prefix]"))?;
        if scheme.eq_ignore_ascii_case("etcds") {
            return Err(invalid(
                "TLS (etcds://) is not supported by this backend yet",
            ));
        }
        if !scheme.eq_ignore_ascii_case("etcd") {
            return Err(invalid("the scheme must be etcd://"));
        }
        if rest.contains(['?', '#']) {
            return Err(invalid("query strings and fragments are not supported"));
        }
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, prefix)) => (hosts, prefix.trim_matches('/')),
            None => (rest, ""),
        };
        if hosts.contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            endpoints.push(parse_endpoint(host).map_err(|why| invalid(&why))?);
        }
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX
        } else {
            prefix
        };
        Ok(EtcdConfig::new(endpoints).with_prefix(prefix))
    }
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
            "etcd://u:p@a:1",
            "etcd://a:1?x=y",
            "127.0.0.1:2379",
            "etcd://::1:2379",
            "etcds://a:1",
        ] {
            assert!(
                matches!(EtcdConfig::from_url(bad), Err(LockError::InvalidConfig(_))),
                "{bad:?} was accepted"
            );
        }
    }
}
