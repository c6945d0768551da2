//! The group consumer: a member of a consumer group, run as a reconciler. The membership part
//! (classic JoinGroup/SyncGroup here; a KIP-848 part would yield assignments the same way)
//! yields target assignments; the reconciler diffs each against what it owns, drains and
//! commits the partitions that leave, and starts a fetcher and a [`PartitionStream`] for each
//! partition that arrives. Partitions that stay keep running through a rebalance when the group
//! uses the cooperative protocol.
//!
//! One task owns the membership: joins, heartbeats (on their own short timeouts, also while
//! partitions drain), commits (soon after records complete), and the session: a member that
//! has not had a heartbeat answered within the session timeout considers its partitions lost,
//! stops their streams and commits nothing. Fetcher tasks own nothing but their position. The
//! caller completes records through [`Acker`]; commits never pass an incomplete record.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

mod fetcher;

use bytes::Bytes;
use rskafka::client::partition::OffsetAt;
use tokio::{
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
};

use crate::{
    assignor::Tp,
    backoff::Backoff,
    cluster::{Cluster, bounded},
    error::{Error, Result},
    fetch::budget::{Budget, Charge, PartitionBudget},
    group::{GroupConfig, Member},
    offsets::PartitionOffsets,
};

/// Where to start a partition the group has never committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OffsetReset {
    #[default]
    Earliest,
    Latest,
}

impl std::str::FromStr for OffsetReset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "earliest" | "smallest" | "beginning" => Ok(Self::Earliest),
            "latest" | "largest" | "end" => Ok(Self::Latest),
            o => Err(format!("`{o}` is not earliest or latest")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub group: GroupConfig,
    pub auto_offset_reset: OffsetReset,
    /// Longest a fetch waits at the broker for data (fetch.max.wait.ms; latency follows it on
    /// brokers that hold a fetch until then, as the test broker does).
    pub fetch_max_wait: Duration,
    /// Most bytes one Fetch response may carry (fetch.max.bytes), never above the budget.
    pub fetch_max_bytes: usize,
    /// Most bytes one partition of a Fetch response may carry (max.partition.fetch.bytes),
    /// never above the partition's share of the budget; the first batch comes whole anyway.
    pub max_partition_fetch_bytes: usize,
    /// The memory budget of fetched records not yet finished, counted per decoded record
    /// ([`crate::fetch::budget`]); each partition gets an equal share, a partition holding half
    /// of its share is paused.
    pub fetch_buffer_bytes: usize,
    /// Shortest spacing of commits: a completion is committed at most this long after it
    /// happened (a crash redoes what completed within it, plus what was in flight).
    pub commit_interval: Duration,
    /// How often the input topics' partition counts are checked (new partitions: rejoin).
    pub metadata_refresh: Duration,
    /// Longest wait for in-flight records to complete on revoke and on close.
    pub drain_timeout: Duration,
    /// Offsets are committed by the caller's transactions ([`Consumer::transactions`]): the
    /// consumer never sends OffsetCommit itself, and a revoke does not drain (the caller
    /// aborts its open transaction in the revoke hook; the next owner redoes what it held).
    pub transactional_commits: bool,
}

impl ConsumerConfig {
    pub fn new(group: GroupConfig) -> Self {
        Self {
            group,
            auto_offset_reset: OffsetReset::Earliest,
            fetch_max_wait: Duration::from_millis(500),
            fetch_max_bytes: 50 << 20,
            max_partition_fetch_bytes: 1 << 20,
            fetch_buffer_bytes: DEFAULT_FETCH_BUFFER_BYTES,
            commit_interval: Duration::from_secs(1),
            metadata_refresh: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            transactional_commits: false,
        }
    }
}

/// The default memory budget of fetched, unfinished records.
pub const DEFAULT_FETCH_BUFFER_BYTES: usize = 32 << 20;

/// A consumed record.
#[derive(Clone, Debug)]
pub struct InRecord {
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Bytes)>,
    pub timestamp_ms: i64,
    /// Its share of the fetch buffer budget, given back when the record is dropped (a clone
    /// carries none).
    pub charge: Charge,
}

/// Records of one partition, in offset order.
#[derive(Debug)]
pub struct Batch {
    pub topic: Arc<str>,
    pub partition: i32,
    /// The assignment epoch the batch was fetched in; completions carry it back.
    pub epoch: u64,
    pub records: Vec<InRecord>,
    pub high_watermark: i64,
    /// Where the next fetch starts: past the records, and past transaction markers and
    /// aborted records after them (skipped offsets are committed past too).
    pub next_offset: i64,
}

impl Batch {
    pub fn token(&self, offset: i64) -> Token {
        Token {
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
            epoch: self.epoch,
        }
    }
}

