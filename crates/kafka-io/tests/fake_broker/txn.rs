//! The fake's transaction coordinator, following Kafka's documented rules (KIP-98, KIP-447):
//!
//! - InitProducerId with a transactional id: a new id gets a producer id at epoch 0; a known one
//!   keeps its producer id and its epoch goes up by one, which fences the old producer (its
//!   later AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit and EndTxn get PRODUCER_FENCED,
//!   its Produce INVALID_PRODUCER_EPOCH), and its open transaction is aborted (ABORT markers).
//!   Sequences of the producer id start again at 0.
//! - AddPartitionsToTxn / AddOffsetsToTxn open the transaction; a transactional Produce to a
//!   partition not added is INVALID_TXN_STATE (nothing appended).
//! - TxnOffsetCommit (on the group coordinator, node 0) checks the producer's epoch, that the
//!   group was added (else INVALID_TXN_STATE), and the member's generation and member id
//!   (ILLEGAL_GENERATION / UNKNOWN_MEMBER_ID); the offsets wait for the transaction's end.
//! - EndTxn writes a COMMIT or ABORT marker on every partition of the transaction, applies the
//!   offsets on commit and drops them on abort; an EndTxn with no open transaction is
//!   INVALID_TXN_STATE. After each EndTxn the next N transaction calls get
//!   CONCURRENT_TRANSACTIONS (the markers being written; [`FakeBroker::concurrent_transactions`]).
//! - The transaction coordinator is one node ([`FakeBroker::move_txn_coordinator`]): a
//!   transaction call on another node gets NOT_COORDINATOR, and FindCoordinator (key type 1)
//!   names the current one.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use kafka_protocol::{
    error::ResponseError,
    messages::{
        AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest,
        AddPartitionsToTxnResponse, EndTxnRequest, EndTxnResponse, InitProducerIdRequest,
        InitProducerIdResponse, ProducerId, TxnOffsetCommitRequest, TxnOffsetCommitResponse,
        add_partitions_to_txn_response::{
            AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
        },
        txn_offset_commit_response::{
            TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
        },
    },
};

use super::{FakeBroker, MEMBER, Seen, State, Tp, encode};

/// One entry of a partition's log as the transaction coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogEntry {
    Record {
        producer_id: i64,
        transactional: bool,
        value: Bytes,
    },
    /// A control batch: the end of `producer_id`'s transaction on this partition.
    Marker { producer_id: i64, commit: bool },
}

/// A transactional id's state.
#[derive(Debug, Default)]
pub struct Txn {
    pub producer_id: i64,
    pub epoch: i16,
    pub partitions: BTreeSet<Tp>,
    pub groups: BTreeSet<String>,
    /// group -> offsets waiting for EndTxn.
    pub offsets: BTreeMap<String, BTreeMap<Tp, i64>>,
}

impl Txn {
    fn open(&self) -> bool {
        !self.partitions.is_empty() || !self.groups.is_empty()
    }
}

/// The coordinator's state (part of the fake's [`State`]).
#[derive(Debug, Default)]
pub struct TxnState {
    pub txns: BTreeMap<String, Txn>,
    /// Every partition's log, records and markers.
    pub logs: BTreeMap<Tp, Vec<LogEntry>>,
    /// The node that coordinates transactions.
    pub node: i32,
    /// CONCURRENT_TRANSACTIONS answered to this many transaction calls after each EndTxn.
    pub concurrent_after_end: usize,
    /// Left of the above since the last EndTxn.
    pub concurrent_left: usize,
    /// Group offsets committed by transactions, for the test to read.
    pub ended: Vec<(String, bool)>,
}

