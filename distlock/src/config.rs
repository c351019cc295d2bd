//! Configuration from the environment (or a settings file), and the process's default
//! [`Locker`] that `#[locked]` uses when it names none.

use crate::{Backoff, LockError, LockOptions, Locker};
use std::sync::RwLock;
use std::time::Duration;

/// Where a [`Locker`] connects and the defaults of its locks.
///
/// Read it from the environment with [`Config::from_env`] (the variables below), or, with the
/// `serde` feature, deserialize it from a settings file (the same field names; durations as
/// `"30s"`, `"100ms"`, `"1m30s"` or `0`: a bare number other than 0 is refused, as in the
/// environment). Missing fields take the defaults.
///
/// | variable | field | default | meaning |
/// |---|---|---|---|
/// | `DISTLOCK_URL` | `url` | `memory://` | the backend ([`crate::connect`]) |
/// | `DISTLOCK_TTL` | `ttl` | `30s` | lease TTL: how long a lock outlives a dead holder |
/// | `DISTLOCK_WAIT` | `wait` | `0` (try once) | how long `acquire` waits behind a holder |
/// | `DISTLOCK_RETRIES` | `retries` | unset | at most this many further attempts ([`LockOptions::retries`]) |
/// | `DISTLOCK_RETRY_DELAY` | `retry_delay` | `10ms` | first delay between attempts (then doubling up to 1 s or the delay) |
/// | `DISTLOCK_AUTO_RENEW` | `auto_renew` | `true` | renew leases in the background while held |
#[derive(Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(default, deny_unknown_fields)
)]
pub struct Config {
    /// The backend's URL.
    pub url: String,
    /// Lease TTL.
    #[cfg_attr(feature = "serde", serde(with = "serde_duration"))]
    pub ttl: Duration,
    /// How long `acquire` waits behind another holder (zero: try once).
    #[cfg_attr(feature = "serde", serde(with = "serde_duration"))]
    pub wait: Duration,
    /// At most this many further attempts after the first (none: bounded by `wait` alone).
    pub retries: Option<u32>,
    /// The first delay between attempts.
    #[cfg_attr(feature = "serde", serde(with = "serde_duration"))]
    pub retry_delay: Duration,
    /// Renew leases in the background while they are held.
    pub auto_renew: bool,
}

/// The URL's password is hidden (`Config` is often logged at start-up).
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("url", &lock_core::redact_url(&self.url))
            .field("ttl", &self.ttl)
            .field("wait", &self.wait)
            .field("retries", &self.retries)
            .field("retry_delay", &self.retry_delay)
            .field("auto_renew", &self.auto_renew)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        let options = LockOptions::default();
        Config {
            url: "memory://".to_owned(),
            ttl: options.ttl,
            wait: options.wait,
            retries: options.retries,
            retry_delay: options.backoff.min,
            auto_renew: options.auto_renew,
        }
    }
}

/// Whether `name` is in distlock's `DISTLOCK_` namespace without being one of its variables
/// ([`ENV_VARS`], `DISTLOCK_FENCE` that `distlock run` gives its command, the benchmarks'
/// `DISTLOCK_BENCH_*`).
fn is_unknown_variable(name: &str) -> bool {
    name.starts_with("DISTLOCK_")
        && !ENV_VARS.contains(&name)
        && name != "DISTLOCK_FENCE"
        && !name.starts_with("DISTLOCK_BENCH_")
}

fn unknown_variable(name: &str) -> LockError {
    LockError::InvalidConfig(format!(
        "unknown environment variable {name} (distlock reads {}; DISTLOCK_FENCE is set by \
         `distlock run`)",
        ENV_VARS.join(", ")
    ))
}

/// The environment variables [`Config::from_env`] reads, in the order of the table above.
pub const ENV_VARS: [&str; 6] = [
    "DISTLOCK_URL",
    "DISTLOCK_TTL",
    "DISTLOCK_WAIT",
    "DISTLOCK_RETRIES",
    "DISTLOCK_RETRY_DELAY",
    "DISTLOCK_AUTO_RENEW",
];

