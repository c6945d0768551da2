//! Batching across partitions: with `--batch-size` above 1, every partition worker hands its
//! mergeable records here, and they are merged into model requests by batch key whatever their
//! partition (a record's answer still goes back to its own worker, which writes answers in
//! input order). Adaptive: an idle model gets a record at once; while calls run, a partial
//! batch waits for more, never past `--batch-linger`. A batch of one, and every record of a
//! batch that failed for good, is sent back to run alone (so only a bad record gets an error
//! record); a record run alone counts as a running call until it ends.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{Ctx, Item, Outcome, process_batch};

/// A record waiting for its batch.
pub(super) struct Pending {
    pub partition: i32,
    pub offset: i64,
    pub headers: Vec<(String, Bytes)>,
    pub part: codec::batch::Part,
    pub arrived: tokio::time::Instant,
    pub reply: oneshot::Sender<Reply>,
}

/// What becomes of a record handed to the batcher.
pub(super) enum Reply {
    /// Its outcome, from a batch's answer.
    Done(Box<Outcome>),
    /// Run it alone; it counts as a running call until the guard is dropped.
    Alone(Running),
}

/// Calls the batcher did not make itself (records run alone), counted while they run.
#[derive(Default)]
struct Alone {
    running: AtomicUsize,
    ended: Notify,
}

/// A record run alone: one running call until dropped.
pub(super) struct Running(Arc<Alone>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
        self.0.ended.notify_one();
    }
}

fn alone(a: &Arc<Alone>) -> Reply {
    a.running.fetch_add(1, Ordering::Relaxed);
    Reply::Alone(Running(a.clone()))
}

/// The workers' way in.
pub(super) type Batcher = mpsc::UnboundedSender<Pending>;

/// The batcher's way in, and what it reads (it is started with the context that holds the
/// former: [`run`]).
pub(super) fn channel() -> (Batcher, mpsc::UnboundedReceiver<Pending>) {
    mpsc::unbounded_channel()
}

/// The batcher; it ends once the workers are stopped and it holds nothing.
pub(super) async fn run(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let alone_calls = Arc::new(Alone::default());
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    let mut running: FuturesUnordered<futures::future::BoxFuture<'static, ()>> =
        FuturesUnordered::new();
    let mut stop = ctx.stop.clone();
    let mut open = true;
    loop {
        // Records of a revoked partition: nobody waits for them any more.
        waiting.retain(|p| !p.reply.is_closed());
        let stopping = *stop.borrow() || !open;
        let mut wait_until = None;
        while let Some(first) = waiting.front() {
            let unit: Vec<usize> = waiting
                .iter()
                .enumerate()
                .filter(|(_, p)| p.part.merges_with(&first.part))
                .map(|(i, _)| i)
                .take(ctx.batch_size)
                .collect();
            let busy = !running.is_empty() || alone_calls.running.load(Ordering::Relaxed) > 0;
            let deadline = first.arrived + ctx.batch_linger;
            if unit.len() < ctx.batch_size
                && busy
                && !stopping
                && tokio::time::Instant::now() < deadline
            {
                wait_until = Some(deadline);
                break;
            }
            let mut batch: Vec<Pending> = Vec::with_capacity(unit.len());
            for i in unit.into_iter().rev() {
                batch.push(waiting.remove(i).expect("an index of waiting"));
            }
            batch.reverse();
            ctx.metrics.batch_size.observe(batch.len() as f64);
            if batch.len() == 1 {
                let p = batch.pop().expect("one");
                let _ = p.reply.send(alone(&alone_calls));
                continue;
            }
            running.push(Box::pin(run_batch(ctx.clone(), batch, alone_calls.clone())));
        }
        if stopping && waiting.is_empty() && running.is_empty() {
            // Stopped: what the workers still send is left uncommitted (redone later).
            return;
        }
        tokio::select! {
            p = rx.recv(), if open => match p {
                Some(p) => {
                    waiting.push_back(p);
                    // All that was handed in meanwhile, so batches form from all of it.
                    while let Ok(p) = rx.try_recv() {
                        waiting.push_back(p);
                    }
                }
                None => open = false,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
            _ = alone_calls.ended.notified() => {}
            _ = tokio::time::sleep_until(wait_until.unwrap_or_else(tokio::time::Instant::now)), if wait_until.is_some() => {}
            r = stop.changed(), if !*stop.borrow() => if r.is_err() { open = false; },
        }
    }
}

/// One model request for the batch; each record gets its outcome, or is sent back to run alone
/// when the batch failed for good.
async fn run_batch(ctx: Arc<Ctx>, batch: Vec<Pending>, alone_calls: Arc<Alone>) {
    type Rest = (i32, i64, Vec<(String, Bytes)>, oneshot::Sender<Reply>);
    let (rest, parts): (Vec<Rest>, Vec<codec::batch::Part>) = batch
        .into_iter()
        .map(|p| ((p.partition, p.offset, p.headers, p.reply), p.part))
        .unzip();
    let items: Vec<Item<'_>> = rest
        .iter()
        .map(|(partition, offset, headers, _)| Item {
            partition: *partition,
            offset: *offset,
            headers,
        })
        .collect();
    let outcomes = process_batch(&ctx, &items, &parts).await;
    match outcomes {
        Some(outcomes) => {
            for ((.., reply), o) in rest.into_iter().zip(outcomes) {
                let _ = reply.send(Reply::Done(Box::new(o)));
            }
        }
        None => {
            for (.., reply) in rest {
                let _ = reply.send(alone(&alone_calls));
            }
        }
    }
}
