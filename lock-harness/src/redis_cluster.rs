//! Redis Cluster for tests: three masters and three replicas (`cluster-enabled yes`) on free
//! loopback ports in one temporary directory, joined as `redis-cli --cluster create
//! --cluster-replicas 1` would (without its one-second polling), with controls to pause,
//! kill and restart nodes.
//!
//! By default a node is declared failed after 1 s without answers (`cluster-node-timeout`),
//! so a killed master's replica takes over within a few seconds.
//!
//! ```ignore
//! let cluster = RedisCluster::builder().start().await?;
//! let url = cluster.url();              // redis+cluster://127.0.0.1:a,…
//! let index = cluster.master_of_slot(1234).await?;
//! cluster.kill_node(index)?;
//! cluster.wait_for_failover(index, Duration::from_secs(30)).await?;
//! let promoted = cluster.master_of_slot(1234).await?;
//! ```

use crate::process::{ServerProcess, find_binary, free_port, start_on_free_port};
use crate::proxy::TcpProxy;
use crate::redis_nodes::{NodeTls as ClusterTls, client_at, query, wait_for_ping};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use tokio::time::{Instant, sleep};

/// How long a fresh node may take to answer `PING`, and the cluster to agree on its slots.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Options for [`RedisCluster`].
#[derive(Clone, Debug)]
pub struct RedisClusterBuilder {
    tls: Option<ClusterTls>,
    node_timeout: Duration,
    replicas: bool,
    proxy: bool,
    pooled: bool,
}

impl Default for RedisClusterBuilder {
    fn default() -> Self {
        RedisClusterBuilder {
            node_timeout: Duration::from_millis(1000),
            replicas: true,
            proxy: false,
            pooled: false,
            tls: None,
        }
    }
}

impl RedisClusterBuilder {
    /// `cluster-node-timeout` (default 1 s): how long a silent node takes to be declared
    /// failed. Tests that pause nodes on purpose without wanting a failover set it long.
    pub fn node_timeout(mut self, node_timeout: Duration) -> Self {
        self.node_timeout = node_timeout;
        self
    }

    /// One replica per master (default): needed for a node failure to fail over. Without,
    /// the cluster is three masters (half the processes, for tests that kill no node).
    pub fn replicas(mut self, replicas: bool) -> Self {
        self.replicas = replicas;
        self
    }

    /// Put a [`TcpProxy`] in front of every node and have each node announce the proxy's
    /// port as its address (`cluster-announce-port`; the cluster bus stays direct): the slot
    /// map, `MOVED` answers and replicas then all go through the proxies, so cutting them cuts
    /// every client (and replication). [`RedisCluster::url`] lists the proxies.
    pub fn proxy(mut self, proxy: bool) -> Self {
        self.proxy = proxy;
        self
    }

    /// Started by a [`ClusterPool`]: nodes die with the pool's thread.
    /// TLS only, for clients, replication and the cluster bus (`--port 0 --tls-port N
    /// --tls-cluster yes --tls-replication yes`), with `pki`'s server certificate; client
    /// certificates signed by its CA are accepted, not required. [`RedisCluster::url`] is then
    /// `rediss+cluster://`. Not with [`Self::proxy`] (the nodes would announce the proxies as
    /// plain-text ports).
    #[cfg(feature = "redis-tls")]
    pub fn tls(mut self, pki: &crate::tls::TestPki) -> Self {
        self.tls = Some(ClusterTls {
            ca: pki.ca.clone(),
            server: pki.server.clone(),
            client: pki.client.clone(),
        });
        self
    }

    fn pooled(mut self, pooled: bool) -> Self {
        self.pooled = pooled;
        self
    }

