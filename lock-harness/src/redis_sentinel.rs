//! Redis Sentinel for tests: one master, one replica and three sentinels (`redis-server
//! <conf> --sentinel`), all on free loopback ports in one temporary directory, with controls
//! to fail over, kill the master and restart a node.
//!
//! The sentinels monitor the master as `m` with quorum 2. By default a master is declared
//! down after 1 s without answers (`down-after-milliseconds`) and a failover may take 4 s
//! (`failover-timeout`), so a killed master is replaced in about 2-5 s.
//!
//! ```ignore
//! let set = SentinelSet::builder().wait_for_sentinels(true).start().await?;
//! let url = set.url();                 // redis+sentinel://127.0.0.1:a,…/m
//! let old = set.master_addr().await?;
//! set.kill_master().await?;
//! let new = set.wait_for_new_master(old, Duration::from_secs(20)).await?;
//! ```

use crate::process::{ProcessSlot, ServerProcess, find_binary, free_port, start_on_free_port};
use crate::proxy::TcpProxy;
#[cfg(feature = "redis-tls")]
use crate::redis_nodes::install_crypto_provider;
use crate::redis_nodes::{
    NodeTls as SetTls, QUERY_TIMEOUT, client_at, query, unbounded, wait_for_ping,
};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

/// The master name the sentinels monitor.
pub const MASTER_NAME: &str = "m";

/// How long a fresh node or sentinel may take to answer `PING`, and the replica to sync.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Options for [`SentinelSet`].
#[derive(Clone, Debug)]
pub struct SentinelSetBuilder {
    down_after: Duration,
    failover_timeout: Duration,
    proxy: bool,
    wait_for_sentinels: bool,
    tls: Option<SetTls>,
}

impl Default for SentinelSetBuilder {
    fn default() -> Self {
        SentinelSetBuilder {
            down_after: Duration::from_millis(1000),
            failover_timeout: Duration::from_millis(4000),
            proxy: false,
            wait_for_sentinels: false,
            tls: None,
        }
    }
}

impl SentinelSetBuilder {
    /// `down-after-milliseconds` (default 1 s): how long a silent master takes to be declared
    /// down. Tests that pause the master on purpose without wanting a failover set it long.
    pub fn down_after(mut self, down_after: Duration) -> Self {
        self.down_after = down_after;
        self
    }

    /// `failover-timeout` (default 4 s).
    pub fn failover_timeout(mut self, failover_timeout: Duration) -> Self {
        self.failover_timeout = failover_timeout;
        self
    }

    /// Put a [`TcpProxy`] in front of the first master: the sentinels monitor (and name to
    /// clients) the proxy's address, and the replica replicates through it, so cutting the
    /// proxy cuts every client of the master. Only until a failover: a promoted replica is
    /// named by its own address.
    pub fn proxy(mut self, proxy: bool) -> Self {
        self.proxy = proxy;
        self
    }

    /// Wait in `start` until every sentinel knows the replica and the two other sentinels
    /// (they find each other through hello messages every 2 s): needed before a failover,
    /// not to look up the master.
    pub fn wait_for_sentinels(mut self, wait: bool) -> Self {
        self.wait_for_sentinels = wait;
        self
    }

    /// TLS only, on every data node and sentinel (`--port 0 --tls-port N`, replication over
    /// TLS), with `pki`'s server certificate; client certificates signed by its CA are
    /// accepted, not required. [`SentinelSet::url`] is then `rediss+sentinel://`.
    #[cfg(feature = "redis-tls")]
    pub fn tls(mut self, pki: &crate::tls::TestPki) -> Self {
        self.tls = Some(SetTls {
            ca: pki.ca.clone(),
            server: pki.server.clone(),
            client: pki.client.clone(),
        });
        self
    }

