//! A fake one-broker cluster for a whole `kafka_io::Consumer`: an in-process TCP server on
//! 127.0.0.1 that speaks enough of the Kafka protocol (kafka-protocol's request and response
//! types) for rskafka (ApiVersions, Metadata v0-4, ListOffsets v0-3) and for our own
//! connections (FindCoordinator, JoinGroup, SyncGroup, Heartbeat, OffsetCommit, OffsetFetch,
//! LeaveGroup, Metadata up to v12, Fetch v4-12).
//!
//! The fake is the group coordinator of a group whose leader is another (fake) member: every
//! JoinGroup answer names "fake-leader" as leader, so our member is a follower and the
//! SyncGroup answer carries the assignment the test chose ([`FakeBroker::assign`]), encoded
//! with `kafka_io::assignor::encode_assignment`. The protocol the coordinator selects
//! ("cooperative-sticky", "range") is the test's too. A new member id goes through the
//! MEMBER_ID_REQUIRED round (JoinGroup v4+), as Kafka does.
//!
//! Script: partition counts (changeable at runtime), the log end of each partition (Fetch
//! answers records from the fetch offset to it as one record batch v2; at the end it waits
//! `max_wait` (capped) and answers empty), committed offsets (OffsetFetch; OffsetCommit
//! updates them), a heartbeat error until the next JoinGroup ([`FakeBroker::rebalance`] uses
//! REBALANCE_IN_PROGRESS), a JoinGroup error, JoinGroups held unanswered (the coordinator
//! waiting for the other members: the generation moves on only when one is answered), a delay
//! before OffsetCommits are answered (applied when read). Heartbeats and commits with a
//! generation other than the current one get ILLEGAL_GENERATION, as a real coordinator answers
//! them.
//! Every request is recorded ([`Seen`]). Dropping the fake closes every connection.
//!
//! [`FakeBroker::start_cluster`] serves several brokers (node ids 0..n, one listener each, one
//! state): Metadata names each partition's leader ([`FakeBroker::set_leader`], default 0) and a
//! Fetch of a partition on another node is answered NOT_LEADER_OR_FOLLOWER. Fetch sessions
//! (KIP-227) are served when [`FakeBroker::fetch_sessions`] is on: a full request with epoch 0
//! opens one, incremental requests add, change and forget partitions, and answer only the
//! partitions with records (or errors). [`FakeBroker::log_start`] moves a log's start: fetches
//! below it (or past the end) are OFFSET_OUT_OF_RANGE, ListOffsets(earliest) answers it.
//!
//! The producer's side: InitProducerId (a new producer id per call, epoch 0; or a scripted
//! error, [`FakeBroker::init_pid_error`]) and Produce v3-9 (acks ignored). Produced records are
//! kept per partition ([`FakeBroker::produced`]: their values, in log order), apart from the
//! Fetch logs above. Idempotent batches are checked as Kafka does: a sequence already written
//! is DUPLICATE_SEQUENCE_NUMBER (nothing appended), one out of order OUT_OF_ORDER_SEQUENCE_NUMBER,
//! an unknown producer id UNKNOWN_PRODUCER_ID ([`FakeBroker::forget_producers`]). Scripts: a
//! `throttle_time_ms` in every Produce answer, batches above N bytes refused with
//! MESSAGE_TOO_LARGE, and the next N Produce responses dropped after the batch was appended
//! (the connection is closed instead of answering); the N-th Produce request answered with an
//! error, its batch appended or not; every open connection closed at once
//! ([`FakeBroker::close_connections`]). DescribeConfigs answers a topic's
//! `max.message.bytes` when one is set ([`FakeBroker::max_message_bytes`]), or closes the
//! connection while [`FakeBroker::describe_configs_fails`] is on.
//!
//! SASL (off unless [`FakeBroker::sasl_session_lifetime`] is set): SaslHandshake and
//! SaslAuthenticate (PLAIN, or OAUTHBEARER with any bearer token) are accepted and give the
//! session that lifetime (KIP-368). As a real broker, a request other than ApiVersions or SASL
//! on a connection whose session has expired (or never began) closes it
//! ([`FakeBroker::expired_requests`]); a sign-in on an authenticated connection counts as a
//! re-authentication ([`FakeBroker::reauthentications`]).

#![allow(dead_code)] // each test binary uses a part

mod txn;
pub use txn::LogEntry;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    error::ResponseError,
    messages::{
        AddOffsetsToTxnRequest, AddPartitionsToTxnRequest, ApiKey, ApiVersionsRequest,
        ApiVersionsResponse, BrokerId, DescribeConfigsRequest, DescribeConfigsResponse,
        EndTxnRequest, FetchRequest, FetchResponse, FindCoordinatorRequest,
        FindCoordinatorResponse, HeartbeatRequest, HeartbeatResponse, InitProducerIdRequest,
        InitProducerIdResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
        LeaveGroupResponse, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest,
        MetadataResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
        OffsetFetchResponse, ProduceRequest, ProduceResponse, ProducerId, ResponseHeader,
        SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
        SaslHandshakeResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
        TxnOffsetCommitRequest,
        api_versions_response::ApiVersion,
        describe_configs_response::{DescribeConfigsResourceResult, DescribeConfigsResult},
        fetch_response::{FetchableTopicResponse, PartitionData},
        list_offsets_response::{ListOffsetsPartitionResponse, ListOffsetsTopicResponse},
        metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        },
        offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic},
        offset_fetch_response::{
            OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
            OffsetFetchResponseTopic, OffsetFetchResponseTopics,
        },
        produce_response::{PartitionProduceResponse, TopicProduceResponse},
    },
    protocol::{
        Decodable, Encodable, HeaderVersion, Request, StrBytes, decode_request_header_from_buffer,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

pub type Tp = (String, i32);

/// The id of the other member, which leads the group.
pub const LEADER: &str = "fake-leader";
/// The member id the fake gives our member.
pub const MEMBER: &str = "member-1";

/// One request the fake read.
#[derive(Clone, Debug)]
pub struct Seen {
    pub api: ApiKey,
    pub version: i16,
    pub conn: usize,
    /// When the whole request had been read (a held JoinGroup: when it was let through).
    pub at: Instant,
    /// Heartbeat, OffsetCommit, SyncGroup: the generation sent; JoinGroup: the generation
    /// answered (when the join succeeded).
    pub generation: Option<i32>,
    pub member_id: Option<String>,
    /// OffsetCommit: (topic, partition, offset) in request order.
    pub offsets: Vec<(String, i32, i64)>,
    /// The error code answered (0: none).
    pub code: i16,
    /// The node (broker id) that read it.
    pub node: i32,
    /// Fetch: the partitions the request names, with their fetch offsets.
    pub fetched: Vec<(String, i32, i64)>,
    /// Fetch: the partitions it forgets (fetch sessions).
    pub forgotten: Vec<Tp>,
    /// Fetch: session id and epoch sent.
    pub session: (i32, i32),
    /// Produce: per batch (topic, partition, records, batch bytes, producer id, base sequence).
    pub produced: Vec<ProducedBatch>,
}

/// One batch of a Produce request, as the fake read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducedBatch {
    pub topic: String,
    pub partition: i32,
    pub records: usize,
    pub bytes: usize,
    pub producer_id: i64,
    pub base_sequence: i32,
}

