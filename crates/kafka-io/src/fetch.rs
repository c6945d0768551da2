//! A read_committed fetch of one partition on our own connection ([`crate::conn`]), with the
//! record batches decoded here ([`records`]) rather than by rskafka, whose `fetch_records` drops
//! control batches (a fetch whose only data is a transaction marker gives no records and no way
//! past it: the caller re-fetches the same offset forever) and ignores the response's
//! aborted_transactions (records of aborted transactions come through).
//!
//! # API
//!
//! ```ignore
//! let mut f = PartitionFetcher::new(connector, topic, partition, request_timeout);
//! let got: Fetched = f.fetch(offset, max_wait, max_bytes).await?;
//! // got.records: committed / non-transactional records at or after `offset`, in offset order
//! // got.next_offset: where to fetch next (past control batches and aborted records too)
//! // got.high_watermark, got.last_stable_offset: from the response
//! ```
//!
//! - [`PartitionFetcher::fetch`] sends Fetch (v4-v12, isolation_level READ_COMMITTED, no fetch
//!   session) to the partition's leader. The leader is found with Metadata through a bootstrap
//!   broker and one connection to it is kept. After NOT_LEADER_OR_FOLLOWER,
//!   UNKNOWN_TOPIC_OR_PARTITION and the other leadership errors, after a connection error or a
//!   timeout, the connection is dropped and the next call finds the leader again; the error is
//!   returned (retryable ones say so with [`Error::is_retryable`]): the caller backs off and calls
//!   again. Finding the leader is bounded by the request timeout, the Fetch by request timeout +
//!   `max_wait`. Dropping the future of a call drops the connection (no half-read responses).
//! - OFFSET_OUT_OF_RANGE comes back as `Error::Broker { error: ResponseError::OffsetOutOfRange,
//!   .. }` (match it with [`Error::broker_error`]); the connection is kept.
//! - Records: record batch v2 only (magic 0/1 message sets get a clear error); gzip, snappy (raw
//!   and the Java client's xerial framing), lz4 (frame format), zstd; CRC-32C checked. Records
//!   before `offset` (a batch that starts before it) are dropped. Control batches are skipped.
//!   A record of a transactional batch is dropped when its producer has an aborted transaction
//!   in aborted_transactions with first_offset <= the batch's last offset and the producer's
//!   ABORT marker has not been passed since (the Java consumer's walk), or when the next marker
//!   of that producer in the same response is an ABORT (sound for any broker; it catches the
//!   aborted transactions of brokers that leave the list empty, as tansu does).
//! - `next_offset` = last offset of the last complete batch walked + 1, never below `offset`. A
//!   last batch cut by max_bytes is ignored (fetched whole next time). A response with no
//!   complete batch at all is an error (`Error::Protocol`, "raise max_bytes"): Kafka always
//!   sends the first batch whole, so fetching again would not help.
//! - A batch that cannot be read (corrupt, old format, or decompressing past the budget) ends
//!   the walk: the records before it are returned, and the call that starts at it fails with
//!   `Error::Protocol` naming its offset. Decompression is bounded by
//!   [`PartitionFetcher::max_decompressed`] bytes per call (default 64 MiB): a batch that would
//!   pass what is left of it waits for the next call, where it comes first.
//! - An empty `records` with `next_offset == offset` means nothing is readable yet (end of the
//!   log, or an open transaction below the high watermark: `last_stable_offset` tells).
//!
//! # Using it in a fetcher loop
//!
//! ```ignore
//! loop {
//!     match f.fetch(offset, max_wait, max_bytes).await {
//!         Ok(got) => {
//!             hwm = got.high_watermark;
//!             if !got.records.is_empty() { hand_out(got.records) }
//!             offset = got.next_offset; // also when records is empty: markers, aborted data
//!         }
//!         Err(e) if e.broker_error() == Some(ResponseError::OffsetOutOfRange) => reset(),
//!         Err(e) => sleep(backoff.next_wait()).await,
//!     }
//! }
//! ```

