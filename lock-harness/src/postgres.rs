//! PostgreSQL servers for tests: `initdb` into a temporary directory, `postgres` on a free
//! loopback port, stop / restart on the same port and data, pause, terminate a session, and a
//! process-wide shared server for test binaries.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
//! `postgres` system user (the data directory is chowned to it). The `postgres` binary is run
//! directly (not through the daemonizing `pg_ctl`) so the harness owns the process.
//!
//! The server is started through `setpriv --pdeathsig SIGQUIT` from a keeper thread that lives
//! as long as the test process: if the test binary is killed hard (SIGKILL, a crash), the
//! kernel sends SIGQUIT to the postmaster, which is PostgreSQL's immediate shutdown, so no
//! server outlives the test process. Its data directory (under the system temp dir, named
//! `distlock-pg-<pid>-*`) is then left behind; the next start removes directories of dead
//! processes.
//!
//! [`PostgresServer::builder`] starts a server with TLS (`ssl = on` with given certificate
//! files), its own `pg_hba.conf` lines (password, client-certificate or TLS-only access) and
//! login roles. Such a server's own administration (`sql`, readiness checks) goes over its
//! Unix socket as `postgres` with trust, so the TCP rules are exactly the ones given.

use crate::process::{
    ProcessSlot, ServerProcess, find_binary, free_port, start_on_free_port, wait_for_port,
};
use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const PACKAGE: &str = "postgresql";
const DIR_PREFIX: &str = "distlock-pg-";

