//! The producer: one task per target partition that batches queued records (linger, size cap;
//! a longer linger while the caller signals pressure: more records on their way), sends one
//! batch at a time with acks=all, and retries a failed batch with capped backoff before
//! any later one, so records land in the order they were queued. Each record gets a
//! [`Delivery`] that resolves to its offset once the broker has acknowledged it, or to a
//! [`ProduceError`] that says why it never will be (too large, rejected, topic missing).
//!
//! Sizes: a batch never exceeds the topic's limit (the broker's `max.message.bytes` where it
//! reports it, capped by `max_request_size` as Java's `max.request.size`); a single record above
//! that limit is refused by [`Producer::send`] before it is queued (`Error::Produce`), so the
//! caller can put something else in its place, in order.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use rskafka::{chrono::Utc, client::partition::Compression, record::Record as RsRecord};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{
    backoff::Backoff,
    cluster::{Cluster, bounded},
    error::{Error, Result},
};

/// A record to write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutRecord {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// Header names are unique per record (rskafka keeps headers in a map).
    pub headers: Vec<(String, Bytes)>,
}

/// Bytes of a record batch header (magic v2), before its records.
const BATCH_OVERHEAD: usize = 61;

impl OutRecord {
    /// An upper bound of the record's encoded size inside a batch (varints at their widest).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 10)
                .sum::<usize>()
            + 36
    }

    /// The size of a batch holding only this record.
    pub fn batch_size(&self) -> usize {
        self.size() + BATCH_OVERHEAD
    }
}

/// Why a record will not be written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProduceError {
    /// The record alone is above the topic's limit: retrying cannot help.
    #[error("record of {size} bytes is larger than the {max} bytes topic {topic} accepts")]
    TooLarge {
        topic: String,
        size: usize,
        max: usize,
    },
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    /// The broker refused the batch for good (authorization, invalid record, ...).
    #[error("the broker rejected the record for topic {topic}: {why}")]
    Rejected { topic: String, why: String },
    #[error("the producer is closed")]
    Closed,
}

impl ProduceError {
    /// A short stable name for headers and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too-large",
            Self::UnknownTopic(_) => "unknown-topic",
            Self::Rejected { .. } => "rejected",
            Self::Closed => "closed",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompressionCodec {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl std::str::FromStr for CompressionCodec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Self::None),
            "gzip" => Ok(Self::Gzip),
            "snappy" => Ok(Self::Snappy),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd),
            o => Err(format!(
                "unknown compression `{o}` (none, gzip, snappy, lz4, zstd)"
            )),
        }
    }
}

