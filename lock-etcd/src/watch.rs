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
use tokio::time::{Instant, timeout};

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
    /// Watch every key under `key` (a range), not just `key`.
    prefix: bool,
    start_revision: i64,
    /// Sent the revision of the last delete in the waking answer.
    wake: oneshot::Sender<i64>,
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
    receiver: oneshot::Receiver<i64>,
}

impl Wakeup {
    /// Resolves when the key is deleted or the watch is interrupted.
    pub(crate) async fn wait(&mut self) -> Woken {
        match self.deleted_at().await {
            Some(_) => Woken::Deleted,
            None => Woken::Interrupted,
        }
    }

    /// The revision of the (last) delete that woke us; `None`: the watch was interrupted.
    pub(crate) async fn deleted_at(&mut self) -> Option<i64> {
        (&mut self.receiver).await.ok()
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

    /// The request queue of the running task, (re)started on the driver runtime (see
    /// [`crate::driver`]) if it is not running.
    async fn requests(&self) -> Option<mpsc::UnboundedSender<Request>> {
        let mut task = lock(&self.task);
        if let Some((requests, handle)) = task.as_ref()
            && !handle.is_finished()
        {
            return Some(requests.clone());
        }
        let client = self.connection.client();
        let runtime = crate::driver::handle().ok()?;
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
        self.watch(key, false, start_revision).await
    }

    /// Wakes the caller when any key under `range` is deleted at `start_revision` or later.
    pub(crate) async fn on_delete_in(&self, range: Vec<u8>, start_revision: i64) -> Wakeup {
        self.watch(range, true, start_revision).await
    }

    async fn watch(&self, key: Vec<u8>, prefix: bool, start_revision: i64) -> Wakeup {
        let (wake, receiver) = oneshot::channel();
        // If the task cannot run the sender is dropped with the request: the waiter is
        // woken as interrupted and falls back to re-checking.
        if let Some(requests) = self.requests().await {
            let _ = requests.send(Request {
                key,
                prefix,
                start_revision,
                wake,
            });
        }
        Wakeup { receiver }
    }
}

/// What the writer of a stream sends.
enum Write {
    Watch(Vec<u8>, WatchOptions),
    Cancel(i64),
}

/// An open watch stream. Writes go through a writer task of their own, so the watch task
/// never waits on a stream that does not take them (it keeps reading answers and serving
/// requests); a write that stalls for the create timeout ends the writer, and with it the
/// stream.
struct Stream {
    writes: mpsc::UnboundedSender<Write>,
    writer: JoinHandle<()>,
    responses: WatchResponseStream,
}

impl Stream {
    fn new(sender: WatchRequestSender, responses: WatchResponseStream, bound: Duration) -> Self {
        let (writes, queue) = mpsc::unbounded_channel();
        Stream {
            writes,
            writer: tokio::spawn(write(sender, queue, bound)),
            responses,
        }
    }

