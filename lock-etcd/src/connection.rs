//! The etcd client, rebuilt on the caller's runtime when the runtime that built it has shut
//! down: tonic runs each channel's worker as a task of the runtime that created it, so a
//! backend connected on one runtime and used from another would otherwise fail every request
//! ("Service was not ready").

use crate::config::EtcdConfig;
use crate::{lock, security};
use etcd_client::{Client, ConnectOptions};
use lock_core::LockError;
use std::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;

/// A client and a never-ending task on the runtime it was built on: once that task has
/// finished, the runtime (and the client's channel with it) is gone.
struct Built {
    client: Client,
    sentinel: JoinHandle<()>,
}

/// Hands out a working client, rebuilding it when needed.
pub(crate) struct Connection {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// For classifying a refused rebuild (wrong password, certificate).
    config: EtcdConfig,
    built: Mutex<Built>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// A task that ends only with the runtime the client was built on (the driver runtime, see
/// [`crate::driver`]; the current one if that could not start).
fn sentinel() -> JoinHandle<()> {
    match crate::driver::handle() {
        Ok(driver) => driver.spawn(std::future::pending()),
        Err(_) => tokio::spawn(std::future::pending()),
    }
}

impl Connection {
    /// Wraps a client just built on the current runtime from `endpoints` and `options`
    /// (made from `config`).
    pub(crate) fn new(
        client: Client,
        endpoints: Vec<String>,
        options: ConnectOptions,
        config: EtcdConfig,
    ) -> Self {
        Connection {
            endpoints,
            options,
            config,
            built: Mutex::new(Built {
                client,
                sentinel: sentinel(),
            }),
        }
    }

    fn built(&self) -> MutexGuard<'_, Built> {
        lock(&self.built)
    }

    /// The client, rebuilt on the current runtime if the one it was built on has shut down.
    pub(crate) async fn client(&self) -> Result<Client, LockError> {
        {
            let built = self.built();
            if !built.sentinel.is_finished() {
                return Ok(built.client.clone());
            }
        }
        tracing::debug!("the runtime that built the etcd client has shut down; rebuilding it");
        // Connecting sets up the (lazy) channel, and logs in if credentials are configured:
        // one round trip then, bounded by the connect timeout.
        let connecting = {
            let (endpoints, options) = (self.endpoints.clone(), self.options.clone());
            let limit = self.config.connect_timeout;
            crate::driver::run(async move {
                tokio::time::timeout(limit, Client::connect(endpoints, Some(options))).await
            })
        };
        let client = match connecting.await? {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                return Err(security::refusal(&self.config, &error).unwrap_or_else(|| {
                    LockError::backend(
                        "etcd",
                        format!("reconnecting on a new runtime: {error}"),
                        true,
                        error,
                    )
                }));
            }
            Err(_) => {
                return Err(LockError::backend_msg(
                    "etcd",
                    format!(
                        "reconnecting on a new runtime: no connection within {:?}",
                        self.config.connect_timeout
                    ),
                    true,
                ));
            }
        };
        let mut built = self.built();
        if built.sentinel.is_finished() {
            *built = Built {
                client: client.clone(),
                sentinel: sentinel(),
            };
        }
        Ok(built.client.clone())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.built().sentinel.abort();
    }
}