impl TxnState {
    /// Ends `id`'s open transaction: a marker per partition, offsets applied or dropped.
    fn end(&mut self, id: &str, commit: bool, committed: &mut BTreeMap<Tp, i64>) {
        let Some(t) = self.txns.get_mut(id) else {
            return;
        };
        for tp in std::mem::take(&mut t.partitions) {
            self.logs.entry(tp).or_default().push(LogEntry::Marker {
                producer_id: t.producer_id,
                commit,
            });
        }
        t.groups.clear();
        for (_, offsets) in std::mem::take(&mut t.offsets) {
            if commit {
                committed.extend(offsets);
            }
        }
        self.ended.push((id.to_owned(), commit));
        self.concurrent_left = self.concurrent_after_end;
    }
}

impl FakeBroker {
    /// The next `n` transaction calls after each EndTxn are answered CONCURRENT_TRANSACTIONS.
    pub fn concurrent_transactions(&self, n: usize) {
        self.shared.lock().txn.concurrent_after_end = n;
    }

    /// Transactions move to `node`: calls on the old one get NOT_COORDINATOR.
    pub fn move_txn_coordinator(&self, node: i32) {
        self.shared.lock().txn.node = node;
    }

    /// What a read_committed reader gets of a partition: plain records, and transactional
    /// ones whose transaction's marker is a COMMIT (open or aborted ones left out).
    pub fn committed_values(&self, topic: &str, partition: i32) -> Vec<String> {
        let st = self.shared.lock();
        let log = st
            .txn
            .logs
            .get(&(topic.to_owned(), partition))
            .cloned()
            .unwrap_or_default();
        let mut out = Vec::new();
        for (i, e) in log.iter().enumerate() {
            if let LogEntry::Record {
                producer_id,
                transactional,
                value,
            } = e
            {
                let keep = !transactional
                    || log[i + 1..].iter().find_map(|m| match m {
                        LogEntry::Marker {
                            producer_id: p,
                            commit,
                        } if p == producer_id => Some(*commit),
                        _ => None,
                    }) == Some(true);
                if keep {
                    out.push(String::from_utf8_lossy(value).into_owned());
                }
            }
        }
        out
    }

    /// The partition's log: records and markers, in order.
    pub fn log(&self, topic: &str, partition: i32) -> Vec<LogEntry> {
        self.shared
            .lock()
            .txn
            .logs
            .get(&(topic.to_owned(), partition))
            .cloned()
            .unwrap_or_default()
    }

    /// Transactions ended so far: (transactional id, committed).
    pub fn ended_transactions(&self) -> Vec<(String, bool)> {
        self.shared.lock().txn.ended.clone()
    }

    /// The epoch of a transactional id.
    pub fn txn_epoch(&self, id: &str) -> Option<i16> {
        self.shared.lock().txn.txns.get(id).map(|t| t.epoch)
    }
}

/// The common checks of a transaction call: on the coordinator node, not while an EndTxn
/// completes, a known id with this producer id at the current epoch.
fn check(
    st: &mut State,
    node: i32,
    id: &str,
    pid: i64,
    epoch: i16,
    coordinator_call: bool,
) -> Option<ResponseError> {
    if coordinator_call && node != st.txn.node {
        return Some(ResponseError::NotCoordinator);
    }
    if coordinator_call && st.txn.concurrent_left > 0 {
        st.txn.concurrent_left -= 1;
        return Some(ResponseError::ConcurrentTransactions);
    }
    let Some(t) = st.txn.txns.get(id) else {
        return Some(ResponseError::TransactionalIdNotFound);
    };
    if t.producer_id != pid {
        return Some(ResponseError::InvalidProducerIdMapping);
    }
    if epoch < t.epoch {
        return Some(ResponseError::ProducerFenced);
    }
    if epoch > t.epoch {
        return Some(ResponseError::InvalidProducerEpoch);
    }
    None
}

fn code(e: Option<ResponseError>) -> i16 {
    e.map_or(0, |e| e.code())
}

