//! The member's fetcher: one task, one Fetch request in flight per leader broker covering every
//! owned partition that broker leads (as the Java client and librdkafka fetch), with incremental
//! fetch sessions (KIP-227) where the broker offers them.
//!
//! - A partition holding half its share of the memory budget ([`crate::fetch::budget`]) or more
//!   is left out of the next request (paused; in a fetch session it is forgotten) until its
//!   records finish; the others of its broker go on being fetched. A partition never waits on
//!   another: each has its own share, its own channel and its own worker.
//! - A partition is asked for at most what is left of its share, counted per decoded record; a
//!   batch bigger than that is handed out in slices (the next fetch starts mid-batch).
//! - A record that alone is larger than the whole budget cannot be taken: the partition stops
//!   there and says so ([`super::Consumer::stalled`]); nothing is skipped.
//! - Leadership errors (NOT_LEADER_OR_FOLLOWER, FENCED_LEADER_EPOCH, UNKNOWN_LEADER_EPOCH, ...)
//!   and broker connection failures send the partition back to Metadata, which moves it to its
//!   leader's request.
//! - OFFSET_OUT_OF_RANGE resets the position by the reset policy, in a new epoch of the
//!   partition: records still in flight from before complete into nothing (their tokens are
//!   stale), and the offset tracker starts again at the new position.
//!
//! Everything runs in one task: requests, resets and Metadata are futures polled together, so
//! no await here waits on another broker.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use kafka_protocol::{
    error::ResponseError,
    messages::{
        BrokerId, FetchRequest, MetadataRequest, TopicName,
        fetch_request::{FetchPartition, FetchTopic, ForgottenTopic},
        metadata_request::MetadataRequestTopic,
    },
    protocol::StrBytes,
};
use rskafka::client::partition::OffsetAt;
use tokio::{sync::mpsc, time::Instant};

use super::{Batch, ConsumerConfig, InRecord, Key, OffsetReset, Shared};
use crate::{
    backoff::Backoff,
    cluster::{Cluster, bounded},
    conn::{BrokerConn, Connector, broker_error},
    error::{Error, Result},
    fetch::{
        AbortedTxn,
        budget::{Budget, PartitionBudget, record_cost},
        records::{self, Decoded},
    },
    offsets::PartitionOffsets,
    settings::BrokerAddr,
};

const FETCH_MAX_VERSION: i16 = 12;
const METADATA_MAX_VERSION: i16 = 12;
const READ_COMMITTED: i8 = 1;
/// Fetch sessions need Fetch v7.
const SESSION_MIN_VERSION: i16 = 7;
/// Responses with more record bytes than this are decoded on blocking threads (a compressed
/// batch can decompress to 64 MiB: that must not hold up the runtime thread, which also runs
/// heartbeats).
const DECODE_INLINE_MAX: usize = 64 << 10;
/// How often a partition whose next record cannot fit looks again.
const STALLED_RETRY: Duration = Duration::from_secs(5);

pub(super) enum Cmd {
    Add {
        key: Key,
        offset: i64,
        epoch: u64,
        tx: mpsc::UnboundedSender<Batch>,
        budget: Arc<PartitionBudget>,
    },
    Remove(Vec<Key>),
}

struct Part {
    offset: i64,
    epoch: u64,
    tx: mpsc::UnboundedSender<Batch>,
    budget: Arc<PartitionBudget>,
    leader: Option<i32>,
    /// In a request, or being reset.
    busy: bool,
    not_before: Option<Instant>,
    backoff: Backoff,
    /// Its next record needs this much room, more than its share: it is fetched again once it
    /// holds nothing and the budget has that much free (reserved meanwhile).
    waiting: Option<usize>,
    /// The high watermark of its last fetch (a paused partition with records behind it).
    high_watermark: i64,
}

/// What a fetch session holds of a partition: its fetch offset and max bytes.
type Sent = (i64, i32);

/// A KIP-227 fetch session with one broker (id 0: none).
#[derive(Default)]
struct Session {
    id: i32,
    epoch: i32,
    /// What the broker holds for each partition in the session: fetch offset, max bytes.
    sent: HashMap<Key, Sent>,
}

struct Broker {
    addr: BrokerAddr,
    conn: Option<(BrokerConn, i16)>,
    busy: bool,
    /// Its address changed while a request was out: that request's connection is not kept.
    stale: bool,
    session: Session,
    not_before: Option<Instant>,
    backoff: Backoff,
}

