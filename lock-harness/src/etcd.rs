//! etcd servers for tests: a single node or a static 3-member cluster on free loopback ports,
//! each member in its own temporary data directory, with a [`TcpProxy`] in front of every
//! member's client port so a test can cut and heal the client's connection.
//!
//! Fault hooks: pause / resume a member (SIGSTOP / SIGCONT), kill it, restart it on the same
//! data directory and ports, find and kill the leader, cut / black-hole / heal the proxies,
//! and revoke a lease from outside through a client of the harness's own.
//!
//! With the feature `etcd-tls`, [`EtcdCluster::start_secure`] starts members that serve
//! clients over TLS only (certificates from a [`TestPki`] made for the cluster), optionally
//! require client certificates (`--client-cert-auth`), and optionally run with
//! authentication on (a `root` user, and users whose role may read and write one key prefix,
//! created through etcd-client before `auth enable`). The harness's own client then speaks
//! TLS, presents the client certificate and logs in as `root`.
//!
//! etcd 3.4 has no `--unsafe-no-fsync`, so the data directories live on `/dev/shm` (tmpfs)
//! when it exists: fsync is then nearly free and tests stay fast. Everything is killed and
//! deleted on drop.

use crate::process::{ProcessSlot, START_ATTEMPTS, is_port_clash};
use crate::{ServerProcess, TcpProxy, find_binary, free_port};
use anyhow::{Context, Result, bail};
use etcd_client::{Client, ConnectOptions, GetOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

#[cfg(feature = "etcd-tls")]
use crate::tls::TestPki;

/// How a secure cluster is started ([`EtcdCluster::start_secure`]).
#[cfg(feature = "etcd-tls")]
#[derive(Debug, Clone, Default)]
pub struct EtcdSecurity {
    /// Serve clients over TLS only (`https://` client URLs) with a server certificate of a
    /// [`TestPki`] made for the cluster.
    pub tls: bool,
    /// With `tls`: require a client certificate signed by the PKI's CA (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// Turn authentication on with these users.
    pub auth: Option<EtcdAuth>,
}

/// Users for [`EtcdSecurity::auth`]: `root` (password `root_password`, role `root`, what the
/// harness logs in as) and `users`.
#[cfg(feature = "etcd-tls")]
#[derive(Debug, Clone, Default)]
pub struct EtcdAuth {
    /// Password of the `root` user.
    pub root_password: String,
    /// Further users.
    pub users: Vec<EtcdUser>,
}

/// One user of [`EtcdAuth`].
#[cfg(feature = "etcd-tls")]
#[derive(Debug, Clone)]
pub struct EtcdUser {
    /// User name.
    pub name: String,
    /// Its password.
    pub password: String,
    /// A key prefix the user may read and write (through a role `<name>-rw` of its own);
    /// `None`: a user without any role (every key request is denied).
    pub readwrite_prefix: Option<String>,
}

/// How the harness's own client reaches the members.
#[derive(Debug, Default)]
struct Access {
    #[cfg(feature = "etcd-tls")]
    pki: Option<TestPki>,
    #[cfg(feature = "etcd-tls")]
    client_cert_auth: bool,
    /// `root`'s password once authentication is on.
    root_password: Option<String>,
}

impl Access {
    /// Whether connecting costs a TLS handshake or a login (bcrypt on the server).
    fn is_secure(&self) -> bool {
        #[cfg(feature = "etcd-tls")]
        if self.pki.is_some() {
            return true;
        }
        self.root_password.is_some()
    }

    /// The URL of a client address for etcd-client (`https://` on a TLS cluster).
    fn endpoint(&self, addr: &str) -> String {
        #[cfg(feature = "etcd-tls")]
        if self.pki.is_some() {
            return format!("https://{addr}");
        }
        format!("http://{addr}")
    }

    fn options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        #[cfg(feature = "etcd-tls")]
        if let Some(pki) = &self.pki {
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&pki.ca.cert_pem));
            if self.client_cert_auth {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    &pki.client.cert_pem,
                    &pki.client.key_pem,
                ));
            }
            options = options.with_tls(tls);
        }
        if let Some(password) = &self.root_password {
            options = options.with_user("root", password.clone());
        }
        options
    }

    async fn connect(&self, addrs: &[String]) -> Result<Client> {
        let endpoints: Vec<String> = addrs.iter().map(|addr| self.endpoint(addr)).collect();
        let client = timeout(
            Duration::from_secs(2),
            Client::connect(&endpoints, Some(self.options())),
        )
        .await
        .context("connecting to etcd timed out")??;
        Ok(client)
    }
}

