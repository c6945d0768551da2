//! The group consumer: a member of a consumer group that runs one fetcher per assigned
//! partition, hands batches out through a bounded buffer, tracks completions, and commits only
//! completed positions: periodically, on revoke (after a bounded drain), and on close.
//!
//! One task owns the membership (join, heartbeats, commits); fetcher tasks own nothing but their
//! position; the caller receives batches and completes records through [`Acker`].

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use rskafka::client::{error::ProtocolError, partition::OffsetAt};
use tokio::{
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
};

use crate::{
    assignor::Tp,
    cluster::{Cluster, bounded},
    error::{Error, Result},
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
    /// Longest a fetch waits at the broker for data (latency follows it on some brokers).
    pub fetch_max_wait: Duration,
    pub fetch_max_bytes: i32,
    /// Batches buffered between the fetchers and the caller: a slow caller pauses fetching.
    pub buffer_batches: usize,
    pub commit_interval: Duration,
    /// Longest wait for in-flight records to complete on revoke and on close.
    pub drain_timeout: Duration,
}

impl ConsumerConfig {
    pub fn new(group: GroupConfig) -> Self {
        Self {
            group,
            auto_offset_reset: OffsetReset::Earliest,
            fetch_max_wait: Duration::from_millis(50),
            fetch_max_bytes: 1024 * 1024,
            buffer_batches: 8,
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// A consumed record.
#[derive(Clone, Debug)]
pub struct InRecord {
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Bytes)>,
    pub timestamp_ms: i64,
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
    epoch: u64,
    high_watermark: i64,
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
    connected: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, PartitionState>> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn positions_to_commit(&self) -> Vec<(Tp, i64)> {
        self.lock()
            .iter()
            .filter_map(|(k, s)| s.offsets.to_commit().map(|o| (tp(k), o)))
            .collect()
    }

    fn mark_committed(&self, done: &[(Tp, i64)]) {
        let mut parts = self.lock();
        for (t, o) in done {
            if let Some(s) = parts.get_mut(&key(t)) {
                s.offsets.mark_committed(*o);
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.lock().values().map(|s| s.offsets.in_flight()).sum()
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
            if s.offsets.is_drained() {
                drop(parts);
                self.0.drained.notify_waiters();
            }
        }
    }
}

impl Acker {
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

/// Called on revoke with the partitions about to go, before the drain: flush what you hold.
pub type RevokeHook =
    Arc<dyn Fn(Vec<Tp>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub struct Consumer {
    rx: mpsc::Receiver<Batch>,
    shared: Arc<Shared>,
    assignment: watch::Receiver<BTreeSet<Tp>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Consumer {
    /// Starts membership; batches flow once the first assignment arrives.
    pub fn start(
        cluster: Arc<Cluster>,
        config: ConsumerConfig,
        on_revoke: Option<RevokeHook>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.buffer_batches.max(1));
        let shared = Arc::new(Shared::default());
        let (assign_tx, assignment) = watch::channel(BTreeSet::new());
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(
            GroupTask {
                member: Member::new(cluster.connector.clone(), config.group.clone()),
                cluster,
                config,
                shared: shared.clone(),
                tx,
                assign_tx,
                fetchers: Vec::new(),
                on_revoke,
            }
            .run(stop_rx),
        );
        Self {
            rx,
            shared,
            assignment,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The next batch of any assigned partition; None once closed. Batches of partitions
    /// revoked since they were fetched are skipped.
    pub async fn recv(&mut self) -> Option<Batch> {
        loop {
            let batch = self.rx.recv().await?;
            let mut parts = self.shared.lock();
            let Some(s) = parts.get_mut(&(batch.topic.clone(), batch.partition)) else {
                continue;
            };
            if s.epoch != batch.epoch {
                continue;
            }
            for r in &batch.records {
                s.offsets.handed_out(r.offset);
            }
            return Some(batch);
        }
    }

    pub fn acker(&self) -> Acker {
        Acker(self.shared.clone())
    }

    /// Currently assigned partitions (changes on every rebalance).
    pub fn assignment(&self) -> watch::Receiver<BTreeSet<Tp>> {
        self.assignment.clone()
    }

    /// True while the coordinator and the fetchers reach the cluster.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
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

    /// Stops fetching, waits for in-flight records (drain timeout), commits, leaves the group.
    /// Keep calling [`recv`](Self::recv)-side work to completion while this runs, or it waits
    /// for the drain timeout.
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

struct GroupTask {
    cluster: Arc<Cluster>,
    member: Member,
    config: ConsumerConfig,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Batch>,
    assign_tx: watch::Sender<BTreeSet<Tp>>,
    fetchers: Vec<JoinHandle<()>>,
    on_revoke: Option<RevokeHook>,
}

enum Exit {
    /// Rebalance announced: drain, commit, rejoin.
    Rebalance,
    /// Our generation is gone: rejoin without committing.
    Fenced,
    Stop,
}

impl GroupTask {
    async fn run(mut self, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let group = self.config.group.group_id.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            let cluster = self.cluster.clone();
            let join = self
                .member
                .join(async move |topics: &[String]| cluster.partition_counts(topics).await);
            let assignment = tokio::select! {
                r = join => r,
                _ = &mut stop => { self.shutdown(false).await; return; }
            };
            let assignment = match assignment {
                Ok(a) => a,
                Err(e) => {
                    self.shared.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(%group, error = %e, retry_in = ?backoff, "join failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut stop => { self.shutdown(false).await; return; }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            tracing::info!(%group, generation = assignment.generation, member = self.member.member_id(),
                partitions = ?assignment.partitions, "joined group");
            if let Err(e) = self.assign(&assignment.partitions).await {
                tracing::warn!(%group, error = %e, "could not start the assignment; rejoining");
                self.revoke(false).await;
                continue;
            }
            self.shared.connected.store(true, Ordering::Relaxed);
            match self.member_loop(&mut stop).await {
                Exit::Stop => {
                    self.shutdown(true).await;
                    return;
                }
                Exit::Rebalance => {
                    tracing::info!(%group, "rebalance: draining and committing before rejoin");
                    self.revoke(true).await;
                }
                Exit::Fenced => {
                    tracing::warn!(%group, "generation fenced: rejoining without commit");
                    self.revoke(false).await;
                }
            }
        }
    }

    /// Reads committed positions, resolves the rest by the reset policy, starts fetchers.
    async fn assign(&mut self, tps: &BTreeSet<Tp>) -> Result<()> {
        let committed = self.member.committed(tps).await?;
        let epoch = self.shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let mut states = HashMap::new();
        for tp in tps {
            let c = committed.get(tp).copied().flatten();
            let start = match c {
                Some(o) => o,
                None => self.reset_position(tp).await?,
            };
            states.insert(
                key(tp),
                PartitionState {
                    offsets: PartitionOffsets::new(start, c),
                    epoch,
                    high_watermark: start,
                },
            );
        }
        *self.shared.lock() = states;
        for tp in tps {
            let start = self.shared.lock()[&key(tp)].offsets.next_fetch();
            self.fetchers.push(tokio::spawn(fetcher(
                self.cluster.clone(),
                self.config.clone(),
                self.shared.clone(),
                self.tx.clone(),
                tp.clone(),
                start,
                epoch,
            )));
        }
        self.assign_tx.send_replace(tps.clone());
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

    async fn member_loop(&mut self, stop: &mut tokio::sync::oneshot::Receiver<()>) -> Exit {
        let cfg = self.config.clone();
        let mut heartbeat = tokio::time::interval(cfg.group.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commit = tokio::time::interval(cfg.commit_interval);
        commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ok = Instant::now();
        loop {
            // Ok(false): nothing was said to the broker (nothing to commit), so no news.
            let r = tokio::select! {
                _ = heartbeat.tick() => self.member.heartbeat().await.map(|()| true),
                _ = commit.tick() => self.commit().await,
                _ = &mut *stop => return Exit::Stop,
            };
            match r {
                Ok(false) => {}
                Ok(true) => {
                    last_ok = Instant::now();
                    self.shared.connected.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    use kafka_protocol::error::ResponseError as R;
                    match e.broker_error() {
                        Some(R::RebalanceInProgress) => return Exit::Rebalance,
                        Some(R::IllegalGeneration | R::UnknownMemberId | R::FencedInstanceId) => {
                            return Exit::Fenced;
                        }
                        _ => {}
                    }
                    self.shared.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(group = %cfg.group.group_id, error = %e, "coordinator call failed");
                    if last_ok.elapsed() > cfg.group.session_timeout {
                        // The coordinator has dropped us by now.
                        return Exit::Fenced;
                    }
                }
            }
        }
    }

    /// Commits what moved; Ok(false) when there was nothing to commit (no broker call).
    async fn commit(&mut self) -> Result<bool> {
        let positions = self.shared.positions_to_commit();
        if positions.is_empty() {
            return Ok(false);
        }
        self.member.commit(&positions).await?;
        tracing::debug!(?positions, "committed");
        self.shared.mark_committed(&positions);
        Ok(true)
    }

    /// Stops fetchers; with `drain`, waits for in-flight records and commits.
    async fn revoke(&mut self, drain: bool) {
        for f in self.fetchers.drain(..) {
            f.abort();
        }
        let tps: Vec<Tp> = self.shared.lock().keys().map(tp).collect();
        if drain && !tps.is_empty() {
            if let Some(hook) = &self.on_revoke {
                hook(tps.clone()).await;
            }
            self.drain().await;
            if let Err(e) = self.commit().await {
                tracing::warn!(error = %e, "commit on revoke failed; the next owner may redo some records");
            }
        }
        self.shared.lock().clear();
        self.assign_tx.send_replace(BTreeSet::new());
    }

    async fn drain(&self) {
        let deadline = tokio::time::Instant::now() + self.config.drain_timeout;
        loop {
            let waiting = self.shared.drained.notified();
            let left = self.shared.in_flight();
            if left == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                tracing::warn!(
                    in_flight = left,
                    "drain timeout: committing what is complete"
                );
                return;
            }
        }
    }

    async fn shutdown(&mut self, joined: bool) {
        if joined {
            self.revoke(true).await;
            if let Err(e) = self.member.leave().await {
                tracing::warn!(error = %e, "leave group failed");
            }
        } else {
            self.revoke(false).await;
        }
    }
}

async fn fetcher(
    cluster: Arc<Cluster>,
    cfg: ConsumerConfig,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Batch>,
    (topic, partition): Tp,
    mut offset: i64,
    epoch: u64,
) {
    let topic_arc: Arc<str> = Arc::from(topic.as_str());
    let mut backoff = Duration::from_millis(100);
    let mut client = None;
    let timeout = cluster.request_timeout + cfg.fetch_max_wait;
    loop {
        let pc = match &client {
            Some(c) => Arc::clone(c),
            None => match cluster.partition(&topic, partition).await {
                Ok(c) => {
                    client = Some(c.clone());
                    c
                }
                Err(e) => {
                    shared.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(%topic, partition, error = %e, retry_in = ?backoff, "fetcher: no leader");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        let r = bounded(
            "Fetch",
            &topic,
            timeout,
            pc.fetch_records(
                offset,
                1..cfg.fetch_max_bytes,
                cfg.fetch_max_wait.as_millis() as i32,
            ),
        )
        .await;
        match r {
            Ok((records, hwm)) => {
                backoff = Duration::from_millis(100);
                shared.connected.store(true, Ordering::Relaxed);
                if let Some(s) = shared.lock().get_mut(&(topic_arc.clone(), partition))
                    && s.epoch == epoch
                {
                    s.high_watermark = hwm;
                }
                let records: Vec<InRecord> = records
                    .into_iter()
                    .filter(|r| r.offset >= offset)
                    .map(|r| InRecord {
                        offset: r.offset,
                        key: r.record.key.map(Bytes::from),
                        value: r.record.value.map(Bytes::from),
                        headers: r
                            .record
                            .headers
                            .into_iter()
                            .map(|(k, v)| (k, Bytes::from(v)))
                            .collect(),
                        timestamp_ms: r.record.timestamp.timestamp_millis(),
                    })
                    .collect();
                let Some(last) = records.last() else { continue };
                offset = last.offset + 1;
                let batch = Batch {
                    topic: topic_arc.clone(),
                    partition,
                    epoch,
                    records,
                    high_watermark: hwm,
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
            }
            Err(Error::Client(rskafka::client::error::Error::ServerError {
                protocol_error: ProtocolError::OffsetOutOfRange,
                ..
            })) => {
                let at = match cfg.auto_offset_reset {
                    OffsetReset::Earliest => OffsetAt::Earliest,
                    OffsetReset::Latest => OffsetAt::Latest,
                };
                match bounded(
                    "ListOffsets",
                    &topic,
                    cluster.request_timeout,
                    pc.get_offset(at),
                )
                .await
                {
                    Ok(o) => {
                        tracing::warn!(%topic, partition, from = offset, to = o, "offset out of range: reset");
                        offset = o;
                    }
                    Err(e) => {
                        tracing::warn!(%topic, partition, error = %e, "offset reset failed");
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
            Err(e) => {
                shared.connected.store(false, Ordering::Relaxed);
                tracing::warn!(%topic, partition, error = %e, retry_in = ?backoff, "fetch failed");
                client = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
