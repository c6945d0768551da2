//! The producer, on our own broker connection ([`crate::conn`], kafka-protocol's Produce and
//! InitProducerId): one task per target partition that batches queued records (linger, size
//! cap; a longer linger while the caller signals pressure: more records on their way), encodes
//! them as one record batch v2 ([`batch`]: the records' bytes go straight into the batch
//! buffer), and sends it with acks=all to the partition's leader (found through Metadata,
//! looked up again after a leadership error or a lost connection). Records land in the order
//! they were queued. Each record gets a [`Delivery`] that resolves to its offset once the
//! broker has acknowledged it, or to a [`ProduceError`] that says why it never will be (too
//! large, rejected, topic missing); deliveries resolve in queue order.
//!
//! In flight: with idempotence, up to [`ProducerConfig::max_in_flight`] (default and at most
//! [`MAX_IN_FLIGHT`], 5: the broker checks duplicates against a producer's last 5 batches)
//! Produce requests per partition are outstanding, pipelined on the writer's connection
//! ([`BrokerConn::send_pipelined`], answers read in order), each batch with its own base
//! sequence, as the Java client with `enable.idempotence=true` and
//! `max.in.flight.requests.per.connection=5`. A lost connection or a retriable error of the
//! oldest batch drops the connection and resends it and every later outstanding batch, in
//! order, with the same sequences (the broker answers DUPLICATE_SEQUENCE_NUMBER for those it
//! has). A batch refused without being written (MESSAGE_TOO_LARGE, RECORD_LIST_TOO_LARGE,
//! CORRUPT_MESSAGE, INVALID_RECORD) makes the broker refuse the outstanding ones after it as
//! OUT_OF_ORDER_SEQUENCE_NUMBER: their answers are read (drained) first, then they are sent
//! again after it (after its split halves, which take its sequences; or with their sequences
//! moved down to follow the last batch written). A batch refused for good with its write
//! unknown (any other error: UNKNOWN_SERVER_ERROR, ...) fails, and no later batch takes its
//! sequence (the broker would take it for a duplicate): the outstanding ones are answered as
//! they come (written if it was; else out of order, then sent again under a new id), and the
//! partition's next batch goes out under a new producer id (as Java bumps the epoch;
//! transactional: the transaction fails and can only be aborted). A batch is only failed once
//! it is the oldest unresolved one, and a partition only moves to a new producer id with none
//! of its batches outstanding. Answers are read while the next batch lingers, and the oldest
//! outstanding answer is due a whole answer time after it became the oldest (the broker answers
//! a connection's requests in turn). Without idempotence one request is in flight per
//! partition (a retried batch would land after a later one).
//!
//! Idempotence (on by default, [`ProducerConfig::idempotent`]): one producer id for the whole
//! producer (InitProducerId v3+, producer id and epoch -1, no transactional id), a sequence
//! number per partition (from 0, += the batch's record count, wrapping at i32::MAX to 0). A
//! retried batch is resent byte for byte, with its sequence, so a Produce whose response was
//! lost is not written twice: the broker answers DUPLICATE_SEQUENCE_NUMBER, which counts as
//! written (its offset is unknown then: the deliveries resolve to -1). A batch that went out
//! keeps the producer id, epoch and sequence it carries until it is resolved, whatever the
//! other partitions do. OUT_OF_ORDER_SEQUENCE_NUMBER, UNKNOWN_PRODUCER_ID,
//! INVALID_PRODUCER_EPOCH and PRODUCER_FENCED get a new producer id (shared: one per
//! refused generation): the partition that got the answer starts its sequences again at 0 and
//! resends its batches under it, so a batch whose earlier write the broker forgot may be
//! written twice (as with the Java client's epoch bump). Every other partition goes on
//! resending its sent batches under the old id (the broker still tells their duplicates),
//! sends no new batch while they are unresolved, and then moves to the new id with its
//! sequences from 0 (as Java's `maybeUpdateProducerIdAndEpoch`). A broker that
//! refuses InitProducerId (no such API, CLUSTER_AUTHORIZATION_FAILED) fails each record with an
//! error naming the runner's flag to turn idempotence off.
//!
//! Throttling: a `throttle_time_ms` above zero in a Produce response never causes a resend (the
//! broker has appended the batch); it delays the next request to that broker by that long, and
//! adds to [`Producer::throttled_ms`].
//!
//! Sizes: a batch never exceeds the topic's limit (the broker's `max.message.bytes` where it
//! reports it, capped by `max_request_size` as Java's `max.request.size`; asked again every
//! [`LIMIT_REFRESH`], after a failed DescribeConfigs within [`LIMIT_RETRY`], and after the
//! broker refused a batch as too large); a single
//! record above that limit is refused by [`Producer::send`] before it is queued
//! (`Error::Produce`), so the caller can put something else in its place, in order. A
//! multi-record batch the broker still refuses as MESSAGE_TOO_LARGE or RECORD_LIST_TOO_LARGE
//! (the topic's limit was lowered) is split in halves and retried, in order; only a record
//! refused alone becomes [`ProduceError::TooLarge`].

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use kafka_protocol::{
    error::ResponseError,
    messages::{
        InitProducerIdRequest, ProduceRequest, ProducerId, TopicName, TransactionalId,
        produce_request::{PartitionProduceData, TopicProduceData},
    },
    protocol::StrBytes,
};
use tokio::{
    sync::{Mutex, mpsc, oneshot},
    time::Instant,
};

use crate::{
    assignor::Tp,
    backoff::Backoff,
    cluster::Cluster,
    conn::{BrokerConn, Connector, broker_error},
    error::{Error, Result},
    txn::{TxnConfig, TxnCoordinator, TxnError, TxnOffsets},
};

pub mod batch;

/// A record to write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutRecord {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// In order; written as given (duplicate names are kept).
    pub headers: Vec<(String, Bytes)>,
}

/// Bytes of a record batch header (magic v2), before its records.
const BATCH_OVERHEAD: usize = batch::BATCH_HEADER;
/// Produce v3 is the first with record batches v2; v9 the last before topic ids (v13) that
/// every broker we meet speaks (tansu advertises 0-11).
const PRODUCE_MIN_VERSION: i16 = 3;
const PRODUCE_MAX_VERSION: i16 = 9;
/// InitProducerId v3+ sends producer id and epoch (-1 for a new id; tansu needs v3+).
const INIT_PID_MAX_VERSION: i16 = 4;
/// How often the topic's `max.message.bytes` is asked again.
pub const LIMIT_REFRESH: Duration = Duration::from_secs(300);
/// When a failed DescribeConfigs is tried again.
pub const LIMIT_RETRY: Duration = Duration::from_secs(30);
/// The most Produce requests outstanding per partition: the broker checks a resent batch for
/// duplicates against the last 5 batches of its producer.
pub const MAX_IN_FLIGHT: usize = 5;
/// What the runner calls the switch (named in the error when the broker refuses idempotence).
const IDEMPOTENCE_FLAG: &str = "--idempotence false (KAFKA_INFER_IDEMPOTENCE=false)";
const EXACTLY_ONCE_FLAG: &str = "--exactly-once false (KAFKA_INFER_EXACTLY_ONCE=false)";

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
    /// The record's transaction failed (fenced, or a call failed for good): it is aborted, so
    /// the record is not written; the caller aborts and redoes the transaction's input.
    #[error("the transaction failed: {0}")]
    Transaction(String),
}