    /// Starts six nodes (three without replicas), joins them into a cluster of three
    /// masters with one replica each, and waits until every node reports the cluster `ok`
    /// and every replica synced.
    pub async fn start(self) -> Result<RedisCluster> {
        let binary = find_binary("redis-server", "redis-server", &[])?;
        // A pooled cluster's directory names this process, so that a later pool can remove
        // the ones a finished process left behind (it never dropped its unused clusters).
        let prefix = if self.pooled {
            format!("{POOL_DIR_PREFIX}{}-", std::process::id())
        } else {
            "distlock-cluster-".to_owned()
        };
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .context("creating a temporary directory for the cluster")?;
        let mut cluster = RedisCluster {
            binary,
            dir,
            nodes: Vec::new(),
            builder: self.clone(),
        };
        let count = if self.replicas { 6 } else { 3 };
        for index in 0..count {
            cluster.nodes.push(ClusterNode {
                port: 0,
                bus_port: 0,
                process: None,
                generation: 0,
                proxy: None,
            });
            start_on_free_port(free_port()?, |port| {
                cluster.nodes[index].port = port;
                // The bus port too is below the ephemeral range (the default, port + 10000,
                // often lands in it, where outgoing connections take ports).
                cluster.nodes[index].bus_port = free_port()?;
                cluster.nodes[index].proxy = if self.proxy {
                    Some(TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], port)))?)
                } else {
                    None
                };
                cluster.spawn_node(index)
            })?;
        }
        cluster.join().await?;
        cluster.wait_until_ok(START_TIMEOUT).await?;
        Ok(cluster)
    }
}

/// Clusters started ahead of the tests that take them, on a thread of its own, a few at a
/// time. A cluster's masters accept writes only 2 s after they start
/// (`CLUSTER_WRITABLE_DELAY`); a test suite that starts a cluster per test at two test threads
/// spends most of its time waiting for that. Every node is started through `setpriv
/// --pdeathsig KILL`, so clusters still waiting in the pool when the test process exits are
/// killed with it; their temporary directories stay behind until the next pool starts.
///
/// ```ignore
/// static POOL: LazyLock<ClusterPool> = LazyLock::new(|| ClusterPool::new(RedisCluster::builder(), 4));
/// let cluster = POOL.take().await?;
/// ```
#[derive(Debug)]
pub struct ClusterPool {
    ready: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Result<RedisCluster>>>,
}

impl ClusterPool {
    /// Starts the pool's thread: it keeps up to `ahead` clusters starting or ready. Removes
    /// the directories of clusters that earlier test processes left in their pools.
    pub fn new(builder: RedisClusterBuilder, ahead: usize) -> Self {
        remove_dirs_of_finished_pools();
        let (sender, ready) = tokio::sync::mpsc::channel(ahead.max(1));
        let started = std::thread::Builder::new()
            .name("redis-cluster-pool".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = sender.blocking_send(Err(error.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    // Each start holds a slot of the channel from its beginning, so at most
                    // `ahead` clusters are starting or waiting at any time.
                    while let Ok(permit) = sender.clone().reserve_owned().await {
                        let builder = builder.clone().pooled(true);
                        tokio::spawn(async move {
                            permit.send(builder.start().await);
                        });
                    }
                });
            });
        if let Err(error) = started {
            tracing::warn!(%error, "could not start the cluster pool thread");
        }
        ClusterPool {
            ready: tokio::sync::Mutex::new(ready),
        }
    }

    /// The next cluster (started by the pool, ready to use).
    pub async fn take(&self) -> Result<RedisCluster> {
        self.ready
            .lock()
            .await
            .recv()
            .await
            .context("the cluster pool's thread ended")?
    }
}

/// How pooled clusters' temporary directories start: this, the process id, a dash.
const POOL_DIR_PREFIX: &str = "distlock-cluster-pool-";

/// Removes pooled clusters' directories whose process is gone (its nodes died with it).
fn remove_dirs_of_finished_pools() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(POOL_DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One `redis-server` of the cluster.
#[derive(Debug)]
struct ClusterNode {
    port: u16,
    /// The cluster bus port (`cluster-port`).
    bus_port: u16,
    process: Option<ServerProcess>,
    generation: u32,
    proxy: Option<TcpProxy>,
}

impl ClusterNode {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// What the node announces: its proxy's address, or its own.
    fn announced(&self) -> SocketAddr {
        self.proxy
            .as_ref()
            .map_or_else(|| self.addr(), TcpProxy::addr)
    }
}

/// A node as `CLUSTER NODES` describes it.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// The node's address.
    pub addr: SocketAddr,
    /// Whether it is a master (else a replica).
    pub master: bool,
    /// Whether it is flagged `fail` (or `fail?`).
    pub failing: bool,
    /// The slot ranges it serves (masters).
    pub slots: Vec<(u16, u16)>,
}