impl Seen {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
    pub fn commits(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.offsets
            .iter()
            .any(|(t, p, o)| t == topic && *p == partition && *o == offset)
    }
}

/// The versions advertised per API: rskafka's ranges (Metadata 0-4, ListOffsets 0-3) and ours.
const ADVERTISED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ListOffsets, 1, 3),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::FindCoordinator, 0, 3),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::OffsetCommit, 2, 7),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::Produce, 3, 9),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DescribeConfigs, 0, 1),
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
    (ApiKey::AddPartitionsToTxn, 0, 3),
    (ApiKey::AddOffsetsToTxn, 0, 3),
    (ApiKey::TxnOffsetCommit, 0, 3),
    (ApiKey::EndTxn, 0, 3),
];

/// A fetch session: its next epoch and its partitions' fetch offsets.
struct FetchSession {
    node: i32,
    epoch: i32,
    parts: BTreeMap<Tp, i64>,
}

struct State {
    topics: BTreeMap<String, i32>,
    log_end: BTreeMap<Tp, i64>,
    log_start: BTreeMap<Tp, i64>,
    /// Every broker's port, by node id.
    ports: Vec<u16>,
    leaders: BTreeMap<Tp, i32>,
    sessions_on: bool,
    sessions: BTreeMap<i32, FetchSession>,
    next_session: i32,
    committed: BTreeMap<Tp, i64>,
    protocol: String,
    assignment: Vec<Tp>,
    generation: i32,
    heartbeat_error: Option<ResponseError>,
    join_error: Option<ResponseError>,
    join_errors_once: std::collections::VecDeque<ResponseError>,
    /// True: JoinGroups wait (unread, unanswered) until it turns false.
    hold_joins: tokio::sync::watch::Sender<bool>,
    /// Bumped by [`FakeBroker::close_connections`]: every open connection closes.
    close_all: tokio::sync::watch::Sender<u64>,
    /// JoinGroups waiting on `hold_joins` now.
    joins_held: usize,
    commit_delay: Duration,
    seen: Vec<Seen>,
    connections: usize,
    /// Produced record values per partition, in log order.
    produced: BTreeMap<Tp, Vec<Bytes>>,
    /// (producer id, partition) -> next expected sequence.
    sequences: BTreeMap<(i64, Tp), i32>,
    next_pid: i64,
    init_pid_error: Option<ResponseError>,
    produce_throttle_ms: i32,
    produce_max_bytes: Option<usize>,
    drop_produce_responses: usize,
    /// Produce requests to read before the one that closes the connection (appended, and no
    /// answer written after it).
    close_at_produce: Option<usize>,
    /// Produce requests to read before the one answered with this error (nothing appended).
    produce_error_at: Option<(usize, ResponseError)>,
    /// Produce requests to read before the one appended and yet answered with this error.
    produce_error_after_append_at: Option<(usize, ResponseError)>,
    /// Produce answers are written this long after their request was read.
    produce_answer_delay: Duration,
    /// Per connection: Produce requests read and not yet answered; the most seen.
    produce_unanswered: Vec<usize>,
    produce_unanswered_max: usize,
    max_message_bytes: Option<usize>,
    describe_configs_fails: bool,
    /// Some: SASL required, sessions of this many ms.
    sasl_lifetime_ms: Option<i64>,
    authentications: usize,
    reauthentications: usize,
    /// The requests that came on an expired (or unauthenticated) session, closing it.
    expired: Vec<ApiKey>,
    /// The transaction coordinator (fake_broker/txn.rs).
    txn: txn::TxnState,
    /// Producer id -> its current epoch (transactional ids).
    txn_epochs: BTreeMap<i64, i16>,
}

#[derive(Clone)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct FakeBroker {
    port: u16,
    shared: Shared,
    servers: Vec<JoinHandle<()>>,
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

impl FakeBroker {
    /// Listens on 127.0.0.1:0; `topics` with their partition counts; protocol "range"; an
    /// empty assignment; empty logs; nothing committed.
    pub async fn start(topics: &[(&str, i32)]) -> Self {
        Self::start_cluster(topics, 1).await
    }

