//! Transactions (KIP-98, with KIP-447's group-fenced offsets): the conversation with the
//! transaction coordinator and, for the offsets, the group coordinator.
//!
//! [`TxnCoordinator`] finds the transaction coordinator (FindCoordinator, key type 1), gets the
//! producer id and epoch of a transactional id (InitProducerId: the epoch goes up by one on each
//! call, which fences every producer that used the id before, and aborts its open
//! transaction), adds partitions to the transaction (AddPartitionsToTxn, v3 at most: v4+ is for
//! brokers), adds the group (AddOffsetsToTxn), commits the input offsets inside the transaction
//! on the group coordinator (TxnOffsetCommit v3+, with the member's generation and member id:
//! the group fences a zombie member's offsets) and ends the transaction (EndTxn commit/abort).
//!
//! Every call retries, with a capped backoff until [`TxnConfig::retry_timeout`], what Kafka
//! documents as passing: CONCURRENT_TRANSACTIONS (the previous EndTxn is still being
//! completed), COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE and NOT_COORDINATOR (the
//! coordinator moved: found again), a lost connection or a timeout. What cannot pass comes back
//! as a typed [`TxnError`]: fenced (PRODUCER_FENCED, INVALID_PRODUCER_EPOCH), not authorized
//! (TRANSACTIONAL_ID_AUTHORIZATION_FAILED and the other authorization codes), the member's
//! generation gone (ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID), or any other
//! failure, after which the transaction can only be aborted.
//!
//! The producer ([`crate::producer`], [`ProducerConfig::transactional`]) drives this: its
//! writers add their partition to the open transaction before their first batch in it, and
//! [`crate::Producer::commit_transaction`] / [`crate::Producer::abort_transaction`] end it.
//!
//! [`ProducerConfig::transactional`]: crate::ProducerConfig::transactional

use std::{collections::BTreeMap, time::Duration};

use kafka_protocol::{
    error::ResponseError,
    messages::{
        AddOffsetsToTxnRequest, AddPartitionsToTxnRequest, EndTxnRequest, GroupId,
        InitProducerIdRequest, ProducerId, TopicName, TransactionalId, TxnOffsetCommitRequest,
        add_partitions_to_txn_request::AddPartitionsToTxnTopic,
        txn_offset_commit_request::{TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic},
    },
    protocol::Request,
};
use tokio::time::Instant;

use crate::{
    assignor::Tp,
    backoff::Backoff,
    conn::s,
    conn::{BrokerConn, Connector},
    error::Error,
};

/// FindCoordinator v3 is the last with one key per request.
/// v3+ carries producer id and epoch (-1: a new one; tansu fails v0-v2); v5 is KIP-890's.
const INIT_PID_MIN: i16 = 3;
const INIT_PID_MAX: i16 = 4;
/// v4+ is the brokers' batched form (tansu panics on it).
const ADD_PARTITIONS_MAX: i16 = 3;
const ADD_OFFSETS_MAX: i16 = 3;
/// v3 (KIP-447) is the first with generation id and member id.
const TXN_OFFSET_COMMIT_MIN: i16 = 3;
const TXN_OFFSET_COMMIT_MAX: i16 = 3;
/// v5 is KIP-890's (a new epoch on every EndTxn).
const END_TXN_MAX: i16 = 3;

/// The transactional producer's settings.
#[derive(Clone, Debug)]
pub struct TxnConfig {
    /// Names the producer across restarts: a new InitProducerId with it fences the old one and
    /// aborts its open transaction.
    pub transactional_id: String,
    /// The coordinator aborts a transaction left open this long (`transaction.timeout.ms`).
    pub transaction_timeout: Duration,
    /// How long one call is retried (CONCURRENT_TRANSACTIONS, a coordinator moving or
    /// loading, lost connections) before the transaction is given up.
    pub retry_timeout: Duration,
}

