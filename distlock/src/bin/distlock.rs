//! `distlock run KEY -- COMMAND [ARGS…]`: run a command while holding a distributed lock.
//!
//! The cron use case: put the same line on every host and exactly one runs the job at a time.
//! The lock is renewed while the command runs; if it is lost, the command is killed.
//!
//! Exit status: the command's own; 75 (EX_TEMPFAIL) when the lock was not acquired within
//! `--wait` or was lost while the command ran; 64 for bad usage; 69 when the backend failed.

use anyhow::{Context, Result, bail};
use distlock::LockError;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str =
    "usage: distlock run [--url URL] [--ttl SECS] [--wait SECS] KEY -- COMMAND [ARGS...]
  --url URL    lock backend (default: $DISTLOCK_URL, else memory://)
  --ttl SECS   lease TTL, renewed while the command runs (default 30)
  --wait SECS  how long to wait for the lock (default 0: try once)";

struct Args {
    url: String,
    ttl: Duration,
    wait: Duration,
    key: String,
    command: Vec<String>,
}

fn seconds(flag: &str, value: Option<String>) -> Result<Duration> {
    let value = value.with_context(|| format!("{flag} needs a value"))?;
    let secs: f64 = value
        .parse()
        .with_context(|| format!("{flag} {value:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).with_context(|| format!("{flag} {value:?} is out of range"))
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args> {
    match argv.next().as_deref() {
        Some("run") => {}
        Some(other) => bail!("unknown command {other:?}"),
        None => bail!("missing command"),
    }
    let mut url = std::env::var("DISTLOCK_URL").unwrap_or_else(|_| "memory://".into());
    let (mut ttl, mut wait) = (Duration::from_secs(30), Duration::ZERO);
    let mut key = None;
    loop {
        match argv.next() {
            Some(flag) if flag == "--url" => url = argv.next().context("--url needs a value")?,
            Some(flag) if flag == "--ttl" => ttl = seconds("--ttl", argv.next())?,
            Some(flag) if flag == "--wait" => wait = seconds("--wait", argv.next())?,
            Some(flag) if flag == "--" => break,
            Some(flag) if flag.starts_with("--") => bail!("unknown option {flag}"),
            Some(name) if key.is_none() => key = Some(name),
            Some(extra) => bail!("unexpected argument {extra:?} (put the command after --)"),
            None => bail!("missing -- COMMAND"),
        }
    }
    let command: Vec<String> = argv.collect();
    if command.is_empty() {
        bail!("missing COMMAND after --");
    }
    Ok(Args {
        url,
        ttl,
        wait,
        key: key.context("missing KEY")?,
        command,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("distlock: {error:#}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("distlock: {error:#}");
            match error.downcast_ref::<LockError>() {
                Some(LockError::Timeout { .. } | LockError::Lost { .. }) => ExitCode::from(75),
                Some(
                    LockError::InvalidKey(_)
                    | LockError::InvalidTtl { .. }
                    | LockError::InvalidConfig(_),
                ) => ExitCode::from(64),
                _ => ExitCode::from(69),
            }
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    let locker = distlock::connect(&args.url).await?;
    let guard = locker
        .lock(&args.key)
        .ttl(args.ttl)
        .wait(args.wait)
        .acquire()
        .await?;
    let mut child = tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env(
            "DISTLOCK_FENCE",
            guard
                .fence()
                .map(|fence| fence.to_string())
                .unwrap_or_default(),
        )
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {:?}", args.command[0]))?;
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = guard.lost() => {
            let _ = child.kill().await;
            let reason = guard.lost_reason().unwrap_or_default();
            return Err(LockError::lost(args.key, format!("{reason}; the command was killed")).into());
        }
    };
    guard.release().await?;
    Ok(ExitCode::from(
        status
            .code()
            .and_then(|code| u8::try_from(code).ok())
            .unwrap_or(1),
    ))
}
