//! Redis Cluster: one `RedisBackend` over a whole cluster.
//!
//! URL: `redis+cluster://[user:pass@]h1:p1,h2:p2,…[/0][?…]`: seed nodes (any subset of the
//! cluster's nodes; the slot map is read from them). A cluster has only database 0.
//!
//! Every script names its keys, and all keys of one lock, semaphore or reader-writer name
//! share one hash slot with the slot's fence counter (see [`crate::KeyScheme`]), so the
//! `redis` crate's `ClusterConnection` sends each script to the master that owns that slot
//! and follows `MOVED`/`ASK` redirections (slots migrating) and failovers (it reads the slot
//! map again when a node fails or answers `MOVED`). Release announcements use classic
//! `PUBLISH`/`SUBSCRIBE`: a cluster forwards a `PUBLISH` to every node, so the listener
//! subscribes on one node (the seed nodes in turn, moving to the next when one fails).
//! `wait_replicas` sends its `WAIT` to the master serving the name's slot, over the
//! connection that carried the write.

use crate::node::Nodes;
use crate::{KeyScheme, RedisBackend, RedisOptions};
use lock_core::LockError;
use tokio::time::timeout;

/// Connects to the cluster whose seed nodes a `redis+cluster://` URL lists, within the
/// connect timeout (the slot map is read and a connection made to each master).
pub(crate) async fn connect(url: &str, options: RedisOptions) -> Result<RedisBackend, LockError> {
    let bad = |why: &str| LockError::InvalidConfig(format!("redis cluster URL {url:?}: {why}"));
    let rest = url
        .strip_prefix("redis+cluster://")
        .ok_or_else(|| bad("expected redis+cluster://h1:p1,h2:p2,h3:p3"))?;
    // The same shape as a Redlock URL: parse it as one for the options and the node URLs.
    let parsed = crate::options::parse_url(&format!("redlock://{rest}"), options)
        .map_err(|error| bad(&error.to_string()))?;
    let options = parsed.options;
    let seeds = parsed
        .nodes
        .iter()
        .map(|node| {
            redis::Client::open(node.as_str()).map_err(|error| bad(&format!("{node}: {error}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let db = seeds
        .first()
        .map_or(0, |seed| seed.get_connection_info().redis_settings().db());
    if db != 0 {
        return Err(bad("a Redis Cluster has only database 0"));
    }
    let client = redis::cluster::ClusterClientBuilder::new(parsed.nodes.clone())
        .connection_timeout(options.connect_timeout)
        .response_timeout(options.command_timeout)
        // Redirections and reconnects after a node failure: short waits, since every call
        // is bounded by the command timeout anyway.
        .retries(8)
        .min_retry_wait(10)
        .max_retry_wait(500)
        .build()
        .map_err(|error| bad(&error.to_string()))?;
    let limit = options.connect_timeout;
    let connection = match timeout(limit, client.get_async_connection()).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            return Err(crate::node::backend_error(
                &format!("connecting to the cluster at {}", seed_list(&seeds)),
                error,
            ));
        }
        Err(_) => {
            return Err(LockError::backend_msg(
                "redis",
                format!(
                    "connecting to the cluster at {}: no answer within {limit:?}",
                    seed_list(&seeds)
                ),
                true,
            ));
        }
    };
    let scheme = KeyScheme::new(options.prefix.clone(), 0)?;
    let nodes = Nodes::cluster(connection, seeds, scheme, &options);
    Ok(RedisBackend::from_nodes(nodes, &options))
}

fn seed_list(seeds: &[redis::Client]) -> String {
    seeds
        .iter()
        .map(|seed| seed.get_connection_info().addr().to_string())
        .collect::<Vec<_>>()
        .join(",")
}