impl TxnConfig {
    pub fn new(transactional_id: impl Into<String>) -> Self {
        Self {
            transactional_id: transactional_id.into(),
            transaction_timeout: Duration::from_secs(60),
            retry_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a transaction cannot go on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// Another producer took the transactional id (a newer epoch): this one must stop; its
    /// open transaction is aborted by the coordinator.
    #[error(
        "transactional id {id} was taken by a newer producer (fenced: {why}); this member's work stops"
    )]
    Fenced { id: String, why: String },
    /// Not allowed to use the transactional id (or the group, or the topic).
    #[error("not authorized for transactions with transactional id {id}: {why}")]
    Unauthorized { id: String, why: String },
    /// The group no longer counts this member in that generation: its offsets were refused
    /// (a zombie member). Abort and rejoin.
    #[error("the group refused the transaction's offsets (generation gone): {0}")]
    GroupFenced(String),
    /// The transaction cannot commit (a call failed for good, retries ran out, a batch was
    /// refused): abort it.
    #[error("the transaction failed: {0}")]
    Abortable(String),
}

impl TxnError {
    /// No retry helps: the member stops its work (fenced) or the process stops (authorization).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Fenced { .. } | Self::Unauthorized { .. })
    }
}

/// The input offsets a transaction commits for a consumer group, with the member's identity
/// (KIP-447: the group coordinator refuses them from a generation that is gone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnOffsets {
    pub group_id: String,
    pub generation_id: i32,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    /// (topic, partition) -> the next offset to read.
    pub positions: Vec<(Tp, i64)>,
}

/// What one response said.
enum Verdict {
    Ok,
    /// Passing: try again after a backoff; `moved`: find the coordinator again first.
    Retry {
        moved: bool,
        why: String,
    },
    Fail(TxnError),
}

/// The coordinator client of one transactional id.
pub struct TxnCoordinator {
    connector: Connector,
    config: TxnConfig,
    /// The transaction coordinator's connection (found again after NOT_COORDINATOR).
    txn_conn: Option<BrokerConn>,
    /// The group coordinator's connection, by group id.
    group_conn: Option<(String, BrokerConn)>,
    /// (producer id, epoch) of the last InitProducerId.
    producer: Option<(i64, i16)>,
}

/// Which coordinator a call goes to.
#[derive(Clone, Copy)]
enum Which<'a> {
    Txn,
    Group(&'a str),
}

impl TxnCoordinator {
    pub fn new(connector: Connector, config: TxnConfig) -> Self {
        Self {
            connector,
            config,
            txn_conn: None,
            group_conn: None,
            producer: None,
        }
    }

    pub fn transactional_id(&self) -> &str {
        &self.config.transactional_id
    }

    /// The producer id and epoch from the last [`init`](Self::init).
    pub fn producer(&self) -> Option<(i64, i16)> {
        self.producer
    }

    fn judge(&self, call: &'static str, code: i16) -> Verdict {
        let Some(e) = ResponseError::try_from_code(code) else {
            return Verdict::Ok;
        };
        let why = format!("{call}: {e:?} ({code})");
        let id = self.config.transactional_id.clone();
        use ResponseError as R;
        match e {
            R::ConcurrentTransactions | R::CoordinatorLoadInProgress | R::RequestTimedOut => {
                Verdict::Retry { moved: false, why }
            }
            R::NotCoordinator | R::CoordinatorNotAvailable => Verdict::Retry { moved: true, why },
            R::ProducerFenced | R::InvalidProducerEpoch => {
                Verdict::Fail(TxnError::Fenced { id, why })
            }
            R::TransactionalIdAuthorizationFailed
            | R::ClusterAuthorizationFailed
            | R::GroupAuthorizationFailed
            | R::TopicAuthorizationFailed => Verdict::Fail(TxnError::Unauthorized { id, why }),
            R::IllegalGeneration | R::UnknownMemberId | R::FencedInstanceId => {
                Verdict::Fail(TxnError::GroupFenced(why))
            }
            R::UnknownTopicOrPartition => Verdict::Retry { moved: false, why },
            _ => Verdict::Fail(TxnError::Abortable(why)),
        }
    }

    /// FindCoordinator for `key` (type 0: group, 1: transaction) and a connection to it.
    async fn find(&self, key_type: i8, key: &str) -> Result<BrokerConn, Error> {
        self.connector.find_coordinator(key_type, key).await
    }