/// Six `redis-server` processes in cluster mode owned by a test; killed (and the directory
/// removed) on drop.
#[derive(Debug)]
pub struct RedisCluster {
    binary: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<ClusterNode>,
    builder: RedisClusterBuilder,
}

impl RedisCluster {
    /// Options: node timeout.
    pub fn builder() -> RedisClusterBuilder {
        RedisClusterBuilder::default()
    }

    /// `redis+cluster://` with every node as a seed (through the proxies when there are).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|node| node.announced().to_string())
            .collect();
        let scheme = if self.builder.tls.is_some() {
            "rediss+cluster"
        } else {
            "redis+cluster"
        };
        format!("{scheme}://{}", hosts.join(","))
    }

    /// The nodes' addresses, by index.
    pub fn node_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(ClusterNode::addr).collect()
    }

    /// The index of the node at `addr` (its own address or its proxy's).
    pub fn node_index(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes
            .iter()
            .position(|node| node.addr() == addr || node.announced() == addr)
    }

    /// The proxies in front of the nodes (none unless started with
    /// [`RedisClusterBuilder::proxy`]).
    pub fn proxies(&self) -> Vec<&TcpProxy> {
        self.nodes
            .iter()
            .filter_map(|node| node.proxy.as_ref())
            .collect()
    }

    /// A client straight to node `index`.
    pub fn node_client(&self, index: usize) -> Result<redis::Client> {
        let node = self.nodes.get(index).context("no such node")?;
        client_at(node.addr(), self.builder.tls.as_ref())
    }

    /// `CLUSTER NODES` as node `index` sees it.
    pub async fn topology(&self, index: usize) -> Result<Vec<NodeView>> {
        let text: String = query(
            &self.node_client(index)?,
            redis::cmd("CLUSTER").arg("NODES"),
        )
        .await?;
        let mut views = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            let addr = addr.split('@').next().unwrap_or_default();
            let Ok(addr) = addr.parse::<SocketAddr>() else {
                continue;
            };
            let slots = fields
                .iter()
                .skip(8)
                .filter(|field| !field.starts_with('['))
                .filter_map(|range| {
                    let (low, high) = range.split_once('-').unwrap_or((range, range));
                    Some((low.parse().ok()?, high.parse().ok()?))
                })
                .collect();
            views.push(NodeView {
                addr,
                master: flags.contains("master"),
                failing: flags.contains("fail"),
                slots,
            });
        }
        Ok(views)
    }

    /// The index of the master serving `slot`, as the first live node sees it.
    pub async fn master_of_slot(&self, slot: u16) -> Result<usize> {
        let views = self.topology(self.live_index()?).await?;
        let owner = views
            .iter()
            .find(|view| {
                view.master
                    && !view.failing
                    && view
                        .slots
                        .iter()
                        .any(|(low, high)| (*low..=*high).contains(&slot))
            })
            .with_context(|| format!("no master serves slot {slot}"))?;
        self.node_index(owner.addr)
            .with_context(|| format!("{} is none of ours", owner.addr))
    }

    /// The indexes of the masters that serve slots, as the first live node sees it.
    pub async fn masters(&self) -> Result<Vec<usize>> {
        let views = self.topology(self.live_index()?).await?;
        Ok(views
            .iter()
            .filter(|view| view.master && !view.failing && !view.slots.is_empty())
            .filter_map(|view| self.node_index(view.addr))
            .collect())
    }

    /// Kills node `index` (SIGKILL).
    pub fn kill_node(&mut self, index: usize) -> Result<()> {
        if let Some(mut process) = self.nodes.get_mut(index).and_then(|n| n.process.take()) {
            process.kill()?;
        }
        Ok(())
    }

    /// Starts node `index` again on its port with its cluster configuration: it rejoins
    /// (a former master as a replica of the one that replaced it).
    pub fn restart_node(&mut self, index: usize) -> Result<()> {
        self.kill_node(index)?;
        self.spawn_node(index)
    }

    /// Freezes node `index` (SIGSTOP).
    pub fn pause_node(&self, index: usize) -> Result<()> {
        self.nodes
            .get(index)
            .and_then(|node| node.process.as_ref())
            .with_context(|| format!("node {index} is not running"))?
            .pause()
    }

    /// Resumes node `index` (SIGCONT).
    pub fn resume_node(&self, index: usize) -> Result<()> {
        self.nodes
            .get(index)
            .and_then(|node| node.process.as_ref())
            .with_context(|| format!("node {index} is not running"))?
            .resume()
    }

    /// The index of a replica of master `index` (from the master's `INFO replication`).
    pub async fn replica_of(&self, index: usize) -> Result<usize> {
        let info: String = query(
            &self.node_client(index)?,
            redis::cmd("INFO").arg("replication"),
        )
        .await?;
        let port = info
            .lines()
            .filter(|line| line.starts_with("slave"))
            .find_map(|line| {
                line.split(',')
                    .find_map(|field| field.strip_prefix("port="))
                    .and_then(|port| port.parse::<u16>().ok())
            })
            .with_context(|| format!("node {index} has no replica:\n{info}"))?;
        self.nodes
            .iter()
            .position(|node| node.port == port || node.announced().port() == port)
            .with_context(|| format!("the replica on port {port} is none of ours"))
    }

    /// Freezes every node (SIGSTOP).
    pub fn pause_all(&self) -> Result<()> {
        self.running().try_for_each(ServerProcess::pause)
    }

    /// Resumes every node (SIGCONT).
    pub fn resume_all(&self) -> Result<()> {
        self.running().try_for_each(ServerProcess::resume)
    }

    /// Waits until three masters other than node `killed` serve every slot and the cluster
    /// is `ok` again on every live node (after killing `killed`, its replica took over).
    pub async fn wait_for_failover(&self, killed: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let killed_addr = self.nodes.get(killed).context("no such node")?.addr();
        loop {
            if let Ok(masters) = self.masters().await
                && masters.len() == 3
                && !masters.contains(&killed)
                && self.all_ok().await
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("no replica replaced {killed_addr} within {within:?}");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every live node reports `cluster_state:ok`, three masters serve all
    /// 16 384 slots and every replica's link to its master is up.
    pub async fn wait_until_ok(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self.all_ok().await && self.replicas_synced().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let info: String = query(
                    &self.node_client(self.live_index()?)?,
                    redis::cmd("CLUSTER").arg("INFO"),
                )
                .await
                .unwrap_or_default();
                bail!("the cluster was not ok within {within:?}:\n{info}");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every live master's replicas have acknowledged all it has written (its
    /// `master_repl_offset` reached by each `slaveN` offset).
    pub async fn wait_for_replication(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        for master in self.masters().await? {
            let client = self.node_client(master)?;
            loop {
                let info: String = query(&client, redis::cmd("INFO").arg("replication"))
                    .await
                    .unwrap_or_default();
                let offset = info
                    .lines()
                    .find_map(|line| line.strip_prefix("master_repl_offset:"))
                    .and_then(|value| value.trim().parse::<u64>().ok());
                let replicas: Vec<u64> = info
                    .lines()
                    .filter(|line| line.starts_with("slave") && line.contains("offset="))
                    .filter_map(|line| {
                        line.split(',')
                            .find_map(|field| field.strip_prefix("offset="))
                            .and_then(|value| value.parse().ok())
                    })
                    .collect();
                if let Some(offset) = offset
                    && !replicas.is_empty()
                    && replicas.iter().all(|replica| *replica >= offset)
                {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("the replicas of node {master} did not catch up:\n{info}");
                }
                sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Joins the nodes as `redis-cli --cluster create --cluster-replicas 1` would, without
    /// its one-second polling: distinct config epochs, the slots in three ranges on nodes
    /// 0-2, `CLUSTER MEET` with node 0 (its own bus port), then nodes 3-5 replicate 0-2 once they know them.
    async fn join(&self) -> Result<()> {
        let count = self.nodes.len();
        let mut ids = Vec::with_capacity(count);
        for index in 0..count {
            let client = self.node_client(index)?;
            let _: String = query(
                &client,
                redis::cmd("CLUSTER").arg("SET-CONFIG-EPOCH").arg(index + 1),
            )
            .await
            .with_context(|| format!("CLUSTER SET-CONFIG-EPOCH on node {index}"))?;
            ids.push(query::<String>(&client, redis::cmd("CLUSTER").arg("MYID")).await?);
        }
        let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
        for (index, (low, high)) in ranges.into_iter().enumerate() {
            let _: String = query(
                &self.node_client(index)?,
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(low)
                    .arg(high),
            )
            .await
            .with_context(|| format!("CLUSTER ADDSLOTSRANGE on node {index}"))?;
        }
        let first = self.nodes[0].addr();
        for index in 1..count {
            let _: String = query(
                &self.node_client(index)?,
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg(first.ip().to_string())
                    .arg(first.port())
                    .arg(self.nodes[0].bus_port),
            )
            .await
            .with_context(|| format!("CLUSTER MEET on node {index}"))?;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for index in 3..count {
            let master = &ids[index - 3];
            loop {
                let answer: Result<String> = query(
                    &self.node_client(index)?,
                    redis::cmd("CLUSTER").arg("REPLICATE").arg(master),
                )
                .await;
                match answer {
                    Ok(_) => break,
                    // "Unknown node": the handshake with that master is not done yet.
                    Err(error) if Instant::now() < deadline => {
                        tracing::debug!(%error, "CLUSTER REPLICATE not yet");
                        sleep(Duration::from_millis(20)).await;
                    }
                    Err(error) => {
                        return Err(error.context(format!("node {index} never replicated")));
                    }
                }
            }
        }
        Ok(())
    }

    async fn all_ok(&self) -> bool {
        for (index, node) in self.nodes.iter().enumerate() {
            if node.process.is_none() {
                continue;
            }
            let Ok(client) = self.node_client(index) else {
                return false;
            };
            let info: String = query(&client, redis::cmd("CLUSTER").arg("INFO"))
                .await
                .unwrap_or_default();
            if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                return false;
            }
        }
        true
    }

    async fn replicas_synced(&self) -> bool {
        for (index, node) in self.nodes.iter().enumerate() {
            if node.process.is_none() {
                continue;
            }
            let Ok(client) = self.node_client(index) else {
                return false;
            };
            let info: String = query(&client, redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default();
            if info.contains("role:slave") && !info.contains("master_link_status:up") {
                return false;
            }
        }
        true
    }

    fn live_index(&self) -> Result<usize> {
        self.nodes
            .iter()
            .position(|node| node.process.is_some())
            .context("no node is running")
    }

    fn running(&self) -> impl Iterator<Item = &ServerProcess> {
        self.nodes.iter().filter_map(|node| node.process.as_ref())
    }

    fn spawn_node(&mut self, index: usize) -> Result<()> {
        let dir = self.dir.path().join(format!("node-{index}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
        let node_timeout = self.builder.node_timeout.as_millis().to_string();
        let node = self.nodes.get_mut(index).context("no such node")?;
        let mut command = if self.builder.pooled {
            // The kernel kills the node when the thread that started it (the pool's, which
            // lives as long as the test process) ends.
            let mut command = Command::new(find_binary("setpriv", "util-linux", &[])?);
            command.arg("--pdeathsig").arg("KILL").arg(&self.binary);
            command
        } else {
            Command::new(&self.binary)
        };
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
            command
                .arg("--tls-replication")
                .arg("yes")
                .arg("--tls-cluster")
                .arg("yes");
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
            .arg("--cluster-enabled")
            .arg("yes")
            .arg("--cluster-config-file")
            .arg(dir.join("nodes.conf"))
            .arg("--cluster-port")
            .arg(node.bus_port.to_string())
            .arg("--cluster-node-timeout")
            .arg(&node_timeout)
            // A replica syncs at once instead of after the default 5 s of waiting for more.
            .arg("--repl-diskless-sync-delay")
            .arg("0");
        node.generation += 1;
        let log = dir.join(format!("redis-{}.log", node.generation));
        if let Some(proxy) = &node.proxy {
            // Clients (and replicas) are sent to the proxy; the cluster bus stays direct.
            command
                .arg("--cluster-announce-ip")
                .arg("127.0.0.1")
                .arg("--cluster-announce-port")
                .arg(proxy.addr().port().to_string())
                .arg("--cluster-announce-bus-port")
                .arg(node.bus_port.to_string());
        }
        let mut process = ServerProcess::spawn("redis-server", command, &log)?;
        if let Err(error) = wait_for_ping(
            node.addr(),
            self.builder.tls.as_ref(),
            &mut process,
            START_TIMEOUT,
        ) {
            bail!("{error:#}\nredis-server log:\n{}", process.log_tail());
        }
        node.process = Some(process);
        Ok(())
    }
}