/// What one partition was asked for.
#[derive(Clone)]
struct Asked {
    key: Key,
    offset: i64,
    epoch: u64,
    /// The most its records may cost (what is left of its share).
    allowance: usize,
}

struct PartResult {
    key: Key,
    error: i16,
    high_watermark: i64,
    decoded: std::result::Result<Decoded, String>,
}

enum Done {
    Connected {
        broker: i32,
        result: Result<(BrokerConn, i16)>,
    },
    Fetched {
        broker: i32,
        conn: Option<(BrokerConn, i16)>,
        asked: Vec<Asked>,
        result: Result<FetchOutcome>,
    },
    Reset {
        key: Key,
        epoch: u64,
        result: Result<i64>,
    },
    Leaders(Result<Leaders>),
}

/// A Fetch response, read.
struct FetchOutcome {
    session_id: i32,
    /// The broker's quota says: send it nothing for this long.
    throttle: Duration,
    parts: Vec<PartResult>,
}

/// Partition leaders and broker addresses, from Metadata.
struct Leaders {
    leaders: HashMap<Key, i32>,
    brokers: HashMap<i32, BrokerAddr>,
}

pub(super) struct Fetcher {
    cluster: Arc<Cluster>,
    connector: Connector,
    cfg: ConsumerConfig,
    shared: Arc<Shared>,
    budget: Arc<Budget>,
    parts: HashMap<Key, Part>,
    brokers: HashMap<i32, Broker>,
    leaders_busy: bool,
    leaders_not_before: Option<Instant>,
    leaders_backoff: Backoff,
    /// Each partition's share of the budget.
    share: usize,
    /// Room kept for partitions waiting to take a record larger than their share.
    reserved: usize,
    running: FuturesUnordered<BoxFuture<'static, Done>>,
}

/// Starts the fetcher task; it ends when the command channel closes.
pub(super) fn start(
    cluster: Arc<Cluster>,
    cfg: ConsumerConfig,
    shared: Arc<Shared>,
    budget: Arc<Budget>,
) -> (mpsc::UnboundedSender<Cmd>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut connector = cluster.connector.clone();
    connector.request_timeout = cluster.request_timeout;
    connector.connect_timeout = connector.connect_timeout.min(cluster.request_timeout);
    let f = Fetcher {
        cluster,
        connector,
        cfg,
        shared,
        share: budget.limit(),
        reserved: 0,
        budget,
        parts: HashMap::new(),
        brokers: HashMap::new(),
        leaders_busy: false,
        leaders_not_before: None,
        leaders_backoff: backoff(),
        running: FuturesUnordered::new(),
    };
    (tx, tokio::spawn(f.run(rx)))
}

fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

fn due(at: Option<Instant>, now: Instant) -> bool {
    at.is_none_or(|t| t <= now)
}

/// Errors after which the partition's leader is looked up again.
fn leadership_error(e: ResponseError) -> bool {
    use ResponseError as R;
    matches!(
        e,
        R::NotLeaderOrFollower
            | R::FencedLeaderEpoch
            | R::UnknownLeaderEpoch
            | R::LeaderNotAvailable
            | R::UnknownTopicOrPartition
            | R::UnknownTopicId
            | R::KafkaStorageError
            | R::ReplicaNotAvailable
            | R::OffsetNotAvailable
            | R::NotCoordinator
    )
}