impl ProduceError {
    /// A short stable name for headers and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too-large",
            Self::UnknownTopic(_) => "unknown-topic",
            Self::Rejected { .. } => "rejected",
            Self::Closed => "closed",
            Self::Transaction(_) => "transaction",
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
    /// Idempotent producing (producer id and sequence numbers): a resent batch is not written
    /// twice. On by default, as in the Java client (3.0+).
    pub idempotent: bool,
    /// Produce requests outstanding per partition with idempotence (Java's
    /// `max.in.flight.requests.per.connection`): default and at most [`MAX_IN_FLIGHT`] (the
    /// broker remembers the last 5 batches of a producer for duplicates); 1 without
    /// idempotence whatever is set (a retried batch would land after a later one).
    pub max_in_flight: usize,
    /// How often a topic's `max.message.bytes` is asked again (default [`LIMIT_REFRESH`]).
    pub limit_refresh: Duration,
    /// When a failed DescribeConfigs is tried again (default [`LIMIT_RETRY`]); meanwhile the
    /// last known limit (at first `max_request_size`) holds.
    pub limit_retry: Duration,
    /// Transactional producing (implies idempotence): batches belong to the open transaction
    /// of this transactional id, ended by [`Producer::commit_transaction`] or
    /// [`Producer::abort_transaction`].
    pub transactional: Option<TxnConfig>,
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
            idempotent: true,
            max_in_flight: MAX_IN_FLIGHT,
            limit_refresh: LIMIT_REFRESH,
            limit_retry: LIMIT_RETRY,
            transactional: None,
        }
    }
}

/// Resolves to the record's offset once the broker acknowledged it (acks=all); -1 when the
/// broker said the batch was already written (DUPLICATE_SEQUENCE_NUMBER: offset unknown).
pub struct Delivery(oneshot::Receiver<Result<i64, ProduceError>>);

impl Delivery {
    pub async fn wait(self) -> Result<i64, ProduceError> {
        match self.0.await {
            Ok(r) => r,
            Err(_) => Err(ProduceError::Closed),
        }
    }
}

type Queued = (OutRecord, Done);

/// Called once the record's batch is acknowledged (before its [`Delivery`] resolves, and,
/// with transactions, before [`Producer::flush`] returns).
pub type OnWritten = Box<dyn FnOnce() + Send>;

/// Where a queued record's outcome goes: its [`Delivery`], its [`OnWritten`], and the
/// producer's count of records not yet resolved (for [`Producer::flush`]).
struct Done {
    tx: Option<oneshot::Sender<Result<i64, ProduceError>>>,
    on_written: Option<OnWritten>,
    shared: Arc<Shared>,
    /// Transactional: aborts before the record was queued (a later abort drops it unsent).
    aborts: u64,
}

impl Done {
    fn send(mut self, r: Result<i64, ProduceError>) -> Result<(), ()> {
        if r.is_ok()
            && let Some(f) = self.on_written.take()
        {
            f();
        }
        let tx = self.tx.take().expect("sent once");
        tx.send(r).map_err(|_| ())
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if self.shared.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

/// A topic's batch size limit, shared with its writers.
#[derive(Debug)]
struct Limit {
    bytes: AtomicUsize,
    /// A writer saw the broker refuse a batch under it: ask again at the next send.
    stale: AtomicBool,
}

struct TopicLimit {
    limit: Arc<Limit>,
    /// When to ask the broker again.
    refresh_at: Instant,
}

/// The producer id and epoch batches carry; `generation` counts InitProducerId answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pid {
    id: i64,
    epoch: i16,
    generation: u64,
}

/// What every partition writer shares: the producer id, the brokers' throttles.
struct Shared {
    connector: Connector,
    idempotent: bool,
    pid: Mutex<Option<Pid>>,
    generations: AtomicU64,
    /// Broker address -> no request before.
    throttled_until: std::sync::Mutex<HashMap<String, Instant>>,
    throttled_ms: AtomicU64,
    /// Produce requests sent (retries included).
    requests: AtomicU64,
    /// The transactional id (empty when not transactional).
    txn_id: StrBytes,
    /// Records queued and not yet resolved; `idle` is told when it drops to zero.
    outstanding: AtomicUsize,
    /// Transactions aborted: records queued before an abort are never sent after it.
    aborts: AtomicU64,
    /// Flushes waiting: writers send what they hold without lingering (`flush_now` wakes them).
    flushing: AtomicUsize,
    flush_now: tokio::sync::Notify,
    idle: tokio::sync::Notify,
    /// The transaction state (transactional producing only).
    txn: Option<Mutex<TxnState>>,
}

/// The open transaction.
struct TxnState {
    coordinator: TxnCoordinator,
    /// Partitions added to the open transaction (AddPartitionsToTxn answered).
    added: BTreeSet<Tp>,
    /// Why the open transaction cannot commit (it can only be aborted).
    failed: Option<TxnError>,
}

/// Why a producer id could not be had.
enum PidError {
    /// The broker refuses idempotent producing: stop and say how to turn it off.
    Refused(String),
    Retry(Error),
}

impl Shared {
    /// The current producer id; a new one when `stale` names the current generation (the
    /// broker forgot or fenced it).
    async fn producer_id(&self, stale: Option<u64>) -> Result<Pid, PidError> {
        let mut cur = self.pid.lock().await;
        if let Some(p) = *cur
            && stale != Some(p.generation)
        {
            return Ok(p);
        }
        let p = match &self.txn {
            Some(t) => {
                let mut t = t.lock().await;
                match t.coordinator.init().await {
                    Ok((id, epoch)) => {
                        t.failed = None;
                        t.added.clear();
                        Pid {
                            id,
                            epoch,
                            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
                        }
                    }
                    Err(e @ TxnError::Unauthorized { .. }) => {
                        return Err(PidError::Refused(format!(
                            "the broker refuses transactions ({e}); turn exactly-once off ({EXACTLY_ONCE_FLAG})"
                        )));
                    }
                    Err(e) => {
                        return Err(PidError::Retry(Error::Protocol {
                            call: "InitProducerId",
                            why: e.to_string(),
                        }));
                    }
                }
            }
            None => self.init_producer_id().await?,
        };
        tracing::info!(
            producer_id = p.id,
            epoch = p.epoch,
            "producer: idempotent producer id"
        );
        *cur = Some(p);
        Ok(p)
    }