/// Raft heartbeat interval given to every member (ms). Short, so that a killed leader is
/// replaced quickly in failure tests; the election timeout is ten heartbeats.
pub const HEARTBEAT_MS: u64 = 50;
/// Raft election timeout given to every member (ms).
pub const ELECTION_MS: u64 = 500;

/// Finds the `etcd` binary (Debian package `etcd-server`).
pub fn etcd_binary() -> Result<PathBuf> {
    find_binary("etcd", "etcd-server", &["/usr/bin", "/usr/local/bin"])
}

/// One member: its ports, data directory, process and client-side proxy.
#[derive(Debug)]
pub struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    process: ProcessSlot,
    proxy: TcpProxy,
    /// A plain-HTTP port for `/metrics` (TLS clusters only; otherwise the client port).
    metrics_port: Option<u16>,
}

impl EtcdMember {
    /// The member's name in the cluster (`m0`, `m1`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The member's own client address (not through the proxy).
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// The proxy in front of the member's client port.
    pub fn proxy(&self) -> &TcpProxy {
        &self.proxy
    }

    /// Whether the process is running (not killed).
    pub fn is_running(&self) -> bool {
        self.process.lock().is_some()
    }

    /// The process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.lock().as_ref().and_then(ServerProcess::pid)
    }
}

/// The harness's client of a secure cluster (see `EtcdCluster::client`).
struct CachedClient {
    endpoints: Vec<String>,
    runtime_alive: tokio::task::JoinHandle<()>,
    client: Client,
}

impl std::fmt::Debug for CachedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedClient")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Drop for CachedClient {
    fn drop(&mut self) {
        self.runtime_alive.abort();
    }
}

/// A running etcd cluster of one or more members, killed and deleted on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    initial_cluster: String,
    /// Extra flags given to every member (e.g. `--max-txn-ops=16`).
    extra_args: Vec<String>,
    access: Access,
    /// The harness's client of a secure cluster, kept (connecting costs a handshake and a
    /// login): the members it was made for, and a task on the runtime it was made on (the
    /// client's channel dies with that runtime).
    cached: std::sync::Mutex<Option<CachedClient>>,
    // Dropped last: the members' processes die before their directories go.
    _dir: tempfile::TempDir,
}

fn temp_dir() -> Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("distlock-etcd-");
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return Ok(dir);
    }
    builder
        .tempdir()
        .context("creating a temporary directory for etcd")
}

impl EtcdCluster {
    /// Starts a single-node etcd and waits until it serves linearizable requests.
    pub async fn single() -> Result<Self> {
        Self::start(1).await
    }

    /// Starts a static cluster of `size` members and waits until it has a leader and serves
    /// linearizable requests through every member.
    pub async fn start(size: usize) -> Result<Self> {
        Self::start_with_args(size, &[]).await
    }