impl Fetcher {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        // If this task ends (a panic, or the consumer closing), the member stops being ready.
        struct Ended(Arc<Shared>);
        impl Drop for Ended {
            fn drop(&mut self) {
                self.0.fetch_ok.store(false, Ordering::Relaxed);
            }
        }
        let _ended = Ended(self.shared.clone());
        loop {
            self.dispatch();
            let wake = self.next_wake();
            let budget = self.budget.clone();
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => return,
                },
                Some(done) = self.running.next(), if !self.running.is_empty() => self.done(done),
                _ = budget.freed.notified() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Add {
                key,
                offset,
                epoch,
                tx,
                budget,
            } => {
                self.parts.insert(
                    key,
                    Part {
                        offset,
                        epoch,
                        tx,
                        budget,
                        leader: None,
                        busy: false,
                        not_before: None,
                        backoff: backoff(),
                        waiting: None,
                        high_watermark: offset,
                    },
                );
            }
            Cmd::Remove(keys) => {
                for k in keys {
                    if let Some(p) = self.parts.remove(&k) {
                        self.reserved -= p.waiting.unwrap_or(0);
                    }
                    self.shared.set_stalled(&k, None);
                }
            }
        }
        self.share = self.budget.limit() / self.parts.len().max(1);
        for p in self.parts.values() {
            p.budget.set_share(self.share);
        }
    }

    /// The partition may go into the next request of its leader.
    fn fetchable(&self, p: &Part, now: Instant) -> bool {
        let held = p.budget.held();
        let room = match p.waiting {
            // Its big record: once it holds nothing and the budget has room for it.
            Some(need) => held == 0 && self.budget.free() >= need,
            None => (held == 0 || held < self.share / 2) && self.allowance(p) > 0,
        };
        p.leader.is_some() && !p.busy && due(p.not_before, now) && room
    }

    /// What a partition's records may cost in its next fetch: what is left of its share, and
    /// never the room kept for a partition waiting to take a big record.
    fn allowance(&self, p: &Part) -> usize {
        let left = self.share.saturating_sub(p.budget.held());
        match p.waiting {
            Some(need) => need,
            None => left.min(self.budget.free().saturating_sub(self.reserved)),
        }
    }

    /// Paused, with records waiting behind it at the broker.
    fn backlogged(&self, p: &Part) -> bool {
        !p.busy && p.high_watermark > p.offset && p.budget.held() >= self.share / 2
    }

    /// Starts what can start: Metadata for partitions without a leader, connections, one
    /// Fetch per idle broker with fetchable partitions.
    fn dispatch(&mut self) {
        let now = Instant::now();
        if !self.leaders_busy
            && due(self.leaders_not_before, now)
            && self.parts.values().any(|p| p.leader.is_none() && !p.busy)
        {
            let topics: BTreeSet<String> = self
                .parts
                .iter()
                .filter(|(_, p)| p.leader.is_none())
                .map(|(k, _)| k.0.to_string())
                .collect();
            self.leaders_busy = true;
            let connector = self.connector.clone();
            self.running
                .push(async move { Done::Leaders(leaders(&connector, topics).await) }.boxed());
        }
        let mut wanted: HashMap<i32, Vec<Key>> = HashMap::new();
        for (k, p) in &self.parts {
            if self.fetchable(p, now) {
                wanted
                    .entry(p.leader.unwrap_or(-1))
                    .or_default()
                    .push(k.clone());
            }
        }
        for (id, keys) in wanted {
            let Some(b) = self.brokers.get_mut(&id) else {
                continue;
            };
            if b.busy || !due(b.not_before, now) {
                continue;
            }
            b.busy = true;
            let Some((conn, version)) = b.conn.take() else {
                let connector = self.connector.clone();
                let addr = b.addr.clone();
                self.running.push(
                    async move {
                        let result = async {
                            let c = connector.connect(&addr).await?;
                            let v = c.version::<FetchRequest>("Fetch", FETCH_MAX_VERSION)?;
                            Ok((c, v))
                        }
                        .await;
                        Done::Connected { broker: id, result }
                    }
                    .boxed(),
                );
                continue;
            };
            let (req, asked) = self.request(id, version, &keys);
            let timeout = self.cluster.request_timeout + self.cfg.fetch_max_wait;
            self.running
                .push(fetch(id, conn, version, req, asked, timeout).boxed());
        }
    }

    /// The Fetch for broker `id` and its partitions `keys` (full, or the changes of its
    /// session); marks them busy.
    fn request(&mut self, id: i32, version: i16, keys: &[Key]) -> (FetchRequest, Vec<Asked>) {
        let part_max = self
            .cfg
            .max_partition_fetch_bytes
            .min(self.share)
            .clamp(1, i32::MAX as usize) as i32;
        let mut asked = Vec::with_capacity(keys.len());
        let mut want: HashMap<Key, Sent> = HashMap::with_capacity(keys.len());
        for k in keys {
            let Some(p) = self.parts.get_mut(k) else {
                continue;
            };
            p.busy = true;
            asked.push(Asked {
                key: k.clone(),
                offset: p.offset,
                epoch: p.epoch,
                allowance: 0,
            });
            want.insert(k.clone(), (p.offset, part_max));
        }
        for a in &mut asked {
            if let Some(p) = self.parts.get(&a.key) {
                a.allowance = self.allowance(p).max(1);
            }
        }
        // A paused partition of this broker has records waiting: ask for a short wait, so it
        // is fetched soon after it resumes rather than after a long poll of the others.
        let backlog = self
            .parts
            .values()
            .any(|p| p.leader == Some(id) && self.backlogged(p));
        let max_wait = if backlog {
            self.cfg
                .fetch_max_wait
                .min((self.cfg.fetch_max_wait / 10).max(Duration::from_millis(10)))
        } else {
            self.cfg.fetch_max_wait
        };
        let b = self
            .brokers
            .get_mut(&id)
            .expect("dispatch checked the broker");
        let sessions = version >= SESSION_MIN_VERSION;
        let (send, forget): (Vec<(Key, Sent)>, Vec<Key>) = if sessions && b.session.id != 0 {
            // Incremental: what changed or is new, and what left (paused or gone).
            let send = want
                .iter()
                .filter(|(k, v)| b.session.sent.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            let forget = b
                .session
                .sent
                .keys()
                .filter(|k| !want.contains_key(*k))
                .cloned()
                .collect();
            (send, forget)
        } else {
            b.session = Session::default();
            (
                want.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                Vec::new(),
            )
        };
        let mut topics: HashMap<Arc<str>, Vec<FetchPartition>> = HashMap::new();
        for ((t, p), (offset, max)) in send {
            topics.entry(t).or_default().push(
                FetchPartition::default()
                    .with_partition(p)
                    .with_fetch_offset(offset)
                    .with_partition_max_bytes(max),
            );
        }
        let mut forgotten: HashMap<Arc<str>, Vec<i32>> = HashMap::new();
        for (t, p) in forget {
            forgotten.entry(t).or_default().push(p);
        }
        let wait_ms = i32::try_from(max_wait.as_millis()).unwrap_or(i32::MAX);
        // Never more than the budget has room for (a broker sends at least one batch anyway).
        let max_bytes = self
            .cfg
            .fetch_max_bytes
            .min(self.budget.free().max(part_max as usize))
            .clamp(1, i32::MAX as usize) as i32;
        let mut req = FetchRequest::default()
            .with_max_wait_ms(wait_ms)
            .with_min_bytes(1)
            .with_max_bytes(max_bytes)
            .with_isolation_level(READ_COMMITTED)
            .with_topics(
                topics
                    .into_iter()
                    .map(|(t, parts)| {
                        FetchTopic::default()
                            .with_topic(TopicName(StrBytes::from_string(t.to_string())))
                            .with_partitions(parts)
                    })
                    .collect(),
            );
        if sessions {
            req = req
                .with_session_id(b.session.id)
                .with_session_epoch(b.session.epoch)
                .with_forgotten_topics_data(
                    forgotten
                        .into_iter()
                        .map(|(t, ps)| {
                            ForgottenTopic::default()
                                .with_topic(TopicName(StrBytes::from_string(t.to_string())))
                                .with_partitions(ps)
                        })
                        .collect(),
                );
            b.session.sent = want;
        } else {
            req = req.with_session_epoch(-1);
        }
        (req, asked)
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut at = far;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                at = at.min(t);
            }
        };
        for p in self.parts.values() {
            if !p.busy {
                consider(p.not_before);
            }
        }
        for b in self.brokers.values() {
            if !b.busy {
                consider(b.not_before);
            }
        }
        if !self.leaders_busy && self.parts.values().any(|p| p.leader.is_none()) {
            consider(self.leaders_not_before);
        }
        if self.parts.values().any(|p| p.waiting.is_some()) {
            // Room for a big record comes from any partition's records finishing.
            consider(Some(Instant::now() + Duration::from_millis(20)));
        }
        at
    }

    fn done(&mut self, d: Done) {
        match d {
            Done::Connected { broker, result } => {
                let Some(b) = self.brokers.get_mut(&broker) else {
                    return;
                };
                b.busy = false;
                match result {
                    Ok(c) => {
                        b.conn = Some(c);
                        b.session = Session::default();
                    }
                    Err(e) => {
                        let wait = b.backoff.next_wait();
                        b.not_before = Some(Instant::now() + wait);
                        tracing::warn!(broker = %b.addr, error = %e, retry_in = ?wait, "fetch: cannot connect to the leader");
                        self.shared.fetch_ok.store(false, Ordering::Relaxed);
                        self.lost_broker(broker);
                    }
                }
            }
            Done::Fetched {
                broker,
                conn,
                asked,
                result,
            } => self.fetched(broker, conn, asked, result),
            Done::Reset { key, epoch, result } => self.reset_done(key, epoch, result),
            Done::Leaders(r) => {
                self.leaders_busy = false;
                match r {
                    Ok(l) => self.adopt_leaders(l),
                    Err(e) => {
                        let wait = self.leaders_backoff.next_wait();
                        self.leaders_not_before = Some(Instant::now() + wait);
                        self.shared.fetch_ok.store(false, Ordering::Relaxed);
                        tracing::warn!(error = %e, retry_in = ?wait, "fetch: cannot find partition leaders");
                    }
                }
            }
        }
    }

    /// Partitions led by `broker` look their leader up again.
    fn lost_broker(&mut self, broker: i32) {
        for p in self.parts.values_mut() {
            if p.leader == Some(broker) {
                p.leader = None;
            }
        }
    }

    fn adopt_leaders(&mut self, l: Leaders) {
        for (id, addr) in l.brokers {
            match self.brokers.get_mut(&id) {
                Some(b) if b.addr == addr => {}
                Some(b) => {
                    b.addr = addr;
                    b.conn = None;
                    b.session = Session::default();
                    b.stale = b.busy;
                }
                None => {
                    self.brokers.insert(
                        id,
                        Broker {
                            addr,
                            conn: None,
                            busy: false,
                            stale: false,
                            session: Session::default(),
                            not_before: None,
                            backoff: backoff(),
                        },
                    );
                }
            }
        }
        let mut missing = false;
        for (k, p) in self.parts.iter_mut() {
            if p.leader.is_none() {
                match l.leaders.get(k) {
                    Some(id) if self.brokers.contains_key(id) => {
                        tracing::debug!(topic = %k.0, partition = k.1, leader = id, "fetch: leader");
                        p.leader = Some(*id);
                    }
                    _ => missing = true,
                }
            }
        }
        if missing {
            let wait = self.leaders_backoff.next_wait();
            self.leaders_not_before = Some(Instant::now() + wait);
        } else {
            self.leaders_backoff.reset();
            self.leaders_not_before = None;
        }
    }

    fn fetched(
        &mut self,
        broker: i32,
        conn: Option<(BrokerConn, i16)>,
        asked: Vec<Asked>,
        result: Result<FetchOutcome>,
    ) {
        for a in &asked {
            if let Some(p) = self.parts.get_mut(&a.key)
                && p.epoch == a.epoch
            {
                p.busy = false;
            }
        }
        let Some(b) = self.brokers.get_mut(&broker) else {
            return;
        };
        b.busy = false;
        if std::mem::take(&mut b.stale) {
            // The broker moved while this request was out: its answer still counts, its
            // connection and session do not.
            b.conn = None;
            b.session = Session::default();
        } else {
            b.conn = conn;
        }
        let results = match result {
            Ok(FetchOutcome {
                session_id,
                throttle,
                parts: results,
            }) => {
                b.backoff.reset();
                if !throttle.is_zero() {
                    // KIP-219: the broker answered at once and expects us to wait.
                    b.not_before = Some(Instant::now() + throttle);
                }
                if session_id == 0 {
                    b.session = Session::default();
                } else if b.session.id == session_id {
                    b.session.epoch = b.session.epoch.checked_add(1).unwrap_or(1);
                } else {
                    // A new session (the full request asked for one).
                    b.session.id = session_id;
                    b.session.epoch = 1;
                }
                self.shared.fetch_ok.store(true, Ordering::Relaxed);
                results
            }
            Err(e) => {
                b.session = Session::default();
                match e.broker_error() {
                    Some(ResponseError::FetchSessionIdNotFound)
                    | Some(ResponseError::InvalidFetchSessionEpoch) => {
                        tracing::debug!(broker = %b.addr, error = %e, "fetch session reset");
                    }
                    _ => {
                        b.conn = None;
                        let wait = b.backoff.next_wait();
                        b.not_before = Some(Instant::now() + wait);
                        tracing::warn!(broker = %b.addr, error = %e, retry_in = ?wait, "fetch failed");
                        self.shared.fetch_ok.store(false, Ordering::Relaxed);
                        self.lost_broker(broker);
                    }
                }
                return;
            }
        };
        let asked: HashMap<Key, Asked> = asked.into_iter().map(|a| (a.key.clone(), a)).collect();
        for r in results {
            let Some(a) = asked.get(&r.key) else { continue };
            self.partition_result(a, r);
        }
    }

    fn partition_result(&mut self, a: &Asked, r: PartResult) {
        let Some(p) = self.parts.get_mut(&a.key) else {
            return;
        };
        if p.epoch != a.epoch || p.offset != a.offset {
            return; // removed and added again, or reset meanwhile
        }
        let k = &a.key;
        if r.error == 0 {
            p.high_watermark = r.high_watermark;
            if let Some(s) = self.shared.lock().get_mut(k)
                && s.epoch == p.epoch
            {
                s.high_watermark = r.high_watermark;
            }
        }
        match ResponseError::try_from_code(r.error) {
            None => {}
            Some(ResponseError::OffsetOutOfRange) => {
                p.busy = true;
                let cluster = self.cluster.clone();
                let reset = self.cfg.auto_offset_reset;
                let (key, epoch) = (k.clone(), p.epoch);
                self.running.push(
                    async move {
                        let result = reset_offset(&cluster, &key, reset).await;
                        Done::Reset { key, epoch, result }
                    }
                    .boxed(),
                );
                return;
            }
            Some(e) if leadership_error(e) => {
                tracing::info!(topic = %k.0, partition = k.1, error = ?e, "fetch: leader moved or unavailable; looking it up");
                p.leader = None;
                return;
            }
            Some(e) => {
                let wait = p.backoff.next_wait();
                p.not_before = Some(Instant::now() + wait);
                tracing::warn!(topic = %k.0, partition = k.1, error = ?e, retry_in = ?wait, "fetch: partition error");
                return;
            }
        }
        let d = match r.decoded {
            Ok(d) => d,
            Err(why) => {
                let wait = p.backoff.next_wait();
                p.not_before = Some(Instant::now() + wait);
                tracing::warn!(topic = %k.0, partition = k.1, error = %why, retry_in = ?wait, "fetch: cannot read the partition's records");
                return;
            }
        };
        p.backoff.reset();
        if d.records.is_empty() {
            if d.next_offset > p.offset {
                // Only markers or aborted records: commits may move past them.
                p.offset = d.next_offset;
                let _ = p.tx.send(Batch {
                    topic: k.0.clone(),
                    partition: k.1,
                    epoch: p.epoch,
                    records: Vec::new(),
                    high_watermark: r.high_watermark,
                    next_offset: d.next_offset,
                });
            }
            return;
        }
        let costs: Vec<usize> = d
            .records
            .iter()
            .map(|r| record_cost(r.key.as_ref(), r.value.as_ref(), &r.headers))
            .collect();
        let first = costs[0];
        if first > self.budget.limit() {
            let why = format!(
                "the record at offset {} needs {first} bytes of fetch buffer, more than the \
                 whole budget ({} bytes): raise --fetch-buffer-bytes (KAFKA_INFER_FETCH_BUFFER_BYTES)",
                a.offset,
                self.budget.limit()
            );
            if self.shared.set_stalled(k, Some(why.clone())) {
                tracing::error!(topic = %k.0, partition = k.1, "{why}");
            }
            p.not_before = Some(Instant::now() + STALLED_RETRY);
            return;
        }
        // What fits now: the budget may have less room than when the request went out (other
        // partitions' records of the same response), and room kept for others stays free.
        let own = p.waiting.unwrap_or(0);
        let room = self
            .budget
            .free()
            .saturating_sub(self.reserved.saturating_sub(own));
        let mut fit = 0;
        let mut sum = 0usize;
        for c in &costs {
            if sum + c > room {
                break;
            }
            sum += c;
            fit += 1;
        }
        if fit == 0 || (first > self.share && p.budget.held() > 0) {
            if first > self.share {
                // Larger than its share: waits until it holds nothing and the budget has room,
                // which is kept free for it meanwhile (the others' fetches leave it).
                if p.waiting.is_none() {
                    p.waiting = Some(first);
                    self.reserved += first;
                }
            } else {
                p.not_before = Some(Instant::now() + Duration::from_millis(20));
            }
            return;
        }
        let mut d = d;
        if fit < d.records.len() {
            // The rest comes with the next fetch.
            d.next_offset = d.records[fit].offset;
            d.records.truncate(fit);
            records::compact(&mut d.records);
        }
        let costs = &costs[..fit];
        if let Some(need) = p.waiting.take() {
            self.reserved -= need;
        }
        self.shared.set_stalled(k, None);
        p.offset = d.next_offset;
        let records: Vec<InRecord> = d
            .records
            .into_iter()
            .zip(costs.iter().copied())
            .map(|(r, c)| InRecord {
                offset: r.offset,
                key: r.key,
                value: r.value,
                headers: r.headers,
                timestamp_ms: r.timestamp_ms,
                charge: p.budget.charge(c),
            })
            .collect();
        let _ = p.tx.send(Batch {
            topic: k.0.clone(),
            partition: k.1,
            epoch: p.epoch,
            records,
            high_watermark: r.high_watermark,
            next_offset: d.next_offset,
        });
    }

    /// An offset reset: a new epoch of the partition, its tracker starting at the new position.
    fn reset_done(&mut self, key: Key, epoch: u64, result: Result<i64>) {
        let Some(p) = self.parts.get_mut(&key) else {
            return;
        };
        if p.epoch != epoch {
            return;
        }
        p.busy = false;
        match result {
            Ok(to) => {
                let mut parts = self.shared.lock();
                let Some(s) = parts.get_mut(&key) else { return };
                if s.epoch != epoch {
                    return;
                }
                let new_epoch = self.shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                tracing::warn!(topic = %key.0, partition = key.1, from = p.offset, to,
                    in_flight = s.offsets.in_flight(), "offset out of range: reset; records in flight from before are not committed");
                s.epoch = new_epoch;
                s.offsets = PartitionOffsets::new(to, None);
                s.high_watermark = s.high_watermark.max(to);
                // The worker's view of what is committed starts again at the new position.
                s.committed_tx.send_replace(to);
                drop(parts);
                p.epoch = new_epoch;
                p.offset = to;
                if let Some(need) = p.waiting.take() {
                    self.reserved -= need;
                }
                // Commits may move (also backwards, to the new position).
                self.shared.completed.notify_one();
            }
            Err(e) => {
                let wait = p.backoff.next_wait();
                p.not_before = Some(Instant::now() + wait);
                p.leader = None;
                tracing::warn!(topic = %key.0, partition = key.1, error = %e, retry_in = ?wait, "offset reset failed");
                let cluster = self.cluster.clone();
                let (t, n) = (key.0.to_string(), key.1);
                tokio::spawn(async move { cluster.forget_partition(&t, n).await });
            }
        }
    }
}

