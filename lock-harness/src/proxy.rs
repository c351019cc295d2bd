//! A TCP proxy between a client and a server that can cut, black-hole, heal and delay.
//!
//! It runs on its own thread and runtime, so it outlives any one test's runtime and keeps
//! working while a test's runtime is busy.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways (after the configured delay).
    Forward,
    /// Network partition: accept connections but forward nothing; bytes wait until healed.
    /// The client sees a silent peer, not an error.
    Blackhole,
    /// Refuse: close every open connection and close new ones at once. The client sees a
    /// reset, as when the server's host goes away.
    Refuse,
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    mode: ProxyMode,
    delay: Duration,
    /// Client-to-server chunks wait this instead of `delay` when set (see `set_delays`).
    upstream_delay: Option<Duration>,
    /// Connections numbered below this forward nothing, ever (see `forget_flows`).
    forgotten_below: u64,
    /// Connections numbered below this forward nothing until released (see `hold_flows`).
    held_below: u64,
}

/// A proxy listening on a free loopback port and forwarding to `upstream`.
#[derive(Debug)]
pub struct TcpProxy {
    listen: SocketAddr,
    upstream: SocketAddr,
    settings: watch::Sender<Settings>,
    // Cancelled by `Refuse`, replaced on heal: closes every connection opened before.
    connections: Arc<Mutex<CancellationToken>>,
    shutdown: CancellationToken,
    next_connection: Arc<AtomicU64>,
}

impl TcpProxy {
    /// Starts a proxy to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the proxy port")?;
        std_listener.set_nonblocking(true)?;
        let listen = std_listener.local_addr()?;
        let (settings, settings_rx) = watch::channel(Settings {
            mode: ProxyMode::Forward,
            delay: Duration::ZERO,
            upstream_delay: None,
            forgotten_below: 0,
            held_below: 0,
        });
        let connections = Arc::new(Mutex::new(CancellationToken::new()));
        let shutdown = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the proxy runtime")?;
        let thread_connections = connections.clone();
        let thread_shutdown = shutdown.clone();
        let next_connection = Arc::new(AtomicU64::new(0));
        let thread_next = next_connection.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{listen}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    accept_loop(
                        listener,
                        upstream,
                        settings_rx,
                        thread_connections,
                        thread_shutdown,
                        thread_next,
                    )
                    .await;
                });
            })
            .context("spawning the proxy thread")?;
        Ok(TcpProxy {
            listen,
            upstream,
            settings,
            connections,
            shutdown,
            next_connection,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// Where the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Sets the mode. `Refuse` closes every open connection.
    pub fn set_mode(&self, mode: ProxyMode) {
        if mode == ProxyMode::Refuse {
            let mut token = lock(&self.connections);
            token.cancel();
            *token = CancellationToken::new();
        }
        self.settings.send_modify(|settings| settings.mode = mode);
    }

    /// Closes every connection and refuses new ones until healed.
    pub fn cut(&self) {
        self.set_mode(ProxyMode::Refuse);
    }

    /// Stops forwarding without closing anything (a silent partition) until healed.
    pub fn blackhole(&self) {
        self.set_mode(ProxyMode::Blackhole);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.set_mode(ProxyMode::Forward);
    }

    /// Every connection open now goes silent for good — nothing forwarded, nothing closed —
    /// while new connections work: what a client sees when a NAT or firewall on the path
    /// drops its flow state. Only a client that notices a silent peer and reconnects recovers.
    pub fn forget_flows(&self) {
        let next = self.next_connection.load(Ordering::SeqCst);
        self.settings
            .send_modify(|settings| settings.forgotten_below = next);
    }

    /// Every connection open now stalls — its bytes wait, nothing is closed — while new
    /// connections work, until [`TcpProxy::release_flows`] forwards what waited: a path
    /// that stalls one flow and later delivers its retransmitted bytes, after a client that
    /// gave up on that connection sent newer commands on another one.
    pub fn hold_flows(&self) {
        let next = self.next_connection.load(Ordering::SeqCst);
        self.settings
            .send_modify(|settings| settings.held_below = next);
    }

    /// Forwards what the connections held by [`TcpProxy::hold_flows`] have waiting, and
    /// everything after it.
    pub fn release_flows(&self) {
        self.settings
            .send_modify(|settings| settings.held_below = 0);
    }

    /// Delays every forwarded chunk by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.settings.send_modify(|settings| {
            settings.delay = delay;
            settings.upstream_delay = None;
        });
    }

    /// Delays client-to-server chunks by `upstream` and server-to-client chunks by
    /// `downstream`: e.g. requests that stay outstanding while the server's pushes (pub/sub
    /// messages) still arrive at once.
    pub fn set_delays(&self, upstream: Duration, downstream: Duration) {
        self.settings.send_modify(|settings| {
            settings.delay = downstream;
            settings.upstream_delay = Some(upstream);
        });
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        lock(&self.connections).cancel();
        self.shutdown.cancel();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    settings: watch::Receiver<Settings>,
    connections: Arc<Mutex<CancellationToken>>,
    shutdown: CancellationToken,
    next_connection: Arc<AtomicU64>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        if settings.borrow().mode == ProxyMode::Refuse {
            drop(client);
            continue;
        }
        let closed = lock(&connections).clone();
        let settings = settings.clone();
        let id = next_connection.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(id, true, client_read, server_write, settings.clone());
            let down = pump(id, false, server_read, client_write, settings);
            tokio::select! {
                _ = closed.cancelled() => {}
                _ = async { tokio::join!(up, down) } => {}
            }
        });
    }
}