/// InitProducerId with a transactional id.
pub fn init_producer_id(
    st: &mut State,
    node: i32,
    req: &InitProducerIdRequest,
    corr: i32,
    version: i16,
    seen: &mut Seen,
) -> Bytes {
    let id = req
        .transactional_id
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    seen.member_id = Some(id.clone());
    let err = if node != st.txn.node {
        Some(ResponseError::NotCoordinator)
    } else if st.txn.concurrent_left > 0 {
        st.txn.concurrent_left -= 1;
        Some(ResponseError::ConcurrentTransactions)
    } else {
        None
    };
    let mut resp = InitProducerIdResponse::default();
    if let Some(e) = err {
        seen.code = e.code();
        return encode::<InitProducerIdRequest>(
            corr,
            version,
            resp.with_error_code(e.code())
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        );
    }
    // A known id: a new epoch, the old producer fenced, its open transaction aborted.
    let open = st.txn.txns.get(&id).is_some_and(Txn::open);
    if open {
        let mut committed = std::mem::take(&mut st.committed);
        st.txn.end(&id, false, &mut committed);
        st.committed = committed;
        // The abort's markers are written now: no CONCURRENT_TRANSACTIONS for the caller.
        st.txn.concurrent_left = 0;
    }
    let (pid, epoch) = match st.txn.txns.get_mut(&id) {
        Some(t) => {
            t.epoch += 1;
            (t.producer_id, t.epoch)
        }
        None => {
            st.next_pid += 1;
            let pid = st.next_pid;
            st.txn.txns.insert(
                id.clone(),
                Txn {
                    producer_id: pid,
                    ..Default::default()
                },
            );
            (pid, 0)
        }
    };
    for (t, n) in st.topics.clone() {
        for p in 0..n {
            st.sequences.insert((pid, (t.clone(), p)), 0);
        }
    }
    st.txn_epochs.insert(pid, epoch);
    resp = resp
        .with_producer_id(ProducerId(pid))
        .with_producer_epoch(epoch);
    encode::<InitProducerIdRequest>(corr, version, resp)
}

pub fn add_partitions(
    st: &mut State,
    node: i32,
    req: &AddPartitionsToTxnRequest,
    corr: i32,
    version: i16,
    seen: &mut Seen,
) -> Bytes {
    let id = req.v3_and_below_transactional_id.0.to_string();
    seen.member_id = Some(id.clone());
    let e = check(
        st,
        node,
        &id,
        req.v3_and_below_producer_id.0,
        req.v3_and_below_producer_epoch,
        true,
    );
    seen.code = code(e);
    if e.is_none()
        && let Some(t) = st.txn.txns.get_mut(&id)
    {
        for topic in &req.v3_and_below_topics {
            for p in &topic.partitions {
                t.partitions.insert((topic.name.0.to_string(), *p));
                seen.offsets.push((topic.name.0.to_string(), *p, -1));
            }
        }
    }
    let results = req
        .v3_and_below_topics
        .iter()
        .map(|t| {
            AddPartitionsToTxnTopicResult::default()
                .with_name(t.name.clone())
                .with_results_by_partition(
                    t.partitions
                        .iter()
                        .map(|p| {
                            AddPartitionsToTxnPartitionResult::default()
                                .with_partition_index(*p)
                                .with_partition_error_code(code(e))
                        })
                        .collect(),
                )
        })
        .collect();
    encode::<AddPartitionsToTxnRequest>(
        corr,
        version,
        AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(results),
    )
}

pub fn add_offsets(
    st: &mut State,
    node: i32,
    req: &AddOffsetsToTxnRequest,
    corr: i32,
    version: i16,
    seen: &mut Seen,
) -> Bytes {
    let id = req.transactional_id.0.to_string();
    seen.member_id = Some(id.clone());
    let e = check(st, node, &id, req.producer_id.0, req.producer_epoch, true);
    seen.code = code(e);
    if e.is_none()
        && let Some(t) = st.txn.txns.get_mut(&id)
    {
        t.groups.insert(req.group_id.0.to_string());
    }
    encode::<AddOffsetsToTxnRequest>(
        corr,
        version,
        AddOffsetsToTxnResponse::default().with_error_code(code(e)),
    )
}

