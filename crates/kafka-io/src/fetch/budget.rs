//! The memory budget of fetched-but-unfinished records: one per consumer (process-wide in the
//! runner), like librdkafka's `queued.max.messages.kbytes` or the Java client's
//! `fetch.max.bytes`, but counted per decoded record ([`record_cost`]): a million tiny records
//! cost what they really cost once decoded, not the 7 bytes each takes inside a compressed batch.
//!
//! Each partition gets an equal share of the budget. A fetch asks a partition for at most what is
//! left of its share, and a partition holding half its share or more is left out of the next
//! Fetch (paused) until its records finish. Every handed-out record carries a [`Charge`] that
//! gives its cost back when the record is dropped (its result written, or the record given up).
//! So a slow partition fills only its own share and never holds up another.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use bytes::Bytes;
use tokio::sync::Notify;

/// What a decoded record costs besides its bytes: the record's own struct, its place in the
/// caller's queues, allocator slack (measured: ~250 bytes a record in the runner's queue).
pub const RECORD_OVERHEAD: usize = 256;
/// What a header costs besides its bytes (its String and Bytes).
pub const HEADER_OVERHEAD: usize = 64;
/// What an answer being written costs besides its bytes: the output record in the producer's
/// queue, the future waiting for its delivery, the record's metadata.
pub const ANSWER_OVERHEAD: usize = 512;
/// How many times an answer's bytes are in memory while it is written: ours (the output
/// record, until acknowledged), the encoded record batch, and the produce request being sent
/// (measured with the earlier rskafka producer, which also copied it twice: a backlog of 64 KB
/// answers took ~3x their charge in RSS when they counted once).
pub const ANSWER_COPIES: usize = 3;

/// The bytes a decoded record is charged.
pub fn record_cost(
    key: Option<&Bytes>,
    value: Option<&Bytes>,
    headers: &[(String, Bytes)],
) -> usize {
    RECORD_OVERHEAD
        + key.map_or(0, Bytes::len)
        + value.map_or(0, Bytes::len)
        + headers
            .iter()
            .map(|(k, v)| HEADER_OVERHEAD + k.len() + v.len())
            .sum::<usize>()
}

/// The whole budget.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    held: AtomicUsize,
    /// Told when a partition falls below its resume mark.
    pub(crate) freed: Notify,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            held: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged to records not yet finished.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn free(&self) -> usize {
        self.limit.saturating_sub(self.held())
    }
}

/// One partition's part of the budget.
#[derive(Debug)]
pub struct PartitionBudget {
    held: AtomicUsize,
    /// The partition's share of the budget.
    share: AtomicUsize,
    /// Falling below this wakes the fetcher (the partition may be fetched again).
    resume_below: AtomicUsize,
    global: Arc<Budget>,
}

impl PartitionBudget {
    pub fn new(global: Arc<Budget>) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            share: AtomicUsize::new(usize::MAX),
            resume_below: AtomicUsize::new(usize::MAX),
            global,
        })
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn set_resume_below(&self, mark: usize) {
        self.resume_below.store(mark, Ordering::Relaxed);
    }

    /// The partition's share: fetching pauses at half of it.
    pub fn set_share(&self, share: usize) {
        self.share.store(share, Ordering::Relaxed);
        self.set_resume_below(share / 2);
    }

    pub fn share(&self) -> usize {
        self.share.load(Ordering::Relaxed)
    }

    /// More is held than the share (answers being written count): start no more records.
    pub fn is_over(&self) -> bool {
        self.held() > self.share()
    }

    /// Charges `bytes` (the caller checked there is room).
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        self.held.fetch_add(bytes, Ordering::Relaxed);
        self.global.held.fetch_add(bytes, Ordering::Relaxed);
        Charge {
            part: Some(self.clone()),
            bytes,
        }
    }

    fn release(&self, bytes: usize) {
        let before = self.held.fetch_sub(bytes, Ordering::Relaxed);
        self.global.held.fetch_sub(bytes, Ordering::Relaxed);
        let mark = self.resume_below.load(Ordering::Relaxed);
        if before >= mark && before - bytes < mark {
            self.global.freed.notify_one();
        }
    }
}

/// A record's share of the budget, given back when dropped. A clone charges nothing (the
/// original keeps the charge).
#[derive(Debug, Default)]
pub struct Charge {
    part: Option<Arc<PartitionBudget>>,
    bytes: usize,
}

impl Charge {
    /// No charge (records made outside a fetch).
    pub fn none() -> Self {
        Self::default()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Charges `bytes` more to the same partition (e.g. the record's answer, while it is
    /// written): the fetcher sees less room. Nothing when the charge is none.
    pub fn add(&mut self, bytes: usize) {
        if let Some(p) = &self.part {
            p.held.fetch_add(bytes, Ordering::Relaxed);
            p.global.held.fetch_add(bytes, Ordering::Relaxed);
            self.bytes += bytes;
        }
    }
}

/// What a record's answer (or error record) costs while it is written: the output record, its
/// headers, and the futures that wait for the broker's acknowledgement; its bytes count
/// [`ANSWER_COPIES`] times.
pub fn answer_cost(value: Option<&Bytes>, headers: &[(String, Bytes)]) -> usize {
    ANSWER_OVERHEAD
        + ANSWER_COPIES
            * (value.map_or(0, Bytes::len)
                + headers
                    .iter()
                    .map(|(k, v)| HEADER_OVERHEAD + k.len() + v.len())
                    .sum::<usize>())
}

impl Clone for Charge {
    fn clone(&self) -> Self {
        Self::none()
    }
}

impl PartialEq for Charge {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Charge {}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(p) = self.part.take() {
            p.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_come_back_on_drop_and_wake_below_the_mark() {
        let b = Budget::new(1000);
        let p = PartitionBudget::new(b.clone());
        p.set_resume_below(300);
        let c1 = p.charge(200);
        let c2 = p.charge(200);
        assert_eq!((p.held(), b.held(), b.free()), (400, 400, 600));
        let copy = c1.clone();
        drop(copy);
        assert_eq!(b.held(), 400, "a clone charges nothing");
        drop(c1);
        assert_eq!(p.held(), 200);
        // Crossed below 300: a permit is stored for the fetcher.
        let woke = b.freed.notified();
        tokio::pin!(woke);
        assert!(woke.as_mut().enable() || futures_ready(woke));
        drop(c2);
        assert_eq!((p.held(), b.held()), (0, 0));
    }

    fn futures_ready(f: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        f.poll(&mut cx).is_ready()
    }

    use std::future::Future;

    #[test]
    fn cost_counts_bytes_and_overheads() {
        let v = Bytes::from_static(b"hello");
        let h = vec![("a".to_string(), Bytes::from_static(b"xy"))];
        assert_eq!(
            record_cost(None, Some(&v), &h),
            RECORD_OVERHEAD + 5 + HEADER_OVERHEAD + 3
        );
        assert_eq!(record_cost(None, None, &[]), RECORD_OVERHEAD);
    }
}
