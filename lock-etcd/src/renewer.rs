//! Batched renewals: one task per backend turns many concurrent `renew` calls into one
//! read-only txn (the ownership checks) and keep-alives over one shared lease stream.
//!
//! Measured on the test machine (debug build, 1,000 leases): 1,000 separate check txns took
//! ~420 ms and 1,000 one-shot keep-alive streams ~300–460 ms, against ~15–25 ms for the same
//! checks in txns of 100 gets and ~30 ms for 1,000 keep-alives on one stream. Without
//! batching, 1,000 locks renewed every TTL/3 saturate a small machine.

use etcd_client::{Client, KeyValue, LeaseKeepAliveStream, LeaseKeeper, Txn, TxnOp, TxnOpResponse};
use lock_core::LockError;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

/// Most gets in one txn: etcd's default `--max-txn-ops` is 128.
const BATCH: usize = 128;

/// What the server said about one renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// The entry is ours and the lease was kept alive.
    Renewed,
    /// The entry is gone, has another owner token, or is on another lease.
    NotOurs,
    /// The keep-alive answered TTL 0: the lease expired.
    Expired,
}

struct Request {
    entry: Vec<u8>,
    owner: String,
    lease_id: i64,
    reply: oneshot::Sender<Result<Renewal, LockError>>,
}

/// Handle to the renewal task; the task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Renewer {
    requests: mpsc::UnboundedSender<Request>,
}

impl Renewer {
    pub(crate) fn start(client: Client, request_timeout: Duration) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(client, receiver, request_timeout));
        Renewer { requests }
    }

    /// Checks that `entry` holds `owner` on `lease_id`, then keeps the lease alive.
    pub(crate) async fn renew(
        &self,
        entry: Vec<u8>,
        owner: String,
        lease_id: i64,
    ) -> Result<Renewal, LockError> {
        let (reply, answer) = oneshot::channel();
        let gone = || LockError::backend_msg("etcd", "the renewal task stopped", true);
        self.requests
            .send(Request {
                entry,
                owner,
                lease_id,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn failed(what: &str, error: impl std::fmt::Display) -> LockError {
    LockError::backend_msg("etcd", format!("{what}: {error}"), true)
}

struct KeepAlive {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

async fn run(
    client: Client,
    mut requests: mpsc::UnboundedReceiver<Request>,
    request_timeout: Duration,
) {
    let mut keep_alive: Option<KeepAlive> = None;
    loop {
        let Some(first) = requests.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        // A caller that gave up (its watchdog timed out) needs no answer.
        batch.retain(|request| !request.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let checked = match timeout(request_timeout, check(&client, &batch)).await {
            Ok(Ok(checked)) => checked,
            Ok(Err(error)) => {
                reply_all(batch, || failed("ownership check", &error));
                continue;
            }
            Err(_) => {
                reply_all(batch, || failed("ownership check", "no answer"));
                continue;
            }
        };
        let mut ours = Vec::new();
        for (request, is_ours) in batch.into_iter().zip(checked) {
            if is_ours {
                ours.push(request);
            } else {
                let _ = request.reply.send(Ok(Renewal::NotOurs));
            }
        }
        if ours.is_empty() {
            continue;
        }
        match timeout(
            request_timeout,
            keep_alive_all(&client, &mut keep_alive, &ours),
        )
        .await
        {
            Ok(Ok(answers)) => {
                for (request, alive) in ours.into_iter().zip(answers) {
                    let outcome = if alive {
                        Renewal::Renewed
                    } else {
                        Renewal::Expired
                    };
                    let _ = request.reply.send(Ok(outcome));
                }
            }
            Ok(Err(error)) => {
                keep_alive = None;
                reply_all(ours, || failed("lease keep-alive", &error));
            }
            Err(_) => {
                keep_alive = None;
                reply_all(ours, || failed("lease keep-alive", "no answer"));
            }
        }
    }
}

fn reply_all(batch: Vec<Request>, error: impl Fn() -> LockError) {
    for request in batch {
        let _ = request.reply.send(Err(error()));
    }
}

/// One read-only txn of gets: for each request, whether its entry exists with its owner token
/// on its lease.
async fn check(client: &Client, batch: &[Request]) -> Result<Vec<bool>, etcd_client::Error> {
    let gets: Vec<TxnOp> = batch
        .iter()
        .map(|request| TxnOp::get(request.entry.clone(), None))
        .collect();
    let answer = client.kv_client().txn(Txn::new().and_then(gets)).await?;
    let answers = answer.op_responses();
    Ok(batch
        .iter()
        .enumerate()
        .map(|(index, request)| {
            let kvs: &[KeyValue] = match answers.get(index) {
                Some(TxnOpResponse::Get(get)) => get.kvs(),
                _ => &[],
            };
            kvs.first().is_some_and(|kv| {
                kv.value() == request.owner.as_bytes() && kv.lease() == request.lease_id
            })
        })
        .collect())
}

/// Keep-alives for every request over the shared stream (opened on first use). The server
/// answers a stream's requests in order, one answer each.
async fn keep_alive_all(
    client: &Client,
    shared: &mut Option<KeepAlive>,
    batch: &[Request],
) -> Result<Vec<bool>, etcd_client::Error> {
    let mut answers = Vec::with_capacity(batch.len());
    let mut rest = batch;
    if shared.is_none() {
        // Opening the stream sends the first lease's keep-alive and reads its answer; an
        // expired lease fails the opening, which answers that lease.
        while let Some((first, tail)) = rest.split_first() {
            rest = tail;
            match client.lease_client().keep_alive(first.lease_id).await {
                Ok((keeper, stream)) => {
                    *shared = Some(KeepAlive { keeper, stream });
                    answers.push(true);
                    break;
                }
                Err(etcd_client::Error::LeaseKeepAliveError(message))
                    if message.contains("not found") =>
                {
                    answers.push(false);
                }
                Err(error) => return Err(error),
            }
        }
    }
    let Some(open) = shared.as_mut() else {
        return Ok(answers);
    };
    for request in rest {
        open.keeper.id = request.lease_id;
        open.keeper.keep_alive().await?;
    }
    for request in rest {
        let Some(answer) = open.stream.message().await? else {
            return Err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive stream closed".into(),
            ));
        };
        if answer.id() != request.lease_id {
            return Err(etcd_client::Error::LeaseKeepAliveError(format!(
                "keep-alive answer for lease {:x}, expected {:x}",
                answer.id(),
                request.lease_id
            )));
        }
        answers.push(answer.ttl() > 0);
    }
    Ok(answers)
}