    fn send(&self, write: Write) {
        // A writer that ended is noticed by the task's select.
        let _ = self.writes.send(write);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// Sends the queued writes on the stream; ends (closing the stream's request side) when a
/// write fails or takes longer than `bound`.
async fn write(
    mut sender: WatchRequestSender,
    mut queue: mpsc::UnboundedReceiver<Write>,
    bound: Duration,
) {
    while let Some(write) = queue.recv().await {
        let sent = match write {
            Write::Watch(key, options) => timeout(bound, sender.watch(key, Some(options))).await,
            Write::Cancel(id) => timeout(bound, sender.cancel(id)).await,
        };
        if !matches!(sent, Ok(Ok(()))) {
            tracing::debug!("etcd watch stream write failed or stalled");
            return;
        }
    }
}

/// A stream being opened (bounded by the create timeout), off the task's loop.
type Opening = std::pin::Pin<
    Box<dyn std::future::Future<Output = Option<(WatchRequestSender, WatchResponseStream)>> + Send>,
>;

/// What happened on the open stream.
enum StreamEvent {
    /// An answer from etcd.
    Response(WatchResponse),
    /// The stream ended or failed, or its writer stalled.
    Broken,
}

async fn next_event(stream: &mut Option<Stream>) -> StreamEvent {
    let Some(open) = stream else {
        return std::future::pending().await;
    };
    tokio::select! {
        message = open.responses.message() => match message {
            Ok(Some(response)) => StreamEvent::Response(response),
            Ok(None) | Err(_) => StreamEvent::Broken,
        },
        _ = &mut open.writer => StreamEvent::Broken,
    }
}

async fn opened(
    opening: &mut Option<Opening>,
) -> Option<(WatchRequestSender, WatchResponseStream)> {
    match opening {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn stall(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The task's watches: the waiters of active watches, and the creations not yet confirmed.
#[derive(Default)]
struct Watches {
    active: HashMap<i64, oneshot::Sender<i64>>,
    /// Watch ids sent but not yet confirmed, oldest first, with their send time: etcd
    /// answers a stream's create requests in order, and a refused create names watch id −1,
    /// not ours. A creation unconfirmed for the create timeout means the stream stalled.
    creating: VecDeque<(i64, Instant)>,
}

impl Watches {
    /// Drops every watch: their waiters are woken (interrupted) and re-check.
    fn interrupt_all(&mut self) {
        self.active.clear();
        self.creating.clear();
    }
}

/// The watch task. `ids` hands out the watch ids (tests make it repeat one, which etcd
/// refuses).
///
/// Nothing in its loop waits on the stream: writes go through the stream's writer task,
/// and a stream is opened by a future polled beside the others. A stream is dropped (and
/// every waiter woken to re-check) when it ends, when a write stalls, when opening it fails
/// or takes longer than `create_timeout`, or when a watch creation stays unconfirmed for
/// `create_timeout` (a stream that went silent).
async fn run(
    client: Client,
    mut requests: mpsc::UnboundedReceiver<Request>,
    create_timeout: Duration,
    mut ids: impl FnMut() -> i64 + Send,
) {
    let mut stream: Option<Stream> = None;
    let mut opening: Option<Opening> = None;
    // Watches requested while the stream is being opened, sent once it is.
    let mut backlog: Vec<Write> = Vec::new();
    let mut watches = Watches::default();
    // etcd refused a watch for the stream's token: log in again before the next stream.
    let mut relogin = false;
    loop {
        let stalled_at = watches
            .creating
            .front()
            .map(|(_, sent)| *sent + create_timeout);
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { return };
                if request.wake.is_closed() {
                    continue;
                }
                // Drop the watches of waiters that gave up (deadline, cancelled acquire).
                let abandoned: Vec<i64> = watches
                    .active
                    .iter()
                    .filter(|(_, wake)| wake.is_closed())
                    .map(|(id, _)| *id)
                    .collect();
                for id in abandoned {
                    watches.active.remove(&id);
                    if let Some(open) = stream.as_ref() {
                        open.send(Write::Cancel(id));
                    }
                }
                let id = ids();
                let mut options = WatchOptions::new()
                    .with_start_revision(request.start_revision)
                    .with_filters([WatchFilterType::NoPut])
                    .with_watch_id(id);
                if request.prefix {
                    options = options.with_prefix();
                }
                if let Some(open) = stream.as_ref() {
                    open.send(Write::Watch(request.key, options));
                } else if opening.is_some() {
                    backlog.push(Write::Watch(request.key, options));
                } else {
                    let client = client.clone();
                    let mut watch_client = client.watch_client();
                    let key = request.key;
                    let relogin = std::mem::take(&mut relogin);
                    opening = Some(Box::pin(async move {
                        let open = async {
                            // A stream carries the token it was opened with: a fresh one
                            // first (a failed login just leaves the old token in place).
                            if relogin && let Err(error) = client.refresh_token().await {
                                tracing::debug!(%error, "etcd token refresh for the watch stream failed");
                            }
                            watch_client.watch(key, Some(options)).await
                        };
                        match timeout(create_timeout, open).await {
                            Ok(Ok(created)) => Some(created.split()),
                            _ => None,
                        }
                    }));
                }
                watches.active.insert(id, request.wake);
                watches.creating.push_back((id, Instant::now()));
            }
            created = opened(&mut opening) => {
                opening = None;
                match created {
                    Some((sender, responses)) => {
                        let open = Stream::new(sender, responses, create_timeout);
                        for write in backlog.drain(..) {
                            open.send(write);
                        }
                        stream = Some(open);
                    }
                    None => {
                        tracing::debug!("etcd watch stream could not be opened");
                        backlog.clear();
                        watches.interrupt_all();
                    }
                }
            }
            event = next_event(&mut stream) => match event {
                StreamEvent::Response(response) => {
                    if handle(stream.as_ref(), &mut watches, response) == Handled::TokenRefused {
                        // etcd checks a stream's token at every watch creation, and the
                        // token expires (--auth-token-ttl) however long the stream lives:
                        // every later watch on this stream would be refused too.
                        tracing::debug!("etcd refused a watch for the stream's token; reopening the stream after a new login");
                        stream = None;
                        watches.interrupt_all();
                        relogin = true;
                    }
                }
                StreamEvent::Broken => {
                    tracing::debug!("etcd watch stream ended or stalled; waking every waiter to re-check");
                    stream = None;
                    watches.interrupt_all();
                }
            },
            () = stall(stalled_at) => {
                tracing::debug!("etcd watch creation unconfirmed for {create_timeout:?}; dropping the stream");
                stream = None;
                opening = None;
                backlog.clear();
                watches.interrupt_all();
            }
        }
    }
}

/// What [`handle`] saw.
#[derive(Debug, PartialEq, Eq)]
enum Handled {
    Done,
    /// etcd refused a watch creation for the stream's authentication (an expired token
    /// answers "permission denied").
    TokenRefused,
}

fn handle(stream: Option<&Stream>, watches: &mut Watches, response: WatchResponse) -> Handled {
    let cancel = |id: i64| {
        if let Some(open) = stream {
            open.send(Write::Cancel(id));
        }
    };
    let id = response.watch_id();
    let active = &mut watches.active;
    if response.created() {
        let requested = watches.creating.pop_front().map(|(id, _)| id);
        if response.canceled() {
            // Refused (a duplicate id, a bad range: etcd answers watch id −1): wake the
            // waiter whose create this answers.
            tracing::debug!(reason = response.cancel_reason(), "etcd refused a watch");
            if let Some(requested) = requested {
                active.remove(&requested);
            }
            active.remove(&id);
            let reason = response.cancel_reason();
            return if reason.contains("permission denied") || reason.contains("auth") {
                Handled::TokenRefused
            } else {
                Handled::Done
            };
        }
    }
    if response.canceled() {
        // Compacted start revision, lost leader (require-leader), or our own cancel:
        // dropping the sender wakes the waiter to re-check.
        active.remove(&id);
        return Handled::Done;
    }
    let last_delete = response
        .events()
        .iter()
        .filter_map(|event| event.kv().map(|kv| kv.mod_revision()))
        .max();
    if !response.events().is_empty()
        && let Some(wake) = active.remove(&id)
    {
        let _ = wake.send(
            last_delete.unwrap_or_else(|| response.header().map_or(0, |header| header.revision())),
        );
        cancel(id);
        return Handled::Done;
    }
    // A waiter that gave up (deadline, cancelled acquire) no longer needs its watch.
    if active.get(&id).is_some_and(oneshot::Sender::is_closed) {
        active.remove(&id);
        cancel(id);
    }
    Handled::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends the task a watch of `key` (not a prefix) from `start_revision`.
    fn watch(
        requests: &mpsc::UnboundedSender<Request>,
        key: &str,
        start_revision: i64,
    ) -> anyhow::Result<Wakeup> {
        let (wake, receiver) = oneshot::channel();
        requests.send(Request {
            key: key.into(),
            prefix: false,
            start_revision,
            wake,
        })?;
        Ok(Wakeup { receiver })
    }

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
            wakeups.push(watch(&requests, key, revision + 1)?);
        }
        let mut refused = wakeups.pop().ok_or_else(|| anyhow::anyhow!("no wakeup"))?;
        let woken = timeout(Duration::from_secs(2), refused.wait()).await;
        anyhow::ensure!(
            woken == Ok(Woken::Interrupted),
            "the waiter of a refused watch was not woken: {woken:?}"
        );
        Ok(())
    }

    /// Issue #9 item 12: the watch task awaited stream writes (and the creation of a stream)
    /// inside its loop with no bound, and never noticed a stream that stopped answering: a
    /// stalled stream left every waiter asleep until its own deadline. Now a stream whose
    /// watch creations go unconfirmed for the create timeout (or whose writes stall) is
    /// dropped and every waiter woken to re-check, and the task keeps serving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_stream_wakes_its_waiters() -> anyhow::Result<()> {
        let cluster = lock_harness::etcd::EtcdCluster::single().await?;
        // The task's client goes through the proxy; the test's own client does not.
        let client = Client::connect(cluster.endpoints(), None).await?;
        let mut direct = Client::connect(cluster.direct_endpoints(), None).await?;
        let (requests, receiver) = mpsc::unbounded_channel();
        let mut next_id = 0;
        let create_timeout = Duration::from_secs(1);
        tokio::spawn(run(client, receiver, create_timeout, move || {
            next_id += 1;
            next_id
        }));
        // The stream works: a watched delete wakes its waiter.
        let revision = direct
            .put("p", "1", None)
            .await?
            .header()
            .map_or(1, |h| h.revision());
        let mut probe = watch(&requests, "p", revision + 1)?;
        direct.delete("p", None).await?;
        let woken = timeout(Duration::from_secs(3), probe.wait()).await;
        anyhow::ensure!(woken == Ok(Woken::Deleted), "probe: {woken:?}");
        let mut waiter = watch(&requests, "a", revision + 1)?;
        sleep_ms(300).await;
        // The stream stalls; more watches come meanwhile, enough to fill its buffers.
        cluster.blackhole(0)?;
        let stalled_at = tokio::time::Instant::now();
        let long_key = "k".repeat(200);
        let mut others = Vec::new();
        for index in 0..3000 {
            others.push(watch(
                &requests,
                &format!("{long_key}{index}"),
                revision + 1,
            )?);
        }
        let woken = timeout(create_timeout * 4, waiter.wait()).await;
        let took = stalled_at.elapsed();
        cluster.heal(0)?;
        anyhow::ensure!(
            woken == Ok(Woken::Interrupted),
            "a waiter on a stalled watch stream was not woken within {:?}: {woken:?}",
            create_timeout * 4
        );
        println!("woken {took:?} after the stall");
        // The task still serves: a new watch after the heal sees its delete.
        let revision = direct
            .put("b", "1", None)
            .await?
            .header()
            .map_or(1, |h| h.revision());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut later = watch(&requests, "b", revision + 1)?;
            sleep_ms(100).await;
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("no watch worked within 10 s of the heal");
            }
            direct.delete("b", None).await?;
            match timeout(Duration::from_secs(3), later.wait()).await {
                Ok(Woken::Deleted) => break,
                _ => {
                    direct.put("b", "1", None).await?;
                }
            }
        }
        Ok(())
    }

    async fn sleep_ms(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
