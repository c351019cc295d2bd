//! The etcd client. It is built on the background runtime ([`crate::driver`]), whose worker
//! runs tonic's channel for every caller: a backend connected on one runtime works from any
//! other, whatever becomes of the first (before, the client was rebuilt on the caller's
//! runtime once the one that built it had shut down).

use etcd_client::Client;

/// Hands out the client.
pub(crate) struct Connection {
    client: Client,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Wraps a client built on the background runtime from `endpoints`.
    pub(crate) fn new(client: Client, endpoints: Vec<String>) -> Self {
        Connection { client, endpoints }
    }

    /// The client (a cheap clone: it shares the channel).
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }
}