    async fn init_producer_id(&self) -> Result<Pid, PidError> {
        let refused = |why: String| {
            PidError::Refused(format!(
                "the broker refuses idempotent producing ({why}); turn idempotence off with {IDEMPOTENCE_FLAG}"
            ))
        };
        let mut conn = self
            .connector
            .connect_any()
            .await
            .map_err(PidError::Retry)?;
        let v = match conn.version::<InitProducerIdRequest>("InitProducerId", INIT_PID_MAX_VERSION)
        {
            Ok(v) => v,
            Err(e) => return Err(refused(e.to_string())),
        };
        let mut req = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000);
        if v >= 3 {
            req = req.with_producer_id(ProducerId(-1)).with_producer_epoch(-1);
        }
        let resp = conn
            .send(req, v, "InitProducerId")
            .await
            .map_err(PidError::Retry)?;
        if resp.error_code != 0 {
            let e = broker_error("InitProducerId", resp.error_code, None);
            return Err(match e.broker_error() {
                Some(
                    ResponseError::ClusterAuthorizationFailed
                    | ResponseError::TransactionalIdAuthorizationFailed
                    | ResponseError::UnsupportedVersion
                    | ResponseError::UnsupportedForMessageFormat,
                ) => refused(e.to_string()),
                _ => PidError::Retry(e),
            });
        }
        Ok(Pid {
            id: resp.producer_id.0,
            epoch: resp.producer_epoch,
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }

    fn transactional_id(&self) -> Option<StrBytes> {
        self.txn.as_ref().map(|_| self.txn_id.clone())
    }

    /// Adds the partition to the open transaction (once per transaction); the transaction's
    /// error if it already failed.
    async fn join_transaction(&self, topic: &str, partition: i32) -> Result<(), TxnError> {
        let Some(t) = &self.txn else { return Ok(()) };
        let mut t = t.lock().await;
        if let Some(e) = &t.failed {
            return Err(e.clone());
        }
        let tp = (topic.to_owned(), partition);
        if t.added.contains(&tp) {
            return Ok(());
        }
        match t
            .coordinator
            .add_partitions(std::slice::from_ref(&tp))
            .await
        {
            Ok(()) => {
                t.added.insert(tp);
                Ok(())
            }
            Err(e) => {
                t.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The open transaction cannot commit any more.
    async fn fail_transaction(&self, e: TxnError) {
        if let Some(t) = &self.txn {
            let mut t = t.lock().await;
            if t.failed.is_none() {
                t.failed = Some(e);
            }
        }
    }

    /// Waits while `broker` throttles us.
    async fn wait_throttle(&self, broker: &str) {
        let until = self.throttled_until.lock().unwrap().get(broker).copied();
        if let Some(t) = until
            && t > Instant::now()
        {
            tokio::time::sleep_until(t).await;
        }
    }

    fn throttle(&self, broker: &str, ms: i32) {
        if ms <= 0 {
            return;
        }
        let until = Instant::now() + Duration::from_millis(ms as u64);
        let mut m = self.throttled_until.lock().unwrap();
        let e = m.entry(broker.to_owned()).or_insert(until);
        *e = (*e).max(until);
        self.throttled_ms.fetch_add(ms as u64, Ordering::Relaxed);
    }
}

pub struct Producer {
    cluster: Arc<Cluster>,
    config: ProducerConfig,
    shared: Arc<Shared>,
    /// topic -> partition -> that partition's writer (looked up without allocating).
    queues: Mutex<HashMap<String, HashMap<i32, mpsc::Sender<Queued>>>>,
    counts: Mutex<HashMap<String, i32>>,
    /// topic -> largest batch it accepts.
    limits: Mutex<HashMap<String, TopicLimit>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Producer {
    pub fn new(cluster: Arc<Cluster>, config: ProducerConfig) -> Self {
        let mut connector = cluster.connector.clone();
        connector.request_timeout = cluster.request_timeout;
        connector.connect_timeout = connector.connect_timeout.min(cluster.request_timeout);
        Self {
            shared: Arc::new(Shared {
                connector: connector.clone(),
                idempotent: config.idempotent || config.transactional.is_some(),
                pid: Mutex::new(None),
                generations: AtomicU64::new(0),
                throttled_until: std::sync::Mutex::new(HashMap::new()),
                throttled_ms: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                txn_id: StrBytes::from_string(
                    config
                        .transactional
                        .as_ref()
                        .map(|t| t.transactional_id.clone())
                        .unwrap_or_default(),
                ),
                outstanding: AtomicUsize::new(0),
                aborts: AtomicU64::new(0),
                flushing: AtomicUsize::new(0),
                flush_now: tokio::sync::Notify::new(),
                idle: tokio::sync::Notify::new(),
                txn: config.transactional.clone().map(|t| {
                    Mutex::new(TxnState {
                        coordinator: TxnCoordinator::new(connector.clone(), t),
                        added: BTreeSet::new(),
                        failed: None,
                    })
                }),
            }),
            cluster,
            config,
            queues: Mutex::new(HashMap::new()),
            counts: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Milliseconds the brokers' quotas have throttled us (the sum of `throttle_time_ms` in
    /// Produce responses): a counter for metrics.
    pub fn throttled_ms(&self) -> u64 {
        self.shared.throttled_ms.load(Ordering::Relaxed)
    }

    /// Produce requests sent so far, retries included.
    pub fn produce_requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// The largest batch `topic` accepts: `max_request_size`, lowered by the topic's
    /// `max.message.bytes` when the broker reports it (asked again every [`LIMIT_REFRESH`];
    /// after a failure, within [`LIMIT_RETRY`], keeping the last known value meanwhile).
    pub async fn max_batch_bytes(&self, topic: &str) -> usize {
        self.limit(topic).await.bytes.load(Ordering::Relaxed)
    }

    async fn limit(&self, topic: &str) -> Arc<Limit> {
        let mut limits = self.limits.lock().await;
        let now = Instant::now();
        if let Some(l) = limits.get(topic)
            && l.refresh_at > now
            && !l.limit.stale.load(Ordering::Relaxed)
        {
            return l.limit.clone();
        }
        let max = self.config.max_request_size;
        let (n, next) = match self.cluster.topic_max_message_bytes(topic).await {
            Ok(Some(m)) => (Some(m.min(max)), self.config.limit_refresh),
            Ok(None) => (Some(max), self.config.limit_refresh),
            Err(e) => {
                tracing::debug!(%topic, error = %e, "max.message.bytes unknown; asking again later");
                (None, self.config.limit_retry)
            }
        };
        let entry = limits
            .entry(topic.to_owned())
            .or_insert_with(|| TopicLimit {
                limit: Arc::new(Limit {
                    bytes: AtomicUsize::new(max),
                    stale: AtomicBool::new(false),
                }),
                refresh_at: now,
            });
        if let Some(n) = n {
            entry.limit.bytes.store(n, Ordering::Relaxed);
        }
        entry.limit.stale.store(false, Ordering::Relaxed);
        entry.refresh_at = now + next;
        entry.limit.clone()
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
        self.send_with(topic, partition, record, None).await
    }

    /// [`send`](Self::send), and `on_written` is called once the broker acknowledged the
    /// record (in the writer task, before the delivery resolves; not called if it fails).
    pub async fn send_with(
        &self,
        topic: &str,
        partition: Option<i32>,
        record: OutRecord,
        on_written: Option<OnWritten>,
    ) -> Result<Delivery> {
        let partition = match (partition, &record.key) {
            (Some(p), _) => p,
            (None, Some(k)) => partition_for_key(k, self.partition_count(topic).await?),
            (None, None) => 0,
        };
        self.check_size(topic, &record).await?;
        let tx = self.queue(topic, partition).await;
        let (done, rx) = oneshot::channel();
        self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
        let done = Done {
            tx: Some(done),
            on_written,
            shared: self.shared.clone(),
            aborts: self.shared.aborts.load(Ordering::Acquire),
        };
        tx.send((record, done)).await.map_err(|_| Error::Closed)?;
        Ok(Delivery(rx))
    }

    async fn queue(&self, topic: &str, partition: i32) -> mpsc::Sender<Queued> {
        let mut queues = self.queues.lock().await;
        if let Some(q) = queues.get(topic).and_then(|t| t.get(&partition)) {
            return q.clone();
        }
        let (tx, rx) = mpsc::channel(self.config.queue_per_partition);
        let limit = self.limit(topic).await;
        let writer = Writer {
            cluster: self.cluster.clone(),
            shared: self.shared.clone(),
            cfg: self.config.clone(),
            topic: topic.to_owned(),
            partition,
            limit,
        };
        let task = tokio::spawn(writer.run(rx));
        self.tasks.lock().await.push(task);
        queues
            .entry(topic.to_owned())
            .or_default()
            .insert(partition, tx.clone());
        tx
    }

    /// Records queued and not yet resolved (written or failed).
    pub fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::Acquire)
    }

    /// Waits until every queued record is resolved (written or failed), up to `timeout`;
    /// false on timeout. Records sent meanwhile are waited for too.
    /// Writers stop lingering meanwhile: what they hold is sent at once.
    pub async fn flush(&self, timeout: Duration) -> bool {
        struct Flushing<'a>(&'a Shared);
        impl Drop for Flushing<'_> {
            fn drop(&mut self) {
                self.0.flushing.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let deadline = Instant::now() + timeout;
        self.shared.flushing.fetch_add(1, Ordering::AcqRel);
        let _flushing = Flushing(&self.shared);
        self.shared.flush_now.notify_waiters();
        loop {
            let idle = self.shared.idle.notified();
            if self.outstanding() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.outstanding() == 0;
            }
        }
    }

    /// Commits the open transaction (transactional producing): waits for every queued record
    /// ([`flush`](Self::flush), up to `timeout`), then, when `offsets` name positions,
    /// AddOffsetsToTxn and TxnOffsetCommit (with the member's generation and member id), then
    /// EndTxn(commit). Nothing to commit (no record, no offset): no call. The caller sends
    /// nothing meanwhile (what it sends would join this transaction or the next). On an error
    /// the transaction is still open: call [`abort_transaction`](Self::abort_transaction)
    /// (fenced: the abort only forgets the producer id). Ok(true): a transaction was
    /// committed; Ok(false): there was nothing to commit.
    pub async fn commit_transaction(
        &self,
        offsets: Option<&TxnOffsets>,
        timeout: Duration,
    ) -> Result<bool, TxnError> {
        let Some(t) = &self.shared.txn else {
            return Err(TxnError::Abortable(
                "the producer is not transactional".into(),
            ));
        };
        if !self.flush(timeout).await {
            let e = TxnError::Abortable(format!(
                "{} records not acknowledged within {timeout:?}",
                self.outstanding()
            ));
            self.shared.fail_transaction(e.clone()).await;
            return Err(e);
        }
        let offsets = offsets.filter(|o| !o.positions.is_empty());
        if offsets.is_some() {
            // Offsets only, before any record of this producer id: get one first.
            self.shared.producer_id(None).await.map_err(|e| match e {
                PidError::Refused(why) => TxnError::Unauthorized {
                    id: self.shared.txn_id.to_string(),
                    why,
                },
                PidError::Retry(e) => TxnError::Abortable(e.to_string()),
            })?;
        }
        let _pid = self.shared.pid.lock().await;
        let mut t = t.lock().await;
        if let Some(e) = &t.failed {
            return Err(e.clone());
        }
        if t.added.is_empty() && offsets.is_none() {
            return Ok(false);
        }
        let r = async {
            if let Some(o) = offsets {
                // Tansu drops the offsets of a transaction with no partition after an earlier
                // transaction (docs/notes-transactions.md): add one of ours, nothing written.
                if t.added.is_empty()
                    && let Some(tp) = self.known_partition().await
                {
                    t.coordinator
                        .add_partitions(std::slice::from_ref(&tp))
                        .await?;
                    t.added.insert(tp);
                }
                t.coordinator.add_offsets(&o.group_id).await?;
                t.coordinator.commit_offsets(o).await?;
            }
            t.coordinator.end(true).await
        }
        .await;
        match r {
            Ok(()) => {
                t.added.clear();
                Ok(true)
            }
            Err(e) => {
                t.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Aborts the open transaction: records queued and not yet sent fail
    /// ([`ProduceError::Transaction`]) and are never sent; waits (up to `timeout`) for the
    /// batches being written, then
    /// EndTxn(abort) unless fenced; either way the producer id is forgotten, so the next
    /// transaction starts with InitProducerId (a new epoch: sequences start again, and an
    /// abort that did not reach the coordinator is completed by it).
    pub async fn abort_transaction(&self, timeout: Duration) -> Result<(), TxnError> {
        let Some(t) = &self.shared.txn else {
            return Ok(());
        };
        // What is queued and not yet sent is dropped, not written into the next transaction.
        self.shared.aborts.fetch_add(1, Ordering::AcqRel);
        let _ = self.flush(timeout).await;
        let mut pid = self.shared.pid.lock().await;
        let mut t = t.lock().await;
        let fenced = t.failed.as_ref().is_some_and(TxnError::is_fatal);
        let r = if !fenced && !t.added.is_empty() && t.coordinator.producer().is_some() {
            t.coordinator.end(false).await
        } else {
            Ok(())
        };
        t.added.clear();
        t.failed = None;
        t.coordinator.forget();
        *pid = None;
        r
    }

    /// Why the open transaction can no longer commit, if it cannot.
    pub async fn transaction_error(&self) -> Option<TxnError> {
        match &self.shared.txn {
            Some(t) => t.lock().await.failed.clone(),
            None => None,
        }
    }

    /// A partition this producer writes to (for a transaction with offsets only).
    async fn known_partition(&self) -> Option<Tp> {
        let q = self.queues.lock().await;
        q.iter()
            .flat_map(|(t, ps)| ps.keys().map(move |p| (t.clone(), *p)))
            .min()
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

/// Java's `DefaultRecordBatch.incrementSequence`: wraps at i32::MAX to 0.
pub fn next_sequence(seq: i32, records: i32) -> i32 {
    if seq > i32::MAX - records {
        records - (i32::MAX - seq) - 1
    } else {
        seq + records
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A batch not yet resolved: its records and, once encoded, its bytes (resent as they are).
struct Batch {
    records: Vec<Queued>,
    encoded: Option<Encoded>,
    timestamp_ms: i64,
    /// Sent on the current connection: when its answer is due.
    due: Option<Instant>,
    /// Sent (its bytes may have reached the broker) and not known to be refused: it is
    /// resent byte for byte, with the producer id, epoch and sequence it carries.
    sent: bool,
}

struct Encoded {
    bytes: Bytes,
    /// Idempotent: the producer id generation and the base sequence it carries.
    key: Option<(u64, i32)>,
}

impl Batch {
    fn new(records: Vec<Queued>) -> Self {
        Self {
            records,
            encoded: None,
            timestamp_ms: now_ms(),
            due: None,
            sent: false,
        }
    }

    fn fail(self, e: impl Fn(&OutRecord) -> ProduceError) {
        for (r, done) in self.records {
            let _ = done.send(Err(e(&r)));
        }
    }
}

/// What one Produce answer says about its batch.
enum Outcome {
    Written(i64),
    /// Already written (DUPLICATE_SEQUENCE_NUMBER).
    Duplicate,
    /// The broker lost or fenced our producer id.
    NewProducerId(Error),
    TooLarge,
    /// Look the leader up again and resend after a backoff.
    Retry(Error),
    /// Refused for good, and not written (CORRUPT_MESSAGE, INVALID_RECORD).
    Refused(Error),
    /// Refused for good; whether it was written is unknown (UNKNOWN_SERVER_ERROR, ...).
    Fatal(Error),
}

/// What trying to send the next batch gave.
enum Step {
    /// Sent (or something changed, e.g. a batch resolved): go round again.
    Again,
    /// Nothing can be sent until an outstanding answer is read.
    Wait,
}

/// A partition writer's state between turns.
struct State {
    conn: Option<(BrokerConn, i16)>,
    /// Unresolved batches in queue order; the first `sent` are outstanding on `conn`.
    queue: VecDeque<Batch>,
    sent: usize,
    backoff: Backoff,
    /// Since when the partition's leader cannot be found (a deleted topic ends the wait).
    leaderless_since: Option<Instant>,
    /// The producer id the partition's sequences count for (the producer's shared one can be
    /// newer: the partition moves to it only when none of its batches went out under this).
    pid: Option<Pid>,
    /// The sequence after the last batch written under `pid`.
    acked: i32,
    /// The producer id generation the broker refused, or under which a batch may or may not
    /// have been written: no new batch goes out under it, and once none of the partition's
    /// batches may be written under it, the partition takes a new one.
    stale: Option<u64>,
    /// A lost connection was reconnected at once since the last answer (the next loss waits).
    reconnected: bool,
    /// How long the oldest outstanding batch's answer may take.
    answer_timeout: Duration,
}

impl State {
    /// The connection is gone: every outstanding batch is resent (same sequences).
    fn drop_conn(&mut self) {
        self.conn = None;
        self.sent = 0;
        for b in &mut self.queue {
            b.due = None;
        }
    }

    /// The oldest outstanding batch is answered: it leaves the queue, and the next one's
    /// answer is due no sooner than a whole answer time from now (the broker answers a
    /// connection's requests one after another).
    fn take_front(&mut self) -> Batch {
        self.sent = self.sent.saturating_sub(1);
        let b = self.queue.pop_front().expect("an outstanding batch");
        if self.sent > 0 {
            self.oldest(0);
        }
        b
    }

    /// Outstanding batch `j` is now the oldest unanswered: its due time is extended to a whole
    /// answer time from now.
    fn oldest(&mut self, j: usize) {
        let now = Instant::now();
        if let Some(d) = self.queue[j].due.as_mut() {
            *d = (*d).max(now + self.answer_timeout);
        }
    }

    /// The broker took none of the queued batches (it refused one before them, so it took
    /// none after it): each is encoded again (for its sequence or producer id) when sent.
    fn none_written(&mut self) {
        for b in &mut self.queue {
            b.sent = false;
        }
    }

    /// `b` is written: the broker's next sequence follows it, and its records resolve to their
    /// offsets from `base` (-1 when the broker did not say).
    fn written(&mut self, b: Batch, base: Option<i64>) {
        if let Some((_, seq)) = b.encoded.as_ref().and_then(|e| e.key) {
            self.acked = next_sequence(seq, b.records.len() as i32);
        }
        for (i, (_, done)) in b.records.into_iter().enumerate() {
            let _ = done.send(Ok(base.map_or(-1, |o| o + i as i64)));
        }
    }

    /// The oldest batch, not sent, fails with `e` (before it goes out).
    fn fail_unsent(&mut self, e: impl Fn(&OutRecord) -> ProduceError) {
        self.queue.pop_front().expect("a batch").fail(e);
    }
}

struct Writer {
    cluster: Arc<Cluster>,
    shared: Arc<Shared>,
    cfg: ProducerConfig,
    topic: String,
    partition: i32,
    limit: Arc<Limit>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Queued>) {
        let cfg = &self.cfg;
        // Without idempotence a retried batch would land after a later one: one at a time.
        let max_in_flight = if self.shared.idempotent {
            cfg.max_in_flight.clamp(1, MAX_IN_FLIGHT)
        } else {
            1
        };
        let mut st = State {
            conn: None,
            queue: VecDeque::new(),
            sent: 0,
            backoff: Backoff::new(Duration::from_millis(50), cfg.max_backoff),
            leaderless_since: None,
            pid: None,
            acked: 0,
            stale: None,
            reconnected: false,
            answer_timeout: self.answer_timeout(),
        };
        // A record taken from the queue that did not fit in the last batch: it starts the next one.
        let mut carry: Option<Queued> = None;
        let mut closed = false;
        // The next batch, lingering for more records.
        let mut gathering: Option<Gather> = None;
        loop {
            // A new batch when there is room: waiting for records only when nothing is
            // unresolved, else from what is queued already (lingering for more).
            if gathering.is_none() && st.queue.len() < max_in_flight {
                let first = match carry.take() {
                    Some(q) => Some(q),
                    None if st.queue.is_empty() => match rx.recv().await {
                        Some(q) => Some(q),
                        None => return,
                    },
                    None if closed => None,
                    None => match rx.try_recv() {
                        Ok(q) => Some(q),
                        Err(mpsc::error::TryRecvError::Empty) => None,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed = true;
                            None
                        }
                    },
                };
                if let Some(first) = first {
                    let max_batch = self.limit.bytes.load(Ordering::Relaxed);
                    gathering = Some(Gather::new(cfg, first, max_batch));
                }
            }
            if st.sent < st.queue.len().min(max_in_flight) {
                match self.send_next(&mut st).await {
                    Step::Again => continue,
                    Step::Wait => {}
                }
            }
            if let Some(g) = gathering.as_mut() {
                // The batch lingers; answers that come meanwhile are read (both cancel-safe:
                // the linger keeps what it took and resumes from its start).
                let answer = if st.sent == 0 {
                    carry = g.linger(cfg, &self.shared, &mut rx).await;
                    None
                } else {
                    let due = st.queue[0].due.unwrap_or_else(Instant::now);
                    let (c, _) = st
                        .conn
                        .as_mut()
                        .expect("outstanding batches have a connection");
                    tokio::select! {
                        q = g.linger(cfg, &self.shared, &mut rx) => {
                            carry = q;
                            None
                        }
                        r = tokio::time::timeout_at(due, c.recv::<ProduceRequest>()) => Some(r),
                    }
                };
                match answer {
                    None => {
                        let g = gathering.take().expect("a batch gathering");
                        st.queue.push_back(Batch::new(g.records));
                    }
                    Some(r) => {
                        let outcome = self.outcome(&st, r);
                        self.answered(&mut st, outcome).await;
                    }
                }
                continue;
            }
            if st.sent == 0 {
                continue;
            }
            // The oldest answer; meanwhile a new record, when there is room for its batch.
            let room = st.queue.len() < max_in_flight && carry.is_none() && !closed;
            let due = st.queue[0].due.unwrap_or_else(Instant::now);
            let event = {
                let (c, _) = st
                    .conn
                    .as_mut()
                    .expect("outstanding batches have a connection");
                tokio::select! {
                    r = tokio::time::timeout_at(due, c.recv::<ProduceRequest>()) => Some(r),
                    q = rx.recv(), if room => {
                        match q {
                            Some(q) => carry = Some(q),
                            None => closed = true,
                        }
                        None
                    }
                }
            };
            if let Some(r) = event {
                let outcome = self.outcome(&st, r);
                self.answered(&mut st, outcome).await;
            }
        }
    }

    /// Prepares and sends the first batch not outstanding (`st.queue[st.sent]`). Only the
    /// oldest unresolved batch is ever failed, so deliveries resolve in order: a later one that
    /// cannot go yet waits for the answers before it.
    async fn send_next(&self, st: &mut State) -> Step {
        let topic = &self.topic;
        let partition = self.partition;
        let i = st.sent;
        let front = i == 0;
        // Transactional: records queued before an abort belong to it and are not sent.
        let aborts = self.shared.aborts.load(Ordering::Acquire);
        if self.shared.txn.is_some() && st.queue[i].records.iter().any(|(_, d)| d.aborts < aborts) {
            if !front {
                return Step::Wait;
            }
            let b = &mut st.queue[0];
            let (old, keep): (Vec<Queued>, Vec<Queued>) =
                b.records.drain(..).partition(|(_, d)| d.aborts < aborts);
            for (_, done) in old {
                let _ = done.send(Err(ProduceError::Transaction(
                    "queued before the transaction was aborted".into(),
                )));
            }
            b.records = keep;
            b.encoded = None;
            if b.records.is_empty() {
                st.queue.pop_front();
            }
            // The aborted transaction's batches count for nothing: the rest go out again
            // under the next producer epoch.
            st.none_written();
            return Step::Again;
        }
        // The producer id. A batch that went out keeps the one it carries (and its sequence:
        // resent byte for byte), so the broker can tell it was written; the partition moves to
        // the producer's current id (or a new one when its own is stale) only when none of its
        // batches went out under the old one, as Java's `maybeUpdateProducerIdAndEpoch`.
        let pid = if !self.shared.idempotent {
            None
        } else if st.queue.iter().skip(i).any(|b| b.sent) {
            // Sent (or, its halves, placed before batches that were): the partition's id.
            st.pid
        } else if front {
            // Nothing of the partition's went out under its id.
            match self.shared.producer_id(st.stale).await {
                Ok(p) => {
                    st.stale = None;
                    if st.pid.map(|q| q.generation) != Some(p.generation) {
                        st.pid = Some(p);
                        st.acked = 0;
                    }
                    Some(p)
                }
                Err(PidError::Refused(why)) => {
                    tracing::error!(%topic, partition, %why, "producer: idempotence refused");
                    st.fail_unsent(|_| ProduceError::Rejected {
                        topic: topic.clone(),
                        why: why.clone(),
                    });
                    return Step::Again;
                }
                Err(PidError::Retry(e)) => {
                    let wait = st.backoff.next_wait();
                    tracing::warn!(%topic, partition, error = %e, retry_in = ?wait, "producer: InitProducerId failed, retrying");
                    tokio::time::sleep(wait).await;
                    return Step::Again;
                }
            }
        } else if st.stale.is_some() {
            // Not under a stale id: it waits for the batches before it.
            return Step::Wait;
        } else {
            // After outstanding batches, under their id while it is the producer's (else it
            // waits for them). An InitProducerId under way holds the lock: the answers are
            // read meanwhile.
            match self.shared.pid.try_lock().map(|p| *p) {
                Ok(Some(p)) if st.pid.is_some_and(|q| q.generation == p.generation) => Some(p),
                _ => return Step::Wait,
            }
        };
        // The base sequence: after the records of the unresolved batches before it.
        let seq = st
            .queue
            .iter()
            .take(i)
            .fold(st.acked, |s, b| next_sequence(s, b.records.len() as i32));
        let key = pid.map(|p| (p.generation, seq));
        let b = &mut st.queue[i];
        if !b.sent && b.encoded.as_ref().is_none_or(|e| e.key != key) {
            let meta = match pid {
                Some(p) => batch::BatchMeta {
                    producer_id: p.id,
                    producer_epoch: p.epoch,
                    base_sequence: seq,
                    timestamp_ms: b.timestamp_ms,
                    transactional: self.shared.txn.is_some(),
                },
                None => batch::BatchMeta::plain(b.timestamp_ms),
            };
            match batch::encode(b.records.iter().map(|q| &q.0), self.cfg.compression, meta) {
                Ok(bytes) => b.encoded = Some(Encoded { bytes, key }),
                Err(e) if front => {
                    tracing::error!(%topic, partition, error = %e, "producer: cannot encode the batch");
                    st.fail_unsent(|_| ProduceError::Rejected {
                        topic: topic.clone(),
                        why: format!("cannot encode the batch: {e}"),
                    });
                    return Step::Again;
                }
                Err(_) => return Step::Wait,
            }
        }
        // The leader's connection (none only with nothing outstanding).
        if st.conn.is_none() {
            match self.connect().await {
                Ok(c) => {
                    st.leaderless_since = None;
                    st.conn = Some(c);
                }
                Err(e) => {
                    let since = *st.leaderless_since.get_or_insert_with(Instant::now);
                    if matches!(e, Error::UnknownTopic(_))
                        && since.elapsed() >= self.cluster.request_timeout
                    {
                        tracing::error!(%topic, partition, error = %e, "producer: topic does not exist");
                        st.fail_unsent(|_| ProduceError::UnknownTopic(topic.clone()));
                        st.none_written();
                        return Step::Again;
                    }
                    let wait = st.backoff.next_wait();
                    tracing::warn!(%topic, partition, error = %e, retry_in = ?wait, "producer: partition leader unknown, retrying");
                    tokio::time::sleep(wait).await;
                    return Step::Again;
                }
            }
        }
        let Some((c, version)) = st.conn.as_mut() else {
            return Step::Again;
        };
        // KIP-368: a session due for re-authentication takes the outstanding answers first.
        if c.must_drain() {
            return Step::Wait;
        }
        // Transactional: the partition joins the open transaction before its first batch.
        if let Err(e) = self.shared.join_transaction(topic, partition).await {
            if !front {
                return Step::Wait;
            }
            tracing::warn!(%topic, partition, error = %e, "producer: the transaction failed; batch not sent");
            st.fail_unsent(|_| ProduceError::Transaction(e.to_string()));
            return Step::Again;
        }
        self.shared.wait_throttle(c.broker()).await;
        // An abort while throttled or joining: the batch is checked again.
        if self.shared.txn.is_some() && self.shared.aborts.load(Ordering::Acquire) != aborts {
            return Step::Again;
        }
        // The session came due for re-authentication meanwhile: the answers are read first.
        if c.must_drain() {
            return Step::Wait;
        }
        let b = &mut st.queue[i];
        let bytes = b
            .encoded
            .as_ref()
            .map(|e| e.bytes.clone())
            .unwrap_or_default();
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        b.sent = true;
        match c
            .send_pipelined(self.request(bytes), *version, "Produce")
            .await
        {
            Ok(()) => {
                b.due = Some(Instant::now() + self.answer_timeout());
                st.sent += 1;
            }
            Err(e) => self.retry(st, e).await,
        }
        Step::Again
    }

    /// Acts on the answer to the oldest outstanding batch.
    async fn answered(&self, st: &mut State, outcome: Outcome) {
        let topic = &self.topic;
        let partition = self.partition;
        match outcome {
            Outcome::Written(base) => {
                st.backoff.reset();
                st.reconnected = false;
                let b = st.take_front();
                st.written(b, Some(base));
            }
            Outcome::Duplicate => {
                st.backoff.reset();
                st.reconnected = false;
                let b = st.take_front();
                tracing::info!(%topic, partition, sequence = ?b.encoded.as_ref().and_then(|e| e.key), "producer: batch already written (duplicate sequence)");
                st.written(b, None);
            }
            Outcome::NewProducerId(e) if self.shared.txn.is_some() => {
                // Transactional: the transaction is over (fenced: for good); the caller
                // aborts, and the next transaction gets a new epoch. The batches after it fail
                // as they come to be sent (the transaction has failed).
                let id = self.shared.txn_id.to_string();
                let why = e.to_string();
                let te = match e.broker_error() {
                    Some(ResponseError::ProducerFenced | ResponseError::InvalidProducerEpoch) => {
                        TxnError::Fenced { id, why }
                    }
                    _ => TxnError::Abortable(why),
                };
                tracing::warn!(%topic, partition, error = %te, "producer: transactional batch refused");
                self.shared.fail_transaction(te.clone()).await;
                st.take_front()
                    .fail(|_| ProduceError::Transaction(te.to_string()));
                st.drop_conn();
            }
            Outcome::NewProducerId(_) => {
                tracing::warn!(%topic, partition, "producer: the broker lost or fenced our producer id; asking for a new one (a batch may be written twice)");
                // Refused, so none after it was written either: the partition's batches go
                // out again under a new id, sequences from 0 (as Java's epoch bump).
                st.stale = st.pid.map(|p| p.generation);
                st.none_written();
                st.drop_conn();
                tokio::time::sleep(st.backoff.next_wait()).await;
            }
            Outcome::TooLarge => {
                self.limit.stale.store(true, Ordering::Relaxed);
                let mut b = st.take_front();
                let n = b.records.len();
                self.drain(st).await;
                st.none_written();
                if n > 1 {
                    // Split in halves, in order, before the batches after it: the halves take
                    // its sequences, so those after it keep theirs.
                    let rest = b.records.split_off(n / 2);
                    st.queue.push_front(Batch::new(rest));
                    st.queue.push_front(Batch::new(b.records));
                    tracing::info!(%topic, partition, records = n, "producer: batch too large for the broker; split in halves");
                } else {
                    let max = self.limit.bytes.load(Ordering::Relaxed);
                    b.fail(|r| ProduceError::TooLarge {
                        topic: topic.clone(),
                        size: r.batch_size(),
                        max,
                    });
                }
            }
            Outcome::Refused(e) => {
                // Not written: the batches after it take its sequences.
                tracing::error!(%topic, partition, error = %e, "producer: batch rejected");
                st.take_front().fail(|_| ProduceError::Rejected {
                    topic: topic.clone(),
                    why: e.to_string(),
                });
                self.drain(st).await;
                st.none_written();
            }
            Outcome::Fatal(e) => {
                // It may have been written: a later batch must not take its sequence (the
                // broker would take it for a duplicate). The outstanding ones are answered as
                // they come (written if it was, else out of order: then sent again under a new
                // id); no new batch goes out under this id: the next takes a new one, as Java
                // bumps the epoch. Transactional: the transaction can only be aborted.
                tracing::error!(%topic, partition, error = %e, "producer: batch rejected (it may or may not have been written)");
                st.take_front().fail(|_| ProduceError::Rejected {
                    topic: topic.clone(),
                    why: e.to_string(),
                });
                if self.shared.txn.is_some() {
                    self.shared
                        .fail_transaction(TxnError::Abortable(format!(
                            "a batch for {topic}/{partition} was rejected: {e}"
                        )))
                        .await;
                } else if self.shared.idempotent {
                    st.stale = st.pid.map(|p| p.generation);
                }
            }
            Outcome::Retry(e) => self.retry(st, e).await,
        }
    }

    /// The oldest batch was not written (refused): the broker answers the outstanding ones
    /// after it OUT_OF_ORDER_SEQUENCE_NUMBER (they follow a sequence it never got). Reads
    /// those answers, so that nothing of theirs is still on its way when they are sent again
    /// with sequences moved down to follow the last batch written.
    async fn drain(&self, st: &mut State) {
        let mut j = 0;
        while st.sent > 0 {
            st.oldest(j);
            let due = st.queue[j].due.unwrap_or_else(Instant::now);
            let Some((c, _)) = st.conn.as_mut() else {
                st.drop_conn();
                return;
            };
            let r = tokio::time::timeout_at(due, c.recv::<ProduceRequest>()).await;
            let outcome = self.outcome(st, r);
            st.sent -= 1;
            match outcome {
                Outcome::Written(_) | Outcome::Duplicate => {
                    // Only a broker that does not check sequences writes it: it is in the
                    // log, so it is not sent again.
                    tracing::warn!(topic = %self.topic, partition = self.partition, "producer: a batch after a refused one was written");
                    let b = st.queue.remove(j).expect("an outstanding batch");
                    st.written(b, None);
                }
                Outcome::Retry(_) => {
                    st.drop_conn();
                    return;
                }
                _ => {
                    st.queue[j].due = None;
                    j += 1;
                }
            }
        }
    }

    /// A lost connection or a retriable error: the outstanding batches are sent again, in
    /// order, with their sequences; the leader is looked up again.
    async fn retry(&self, st: &mut State, e: Error) {
        let topic = &self.topic;
        let partition = self.partition;
        st.drop_conn();
        if matches!(e, Error::Io { .. }) && !st.reconnected {
            // A connection the broker closed (idle, restarted): reconnect at once, once; a
            // second loss in a row backs off.
            st.reconnected = true;
            tracing::info!(%topic, partition, error = %e, "producer: connection lost, resending");
            return;
        }
        let wait = st.backoff.next_wait();
        tracing::warn!(%topic, partition, error = %e, retry_in = ?wait, "producer: batch failed, retrying");
        if matches!(
            e.broker_error(),
            Some(ResponseError::UnknownTopicOrPartition)
        ) {
            let since = *st.leaderless_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.cluster.request_timeout {
                if let Some(b) = st.queue.pop_front() {
                    b.fail(|_| ProduceError::UnknownTopic(topic.clone()));
                }
                st.none_written();
                return;
            }
        }
        tokio::time::sleep(wait).await;
    }

    /// A connection to the partition's leader and the Produce version it speaks.
    async fn connect(&self) -> Result<(BrokerConn, i16)> {
        let addr = self
            .cluster
            .leader(&self.shared.connector, &self.topic, self.partition)
            .await?;
        let conn = self.shared.connector.connect(&addr).await?;
        let v = conn.version::<ProduceRequest>("Produce", PRODUCE_MAX_VERSION)?;
        if v < PRODUCE_MIN_VERSION {
            return Err(Error::Version {
                call: "Produce",
                ours: format!("{PRODUCE_MIN_VERSION}..{PRODUCE_MAX_VERSION}"),
                theirs: format!("..{v}"),
            });
        }
        Ok((conn, v))
    }

    /// How long a Produce answer may take: the broker's timeout for acks=all, and some.
    fn answer_timeout(&self) -> Duration {
        self.cluster.request_timeout + Duration::from_secs(5)
    }

    fn request(&self, records: Bytes) -> ProduceRequest {
        let server_timeout = self.cluster.request_timeout;
        ProduceRequest::default()
            .with_transactional_id(self.shared.transactional_id().map(TransactionalId))
            .with_acks(-1)
            .with_timeout_ms(server_timeout.as_millis().min(i32::MAX as u128) as i32)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(self.topic.clone())))
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(self.partition)
                            .with_records(Some(records)),
                    ]),
            ])
    }

    /// What an answer (or its failure, or its timeout) says about its batch; a throttle is
    /// noted (KIP-219: the broker has answered and appended; it only asks us to wait).
    fn outcome(
        &self,
        st: &State,
        r: Result<Result<kafka_protocol::messages::ProduceResponse>, tokio::time::error::Elapsed>,
    ) -> Outcome {
        let resp = match r {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Outcome::Retry(e),
            Err(_) => {
                return Outcome::Retry(Error::Timeout {
                    call: "Produce",
                    broker: st
                        .conn
                        .as_ref()
                        .map(|(c, _)| c.broker().to_owned())
                        .unwrap_or_default(),
                    after: self.answer_timeout(),
                });
            }
        };
        if let Some((c, _)) = &st.conn {
            self.shared.throttle(c.broker(), resp.throttle_time_ms);
        }
        let Some(p) = resp
            .responses
            .iter()
            .filter(|t| t.name.0.as_str() == self.topic)
            .flat_map(|t| t.partition_responses.iter())
            .find(|p| p.index == self.partition)
        else {
            return Outcome::Retry(Error::Protocol {
                call: "Produce",
                why: format!("no answer for {}/{}", self.topic, self.partition),
            });
        };
        if p.error_code == 0 {
            return Outcome::Written(p.base_offset);
        }
        let e = broker_error("Produce", p.error_code, p.error_message.as_ref());
        use ResponseError as R;
        match e.broker_error() {
            Some(R::DuplicateSequenceNumber) if self.shared.idempotent => Outcome::Duplicate,
            Some(
                R::OutOfOrderSequenceNumber
                | R::UnknownProducerId
                | R::InvalidProducerEpoch
                | R::ProducerFenced,
            ) if self.shared.idempotent => Outcome::NewProducerId(e),
            Some(R::MessageTooLarge | R::RecordListTooLarge) => Outcome::TooLarge,
            Some(R::CorruptMessage | R::InvalidRecord) => Outcome::Refused(e),
            Some(r) if r.is_retriable() => Outcome::Retry(e),
            _ => Outcome::Fatal(e),
        }
    }
}

/// A batch being gathered: its records and when its linger started.
struct Gather {
    records: Vec<Queued>,
    bytes: usize,
    max_batch: usize,
    /// The end of the linger, and of the longest one (while the caller signals pressure).
    short: Instant,
    long: Instant,
}

impl Gather {
    fn new(cfg: &ProducerConfig, first: Queued, max_batch: usize) -> Self {
        let start = Instant::now();
        Self {
            bytes: BATCH_OVERHEAD + first.0.size(),
            records: vec![first],
            max_batch,
            short: start + cfg.linger,
            long: start + cfg.linger_max.max(cfg.linger),
        }
    }

    /// Lingers for more records, up to the batch size (never past it); up to `linger_max`
    /// while the caller says more records are on their way, looking again every `linger`
    /// (pressure that ends sends the batch then). Returns a record that did not fit.
    /// Cancel-safe: a record taken stays in the batch, and a call after a cancelled one goes
    /// on with the linger's first start.
    async fn linger(
        &mut self,
        cfg: &ProducerConfig,
        shared: &Shared,
        rx: &mut mpsc::Receiver<Queued>,
    ) -> Option<Queued> {
        let pressed = || {
            cfg.pressure
                .as_ref()
                .is_some_and(|p| p.load(Ordering::Relaxed) > 0)
        };
        let step = cfg.linger.max(Duration::from_millis(1));
        loop {
            let next = match rx.try_recv() {
                Ok(q) => Some(q),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => loop {
                    // A flush waits for what is queued: nothing more is coming for this batch.
                    let flushed = shared.flush_now.notified();
                    if shared.flushing.load(Ordering::Acquire) > 0 {
                        break None;
                    }
                    let now = Instant::now();
                    let until = if now < self.short {
                        self.short
                    } else if now < self.long && pressed() {
                        self.long.min(now + step)
                    } else {
                        break None;
                    };
                    tokio::select! {
                        r = tokio::time::timeout_at(until, rx.recv()) => match r {
                            Ok(q) => break q,
                            Err(_) => continue,
                        },
                        _ = flushed => break None,
                    }
                },
            };
            let q = next?;
            let size = q.0.size();
            if self.bytes + size > self.max_batch {
                return Some(q);
            }
            self.bytes += size;
            self.records.push(q);
        }
    }
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
    fn sequences_wrap_at_i32_max_to_zero() {
        assert_eq!(next_sequence(0, 3), 3);
        assert_eq!(next_sequence(i32::MAX - 3, 3), i32::MAX);
        assert_eq!(next_sequence(i32::MAX - 2, 3), 0);
        assert_eq!(next_sequence(i32::MAX, 1), 0);
        assert_eq!(next_sequence(i32::MAX - 1, 5), 3);
    }

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