impl Config {
    /// Reads the `DISTLOCK_*` variables (see the table on [`Config`]); unset ones keep their
    /// defaults. A value that does not parse is [`LockError::InvalidConfig`] naming the
    /// variable and the value.
    ///
    /// Any other `DISTLOCK_*` variable (a misspelt `DISTLOCK_TLL` would otherwise leave the
    /// default TTL in force without a word) is `InvalidConfig` too, except `DISTLOCK_FENCE`,
    /// which `distlock run` sets for its command, and `DISTLOCK_BENCH_*`, the benchmarks'.
    pub fn from_env() -> Result<Config, LockError> {
        Self::from_vars(std::env::vars_os().filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            name.starts_with("DISTLOCK_").then_some((name, value))
        }))
    }

    /// Like [`from_env`](Self::from_env), from given `(name, value)` pairs (names outside the
    /// `DISTLOCK_` namespace, `DISTLOCK_FENCE` and `DISTLOCK_BENCH_*` are ignored; other
    /// `DISTLOCK_*` names are refused), so configuration can be tested without touching the
    /// process environment.
    pub fn from_vars<I, V>(vars: I) -> Result<Config, LockError>
    where
        I: IntoIterator<Item = (String, V)>,
        V: Into<std::ffi::OsString>,
    {
        let mut config = Config::default();
        for (name, value) in vars {
            let value = value.into();
            let Some(text) = value.to_str() else {
                return Err(invalid(&name, &value.to_string_lossy(), "not valid UTF-8"));
            };
            let text = text.trim();
            match name.as_str() {
                "DISTLOCK_URL" => {
                    if text.is_empty() {
                        return Err(invalid(&name, text, "empty; e.g. redis://127.0.0.1:6379/0"));
                    }
                    config.url = text.to_owned();
                }
                "DISTLOCK_TTL" => {
                    config.ttl = env_duration(&name, text)?;
                    check_ttl(config.ttl)
                        .map_err(|error| invalid(&name, text, &error.to_string()))?;
                }
                "DISTLOCK_WAIT" => config.wait = env_duration(&name, text)?,
                "DISTLOCK_RETRY_DELAY" => config.retry_delay = env_duration(&name, text)?,
                "DISTLOCK_RETRIES" => {
                    config.retries = Some(text.parse().map_err(|_| {
                        invalid(&name, text, "not a count (a whole number, 0 to 4294967295)")
                    })?);
                }
                "DISTLOCK_AUTO_RENEW" => {
                    config.auto_renew = match text.to_ascii_lowercase().as_str() {
                        "1" | "true" | "yes" | "on" => true,
                        "0" | "false" | "no" | "off" => false,
                        _ => return Err(invalid(&name, text, "not a boolean (true or false)")),
                    };
                }
                unknown if is_unknown_variable(unknown) => return Err(unknown_variable(unknown)),
                _ => {}
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values the way a lock would, so a bad TTL fails at start-up, not at the
    /// first lock (a TTL the clock-drift allowance and the lost margin would use up is
    /// refused here too; a backend may raise a short TTL to its minimum, but one that short
    /// is a mistake on any backend).
    pub fn validate(&self) -> Result<(), LockError> {
        check_ttl(self.ttl)
    }

    /// The lock defaults this configuration describes.
    pub fn options(&self) -> LockOptions {
        let defaults = LockOptions::default();
        LockOptions {
            ttl: self.ttl,
            wait: self.wait,
            backoff: Backoff {
                min: self.retry_delay,
                max: defaults.backoff.max.max(self.retry_delay),
                ..defaults.backoff
            },
            auto_renew: self.auto_renew,
            retries: self.retries,
        }
    }

    /// Connects to `url` and returns a [`Locker`] with these defaults.
    pub async fn connect(&self) -> Result<Locker, LockError> {
        self.validate()?;
        Ok(crate::connect(&self.url)
            .await?
            .with_defaults(self.options()))
    }
}

fn invalid(name: &str, value: &str, why: &str) -> LockError {
    LockError::InvalidConfig(format!("{name}={value:?}: {why}"))
}

/// A TTL a lock can use, whatever the backend: in range and not used up by the margins.
fn check_ttl(ttl: Duration) -> Result<(), LockError> {
    crate::validate_ttl(ttl)?;
    lock_core::check_usable_ttl(ttl, Duration::ZERO)
}

fn env_duration(name: &str, text: &str) -> Result<Duration, LockError> {
    parse_duration(text).map_err(|why| invalid(name, text, &why))
}

/// `"30s"`, `"100ms"`, `"1m30s"`, `"1h"`, or `"0"`. A bare number other than 0 is refused:
/// `distlock run --ttl 30` reads it as seconds, and this function read it as milliseconds
/// until 2026-12-02, so the same `DISTLOCK_TTL=30` meant 30 s to the CLI and 30 ms here.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const HINT: &str = "not a duration (e.g. 30s, 100ms, 1m30s)";
    let text = text.trim();
    if text.is_empty() {
        return Err(HINT.into());
    }
    if let Ok(number) = text.parse::<f64>() {
        if number == 0.0 {
            return Ok(Duration::ZERO);
        }
        return Err(format!(
            "a bare number is ambiguous: write {text}s or {text}ms (the CLI's flags read a \
             bare number as seconds)"
        ));
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().map_err(|_| HINT.to_owned())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(HINT.into()),
        };
        rest = rest[unit_len..].trim_start();
        let part = Duration::try_from_secs_f64(number * seconds_per_unit)
            .map_err(|_| format!("{HINT}: out of range"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("{HINT}: out of range"))?;
    }
    Ok(total)
}

#[cfg(feature = "serde")]
mod serde_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Number(f64),
        Text(String),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Written::deserialize(d)? {
            Written::Number(0.0) => Ok(Duration::ZERO),
            // Read as milliseconds until 2026-12-03, while the CLI reads `--ttl 30` as 30 s
            // and the environment refuses a bare number: `"ttl": 30` was a 30 ms lease.
            Written::Number(number) => Err(serde::de::Error::custom(format!(
                "{number}: a bare number is ambiguous: write \"{number}s\" or \"{number}ms\""
            ))),
            Written::Text(text) => super::parse_duration(&text)
                .map_err(|why| serde::de::Error::custom(format!("{text:?}: {why}"))),
        }
    }

    pub(super) fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", value.as_millis()))
    }
}

