//! One watch stream per backend, shared by every waiter.
//!
//! A waiter asks to be woken when one key (its predecessor in the queue) is deleted, from a
//! given revision on. The task multiplexes those one-shot watches over a single gRPC stream,
//! with watch ids it assigns itself (etcd ≥ 3.4), and wakes the waiter on the delete event. If
//! the stream breaks or the server cancels a watch, the waiters concerned are woken too: they
//! re-read the queue and watch again, so a lost event costs a re-check, never a missed wake-up.
//! A watch etcd refuses to create (answered created + canceled, with watch id −1) wakes its
//! waiter as well. The task is restarted on the caller's runtime when it has ended (the
//! runtime that started it shut down).

use crate::connection::Connection;
use crate::lock;
use etcd_client::{
    Client, WatchFilterType, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Why a waiter was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// The watched key was deleted.
    Deleted,
    /// The watch failed or was cancelled: re-check, and pause briefly before watching again.
    Interrupted,
}

struct Request {
    key: Vec<u8>,
    start_revision: i64,
    wake: oneshot::Sender<()>,
}

/// The watch task's request queue and handle.
type RunningTask = (mpsc::UnboundedSender<Request>, JoinHandle<()>);

/// Handle to the watch task; the task ends when every handle is dropped.
#[derive(Clone)]
pub(crate) struct Watcher {
    connection: Arc<Connection>,
    create_timeout: Duration,
    task: Arc<Mutex<Option<RunningTask>>>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

/// A pending one-shot watch.
pub(crate) struct Wakeup {
    receiver: oneshot::Receiver<()>,
}

impl Wakeup {
    /// Resolves when the key is deleted or the watch is interrupted.
    pub(crate) async fn wait(&mut self) -> Woken {
        match (&mut self.receiver).await {
            Ok(()) => Woken::Deleted,
            Err(_) => Woken::Interrupted,
        }
    }
}

impl Watcher {
    /// A watcher over `client`; its task starts on the first use.
    pub(crate) fn new(connection: Arc<Connection>, create_timeout: Duration) -> Self {
        Watcher {
            connection,
            create_timeout,
            task: Arc::new(Mutex::new(None)),
        }
    }

    /// The request queue of the running task, (re)started on the current runtime if it is
    /// not running.
    async fn requests(&self) -> Option<mpsc::UnboundedSender<Request>> {
        let running = || {
            lock(&self.task)
                .as_ref()
                .filter(|(_, handle)| !handle.is_finished())
                .map(|(requests, _)| requests.clone())
        };
        if let Some(requests) = running() {
            return Some(requests);
        }
        let client = self.connection.client().await.ok()?;
        let mut task = lock(&self.task);
        if let Some((requests, handle)) = task.as_ref()
            && !handle.is_finished()
        {
            return Some(requests.clone());
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (requests, receiver) = mpsc::unbounded_channel();
        let mut next_id: i64 = 0;
        let ids = move || {
            next_id += 1;
            next_id
        };
        let handle = runtime.spawn(run(client, receiver, self.create_timeout, ids));
        *task = Some((requests.clone(), handle));
        Some(requests)
    }

    /// Wakes the caller when `key` is deleted at `start_revision` or later.
    pub(crate) async fn on_delete(&self, key: Vec<u8>, start_revision: i64) -> Wakeup {
        let (wake, receiver) = oneshot::channel();
        // If the task cannot run the sender is dropped with the request: the waiter is
        // woken as interrupted and falls back to re-checking.
        if let Some(requests) = self.requests().await {
            let _ = requests.send(Request {
                key,
                start_revision,
                wake,
            });
        }
        Wakeup { receiver }
    }
}

struct Stream {
    sender: WatchRequestSender,
    responses: WatchResponseStream,
}

async fn next_response(stream: &mut Option<Stream>) -> Option<Result<WatchResponse, ()>> {
    match stream {
        Some(stream) => match stream.responses.message().await {
            Ok(Some(response)) => Some(Ok(response)),
            Ok(None) | Err(_) => Some(Err(())),
        },
        None => std::future::pending().await,
    }
}

/// The watch task. `ids` hands out the watch ids (tests make it repeat one, which etcd
/// refuses).
async fn run(
    client: Client,
    mut requests: mpsc::UnboundedReceiver<Request>,
    create_timeout: Duration,
    mut ids: impl FnMut() -> i64 + Send,
) {
    let mut stream: Option<Stream> = None;
    let mut active: HashMap<i64, oneshot::Sender<()>> = HashMap::new();
    // Watch ids sent but not yet confirmed, oldest first: etcd answers a stream's create
    // requests in order, and a refused create names watch id −1, not ours.
    let mut creating: VecDeque<i64> = VecDeque::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { return };
                if request.wake.is_closed() {
                    continue;
                }
                // Drop the watches of waiters that gave up (deadline, cancelled acquire).
                let abandoned: Vec<i64> = active
                    .iter()
                    .filter(|(_, wake)| wake.is_closed())
                    .map(|(id, _)| *id)
                    .collect();
                for id in abandoned {
                    active.remove(&id);
                    cancel(&mut stream, id).await;
                }
                let id = ids();
                let options = WatchOptions::new()
                    .with_start_revision(request.start_revision)
                    .with_filters([WatchFilterType::NoPut])
                    .with_watch_id(id);
                let sent = match stream.as_mut() {
                    Some(open) => open.sender.watch(request.key, Some(options)).await.is_ok(),
                    None => {
                        let mut watch_client = client.watch_client();
                        match timeout(create_timeout, watch_client.watch(request.key, Some(options))).await {
                            Ok(Ok(created)) => {
                                let (sender, responses) = created.split();
                                stream = Some(Stream { sender, responses });
                                true
                            }
                            _ => false,
                        }
                    }
                };
                if sent {
                    active.insert(id, request.wake);
                    creating.push_back(id);
                } else {
                    // Dropping the sender wakes this waiter; the others re-check as well.
                    tracing::debug!("etcd watch stream could not be opened or written");
                    stream = None;
                    active.clear();
                    creating.clear();
                }
            }
            response = next_response(&mut stream) => {
                match response {
                    Some(Ok(response)) => handle(&mut stream, &mut active, &mut creating, response).await,
                    _ => {
                        tracing::debug!("etcd watch stream ended; waking every waiter to re-check");
                        stream = None;
                        active.clear();
                        creating.clear();
                    }
                }
            }
        }
    }
}