    /// Starts the master, the replica (waits until it synced), then the sentinels.
    pub async fn start(self) -> Result<SentinelSet> {
        let binary = find_binary("redis-server", "redis-server", &[])?;
        let dir = tempfile::Builder::new()
            .prefix("distlock-sentinel-")
            .tempdir()
            .context("creating a temporary directory for the sentinel set")?;
        #[cfg(feature = "redis-tls")]
        install_crypto_provider();
        let mut set = SentinelSet {
            binary,
            dir,
            nodes: Vec::new(),
            sentinels: Vec::new(),
            proxy: None,
            builder: self.clone(),
        };
        set.add_node(None)?;
        let master = set.nodes[0].addr();
        let announced = if self.proxy {
            let proxy = TcpProxy::start(master)?;
            let addr = proxy.addr();
            set.proxy = Some(proxy);
            addr
        } else {
            master
        };
        set.add_node(Some(announced))?;
        set.wait_for_replica_link(1).await?;
        for index in 0..3 {
            set.add_sentinel(index, announced)?;
        }
        if self.wait_for_sentinels {
            set.wait_for_sentinels(START_TIMEOUT).await?;
        }
        Ok(set)
    }
}

/// A `redis-server` data node (master or replica).
#[derive(Debug)]
struct DataNode {
    port: u16,
    /// `--replicaof` at start; `None` for the first master.
    replica_of: Option<SocketAddr>,
    process: ProcessSlot,
    generation: std::sync::atomic::AtomicU32,
}

impl DataNode {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// A sentinel process.
#[derive(Debug)]
struct SentinelNode {
    port: u16,
    process: ServerProcess,
}

/// One master, one replica and three sentinels owned by a test; every process is killed
/// (and the directory removed) on drop.
#[derive(Debug)]
pub struct SentinelSet {
    binary: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<DataNode>,
    sentinels: Vec<SentinelNode>,
    proxy: Option<TcpProxy>,
    builder: SentinelSetBuilder,
}

impl SentinelSet {
    /// Options: timings, proxy, waiting for the sentinels.
    pub fn builder() -> SentinelSetBuilder {
        SentinelSetBuilder::default()
    }

    /// `redis+sentinel://127.0.0.1:<s1>,127.0.0.1:<s2>,127.0.0.1:<s3>/m` (database 0);
    /// `rediss+sentinel://…` with TLS.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinel_addrs()
            .iter()
            .map(ToString::to_string)
            .collect();
        let scheme = if self.builder.tls.is_some() {
            "rediss+sentinel"
        } else {
            "redis+sentinel"
        };
        format!("{scheme}://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The sentinels' addresses.
    pub fn sentinel_addrs(&self) -> Vec<SocketAddr> {
        self.sentinels
            .iter()
            .map(|sentinel| SocketAddr::from(([127, 0, 0, 1], sentinel.port)))
            .collect()
    }

    /// The data nodes' own addresses (index 0: the first master, 1: its replica).
    pub fn node_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(DataNode::addr).collect()
    }

    /// The proxy in front of the first master, if started with one.
    pub fn proxy(&self) -> Option<&TcpProxy> {
        self.proxy.as_ref()
    }

    /// A client straight to data node `index` (not through the proxy).
    pub fn node_client(&self, index: usize) -> Result<redis::Client> {
        let node = self.nodes.get(index).context("no such data node")?;
        self.client_at(node.addr())
    }

    /// The index of the data node at `addr` (the proxy's address means node 0).
    pub fn node_index(&self, addr: SocketAddr) -> Option<usize> {
        if self
            .proxy
            .as_ref()
            .is_some_and(|proxy| proxy.addr() == addr)
        {
            return Some(0);
        }
        self.nodes.iter().position(|node| node.addr() == addr)
    }