pub mod budget;
pub(crate) mod records;

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::{
    error::ResponseError,
    messages::{
        BrokerId, FetchRequest, MetadataRequest, TopicName,
        fetch_request::{FetchPartition, FetchTopic},
        metadata_request::MetadataRequestTopic,
    },
    protocol::StrBytes,
};

pub use records::AbortedTxn;

use crate::{
    conn::{BrokerConn, Connector, broker_error},
    error::{Error, Result},
    settings::BrokerAddr,
};

/// The highest Fetch version used: v13+ name topics by id only.
const FETCH_MAX_VERSION: i16 = 12;
const METADATA_MAX_VERSION: i16 = 12;
/// isolation_level READ_COMMITTED.
const READ_COMMITTED: i8 = 1;
/// Default bound on the bytes decompressed per call.
pub const DEFAULT_MAX_DECOMPRESSED: usize = 64 << 20;
/// Responses with more records bytes than this are decoded on a blocking thread.
const DECODE_INLINE_MAX: usize = 1 << 20;

/// One record handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedRecord {
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// In record order; duplicate keys kept. A null header value is empty.
    pub headers: Vec<(String, Bytes)>,
    /// Create time, or log-append time when the topic says so.
    pub timestamp_ms: i64,
}

/// What one fetch gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Committed and non-transactional records at or after the fetch offset, in offset order.
    pub records: Vec<FetchedRecord>,
    /// Next offset to fetch (past control batches and aborted records too).
    pub next_offset: i64,
    pub high_watermark: i64,
    pub last_stable_offset: i64,
}

impl Fetched {
    /// The partition's end for a read_committed reader: the last stable offset (the high
    /// watermark unless a transaction is open), or the high watermark when the broker gives
    /// no usable LSO.
    pub fn stable_end(&self) -> i64 {
        match self.last_stable_offset {
            lso if (0..=self.high_watermark).contains(&lso) => lso,
            _ => self.high_watermark,
        }
    }
}

/// The leader connection and the Fetch version chosen on it.
struct Leader {
    conn: BrokerConn,
    version: i16,
}

/// One partition's fetch session: finds the leader (Metadata on our connection), keeps one
/// connection to it, finds it again after leadership errors, connection errors and timeouts.
/// Every call is bounded by a timeout. Not shared: one task calls it.
pub struct PartitionFetcher {
    connector: Connector,
    topic: String,
    partition: i32,
    request_timeout: Duration,
    leader: Option<Leader>,
    max_decompressed: usize,
}

impl std::fmt::Debug for PartitionFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionFetcher")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("leader", &self.leader.as_ref().map(|l| l.conn.broker()))
            .finish_non_exhaustive()
    }
}

impl PartitionFetcher {
    /// No I/O here: the first [`fetch`](Self::fetch) finds the leader.
    pub fn new(
        mut connector: Connector,
        topic: String,
        partition: i32,
        request_timeout: Duration,
    ) -> Self {
        // Connections opened here answer ApiVersions/SASL/Metadata within our timeout.
        connector.request_timeout = request_timeout;
        connector.connect_timeout = connector.connect_timeout.min(request_timeout);
        Self {
            connector,
            topic,
            partition,
            request_timeout,
            leader: None,
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
        }
    }

