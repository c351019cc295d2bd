//! `distlock run KEY -- COMMAND [ARGS…]`: run a command while holding a distributed lock.
//!
//! The cron use case: put the same line on every host and exactly one runs the job at a time.
//! The lock is renewed while the command runs; if it is lost, the command is killed.
//!
//! Exit status: the command's own (128 + N when a signal N ended it, as shells report it); 75
//! (EX_TEMPFAIL) when the lock was not acquired within `--wait` or was lost while the command
//! ran; 64 for bad usage; 77 (EX_NOPERM) when the server refused the credentials or a
//! certificate (or we refused the server's); 69 when the backend failed or the command could
//! not be started.
//!
//! While the command runs, every signal whose default would end `distlock` (SIGTERM, SIGINT,
//! SIGHUP, SIGQUIT, SIGUSR1/2, SIGALRM…; realtime signals are caught and not passed on) is
//! passed on to the command, and the lock stays held (and renewed) until the command and every
//! process it started have exited (`distlock` is their subreaper): dying at once would leave
//! them running unlocked, and another host's run could start beside them once the lease ran
//! out. A signal ignored when `distlock` started (`nohup`) stays ignored, in the command too.
//! A release that fails, or finds the lock gone, after the command ended is a warning: the
//! exit status stays the command's. Without a controlling terminal (cron, systemd, CI), the
//! command runs in a process group of its own, so that a lost lock kills the whole group,
//! its own children included, not the command alone. From a terminal it stays in the
//! terminal's group, and Ctrl-C / Ctrl-\\ (which reach it there already) are not passed on
//! a second time.

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use distlock::LockError;
use nix::sys::signal::Signal;
use std::process::ExitCode;
use std::time::Duration;

/// Distributed locks from the command line.
#[derive(Parser, Debug)]
#[command(name = "distlock", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs COMMAND while holding the lock KEY (renewed meanwhile; the command is killed if the
    /// lock is lost). The command sees the fencing token in DISTLOCK_FENCE. Exits with the
    /// command's status, 75 when the lock was not acquired or was lost, 64 on bad usage, 77
    /// when credentials or certificates were refused, 69 when the backend failed.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The lock backend: memory://; redis://[user:pass@]host:port/db (TLS: rediss://, with
    /// ?tls_ca=&tls_cert=&tls_key=), redlock://h1:p1,h2:p2,h3:p3/db (TLS: redlocks://),
    /// redis+sentinel://s1:p1,s2:p2,s3:p3/master[/db], redis+cluster://h1:p1,h2:p2;
    /// postgres://user:pass@host:port/db[?sslmode=verify-full&sslrootcert=…];
    /// etcd://[user:pass@]host:port[,host:port…][/prefix] (TLS: etcds://, with ?ca=&cert=&key=).
    /// TLS needs the build's redis-tls / postgres-tls / etcd-tls feature.
    #[arg(long, env = "DISTLOCK_URL", default_value = "memory://")]
    url: String,
    /// Lease TTL, renewed while the command runs: seconds (`30`, `0.5`) or with a unit
    /// (`30s`, `500ms`, `1m`).
    #[arg(long, env = "DISTLOCK_TTL", default_value = "30", value_parser = duration)]
    ttl: Duration,
    /// How long to wait for the lock (0: try once); seconds or with a unit.
    #[arg(long, env = "DISTLOCK_WAIT", default_value = "0", value_parser = duration)]
    wait: Duration,
    /// At most this many further attempts after the first (with --wait 0, the count alone
    /// bounds the wait).
    #[arg(long, env = "DISTLOCK_RETRIES")]
    retries: Option<u32>,
    /// The first pause between attempts (it grows from there); seconds or with a unit.
    #[arg(long, env = "DISTLOCK_RETRY_DELAY", value_parser = duration)]
    retry_delay: Option<Duration>,
    /// Run at most N copies at once across every host (a counting semaphore of N permits
    /// named KEY) instead of one. Every runner of KEY must give the same N.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    permits: Option<u32>,
    /// The lock's name (1 to 512 bytes).
    key: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// The `DISTLOCK_*` variables the options above read themselves (a bare number is seconds
/// here, while the library refuses it as ambiguous).
const READ_BY_OPTIONS: [&str; 5] = [
    "DISTLOCK_URL",
    "DISTLOCK_TTL",
    "DISTLOCK_WAIT",
    "DISTLOCK_RETRIES",
    "DISTLOCK_RETRY_DELAY",
];

/// The other `DISTLOCK_*` variables, read as the library reads them: a misspelt one
/// (`DISTLOCK_TLL`) is refused rather than leaving a default in force without a word, and
/// `DISTLOCK_AUTO_RENEW=false` cannot apply to a lock held while a command runs.
fn check_environment() -> Result<(), LockError> {
    let others = std::env::vars_os().filter_map(|(name, value)| {
        let name = name.into_string().ok()?;
        (name.starts_with("DISTLOCK_") && !READ_BY_OPTIONS.contains(&name.as_str()))
            .then_some((name, value))
    });
    if !distlock::Config::from_vars(others)?.auto_renew {
        return Err(LockError::InvalidConfig(
            "DISTLOCK_AUTO_RENEW is false: `distlock run` always renews the lock while the \
             command runs; unset it for this command"
                .into(),
        ));
    }
    Ok(())
}