/// Cancels watch `id` on the open stream, if any (best effort: a broken stream is reopened
/// by the next request anyway).
async fn cancel(stream: &mut Option<Stream>, id: i64) {
    if let Some(open) = stream.as_mut() {
        let _ = open.sender.cancel(id).await;
    }
}

async fn handle(
    stream: &mut Option<Stream>,
    active: &mut HashMap<i64, oneshot::Sender<()>>,
    creating: &mut VecDeque<i64>,
    response: WatchResponse,
) {
    let id = response.watch_id();
    if response.created() {
        let requested = creating.pop_front();
        if response.canceled() {
            // Refused (a duplicate id, a bad range: etcd answers watch id −1): wake the
            // waiter whose create this answers.
            tracing::debug!(reason = response.cancel_reason(), "etcd refused a watch");
            if let Some(requested) = requested {
                active.remove(&requested);
            }
            active.remove(&id);
            return;
        }
    }
    if response.canceled() {
        // Compacted start revision, lost leader (require-leader), or our own cancel:
        // dropping the sender wakes the waiter to re-check.
        active.remove(&id);
        return;
    }
    if !response.events().is_empty()
        && let Some(wake) = active.remove(&id)
    {
        let _ = wake.send(());
        cancel(stream, id).await;
        return;
    }
    // A waiter that gave up (deadline, cancelled acquire) no longer needs its watch.
    if active.get(&id).is_some_and(oneshot::Sender::is_closed) {
        active.remove(&id);
        cancel(stream, id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// etcd refuses a watch whose id is already in use on the stream, answering created +
    /// canceled with watch id −1: the waiter must still be woken (to re-check), not left
    /// asleep until its deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_watch_wakes_its_waiter() -> anyhow::Result<()> {
        let cluster = lock_harness::etcd::EtcdCluster::single().await?;
        let client = Client::connect(cluster.direct_endpoints(), None).await?;
        let revision = client
            .kv_client()
            .get("w", None)
            .await?
            .header()
            .map_or(1, |header| header.revision());
        let (requests, receiver) = mpsc::unbounded_channel();
        // Every watch gets id 1: the second is a duplicate.
        tokio::spawn(run(client, receiver, Duration::from_secs(3), || 1));
        let mut wakeups = Vec::new();
        for key in ["a", "b"] {
            let (wake, receiver) = oneshot::channel();
            requests.send(Request {
                key: key.into(),
                start_revision: revision + 1,
                wake,
            })?;
            wakeups.push(Wakeup { receiver });
        }
        let mut refused = wakeups.pop().ok_or_else(|| anyhow::anyhow!("no wakeup"))?;
        let woken = timeout(Duration::from_secs(2), refused.wait()).await;
        anyhow::ensure!(
            woken == Ok(Woken::Interrupted),
            "the waiter of a refused watch was not woken: {woken:?}"
        );
        Ok(())
    }
}