    /// Like [`EtcdCluster::start`], with extra flags for every member (kept for restarts),
    /// e.g. `["--max-txn-ops=16"]` to test a cluster configured below etcd's defaults.
    pub async fn start_with_args(size: usize, extra_args: &[&str]) -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(size, extra_args, Access::default()).await {
                Err(error) if is_port_clash(&error) && attempt < START_ATTEMPTS => attempt += 1,
                result => return result,
            }
        }
    }

    /// Starts a cluster of `size` with TLS, client certificates and authentication as
    /// `security` says, and extra flags for every member (e.g. `--auth-token-ttl=3`). With
    /// `auth`, authentication is on when this returns.
    #[cfg(feature = "etcd-tls")]
    pub async fn start_secure(
        size: usize,
        security: EtcdSecurity,
        extra_args: &[&str],
    ) -> Result<Self> {
        // Logins check a bcrypt hash: the lowest cost keeps them (and the tests) fast.
        let mut args = Vec::new();
        if security.auth.is_some() {
            args.push("--bcrypt-cost=4");
        }
        args.extend_from_slice(extra_args);
        let mut attempt = 1;
        loop {
            let access = Access {
                pki: if security.tls {
                    Some(TestPki::generate()?)
                } else {
                    None
                },
                client_cert_auth: security.tls && security.client_cert_auth,
                root_password: None,
            };
            match Self::start_once(size, &args, access).await {
                Err(error) if is_port_clash(&error) && attempt < START_ATTEMPTS => attempt += 1,
                Err(error) => return Err(error),
                Ok(mut cluster) => {
                    if let Some(auth) = &security.auth {
                        cluster.enable_auth(auth).await?;
                    }
                    return Ok(cluster);
                }
            }
        }
    }

    /// Creates `root` and the users of `auth`, then turns authentication on.
    #[cfg(feature = "etcd-tls")]
    async fn enable_auth(&mut self, auth: &EtcdAuth) -> Result<()> {
        use etcd_client::Permission;
        let mut client = self.client().await?;
        client
            .user_add("root", auth.root_password.clone(), None)
            .await
            .context("adding user root")?;
        client.user_grant_role("root", "root").await?;
        for user in &auth.users {
            client
                .user_add(user.name.clone(), user.password.clone(), None)
                .await
                .with_context(|| format!("adding user {}", user.name))?;
            if let Some(prefix) = &user.readwrite_prefix {
                let role = format!("{}-rw", user.name);
                client.role_add(role.clone()).await?;
                client
                    .role_grant_permission(
                        role.clone(),
                        Permission::read_write(prefix.clone()).with_prefix(),
                    )
                    .await?;
                client.user_grant_role(user.name.clone(), role).await?;
            }
        }
        client.auth_enable().await.context("enabling auth")?;
        self.access.root_password = Some(auth.root_password.clone());
        // The kept client has no credentials.
        *self
            .cached
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        Ok(())
    }

    /// The certificates of a TLS cluster.
    #[cfg(feature = "etcd-tls")]
    pub fn pki(&self) -> Option<&TestPki> {
        self.access.pki.as_ref()
    }

    /// One try of [`EtcdCluster::start_with_args`] on freshly picked ports.
    async fn start_once(size: usize, extra_args: &[&str], access: Access) -> Result<Self> {
        if size == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let binary = etcd_binary()?;
        let dir = temp_dir()?;
        #[cfg(feature = "etcd-tls")]
        let tls = access.pki.is_some();
        #[cfg(not(feature = "etcd-tls"))]
        let tls = false;
        let mut members = Vec::with_capacity(size);
        for index in 0..size {
            let client_port = free_port()?;
            let peer_port = free_port()?;
            let name = format!("m{index}");
            let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], client_port)))?;
            members.push(EtcdMember {
                data_dir: dir.path().join(format!("{name}.etcd")),
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port,
                peer_port,
                process: ProcessSlot::default(),
                proxy,
                metrics_port: if tls { Some(free_port()?) } else { None },
            });
        }
        let initial_cluster = members
            .iter()
            .map(|member| format!("{}=http://127.0.0.1:{}", member.name, member.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = EtcdCluster {
            members,
            initial_cluster,
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
            access,
            cached: std::sync::Mutex::new(None),
            _dir: dir,
        };
        for index in 0..size {
            cluster.spawn_member(&binary, index)?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn spawn_member(&self, binary: &Path, index: usize) -> Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let extra_args = self.extra_args.clone();
        // One token for the whole cluster (members with different tokens form different
        // clusters), unique per cluster so that two test clusters never merge.
        let token = format!(
            "distlock-{}",
            self.members.first().map_or(0, |m| m.peer_port)
        );
        let member = self
            .members
            .get(index)
            .with_context(|| format!("no member {index}"))?;
        let client_url = self
            .access
            .endpoint(&format!("127.0.0.1:{}", member.client_port));
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(binary);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&token)
            .arg("--heartbeat-interval")
            .arg(HEARTBEAT_MS.to_string())
            .arg("--election-timeout")
            .arg(ELECTION_MS.to_string())
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn")
            .args(&extra_args);
        #[cfg(feature = "etcd-tls")]
        if let Some(pki) = &self.access.pki {
            command
                .arg("--cert-file")
                .arg(&pki.server.cert_path)
                .arg("--key-file")
                .arg(&pki.server.key_path);
            // etcd 3.4 asks every client for a certificate once it has a trusted CA, whatever
            // --client-cert-auth says: give it one only when client certificates are wanted.
            if self.access.client_cert_auth {
                command
                    .arg("--trusted-ca-file")
                    .arg(&pki.ca.cert_path)
                    .arg("--client-cert-auth");
            }
        }
        if let Some(port) = member.metrics_port {
            command
                .arg("--listen-metrics-urls")
                .arg(format!("http://127.0.0.1:{port}"));
        }
        // A restarted member finds its data directory and ignores the initial-cluster flags.
        let process = ServerProcess::spawn(&format!("etcd {}", member.name), command, &member.log)?;
        *member.process.lock() = Some(process);
        Ok(())
    }

    /// Waits until every running member answers a linearizable read.
    pub async fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        for index in 0..self.members.len() {
            if !self.members[index].is_running() {
                continue;
            }
            loop {
                if let Some(process) = self.members[index].process.lock().as_mut() {
                    process.check_running()?;
                }
                let endpoint = self.members[index].client_addr().to_string();
                let ready = async {
                    let mut client = self.access.connect(&[endpoint]).await?;
                    client.get("distlock-harness-ready", None).await?;
                    anyhow::Ok(())
                };
                match timeout(Duration::from_secs(1), ready).await {
                    Ok(Ok(())) => break,
                    _ if Instant::now() >= deadline => {
                        let tail = self.members[index]
                            .process
                            .lock()
                            .as_ref()
                            .map(ServerProcess::log_tail)
                            .unwrap_or_default();
                        bail!(
                            "etcd member {} not ready within {within:?}; its log ends with:\n{tail}",
                            self.members[index].name
                        );
                    }
                    _ => sleep(Duration::from_millis(20)).await,
                }
            }
        }
        Ok(())
    }

    /// The members, in start order.
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    fn member(&self, index: usize) -> Result<&EtcdMember> {
        self.members
            .get(index)
            .with_context(|| format!("no etcd member {index}"))
    }

    /// `host:port` of every member's proxy: what the code under test connects to.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| member.proxy.addr().to_string())
            .collect()
    }

    /// `host:port` of every member's own client port (bypassing the proxies).
    pub fn direct_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| member.client_addr().to_string())
            .collect()
    }

    /// An `etcd://` URL through the proxies, with an optional key prefix. On a TLS cluster:
    /// `etcds://…?ca=<CA file>` (and `&cert=…&key=…` when client certificates are required).
    pub fn url(&self, prefix: Option<&str>) -> String {
        self.url_with(None, prefix)
    }

    /// Like [`EtcdCluster::url`], logging in as `user` with `password` (both sent as they
    /// are: test names without characters that need percent-encoding).
    pub fn url_as(&self, user: &str, password: &str, prefix: Option<&str>) -> String {
        self.url_with(Some((user, password)), prefix)
    }

    fn url_with(&self, credentials: Option<(&str, &str)>, prefix: Option<&str>) -> String {
        #[cfg(feature = "etcd-tls")]
        let scheme = if self.access.pki.is_some() {
            "etcds"
        } else {
            "etcd"
        };
        #[cfg(not(feature = "etcd-tls"))]
        let scheme = "etcd";
        let userinfo = credentials
            .map(|(user, password)| format!("{user}:{password}@"))
            .unwrap_or_default();
        let mut url = format!("{scheme}://{userinfo}{}", self.endpoints().join(","));
        if let Some(prefix) = prefix {
            url.push('/');
            url.push_str(prefix.trim_start_matches('/'));
        }
        #[cfg(feature = "etcd-tls")]
        if let Some(pki) = &self.access.pki {
            url.push_str(&format!("?ca={}", pki.ca.cert_path.display()));
            if self.access.client_cert_auth {
                url.push_str(&format!(
                    "&cert={}&key={}",
                    pki.client.cert_path.display(),
                    pki.client.key_path.display()
                ));
            }
        }
        url
    }

    /// A client of the harness's own, straight to the running members (not through the
    /// proxies), for looking at the server independently of the code under test. On a
    /// secure cluster (TLS or authentication) one client is kept and handed out again while
    /// the running members and the runtime stay the same: a new one would cost a TLS
    /// handshake and a login per call, too slow for tests that poll the server.
    pub async fn client(&self) -> Result<Client> {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|member| member.is_running())
            .map(|member| member.client_addr().to_string())
            .collect();
        if !self.access.is_secure() {
            return self.access.connect(&endpoints).await;
        }
        let lock = || {
            self.cached
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        if let Some(cached) = lock().as_ref()
            && cached.endpoints == endpoints
            && !cached.runtime_alive.is_finished()
        {
            return Ok(cached.client.clone());
        }
        let client = self.access.connect(&endpoints).await?;
        *lock() = Some(CachedClient {
            endpoints,
            runtime_alive: tokio::spawn(std::future::pending()),
            client: client.clone(),
        });
        Ok(client)
    }

    /// Freezes member `index` (SIGSTOP).
    pub fn pause(&self, index: usize) -> Result<()> {
        self.member(index)?
            .process
            .lock()
            .as_ref()
            .context("member is not running")?
            .pause()
    }

    /// Resumes member `index` (SIGCONT).
    pub fn resume(&self, index: usize) -> Result<()> {
        self.member(index)?
            .process
            .lock()
            .as_ref()
            .context("member is not running")?
            .resume()
    }

    /// Kills member `index` (SIGKILL). Its data directory stays for [`EtcdCluster::restart`].
    pub fn kill(&self, index: usize) -> Result<()> {
        self.member(index)?.process.kill()
    }

    /// Restarts a killed member on the same ports and data directory and waits until it
    /// serves again.
    pub async fn restart(&self, index: usize) -> Result<()> {
        if self.member(index)?.is_running() {
            bail!("member {index} is still running; kill it first");
        }
        let binary = etcd_binary()?;
        self.spawn_member(&binary, index)?;
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// The index of the current leader (a running member), asked of the running members.
    pub async fn leader(&self) -> Result<usize> {
        for member in self.members.iter().filter(|member| member.is_running()) {
            let status = async {
                let mut client = self
                    .access
                    .connect(&[member.client_addr().to_string()])
                    .await?;
                anyhow::Ok(client.status().await?)
            };
            let Ok(Ok(status)) = timeout(Duration::from_secs(2), status).await else {
                continue;
            };
            let leader_id = status.leader();
            if leader_id == 0 {
                continue;
            }
            // Map the leader's member id to our index through the member list.
            let list = async {
                let mut client = self
                    .access
                    .connect(&[member.client_addr().to_string()])
                    .await?;
                anyhow::Ok(client.member_list().await?)
            };
            let Ok(Ok(list)) = timeout(Duration::from_secs(2), list).await else {
                continue;
            };
            for listed in list.members() {
                if listed.id() == leader_id
                    && let Some(index) = self
                        .members
                        .iter()
                        .position(|member| member.name == listed.name())
                    // Right after a kill the others still name the dead leader for an
                    // election timeout: that is no leader.
                    && self.members[index].is_running()
                {
                    return Ok(index);
                }
            }
        }
        bail!("no running etcd member knows a leader")
    }

    /// Kills every member (SIGKILL), then starts them all again on their ports and data
    /// directories and waits until they serve: a crash of the whole cluster.
    pub async fn restart_all(&self) -> Result<()> {
        for index in 0..self.members.len() {
            self.kill(index)?;
        }
        let binary = etcd_binary()?;
        for index in 0..self.members.len() {
            self.spawn_member(&binary, index)?;
        }
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// Kills the current leader; returns its index.
    pub async fn kill_leader(&self) -> Result<usize> {
        let leader = self.leader().await?;
        self.kill(leader)?;
        Ok(leader)
    }

    /// Closes every client connection to member `index` and refuses new ones.
    pub fn cut(&self, index: usize) -> Result<()> {
        self.member(index)?.proxy.cut();
        Ok(())
    }

    /// Stops forwarding to member `index` without closing anything (a silent partition).
    pub fn blackhole(&self, index: usize) -> Result<()> {
        self.member(index)?.proxy.blackhole();
        Ok(())
    }

    /// Forwards to member `index` again.
    pub fn heal(&self, index: usize) -> Result<()> {
        self.member(index)?.proxy.heal();
        Ok(())
    }

    /// Cuts the client's connections to every member.
    pub fn cut_all(&self) {
        for member in &self.members {
            member.proxy.cut();
        }
    }

    /// Heals every proxy.
    pub fn heal_all(&self) {
        for member in &self.members {
            member.proxy.heal();
        }
    }

    /// The sum of every sample of the Prometheus metric `name` (e.g.
    /// `grpc_server_started_total`) whose labels contain all of `labels` (e.g.
    /// `grpc_method="LeaseKeepAlive"`), read from member `index`'s `/metrics` endpoint on its
    /// client port (not through the proxy; on a TLS cluster, from its plain metrics port).
    /// 0 when no sample matches.
    pub async fn metric(&self, index: usize, name: &str, labels: &[&str]) -> Result<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let member = self.member(index)?;
        let addr = match member.metrics_port {
            Some(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            None => member.client_addr(),
        };
        let fetch = async {
            let mut socket = tokio::net::TcpStream::connect(addr).await?;
            socket
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .await?;
            let mut body = String::new();
            socket.read_to_string(&mut body).await?;
            anyhow::Ok(body)
        };
        let body = timeout(Duration::from_secs(5), fetch)
            .await
            .context("reading etcd /metrics timed out")??;
        let mut total = 0.0;
        for line in body.lines().filter(|line| !line.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let metric = series.split('{').next().unwrap_or(series);
            if metric == name && labels.iter().all(|label| series.contains(label)) {
                total += value
                    .parse::<f64>()
                    .with_context(|| format!("metric line {line:?}"))?;
            }
        }
        Ok(total)
    }

    /// Revokes lease `id` from outside, through the harness's own client.
    pub async fn revoke_lease(&self, id: i64) -> Result<()> {
        let mut client = self.client().await?;
        client
            .lease_revoke(id)
            .await
            .with_context(|| format!("revoking lease {id:x}"))?;
        Ok(())
    }

    /// Every key under `prefix` with its create revision and lease id, oldest first.
    pub async fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, i64, i64)>> {
        let mut client = self.client().await?;
        let response = client
            .get(
                prefix.to_vec(),
                Some(GetOptions::new().with_prefix().with_sort(
                    etcd_client::SortTarget::Create,
                    etcd_client::SortOrder::Ascend,
                )),
            )
            .await?;
        Ok(response
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.create_revision(), kv.lease()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_node_serves_and_dies_on_drop() -> Result<()> {
        let cluster = EtcdCluster::single().await?;
        let mut client = cluster.client().await?;
        client.put("k", "v", None).await?;
        let pid = cluster.members()[0].pid();
        drop(client);
        drop(cluster);
        if let Some(pid) = pid {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists() || {
                    // A zombie is reaped by kill(); the entry vanishes right after.
                    std::thread::sleep(Duration::from_millis(50));
                    !Path::new(&format!("/proc/{pid}")).exists()
                }
            );
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_members_elect_and_survive_leader_kill() -> Result<()> {
        let cluster = EtcdCluster::start(3).await?;
        let old = cluster.kill_leader().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let new = loop {
            if let Ok(new) = cluster.leader().await {
                break new;
            }
            anyhow::ensure!(Instant::now() < deadline, "no new leader");
            sleep(Duration::from_millis(50)).await;
        };
        assert_ne!(old, new);
        cluster.restart(old).await?;
        let mut client = cluster.client().await?;
        client.put("k", "v", None).await?;
        Ok(())
    }
}
