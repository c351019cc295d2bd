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
//! `wait_replicas` sends its `WAIT` in one pipeline with the script, to the master serving
//! the name's slot.

use crate::node::Nodes;
use crate::{KeyScheme, RedisBackend, RedisOptions};
use lock_core::LockError;
use tokio::time::timeout;

/// Connects to the cluster whose seed nodes a `redis+cluster://` URL lists, within the
/// connect timeout (the slot map is read and a connection made to each master).
pub(crate) async fn connect(url: &str, options: RedisOptions) -> Result<RedisBackend, LockError> {
    let bad = |why: &str| {
        let url = lock_core::redact_url(url);
        LockError::InvalidConfig(format!("redis cluster URL {url:?}: {why}"))
    };
    let (form, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redlock", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("redlocks", rest)
    } else {
        return Err(bad(
            "expected redis+cluster://h1:p1,h2:p2,h3:p3 (or rediss+cluster://)",
        ));
    };
    // The same shape as a Redlock URL: parse it as one for the options and the node URLs
    // (`redlocks://`: `rediss://` nodes, the `tls_*` parameters, `#insecure`).
    let parsed = crate::options::parse_url(&format!("{form}://{rest}"), options)
        .map_err(|error| bad(&error.to_string()))?;
    let options = parsed.options;
    let seeds = parsed
        .nodes
        .iter()
        .map(|node| {
            let info = redis::IntoConnectionInfo::into_connection_info(node.as_str())
                .map_err(|error| bad(&format!("{node}: {error}")))?;
            crate::tls::build_client(info, &options.tls)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let db = seeds
        .first()
        .map_or(0, |seed| seed.get_connection_info().redis_settings().db());
    if db != 0 {
        return Err(bad("a Redis Cluster has only database 0"));
    }
    let builder = redis::cluster::ClusterClientBuilder::new(parsed.nodes.clone());
    // TLS: the mode comes from the seeds' `rediss://`; the CA and client certificate from
    // the options (as for every other node URL).
    #[cfg(feature = "tls")]
    let builder = match options.tls.certificates()? {
        Some(certificates) if form == "redlocks" => builder.certs(certificates),
        _ => builder,
    };
    let client = builder
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
    let started = tokio::time::Instant::now();
    // Connected on the background runtime: a cluster connection's tasks (its own and each
    // node connection's) live where it was made, and unlike a `ConnectionManager` it does not
    // rebuild itself once they end with a caller's runtime ("Unable to send command" for
    // good; conformance `backend_outlives_the_runtime_that_connected_it`). The cost: each
    // command's answer crosses to the caller's thread.
    let connecting = {
        let client = client.clone();
        async move { timeout(limit, client.get_async_connection()).await }
    };
    let connected = match lock_core::spawn_background(connecting) {
        Some(task) => task.await.map_err(|error| {
            LockError::backend_msg("redis", format!("connecting to the cluster: {error}"), true)
        })?,
        None => timeout(limit, client.get_async_connection()).await,
    };
    let connection = match connected {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            // The cluster client flattens what its node connections met into a message, so
            // a wrong password or an untrusted certificate would read as an outage: ask one
            // seed directly, which keeps the cause.
            // Within what is left of the connect timeout.
            let left = limit.saturating_sub(started.elapsed());
            if let Some(refused) = refusal_of_a_seed(&seeds, left).await {
                return Err(refused);
            }
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
    Ok(RedisBackend::from_nodes(nodes))
}

/// The refusal (credentials, certificates) the seeds answer a plain connection with, if
/// they do; each seed bounded by `limit`, all at once.
async fn refusal_of_a_seed(
    seeds: &[redis::Client],
    limit: std::time::Duration,
) -> Option<LockError> {
    let tries = seeds.iter().map(|seed| async move {
        let addr = seed.get_connection_info().addr().to_string();
        match timeout(limit, seed.get_multiplexed_async_connection()).await {
            Ok(Err(error)) => crate::tls::refusal(&format!("cluster node {addr}"), &error),
            _ => None,
        }
    });
    futures::future::join_all(tries)
        .await
        .into_iter()
        .flatten()
        .next()
}

fn seed_list(seeds: &[redis::Client]) -> String {
    seeds
        .iter()
        .map(|seed| seed.get_connection_info().addr().to_string())
        .collect::<Vec<_>>()
        .join(",")
}