async fn reset_offset(cluster: &Cluster, key: &Key, reset: OffsetReset) -> Result<i64> {
    let at = match reset {
        OffsetReset::Earliest => OffsetAt::Earliest,
        OffsetReset::Latest => OffsetAt::Latest,
    };
    let pc = cluster.partition(&key.0, key.1).await?;
    bounded(
        "ListOffsets",
        &key.0,
        cluster.request_timeout,
        pc.get_offset(at),
    )
    .await
}

/// One Fetch on `conn`; the response decoded per partition (each within its allowance).
async fn fetch(
    broker: i32,
    mut conn: BrokerConn,
    version: i16,
    req: FetchRequest,
    asked: Vec<Asked>,
    timeout: Duration,
) -> Done {
    let result = async {
        let resp = conn
            .send_with_timeout(req, version, "Fetch", timeout)
            .await?;
        if resp.error_code != 0 {
            return Err(broker_error("Fetch", resp.error_code, None));
        }
        let by_key: HashMap<(&str, i32), &Asked> =
            asked.iter().map(|a| ((&*a.key.0, a.key.1), a)).collect();
        let several = resp
            .responses
            .iter()
            .map(|t| t.partitions.len())
            .sum::<usize>()
            > 1;
        let inline = resp
            .responses
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
            .sum::<usize>()
            <= DECODE_INLINE_MAX;
        let mut out = Vec::new();
        for t in resp.responses {
            for part in t.partitions {
                let Some(a) = by_key.get(&(t.topic.0.as_str(), part.partition_index)) else {
                    continue;
                };
                let data = part.records.unwrap_or_default();
                tracing::trace!(topic = %a.key.0, partition = a.key.1, bytes = data.len(), allowance = a.allowance, "fetch: partition data");
                let aborted: Vec<AbortedTxn> = part
                    .aborted_transactions
                    .unwrap_or_default()
                    .iter()
                    .map(|x| AbortedTxn {
                        producer_id: x.producer_id.0,
                        first_offset: x.first_offset,
                    })
                    .collect();
                let (offset, allowance) = (a.offset, a.allowance);
                let decoded = if part.error_code != 0 {
                    Ok(Decoded::default())
                } else if inline {
                    records::decode_limited(
                        &data,
                        offset,
                        &aborted,
                        crate::fetch::DEFAULT_MAX_DECOMPRESSED,
                        allowance,
                    )
                } else {
                    tokio::task::spawn_blocking(move || {
                        records::decode_limited(
                            &data,
                            offset,
                            &aborted,
                            crate::fetch::DEFAULT_MAX_DECOMPRESSED,
                            allowance,
                        )
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("decoding task failed: {e}")))
                };
                let decoded = decoded
                    .map(|mut d| {
                        d.next_offset = d.next_offset.max(offset);
                        // Records are slices of what they were decoded from: one partition's
                        // records must not keep the whole response alive (nor the part of
                        // their own data that was not handed out).
                        // (The decoder copied out the records of a cut batch, not those of the
                        // whole batches before it.)
                        if several || d.cut {
                            records::compact(&mut d.records);
                        }
                        d
                    })
                    .map_err(|why| format!("offset {offset}: {why}"));
                out.push(PartResult {
                    key: a.key.clone(),
                    error: part.error_code,
                    high_watermark: part.high_watermark,
                    decoded,
                });
            }
        }
        Ok(FetchOutcome {
            session_id: resp.session_id,
            throttle: Duration::from_millis(u64::try_from(resp.throttle_time_ms).unwrap_or(0)),
            parts: out,
        })
    }
    .await;
    // A broker's error code keeps the connection (e.g. a fetch session error: the next request
    // starts a new session); a failed call drops it (no half-read responses).
    let conn = match &result {
        Ok(_) => Some((conn, version)),
        Err(e) if e.broker_error().is_some() => Some((conn, version)),
        Err(_) => None,
    };
    Done::Fetched {
        broker,
        conn,
        asked,
        result,
    }
}