/// Waits while connection `id` may not forward (black hole, a forgotten or held flow); false
/// when it must close (refused, or the proxy is gone).
async fn may_forward(id: u64, settings: &mut watch::Receiver<Settings>) -> bool {
    loop {
        let (mode, forgotten) = {
            let current = settings.borrow();
            (
                current.mode,
                id < current.forgotten_below || id < current.held_below,
            )
        };
        match mode {
            ProxyMode::Refuse => return false,
            ProxyMode::Forward if !forgotten => return true,
            ProxyMode::Forward | ProxyMode::Blackhole => {
                if settings.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn pump(
    id: u64,
    upstream: bool,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut settings: watch::Receiver<Settings>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // Wait out a black hole before reading more, so bytes queue up in the kernel.
        if !may_forward(id, &mut settings).await {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(read) => read,
        };
        let delay = {
            let current = settings.borrow();
            match current.upstream_delay {
                Some(delay) if upstream => delay,
                _ => current.delay,
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // A chunk read just before a black hole is held until healed.
        if !may_forward(id, &mut settings).await {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A proxy that models a network link with a fixed latency each way: every chunk is
/// forwarded that long after it was read, and chunks in flight overlap, as on a real link.
/// ([`TcpProxy::set_delay`] instead delays each chunk after the one before it was written,
/// so the delays of a burst of writes add up, as on a slow, narrow link.) For tests that
/// count round trips.
#[derive(Debug)]
pub struct LinkProxy {
    listen: SocketAddr,
    shutdown: CancellationToken,
}

impl LinkProxy {
    /// Starts a proxy to `upstream`: client-to-server bytes arrive `upstream_latency` after
    /// they were sent, server-to-client bytes `downstream_latency` after.
    pub fn start(
        upstream: SocketAddr,
        upstream_latency: Duration,
        downstream_latency: Duration,
    ) -> Result<Self> {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the proxy port")?;
        std_listener.set_nonblocking(true)?;
        let listen = std_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the proxy runtime")?;
        let thread_shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name(format!("link-{listen}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    loop {
                        let accepted = tokio::select! {
                            _ = thread_shutdown.cancelled() => return,
                            accepted = listener.accept() => accepted,
                        };
                        let Ok((client, _)) = accepted else { continue };
                        let shutdown = thread_shutdown.clone();
                        tokio::spawn(async move {
                            let Ok(server) = TcpStream::connect(upstream).await else {
                                return;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            let (client_read, client_write) = client.into_split();
                            let (server_read, server_write) = server.into_split();
                            let up = link(client_read, server_write, upstream_latency);
                            let down = link(server_read, client_write, downstream_latency);
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = async { tokio::join!(up, down) } => {}
                            }
                        });
                    }
                });
            })
            .context("spawning the proxy thread")?;
        Ok(LinkProxy { listen, shutdown })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One direction of a [`LinkProxy`] connection: reads go on at once; each chunk is written
/// `latency` after it was read, in order.
async fn link(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency: Duration,
) {
    let (chunks, mut in_flight) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => {
                    let due = tokio::time::Instant::now() + latency;
                    if chunks.send((due, buffer[..read].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = in_flight.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