/// A bare number is seconds (as the first versions of this tool took); otherwise a duration
/// with units, as `DISTLOCK_TTL` is read elsewhere.
fn duration(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{text:?} is not a number of seconds in range")),
        Err(_) => distlock::parse_duration(text),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { 64 } else { 0 };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    if let Err(why) = check_environment() {
        eprintln!("distlock: {why}");
        return ExitCode::from(64);
    }
    let Command::Run(args) = cli.command;
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
                Some(LockError::Refused { .. }) => ExitCode::from(77),
                _ => ExitCode::from(69),
            }
        }
    }
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    if args.url.trim().to_ascii_lowercase().starts_with("memory:") {
        eprintln!(
            "distlock: warning: {:?} locks only within this process; set DISTLOCK_URL (or \
             --url) to a shared server to keep other hosts out",
            args.url
        );
    }
    // Bad input is a usage error at once, not a backend failure after a connect timeout.
    distlock::LockKey::new(args.key.as_str())?;
    distlock::validate_ttl(args.ttl)?;
    distlock::check_usable_ttl(args.ttl, Duration::ZERO)?;
    // Orphaned descendants of the command are re-parented to us, so we can wait for them.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a subreaper")?;
    let locker = distlock::connect(&args.url).await?;
    let request = match args.permits {
        Some(permits) => locker.semaphore(&args.key, permits),
        None => locker.lock(&args.key),
    };
    let mut request = request.ttl(args.ttl).wait(args.wait);
    if let Some(retries) = args.retries {
        request = request.retries(retries);
    }
    if let Some(delay) = args.retry_delay {
        request = request.retry_delay(delay);
    }
    let guard = request.acquire().await?;
    // Before the command starts: a signal from then on is passed on, never fatal to us.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            // Released now: a guard merely dropped is released on a task that dies with us.
            let _ = guard.release().await;
            return Err(error);
        }
    };
    let mut command = tokio::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env(
            "DISTLOCK_FENCE",
            guard
                .fence()
                .map(|fence| fence.to_string())
                .unwrap_or_default(),
        )
        .kill_on_drop(true);
    // Without a controlling terminal (cron, systemd, CI) the command gets a group of its own.
    // With one, it stays in ours (the terminal's foreground group), even with stdin
    // redirected: a background group reading the terminal would be stopped (SIGTTIN), and
    // Ctrl-Z would stop us but not it.
    let own_group = std::fs::File::open("/dev/tty").is_err();
    if own_group {
        command.process_group(0);
    }
    die_with_us(&mut command);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            // Released now, not left to its TTL: the next run need not wait for nothing.
            let _ = guard.release().await;
            return Err(anyhow!(error).context(format!("starting {:?}", args.command[0])));
        }
    };
    let pid = child.id().map(as_pid);
    // The command's process group: its own, or ours (the terminal's).
    let group = match (own_group, pid) {
        (true, Some(pid)) => pid,
        _ => nix::unistd::getpgrp(),
    };
    let status = loop {
        tokio::select! {
            biased;
            _ = guard.lost() => {
                if own_group {
                    let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
                }
                let _ = child.kill().await;
                kill_leftovers(group, own_group).await;
                let reason = guard.lost_reason().unwrap_or_default();
                return Err(LockError::lost(args.key, format!("{reason}; the command was killed")).into());
            }
            // A pid we started and have not reaped yet: it names our command.
            signal = signals.next() => pass_on(signal, own_group.then_some(group), pid),
            status = child.wait() => break status,
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(error) => {
            let _ = guard.release().await;
            return Err(anyhow!(error).context("waiting for the command"));
        }
    };
    // Processes the command started may run on after it in its process group (a worker
    // finishing its job after SIGTERM, a job put in the background): the lock stays held
    // until the last one ends. A daemon (it left the group with `setsid`: an ssh master, an
    // agent) is not waited for: it would hold the lock for good.
    let mut told = false;
    loop {
        reap_all();
        let leftovers = children_in(group);
        if leftovers.is_empty() {
            break;
        }
        if !told {
            eprintln!(
                "distlock: the command exited; {} process(es) it started still run: the lock \
                 stays held until they end",
                leftovers.len()
            );
            told = true;
        }
        tokio::select! {
            biased;
            _ = guard.lost() => {
                kill_leftovers(group, own_group).await;
                let reason = guard.lost_reason().unwrap_or_default();
                return Err(LockError::lost(
                    args.key,
                    format!("{reason}; the processes the command left running were killed"),
                )
                .into());
            }
            signal = signals.next() => pass_on(signal, own_group.then_some(group), leftovers),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    // The command's outcome is what the caller acts on: a release that fails is left to the
    // TTL, and one that finds the lock gone says so (exclusion may have been broken).
    match guard.release().await {
        Ok(true) => {}
        Ok(false) => eprintln!(
            "distlock: warning: the lock was no longer held when the command ended (expired or \
             removed on the server between renewals): another run may have overlapped it"
        ),
        Err(error) => {
            eprintln!("distlock: warning: releasing the lock failed ({error}); its TTL frees it")
        }
    }
    let code = status.code().or_else(|| {
        std::os::unix::process::ExitStatusExt::signal(&status).map(|signal| 128 + signal)
    });
    Ok(ExitCode::from(
        code.and_then(|code| u8::try_from(code).ok()).unwrap_or(1),
    ))
}

/// The command is killed (SIGKILL) if `distlock` dies without a chance to act (SIGKILL, a
/// crash): nothing renews the lease then, so it would run on unlocked once the TTL is out.
/// Only the command itself: processes it started outlive it as they would any supervisor's.
/// The kernel drops the setting when the command execs a set-user-ID program.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends: `run` is polled by
/// `block_on` on the main thread, which lives as long as the process.
#[allow(unsafe_code)]
fn die_with_us(command: &mut tokio::process::Command) {
    let supervisor = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (prctl, getppid); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // Died between the fork and the prctl: the signal will never come.
            if nix::unistd::getppid() != supervisor {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            Ok(())
        });
    }
}