/// The process's default locker: set by [`set_default_locker`] or [`from_env`].
static DEFAULT_LOCKER: RwLock<Option<Locker>> = RwLock::new(None);

/// Makes `locker` the one `#[locked]` functions use when they name none (replacing any
/// earlier default).
pub fn set_default_locker(locker: Locker) {
    *DEFAULT_LOCKER
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(locker);
}

/// The process's default locker; [`LockError::InvalidConfig`] saying how to set one if none
/// was.
pub fn default_locker() -> Result<Locker, LockError> {
    DEFAULT_LOCKER
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
        .ok_or_else(|| {
            LockError::InvalidConfig(
                "no default locker: call distlock::from_env().await (or \
                 distlock::set_default_locker) at start-up, or give #[locked] a `locker = …`"
                    .into(),
            )
        })
}

/// Reads [`Config::from_env`], connects, makes the result the process's default locker (for
/// `#[locked]`) and returns it.
pub async fn from_env() -> Result<Locker, LockError> {
    let locker = Config::from_env()?.connect().await?;
    set_default_locker(locker.clone());
    Ok(locker)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Result<Config, LockError> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn reads_every_variable() {
        let config = vars(&[
            ("DISTLOCK_URL", "redis://127.0.0.1:6379/0"),
            ("DISTLOCK_TTL", "30000ms"),
            ("DISTLOCK_WAIT", "5s"),
            ("DISTLOCK_RETRIES", "3"),
            ("DISTLOCK_RETRY_DELAY", "100ms"),
            ("DISTLOCK_AUTO_RENEW", "false"),
            ("UNRELATED", "x"),
        ])
        .unwrap();
        assert_eq!(config.url, "redis://127.0.0.1:6379/0");
        assert_eq!(config.ttl, Duration::from_secs(30));
        assert_eq!(config.wait, Duration::from_secs(5));
        assert_eq!(config.retries, Some(3));
        assert_eq!(config.retry_delay, Duration::from_millis(100));
        assert!(!config.auto_renew);
        let options = config.options();
        assert_eq!(options.backoff.min, Duration::from_millis(100));
        assert_eq!(options.retries, Some(3));
        assert_eq!(vars(&[]).unwrap(), Config::default());
        let secret = vars(&[("DISTLOCK_URL", "redis://app:s3cret@h:6379/0")]).unwrap();
        assert!(!format!("{secret:?}").contains("s3cret"), "{secret:?}");
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        for (name, value) in [
            ("DISTLOCK_TTL", "abc"),
            ("DISTLOCK_TTL", "0"),
            ("DISTLOCK_TTL", "30"),
            ("DISTLOCK_TTL", "2ms"),
            ("DISTLOCK_WAIT", "5"),
            ("DISTLOCK_TTL", "1000000h"),
            ("DISTLOCK_WAIT", "5 parsecs"),
            ("DISTLOCK_RETRIES", "-1"),
            ("DISTLOCK_RETRIES", "three"),
            ("DISTLOCK_RETRY_DELAY", ""),
            ("DISTLOCK_AUTO_RENEW", "maybe"),
            ("DISTLOCK_URL", " "),
        ] {
            match vars(&[(name, value)]) {
                Err(LockError::InvalidConfig(message)) => {
                    assert!(message.contains(name), "{message}");
                    assert!(
                        message.contains(&format!("{:?}", value.trim())),
                        "{message}"
                    );
                }
                other => panic!("{name}={value:?}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_distlock_variables_are_refused() {
        for name in ["DISTLOCK_TLL", "DISTLOCK_URLS", "DISTLOCK_"] {
            match vars(&[(name, "5s")]) {
                Err(LockError::InvalidConfig(message)) => {
                    assert!(message.contains(name), "{message}");
                    assert!(message.contains("DISTLOCK_TTL"), "{message}");
                }
                other => panic!("{name}: expected InvalidConfig, got {other:?}"),
            }
        }
        // Set by `distlock run` for its command, and the benchmarks' own.
        vars(&[("DISTLOCK_FENCE", "42"), ("DISTLOCK_BENCH_HELD", "10")]).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("250").is_err(), "a bare number is ambiguous");
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10 fortnights").is_err());
    }

    #[tokio::test]
    async fn default_locker_is_explained_until_set() {
        // One test touches the process default, so others cannot race it.
        if let Err(LockError::InvalidConfig(message)) = default_locker() {
            assert!(message.contains("from_env"), "{message}");
        }
        let locker = Config::default().connect().await.unwrap();
        set_default_locker(locker);
        assert!(default_locker().is_ok());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn deserializes_with_serde() {
        let config: Config = serde_json::from_str(
            r#"{"url": "memory://settings", "ttl": "10s", "wait": "2500ms", "retries": 4}"#,
        )
        .unwrap();
        assert_eq!(config.ttl, Duration::from_secs(10));
        assert_eq!(config.wait, Duration::from_millis(2500));
        assert_eq!(config.retries, Some(4));
        assert!(config.auto_renew);
        let error = serde_json::from_str::<Config>(r#"{"ttl": "ten seconds"}"#).unwrap_err();
        assert!(error.to_string().contains("ten seconds"), "{error}");
        // A bare number is ambiguous (it was read as milliseconds: a 30 ms lease); 0 is not.
        let error = serde_json::from_str::<Config>(r#"{"ttl": 30}"#).unwrap_err();
        assert!(error.to_string().contains("ambiguous"), "{error}");
        let zero: Config = serde_json::from_str(r#"{"wait": 0}"#).unwrap();
        assert_eq!(zero.wait, Duration::ZERO);
        let round_trip: Config =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(round_trip, config);
    }
}
