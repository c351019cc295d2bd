//! Real servers for tests: start them on free loopback ports in temporary directories, break
//! them on purpose (pause, kill, restart, cut the connection), and clean up.
//!
//! Nothing here talks to a server on a standard port: every server is one this harness
//! started. A missing server binary is an error naming the Debian package to install (run
//! `scripts/setup`); tests never skip silently.

pub mod process;
pub mod proxy;

pub use process::{
    ServerProcess, allowed_cpus, find_binary, free_port, pin_to_one_cpu, wait_for_port,
};
pub use proxy::{ProxyMode, TcpProxy};

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub mod redis_cluster;
#[cfg(feature = "redis")]
mod redis_nodes;
#[cfg(feature = "redis")]
pub mod redis_sentinel;
#[cfg(feature = "tls")]
pub mod tls;