    /// Bounds the bytes decompressed per call (default [`DEFAULT_MAX_DECOMPRESSED`]); a single
    /// batch larger than this once decompressed cannot be read.
    pub fn max_decompressed(mut self, bytes: usize) -> Self {
        self.max_decompressed = bytes;
        self
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The broker of the kept connection, if any.
    pub fn leader(&self) -> Option<&str> {
        self.leader.as_ref().map(|l| l.conn.broker())
    }

    /// Drops the connection: the next call finds the leader again.
    pub fn reset(&mut self) {
        self.leader = None;
    }

    /// Fetches from `offset`, waiting up to `max_wait` for data, with at most `max_bytes` of
    /// records (the first batch comes whole regardless). See the module documentation.
    pub async fn fetch(
        &mut self,
        offset: i64,
        max_wait: Duration,
        max_bytes: i32,
    ) -> Result<Fetched> {
        // Taken out: if this future is dropped or fails midway, the connection goes with it.
        let mut leader = match self.leader.take() {
            Some(l) => l,
            None => {
                let t = self.request_timeout;
                match tokio::time::timeout(t, self.find_leader()).await {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(Error::Timeout {
                            call: "Metadata (find the partition leader)",
                            broker: self.bootstrap(),
                            after: t,
                        });
                    }
                }
            }
        };
        let wait_ms = i32::try_from(max_wait.as_millis()).unwrap_or(i32::MAX);
        let max_bytes = max_bytes.max(1);
        let req = FetchRequest::default()
            .with_max_wait_ms(wait_ms)
            .with_min_bytes(1)
            .with_max_bytes(max_bytes)
            .with_isolation_level(READ_COMMITTED)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(self.topic.clone())))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(self.partition)
                            .with_fetch_offset(offset)
                            .with_partition_max_bytes(max_bytes),
                    ]),
            ]);
        let resp = leader
            .conn
            .send_with_timeout(
                req,
                leader.version,
                "Fetch",
                self.request_timeout + max_wait,
            )
            .await?;
        if resp.error_code != 0 {
            return Err(broker_error("Fetch", resp.error_code, None));
        }
        let part = resp
            .responses
            .into_iter()
            .filter(|t| t.topic.0.as_str() == self.topic)
            .flat_map(|t| t.partitions)
            .find(|p| p.partition_index == self.partition)
            .ok_or_else(|| Error::Protocol {
                call: "Fetch",
                why: format!(
                    "the response has no partition {}/{}",
                    self.topic, self.partition
                ),
            })?;
        match part.error_code {
            0 => {}
            code if code == ResponseError::OffsetOutOfRange.code() => {
                self.leader = Some(leader);
                return Err(broker_error("Fetch", code, None));
            }
            // Leadership moved, the partition is not (yet) there, or the replica is unwell:
            // find the leader again on the next call.
            code => return Err(broker_error("Fetch", code, None)),
        }
        self.leader = Some(leader);
        let aborted: Vec<AbortedTxn> = part
            .aborted_transactions
            .unwrap_or_default()
            .iter()
            .map(|a| AbortedTxn {
                producer_id: a.producer_id.0,
                first_offset: a.first_offset,
            })
            .collect();
        let data = part.records.unwrap_or_default();
        let budget = self.max_decompressed;
        let decoded = if data.len() <= DECODE_INLINE_MAX {
            records::decode(&data, offset, &aborted, budget)
        } else {
            tokio::task::spawn_blocking(move || records::decode(&data, offset, &aborted, budget))
                .await
                .map_err(|e| Error::Protocol {
                    call: "Fetch",
                    why: format!("decoding task failed: {e}"),
                })?
        }
        .map_err(|why| Error::Protocol {
            call: "Fetch",
            why: format!(
                "{}/{} at offset {offset}: {why}",
                self.topic, self.partition
            ),
        })?;
        Ok(Fetched {
            records: decoded.records,
            next_offset: decoded.next_offset.max(offset),
            high_watermark: part.high_watermark,
            last_stable_offset: part.last_stable_offset,
        })
    }

    fn bootstrap(&self) -> String {
        self.connector.settings.bootstrap_strings().join(",")
    }

    /// Metadata for the topic through a bootstrap broker, then a connection to the leader.
    async fn find_leader(&self) -> Result<Leader> {
        let mut meta = self.connector.connect_any().await?;
        let v = meta.version::<MetadataRequest>("Metadata", METADATA_MAX_VERSION)?;
        let mut req = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(self.topic.clone())),
            ))]));
        if v >= 4 {
            req = req.with_allow_auto_topic_creation(false);
        }
        let resp = meta.send(req, v, "Metadata").await?;
        let topic = resp
            .topics
            .iter()
            .find(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == self.topic))
            .ok_or_else(|| missing("Metadata", ResponseError::UnknownTopicOrPartition))?;
        if topic.error_code != 0 {
            return Err(broker_error("Metadata", topic.error_code, None));
        }
        let part = topic
            .partitions
            .iter()
            .find(|p| p.partition_index == self.partition)
            .ok_or_else(|| missing("Metadata", ResponseError::UnknownTopicOrPartition))?;
        if part.error_code != 0 && part.leader_id.0 < 0 {
            return Err(broker_error("Metadata", part.error_code, None));
        }
        let leader_id: BrokerId = part.leader_id;
        let broker = resp
            .brokers
            .iter()
            .find(|b| b.node_id == leader_id)
            .ok_or_else(|| missing("Metadata", ResponseError::LeaderNotAvailable))?;
        let addr = BrokerAddr {
            host: broker.host.to_string(),
            port: u16::try_from(broker.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| Error::Protocol {
                    call: "Metadata",
                    why: format!("broker {} has port {}", leader_id.0, broker.port),
                })?,
        };
        // The bootstrap connection is the leader's when the addresses match (one-broker clusters).
        let conn = if meta.broker() == addr.to_string() {
            meta
        } else {
            drop(meta);
            self.connector.connect(&addr).await?
        };
        let version = conn.version::<FetchRequest>("Fetch", FETCH_MAX_VERSION)?;
        tracing::debug!(topic = %self.topic, partition = self.partition, leader = %addr, version, "fetch: leader found");
        Ok(Leader { conn, version })
    }
}

