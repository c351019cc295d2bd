//! The facade on real servers: `distlock::connect(url)` for every backend feature, the
//! quickstart against each, and the CLI excluding a second runner.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

/// Two lockers from two `connect` calls exclude each other and fences increase.
#[allow(dead_code)]
async fn two_clients_exclude(url: &str) {
    let a = distlock::connect(url).await.unwrap();
    let b = distlock::connect(url).await.unwrap();
    let key = format!("facade-{}", std::process::id());
    let first = a
        .lock(&key)
        .ttl(Duration::from_secs(5))
        .acquire()
        .await
        .unwrap();
    assert!(
        b.try_acquire(&key).await.unwrap().is_none(),
        "{url}: second client got a held lock"
    );
    let fence = first.fence();
    assert!(first.release().await.unwrap());
    let second = b
        .lock(&key)
        .ttl(Duration::from_secs(5))
        .wait(Duration::from_secs(5))
        .acquire()
        .await
        .unwrap();
    if let (Some(before), Some(after)) = (fence, second.fence()) {
        assert!(after > before, "{url}: fence did not increase");
    }
    second.release().await.unwrap();
}

/// Runs an example against `url` through cargo and checks the line it prints when its own
/// check passed. With `--all-features`, as the test command builds, cargo reuses what it built
/// for the tests.
#[allow(dead_code)]
fn example_passes(example: &str, url: &str, ok_line: &str) {
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "run",
            "-q",
            "-p",
            "distlock",
            "--all-features",
            "--example",
            example,
        ])
        .env("DISTLOCK_URL", url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(ok_line),
        "example {example} on {url} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[allow(dead_code)]
fn quickstart_passes(url: &str) {
    example_passes("quickstart", url, "OK: no update lost");
}

/// The payment (`#[locked]`) and ledger (`lock_all`, fences) examples check their own result.
#[allow(dead_code)]
fn payment_and_ledger_pass(url: &str) {
    example_passes("payment", url, "OK: every order charged exactly once");
    example_passes("ledger", url, "OK: the ledger balances");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_pass_on_memory() {
    tokio::task::spawn_blocking(|| payment_and_ledger_pass("memory://"))
        .await
        .unwrap();
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_url_connects_and_excludes() {
    let server = lock_harness::redis::RedisServer::start().unwrap();
    two_clients_exclude(&server.url()).await;
    let unreachable = distlock::connect("redis://127.0.0.1:1/0").await;
    assert!(
        unreachable.is_err(),
        "connecting to a closed port must fail"
    );
    let url = server.url();
    tokio::task::spawn_blocking(move || {
        quickstart_passes(&url);
        payment_and_ledger_pass(&url);
    })
    .await
    .unwrap();
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_url_connects_and_excludes() {
    let server = lock_harness::postgres::shared().unwrap();
    two_clients_exclude(&server.url()).await;
    let url = server.url();
    tokio::task::spawn_blocking(move || quickstart_passes(&url))
        .await
        .unwrap();
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_url_connects_and_excludes() {
    let cluster = lock_harness::etcd::EtcdCluster::single().await.unwrap();
    let url = cluster.url(None);
    two_clients_exclude(&url).await;
    tokio::task::spawn_blocking(move || quickstart_passes(&url))
        .await
        .unwrap();
}

/// `distlock run` on a shared server: a second runner of the same key gets exit status 75
/// while the first runs, and the command sees its fencing token.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_runs_one_command_at_a_time() {
    use std::process::Command;
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let exe = env!("CARGO_BIN_EXE_distlock");
    let started = cli::pid_file("one-at-a-time");
    let first = Command::new(exe)
        .args([
            "run",
            "--url",
            &server.url(),
            "--ttl",
            "5",
            "cron-job",
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            "echo fence=$DISTLOCK_FENCE; echo $$ > {}; sleep 3",
            started.display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The command runs, so the lock is held (a fixed sleep raced a slow start).
    cli::pid_written(&started);
    let second = Command::new(exe)
        .args(["run", "--url", &server.url(), "cron-job", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        second.status.code(),
        Some(75),
        "a second runner must not run while the first holds the lock"
    );
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success());
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        stdout.starts_with("fence=") && stdout.trim().len() > "fence=".len(),
        "no fence passed to the command: {stdout:?}"
    );
    let third = Command::new(exe)
        .args([
            "run",
            "--url",
            &server.url(),
            "cron-job",
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .output()
        .unwrap();
    assert_eq!(
        third.status.code(),
        Some(7),
        "the command's own exit status is passed through"
    );
}

/// Bad usage gets a clear message and status 64; `--help` documents the environment
/// fallbacks.
#[cfg(feature = "cli")]
#[test]
fn cli_usage_errors_are_clear() {
    use std::process::Command;
    let exe = env!("CARGO_BIN_EXE_distlock");
    let help = Command::new(exe).args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    for needed in [
        "DISTLOCK_URL",
        "DISTLOCK_TTL",
        "DISTLOCK_WAIT",
        "--retries",
        "DISTLOCK_RETRY_DELAY",
    ] {
        assert!(
            text.contains(needed),
            "--help does not mention {needed}:\n{text}"
        );
    }
    for (args, says) in [
        (&["run", "k"][..], "COMMAND"),
        (&["run", "--ttl", "soon", "k", "--", "true"][..], "soon"),
        (&["run", "--bogus", "k", "--", "true"][..], "--bogus"),
        (&["jump"][..], "jump"),
    ] {
        let output = Command::new(exe)
            .args(args)
            .env_remove("DISTLOCK_URL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // A TTL past the largest accepted is refused before connecting: at once, even with a
    // server that never answers (it waited out the connect timeout, then exited 69).
    let started = std::time::Instant::now();
    let output = Command::new(exe)
        .args([
            "run",
            "--ttl",
            "40000000s",
            "--url",
            "redis://10.255.255.1:6379/0",
            "k",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("largest accepted TTL"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // PostgreSQL's own environment variables, which sqlx reads as libpq does: a value it
    // cannot use was dropped without a word (a misspelt PGSSLMODE meant `prefer`, without
    // certificate checks). Refused before connecting, naming the variable.
    for (name, value) in [
        ("PGSSLMODE", "verify-fulll"),
        ("PGPORT", "abc"),
        ("PGSSLROOTCERT", "/nonexistent/root.crt"),
    ] {
        let output = Command::new(exe)
            .args([
                "run",
                "--url",
                "postgres://app@10.255.255.1/x",
                "k",
                "--",
                "true",
            ])
            .env(name, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{name}={value}: {stderr}");
        assert!(stderr.contains(name), "{name}={value}: {stderr}");
    }
    // A bad URL from the environment is a usage error naming it.
    let output = Command::new(exe)
        .args(["run", "k", "--", "true"])
        .env("DISTLOCK_URL", "nope")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nope"));
    // A misspelt variable, and auto-renew turned off, are usage errors naming them; the
    // retry delay is read from the environment.
    for (name, value) in [
        ("DISTLOCK_TLL", "5s"),
        ("DISTLOCK_AUTO_RENEW", "false"),
        ("DISTLOCK_RETRY_DELAY", "soon"),
    ] {
        let output = Command::new(exe)
            .args(["run", "k", "--", "true"])
            .env_remove("DISTLOCK_URL")
            .env(name, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{name}={value}: {stderr}");
        assert!(
            stderr.contains(name) || stderr.contains(value),
            "{name}={value}: {stderr}"
        );
    }
    // Human durations work, and the memory backend runs the command.
    let output = Command::new(exe)
        .args(["run", "--ttl", "2s", "--wait", "100ms", "k", "--", "true"])
        .env_remove("DISTLOCK_URL")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `--permits N`: two runners of a 2-permit key run at once on a real server, a third is
/// turned away with status 75 while they run.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_permits_run_n_at_once() {
    use std::process::{Command, Stdio};
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let exe = env!("CARGO_BIN_EXE_distlock");
    let start = |permits: &str, started: &std::path::Path| {
        Command::new(exe)
            .args([
                "run",
                "--url",
                &server.url(),
                "--permits",
                permits,
                "--ttl",
                "5",
                "export",
            ])
            .args(["--", "sh", "-c"])
            .arg(format!("echo $$ > {}; sleep 3", started.display()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let started = [cli::pid_file("permits-1"), cli::pid_file("permits-2")];
    let (first, second) = (start("2", &started[0]), start("2", &started[1]));
    // Both commands run, so both permits are held (a fixed sleep raced a slow start).
    for path in &started {
        cli::pid_written(path);
    }
    let third = Command::new(exe)
        .args([
            "run",
            "--url",
            &server.url(),
            "--permits",
            "2",
            "export",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(
        third.status.code(),
        Some(75),
        "a third runner ran beside two with --permits 2: {}",
        String::from_utf8_lossy(&third.stderr)
    );
    for runner in [first, second] {
        let output = runner.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Helpers of the CLI tests below: the command's pid, written by the command itself; whether
/// a process still runs; distlock's exit within a bound; a next run of the same key.
#[cfg(all(feature = "cli", feature = "redis"))]
mod cli {
    use std::path::Path;
    use std::process::{Child, Command, ExitStatus};
    use std::time::{Duration, Instant};

    pub const EXE: &str = env!("CARGO_BIN_EXE_distlock");

    /// A fresh path for the command to write a pid to.
    pub fn pid_file(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("distlock-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// The pid the command wrote to `path` (within 10 s of its start).
    pub fn pid_written(path: &Path) -> u32 {
        let started = Instant::now();
        loop {
            if let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok())
            {
                let _ = std::fs::remove_file(path);
                return pid;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the command never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Running, not a zombie: an orphan killed here is reparented to PID 1, which may never
    /// reap it (it does not in this sandbox).
    pub fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    }

    /// The parent of `pid`, from `/proc` (`None` once it is gone).
    pub fn parent_of(pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(") ")?;
        rest.split_whitespace().nth(1)?.parse().ok()
    }

    /// Whether `pid` still runs `within` from now; killed if so, so that no test leaves it.
    pub fn still_running_after(pid: u32, within: Duration) -> bool {
        let by = Instant::now() + within;
        while running(pid) && Instant::now() < by {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = running(pid);
        if left {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        left
    }

    /// `child`'s exit, which must come within `bound` (`what` names the event awaited).
    pub fn exit_within(child: &mut Child, bound: Duration, what: &str) -> ExitStatus {
        let since = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                since.elapsed() < bound,
                "distlock did not exit within {bound:?} {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `distlock run --url url --ttl ttl key -- <a shell that writes its pid and sleeps 60 s>`,
    /// stdin closed; the runner and the command's pid once it runs.
    pub fn start(url: &str, ttl: &str, key: &str) -> (Child, u32) {
        let pid_file = pid_file(key);
        let runner = Command::new(EXE)
            .args(["run", "--url", url, "--ttl", ttl, key])
            .args(["--", "sh", "-c"])
            .arg(format!("echo $$ > {}; exec sleep 60", pid_file.display()))
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let command_pid = pid_written(&pid_file);
        (runner, command_pid)
    }

    /// Sends `signal` (`-TERM`, `-STOP`, …) to `pid`.
    pub fn signal(pid: u32, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} {pid}: {sent:?}");
    }

    /// A next run of `key` without a wait runs its command at once: the lock is free.
    pub fn next_run_gets(url: &str, key: &str, why: &str) {
        next_run_gets_within(url, key, None, why);
    }

    /// A next run of `key` runs its command, waiting up to `wait` (`--wait`) for the lock.
    pub fn next_run_gets_within(url: &str, key: &str, wait: Option<&str>, why: &str) {
        let mut next = Command::new(EXE);
        next.args(["run", "--url", url]);
        if let Some(wait) = wait {
            next.args(["--wait", wait]);
        }
        let next = next.args([key, "--", "true"]).output().unwrap();
        assert_eq!(
            next.status.code(),
            Some(0),
            "{why}: {}",
            String::from_utf8_lossy(&next.stderr)
        );
    }
}

/// SIGTERM to `distlock run` reaches the command, and the lock is released once the command
/// has exited: the next run starts at once. (Killed by the signal instead, `distlock` would
/// leave the command running unlocked and the lock held until its TTL.)
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_passes_sigterm_on_and_releases_after_the_command() {
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let (mut runner, command_pid) = cli::start(&server.url(), "20", "term-job");
    cli::signal(runner.id(), "-TERM");
    let status = cli::exit_within(&mut runner, Duration::from_secs(5), "of SIGTERM");
    assert!(
        !cli::still_running_after(command_pid, Duration::ZERO),
        "the command ran on after distlock exited"
    );
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "distlock exits as its command did (killed by SIGTERM): {status:?}"
    );
    cli::next_run_gets(
        &server.url(),
        "term-job",
        "the lock was not released when the command ended",
    );
}

/// `distlock` alone stopped (SIGSTOP to its pid) past the TTL: the lease runs out on the
/// server and another run gets the lock while the command runs on (the documented limit: only
/// the fence protects the resource then); once `distlock` resumes it finds the lease past its
/// deadline, kills the command and exits 75, at once rather than at its next renewal.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_stopped_supervisor_kills_the_command_when_it_resumes() {
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let (mut runner, command_pid) = cli::start(&server.url(), "2", "stopped-job");
    cli::signal(runner.id(), "-STOP");
    // The next run waits for the lease to run out on the server (2 s TTL), not a fixed time.
    cli::next_run_gets_within(
        &server.url(),
        "stopped-job",
        Some("10s"),
        "the lease of a stopped distlock outlived its TTL",
    );
    assert!(
        cli::running(command_pid),
        "the command ended while distlock was stopped"
    );
    cli::signal(runner.id(), "-CONT");
    let status = cli::exit_within(&mut runner, Duration::from_secs(2), "after it resumed");
    assert_eq!(status.code(), Some(75), "a lost lock exits 75: {status:?}");
    assert!(
        !cli::still_running_after(command_pid, Duration::from_millis(500)),
        "the command ran on after distlock resumed past its lease"
    );
}

/// `distlock` killed outright (SIGKILL: no handler runs) stops renewing, so the lease runs out
/// and another run gets the lock: the command must not run on unlocked. The kernel kills it
/// with its supervisor (`PR_SET_PDEATHSIG`). Before, it ran on for good.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_killed_supervisor_takes_its_command_along() {
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let (mut runner, command_pid) = cli::start(&server.url(), "2", "killed-job");
    cli::signal(runner.id(), "-KILL");
    let _ = runner.wait();
    assert!(
        !cli::still_running_after(command_pid, Duration::from_secs(1)),
        "the command ran on after distlock was killed: unlocked once the lease runs out"
    );
}

/// A command that cannot be started leaves no lock behind (status 69, and the next run
/// starts at once, not after the 30 s TTL).
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_releases_when_the_command_cannot_start() {
    use std::process::Command;
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let failed = Command::new(cli::EXE)
        .args(["run", "--url", &server.url(), "--ttl", "30", "start-job"])
        .args(["--", "/nonexistent/distlock-no-such-command"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("distlock-no-such-command"), "{stderr}");
    cli::next_run_gets(
        &server.url(),
        "start-job",
        "the lock outlived the failed start",
    );
}

/// A lost lock kills the command's whole process group when there is no controlling
/// terminal (cron, systemd): its children too, not the command alone. The lock is lost here
/// by emptying the server under the holder; distlock hears it at its next renewal.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_loss_kills_the_commands_children_too() {
    use std::process::{Command, Stdio};
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let pid_file = cli::pid_file("lost");
    // In a session of its own (`setsid`): no controlling terminal, as under cron, also when
    // the tests run from one.
    let mut runner = Command::new("setsid")
        .args(["-w", cli::EXE])
        .args(["run", "--url", &server.url(), "--ttl", "1.5", "lost-job"])
        .args(["--", "sh", "-c"])
        .arg(format!("sleep 30 & echo $! > {}; wait", pid_file.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let grandchild = cli::pid_written(&pid_file);
    let flushed = Command::new("redis-cli")
        .args(["-u", &server.direct_url(), "FLUSHALL"])
        .output()
        .unwrap();
    assert!(flushed.status.success(), "{flushed:?}");
    let status = cli::exit_within(&mut runner, Duration::from_secs(5), "of losing its lock");
    let left = cli::still_running_after(grandchild, Duration::from_secs(1));
    let mut stderr = String::new();
    if let Some(mut pipe) = runner.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert_eq!(status.code(), Some(75), "{stderr}");
    assert!(!left, "the command's child ran on after the lock was lost");
}

/// A command that ends while processes it started run on (a worker finishing gracefully
/// after SIGTERM, a job put in the background): the lock stays held until the last of them
/// ends. Before, distlock released it as soon as the command itself exited, and the next
/// host's run started beside the survivor.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_holds_the_lock_until_the_commands_children_end() {
    use std::process::{Command, Stdio};
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let pid_file = cli::pid_file("children");
    let mut runner = Command::new("setsid")
        .args(["-w", cli::EXE])
        .args(["run", "--url", &server.url(), "--ttl", "2", "children-job"])
        .args(["--", "sh", "-c"])
        // The child writes its pid once its trap is set: a SIGTERM before it would kill it.
        .arg(format!(
            "sh -c \"trap '' TERM; echo \\$\\$ > {}; exec sleep 30\" & wait",
            pid_file.display()
        ))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let survivor = cli::pid_written(&pid_file);
    cli::signal(runner.id(), "-TERM");
    // The shell dies of the SIGTERM passed on; its child ignores it, runs on, and is
    // re-parented to distlock (its subreaper).
    let since = std::time::Instant::now();
    while cli::parent_of(survivor) != Some(runner.id()) {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "the shell did not end of the SIGTERM passed on"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let next = Command::new(cli::EXE)
        .args(["run", "--url", &server.url(), "children-job", "--", "true"])
        .output()
        .unwrap();
    let runner_alive = runner.try_wait().unwrap().is_none();
    let survivor_alive = cli::running(survivor);
    // Past the TTL too: the lock is renewed meanwhile.
    std::thread::sleep(Duration::from_millis(2500));
    let later = Command::new(cli::EXE)
        .args(["run", "--url", &server.url(), "children-job", "--", "true"])
        .output()
        .unwrap();
    cli::signal(survivor, "-KILL");
    let status = cli::exit_within(
        &mut runner,
        Duration::from_secs(3),
        "after the last child ended",
    );
    assert!(
        survivor_alive,
        "the test's premise: the child survived the SIGTERM"
    );
    assert!(
        runner_alive,
        "distlock exited while the command's child still ran"
    );
    assert_eq!(
        (next.status.code(), later.status.code()),
        (Some(75), Some(75)),
        "another run got the lock while the command's child still ran"
    );
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "the command's own status: {status:?}"
    );
    cli::next_run_gets(
        &server.url(),
        "children-job",
        "not released after the last child",
    );
}

/// The command's status is what the caller acts on. A release that fails after the command
/// succeeded (the server went away as it ended) used to turn exit 0 into 69 ("backend
/// failed"), and a wrapper that retries on 69 ran a finished job again; a release that finds
/// the lock gone (emptied under us between renewals) was silent. Both are warnings now.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_keeps_the_commands_status_when_the_release_fails() {
    use std::process::{Command, Stdio};
    let server = lock_harness::redis::RedisServer::start().unwrap();
    // The command writes its pid once it runs (so the lock is held), then sleeps 1 s.
    let run = |key: &str| {
        let started = cli::pid_file(key);
        let runner = Command::new(cli::EXE)
            .args(["run", "--url", &server.url(), "--ttl", "10", key])
            .args(["--", "sh", "-c"])
            .arg(format!("echo $$ > {}; sleep 1", started.display()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        cli::pid_written(&started);
        runner
    };
    let gone = run("flushed-job");
    let flushed = Command::new("redis-cli")
        .args(["-u", &server.direct_url(), "FLUSHALL"])
        .output()
        .unwrap();
    assert!(flushed.status.success(), "{flushed:?}");
    let gone = gone.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert_eq!(gone.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("no longer held"), "no warning: {stderr}");

    let failed = run("release-job");
    server.kill().unwrap();
    let failed = failed.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("releasing the lock failed"),
        "no warning: {stderr}"
    );
}

/// A daemon the command starts (it leaves the process group with `setsid`: an ssh master, an
/// agent) is not waited for: the lock would be held for as long as it lives.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_does_not_wait_for_daemons() {
    use std::process::{Command, Stdio};
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let pid_file = cli::pid_file("daemon");
    let mut runner = Command::new("setsid")
        .args(["-w", cli::EXE])
        .args(["run", "--url", &server.url(), "daemon-job"])
        .args(["--", "sh", "-c"])
        .arg(format!(
            "setsid sleep 30 & echo $! > {}",
            pid_file.display()
        ))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let daemon = cli::pid_written(&pid_file);
    let status = cli::exit_within(&mut runner, Duration::from_secs(3), "with a daemon left");
    let daemon_ran = cli::running(daemon);
    cli::signal(daemon, "-KILL");
    assert!(daemon_ran, "the test's premise: the daemon kept running");
    assert_eq!(status.code(), Some(0), "{status:?}");
    cli::next_run_gets(
        &server.url(),
        "daemon-job",
        "not released with a daemon left",
    );
}

/// Signals other than the four passed on before (SIGUSR1 from `pkill -USR1 -f worker`, a
/// stray SIGALRM) used to kill distlock by their default action, leaving the command running
/// without a lock. They are passed on to the command now.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_passes_other_signals_on_instead_of_dying() {
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let (mut runner, command_pid) = cli::start(&server.url(), "20", "usr1-job");
    cli::signal(runner.id(), "-USR1");
    let status = cli::exit_within(&mut runner, Duration::from_secs(5), "of SIGUSR1");
    let left = cli::still_running_after(command_pid, Duration::ZERO);
    assert!(
        !left,
        "distlock died and left its command running unlocked: {status:?}"
    );
    assert_eq!(
        status.code(),
        Some(128 + 10),
        "distlock exits as its command did (killed by SIGUSR1): {status:?}"
    );
    cli::next_run_gets(&server.url(), "usr1-job", "not released after the command");
}

/// A signal ignored by whoever started distlock (`nohup` ignores SIGHUP) stays ignored in the
/// command: installing a handler for it used to reset it to its default at the exec.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_leaves_ignored_signals_ignored() {
    use std::process::Command;
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let out = cli::pid_file("ignored");
    let ran = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' HUP; exec {} run --url {} ignored-job -- sh -c 'grep SigIgn /proc/self/status > {}'",
            cli::EXE,
            server.url(),
            out.display()
        ))
        .output()
        .unwrap();
    assert!(ran.status.success(), "{ran:?}");
    let line = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let mask = u64::from_str_radix(line.trim().trim_start_matches("SigIgn:").trim(), 16).unwrap();
    assert!(
        mask & 1 == 1,
        "SIGHUP is no longer ignored in the command: {line}"
    );
}

/// A bad key or TTL is a usage error (64) at once, before any connection: checked after
/// connecting, an unreachable server first made it a backend failure (69) after the connect
/// timeout, which a wrapper retries.
#[cfg(all(feature = "cli", feature = "redis"))]
#[test]
fn cli_bad_key_or_ttl_fails_before_connecting() {
    use std::process::Command;
    let server = lock_harness::redis::RedisServer::start().unwrap();
    let proxy = lock_harness::TcpProxy::start(server.server_addr()).unwrap();
    proxy.blackhole();
    let unreachable = format!("redis://{}/0", proxy.addr());
    for args in [
        vec!["--ttl", "30", ""],
        vec!["--ttl", "0.002", "job"],
        vec!["--ttl", "0", "job"],
    ] {
        let started = std::time::Instant::now();
        let ran = Command::new(cli::EXE)
            .args(["run", "--url", &unreachable])
            .args(&args)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_eq!(
            ran.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&ran.stderr)
        );
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
}