    /// `brokers` brokers (node ids 0..brokers) sharing one state; the bootstrap is node 0.
    pub async fn start_cluster(topics: &[(&str, i32)], brokers: usize) -> Self {
        let mut listeners = Vec::new();
        for _ in 0..brokers.max(1) {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
        }
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("local addr").port())
            .collect();
        let port = ports[0];
        let shared = Shared(Arc::new(Mutex::new(State {
            topics: topics.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            log_end: BTreeMap::new(),
            log_start: BTreeMap::new(),
            ports,
            leaders: BTreeMap::new(),
            sessions_on: false,
            sessions: BTreeMap::new(),
            next_session: 1,
            committed: BTreeMap::new(),
            protocol: "range".into(),
            assignment: Vec::new(),
            generation: 0,
            heartbeat_error: None,
            join_error: None,
            join_errors_once: Default::default(),
            hold_joins: tokio::sync::watch::Sender::new(false),
            close_all: tokio::sync::watch::Sender::new(0),
            joins_held: 0,
            commit_delay: Duration::ZERO,
            seen: Vec::new(),
            connections: 0,
            produced: BTreeMap::new(),
            sequences: BTreeMap::new(),
            next_pid: 1000,
            init_pid_error: None,
            produce_throttle_ms: 0,
            produce_max_bytes: None,
            drop_produce_responses: 0,
            close_at_produce: None,
            produce_error_at: None,
            produce_error_after_append_at: None,
            produce_answer_delay: Duration::ZERO,
            produce_unanswered: Vec::new(),
            produce_unanswered_max: 0,
            max_message_bytes: None,
            describe_configs_fails: false,
            sasl_lifetime_ms: None,
            authentications: 0,
            reauthentications: 0,
            expired: Vec::new(),
            txn: Default::default(),
            txn_epochs: BTreeMap::new(),
        })));
        let servers = listeners
            .into_iter()
            .enumerate()
            .map(|(node, l)| tokio::spawn(accept(l, node as i32, shared.clone())))
            .collect();
        Self {
            port,
            shared,
            servers,
        }
    }

    /// The values produced to a partition, in log order.
    pub fn produced(&self, topic: &str, partition: i32) -> Vec<Bytes> {
        self.shared
            .lock()
            .produced
            .get(&(topic.to_owned(), partition))
            .cloned()
            .unwrap_or_default()
    }

    /// Every Produce answer carries this throttle_time_ms from now on.
    pub fn produce_throttle(&self, ms: i32) {
        self.shared.lock().produce_throttle_ms = ms;
    }

    /// Batches above `bytes` are refused with MESSAGE_TOO_LARGE from now on.
    pub fn produce_max_bytes(&self, bytes: Option<usize>) {
        self.shared.lock().produce_max_bytes = bytes;
    }

    /// The next `n` Produce requests are appended but not answered: the connection closes.
    pub fn drop_produce_responses(&self, n: usize) {
        self.shared.lock().drop_produce_responses = n;
    }

    /// Produce answers are written `d` after their request was read (in order; the next
    /// requests are read meanwhile).
    pub fn produce_answer_delay(&self, d: Duration) {
        self.shared.lock().produce_answer_delay = d;
    }

    /// The `n`-th Produce request from now is appended, then its connection closes: its
    /// answer and every answer not yet written (delayed) are lost.
    pub fn close_at_produce(&self, n: usize) {
        self.shared.lock().close_at_produce = Some(n);
    }

    /// The `n`-th Produce request from now is answered `e`, nothing appended.
    pub fn produce_error_at(&self, n: usize, e: ResponseError) {
        self.shared.lock().produce_error_at = Some((n, e));
    }

    /// Closes every open connection now: answers not yet written are lost (a request read
    /// was still applied).
    pub fn close_connections(&self) {
        self.shared.lock().close_all.send_modify(|n| *n += 1);
    }

    /// The `n`-th Produce request from now is appended, and yet answered `e` (a broker that
    /// failed after writing: the client cannot know it was written).
    pub fn produce_error_after_append_at(&self, n: usize, e: ResponseError) {
        self.shared.lock().produce_error_after_append_at = Some((n, e));
    }

    /// The most Produce requests one connection had read and not yet answered.
    pub fn max_produce_unanswered(&self) -> usize {
        self.shared.lock().produce_unanswered_max
    }

    /// DescribeConfigs of any topic answers this `max.message.bytes` (None: no such config).
    pub fn max_message_bytes(&self, n: Option<usize>) {
        self.shared.lock().max_message_bytes = n;
    }

    /// While on, a DescribeConfigs closes the connection unanswered.
    pub fn describe_configs_fails(&self, on: bool) {
        self.shared.lock().describe_configs_fails = on;
    }

    /// InitProducerId answers `e` from now on (None: a new producer id).
    pub fn init_pid_error(&self, e: Option<ResponseError>) {
        self.shared.lock().init_pid_error = e;
    }

    /// The broker forgets every producer id (their next batch: UNKNOWN_PRODUCER_ID).
    pub fn forget_producers(&self) {
        self.shared.lock().sequences.clear();
    }

    /// Every batch of every Produce request seen, in order.
    pub fn produce_batches(&self) -> Vec<ProducedBatch> {
        self.of(ApiKey::Produce)
            .into_iter()
            .flat_map(|s| s.produced)
            .collect()
    }

    /// The partition's leader from now on (Metadata says so; others answer NOT_LEADER).
    pub fn set_leader(&self, topic: &str, partition: i32, node: i32) {
        self.shared
            .lock()
            .leaders
            .insert((topic.to_owned(), partition), node);
    }

    /// Serve fetch sessions (KIP-227) from now on.
    pub fn fetch_sessions(&self, on: bool) {
        self.shared.lock().sessions_on = on;
    }

    /// The partition's log now starts at `start` (and ends there at least).
    pub fn log_start(&self, topic: &str, partition: i32, start: i64) {
        let mut st = self.shared.lock();
        let k = (topic.to_owned(), partition);
        st.log_start.insert(k.clone(), start);
        let end = st.log_end.get(&k).copied().unwrap_or(0).max(start);
        st.log_end.insert(k, end);
    }

    /// The Fetch requests seen so far.
    pub fn fetches(&self) -> Vec<Seen> {
        self.of(ApiKey::Fetch)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Requires SASL from now on, giving sessions `ms` (KIP-368's session lifetime).
    pub fn sasl_session_lifetime(&self, ms: Option<i64>) {
        self.shared.lock().sasl_lifetime_ms = ms;
    }

    /// Sign-ins so far (first ones and re-authentications).
    pub fn authentications(&self) -> usize {
        self.shared.lock().authentications
    }

    /// Sign-ins on connections already signed in.
    pub fn reauthentications(&self) -> usize {
        self.shared.lock().reauthentications
    }

    /// The requests that came on an expired or unauthenticated SASL session (each closed its
    /// connection).
    pub fn expired_requests(&self) -> Vec<ApiKey> {
        self.shared.lock().expired.clone()
    }

    /// `kafka_io::Cluster::connect` to this fake (plaintext).
    pub async fn cluster(&self) -> Arc<kafka_io::Cluster> {
        let settings =
            kafka_io::ConnectionSettings::plaintext(&self.bootstrap()).expect("settings");
        kafka_io::Cluster::connect(settings).await.expect("connect")
    }

    /// The protocol the coordinator selects at the next joins.
    pub fn protocol(&self, name: &str) {
        self.shared.lock().protocol = name.to_owned();
    }

    /// Our member's partitions at the next SyncGroups.
    pub fn assign(&self, tps: &[Tp]) {
        self.shared.lock().assignment = tps.to_vec();
    }

    /// A rebalance: heartbeats answer REBALANCE_IN_PROGRESS until the next JoinGroup, whose
    /// SyncGroup gives `tps`.
    pub fn rebalance(&self, tps: &[Tp]) {
        let mut st = self.shared.lock();
        st.assignment = tps.to_vec();
        st.heartbeat_error = Some(ResponseError::RebalanceInProgress);
    }

    /// Heartbeats answer `e` until the next JoinGroup.
    pub fn heartbeat_error(&self, e: ResponseError) {
        self.shared.lock().heartbeat_error = Some(e);
    }

    /// Every JoinGroup answers `e` (None: normal answers).
    pub fn join_error(&self, e: Option<ResponseError>) {
        self.shared.lock().join_error = e;
    }

    /// The next JoinGroups answer these errors, one each, in order.
    pub fn fail_next_joins(&self, errors: &[ResponseError]) {
        self.shared.lock().join_errors_once.extend(errors);
    }

    /// On: JoinGroups are held unanswered (and the generation stays) until it is turned off.
    pub fn hold_joins(&self, on: bool) {
        self.shared.lock().hold_joins.send_replace(on);
    }

    /// How many JoinGroups are held now.
    pub fn joins_held(&self) -> usize {
        self.shared.lock().joins_held
    }

    /// OffsetCommits are applied when read and answered this long after.
    pub fn commit_delay(&self, d: Duration) {
        self.shared.lock().commit_delay = d;
    }

    pub fn set_partitions(&self, topic: &str, n: i32) {
        self.shared.lock().topics.insert(topic.to_owned(), n);
    }

    /// The partition's log now ends at `end` (records below it can be fetched).
    pub fn log_end(&self, topic: &str, partition: i32, end: i64) {
        self.shared
            .lock()
            .log_end
            .insert((topic.to_owned(), partition), end);
    }

    pub fn set_committed(&self, topic: &str, partition: i32, offset: i64) {
        self.shared
            .lock()
            .committed
            .insert((topic.to_owned(), partition), offset);
    }

    pub fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        self.shared
            .lock()
            .committed
            .get(&(topic.to_owned(), partition))
            .copied()
    }

    pub fn generation(&self) -> i32 {
        self.shared.lock().generation
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    pub fn of(&self, api: ApiKey) -> Vec<Seen> {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|s| s.api == api)
            .cloned()
            .collect()
    }

    /// The JoinGroups that made a generation (not the MEMBER_ID_REQUIRED round, not errors).
    pub fn joins(&self) -> Vec<Seen> {
        self.of(ApiKey::JoinGroup)
            .into_iter()
            .filter(|s| s.ok())
            .collect()
    }

    pub fn commits(&self) -> Vec<Seen> {
        self.of(ApiKey::OffsetCommit)
    }

    /// Waits (polling, at most `within`) until `f` holds for the requests seen.
    pub async fn wait_for(
        &self,
        within: Duration,
        f: impl Fn(&[Seen]) -> bool,
    ) -> Option<Vec<Seen>> {
        let deadline = Instant::now() + within;
        loop {
            let seen = self.requests();
            if f(&seen) {
                return Some(seen);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn accept(listener: TcpListener, node: i32, shared: Shared) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => {
                let Ok((stream, _)) = a else { continue };
                stream.set_nodelay(true).ok();
                let id = {
                    let mut st = shared.lock();
                    st.connections += 1;
                    st.produce_unanswered.push(0);
                    st.connections - 1
                };
                conns.spawn(serve(stream, id, node, shared.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_owned())
}

fn code(e: Option<ResponseError>) -> i16 {
    e.map_or(0, |e| e.code())
}

/// One connection: requests read one at a time and answered in order by a writer task, so a
/// client may pipeline (a delayed answer does not stop the next request being read). The
/// connection closes with answers still unwritten when the reader stops.
async fn serve(stream: TcpStream, conn: usize, node: i32, shared: Shared) {
    let (mut stream, mut wr) = stream.into_split();
    let (out, mut answers) = tokio::sync::mpsc::unbounded_channel::<(Instant, Bytes, bool)>();
    let writer_shared = shared.clone();
    let writer = tokio::spawn(async move {
        while let Some((at, b, produce)) = answers.recv().await {
            tokio::time::sleep_until(at).await;
            if wr.write_all(&b).await.is_err() {
                break;
            }
            if produce {
                writer_shared.lock().produce_unanswered[conn] -= 1;
            }
        }
    });
    let mut close = shared.lock().close_all.subscribe();
    close.borrow_and_update();
    tokio::select! {
        _ = serve_requests(&mut stream, conn, node, &shared, &out) => {}
        _ = close.changed() => {}
    }
    writer.abort();
}

async fn serve_requests(
    stream: &mut tokio::net::tcp::OwnedReadHalf,
    conn: usize,
    node: i32,
    shared: &Shared,
    out: &tokio::sync::mpsc::UnboundedSender<(Instant, Bytes, bool)>,
) {
    let mut session_ends: Option<Instant> = None;
    while let Ok(size) = stream.read_i32().await {
        if !(4..=64 << 20).contains(&size) {
            break;
        }
        let mut frame = vec![0u8; size as usize];
        if stream.read_exact(&mut frame).await.is_err() {
            break;
        }
        let mut buf = Bytes::from(frame);
        let Ok(header) = decode_request_header_from_buffer(&mut buf) else {
            break;
        };
        let Ok(api) = ApiKey::try_from(header.request_api_key) else {
            break;
        };
        let lifetime = shared.lock().sasl_lifetime_ms;
        if let Some(ms) = lifetime {
            let (version, corr) = (header.request_api_version, header.correlation_id);
            let body = match api {
                ApiKey::SaslHandshake => {
                    let Ok(req) = SaslHandshakeRequest::decode(&mut buf, version) else {
                        break;
                    };
                    let known = ["PLAIN", "OAUTHBEARER"].contains(&req.mechanism.as_str());
                    Some(encode::<SaslHandshakeRequest>(
                        corr,
                        version,
                        SaslHandshakeResponse::default()
                            .with_error_code(if known { 0 } else { 33 })
                            .with_mechanisms(vec![s("PLAIN"), s("OAUTHBEARER")]),
                    ))
                }
                ApiKey::SaslAuthenticate => {
                    let Ok(req) = SaslAuthenticateRequest::decode(&mut buf, version) else {
                        break;
                    };
                    let plain = req.auth_bytes.first() == Some(&0);
                    let bearer = req.auth_bytes.windows(12).any(|w| w == b"auth=Bearer ");
                    if !(plain || bearer) {
                        break;
                    }
                    {
                        let mut st = shared.lock();
                        st.authentications += 1;
                        if session_ends.is_some() {
                            st.reauthentications += 1;
                        }
                    }
                    session_ends = Some(Instant::now() + Duration::from_millis(ms as u64));
                    Some(encode::<SaslAuthenticateRequest>(
                        corr,
                        version,
                        SaslAuthenticateResponse::default().with_session_lifetime_ms(ms),
                    ))
                }
                ApiKey::ApiVersions => None,
                _ if session_ends.is_none_or(|e| Instant::now() >= e) => {
                    shared.lock().expired.push(api);
                    break;
                }
                _ => None,
            };
            if let Some(body) = body {
                if out.send((Instant::now(), body, false)).is_err() {
                    break;
                }
                continue;
            }
        }
        if api == ApiKey::JoinGroup {
            let mut hold = shared.lock().hold_joins.subscribe();
            if *hold.borrow_and_update() {
                shared.lock().joins_held += 1;
                let released = hold.wait_for(|on| !*on).await.is_ok();
                shared.lock().joins_held -= 1;
                if !released {
                    break;
                }
            }
        }
        let at = Instant::now();
        let version = header.request_api_version;
        let corr = header.correlation_id;
        let mut seen = Seen {
            api,
            version,
            conn,
            at,
            generation: None,
            member_id: None,
            offsets: Vec::new(),
            code: 0,
            node,
            fetched: Vec::new(),
            forgotten: Vec::new(),
            session: (0, -1),
            produced: Vec::new(),
        };
        let answer = answer(api, version, corr, &mut buf, node, shared, &mut seen);
        if answer.is_ok() {
            shared.lock().seen.push(seen);
        }
        let body = match answer {
            Ok(Answer::Now(b)) => b,
            Ok(Answer::After(d, b)) => {
                // The reader waits too (an empty Fetch, a delayed commit), as before.
                tokio::time::sleep(d).await;
                if out.send((Instant::now(), b, false)).is_err() {
                    break;
                }
                continue;
            }
            Ok(Answer::Drop) | Err(()) => break,
        };
        let produce = api == ApiKey::Produce;
        let at = {
            let mut st = shared.lock();
            if produce {
                st.produce_unanswered[conn] += 1;
                let n = st.produce_unanswered[conn];
                st.produce_unanswered_max = st.produce_unanswered_max.max(n);
                at + st.produce_answer_delay
            } else {
                at
            }
        };
        if out.send((at, body, produce)).is_err() {
            break;
        }
    }
}

enum Answer {
    Now(Bytes),
    /// Written after a wait (an empty Fetch waits its max_wait, capped; a delayed commit).
    After(Duration, Bytes),
    /// Not answered: the connection closes.
    Drop,
}

fn answer(
    api: ApiKey,
    version: i16,
    corr: i32,
    buf: &mut Bytes,
    node: i32,
    shared: &Shared,
    seen: &mut Seen,
) -> Result<Answer, ()> {
    let mut st = shared.lock();
    let st = &mut *st;
    let b = match api {
        ApiKey::ApiVersions => {
            ApiVersionsRequest::decode(buf, version).map_err(|_| ())?;
            let keys = ADVERTISED
                .iter()
                .map(|(k, lo, hi)| {
                    ApiVersion::default()
                        .with_api_key(*k as i16)
                        .with_min_version(*lo)
                        .with_max_version(*hi)
                })
                .collect();
            encode::<ApiVersionsRequest>(
                corr,
                version,
                ApiVersionsResponse::default().with_api_keys(keys),
            )
        }
        ApiKey::Metadata => {
            let req = MetadataRequest::decode(buf, version).map_err(|_| ())?;
            let names: Vec<String> = match &req.topics {
                None => st.topics.keys().cloned().collect(),
                Some(ts) if ts.is_empty() && version == 0 => st.topics.keys().cloned().collect(),
                Some(ts) => ts
                    .iter()
                    .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
                    .collect(),
            };
            let topics = names
                .iter()
                .map(|n| {
                    let t = MetadataResponseTopic::default().with_name(Some(TopicName(s(n))));
                    match st.topics.get(n) {
                        None => t.with_error_code(ResponseError::UnknownTopicOrPartition.code()),
                        Some(count) => t.with_partitions(
                            (0..*count)
                                .map(|p| {
                                    let leader =
                                        st.leaders.get(&(n.clone(), p)).copied().unwrap_or(0);
                                    MetadataResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_leader_id(BrokerId(leader))
                                        .with_replica_nodes(vec![BrokerId(leader)])
                                        .with_isr_nodes(vec![BrokerId(leader)])
                                })
                                .collect(),
                        ),
                    }
                })
                .collect();
            let brokers = st
                .ports
                .iter()
                .enumerate()
                .map(|(id, port)| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(id as i32))
                        .with_host(s("127.0.0.1"))
                        .with_port(i32::from(*port))
                })
                .collect();
            let mut resp = MetadataResponse::default()
                .with_brokers(brokers)
                .with_topics(topics);
            if version >= 1 {
                resp = resp.with_controller_id(BrokerId(0));
            }
            encode::<MetadataRequest>(corr, version, resp)
        }
        ApiKey::ListOffsets => {
            let req = ListOffsetsRequest::decode(buf, version).map_err(|_| ())?;
            let topics = req
                .topics
                .iter()
                .map(|t| {
                    ListOffsetsTopicResponse::default()
                        .with_name(t.name.clone())
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    let k = (t.name.0.to_string(), p.partition_index);
                                    let end = st.log_end.get(&k).copied().unwrap_or(0);
                                    let start = st.log_start.get(&k).copied().unwrap_or(0);
                                    ListOffsetsPartitionResponse::default()
                                        .with_partition_index(p.partition_index)
                                        .with_timestamp(-1)
                                        .with_offset(if p.timestamp == -1 { end } else { start })
                                })
                                .collect(),
                        )
                })
                .collect();
            encode::<ListOffsetsRequest>(
                corr,
                version,
                ListOffsetsResponse::default().with_topics(topics),
            )
        }
        ApiKey::DescribeConfigs => {
            let req = DescribeConfigsRequest::decode(buf, version).map_err(|_| ())?;
            if st.describe_configs_fails {
                return Ok(Answer::Drop);
            }
            let results = req
                .resources
                .iter()
                .map(|r| {
                    DescribeConfigsResult::default()
                        .with_resource_type(r.resource_type)
                        .with_resource_name(r.resource_name.clone())
                        .with_configs(
                            st.max_message_bytes
                                .iter()
                                .map(|n| {
                                    DescribeConfigsResourceResult::default()
                                        .with_name(s("max.message.bytes"))
                                        .with_value(Some(s(&n.to_string())))
                                })
                                .collect(),
                        )
                })
                .collect();
            encode::<DescribeConfigsRequest>(
                corr,
                version,
                DescribeConfigsResponse::default().with_results(results),
            )
        }
        ApiKey::InitProducerId => {
            let req = InitProducerIdRequest::decode(buf, version).map_err(|_| ())?;
            if req.transactional_id.is_some() && st.init_pid_error.is_none() {
                return Ok(Answer::Now(txn::init_producer_id(
                    st, node, &req, corr, version, seen,
                )));
            }
            let mut resp = InitProducerIdResponse::default();
            match st.init_pid_error {
                Some(e) => {
                    resp = resp
                        .with_error_code(e.code())
                        .with_producer_id(ProducerId(-1))
                        .with_producer_epoch(-1);
                    seen.code = e.code();
                }
                None => {
                    st.next_pid += 1;
                    resp = resp
                        .with_producer_id(ProducerId(st.next_pid))
                        .with_producer_epoch(0);
                    // A known producer with nothing written yet.
                    for (t, n) in st.topics.clone() {
                        for p in 0..n {
                            st.sequences.insert((st.next_pid, (t.clone(), p)), 0);
                        }
                    }
                }
            }
            encode::<InitProducerIdRequest>(corr, version, resp)
        }
        ApiKey::Produce => {
            let req = ProduceRequest::decode(buf, version).map_err(|_| ())?;
            let txn_id = req.transactional_id.as_ref().map(|t| t.0.to_string());
            let mut topics = Vec::new();
            for t in &req.topic_data {
                let name = t.name.0.to_string();
                let mut parts = Vec::new();
                for p in &t.partition_data {
                    let k = (name.clone(), p.index);
                    let records = p.records.clone().unwrap_or_default();
                    let (pid, seq, values) = read_batch(&records).map_err(|_| ())?;
                    let epoch = i16::from_be_bytes([records[51], records[52]]);
                    let transactional = records[22] & 0x10 != 0;
                    seen.produced.push(ProducedBatch {
                        topic: name.clone(),
                        partition: p.index,
                        records: values.len(),
                        bytes: records.len(),
                        producer_id: pid,
                        base_sequence: seq,
                    });
                    let mut r = PartitionProduceResponse::default()
                        .with_index(p.index)
                        .with_base_offset(-1);
                    let scripted = match st.produce_error_at.as_mut() {
                        Some((1, e)) => {
                            let e = *e;
                            st.produce_error_at = None;
                            Some(e)
                        }
                        Some((left, _)) => {
                            *left -= 1;
                            None
                        }
                        None => None,
                    };
                    let after_append = match st.produce_error_after_append_at.as_mut() {
                        Some((1, e)) => {
                            let e = *e;
                            st.produce_error_after_append_at = None;
                            Some(e)
                        }
                        Some((left, _)) => {
                            *left -= 1;
                            None
                        }
                        None => None,
                    };
                    let err = if scripted.is_some() {
                        scripted
                    } else if !st.topics.contains_key(&name) {
                        Some(ResponseError::UnknownTopicOrPartition)
                    } else if st.produce_max_bytes.is_some_and(|m| records.len() > m) {
                        Some(ResponseError::MessageTooLarge)
                    } else if let Some(e) =
                        txn::check_produce(st, txn_id.as_deref(), &k, pid, epoch, transactional)
                    {
                        Some(e)
                    } else if pid >= 0 {
                        match st.sequences.get(&(pid, k.clone())).copied() {
                            None => Some(ResponseError::UnknownProducerId),
                            Some(next) if seq < next => {
                                Some(ResponseError::DuplicateSequenceNumber)
                            }
                            Some(next) if seq > next => {
                                Some(ResponseError::OutOfOrderSequenceNumber)
                            }
                            Some(_) => None,
                        }
                    } else {
                        None
                    };
                    match err {
                        Some(e) => {
                            r = r.with_error_code(e.code());
                            seen.code = e.code();
                        }
                        None => {
                            if pid >= 0 {
                                st.sequences
                                    .insert((pid, k.clone()), seq + values.len() as i32);
                            }
                            st.txn
                                .logs
                                .entry(k.clone())
                                .or_default()
                                .extend(values.iter().map(|v| LogEntry::Record {
                                    producer_id: pid,
                                    transactional,
                                    value: v.clone(),
                                }));
                            let log = st.produced.entry(k).or_default();
                            r = r.with_base_offset(log.len() as i64);
                            log.extend(values);
                            if let Some(e) = after_append {
                                r = r.with_error_code(e.code()).with_base_offset(-1);
                                seen.code = e.code();
                            }
                        }
                    }
                    parts.push(r);
                }
                topics.push(
                    TopicProduceResponse::default()
                        .with_name(t.name.clone())
                        .with_partition_responses(parts),
                );
            }
            if st.drop_produce_responses > 0 {
                st.drop_produce_responses -= 1;
                return Ok(Answer::Drop);
            }
            if let Some(left) = st.close_at_produce.as_mut() {
                *left -= 1;
                if *left == 0 {
                    st.close_at_produce = None;
                    return Ok(Answer::Drop);
                }
            }
            encode::<ProduceRequest>(
                corr,
                version,
                ProduceResponse::default()
                    .with_responses(topics)
                    .with_throttle_time_ms(st.produce_throttle_ms),
            )
        }
        ApiKey::FindCoordinator => {
            let req = FindCoordinatorRequest::decode(buf, version).map_err(|_| ())?;
            // Groups on node 0; transactions where the script put them.
            let node = if req.key_type == 1 { st.txn.node } else { 0 };
            seen.generation = Some(i32::from(req.key_type));
            encode::<FindCoordinatorRequest>(
                corr,
                version,
                FindCoordinatorResponse::default()
                    .with_node_id(BrokerId(node))
                    .with_host(s("127.0.0.1"))
                    .with_port(i32::from(st.ports[node as usize])),
            )
        }
        ApiKey::AddPartitionsToTxn => {
            let req = AddPartitionsToTxnRequest::decode(buf, version).map_err(|_| ())?;
            txn::add_partitions(st, node, &req, corr, version, seen)
        }
        ApiKey::AddOffsetsToTxn => {
            let req = AddOffsetsToTxnRequest::decode(buf, version).map_err(|_| ())?;
            txn::add_offsets(st, node, &req, corr, version, seen)
        }
        ApiKey::TxnOffsetCommit => {
            let req = TxnOffsetCommitRequest::decode(buf, version).map_err(|_| ())?;
            txn::txn_offset_commit(st, node, &req, corr, version, seen)
        }
        ApiKey::EndTxn => {
            let req = EndTxnRequest::decode(buf, version).map_err(|_| ())?;
            txn::end_txn(st, node, &req, corr, version, seen)
        }
        ApiKey::JoinGroup => {
            let req = JoinGroupRequest::decode(buf, version).map_err(|_| ())?;
            seen.member_id = Some(req.member_id.to_string());
            let mut resp = JoinGroupResponse::default()
                .with_leader(s(LEADER))
                .with_protocol_name(Some(s(&st.protocol)));
            if version >= 7 {
                resp = resp.with_protocol_type(Some(s("consumer")));
            }
            if let Some(e) = st.join_error.or_else(|| st.join_errors_once.pop_front()) {
                seen.code = e.code();
                resp = resp.with_error_code(e.code()).with_generation_id(-1);
            } else if req.member_id.is_empty() && version >= 4 {
                seen.code = ResponseError::MemberIdRequired.code();
                resp = resp
                    .with_error_code(seen.code)
                    .with_generation_id(-1)
                    .with_member_id(s(MEMBER));
            } else {
                st.generation += 1;
                st.heartbeat_error = None;
                seen.generation = Some(st.generation);
                resp = resp
                    .with_generation_id(st.generation)
                    .with_member_id(s(MEMBER));
            }
            encode::<JoinGroupRequest>(corr, version, resp)
        }
        ApiKey::SyncGroup => {
            let req = SyncGroupRequest::decode(buf, version).map_err(|_| ())?;
            seen.generation = Some(req.generation_id);
            seen.member_id = Some(req.member_id.to_string());
            let mut resp = SyncGroupResponse::default();
            if req.generation_id != st.generation {
                seen.code = ResponseError::IllegalGeneration.code();
                resp = resp.with_error_code(seen.code);
            } else {
                resp = resp.with_assignment(kafka_io::assignor::encode_assignment(&st.assignment));
            }
            if version >= 5 {
                resp = resp
                    .with_protocol_type(Some(s("consumer")))
                    .with_protocol_name(Some(s(&st.protocol)));
            }
            encode::<SyncGroupRequest>(corr, version, resp)
        }
        ApiKey::Heartbeat => {
            let req = HeartbeatRequest::decode(buf, version).map_err(|_| ())?;
            seen.generation = Some(req.generation_id);
            seen.member_id = Some(req.member_id.to_string());
            let e =
                st.heartbeat_error.or((req.generation_id != st.generation)
                    .then_some(ResponseError::IllegalGeneration));
            seen.code = code(e);
            encode::<HeartbeatRequest>(
                corr,
                version,
                HeartbeatResponse::default().with_error_code(seen.code),
            )
        }
        ApiKey::OffsetCommit => {
            let req = OffsetCommitRequest::decode(buf, version).map_err(|_| ())?;
            seen.generation = Some(req.generation_id_or_member_epoch);
            seen.member_id = Some(req.member_id.to_string());
            let e = (req.generation_id_or_member_epoch != st.generation)
                .then_some(ResponseError::IllegalGeneration);
            seen.code = code(e);
            for t in &req.topics {
                for p in &t.partitions {
                    seen.offsets.push((
                        t.name.0.to_string(),
                        p.partition_index,
                        p.committed_offset,
                    ));
                    if e.is_none() {
                        st.committed.insert(
                            (t.name.0.to_string(), p.partition_index),
                            p.committed_offset,
                        );
                    }
                }
            }
            let topics = req
                .topics
                .iter()
                .map(|t| {
                    OffsetCommitResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    OffsetCommitResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(seen.code)
                                })
                                .collect(),
                        )
                })
                .collect();
            let b = encode::<OffsetCommitRequest>(
                corr,
                version,
                OffsetCommitResponse::default().with_topics(topics),
            );
            if !st.commit_delay.is_zero() {
                return Ok(Answer::After(st.commit_delay, b));
            }
            b
        }
        ApiKey::OffsetFetch => {
            let req = OffsetFetchRequest::decode(buf, version).map_err(|_| ())?;
            let committed =
                |t: &str, p: i32| st.committed.get(&(t.to_owned(), p)).copied().unwrap_or(-1);
            // KIP-447: with require_stable, a partition whose offsets wait in an open
            // transaction is UNSTABLE_OFFSET_COMMIT.
            let unstable = |t: &str, p: i32| -> i16 {
                let pending = st.txn.txns.values().any(|x| {
                    x.offsets
                        .values()
                        .any(|o| o.contains_key(&(t.to_owned(), p)))
                });
                if version >= 7 && req.require_stable && pending {
                    ResponseError::UnstableOffsetCommit.code()
                } else {
                    0
                }
            };
            seen.generation = Some(i32::from(version >= 7 && req.require_stable));
            let resp = if version >= 8 {
                let groups = req
                    .groups
                    .iter()
                    .map(|g| {
                        OffsetFetchResponseGroup::default()
                            .with_group_id(g.group_id.clone())
                            .with_topics(
                                g.topics
                                    .iter()
                                    .flatten()
                                    .map(|t| {
                                        OffsetFetchResponseTopics::default()
                                            .with_name(t.name.clone())
                                            .with_partitions(
                                                t.partition_indexes
                                                    .iter()
                                                    .map(|p| {
                                                        OffsetFetchResponsePartitions::default()
                                                            .with_partition_index(*p)
                                                            .with_committed_offset(committed(
                                                                &t.name.0, *p,
                                                            ))
                                                            .with_error_code(unstable(
                                                                &t.name.0, *p,
                                                            ))
                                                    })
                                                    .collect(),
                                            )
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                OffsetFetchResponse::default().with_groups(groups)
            } else {
                let topics = req
                    .topics
                    .iter()
                    .flatten()
                    .map(|t| {
                        OffsetFetchResponseTopic::default()
                            .with_name(t.name.clone())
                            .with_partitions(
                                t.partition_indexes
                                    .iter()
                                    .map(|p| {
                                        OffsetFetchResponsePartition::default()
                                            .with_partition_index(*p)
                                            .with_committed_offset(committed(&t.name.0, *p))
                                            .with_error_code(unstable(&t.name.0, *p))
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                OffsetFetchResponse::default().with_topics(topics)
            };
            encode::<OffsetFetchRequest>(corr, version, resp)
        }
        ApiKey::LeaveGroup => {
            let req = LeaveGroupRequest::decode(buf, version).map_err(|_| ())?;
            seen.member_id = Some(
                req.members
                    .first()
                    .map_or(req.member_id.to_string(), |m| m.member_id.to_string()),
            );
            encode::<LeaveGroupRequest>(corr, version, LeaveGroupResponse::default())
        }
        ApiKey::Fetch => {
            let req = FetchRequest::decode(buf, version).map_err(|_| ())?;
            seen.session = (req.session_id, req.session_epoch);
            for t in &req.topics {
                for p in &t.partitions {
                    seen.fetched
                        .push((t.topic.0.to_string(), p.partition, p.fetch_offset));
                }
            }
            for t in &req.forgotten_topics_data {
                for p in &t.partitions {
                    seen.forgotten.push((t.topic.0.to_string(), *p));
                }
            }
            // The partitions to answer: the request's, or the whole session's.
            let mut session_id = 0;
            let mut incremental = false;
            let mut wanted: Vec<(Tp, i64)> = seen
                .fetched
                .iter()
                .map(|(t, p, o)| ((t.clone(), *p), *o))
                .collect();
            if st.sessions_on && version >= 7 {
                if req.session_epoch == 0 {
                    session_id = st.next_session;
                    st.next_session += 1;
                    st.sessions.insert(
                        session_id,
                        FetchSession {
                            node,
                            epoch: 1,
                            parts: wanted.iter().cloned().collect(),
                        },
                    );
                } else if req.session_epoch > 0 {
                    let Some(sess) = st
                        .sessions
                        .get_mut(&req.session_id)
                        .filter(|x| x.node == node)
                    else {
                        seen.code = ResponseError::FetchSessionIdNotFound.code();
                        let resp = FetchResponse::default().with_error_code(seen.code);
                        return Ok(Answer::Now(encode::<FetchRequest>(corr, version, resp)));
                    };
                    if sess.epoch != req.session_epoch {
                        seen.code = ResponseError::InvalidFetchSessionEpoch.code();
                        let resp = FetchResponse::default().with_error_code(seen.code);
                        return Ok(Answer::Now(encode::<FetchRequest>(corr, version, resp)));
                    }
                    sess.epoch += 1;
                    for (k, o) in &wanted {
                        sess.parts.insert(k.clone(), *o);
                    }
                    for k in &seen.forgotten {
                        sess.parts.remove(k);
                    }
                    wanted = sess.parts.iter().map(|(k, o)| (k.clone(), *o)).collect();
                    session_id = req.session_id;
                    incremental = true;
                }
            }
            let mut empty = true;
            let mut by_topic: BTreeMap<String, Vec<PartitionData>> = BTreeMap::new();
            for ((name, partition), fetch_offset) in wanted {
                let d = PartitionData::default().with_partition_index(partition);
                let k = (name.clone(), partition);
                let d = if st.topics.get(&name).is_none_or(|c| partition >= *c) {
                    Some(d.with_error_code(ResponseError::UnknownTopicOrPartition.code()))
                } else if st.leaders.get(&k).copied().unwrap_or(0) != node {
                    Some(d.with_error_code(ResponseError::NotLeaderOrFollower.code()))
                } else {
                    let end = st.log_end.get(&k).copied().unwrap_or(0);
                    let start = st.log_start.get(&k).copied().unwrap_or(0);
                    if fetch_offset > end || fetch_offset < start {
                        Some(d.with_error_code(ResponseError::OffsetOutOfRange.code()))
                    } else if fetch_offset < end {
                        empty = false;
                        Some(
                            d.with_high_watermark(end)
                                .with_last_stable_offset(end)
                                .with_log_start_offset(start)
                                .with_aborted_transactions(Some(Vec::new()))
                                .with_records(Some(Bytes::from(batch(
                                    fetch_offset,
                                    (end - fetch_offset) as i32,
                                )))),
                        )
                    } else if incremental {
                        None // nothing new: left out of an incremental answer
                    } else {
                        Some(
                            d.with_high_watermark(end)
                                .with_last_stable_offset(end)
                                .with_log_start_offset(start)
                                .with_aborted_transactions(Some(Vec::new()))
                                .with_records(Some(Bytes::new())),
                        )
                    }
                };
                if let Some(d) = d {
                    if d.error_code != 0 {
                        empty = false;
                    }
                    by_topic.entry(name).or_default().push(d);
                }
            }
            let responses = by_topic
                .into_iter()
                .map(|(t, parts)| {
                    FetchableTopicResponse::default()
                        .with_topic(TopicName(s(&t)))
                        .with_partitions(parts)
                })
                .collect();
            let b = encode::<FetchRequest>(
                corr,
                version,
                FetchResponse::default()
                    .with_session_id(session_id)
                    .with_responses(responses),
            );
            if empty {
                let wait = Duration::from_millis(req.max_wait_ms.clamp(0, 200) as u64);
                return Ok(Answer::After(wait, b));
            }
            b
        }
        _ => return Err(()),
    };
    Ok(Answer::Now(b))
}

/// A whole response frame: size, header (the version `R`'s response needs), body.
fn encode<R: Request>(correlation: i32, version: i16, resp: R::Response) -> Bytes {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0; 4]);
    ResponseHeader::default()
        .with_correlation_id(correlation)
        .encode(
            &mut buf,
            <R::Response as HeaderVersion>::header_version(version),
        )
        .expect("response header");
    resp.encode(&mut buf, version).expect("response body");
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

fn varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A record batch (magic 2, uncompressed, not transactional) of `n` records from `base`;
/// record `o` has key `k<o>` and value `v<o>`.
pub fn batch(base: i64, n: i32) -> Vec<u8> {
    let mut recs = Vec::new();
    for i in 0..n {
        let mut r = vec![0u8]; // attributes
        varint(&mut r, 0); // timestamp delta
        varint(&mut r, i64::from(i)); // offset delta
        let o = base + i64::from(i);
        let (key, value) = (format!("k{o}").into_bytes(), format!("v{o}").into_bytes());
        varint(&mut r, key.len() as i64);
        r.extend(&key);
        varint(&mut r, value.len() as i64);
        r.extend(&value);
        varint(&mut r, 0); // no headers
        varint(&mut recs, r.len() as i64);
        recs.extend(r);
    }
    let mut after_crc = Vec::new();
    after_crc.extend(0i16.to_be_bytes()); // attributes
    after_crc.extend((n - 1).to_be_bytes()); // last offset delta
    after_crc.extend(1_700_000_000_000i64.to_be_bytes());
    after_crc.extend(1_700_000_000_000i64.to_be_bytes());
    after_crc.extend((-1i64).to_be_bytes()); // producer id
    after_crc.extend((-1i16).to_be_bytes()); // producer epoch
    after_crc.extend((-1i32).to_be_bytes()); // base sequence
    after_crc.extend(n.to_be_bytes());
    after_crc.extend(recs);
    let mut b = base.to_be_bytes().to_vec();
    b.extend(((4 + 1 + 4 + after_crc.len()) as i32).to_be_bytes());
    b.extend(0i32.to_be_bytes()); // partition leader epoch
    b.push(2); // magic
    b.extend(crc32c::crc32c(&after_crc).to_be_bytes());
    b.extend(after_crc);
    b
}

/// An uncompressed record batch v2: (producer id, base sequence, record values).
pub fn read_batch(b: &[u8]) -> Result<(i64, i32, Vec<Bytes>), String> {
    fn varint(b: &[u8], at: &mut usize) -> Result<i64, String> {
        let mut u: u64 = 0;
        let mut shift = 0;
        loop {
            let byte = *b.get(*at).ok_or("varint cut short")?;
            *at += 1;
            u |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(((u >> 1) as i64) ^ -((u & 1) as i64));
            }
            shift += 7;
            if shift > 63 {
                return Err("varint too long".into());
            }
        }
    }
    if b.len() < 61 || b[16] != 2 {
        return Err("not a record batch v2".into());
    }
    let attributes = i16::from_be_bytes([b[21], b[22]]);
    if attributes & 7 != 0 {
        return Err("compressed batches are not read here".into());
    }
    if crc32c::crc32c(&b[21..]) != u32::from_be_bytes([b[17], b[18], b[19], b[20]]) {
        return Err("bad CRC".into());
    }
    let pid = i64::from_be_bytes(b[43..51].try_into().unwrap());
    let seq = i32::from_be_bytes(b[53..57].try_into().unwrap());
    let count = i32::from_be_bytes(b[57..61].try_into().unwrap());
    let mut at = 61;
    let mut values = Vec::new();
    for _ in 0..count {
        let len = varint(b, &mut at)? as usize;
        let end = at + len;
        at += 1; // attributes
        varint(b, &mut at)?; // timestamp delta
        varint(b, &mut at)?; // offset delta
        let kl = varint(b, &mut at)?;
        if kl > 0 {
            at += kl as usize;
        }
        let vl = varint(b, &mut at)?;
        if vl >= 0 {
            let v = b.get(at..at + vl as usize).ok_or("value cut short")?;
            values.push(Bytes::copy_from_slice(v));
        } else {
            values.push(Bytes::new());
        }
        at = end;
    }
    Ok((pid, seq, values))
}

/// The partitions as a set, for comparisons.
pub fn set(tps: &[Tp]) -> BTreeSet<Tp> {
    tps.iter().cloned().collect()
}