/// A broker error the broker did not send but its answer implies (retryable ones).
fn missing(call: &'static str, error: ResponseError) -> Error {
    Error::Broker {
        call,
        code: error.code(),
        error,
        message: None,
    }
}

/// The body of the `fetch_records` fuzz target (fuzz/) and of its stable smoke test: record batch
/// bytes as a broker's Fetch response carries them. The first 8 input bytes pick the fetch offset,
/// one aborted transaction and (bit 0 of byte 6) whether batch checksums are re-fixed first; decoding must return, never panic or allocate what the bytes
/// merely claim; what it returns is in offset order, at or after the fetch offset, below
/// `next_offset`. Returns how many records it gave (for the smoke test's seeds).
pub fn fuzz_fetch_records(data: &[u8]) -> usize {
    let (head, rest) = data.split_at(data.len().min(8));
    let mut h = [0u8; 8];
    h[..head.len()].copy_from_slice(head);
    let offset = i64::from(i16::from_be_bytes([h[0], h[1]]));
    let aborted = [records::AbortedTxn {
        producer_id: i64::from(i16::from_be_bytes([h[2], h[3]])),
        first_offset: i64::from(i16::from_be_bytes([h[4], h[5]])),
    }];
    let mut rest = rest.to_vec();
    if h[6] & 1 == 1 {
        // Re-fix every whole batch's CRC-32C, so mutations reach the batch and record parsing
        // (most random bytes stop at the checksum otherwise).
        let mut at = 0;
        while at + 21 <= rest.len() {
            let len =
                i32::from_be_bytes([rest[at + 8], rest[at + 9], rest[at + 10], rest[at + 11]]);
            let Ok(len) = usize::try_from(len) else { break };
            let Some(end) = (at + 12)
                .checked_add(len)
                .filter(|e| len >= 9 && *e <= rest.len())
            else {
                break;
            };
            let crc = crc32c::crc32c(&rest[at + 21..end]);
            rest[at + 17..at + 21].copy_from_slice(&crc.to_be_bytes());
            at = end;
        }
    }
    let data = Bytes::from(rest);
    if let Ok(d) = records::decode(&data, offset, &aborted, 1 << 20) {
        let mut last = offset - 1;
        for r in &d.records {
            assert!(
                r.offset > last,
                "records in offset order, at or after the fetch offset"
            );
            last = r.offset;
        }
        assert!(d.next_offset > last, "next_offset past every record");
        assert!(d.next_offset >= offset, "next_offset never backwards");
        return d.records.len();
    }
    0
}
