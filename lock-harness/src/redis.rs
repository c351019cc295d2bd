//! `redis-server` for tests: a fresh server on a free loopback port in a temporary directory,
//! with pause/resume, kill, restart on the same port and data directory, optional AOF
//! (`appendfsync always`) and an optional [`TcpProxy`] in front to cut, heal or delay the
//! client's connection.
//!
//! ```ignore
//! let server = RedisServer::builder().proxy(true).start()?;
//! let url = server.url();          // through the proxy when there is one
//! server.proxy().unwrap().cut();   // the client sees its connection reset
//! ```

use crate::process::{ServerProcess, find_binary, free_port, start_on_free_port};
use crate::proxy::TcpProxy;
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a fresh (or restarted) server may take to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Options for [`RedisServer`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisServerBuilder {
    aof: bool,
    proxy: bool,
}

impl RedisServerBuilder {
    /// Persist every write with AOF `appendfsync always` (so data survives `kill` + `restart`).
    /// Off by default: `--save '' --appendonly no`, nothing survives a restart.
    pub fn aof(mut self, aof: bool) -> Self {
        self.aof = aof;
        self
    }

    /// Put a [`TcpProxy`] in front of the server; [`RedisServer::url`] then points at it.
    pub fn proxy(mut self, proxy: bool) -> Self {
        self.proxy = proxy;
        self
    }

    /// Starts the server and waits until it answers `PING`.
    pub fn start(self) -> Result<RedisServer> {
        let binary = find_binary("redis-server", "redis-server", &[])?;
        let dir = tempfile::Builder::new()
            .prefix("distlock-redis-")
            .tempdir()
            .context("creating a temporary directory for redis-server")?;
        let port = free_port()?;
        let mut server = RedisServer {
            binary,
            dir,
            port,
            aof: self.aof,
            process: None,
            proxy: None,
            generation: 0,
        };
        start_on_free_port(port, |port| {
            server.port = port;
            server.spawn()
        })?;
        if self.proxy {
            server.proxy = Some(TcpProxy::start(server.server_addr())?);
        }
        Ok(server)
    }
}

/// A `redis-server` child process owned by a test; killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    aof: bool,
    process: Option<ServerProcess>,
    proxy: Option<TcpProxy>,
    generation: u32,
}

impl RedisServer {
    /// Options: AOF, proxy.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// A server without persistence and without proxy.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    fn spawn(&mut self) -> Result<()> {
        let mut command = Command::new(&self.binary);
        command
            .current_dir(self.dir.path())
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--protected-mode")
            .arg("no");
        if self.aof {
            command
                .arg("--appendonly")
                .arg("yes")
                .arg("--appendfsync")
                .arg("always");
        } else {
            command.arg("--appendonly").arg("no");
        }
        self.generation += 1;
        let log = self
            .dir
            .path()
            .join(format!("redis-{}.log", self.generation));
        let mut process = ServerProcess::spawn("redis-server", command, &log)?;
        if let Err(error) = wait_for_pong(self.server_addr(), &mut process) {
            bail!("{error:#}\nredis-server log:\n{}", process.log_tail());
        }
        self.process = Some(process);
        Ok(())
    }

    /// The server's own address (not the proxy's).
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Where clients should connect: the proxy when there is one, else the server.
    pub fn client_addr(&self) -> SocketAddr {
        self.proxy
            .as_ref()
            .map_or_else(|| self.server_addr(), TcpProxy::addr)
    }

    /// `redis://` URL (database 0) through the proxy when there is one.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.client_addr())
    }

    /// `redis://` URL (database 0) of the server itself, bypassing any proxy.
    pub fn direct_url(&self) -> String {
        format!("redis://{}/0", self.server_addr())
    }

    /// The proxy, if the server was started with one.
    pub fn proxy(&self) -> Option<&TcpProxy> {
        self.proxy.as_ref()
    }

    /// A `redis` client connected straight to the server (not through the proxy), for tests
    /// that inspect keys independently of the code under test.
    pub fn client(&self) -> Result<redis::Client> {
        redis::Client::open(self.direct_url()).context("building a redis client")
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) -> Result<()> {
        self.running()?.pause()
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.running()?.resume()
    }

    /// Kills the server (SIGKILL). Without AOF its data is gone.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill()?;
        }
        Ok(())
    }

    /// Kills the server if it runs, then starts it again on the same port with the same data
    /// directory (so an AOF file is replayed).
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// The server's log so far.
    pub fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(ServerProcess::log_tail)
            .unwrap_or_default()
    }

    fn running(&self) -> Result<&ServerProcess> {
        self.process
            .as_ref()
            .context("redis-server is not running (killed)")
    }
}

/// Sends inline `PING`s until the server answers `+PONG` (not `-LOADING` while it replays an
/// AOF), or the process exits, or [`START_TIMEOUT`] passes.
fn wait_for_pong(addr: SocketAddr, process: &mut ServerProcess) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        process.check_running()?;
        if ping(addr).unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("redis-server at {addr} did not answer PING within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ping(addr: SocketAddr) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"PING\r\n")?;
    let mut reply = [0u8; 64];
    let read = stream.read(&mut reply)?;
    Ok(reply[..read].starts_with(b"+PONG"))
}
