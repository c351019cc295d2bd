//! The command connection of a node: one server (a `ConnectionManager`, also used for the
//! master a set of sentinels names) or a whole Redis Cluster (a `ClusterConnection`, which
//! routes each command to the owner of its keys' slot and follows `MOVED`/`ASK` and failovers).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A node's command connection. Both kinds are cheap clones of one multiplexed connection.
#[derive(Clone)]
pub(crate) enum Link {
    /// One server.
    Server(ConnectionManager),
    /// A Redis Cluster: scripts run on the owner of their keys' slot.
    Cluster(ClusterConnection),
}

impl Link {
    /// Whether this is a cluster connection (which reconnects and re-routes by itself).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Link::Cluster(_))
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Server(conn) => conn.req_packed_command(cmd),
            Link::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            Link::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Server(conn) => conn.get_db(),
            Link::Cluster(conn) => conn.get_db(),
        }
    }
}