/// Passes `signal` on: to the command's own process group when it has one, else to each of
/// `targets` (in the terminal's group), except Ctrl-C and Ctrl-\, which reached them from
/// the terminal already (a second SIGINT reads as "force quit" to many tools). `None`: a
/// signal that is not passed on.
fn pass_on(
    signal: Option<Signal>,
    own_group: Option<nix::unistd::Pid>,
    targets: impl IntoIterator<Item = nix::unistd::Pid>,
) {
    let Some(signal) = signal else {
        return;
    };
    if let Some(group) = own_group {
        let _ = nix::sys::signal::killpg(group, signal);
    } else if !matches!(signal, Signal::SIGINT | Signal::SIGQUIT) {
        for target in targets {
            let _ = nix::sys::signal::kill(target, signal);
        }
    }
}

fn as_pid(pid: u32) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Our children in process group `group` (what the command left behind and was re-parented
/// to us: we are a subreaper), never ourselves.
fn children_in(group: nix::unistd::Pid) -> Vec<nix::unistd::Pid> {
    let me = nix::unistd::getpid();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .map(nix::unistd::Pid::from_raw)
        .filter(|pid| *pid != me && nix::unistd::getpgid(Some(*pid)) == Ok(group))
        .collect()
}

/// Reaps every child that has ended (daemons the command started are re-parented to us too).
fn reap_all() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            // ECHILD: none left.
            Err(_) => return,
        }
    }
}

/// Kills what the command left running in its group (re-parented to us), for up to 2 s.
async fn kill_leftovers(group: nix::unistd::Pid, own_group: bool) {
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        reap_all();
        let leftovers = children_in(group);
        if leftovers.is_empty() {
            return;
        }
        if own_group {
            let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        }
        for leftover in leftovers {
            let _ = nix::sys::signal::kill(leftover, Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The signals whose default action would end `distlock` (and leave the command running
/// without a lock): passed on to the command instead. SIGKILL cannot be caught; fault
/// signals (SIGSEGV, SIGBUS…) are not sent by others.
const PASSED_ON: [Signal; 14] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGIO,
    Signal::SIGPWR,
    Signal::SIGXCPU,
    Signal::SIGXFSZ,
    Signal::SIGSTKFLT,
];

/// Signals received while the command runs, from one task per signal. A signal that was
/// ignored when `distlock` started (`nohup`, a shell's background job) gets no handler: it
/// stays ignored, in the command too (a handler would reset it to its default at the exec).
struct Signals {
    received: tokio::sync::mpsc::UnboundedReceiver<Option<Signal>>,
}

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let ignored = ignored_signals();
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        let standard = PASSED_ON
            .iter()
            .map(|signal| (*signal as i32, Some(*signal)));
        // The realtime signals (their default ends the process too; the C library reserves
        // the first few): caught, not passed on (the signal type we forward with names only
        // the standard ones).
        let realtime = (libc::SIGRTMIN()..=libc::SIGRTMAX()).map(|number| (number, None));
        for (number, named) in standard.chain(realtime) {
            if ignored & (1u64 << (number - 1)) != 0 {
                continue;
            }
            let mut stream = signal(SignalKind::from_raw(number))
                .with_context(|| format!("installing a handler for signal {number}"))?;
            let sender = sender.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if named.is_none() {
                        eprintln!("distlock: signal {number} received and not passed on");
                    }
                    if sender.send(named).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Signals { received })
    }

    /// The next signal received (`None`: one that is not passed on).
    async fn next(&mut self) -> Option<Signal> {
        match self.received.recv().await {
            Some(signal) => signal,
            None => std::future::pending().await,
        }
    }
}

/// The signals ignored when we started (`SigIgn` in `/proc/self/status`, bit N-1 for signal N).
fn ignored_signals() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("SigIgn:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        })
        .unwrap_or(0)
}