/// Leaders of every partition of `topics`, through any bootstrap broker.
async fn leaders(connector: &Connector, topics: BTreeSet<String>) -> Result<Leaders> {
    let t = connector.request_timeout;
    let call = async {
        let mut meta = connector.connect_any().await?;
        let v = meta.version::<MetadataRequest>("Metadata", METADATA_MAX_VERSION)?;
        let mut req = MetadataRequest::default().with_topics(Some(
            topics
                .iter()
                .map(|n| {
                    MetadataRequestTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_string(n.clone()))))
                })
                .collect(),
        ));
        if v >= 4 {
            req = req.with_allow_auto_topic_creation(false);
        }
        let resp = meta.send(req, v, "Metadata").await?;
        let mut brokers = HashMap::new();
        for b in &resp.brokers {
            let Ok(port) = u16::try_from(b.port) else {
                continue;
            };
            brokers.insert(
                b.node_id.0,
                BrokerAddr {
                    host: b.host.to_string(),
                    port,
                },
            );
        }
        let mut leaders = HashMap::new();
        for topic in &resp.topics {
            let Some(name) = topic.name.as_ref() else {
                continue;
            };
            if topic.error_code != 0 {
                continue;
            }
            let name: Arc<str> = Arc::from(name.0.as_str());
            for p in &topic.partitions {
                let BrokerId(id) = p.leader_id;
                if id >= 0 {
                    leaders.insert((name.clone(), p.partition_index), id);
                }
            }
        }
        Ok(Leaders { leaders, brokers })
    };
    match tokio::time::timeout(t, call).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            call: "Metadata (partition leaders)",
            broker: connector.settings.bootstrap_strings().join(","),
            after: t,
        }),
    }
}
