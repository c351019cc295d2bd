//! `redis-server` for tests: a fresh server on a free loopback port in a temporary directory,
//! with pause/resume, kill, restart on the same port and data directory, optional AOF
//! (`appendfsync always`) and an optional [`TcpProxy`] in front to cut, heal or delay the
//! client's connection; with feature `redis-tls`, TLS only (`.tls(&pki)`), and a password or
//! an ACL user (`.password(..)`, `.user(..)`).
//!
//! ```ignore
//! let server = RedisServer::builder().proxy(true).start()?;
//! let url = server.url();          // through the proxy when there is one
//! server.proxy().unwrap().cut();   // the client sees its connection reset
//! ```

use crate::process::{ProcessSlot, ServerProcess, find_binary, free_port, start_on_free_port};
use crate::proxy::TcpProxy;
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a fresh (or restarted) server may take to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Options for [`RedisServer`].
#[derive(Clone, Debug, Default)]
pub struct RedisServerBuilder {
    aof: bool,
    proxy: bool,
    auth: Option<Credentials>,
    #[cfg(feature = "redis-tls")]
    tls: Option<ServerTls>,
}

/// Who clients log in as: the default user with a password, or an ACL user.
#[derive(Clone, Debug)]
struct Credentials {
    /// `None`: the default user (`requirepass`).
    user: Option<String>,
    password: String,
}

/// The server's TLS files, and the client certificate the harness's own client presents.
#[cfg(feature = "redis-tls")]
#[derive(Clone, Debug)]
struct ServerTls {
    ca: crate::tls::PemPair,
    server: crate::tls::PemPair,
    client: crate::tls::PemPair,
    /// `--tls-auth-clients yes` (a client certificate is required) rather than `optional`.
    require_client_cert: bool,
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

    /// Clients must log in with `password` as the default user (`--requirepass`).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.auth = Some(Credentials {
            user: None,
            password: password.into(),
        });
        self
    }

    /// Clients must log in as the ACL user `user` (all keys, channels and commands) with
    /// `password`; the default user is switched off.
    pub fn user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some(Credentials {
            user: Some(user.into()),
            password: password.into(),
        });
        self
    }

    /// TLS only: no plain port (`--port 0`), the TLS port serves `pki.server`, and client
    /// certificates signed by `pki.ca` are accepted but not required (`--tls-auth-clients
    /// optional`; see [`Self::require_client_cert`]). The harness's own client trusts `pki.ca`
    /// and presents `pki.client`.
    #[cfg(feature = "redis-tls")]
    pub fn tls(mut self, pki: &crate::tls::TestPki) -> Self {
        self.tls = Some(ServerTls {
            ca: pki.ca.clone(),
            server: pki.server.clone(),
            client: pki.client.clone(),
            require_client_cert: false,
        });
        self
    }

    /// With [`Self::tls`]: clients without a certificate signed by the CA are refused
    /// (`--tls-auth-clients yes`).
    #[cfg(feature = "redis-tls")]
    pub fn require_client_cert(mut self, required: bool) -> Self {
        if let Some(tls) = &mut self.tls {
            tls.require_client_cert = required;
        }
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
            auth: self.auth,
            #[cfg(feature = "redis-tls")]
            tls: self.tls,
            process: ProcessSlot::default(),
            proxy: None,
            generation: AtomicU32::new(0),
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
    auth: Option<Credentials>,
    #[cfg(feature = "redis-tls")]
    tls: Option<ServerTls>,
    process: ProcessSlot,
    proxy: Option<TcpProxy>,
    generation: AtomicU32,
}