pub fn txn_offset_commit(
    st: &mut State,
    node: i32,
    req: &TxnOffsetCommitRequest,
    corr: i32,
    version: i16,
    seen: &mut Seen,
) -> Bytes {
    let id = req.transactional_id.0.to_string();
    let group = req.group_id.0.to_string();
    seen.generation = Some(req.generation_id);
    seen.member_id = Some(req.member_id.to_string());
    // The group coordinator is node 0.
    let mut e = if node != 0 {
        Some(ResponseError::NotCoordinator)
    } else {
        check(st, node, &id, req.producer_id.0, req.producer_epoch, false)
    };
    if e.is_none()
        && !st
            .txn
            .txns
            .get(&id)
            .is_some_and(|t| t.groups.contains(&group))
    {
        e = Some(ResponseError::InvalidTxnState);
    }
    // KIP-447: the member's generation and id, as OffsetCommit checks them.
    if e.is_none() && version >= 3 {
        if req.member_id.as_str() != MEMBER {
            e = Some(ResponseError::UnknownMemberId);
        } else if req.generation_id != st.generation {
            e = Some(ResponseError::IllegalGeneration);
        }
    }
    seen.code = code(e);
    for t in &req.topics {
        for p in &t.partitions {
            seen.offsets
                .push((t.name.0.to_string(), p.partition_index, p.committed_offset));
            if e.is_none()
                && let Some(txn) = st.txn.txns.get_mut(&id)
            {
                txn.offsets.entry(group.clone()).or_default().insert(
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
            TxnOffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(
                    t.partitions
                        .iter()
                        .map(|p| {
                            TxnOffsetCommitResponsePartition::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(code(e))
                        })
                        .collect(),
                )
        })
        .collect();
    encode::<TxnOffsetCommitRequest>(
        corr,
        version,
        TxnOffsetCommitResponse::default().with_topics(topics),
    )
}

pub fn end_txn(
    st: &mut State,
    node: i32,
    req: &EndTxnRequest,
    corr: i32,
    version: i16,
    seen: &mut Seen,
) -> Bytes {
    let id = req.transactional_id.0.to_string();
    seen.member_id = Some(id.clone());
    let mut e = check(st, node, &id, req.producer_id.0, req.producer_epoch, true);
    if e.is_none() && !st.txn.txns.get(&id).is_some_and(Txn::open) {
        e = Some(ResponseError::InvalidTxnState);
    }
    seen.code = code(e);
    seen.generation = Some(i32::from(req.committed));
    if e.is_none() {
        let mut committed = std::mem::take(&mut st.committed);
        st.txn.end(&id, req.committed, &mut committed);
        st.committed = committed;
    }
    encode::<EndTxnRequest>(
        corr,
        version,
        EndTxnResponse::default().with_error_code(code(e)),
    )
}

/// A transactional Produce of one batch: the producer's epoch and the partition's place in
/// its transaction checked. None: append it.
pub fn check_produce(
    st: &State,
    txn_id: Option<&str>,
    tp: &Tp,
    pid: i64,
    epoch: i16,
    transactional: bool,
) -> Option<ResponseError> {
    if pid < 0 {
        return None;
    }
    if let Some(current) = st.txn_epochs.get(&pid)
        && epoch < *current
    {
        return Some(ResponseError::InvalidProducerEpoch);
    }
    if !transactional {
        return None;
    }
    let Some(id) = txn_id else {
        return Some(ResponseError::InvalidTxnState);
    };
    match st.txn.txns.get(id) {
        Some(t) if t.producer_id == pid && t.partitions.contains(tp) => None,
        Some(t) if t.producer_id == pid => Some(ResponseError::InvalidTxnState),
        _ => Some(ResponseError::InvalidProducerIdMapping),
    }
}
