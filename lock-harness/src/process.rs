//! Server processes: find the binary, pick a port, spawn, signal, kill on drop.

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Finds `binary` on `PATH` or in `extra_dirs`; the error names the Debian `package` that
/// provides it and the set-up script.
pub fn find_binary(binary: &str, package: &str, extra_dirs: &[&str]) -> Result<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let candidates = path_dirs
        .into_iter()
        .chain(extra_dirs.iter().map(PathBuf::from))
        .map(|dir| dir.join(binary));
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "`{binary}` was not found on PATH{}. The tests start a real server and need it: \
         install the Debian package `{package}` (`apt-get install -y {package}`), or run \
         `scripts/setup`, which installs every server the tests use.",
        if extra_dirs.is_empty() {
            String::new()
        } else {
            format!(" or in {}", extra_dirs.join(", "))
        }
    )
}

/// A loopback TCP port that was free a moment ago and that this process has not handed out
/// before (so two servers started by one test run never collide).
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Mutex::default);
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
        let port = listener.local_addr()?.port();
        let mut seen = handed_out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a free loopback port")
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing accepted connections at {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child server process. Dropping it kills the process (after resuming it if paused).
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ServerProcess {
    /// Spawns `command` (stdout and stderr go to `log`).
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Self> {
        let out = std::fs::File::create(log).with_context(|| format!("creating {log:?}"))?;
        let err = out.try_clone()?;
        command
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(ServerProcess {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far (for error messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails with the log if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "{} exited with {status}; its log ends with:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to {}", self.name))
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets but answers nothing.
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Freezes the process and its child processes (a server that forks a process per
    /// connection, as PostgreSQL does, keeps answering on open connections otherwise).
    pub fn pause_tree(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)?;
        for child in self.children()? {
            let _ = kill(child, Signal::SIGSTOP);
        }
        Ok(())
    }

    /// Resumes what [`ServerProcess::pause_tree`] froze.
    pub fn resume_tree(&self) -> Result<()> {
        for child in self.children()? {
            let _ = kill(child, Signal::SIGCONT);
        }
        self.signal(Signal::SIGCONT)
    }

    /// Direct children, read from /proc (their parent pid is ours).
    fn children(&self) -> Result<Vec<Pid>> {
        let parent = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        let mut children = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the command name (which may contain spaces) start after ") ".
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let ppid = rest
                .split(' ')
                .nth(1)
                .and_then(|field| field.parse::<u32>().ok());
            if ppid == Some(parent) {
                children.push(Pid::from_raw(pid));
            }
        }
        Ok(children)
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = self.signal_child(&child, Signal::SIGCONT);
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    fn signal_child(&self, child: &Child, signal: Signal) -> Result<()> {
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)?;
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
