//! Batching across partitions: with `--batch-size` above 1, every partition worker hands its
//! mergeable records here, and they are merged into model requests by batch key whatever their
//! partition (a record's answer still goes back to its own worker, which writes answers in
//! input order). Adaptive: an idle model gets a record at once; while calls run, a partial
//! batch waits for more, never past `--batch-linger`. A batch of one, and every record of a
//! batch that failed for good or timed out (a batch is split at its first timeout, never
//! retried whole: [`crate::graph::Graph::infer_batch`]), is sent back to run alone (so only a
//! bad record gets an error record, and a record that hangs the model holds up no batch-mate
//! past one model timeout); a record run alone counts as a running call until it ends.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use tokio::sync::{Notify, mpsc, oneshot, watch};

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

/// The batcher; once the workers are stopped it answers what was handed in, and it ends when it
/// holds nothing (refusing what comes later).
pub(super) async fn run(ctx: Arc<Ctx>, rx: mpsc::UnboundedReceiver<Pending>) {
    let (stop, metrics) = (ctx.stop.clone(), ctx.metrics.clone());
    let batches = Batches {
        size: ctx.batch_size,
        linger: ctx.batch_linger,
    };
    serve(
        batches,
        stop,
        rx,
        |n| metrics.batch_size.observe(n as f64),
        move |batch, alone| Box::pin(run_batch(ctx.clone(), batch, alone)),
    )
    .await
}

/// How records are merged.
struct Batches {
    /// Records in one model request at most.
    size: usize,
    /// How long a partial batch may wait for more while calls run.
    linger: Duration,
}

/// [`run`], with what it needs of the context: `observe` is told each batch's size,
/// `run_batch` makes a batch's model request.
async fn serve(
    batches: Batches,
    mut stop: watch::Receiver<bool>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    observe: impl Fn(usize),
    run_batch: impl Fn(Vec<Pending>, Arc<Alone>) -> BoxFuture<'static, ()>,
) {
    let alone_calls = Arc::new(Alone::default());
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    let mut running: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
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
                .take(batches.size)
                .collect();
            let busy = !running.is_empty() || alone_calls.running.load(Ordering::Relaxed) > 0;
            let deadline = first.arrived + batches.linger;
            if unit.len() < batches.size
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
            observe(batch.len());
            if batch.len() == 1 {
                let p = batch.pop().expect("one");
                let _ = p.reply.send(alone(&alone_calls));
                continue;
            }
            running.push(run_batch(batch, alone_calls.clone()));
        }
        if stopping && waiting.is_empty() && running.is_empty() {
            if !open {
                return;
            }
            // Stopped and idle: closed to new records (a worker's send fails, and it abandons
            // the record: uncommitted, redone later). Those already handed in are still read
            // below and batched at once (no linger), so each gets its answer or runs alone;
            // none is dropped unanswered.
            rx.close();
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use codec::Protocol;

    use super::*;
    use crate::{
        graph::Msg,
        meta::{HeaderPolicy, RecordMeta},
    };

    /// A record handed in (a Seldon ndarray request of one row: they all merge), and where its
    /// reply comes.
    fn pending(offset: i64) -> (Pending, oneshot::Receiver<Reply>) {
        let part = codec::batch::part(Protocol::Seldon, br#"{"data":{"ndarray":[[1]]}}"#)
            .expect("a batch part");
        let (reply, rx) = oneshot::channel();
        let p = Pending {
            partition: 0,
            offset,
            headers: Vec::new(),
            part,
            arrived: tokio::time::Instant::now(),
            reply,
        };
        (p, rx)
    }

    /// SIGTERM while records are handed in (sent, not yet read by the batcher): each still gets
    /// its reply (its batch's answer, or run alone), none is dropped unanswered; then the
    /// batcher ends, and a record handed in after that is refused at once (its worker abandons
    /// it: left uncommitted, redone).
    #[tokio::test]
    async fn shutdown_answers_every_record_handed_in_before_it() {
        let (tx, rx) = channel();
        let (stop_tx, stop) = watch::channel(false);
        let mut replies = Vec::new();
        for o in 0..3 {
            let (p, r) = pending(o);
            tx.send(p)
                .map_err(|_| "send")
                .expect("the batcher takes records");
            replies.push(r);
        }
        stop_tx.send_replace(true);
        let batched = Arc::new(Mutex::new(Vec::new()));
        let b = batched.clone();
        let batcher = tokio::spawn(serve(
            Batches {
                size: 2,
                linger: Duration::from_secs(10),
            },
            stop,
            rx,
            |_| {},
            move |batch, _alone| {
                b.lock()
                    .unwrap()
                    .push(batch.iter().map(|p| p.offset).collect::<Vec<_>>());
                Box::pin(async move {
                    for p in batch {
                        let answer = Msg::Json(Bytes::from(format!("{{\"offset\":{}}}", p.offset)));
                        let meta = RecordMeta::of_record(
                            &[],
                            Protocol::Seldon,
                            &HeaderPolicy::parse("none"),
                            None,
                        );
                        let _ = p
                            .reply
                            .send(Reply::Done(Box::new(Outcome::Answer(answer, meta))));
                    }
                })
            },
        ));
        let mut got = Vec::new();
        for (o, r) in replies.into_iter().enumerate() {
            let reply = tokio::time::timeout(Duration::from_secs(5), r)
                .await
                .expect("a reply within 5 s");
            got.push(match reply {
                Ok(Reply::Done(o)) => match *o {
                    Outcome::Answer(Msg::Json(b), _) => String::from_utf8_lossy(&b).into_owned(),
                    _ => "another outcome".to_owned(),
                },
                Ok(Reply::Alone(_)) => "alone".to_owned(),
                Err(_) => format!("record {o} dropped unanswered"),
            });
        }
        assert_eq!(got, [r#"{"offset":0}"#, r#"{"offset":1}"#, "alone"]);
        assert_eq!(*batched.lock().unwrap(), [vec![0, 1]]);
        tokio::time::timeout(Duration::from_secs(5), batcher)
            .await
            .expect("the batcher ends within 5 s")
            .expect("the batcher task");
        let (late, _) = pending(3);
        assert!(tx.send(late).is_err(), "refused once the batcher ended");
    }
}