    /// The master's address as the first sentinel that answers names it.
    pub async fn master_addr(&self) -> Result<SocketAddr> {
        let mut last = None;
        for addr in self.sentinel_addrs() {
            match self
                .sentinel_query::<Option<(String, u16)>>(
                    addr,
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(MASTER_NAME),
                )
                .await
            {
                Ok(Some((host, port))) => {
                    return format!("{host}:{port}")
                        .parse()
                        .with_context(|| format!("sentinel named {host}:{port}"));
                }
                Ok(None) => last = Some(anyhow::anyhow!("sentinel {addr} knows no master")),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no sentinel")))
    }

    /// Asks a sentinel for a failover now (`SENTINEL FAILOVER m`: no agreement needed, the
    /// replica is promoted at once) and waits until the sentinels name the new master and it
    /// answers as one. Returns the new master's address.
    pub async fn failover(&self, within: Duration) -> Result<SocketAddr> {
        let old = self.master_addr().await?;
        let sentinel = *self.sentinel_addrs().first().context("no sentinel")?;
        let _: String = self
            .sentinel_query(
                sentinel,
                redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME),
            )
            .await
            .context("SENTINEL FAILOVER")?;
        self.wait_for_new_master(old, within).await
    }

    /// Kills the data node the sentinels name as master (SIGKILL). Returns its address.
    pub async fn kill_master(&mut self) -> Result<SocketAddr> {
        let master = self.master_addr().await?;
        let index = self
            .node_index(master)
            .with_context(|| format!("the master {master} is none of ours"))?;
        self.nodes[index].process.kill()?;
        Ok(master)
    }

    /// Starts data node `index` again on its port (after [`SentinelSet::kill_master`]); the
    /// sentinels then turn it into a replica of the current master.
    pub fn restart_node(&self, index: usize) -> Result<()> {
        self.nodes
            .get(index)
            .context("no such data node")?
            .process
            .kill()?;
        self.spawn_node(index)
    }

    /// Freezes data node `index` (SIGSTOP).
    pub fn pause_node(&self, index: usize) -> Result<()> {
        self.running(index, ServerProcess::pause)
    }

    /// Resumes data node `index` (SIGCONT).
    pub fn resume_node(&self, index: usize) -> Result<()> {
        self.running(index, ServerProcess::resume)
    }

    /// Freezes sentinel `index` (SIGSTOP): it keeps its connections and answers nothing.
    pub fn pause_sentinel(&self, index: usize) -> Result<()> {
        self.sentinels
            .get(index)
            .context("no such sentinel")?
            .process
            .pause()
    }

    /// Resumes a paused sentinel (SIGCONT).
    pub fn resume_sentinel(&self, index: usize) -> Result<()> {
        self.sentinels
            .get(index)
            .context("no such sentinel")?
            .process
            .resume()
    }

    /// Stops replication to data node `index` (a replica) without the sentinels noticing
    /// soon: it is pointed at a port where nothing listens (it keeps its data until it syncs
    /// with a master again), and the sentinels' `failover-timeout` is raised to 60 s, which
    /// is how long they leave a replica with the wrong master alone. Writes to the master
    /// from now on are not on this replica: a failover to it loses them.
    pub async fn detach_replica(&self, index: usize) -> Result<()> {
        for sentinel in self.sentinel_addrs() {
            let _: String = self
                .sentinel_query(
                    sentinel,
                    redis::cmd("SENTINEL")
                        .arg("SET")
                        .arg(MASTER_NAME)
                        .arg("failover-timeout")
                        .arg(60_000),
                )
                .await?;
        }
        let nowhere = free_port()?;
        let client = self.node_client(index)?;
        let _: String = query(
            &client,
            redis::cmd("REPLICAOF").arg("127.0.0.1").arg(nowhere),
        )
        .await?;
        Ok(())
    }

    /// Waits until every sentinel names the same master other than `old` and it answers
    /// `ROLE` as a master.
    pub async fn wait_for_new_master(
        &self,
        old: SocketAddr,
        within: Duration,
    ) -> Result<SocketAddr> {
        let deadline = Instant::now() + within;
        loop {
            let mut named = Vec::new();
            for sentinel in self.sentinel_addrs() {
                named.push(
                    self.sentinel_query::<Option<(String, u16)>>(
                        sentinel,
                        redis::cmd("SENTINEL")
                            .arg("GET-MASTER-ADDR-BY-NAME")
                            .arg(MASTER_NAME),
                    )
                    .await
                    .ok()
                    .flatten()
                    .and_then(|(host, port)| format!("{host}:{port}").parse::<SocketAddr>().ok()),
                );
            }
            if let Some(Some(addr)) = named.first().copied()
                && addr != old
                && named.iter().all(|other| *other == Some(addr))
                && self.is_master(addr).await
            {
                return Ok(addr);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the sentinels did not name a new master (old: {old}) within {within:?}\n{}",
                    self.sentinel_log_tail()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the server at `addr` answers `ROLE` as a master.
    pub async fn is_master(&self, addr: SocketAddr) -> bool {
        let Ok(client) = self.client_at(addr) else {
            return false;
        };
        matches!(
            query::<redis::Value>(&client, &mut redis::cmd("ROLE")).await,
            Ok(redis::Value::Array(items))
                if matches!(items.first(), Some(redis::Value::BulkString(role)) if role == b"master")
        )
    }

    /// Waits until data node `index` (a replica) reports its link to the master up and
    /// acknowledges a write made on the master (the first acknowledgement can come a while
    /// after the link is up, while the replica loads what it was sent).
    pub async fn wait_for_replica_link(&self, index: usize) -> Result<()> {
        let client = self.node_client(index)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let info: String = query(&client, redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default();
            if info.contains("master_link_status:up") {
                return self.wait_for_ack().await;
            }
            if Instant::now() >= deadline {
                bail!("replica {index} did not sync within {START_TIMEOUT:?}:\n{info}");
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes (and deletes) a key on the first master and waits until one replica has it.
    async fn wait_for_ack(&self) -> Result<()> {
        let client = self.node_client(0)?;
        let run = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&unbounded())
                .await?;
            redis::cmd("SET")
                .arg("distlock-harness:sync")
                .arg(1)
                .query_async::<()>(&mut conn)
                .await?;
            redis::cmd("DEL")
                .arg("distlock-harness:sync")
                .query_async::<()>(&mut conn)
                .await?;
            redis::cmd("WAIT")
                .arg(1)
                .arg(START_TIMEOUT.as_millis() as u64)
                .query_async::<u32>(&mut conn)
                .await
        };
        match timeout(START_TIMEOUT + QUERY_TIMEOUT, run).await {
            Ok(Ok(acked)) if acked >= 1 => Ok(()),
            Ok(Ok(_)) => bail!("the replica did not acknowledge a write within {START_TIMEOUT:?}"),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => bail!("WAIT on the master did not answer"),
        }
    }

    /// Waits until every sentinel knows at least one replica and the two other sentinels.
    pub async fn wait_for_sentinels(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        for sentinel in self.sentinel_addrs() {
            loop {
                let fields: Vec<String> = self
                    .sentinel_query(
                        sentinel,
                        redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME),
                    )
                    .await
                    .unwrap_or_default();
                let field = |name: &str| {
                    fields
                        .iter()
                        .position(|field| field == name)
                        .and_then(|at| fields.get(at + 1))
                        .and_then(|value| value.parse::<u32>().ok())
                        .unwrap_or(0)
                };
                if field("num-slaves") >= 1 && field("num-other-sentinels") >= 2 {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "sentinel {sentinel} did not find its peers within {within:?}: {fields:?}"
                    );
                }
                sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// The last lines of every sentinel's log (for failure messages).
    pub fn sentinel_log_tail(&self) -> String {
        self.sentinels
            .iter()
            .map(|sentinel| {
                format!(
                    "sentinel {}:\n{}",
                    sentinel.port,
                    sentinel.process.log_tail()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn running(&self, index: usize, action: fn(&ServerProcess) -> Result<()>) -> Result<()> {
        let node = self.nodes.get(index).context("no such data node")?;
        let process = node.process.lock();
        action(
            process
                .as_ref()
                .with_context(|| format!("data node {index} is not running"))?,
        )
    }

    fn add_node(&mut self, replica_of: Option<SocketAddr>) -> Result<()> {
        self.nodes.push(DataNode {
            port: free_port()?,
            replica_of,
            process: ProcessSlot::default(),
            generation: std::sync::atomic::AtomicU32::new(0),
        });
        let index = self.nodes.len() - 1;
        let first = self.nodes[index].port;
        start_on_free_port(first, |port| {
            self.nodes[index].port = port;
            self.spawn_node(index)
        })
    }

    fn spawn_node(&self, index: usize) -> Result<()> {
        let dir = self.dir.path().join(format!("node-{index}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
        let node = self.nodes.get(index).context("no such data node")?;
        let mut command = Command::new(&self.binary);
        command.current_dir(&dir);
        #[cfg(feature = "redis-tls")]
        if let Some(tls) = &self.builder.tls {
            crate::redis_nodes::tls_server_args(
                &mut command,
                node.port,
                &tls.server,
                &tls.ca.cert_path,
                "optional",
            );
            command.arg("--tls-replication").arg("yes");
        }
        if self.builder.tls.is_none() {
            command.arg("--port").arg(node.port.to_string());
        }
        command
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&dir)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--daemonize")
            .arg("no")
            .arg("--protected-mode")
            .arg("no")
            // A replica syncs at once instead of after the default 5 s of waiting for more.
            .arg("--repl-diskless-sync-delay")
            .arg("0");
        if let Some(master) = node.replica_of {
            command
                .arg("--replicaof")
                .arg(master.ip().to_string())
                .arg(master.port().to_string());
        }
        let generation = node
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let log = dir.join(format!("redis-{generation}.log"));
        let mut process = ServerProcess::spawn("redis-server", command, &log)?;
        if let Err(error) = wait_for_ping(
            node.addr(),
            self.builder.tls.as_ref(),
            &mut process,
            START_TIMEOUT,
        ) {
            bail!("{error:#}\nredis-server log:\n{}", process.log_tail());
        }
        *node.process.lock() = Some(process);
        Ok(())
    }

    fn add_sentinel(&mut self, index: usize, master: SocketAddr) -> Result<()> {
        let dir = self.dir.path().join(format!("sentinel-{index}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
        let builder = self.builder.clone();
        let binary = self.binary.clone();
        let sentinel = start_on_free_port(free_port()?, |port| {
            // Sentinel rewrites its configuration file (it must be writable, and is per
            // sentinel).
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {dir}\n\
                     sentinel monitor {MASTER_NAME} {ip} {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} {down}\n\
                     sentinel failover-timeout {MASTER_NAME} {failover}\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir = dir.display(),
                    ip = master.ip(),
                    master_port = master.port(),
                    down = builder.down_after.as_millis(),
                    failover = builder.failover_timeout.as_millis(),
                ),
            )
            .with_context(|| format!("writing {conf:?}"))?;
            #[cfg(feature = "redis-tls")]
            if let Some(tls) = &builder.tls {
                // TLS only: the client port is the TLS port; the sentinels talk TLS to the
                // data nodes too.
                let mut text = std::fs::read_to_string(&conf)?;
                text = text.replacen(&format!("port {port}\n"), "port 0\n", 1);
                text.push_str(&format!(
                    "tls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                     tls-auth-clients optional\ntls-replication yes\n",
                    tls.server.cert_path.display(),
                    tls.server.key_path.display(),
                    tls.ca.cert_path.display(),
                ));
                std::fs::write(&conf, text).with_context(|| format!("writing {conf:?}"))?;
            }
            let mut command = Command::new(&binary);
            command.current_dir(&dir).arg(&conf).arg("--sentinel");
            let log = dir.join(format!("sentinel-{port}.log"));
            let mut process = ServerProcess::spawn("redis-sentinel", command, &log)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if let Err(error) =
                wait_for_ping(addr, builder.tls.as_ref(), &mut process, START_TIMEOUT)
            {
                bail!("{error:#}\nsentinel log:\n{}", process.log_tail());
            }
            Ok(SentinelNode { port, process })
        })?;
        self.sentinels.push(sentinel);
        Ok(())
    }
}

impl SentinelSet {
    /// `cmd` on the sentinel at `addr`, bounded by [`QUERY_TIMEOUT`].
    async fn sentinel_query<T: redis::FromRedisValue>(
        &self,
        addr: SocketAddr,
        cmd: &mut redis::Cmd,
    ) -> Result<T> {
        let client = self.client_at(addr)?;
        query(&client, cmd)
            .await
            .with_context(|| format!("sentinel {addr}"))
    }

    /// A client of the harness's own for the node or sentinel at `addr` (database 0; with
    /// TLS trusting the test CA and presenting the test client certificate).
    fn client_at(&self, addr: SocketAddr) -> Result<redis::Client> {
        client_at(addr, self.builder.tls.as_ref())
    }
}