/// Names one handed-out record, for [`Acker::complete`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub epoch: u64,
}

/// Lag of one assigned partition, as KEDA computes it but with the fetch high watermark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub high_watermark: i64,
    pub committed: Option<i64>,
    pub lag: i64,
}

struct PartitionState {
    offsets: PartitionOffsets,
    /// The epoch of the partition's records now (a new one after an offset reset).
    epoch: u64,
    /// The epoch it was assigned in (its stream's).
    assigned: u64,
    /// The epoch the position being committed was read in: a commit read before an offset
    /// reset does not count for the tracker made by the reset.
    commit_epoch: u64,
    high_watermark: i64,
    /// The committed position, for the stream's worker (it bounds uncommitted work by it).
    committed_tx: watch::Sender<i64>,
}

/// A partition as the consumer keys it (cheap to clone from a [`Token`]).
type Key = (Arc<str>, i32);

fn key(tp: &Tp) -> Key {
    (Arc::from(tp.0.as_str()), tp.1)
}

fn tp(k: &Key) -> Tp {
    (k.0.to_string(), k.1)
}

#[derive(Default)]
struct Shared {
    parts: std::sync::Mutex<HashMap<Key, PartitionState>>,
    epoch: AtomicU64,
    drained: Notify,
    /// Told on every completion: the group task commits soon after.
    completed: Notify,
    /// Told when a worker waits for a commit: the session commits at once.
    urgent: Notify,
    /// The coordinator answers within the session timeout.
    group_ok: AtomicBool,
    /// When the coordinator last answered (ms since `born`).
    last_answer_ms: AtomicU64,
    born: std::sync::OnceLock<Instant>,
    /// The last fetch succeeded.
    fetch_ok: AtomicBool,
    /// Why the member stopped for good (e.g. FENCED_INSTANCE_ID).
    fatal: std::sync::Mutex<Option<String>>,
    /// Partitions that cannot go on, and why (a record larger than the whole fetch budget).
    stalled: std::sync::Mutex<HashMap<Key, String>>,
    /// Offsets go by the caller's transactions: no OffsetCommit of our own.
    external_commits: AtomicBool,
    /// Told by [`TxnPositions::rejoin`]: give every partition up without commit and rejoin.
    rejoin: Notify,
}

