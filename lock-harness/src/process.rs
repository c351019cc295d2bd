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
///
/// The port is picked at random *below* the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`). Ports in that range are what `connect()` hands
/// out as source ports, so a port chosen there could be taken by any outgoing connection (a
/// test's own client, say) between this check and the server's `bind`, or while a server is
/// down for a restart. Below the range only explicit binds can take it.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Mutex::default);
    let (low, high) = static_port_range();
    for _ in 0..1000 {
        let candidate = if high > low {
            rand::random_range(low..high)
        } else {
            0
        };
        let Ok(listener) = TcpListener::bind(("127.0.0.1", candidate)) else {
            continue;
        };
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

/// `[low, high)`: the ports below the kernel's ephemeral range, from 20000 up (clear of the
/// well-known server ports). Empty when the ephemeral range starts too low to leave room.
fn static_port_range() -> (u16, u16) {
    const LOW: u16 = 20_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_start >= LOW + 1_000 {
        (LOW, ephemeral_start)
    } else {
        (0, 0)
    }
}

/// True when a failed server start was a port clash (another process bound the port between
/// [`free_port`] and the server's own `bind`): the caller retries on fresh ports.
pub fn is_port_clash(error: &anyhow::Error) -> bool {
    format!("{error:#}")
        .to_ascii_lowercase()
        .contains("address already in use")
}

/// How many times a server start is tried on fresh ports after a port clash.
pub const START_ATTEMPTS: usize = 3;

/// Runs `start` (its argument: the port to use), and again on a fresh port after a port clash,
/// up to [`START_ATTEMPTS`] times in all.
pub fn start_on_free_port<T>(first: u16, mut start: impl FnMut(u16) -> Result<T>) -> Result<T> {
    let mut port = first;
    let mut attempt = 1;
    loop {
        match start(port) {
            Err(error) if is_port_clash(&error) && attempt < START_ATTEMPTS => {
                attempt += 1;
                port = free_port()?;
            }
            result => return result,
        }
    }
}

/// Pins the calling thread to one CPU (the lowest it may use) and returns it; the threads
/// and child processes (servers) it starts afterwards inherit the pin. Call it first thing
/// in `main`.
///
/// For latency benchmarks on a small VM: a client and a server on different CPUs pay a
/// cross-CPU wake-up per message whose cost depends on where the scheduler happens to put
/// each server process, so two connections of one run (a raw floor and the library under
/// test) can differ by 3× for no reason of their own. On one CPU every message costs the
/// same context switch.
pub fn pin_to_one_cpu() -> Result<usize> {
    let cpu = *allowed_cpus()?.first().context("no CPU allowed")?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu_set(cpu)?)
        .context("pinning to one CPU")?;
    Ok(cpu)
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    use nix::sched::{CpuSet, sched_getaffinity};
    let allowed =
        sched_getaffinity(nix::unistd::Pid::from_raw(0)).context("reading the CPU affinity")?;
    Ok((0..CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .collect())
}

fn cpu_set(cpu: usize) -> Result<nix::sched::CpuSet> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).context("building the CPU set")?;
    Ok(set)
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

    /// Pins the process and its current children to `cpu`; children it forks later (a
    /// PostgreSQL backend per connection) inherit the pin.
    pub fn pin_tree_to_cpu(&self, cpu: usize) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        let pid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
        let set = cpu_set(cpu)?;
        nix::sched::sched_setaffinity(pid, &set)
            .with_context(|| format!("pinning {} to CPU {cpu}", self.name))?;
        for child in self.children()? {
            let _ = nix::sched::sched_setaffinity(child, &set);
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> Result<()> {
        let (low, high) = static_port_range();
        let mut ports = HashSet::new();
        for _ in 0..50 {
            let port = free_port()?;
            assert!(ports.insert(port), "port {port} handed out twice");
            if high > low {
                assert!(
                    (low..high).contains(&port),
                    "{port} is outside {low}..{high}"
                );
            }
            TcpListener::bind(("127.0.0.1", port))?;
        }
        Ok(())
    }

    #[test]
    fn port_clash_is_recognised_in_a_server_log() {
        let error =
            anyhow::anyhow!("etcd m1 exited; its log ends with: bind: address already in use");
        assert!(is_port_clash(&error));
        assert!(!is_port_clash(&anyhow::anyhow!("initdb failed")));
    }
}

/// A server's process, or none while it is killed: behind a mutex, so that a server shared
/// by a test's tasks can be killed and started again through `&self`.
#[cfg(any(feature = "etcd", feature = "postgres", feature = "redis"))]
#[derive(Debug, Default)]
pub(crate) struct ProcessSlot(Mutex<Option<ServerProcess>>);

#[cfg(any(feature = "etcd", feature = "postgres", feature = "redis"))]
impl ProcessSlot {
    /// The slot (a panic while it was held leaves the process handle intact).
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Option<ServerProcess>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Kills the process if it runs (SIGKILL) and waits for it; the slot is empty after.
    // PostgreSQL's postmaster is not killed this way (it gets SIGQUIT first).
    #[cfg(any(feature = "etcd", feature = "redis"))]
    pub(crate) fn kill(&self) -> Result<()> {
        let process = self.lock().take();
        if let Some(mut process) = process {
            process.kill()?;
        }
        Ok(())
    }
}