impl From<CompressionCodec> for Compression {
    fn from(c: CompressionCodec) -> Self {
        match c {
            CompressionCodec::None => Compression::NoCompression,
            CompressionCodec::Gzip => Compression::Gzip,
            CompressionCodec::Snappy => Compression::Snappy,
            CompressionCodec::Lz4 => Compression::Lz4,
            CompressionCodec::Zstd => Compression::Zstd,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProducerConfig {
    pub linger: Duration,
    /// The longest linger while `pressure` is above zero: the caller has more records on their
    /// way (its work is queued behind a slower stage), so waiting for them makes fewer, larger
    /// produce requests without slowing the stream down. At least `linger`.
    pub linger_max: Duration,
    /// Set by the caller: above zero while more records are certain to follow soon.
    pub pressure: Option<Arc<AtomicUsize>>,
    /// Largest produce batch (and so largest record) sent, as Java's `max.request.size`; the
    /// topic's `max.message.bytes` lowers it where the broker reports it.
    pub max_request_size: usize,
    pub compression: CompressionCodec,
    /// Records queued per partition before `send` waits (bounds memory).
    pub queue_per_partition: usize,
    /// Longest wait between retries of a failed batch.
    pub max_backoff: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            linger: Duration::from_millis(2),
            linger_max: Duration::from_millis(2),
            pressure: None,
            max_request_size: 1024 * 1024,
            compression: CompressionCodec::None,
            queue_per_partition: 10_000,
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Resolves to the record's offset once the broker acknowledged it (acks=all).
pub struct Delivery(oneshot::Receiver<Result<i64, ProduceError>>);

impl Delivery {
    pub async fn wait(self) -> Result<i64, ProduceError> {
        match self.0.await {
            Ok(r) => r,
            Err(_) => Err(ProduceError::Closed),
        }
    }
}

type Queued = (OutRecord, oneshot::Sender<Result<i64, ProduceError>>);

pub struct Producer {
    cluster: Arc<Cluster>,
    config: ProducerConfig,
    /// topic -> partition -> that partition's writer (looked up without allocating).
    queues: Mutex<HashMap<String, HashMap<i32, mpsc::Sender<Queued>>>>,
    counts: Mutex<HashMap<String, i32>>,
    /// topic -> largest batch it accepts.
    limits: Mutex<HashMap<String, usize>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Producer {
    pub fn new(cluster: Arc<Cluster>, config: ProducerConfig) -> Self {
        Self {
            cluster,
            config,
            queues: Mutex::new(HashMap::new()),
            counts: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// The largest batch `topic` accepts: `max_request_size`, lowered by the topic's
    /// `max.message.bytes` when the broker reports it (asked once per topic).
    pub async fn max_batch_bytes(&self, topic: &str) -> usize {
        if let Some(n) = self.limits.lock().await.get(topic) {
            return *n;
        }
        let n = match self.cluster.topic_max_message_bytes(topic).await {
            Ok(Some(m)) => m.min(self.config.max_request_size),
            Ok(None) => self.config.max_request_size,
            Err(e) => {
                tracing::debug!(%topic, error = %e, "max.message.bytes unknown; using max_request_size");
                self.config.max_request_size
            }
        };
        self.limits.lock().await.insert(topic.to_owned(), n);
        n
    }

    /// Refuses a record that cannot fit in a batch for `topic` (before it is queued).
    pub async fn check_size(&self, topic: &str, record: &OutRecord) -> Result<(), ProduceError> {
        let max = self.max_batch_bytes(topic).await;
        let size = record.batch_size();
        if size > max {
            return Err(ProduceError::TooLarge {
                topic: topic.to_owned(),
                size,
                max,
            });
        }
        Ok(())
    }

    /// The partition count of `topic` (cached after the first look-up).
    pub async fn partition_count(&self, topic: &str) -> Result<i32> {
        if let Some(n) = self.counts.lock().await.get(topic) {
            return Ok(*n);
        }
        let n = *self
            .cluster
            .partition_counts(&[topic.to_owned()])
            .await?
            .get(topic)
            .ok_or_else(|| Error::UnknownTopic(topic.to_owned()))?;
        self.counts.lock().await.insert(topic.to_owned(), n);
        Ok(n)
    }

    /// Queues `record` for `topic`: to `partition` if given, else by murmur2 of the key (as
    /// Java's default partitioner), else partition 0. Queue order is write order within a
    /// partition. Waits only when that partition's queue is full.
    pub async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        record: OutRecord,
    ) -> Result<Delivery> {
        let partition = match (partition, &record.key) {
            (Some(p), _) => p,
            (None, Some(k)) => partition_for_key(k, self.partition_count(topic).await?),
            (None, None) => 0,
        };
        self.check_size(topic, &record).await?;
        let tx = self.queue(topic, partition).await;
        let (done, rx) = oneshot::channel();
        tx.send((record, done)).await.map_err(|_| Error::Closed)?;
        Ok(Delivery(rx))
    }

    async fn queue(&self, topic: &str, partition: i32) -> mpsc::Sender<Queued> {
        let mut queues = self.queues.lock().await;
        if let Some(q) = queues.get(topic).and_then(|t| t.get(&partition)) {
            return q.clone();
        }
        let (tx, rx) = mpsc::channel(self.config.queue_per_partition);
        let max_batch = self.max_batch_bytes(topic).await;
        let task = tokio::spawn(partition_writer(
            self.cluster.clone(),
            self.config.clone(),
            topic.to_owned(),
            partition,
            max_batch,
            rx,
        ));
        self.tasks.lock().await.push(task);
        queues
            .entry(topic.to_owned())
            .or_default()
            .insert(partition, tx.clone());
        tx
    }

    /// Stops taking records and waits (up to `timeout`) for every queued one to be written.
    pub async fn close(&self, timeout: Duration) -> Result<()> {
        self.queues.lock().await.clear();
        let tasks = std::mem::take(&mut *self.tasks.lock().await);
        let all = futures_join(tasks);
        tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| Error::Timeout {
                call: "Produce (flush on close)",
                broker: String::new(),
                after: timeout,
            })
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

async fn partition_writer(
    cluster: Arc<Cluster>,
    cfg: ProducerConfig,
    topic: String,
    partition: i32,
    max_batch: usize,
    mut rx: mpsc::Receiver<Queued>,
) {
    let mut client = None;
    let mut backoff = Backoff::new(Duration::from_millis(50), cfg.max_backoff);
    let mut batch: Vec<Queued> = Vec::new();
    // A record taken from the queue that did not fit in the last batch: it starts the next one.
    let mut carry: Option<Queued> = None;
    // Since when the partition's leader cannot be found (a deleted topic ends the wait).
    let mut leaderless_since: Option<tokio::time::Instant> = None;
    loop {
        if batch.is_empty() {
            let first = match carry.take() {
                Some(q) => q,
                None => match rx.recv().await {
                    Some(q) => q,
                    None => return,
                },
            };
            // Linger for more, up to the batch size (never past it); up to `linger_max` while
            // the caller says more records are on their way, looking again every `linger`
            // (pressure that ends sends the batch then).
            let pressed = || {
                cfg.pressure
                    .as_ref()
                    .is_some_and(|p| p.load(Ordering::Relaxed) > 0)
            };
            let start = tokio::time::Instant::now();
            let short = start + cfg.linger;
            let long = start + cfg.linger_max.max(cfg.linger);
            let step = cfg.linger.max(Duration::from_millis(1));
            let mut bytes = BATCH_OVERHEAD + first.0.size();
            batch.push(first);
            loop {
                let next = match rx.try_recv() {
                    Ok(q) => Some(q),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) => loop {
                        let now = tokio::time::Instant::now();
                        let until = if now < short {
                            short
                        } else if now < long && pressed() {
                            long.min(now + step)
                        } else {
                            break None;
                        };
                        match tokio::time::timeout_at(until, rx.recv()).await {
                            Ok(q) => break q,
                            Err(_) => continue,
                        }
                    },
                };
                let Some(q) = next else { break };
                let size = q.0.size();
                if bytes + size > max_batch {
                    carry = Some(q);
                    break;
                }
                bytes += size;
                batch.push(q);
            }
        }
        let pc = match &client {
            Some(c) => Arc::clone(c),
            None => match cluster.partition(&topic, partition).await {
                Ok(c) => {
                    leaderless_since = None;
                    client = Some(c.clone());
                    c
                }
                Err(e) => {
                    let since = *leaderless_since.get_or_insert_with(tokio::time::Instant::now);
                    if matches!(e, Error::UnknownTopic(_))
                        || (is_unknown_topic(&e) && since.elapsed() >= cluster.request_timeout)
                    {
                        tracing::error!(%topic, partition, error = %e, "producer: topic does not exist");
                        for (_, done) in batch.drain(..) {
                            let _ = done.send(Err(ProduceError::UnknownTopic(topic.clone())));
                        }
                        continue;
                    }
                    tracing::warn!(%topic, partition, error = %e, "producer: partition leader unknown, retrying");
                    tokio::time::sleep(backoff.next_wait()).await;
                    continue;
                }
            },
        };
        let now = Utc::now();
        let records: Vec<RsRecord> = batch
            .iter()
            .map(|(r, _)| RsRecord {
                key: r.key.as_ref().map(|k| k.to_vec()),
                value: r.value.as_ref().map(|v| v.to_vec()),
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_vec()))
                    .collect::<BTreeMap<_, _>>(),
                timestamp: now,
            })
            .collect();
        match bounded(
            "Produce",
            &topic,
            cluster.request_timeout,
            pc.produce(records, cfg.compression.into()),
        )
        .await
        {
            Ok(offsets) => {
                backoff.reset();
                for ((_, done), o) in batch.drain(..).zip(offsets) {
                    let _ = done.send(Ok(o));
                }
            }
            Err(e) if is_fatal_produce(&e) => {
                tracing::error!(%topic, partition, error = %e, "producer: batch rejected");
                let too_large = is_too_large(&e);
                for (r, done) in batch.drain(..) {
                    let err = if too_large {
                        ProduceError::TooLarge {
                            topic: topic.clone(),
                            size: r.batch_size(),
                            max: max_batch,
                        }
                    } else {
                        ProduceError::Rejected {
                            topic: topic.clone(),
                            why: e.to_string(),
                        }
                    };
                    let _ = done.send(Err(err));
                }
            }
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::warn!(%topic, partition, error = %e, retry_in = ?wait, "producer: batch failed, retrying");
                client = None;
                cluster.forget_partition(&topic, partition).await;
                tokio::time::sleep(wait).await;
            }
        }
    }
}

fn is_too_large(e: &Error) -> bool {
    use rskafka::client::error::{Error as RsError, ProtocolError as P};
    matches!(
        e,
        Error::Client(RsError::ServerError {
            protocol_error: P::MessageTooLarge | P::RecordListTooLarge,
            ..
        })
    )
}

fn is_unknown_topic(e: &Error) -> bool {
    use rskafka::client::error::{Error as RsError, ProtocolError as P};
    match e {
        Error::Client(RsError::ServerError {
            protocol_error: P::UnknownTopicOrPartition,
            ..
        }) => true,
        Error::Client(e) => e.to_string().contains("UnknownTopicOrPartition"),
        _ => false,
    }
}

fn is_fatal_produce(e: &Error) -> bool {
    use rskafka::client::error::{Error as RsError, ProtocolError as P};
    matches!(
        e,
        Error::Client(RsError::ServerError {
            protocol_error: P::MessageTooLarge
                | P::RecordListTooLarge
                | P::InvalidRecord
                | P::CorruptMessage
                | P::TopicAuthorizationFailed
                | P::InvalidTopicException,
            ..
        })
    )
}

/// Java's `Utils.murmur2` (seed 0x9747b28c), as used by the default partitioner.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match rest.len() {
        3 => {
            h ^= u32::from(rest[2]) << 16;
            h ^= u32::from(rest[1]) << 8;
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= u32::from(rest[1]) << 8;
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Java's default partitioner picks for a keyed record.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_java() {
        // Values from Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (input, want) in cases {
            assert_eq!(murmur2(input), want, "{:?}", String::from_utf8_lossy(input));
        }
    }
}