/// Directories where Debian installs PostgreSQL's server binaries, newest first.
fn server_dirs() -> Vec<String> {
    let mut dirs: Vec<(u32, String)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .filter_map(|entry| {
                    let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
                    Some((version, format!("{}/bin", entry.path().display())))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    dirs.into_iter().map(|(_, dir)| dir).collect()
}

/// A PostgreSQL program (`pg_ctl`, `pgbench`, …) from the newest server version installed,
/// else from `PATH`; the error says what to install.
pub fn find_pg_binary(name: &str) -> Result<PathBuf> {
    let dirs = server_dirs();
    let refs: Vec<&str> = dirs.iter().map(String::as_str).collect();
    // Prefer the versioned directory: Debian's /usr/bin wrappers need a cluster config.
    for dir in &refs {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    find_binary(name, PACKAGE, &refs)
}

/// uid and gid to run the server as: the `postgres` user when we are root, else ourselves.
fn server_user() -> Result<Option<(u32, u32)>> {
    let me = Command::new("id")
        .arg("-u")
        .output()
        .context("running `id -u`")?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32> {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .context("running `id` to find the postgres user")?;
        if !output.status.success() {
            bail!(
                "running as root, but there is no `postgres` user to run the server as \
                 (PostgreSQL refuses root); install the Debian package `{PACKAGE}`"
            );
        }
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .context("parsing the output of `id`")
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

fn with_user(command: &mut Command, user: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
}

/// Removes data directories left by test processes that no longer exist (killed hard).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if kill(Pid::from_raw(pid), None).is_err() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

type SpawnRequest = (
    &'static str,
    Command,
    PathBuf,
    mpsc::Sender<Result<ServerProcess>>,
);

/// Spawns server processes from one thread that lives as long as the process, so that the
/// parent-death signal fires when the test process dies, not when some test thread ends.
fn spawn_on_keeper(name: &'static str, command: Command, log: &Path) -> Result<ServerProcess> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<SpawnRequest>();
        let _ = std::thread::Builder::new()
            .name("postgres-keeper".into())
            .spawn(move || {
                for (name, command, log, reply) in receiver {
                    let _ = reply.send(ServerProcess::spawn(name, command, &log));
                }
                // The sender lives in a static: this loop never ends while the process runs.
            });
        Mutex::new(sender)
    });
    let (reply, answer) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((name, command, log.to_owned(), reply))
        .context("the postgres keeper thread is gone")?;
    answer
        .recv()
        .context("the postgres keeper thread did not answer")?
}

/// TLS for a [`PostgresServer`]: PEM files the harness copies into the server's directory
/// (owned by the server's user, the key 0600, as PostgreSQL demands).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server certificate (`ssl_cert_file`).
    pub cert: PathBuf,
    /// Its private key (`ssl_key_file`).
    pub key: PathBuf,
    /// The CA whose client certificates the server accepts (`ssl_ca_file`), for `cert`
    /// authentication; `None`: no client certificates are asked for.
    pub client_ca: Option<PathBuf>,
}

/// Builds a [`PostgresServer`] with TLS, access rules and roles (see the module docs).
/// Without any of them it starts what [`PostgresServer::start`] starts.
#[derive(Debug, Clone, Default)]
pub struct PostgresServerBuilder {
    settings: Vec<(String, String)>,
    tls: Option<ServerTls>,
    hba: Vec<String>,
    roles: Vec<(String, Option<String>)>,
}

impl PostgresServerBuilder {
    /// An extra `-c name=value` server setting.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Turns TLS on (`ssl = on`) with these files.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// TLS with a [`crate::tls::TestPki`]'s server certificate, its CA accepting client
    /// certificates.
    #[cfg(feature = "tls")]
    pub fn test_pki(self, pki: &crate::tls::TestPki) -> Self {
        self.tls(ServerTls {
            cert: pki.server.cert_path.clone(),
            key: pki.server.key_path.clone(),
            client_ca: Some(pki.ca.cert_path.clone()),
        })
    }

    /// A `pg_hba.conf` line, e.g. `hostssl all all 127.0.0.1/32 scram-sha-256`. Once any is
    /// given, these lines (in order) are the only TCP rules: the trust rules `initdb` wrote
    /// go, and only `local all postgres trust` (the harness's own access) stays before them.
    pub fn hba(mut self, line: &str) -> Self {
        self.hba.push(line.to_owned());
        self
    }

    /// A login role created once the server first runs, with a password (stored as
    /// scram-sha-256, PostgreSQL 15's default) or none (for `cert` or trust access).
    pub fn role(mut self, name: &str, password: Option<&str>) -> Self {
        self.roles
            .push((name.to_owned(), password.map(str::to_owned)));
        self
    }

    /// `initdb`, the files and rules above, start on a free loopback port, create the roles.
    pub fn start(self) -> Result<PostgresServer> {
        PostgresServer::start_built(self)
    }
}

/// A PostgreSQL server started by the harness. Dropping it shuts the server down (immediate
/// shutdown) and removes its data directory.
#[derive(Debug)]
pub struct PostgresServer {
    dir: tempfile::TempDir,
    port: u16,
    user: Option<(u32, u32)>,
    postgres: PathBuf,
    psql: PathBuf,
    process: ProcessSlot,
    extra_settings: Vec<(String, String)>,
    /// `pg_hba.conf` was replaced: the harness reaches the server over its Unix socket.
    own_hba: bool,
    tls: bool,
}

impl PostgresServer {
    /// `initdb` + start on a free loopback port, trust authentication for user `postgres`,
    /// `fsync=off` (test speed; commits still go through the WAL).
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// Like [`PostgresServer::start`], with extra `-c name=value` server settings.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self> {
        settings
            .iter()
            .fold(Self::builder(), |builder, (name, value)| {
                builder.setting(name, value)
            })
            .start()
    }

    /// A builder for a server with TLS, its own access rules or roles.
    pub fn builder() -> PostgresServerBuilder {
        PostgresServerBuilder::default()
    }

    fn start_built(built: PostgresServerBuilder) -> Result<Self> {
        remove_stale_dirs();
        let initdb = find_pg_binary("initdb")?;
        let postgres = find_pg_binary("postgres")?;
        let psql = find_pg_binary("psql")?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating the postgres temp dir")?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock)?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&sock, Some(uid), Some(gid))?;
        }
        let mut command = Command::new(&initdb);
        command
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .current_dir(dir.path());
        with_user(&mut command, user);
        let output = command
            .output()
            .with_context(|| format!("running {initdb:?}"))?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let mut extra_settings = built.settings;
        if let Some(tls) = &built.tls {
            extra_settings.extend(install_tls(dir.path(), tls, user)?);
        }
        let own_hba = !built.hba.is_empty();
        if own_hba {
            let mut rules = String::from("local all postgres trust\n");
            for line in &built.hba {
                rules.push_str(line);
                rules.push('\n');
            }
            std::fs::write(data.join("pg_hba.conf"), rules).context("writing pg_hba.conf")?;
        }
        let mut server = PostgresServer {
            dir,
            port: free_port()?,
            user,
            postgres,
            psql,
            process: ProcessSlot::default(),
            extra_settings,
            own_hba,
            tls: built.tls.is_some(),
        };
        start_on_free_port(server.port, |port| {
            server.port = port;
            server.start_again()
        })?;
        for (name, password) in &built.roles {
            let password = match password {
                Some(password) => format!(" PASSWORD '{}'", password.replace('\'', "''")),
                None => String::new(),
            };
            server.sql(&format!(
                "CREATE ROLE \"{}\" LOGIN{password}",
                name.replace('"', "\"\"")
            ))?;
        }
        Ok(server)
    }

    /// Starts the server again on the same port and data directory (after [`Self::stop`] or
    /// [`Self::kill`]); a no-op if it runs.
    pub fn start_again(&self) -> Result<()> {
        let mut process = self.process.lock();
        if process.is_some() {
            return Ok(());
        }
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "SIGQUIT", "--"])
            .arg(&self.postgres)
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .current_dir(self.dir.path());
        for (name, value) in &self.extra_settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        with_user(&mut command, self.user);
        let log = self.dir.path().join("postgres.log");
        let mut child = spawn_on_keeper("postgres", command, &log)?;
        // The port opens before recovery ends; wait until a real query answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        wait_for_port(self.addr(), Duration::from_secs(30))
            .map_err(|error| anyhow::anyhow!("{error}; postgres log:\n{}", child.log_tail()))?;
        loop {
            child.check_running()?;
            if self.sql("SELECT 1").is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "postgres did not answer queries; log:\n{}",
                    child.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *process = Some(child);
        Ok(())
    }

    /// Stops the server with a fast shutdown (SIGINT: sessions are terminated, data kept),
    /// waiting until the postmaster exits.
    pub fn stop(&self) -> Result<()> {
        self.shut_down(Signal::SIGINT, Duration::from_secs(30))
    }

    /// Crashes the server: immediate shutdown (SIGQUIT, like a power cut for the clients),
    /// then waits for the postmaster to exit. Data that reached the WAL survives.
    pub fn kill(&self) -> Result<()> {
        self.shut_down(Signal::SIGQUIT, Duration::from_secs(10))
    }

    /// Sends `how` to the postmaster and waits up to `grace` for it to exit, then kills it.
    fn shut_down(&self, how: Signal, grace: Duration) -> Result<()> {
        let Some(mut child) = self.process.lock().take() else {
            return Ok(());
        };
        signal(&child, how)?;
        let deadline = Instant::now() + grace;
        while child.check_running().is_ok() {
            if Instant::now() >= deadline {
                child.kill()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Fast shutdown then start on the same port and data.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Freezes the whole server (SIGSTOP to the postmaster and every backend process): open
    /// sessions stop answering too, as when the host freezes.
    pub fn pause(&self) -> Result<()> {
        match self.process.lock().as_ref() {
            Some(child) => child.pause_tree(),
            None => bail!("postgres is not running"),
        }
    }

    /// Pins the server (postmaster and its processes, and the backends it forks later) to
    /// `cpu`, for benchmarks that want the client and the server on known CPUs.
    pub fn pin_to_cpu(&self, cpu: usize) -> Result<()> {
        match self.process.lock().as_ref() {
            Some(child) => child.pin_tree_to_cpu(cpu),
            None => bail!("postgres is not running"),
        }
    }

    /// Resumes a paused server.
    pub fn resume(&self) -> Result<()> {
        match self.process.lock().as_ref() {
            Some(child) => child.resume_tree(),
            None => bail!("postgres is not running"),
        }
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TCP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A `postgres://` URL for database `postgres` as user `postgres` (trust auth). A server
    /// built with its own `pg_hba.conf` lines admits this only if they do: use
    /// [`Self::socket_url`] there.
    pub fn url(&self) -> String {
        Self::url_for(self.addr())
    }

    /// A URL for database `postgres` as user `postgres` over the server's Unix socket (trust,
    /// whatever the TCP rules say).
    pub fn socket_url(&self) -> String {
        format!(
            "postgres://postgres@localhost/postgres?host={}&port={}&sslmode=disable",
            self.dir.path().join("sock").display(),
            self.port
        )
    }

    /// Whether the server was started with TLS on.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The same URL through another address, e.g. a [`crate::TcpProxy`] in front of it.
    pub fn url_for(addr: SocketAddr) -> String {
        format!("postgres://postgres@{addr}/postgres?sslmode=disable")
    }

    /// Runs `query` with `psql` over TCP and returns its unaligned, tuples-only output.
    pub fn sql(&self, query: &str) -> Result<String> {
        // With its own pg_hba.conf the server may admit `postgres` over TCP no more.
        let host = if self.own_hba {
            self.dir.path().join("sock").display().to_string()
        } else {
            "127.0.0.1".to_owned()
        };
        let output = Command::new(&self.psql)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(host)
            .args(["-U", "postgres", "-d", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("-c")
            .arg(query)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .with_context(|| format!("running {:?}", self.psql))?;
        if !output.status.success() {
            bail!(
                "psql failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Terminates (`pg_terminate_backend`) every session whose `application_name` is
    /// `application_name`; returns how many were terminated.
    pub fn terminate_sessions(&self, application_name: &str) -> Result<usize> {
        let escaped = application_name.replace('\'', "''");
        let out = self.sql(&format!(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = '{escaped}' AND pid <> pg_backend_pid()"
        ))?;
        out.parse()
            .context("parsing the count of terminated sessions")
    }

    /// Terminates the session with backend process id `pid`.
    pub fn terminate_backend(&self, pid: i32) -> Result<bool> {
        Ok(self.sql(&format!("SELECT pg_terminate_backend({pid})"))? == "t")
    }

    /// The server log so far (last lines).
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Copies the TLS files into `<dir>/tls`, readable by the server's user only (PostgreSQL
/// refuses a key that others can read, and the originals may belong to root), and returns
/// the settings that point the server at them.
fn install_tls(
    dir: &Path,
    tls: &ServerTls,
    user: Option<(u32, u32)>,
) -> Result<Vec<(String, String)>> {
    use std::os::unix::fs::PermissionsExt;
    let tls_dir = dir.join("tls");
    std::fs::create_dir(&tls_dir).context("creating the server's TLS directory")?;
    let mut files = vec![
        ("ssl_cert_file", &tls.cert, "server.crt"),
        ("ssl_key_file", &tls.key, "server.key"),
    ];
    if let Some(ca) = &tls.client_ca {
        files.push(("ssl_ca_file", ca, "client-ca.crt"));
    }
    let mut settings = vec![("ssl".to_owned(), "on".to_owned())];
    for (setting, from, name) in files {
        let to = tls_dir.join(name);
        std::fs::copy(from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&to, Some(uid), Some(gid))?;
        }
        settings.push((setting.to_owned(), to.display().to_string()));
    }
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&tls_dir, Some(uid), Some(gid))?;
    }
    Ok(settings)
}

fn signal(child: &ServerProcess, signal: Signal) -> Result<()> {
    let pid = child.pid().context("postgres is not running")?;
    let pid = i32::try_from(pid).context("pid out of range")?;
    kill(Pid::from_raw(pid), signal).with_context(|| format!("sending {signal} to postgres"))
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// One server shared by every test of this test binary, started on first use (from a
/// dedicated thread, so it does not belong to any test's runtime). It is never dropped: when
/// the test process exits, the parent-death signal stops it (see the module docs).
pub fn shared() -> Result<&'static PostgresServer> {
    static SHARED: OnceLock<std::result::Result<PostgresServer, String>> = OnceLock::new();
    let server = SHARED.get_or_init(|| {
        std::thread::spawn(|| PostgresServer::start().map_err(|error| format!("{error:#}")))
            .join()
            .unwrap_or_else(|_| Err("the thread starting postgres panicked".into()))
    });
    match server {
        Ok(server) => Ok(server),
        Err(error) => bail!("starting the shared postgres server failed: {error}"),
    }
}

/// How a [`PgBouncer`] hands server connections to clients (its `pool_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// A client keeps one server connection for as long as it is connected.
    Session,
    /// A client gets a server connection per transaction (what breaks session locks).
    Transaction,
    /// A client gets a server connection per statement; transactions are refused.
    Statement,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

/// A real PgBouncer (Debian package `pgbouncer`) on a free loopback port in front of a
/// [`PostgresServer`], for tests of how clients behave behind a connection pooler. It runs as
/// the server's user (PgBouncer refuses root), with trust authentication for user `postgres`,
/// `server_round_robin = 0` (its default: the most recently used idle server connection goes
/// to the next client). Dropping it kills it and removes its directory.
#[derive(Debug)]
pub struct PgBouncer {
    // Fields drop in order: the process is killed before its directory goes.
    _process: ServerProcess,
    _dir: tempfile::TempDir,
    port: u16,
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` with at most `pool_size` server connections to `upstream`.
    pub fn start(upstream: &PostgresServer, mode: PoolMode, pool_size: u32) -> Result<Self> {
        Self::start_with_reset(upstream, mode, pool_size, None)
    }

    /// [`PgBouncer::start`] with `server_reset_query` set to `reset` (`Some("")`: none, so a
    /// server connection goes back to the pool with the session state, advisory locks
    /// included, that its last client left; `None`: PgBouncer's default, `DISCARD ALL`).
    pub fn start_with_reset(
        upstream: &PostgresServer,
        mode: PoolMode,
        pool_size: u32,
        reset: Option<&str>,
    ) -> Result<Self> {
        let reset_line = match reset {
            Some(query) => format!("server_reset_query = {query}\n"),
            None => String::new(),
        };
        remove_stale_dirs();
        let binary = find_binary("pgbouncer", "pgbouncer", &["/usr/sbin"])?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-bouncer-", std::process::id()))
            .tempdir()
            .context("creating the pgbouncer temp dir")?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let users = dir.path().join("userlist.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n")?;
        let start = |port: u16| -> Result<ServerProcess> {
            let ini = dir.path().join("pgbouncer.ini");
            // sqlx sends `extra_float_digits` at startup, which PgBouncer refuses unless told
            // to ignore it.
            std::fs::write(
                &ini,
                format!(
                    "[databases]\n\
                     postgres = host=127.0.0.1 port={upstream_port} dbname=postgres user=postgres\n\
                     [pgbouncer]\n\
                     listen_addr = 127.0.0.1\n\
                     listen_port = {port}\n\
                     unix_socket_dir =\n\
                     auth_type = trust\n\
                     auth_file = {users}\n\
                     pool_mode = {mode}\n\
                     default_pool_size = {pool_size}\n\
                     max_client_conn = 500\n\
                     server_round_robin = 0\n\
                     ignore_startup_parameters = extra_float_digits,options\n\
                     {reset_line}",
                    upstream_port = upstream.port(),
                    users = users.display(),
                    mode = mode.as_str(),
                ),
            )?;
            let mut command = Command::new("setpriv");
            command
                .args(["--pdeathsig", "SIGKILL", "--"])
                .arg(&binary)
                .arg(&ini)
                .current_dir(dir.path());
            with_user(&mut command, user);
            let log = dir.path().join("pgbouncer.log");
            let mut child = spawn_on_keeper("pgbouncer", command, &log)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            // Not `wait_for_port`: whoever else might listen on the port would pass that. A
            // PgBouncer that could not bind exits at once and its log says why (a port clash
            // is retried on another port); one that did logs "listening on <addr>".
            let listening = format!("listening on {addr}");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                child.check_running()?;
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                if log_text.contains(&listening)
                    && std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                        .is_ok()
                {
                    return Ok(child);
                }
                if Instant::now() >= deadline {
                    bail!(
                        "pgbouncer did not open {addr} within 10 s; its log:\n{}",
                        child.log_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let mut port = free_port()?;
        let child = start_on_free_port(port, |candidate| {
            port = candidate;
            start(candidate)
        })?;
        Ok(PgBouncer {
            _process: child,
            _dir: dir,
            port,
        })
    }

    /// The TCP address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A `postgres://` URL through PgBouncer (database `postgres`, user `postgres`).
    pub fn url(&self) -> String {
        PostgresServer::url_for(self.addr())
    }
}