impl RedisServer {
    /// Options: AOF, proxy, credentials, TLS.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// A server without persistence and without proxy.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    fn spawn(&self) -> Result<()> {
        let mut command = Command::new(&self.binary);
        command.current_dir(self.dir.path());
        self.listen_args(&mut command);
        match &self.auth {
            None => {}
            Some(Credentials {
                user: None,
                password,
            }) => {
                command.arg("--requirepass").arg(password);
            }
            Some(Credentials {
                user: Some(user),
                password,
            }) => {
                // One argument per ACL token: redis-server quotes each argument.
                command
                    .args(["--user", "default", "off"])
                    .args(["--user", user, "on"])
                    .arg(format!(">{password}"))
                    .args(["~*", "&*", "+@all"]);
            }
        }
        command
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
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let log = self.dir.path().join(format!("redis-{generation}.log"));
        let mut process = ServerProcess::spawn("redis-server", command, &log)?;
        if let Err(error) = wait_for_pong(|| self.ping(), self.server_addr(), &mut process) {
            bail!("{error:#}\nredis-server log:\n{}", process.log_tail());
        }
        *self.process.lock() = Some(process);
        Ok(())
    }

    /// `--port N`, or with TLS `--port 0 --tls-port N` and the certificate files.
    fn listen_args(&self, command: &mut Command) {
        #[cfg(feature = "redis-tls")]
        if let Some(tls) = &self.tls {
            let auth_clients = if tls.require_client_cert {
                "yes"
            } else {
                "optional"
            };
            crate::redis_nodes::tls_server_args(
                command,
                self.port,
                &tls.server,
                &tls.ca.cert_path,
                auth_clients,
            );
            return;
        }
        command.arg("--port").arg(self.port.to_string());
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

    /// URL (database 0) through the proxy when there is one: `redis://`, or `rediss://` with
    /// TLS; with the user and password when the server requires them.
    pub fn url(&self) -> String {
        self.url_for(self.client_addr())
    }

    /// [`Self::url`] of the server itself, bypassing any proxy.
    pub fn direct_url(&self) -> String {
        self.url_for(self.server_addr())
    }

    fn url_for(&self, addr: SocketAddr) -> String {
        let scheme = if self.is_tls() { "rediss" } else { "redis" };
        let login = match &self.auth {
            None => String::new(),
            Some(Credentials { user, password }) => format!(
                "{}:{}@",
                encode(user.as_deref().unwrap_or("")),
                encode(password)
            ),
        };
        format!("{scheme}://{login}{addr}/0")
    }

    /// Whether the server speaks TLS only.
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "redis-tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "redis-tls"))]
        false
    }

    /// The proxy, if the server was started with one.
    pub fn proxy(&self) -> Option<&TcpProxy> {
        self.proxy.as_ref()
    }

    /// A `redis` client connected straight to the server (not through the proxy), for tests
    /// that inspect keys independently of the code under test.
    ///
    /// With TLS it trusts the test CA and presents the test client certificate; it logs in
    /// with the server's credentials.
    pub fn client(&self) -> Result<redis::Client> {
        #[cfg(feature = "redis-tls")]
        if let Some(tls) = &self.tls {
            install_crypto_provider();
            let certificates = redis::TlsCertificates {
                client_tls: Some(redis::ClientTlsConfig {
                    client_cert: tls.client.cert_pem.clone().into_bytes(),
                    client_key: tls.client.key_pem.clone().into_bytes(),
                }),
                root_cert: Some(tls.ca.cert_pem.clone().into_bytes()),
            };
            return redis::Client::build_with_tls(self.direct_url(), certificates)
                .context("building a TLS redis client");
        }
        redis::Client::open(self.direct_url()).context("building a redis client")
    }

    /// Whether the server answers `PING` now (after `AUTH` when it needs credentials).
    fn ping(&self) -> Result<bool> {
        if self.is_tls() {
            let mut connection = self
                .client()?
                .get_connection_with_timeout(Duration::from_millis(500))?;
            return Ok(redis::cmd("PING").query::<String>(&mut connection)? == "PONG");
        }
        let mut request = Vec::new();
        match &self.auth {
            None => {}
            Some(Credentials {
                user: None,
                password,
            }) => request.extend(resp(&["AUTH", password])),
            Some(Credentials {
                user: Some(user),
                password,
            }) => request.extend(resp(&["AUTH", user, password])),
        }
        request.extend(resp(&["PING"]));
        let mut stream =
            TcpStream::connect_timeout(&self.server_addr(), Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(&request)?;
        // `+OK` of the AUTH (if any), then `+PONG`; an error reply (`-LOADING`, `-WRONGPASS`)
        // or a short read means not ready.
        let expected: &[u8] = if self.auth.is_some() {
            b"+OK\r\n+PONG"
        } else {
            b"+PONG"
        };
        let mut reply = Vec::new();
        let mut buffer = [0u8; 64];
        while reply.len() < expected.len() {
            let read = stream.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            reply.extend_from_slice(&buffer[..read]);
        }
        Ok(reply.starts_with(expected))
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) -> Result<()> {
        self.process
            .lock()
            .as_ref()
            .context("redis-server is not running (killed)")?
            .pause()
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.process
            .lock()
            .as_ref()
            .context("redis-server is not running (killed)")?
            .resume()
    }

    /// Kills the server (SIGKILL). Without AOF its data is gone.
    pub fn kill(&self) -> Result<()> {
        self.process.kill()
    }

    /// Kills the server if it runs, then starts it again on the same port with the same data
    /// directory (so an AOF file is replayed).
    pub fn restart(&self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// The server's log so far.
    pub fn log_tail(&self) -> String {
        self.process
            .lock()
            .as_ref()
            .map(ServerProcess::log_tail)
            .unwrap_or_default()
    }
}

/// Sends inline `PING`s until the server answers `+PONG` (not `-LOADING` while it replays an
/// AOF), or the process exits, or [`START_TIMEOUT`] passes.
fn wait_for_pong(
    ping: impl Fn() -> Result<bool>,
    addr: SocketAddr,
    process: &mut ServerProcess,
) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        process.check_running()?;
        if ping().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("redis-server at {addr} did not answer PING within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A command in RESP (not inline: a password may hold spaces).
fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend(format!("${}\r\n{arg}\r\n", arg.len()).into_bytes());
    }
    out
}

/// Percent-encodes a URL's user or password.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

/// The redis crate's rustls takes the process's default crypto provider; pick `ring` unless
/// something else already chose one (several providers compiled in leave none chosen).
#[cfg(feature = "redis-tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing the race to another thread that installed one is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