impl Shared {
    /// Says (or clears) why a partition cannot go on; true when that is news.
    fn set_stalled(&self, k: &Key, why: Option<String>) -> bool {
        let mut st = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
        match why {
            Some(w) => st.insert(k.clone(), w.clone()).as_ref() != Some(&w),
            None => st.remove(k).is_some(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, PartitionState>> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn positions_to_commit(&self, only: Option<&[Key]>) -> Vec<(Tp, i64)> {
        self.lock()
            .iter_mut()
            .filter(|(k, _)| only.is_none_or(|o| o.contains(k)))
            .filter_map(|(k, s)| {
                let o = s.offsets.to_commit()?;
                s.commit_epoch = s.epoch;
                Some((tp(k), o))
            })
            .collect()
    }

    fn mark_committed(&self, done: &[(Tp, i64)]) {
        let mut parts = self.lock();
        for (t, o) in done {
            if let Some(s) = parts.get_mut(&key(t))
                && s.commit_epoch == s.epoch
            {
                s.offsets.mark_committed(*o);
                s.committed_tx.send_replace(*o);
            }
        }
    }

    fn in_flight(&self, only: Option<&[Key]>) -> usize {
        self.lock()
            .iter()
            .filter(|(k, _)| only.is_none_or(|o| o.contains(k)))
            .map(|(_, s)| s.offsets.in_flight())
            .sum()
    }
}

impl crate::session::Positions for Shared {
    fn to_commit(&self, only: Option<&[Tp]>) -> Vec<(Tp, i64)> {
        if self.external_commits.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let keys: Option<Vec<Key>> = only.map(|o| o.iter().map(key).collect());
        self.positions_to_commit(keys.as_deref())
    }
    fn committed(&self, done: &[(Tp, i64)]) {
        self.mark_committed(done)
    }
    fn completed(&self) -> impl Future<Output = ()> + Send {
        self.completed.notified()
    }
    fn urgent(&self) -> impl Future<Output = ()> + Send {
        self.urgent.notified()
    }
    fn set_group_ok(&self, ok: bool) {
        if ok {
            self.last_answer_ms
                .store(self.since_born().as_millis() as u64, Ordering::Relaxed);
        }
        self.group_ok.store(ok, Ordering::Relaxed);
    }
}

impl Shared {
    fn since_born(&self) -> Duration {
        self.born.get_or_init(Instant::now).elapsed()
    }

    /// How long since the coordinator last answered.
    fn silent_for(&self) -> Duration {
        self.since_born().saturating_sub(Duration::from_millis(
            self.last_answer_ms.load(Ordering::Relaxed),
        ))
    }
}

/// Completes records; cheap to clone and to hand to other tasks.
#[derive(Clone)]
pub struct Acker(Arc<Shared>);

impl Acker {
    /// Marks the record done (its result is safely written). Tokens from a previous
    /// assignment are ignored: that work is redone by the partition's new owner.
    pub fn complete(&self, token: &Token) {
        let mut parts = self.0.lock();
        if let Some(s) = parts.get_mut(&(token.topic.clone(), token.partition))
            && s.epoch == token.epoch
        {
            s.offsets.complete(token.offset);
            let drained = s.offsets.is_drained();
            drop(parts);
            self.0.completed.notify_one();
            if drained {
                self.0.drained.notify_waiters();
            }
        }
    }

    /// Asks for a commit now rather than within the commit interval (the caller waits for its
    /// acknowledged records to be committed, e.g. to bound what a crash redoes).
    pub fn urge_commit(&self) {
        self.0.urgent.notify_one();
    }

    /// Gives the record up (no result will be written): commits stop before it, so the
    /// partition's next owner redoes it, and drains do not wait for it.
    pub fn abandon(&self, token: &Token) {
        let mut parts = self.0.lock();
        if let Some(s) = parts.get_mut(&(token.topic.clone(), token.partition))
            && s.epoch == token.epoch
        {
            s.offsets.abandon(token.offset);
            if s.offsets.is_drained() {
                drop(parts);
                self.0.drained.notify_waiters();
            }
        }
    }
}

/// The positions and identity for offsets committed in the caller's transactions (KIP-447:
/// TxnOffsetCommit with the member's generation and member id).
#[derive(Clone)]
pub struct TxnPositions {
    shared: Arc<Shared>,
    identity: watch::Receiver<crate::session::Identity>,
    group_id: String,
    instance_id: Option<String>,
}

impl TxnPositions {
    /// What moved past the last commit of every owned partition, with the member's identity;
    /// None while not a member (nothing may be committed then).
    /// Only partitions assigned in epoch `min_epoch` or later count: what was assigned
    /// before an abort holds completions of the aborted transaction and is never committed.
    pub fn offsets(&self, min_epoch: u64) -> Option<crate::txn::TxnOffsets> {
        let id = self.identity.borrow().clone();
        if id.generation < 0 {
            return None;
        }
        let keys: Vec<Key> = self
            .shared
            .lock()
            .iter()
            .filter(|(_, s)| s.assigned >= min_epoch)
            .map(|(k, _)| k.clone())
            .collect();
        Some(crate::txn::TxnOffsets {
            group_id: self.group_id.clone(),
            generation_id: id.generation,
            member_id: id.member_id,
            group_instance_id: self.instance_id.clone(),
            positions: self.shared.positions_to_commit(Some(&keys)),
        })
    }

    /// The transaction holding `offsets` committed.
    pub fn committed(&self, offsets: &crate::txn::TxnOffsets) {
        self.shared.mark_committed(&offsets.positions);
        crate::session::Positions::set_group_ok(&*self.shared, true);
    }

    /// The newest assignment epoch handed out: every stream existing now has an epoch at or
    /// below it (an abort makes them all stale).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::SeqCst)
    }

    /// Gives every partition up without commit and rejoins the group (after an aborted
    /// transaction: what completed in it must be redone).
    pub fn rejoin(&self) {
        self.shared.rejoin.notify_one();
    }
}

/// Called on revoke with the partitions about to go, before the drain: flush what you hold.
pub type RevokeHook =
    Arc<dyn Fn(Vec<Tp>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Where a partition stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StreamState {
    /// Owned: batches flow.
    Active,
    /// Leaving (rebalance or close): start nothing new, finish what is in flight; the consumer
    /// waits (drain timeout), commits, then revokes.
    Draining,
    /// Gone (or lost): stop at once; results of unfinished records are not committed here.
    Revoked,
}

/// The records of one assigned partition, for as long as this member owns it. A worker per
/// stream: a slow partition never holds up another.
pub struct PartitionStream {
    pub topic: Arc<str>,
    pub partition: i32,
    pub epoch: u64,
    rx: mpsc::UnboundedReceiver<Batch>,
    state: watch::Receiver<StreamState>,
    committed: watch::Receiver<i64>,
    shared: Arc<Shared>,
    budget: Arc<PartitionBudget>,
}

impl PartitionStream {
    /// The partition holds more than its share of the fetch buffer (its fetched records plus
    /// the answers being written): a worker should start no more of its records until some are
    /// acknowledged.
    pub fn over_budget(&self) -> bool {
        self.budget.is_over()
    }

    /// The next batch, in offset order; None once the stream is draining or revoked.
    pub async fn recv(&mut self) -> Option<Batch> {
        loop {
            if *self.state.borrow() != StreamState::Active {
                return None;
            }
            tokio::select! {
                b = self.rx.recv() => {
                    let batch = b?;
                    let mut parts = self.shared.lock();
                    let s = parts.get_mut(&(batch.topic.clone(), batch.partition))?;
                    if s.assigned != self.epoch {
                        return None;
                    }
                    if s.epoch != batch.epoch {
                        // Fetched before an offset reset: the position moved on without it.
                        continue;
                    }
                    for r in &batch.records {
                        s.offsets.handed_out(r.offset);
                    }
                    s.offsets.advance_to(batch.next_offset);
                    if batch.records.is_empty() {
                        // Only markers or aborted records: nothing to process, but commits
                        // may move past them.
                        drop(parts);
                        self.shared.completed.notify_one();
                        continue;
                    }
                    return Some(batch);
                }
                r = self.state.changed() => if r.is_err() { return None },
            }
        }
    }

    /// A watch of the partition's committed position (the next offset a restart reads): a
    /// worker that counts its acknowledged, not yet committed records against it bounds what a
    /// crash redoes.
    pub fn committed(&self) -> watch::Receiver<i64> {
        self.committed.clone()
    }

    /// A watch of the stream's state, for workers to select on.
    pub fn state(&self) -> watch::Receiver<StreamState> {
        self.state.clone()
    }

    /// A token in the stream's assigned epoch. After an offset reset the records carry a new
    /// epoch: complete them with [`Batch::token`], which is always right.
    pub fn token(&self, offset: i64) -> Token {
        Token {
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
            epoch: self.epoch,
        }
    }
}

pub struct Consumer {
    streams: mpsc::UnboundedReceiver<PartitionStream>,
    txn: TxnPositions,
    session_timeout: Duration,
    /// recv()'s merge of every stream (made on first use).
    merged: Option<(mpsc::Sender<Batch>, mpsc::Receiver<Batch>)>,
    shared: Arc<Shared>,
    budget: Arc<Budget>,
    assignment: watch::Receiver<BTreeSet<Tp>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Consumer {
    /// Starts membership; streams (and batches) flow once the first assignment arrives.
    pub fn start(
        cluster: Arc<Cluster>,
        config: ConsumerConfig,
        on_revoke: Option<RevokeHook>,
    ) -> Self {
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        shared.fetch_ok.store(true, Ordering::Relaxed);
        shared
            .external_commits
            .store(config.transactional_commits, Ordering::Relaxed);
        shared.since_born();
        let session_timeout = config.group.session_timeout;
        let (assign_tx, assignment) = watch::channel(BTreeSet::new());
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let budget = Budget::new(config.fetch_buffer_bytes);
        let (fetch, fetch_task) = fetcher::start(
            cluster.clone(),
            config.clone(),
            shared.clone(),
            budget.clone(),
        );
        let session = crate::session::start(
            cluster.connector.clone(),
            config.group.clone(),
            config.commit_interval,
            shared.clone(),
        );
        let identity = session.identity.subscribe();
        let txn = TxnPositions {
            shared: shared.clone(),
            identity,
            group_id: config.group.group_id.clone(),
            instance_id: config.group.instance_id.clone(),
        };
        let task = tokio::spawn(
            GroupTask {
                member: Member::new(cluster.connector.clone(), config.group.clone()),
                session,
                cluster,
                config,
                shared: shared.clone(),
                streams_tx,
                assign_tx,
                owned: HashMap::new(),
                on_revoke,
                known_counts: None,
                fetch,
                fetch_task,
                budget: budget.clone(),
            }
            .run(stop_rx),
        );
        Self {
            streams,
            txn,
            session_timeout,
            merged: None,
            shared,
            budget,
            assignment,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The next newly assigned partition; None once the consumer is closed (or stopped for
    /// good: see [`fatal_error`](Self::fatal_error)).
    pub async fn next_stream(&mut self) -> Option<PartitionStream> {
        self.streams.recv().await
    }

    /// The next batch of any assigned partition, all streams merged (for simple callers; a
    /// runner wants [`next_stream`](Self::next_stream) so no partition waits on another).
    /// None once closed.
    pub async fn recv(&mut self) -> Option<Batch> {
        let (tx, _) = self.merged.get_or_insert_with(|| mpsc::channel(8));
        let tx = tx.clone();
        loop {
            let rx = &mut self.merged.as_mut().expect("made above").1;
            tokio::select! {
                s = self.streams.recv() => {
                    let mut s = s?;
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while let Some(b) = s.recv().await {
                            if tx.send(b).await.is_err() {
                                return;
                            }
                        }
                    });
                }
                b = rx.recv() => return b,
            }
        }
    }

    pub fn acker(&self) -> Acker {
        Acker(self.shared.clone())
    }

    /// What a caller committing offsets in its own transactions needs
    /// ([`ConsumerConfig::transactional_commits`]).
    pub fn transactions(&self) -> TxnPositions {
        self.txn.clone()
    }

    /// Currently assigned partitions (changes on every rebalance).
    pub fn assignment(&self) -> watch::Receiver<BTreeSet<Tp>> {
        self.assignment.clone()
    }

    /// True while the member is in the group (the coordinator answered its last call, and
    /// answered within the session timeout) and the fetchers reach the cluster.
    pub fn is_connected(&self) -> bool {
        self.shared.group_ok.load(Ordering::Relaxed)
            && self.shared.fetch_ok.load(Ordering::Relaxed)
            && self.shared.silent_for() < self.session_timeout
    }

    /// Why the member stopped for good, if it did (the caller should exit non-zero).
    pub fn fatal_error(&self) -> Option<String> {
        self.shared
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight(None)
    }

    /// Partitions that cannot go on (a record larger than the whole fetch budget), with why.
    pub fn stalled(&self) -> Vec<(Tp, String)> {
        let mut v: Vec<(Tp, String)> = self
            .shared
            .stalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, w)| (tp(k), w.clone()))
            .collect();
        v.sort();
        v
    }

    /// The fetch buffer budget (bytes held by fetched, unfinished records; its limit).
    pub fn budget(&self) -> Arc<Budget> {
        self.budget.clone()
    }

    /// Lag of each assigned partition: high watermark minus committed position.
    pub fn lag(&self) -> Vec<PartitionLag> {
        let mut v: Vec<PartitionLag> = self
            .shared
            .lock()
            .iter()
            .map(|((t, p), s)| {
                let committed = s.offsets.committed();
                PartitionLag {
                    topic: t.to_string(),
                    partition: *p,
                    high_watermark: s.high_watermark,
                    committed,
                    lag: (s.high_watermark - committed.unwrap_or(0)).max(0),
                }
            })
            .collect();
        v.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        v
    }

    /// Stops fetching, waits for in-flight records (drain timeout, heartbeating meanwhile),
    /// commits, leaves the group. Keep completing records while this runs, or it waits for
    /// the drain timeout.
    pub async fn close(&mut self) {
        self.begin_close();
        self.closed().await;
    }

    /// Starts closing without waiting (see [`close`](Self::close)); await [`closed`](Self::closed).
    pub fn begin_close(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn closed(&mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// A partition this member owns.
struct Owned {
    state: watch::Sender<StreamState>,
}

struct GroupTask {
    cluster: Arc<Cluster>,
    /// JoinGroup, SyncGroup, OffsetFetch, LeaveGroup (one connection).
    member: Member,
    /// Heartbeats and commits (another connection, another task).
    session: crate::session::Session,
    config: ConsumerConfig,
    shared: Arc<Shared>,
    streams_tx: mpsc::UnboundedSender<PartitionStream>,
    assign_tx: watch::Sender<BTreeSet<Tp>>,
    owned: HashMap<Key, Owned>,
    on_revoke: Option<RevokeHook>,
    /// The input topics' partition counts when we last joined.
    known_counts: Option<std::collections::BTreeMap<String, i32>>,
    /// The fetcher (one Fetch per leader broker for every owned partition).
    fetch: mpsc::UnboundedSender<fetcher::Cmd>,
    fetch_task: JoinHandle<()>,
    budget: Arc<Budget>,
}

impl Drop for GroupTask {
    fn drop(&mut self) {
        self.fetch_task.abort();
    }
}

/// Why the member loop ended.
enum Exit {
    /// Rebalance announced: rejoin (eager: after draining and committing everything).
    Rebalance,
    /// Our generation is gone, or no heartbeat was answered within the session timeout: the
    /// partitions are lost: stop their streams, commit nothing, rejoin.
    Lost {
        unknown_member: bool,
    },
    /// A group error no retry can fix.
    Fatal(String),
    Stop,
}

use crate::session::{CommitRequest, Identity, SessionEvent, fatal_group_error};

impl GroupTask {
    fn call_timeout(&self) -> Duration {
        crate::session::call_timeout(self.config.group.session_timeout)
    }

    /// Tells the session task who we are now (generation -1: stop heartbeats and commits).
    fn set_identity(&self, generation: i32) {
        self.session.identity.send_replace(Identity {
            member_id: self.member.member_id().to_owned(),
            generation,
        });
    }

    async fn run(mut self, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let group = self.config.group.group_id.clone();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            if self
                .shared
                .fatal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
            {
                self.revoke_all(false).await;
                self.session.task.abort();
                return;
            }
            let cluster = self.cluster.clone();
            let owned: BTreeSet<Tp> = self.owned.keys().map(tp).collect();
            let join = self.member.join(&owned, async move |topics: &[String]| {
                cluster.partition_counts(topics).await
            });
            let join_bound = self.config.group.rebalance_timeout + Duration::from_secs(10);
            let assignment = tokio::select! {
                r = tokio::time::timeout(join_bound, join) => r.unwrap_or(Err(Error::Timeout {
                    call: "JoinGroup/SyncGroup",
                    broker: String::new(),
                    after: join_bound,
                })),
                _ = &mut stop => { self.shutdown_in_join().await; return; }
            };
            let assignment = match assignment {
                Ok(a) => a,
                Err(e) => {
                    if let Some(why) = fatal_group_error(&e) {
                        return self.fail(why).await;
                    }
                    self.shared.group_ok.store(false, Ordering::Relaxed);
                    // Whatever we owned is not ours any more once the session has run out.
                    if !self.owned.is_empty()
                        && self.shared.silent_for() > self.config.group.session_timeout
                    {
                        self.revoke_all(false).await;
                    }
                    let wait = backoff.next_wait();
                    tracing::warn!(%group, error = %e, retry_in = ?wait, "join failed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = &mut stop => { self.shutdown_in_join().await; return; }
                    }
                    continue;
                }
            };
            self.set_identity(assignment.generation);
            crate::session::Positions::set_group_ok(&*self.shared, true);
            tracing::info!(%group, generation = assignment.generation, member = self.member.member_id(),
                protocol = ?self.member.protocol(), partitions = ?assignment.partitions, "joined group");
            // Reconcile: what left is drained and committed; what arrived starts.
            let target: HashMap<Key, ()> =
                assignment.partitions.iter().map(|t| (key(t), ())).collect();
            let gone: Vec<Key> = self
                .owned
                .keys()
                .filter(|k| !target.contains_key(*k))
                .cloned()
                .collect();
            let cooperative = self.member.is_cooperative();
            if !gone.is_empty() {
                tracing::info!(%group, partitions = ?gone, "revoking partitions that moved");
                if !self.revoke(&gone, true).await {
                    continue;
                }
            }
            let new: BTreeSet<Tp> = assignment
                .partitions
                .iter()
                .filter(|t| !self.owned.contains_key(&key(t)))
                .cloned()
                .collect();
            if let Err(e) = self.start(&new).await {
                let wait = backoff.next_wait();
                tracing::warn!(%group, error = %e, retry_in = ?wait, "could not start the assignment; rejoining");
                // Nothing of the new partitions was handed out: drop them without a commit.
                let started: Vec<Key> = new
                    .iter()
                    .map(key)
                    .filter(|k| self.owned.contains_key(k))
                    .collect();
                self.revoke(&started, false).await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut stop => { self.shutdown(true).await; return; }
                }
                continue;
            }
            backoff.reset();
            self.known_counts = self
                .cluster
                .partition_counts(&self.config.group.topics)
                .await
                .ok();
            self.publish_assignment();
            if cooperative && !gone.is_empty() {
                // KIP-429: after revoking, rejoin so the partitions can move to their new owner.
                continue;
            }
            match self.member_loop(&mut stop).await {
                Exit::Stop => {
                    self.shutdown(true).await;
                    return;
                }
                Exit::Rebalance => {
                    if cooperative {
                        tracing::info!(%group, "rebalance: rejoining, partitions keep running");
                    } else {
                        tracing::info!(%group, "rebalance: draining and committing before rejoin");
                        self.revoke_all(true).await;
                    }
                }
                Exit::Lost { unknown_member } => {
                    tracing::warn!(%group, "membership lost: stopping partitions without commit, rejoining");
                    if unknown_member {
                        self.member.reset_member();
                    }
                    self.set_identity(-1);
                    self.shared.group_ok.store(false, Ordering::Relaxed);
                    self.revoke_all(false).await;
                }
                Exit::Fatal(why) => return self.fail(why).await,
            }
        }
    }

    /// Stops for good: partitions stop without commit, the caller learns why.
    async fn fail(&mut self, why: String) {
        self.set_identity(-1);
        tracing::error!(group = %self.config.group.group_id, "{why}");
        *self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.shared.group_ok.store(false, Ordering::Relaxed);
        self.revoke_all(false).await;
        self.session.task.abort();
    }

    fn publish_assignment(&self) {
        self.assign_tx
            .send_replace(self.owned.keys().map(tp).collect());
    }

    /// Reads committed positions of `tps`, resolves the rest by the reset policy, starts a
    /// fetcher and hands out a stream for each.
    async fn start(&mut self, tps: &BTreeSet<Tp>) -> Result<()> {
        if tps.is_empty() {
            return Ok(());
        }
        let committed = self.member.committed(tps).await?;
        let mut starts = Vec::new();
        for tp in tps {
            let c = committed.get(tp).copied().flatten();
            let start = match c {
                Some(o) => o,
                None => self.reset_position(tp).await?,
            };
            starts.push((tp.clone(), start, c));
        }
        for (tp, start, c) in starts {
            let epoch = self.shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            let k = key(&tp);
            let (committed_tx, committed) = watch::channel(c.unwrap_or(start));
            self.shared.lock().insert(
                k.clone(),
                PartitionState {
                    offsets: PartitionOffsets::new(start, c),
                    epoch,
                    assigned: epoch,
                    commit_epoch: epoch,
                    high_watermark: start,
                    committed_tx,
                },
            );
            // Unbounded in batches, bounded in bytes: the fetcher pauses a partition holding
            // half its share of the fetch budget.
            let (tx, rx) = mpsc::unbounded_channel();
            let (state, state_rx) = watch::channel(StreamState::Active);
            let budget = PartitionBudget::new(self.budget.clone());
            let _ = self.fetch.send(fetcher::Cmd::Add {
                key: k.clone(),
                offset: start,
                epoch,
                tx,
                budget: budget.clone(),
            });
            self.owned.insert(k.clone(), Owned { state });
            let _ = self.streams_tx.send(PartitionStream {
                topic: k.0.clone(),
                partition: k.1,
                epoch,
                rx,
                state: state_rx,
                committed,
                shared: self.shared.clone(),
                budget,
            });
        }
        Ok(())
    }

    async fn reset_position(&self, (t, p): &Tp) -> Result<i64> {
        let pc = self.cluster.partition(t, *p).await?;
        let at = match self.config.auto_offset_reset {
            OffsetReset::Earliest => OffsetAt::Earliest,
            OffsetReset::Latest => OffsetAt::Latest,
        };
        bounded(
            "ListOffsets",
            t,
            self.cluster.request_timeout,
            pc.get_offset(at),
        )
        .await
    }

    /// The next session event about the current generation (older ones are stale).
    async fn session_event(&mut self) -> Option<SessionEvent> {
        loop {
            let (generation, ev) = self.session.events.recv().await?;
            if generation == self.member.generation() {
                return Some(ev);
            }
        }
    }

    async fn member_loop(&mut self, stop: &mut tokio::sync::oneshot::Receiver<()>) -> Exit {
        let cfg = self.config.clone();
        let mut metadata = tokio::time::interval(cfg.metadata_refresh);
        metadata.tick().await;
        let shared = self.shared.clone();
        loop {
            tokio::select! {
                ev = self.session_event() => match ev {
                    Some(SessionEvent::Rebalance) => return Exit::Rebalance,
                    Some(SessionEvent::Lost { unknown_member }) => return Exit::Lost { unknown_member },
                    Some(SessionEvent::Fatal(why)) => return Exit::Fatal(why),
                    None => return Exit::Fatal("the session task ended".into()),
                },
                _ = metadata.tick() => {
                    if self.partitions_changed().await {
                        tracing::info!(group = %cfg.group.group_id, "input partitions changed: rejoining");
                        return Exit::Rebalance;
                    }
                }
                _ = shared.rejoin.notified() => {
                    tracing::info!(group = %cfg.group.group_id, "transaction aborted: giving the partitions up and rejoining");
                    return Exit::Lost { unknown_member: false };
                }
                _ = &mut *stop => return Exit::Stop,
            }
        }
    }

    /// True when a subscribed topic's partition count differs from what the group assigned
    /// (checked by the leader's next assignment after a rejoin).
    async fn partitions_changed(&mut self) -> bool {
        let Ok(counts) = self
            .cluster
            .partition_counts(&self.config.group.topics)
            .await
        else {
            return false;
        };
        self.known_counts.as_ref().is_some_and(|k| *k != counts)
    }

    /// Commits what moved of `keys`, through the session task (one commit at a time). The
    /// session reads their positions when it sends the commit: a periodic commit may be sent
    /// first, and positions read here could be below it (the committed offset would go back).
    async fn commit(&mut self, keys: &[Key]) -> Result<()> {
        if self.config.transactional_commits
            || self.shared.positions_to_commit(Some(keys)).is_empty()
        {
            return Ok(());
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        let req = CommitRequest {
            partitions: keys.iter().map(tp).collect(),
            done,
        };
        let after = self.call_timeout() * 2;
        if self.session.commits.send(req).await.is_err() {
            return Err(Error::Closed);
        }
        match tokio::time::timeout(after, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout {
                call: "OffsetCommit",
                broker: String::new(),
                after,
            }),
        }
    }

    async fn revoke_all(&mut self, drain: bool) {
        let all: Vec<Key> = self.owned.keys().cloned().collect();
        self.revoke(&all, drain).await;
    }

    /// Stops `keys`: with `drain`, their streams first finish in-flight records (drain timeout,
    /// heartbeats going on) and what completed is committed; then the streams are revoked.
    /// False when the membership was lost meanwhile (then everything was revoked).
    async fn revoke(&mut self, keys: &[Key], drain: bool) -> bool {
        if keys.is_empty() {
            return true;
        }
        let mut still_member = true;
        let _ = self.fetch.send(fetcher::Cmd::Remove(keys.to_vec()));
        for k in keys {
            if let Some(o) = self.owned.get(k) {
                o.state.send_replace(StreamState::Draining);
            }
        }
        if self.config.transactional_commits {
            // The caller aborts its open transaction: what it held is redone by the next owner.
            if let Some(hook) = &self.on_revoke {
                hook(keys.iter().map(tp).collect()).await;
            }
        } else if drain {
            if let Some(hook) = &self.on_revoke {
                hook(keys.iter().map(tp).collect()).await;
            }
            still_member = self.drain(keys).await;
            if still_member && let Err(e) = self.commit(keys).await {
                tracing::warn!(error = %e, "commit on revoke failed; the next owner may redo some records");
            }
        }
        for k in keys {
            if let Some(o) = self.owned.remove(k) {
                o.state.send_replace(StreamState::Revoked);
            }
            self.shared.lock().remove(k);
        }
        self.publish_assignment();
        if !still_member {
            self.shared.group_ok.store(false, Ordering::Relaxed);
            let rest: Vec<Key> = self.owned.keys().cloned().collect();
            let _ = self.fetch.send(fetcher::Cmd::Remove(rest.clone()));
            for k in rest {
                if let Some(o) = self.owned.remove(&k) {
                    o.state.send_replace(StreamState::Revoked);
                }
                self.shared.lock().remove(&k);
            }
            self.publish_assignment();
        }
        still_member
    }

    /// Waits until `keys` have nothing in flight (or the drain timeout); the session task
    /// heartbeats meanwhile, so the member stays in the group. False when the membership was
    /// lost meanwhile.
    async fn drain(&mut self, keys: &[Key]) -> bool {
        let deadline = tokio::time::Instant::now() + self.config.drain_timeout;
        loop {
            let shared = self.shared.clone();
            let waiting = shared.drained.notified();
            let left = self.shared.in_flight(Some(keys));
            if left == 0 {
                return true;
            }
            tokio::select! {
                _ = waiting => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(in_flight = left, "drain timeout: committing what is complete");
                    return true;
                }
                ev = self.session_event() => match ev {
                    Some(SessionEvent::Rebalance) => {}
                    Some(SessionEvent::Lost { unknown_member }) => {
                        tracing::warn!("membership lost while draining: nothing committed");
                        if unknown_member {
                            self.member.reset_member();
                        }
                        self.set_identity(-1);
                        return false;
                    }
                    Some(SessionEvent::Fatal(why)) => {
                        tracing::error!("{why}");
                        *self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                        return false;
                    }
                    None => return false,
                },
            }
        }
    }

    /// Stops while a JoinGroup/SyncGroup waits (cut short here), or while a failed one waits
    /// for its retry. In a cooperative rejoin the partitions still run in the generation the
    /// session heartbeats and commits with: they are drained and committed and the member
    /// leaves, as on any other close.
    async fn shutdown_in_join(&mut self) {
        if self.owned.is_empty() {
            return self.shutdown(false).await;
        }
        // The cut call's answer may still come on the member's connection: LeaveGroup goes on
        // a new one. A cut SyncGroup leaves the member with the JoinGroup's generation: back to
        // the session's, whose news the drain listens to.
        self.member.drop_coordinator();
        let id = self.session.identity.borrow().clone();
        self.member.adopt(&id.member_id, id.generation);
        self.shutdown(true).await;
    }

    async fn shutdown(&mut self, joined: bool) {
        if joined {
            self.revoke_all(true).await;
            self.set_identity(-1);
            let after = self.call_timeout();
            match tokio::time::timeout(after, self.member.leave()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "leave group failed"),
                Err(_) => tracing::warn!("leave group timed out"),
            }
        } else {
            self.revoke_all(false).await;
        }
        self.session.task.abort();
    }
}