    /// Sends `req` to the coordinator `which` (found first if needed) at the highest version
    /// in `min..=cap`, retrying what passes until the retry timeout.
    async fn call<R: Request<Response: 'static> + Clone>(
        &mut self,
        which: Which<'_>,
        call: &'static str,
        (min, cap): (i16, i16),
        req: impl Fn(i16) -> R,
        code: impl Fn(&R::Response) -> i16,
    ) -> Result<R::Response, TxnError> {
        let deadline = Instant::now() + self.config.retry_timeout;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        loop {
            let sent: Result<R::Response, Error> = async {
                let conn = match which {
                    Which::Txn => {
                        if self.txn_conn.is_none() {
                            self.txn_conn =
                                Some(self.find(1, &self.config.transactional_id).await?);
                        }
                        self.txn_conn.as_mut().expect("set above")
                    }
                    Which::Group(g) => {
                        if self.group_conn.as_ref().is_none_or(|(k, _)| k != g) {
                            self.group_conn = Some((g.to_owned(), self.find(0, g).await?));
                        }
                        &mut self.group_conn.as_mut().expect("set above").1
                    }
                };
                let v = conn.version::<R>(call, cap)?;
                if v < min {
                    return Err(Error::Version {
                        call,
                        ours: format!("{min}..{cap}"),
                        theirs: format!("..{v}"),
                    });
                }
                conn.send(req(v), v, call).await
            }
            .await;
            let verdict = match &sent {
                Ok(resp) => self.judge(call, code(resp)),
                Err(e @ Error::Version { .. }) => {
                    return Err(TxnError::Abortable(e.to_string()));
                }
                Err(e) => match e.broker_error() {
                    // FindCoordinator answered an error code.
                    Some(_) => match self.judge(call, e.broker_error().map_or(0, |r| r.code())) {
                        Verdict::Ok => Verdict::Retry {
                            moved: true,
                            why: e.to_string(),
                        },
                        v => v,
                    },
                    None => Verdict::Retry {
                        moved: true,
                        why: e.to_string(),
                    },
                },
            };
            match verdict {
                Verdict::Ok => {
                    if let Ok(resp) = sent {
                        return Ok(resp);
                    }
                }
                Verdict::Fail(e) => {
                    tracing::warn!(transactional_id = %self.config.transactional_id, error = %e, "transaction call failed");
                    return Err(e);
                }
                Verdict::Retry { moved, why } => {
                    if moved {
                        match which {
                            Which::Txn => self.txn_conn = None,
                            Which::Group(_) => self.group_conn = None,
                        }
                    }
                    let wait = backoff.next_wait();
                    if Instant::now() + wait > deadline {
                        return Err(TxnError::Abortable(format!(
                            "{why}; still failing after {:?}",
                            self.config.retry_timeout
                        )));
                    }
                    tracing::debug!(%call, %why, retry_in = ?wait, "transaction call: retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Forgets the producer id (the next transaction starts with [`init`](Self::init)).
    pub fn forget(&mut self) {
        self.producer = None;
    }

    fn pid(&self) -> Result<(i64, i16), TxnError> {
        self.producer
            .ok_or_else(|| TxnError::Abortable("no producer id (InitProducerId first)".into()))
    }

    /// InitProducerId with the transactional id: a new epoch (fencing the id's earlier
    /// producers and aborting their open transaction). Forgets the earlier id first.
    pub async fn init(&mut self) -> Result<(i64, i16), TxnError> {
        self.producer = None;
        let id = self.config.transactional_id.clone();
        let timeout = self
            .config
            .transaction_timeout
            .as_millis()
            .min(i32::MAX as u128) as i32;
        let resp = self
            .call(
                Which::Txn,
                "InitProducerId",
                (INIT_PID_MIN, INIT_PID_MAX),
                |_| {
                    InitProducerIdRequest::default()
                        .with_transactional_id(Some(TransactionalId(s(&id))))
                        .with_transaction_timeout_ms(timeout)
                        .with_producer_id(ProducerId(-1))
                        .with_producer_epoch(-1)
                },
                |r| r.error_code,
            )
            .await?;
        let p = (resp.producer_id.0, resp.producer_epoch);
        tracing::info!(transactional_id = %id, producer_id = p.0, epoch = p.1, "transactional producer id");
        self.producer = Some(p);
        Ok(p)
    }

    /// AddPartitionsToTxn: `tps` become part of the open transaction (before any batch to them).
    pub async fn add_partitions(&mut self, tps: &[Tp]) -> Result<(), TxnError> {
        let (pid, epoch) = self.pid()?;
        let id = self.config.transactional_id.clone();
        let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
        for (t, p) in tps {
            by_topic.entry(t).or_default().push(*p);
        }
        let topics: Vec<AddPartitionsToTxnTopic> = by_topic
            .into_iter()
            .map(|(t, ps)| {
                AddPartitionsToTxnTopic::default()
                    .with_name(TopicName(s(t)))
                    .with_partitions(ps)
            })
            .collect();
        self.call(
            Which::Txn,
            "AddPartitionsToTxn",
            (0, ADD_PARTITIONS_MAX),
            |_| {
                AddPartitionsToTxnRequest::default()
                    .with_v3_and_below_transactional_id(TransactionalId(s(&id)))
                    .with_v3_and_below_producer_id(ProducerId(pid))
                    .with_v3_and_below_producer_epoch(epoch)
                    .with_v3_and_below_topics(topics.clone())
            },
            |r| {
                r.results_by_topic_v3_and_below
                    .iter()
                    .flat_map(|t| t.results_by_partition.iter())
                    .map(|p| p.partition_error_code)
                    .find(|c| *c != 0)
                    .unwrap_or(r.error_code)
            },
        )
        .await?;
        Ok(())
    }

    /// AddOffsetsToTxn: the group's offsets will be committed by this transaction.
    pub async fn add_offsets(&mut self, group_id: &str) -> Result<(), TxnError> {
        let (pid, epoch) = self.pid()?;
        let id = self.config.transactional_id.clone();
        self.call(
            Which::Txn,
            "AddOffsetsToTxn",
            (0, ADD_OFFSETS_MAX),
            |_| {
                AddOffsetsToTxnRequest::default()
                    .with_transactional_id(TransactionalId(s(&id)))
                    .with_producer_id(ProducerId(pid))
                    .with_producer_epoch(epoch)
                    .with_group_id(GroupId(s(group_id)))
            },
            |r| r.error_code,
        )
        .await?;
        Ok(())
    }

    /// TxnOffsetCommit on the group coordinator: the offsets count only if the transaction
    /// commits, and only from the member's current generation (KIP-447).
    pub async fn commit_offsets(&mut self, offsets: &TxnOffsets) -> Result<(), TxnError> {
        let (pid, epoch) = self.pid()?;
        let id = self.config.transactional_id.clone();
        let mut by_topic: BTreeMap<&str, Vec<TxnOffsetCommitRequestPartition>> = BTreeMap::new();
        for ((t, p), o) in &offsets.positions {
            by_topic.entry(t).or_default().push(
                TxnOffsetCommitRequestPartition::default()
                    .with_partition_index(*p)
                    .with_committed_offset(*o)
                    .with_committed_leader_epoch(-1),
            );
        }
        let topics: Vec<TxnOffsetCommitRequestTopic> = by_topic
            .into_iter()
            .map(|(t, ps)| {
                TxnOffsetCommitRequestTopic::default()
                    .with_name(TopicName(s(t)))
                    .with_partitions(ps)
            })
            .collect();
        let group = offsets.group_id.clone();
        self.call(
            Which::Group(&group),
            "TxnOffsetCommit",
            (TXN_OFFSET_COMMIT_MIN, TXN_OFFSET_COMMIT_MAX),
            |_| {
                TxnOffsetCommitRequest::default()
                    .with_transactional_id(TransactionalId(s(&id)))
                    .with_group_id(GroupId(s(&offsets.group_id)))
                    .with_producer_id(ProducerId(pid))
                    .with_producer_epoch(epoch)
                    .with_generation_id(offsets.generation_id)
                    .with_member_id(s(&offsets.member_id))
                    .with_group_instance_id(offsets.group_instance_id.as_deref().map(s))
                    .with_topics(topics.clone())
            },
            |r| {
                r.topics
                    .iter()
                    .flat_map(|t| t.partitions.iter())
                    .map(|p| p.error_code)
                    .find(|c| *c != 0)
                    .unwrap_or(0)
            },
        )
        .await?;
        Ok(())
    }

    /// EndTxn: commit (markers written, offsets applied) or abort (markers, offsets dropped).
    pub async fn end(&mut self, commit: bool) -> Result<(), TxnError> {
        let (pid, epoch) = self.pid()?;
        let id = self.config.transactional_id.clone();
        self.call(
            Which::Txn,
            "EndTxn",
            (0, END_TXN_MAX),
            |_| {
                EndTxnRequest::default()
                    .with_transactional_id(TransactionalId(s(&id)))
                    .with_producer_id(ProducerId(pid))
                    .with_producer_epoch(epoch)
                    .with_committed(commit)
            },
            |r| r.error_code,
        )
        .await?;
        Ok(())
    }
}
