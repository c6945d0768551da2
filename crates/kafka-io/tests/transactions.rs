//! The transactional producer against the fake transaction coordinator (fake_broker/txn.rs,
//! which follows Kafka's documented rules): the whole conversation in order, commit and abort
//! (markers, offsets applied or dropped), a zombie member's offsets refused by its generation,
//! a zombie producer fenced by the epoch bump of a new one with the same transactional id, a
//! coordinator that moves, CONCURRENT_TRANSACTIONS retried.
//!
//! Real time, short durations; every wait is bounded.

mod fake_broker;

use std::time::Duration;

use bytes::Bytes;
use fake_broker::{FakeBroker, LogEntry, MEMBER};
use kafka_io::{
    OutRecord, ProduceError, Producer, ProducerConfig, TxnConfig, TxnError, TxnOffsets,
};
use kafka_protocol::{error::ResponseError, messages::ApiKey};

const OUT: &str = "out";
const IN: &str = "in";
const GROUP: &str = "g";
const BOUND: Duration = Duration::from_secs(20);

async fn producer(fake: &FakeBroker, id: &str) -> Producer {
    let mut cluster = fake.cluster().await;
    std::sync::Arc::get_mut(&mut cluster)
        .expect("sole owner")
        .request_timeout = Duration::from_secs(2);
    let mut txn = TxnConfig::new(id);
    txn.retry_timeout = Duration::from_secs(5);
    Producer::new(
        cluster,
        ProducerConfig {
            linger: Duration::from_millis(1),
            linger_max: Duration::from_millis(1),
            max_backoff: Duration::from_millis(200),
            transactional: Some(txn),
            ..Default::default()
        },
    )
}

fn rec(v: &str) -> OutRecord {
    OutRecord {
        key: None,
        value: Some(Bytes::from(v.to_owned())),
        headers: Vec::new(),
    }
}

/// Sends each (partition, value) and waits for every delivery.
async fn send(p: &Producer, recs: &[(i32, &str)]) -> Vec<Result<i64, ProduceError>> {
    let mut ds = Vec::new();
    for (part, v) in recs {
        ds.push(p.send(OUT, Some(*part), rec(v)).await.expect("queued"));
    }
    let mut out = Vec::new();
    for d in ds {
        out.push(
            tokio::time::timeout(BOUND, d.wait())
                .await
                .expect("resolved in time"),
        );
    }
    out
}

fn offsets(generation: i32, member: &str, pos: &[(i32, i64)]) -> TxnOffsets {
    TxnOffsets {
        group_id: GROUP.into(),
        generation_id: generation,
        member_id: member.into(),
        group_instance_id: None,
        positions: pos.iter().map(|(p, o)| ((IN.to_owned(), *p), *o)).collect(),
    }
}

/// The transaction APIs the fake read, in order (FindCoordinator with its key type).
fn conversation(fake: &FakeBroker) -> Vec<String> {
    fake.requests()
        .iter()
        .filter_map(|s| {
            let name = match s.api {
                ApiKey::FindCoordinator => format!("FindCoordinator({})", s.generation?),
                ApiKey::InitProducerId => "InitProducerId".into(),
                ApiKey::AddPartitionsToTxn => "AddPartitionsToTxn".into(),
                ApiKey::Produce => "Produce".into(),
                ApiKey::AddOffsetsToTxn => "AddOffsetsToTxn".into(),
                ApiKey::TxnOffsetCommit => "TxnOffsetCommit".into(),
                ApiKey::EndTxn => "EndTxn".into(),
                _ => return None,
            };
            Some(if s.code != 0 {
                format!("{name}!{}", s.code)
            } else {
                name
            })
        })
        .collect()
}

fn markers(log: &[LogEntry]) -> Vec<bool> {
    log.iter()
        .filter_map(|e| match e {
            LogEntry::Marker { commit, .. } => Some(*commit),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_whole_conversation_in_order_then_commit_writes_markers_and_applies_offsets() {
    let fake = FakeBroker::start(&[(OUT, 1), (IN, 1)]).await;
    let p = producer(&fake, "tx-a").await;
    let r = send(&p, &[(0, "a1"), (0, "a2"), (0, "a3")]).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    // Before the commit a read_committed reader sees nothing, and the group no offset.
    assert!(fake.committed_values(OUT, 0).is_empty());
    assert_eq!(fake.committed(IN, 0), None);
    p.commit_transaction(Some(&offsets(0, MEMBER, &[(0, 3)])), BOUND)
        .await
        .expect("committed");
    assert_eq!(fake.committed_values(OUT, 0), ["a1", "a2", "a3"]);
    assert_eq!(markers(&fake.log(OUT, 0)), [true]);
    assert_eq!(fake.committed(IN, 0), Some(3));
    assert_eq!(
        conversation(&fake),
        [
            "FindCoordinator(1)",
            "InitProducerId",
            "AddPartitionsToTxn",
            "Produce",
            "AddOffsetsToTxn",
            "FindCoordinator(0)",
            "TxnOffsetCommit",
            "EndTxn",
        ]
    );
    // TxnOffsetCommit carried the member's generation and member id (KIP-447).
    let c = fake.of(ApiKey::TxnOffsetCommit);
    assert_eq!(c[0].generation, Some(0));
    assert_eq!(c[0].member_id.as_deref(), Some(MEMBER));
    assert!(c[0].version >= 3, "TxnOffsetCommit v{}", c[0].version);
    assert_eq!(fake.ended_transactions(), [("tx-a".to_owned(), true)]);

    // A second transaction: the partition is added again, nothing else repeats.
    send(&p, &[(0, "b1")]).await;
    p.commit_transaction(Some(&offsets(0, MEMBER, &[(0, 4)])), BOUND)
        .await
        .expect("committed");
    assert_eq!(fake.committed_values(OUT, 0), ["a1", "a2", "a3", "b1"]);
    assert_eq!(fake.committed(IN, 0), Some(4));
    assert_eq!(fake.of(ApiKey::InitProducerId).len(), 1);
    assert_eq!(fake.of(ApiKey::AddPartitionsToTxn).len(), 2);
}

#[tokio::test]
async fn abort_hides_the_records_and_drops_the_offsets_then_a_new_epoch_goes_on() {
    let fake = FakeBroker::start(&[(OUT, 2), (IN, 1)]).await;
    let p = producer(&fake, "tx-b").await;
    send(&p, &[(0, "a1"), (1, "a2")]).await;
    p.commit_transaction(Some(&offsets(0, MEMBER, &[(0, 2)])), BOUND)
        .await
        .unwrap();
    send(&p, &[(0, "x1"), (1, "x2")]).await;
    p.abort_transaction(BOUND).await.expect("aborted");
    assert_eq!(
        fake.ended_transactions().last(),
        Some(&("tx-b".into(), false))
    );
    for part in [0, 1] {
        assert_eq!(
            markers(&fake.log(OUT, part)),
            [true, false],
            "partition {part}"
        );
    }
    // The aborted records are in the log, but not what read_committed reads.
    assert_eq!(fake.produced(OUT, 0).len(), 2);
    assert_eq!(fake.committed_values(OUT, 0), ["a1"]);
    assert_eq!(fake.committed_values(OUT, 1), ["a2"]);
    assert_eq!(fake.committed(IN, 0), Some(2));
    // After an abort the producer starts again with a new epoch (sequences from 0).
    send(&p, &[(0, "c1")]).await;
    p.commit_transaction(Some(&offsets(0, MEMBER, &[(0, 3)])), BOUND)
        .await
        .unwrap();
    assert_eq!(fake.txn_epoch("tx-b"), Some(1));
    assert_eq!(fake.committed_values(OUT, 0), ["a1", "c1"]);
    assert_eq!(fake.committed(IN, 0), Some(3));
}

#[tokio::test]
async fn a_zombie_member_is_fenced_by_its_generation_and_its_transaction_aborted() {
    let fake = FakeBroker::start(&[(OUT, 1), (IN, 1)]).await;
    let p = producer(&fake, "tx-c").await;
    // A member of an old generation (the group has moved on to generation 0 here: -1 is gone).
    send(&p, &[(0, "z1")]).await;
    let e = p
        .commit_transaction(Some(&offsets(-1, MEMBER, &[(0, 1)])), BOUND)
        .await
        .expect_err("old generation refused");
    assert!(matches!(e, TxnError::GroupFenced(_)), "{e:?}");
    assert!(!e.is_fatal());
    p.abort_transaction(BOUND).await.unwrap();
    // A member the group does not know.
    send(&p, &[(0, "z2")]).await;
    let e = p
        .commit_transaction(Some(&offsets(0, "zombie", &[(0, 2)])), BOUND)
        .await
        .expect_err("unknown member refused");
    assert!(
        matches!(e, TxnError::GroupFenced(ref w) if w.contains("UnknownMemberId")),
        "{e:?}"
    );
    p.abort_transaction(BOUND).await.unwrap();
    let codes: Vec<i16> = fake
        .of(ApiKey::TxnOffsetCommit)
        .iter()
        .map(|s| s.code)
        .collect();
    assert_eq!(
        codes,
        [
            ResponseError::IllegalGeneration.code(),
            ResponseError::UnknownMemberId.code()
        ]
    );
    assert!(fake.committed_values(OUT, 0).is_empty());
    assert_eq!(fake.committed(IN, 0), None);
    assert_eq!(markers(&fake.log(OUT, 0)), [false, false]);
}

#[tokio::test]
async fn a_new_producer_with_the_same_transactional_id_fences_the_old_one() {
    let fake = FakeBroker::start(&[(OUT, 1), (IN, 1)]).await;
    let old = producer(&fake, "tx-d").await;
    send(&old, &[(0, "a1")]).await;
    old.commit_transaction(Some(&offsets(0, MEMBER, &[(0, 1)])), BOUND)
        .await
        .unwrap();
    // The old producer opens a transaction; a new one with the same id starts (epoch bump):
    // the open transaction is aborted and the old producer fenced.
    let r = send(&old, &[(0, "zombie-1")]).await;
    assert!(r[0].is_ok());
    let new = producer(&fake, "tx-d").await;
    send(&new, &[(0, "n1")]).await;
    assert_eq!(fake.txn_epoch("tx-d"), Some(1));
    assert_eq!(markers(&fake.log(OUT, 0)), [true, false]);
    // The zombie's next batch is refused (INVALID_PRODUCER_EPOCH), its commit fenced.
    let r = send(&old, &[(0, "zombie-2")]).await;
    assert!(matches!(r[0], Err(ProduceError::Transaction(_))), "{r:?}");
    let e = old
        .commit_transaction(Some(&offsets(0, MEMBER, &[(0, 9)])), BOUND)
        .await
        .expect_err("fenced");
    assert!(matches!(e, TxnError::Fenced { .. }), "{e:?}");
    assert!(e.is_fatal());
    new.commit_transaction(Some(&offsets(0, MEMBER, &[(0, 2)])), BOUND)
        .await
        .unwrap();
    assert_eq!(fake.committed_values(OUT, 0), ["a1", "n1"]);
    assert_eq!(fake.committed(IN, 0), Some(2));
    let produce_codes: Vec<i16> = fake.of(ApiKey::Produce).iter().map(|s| s.code).collect();
    assert!(
        produce_codes.contains(&ResponseError::InvalidProducerEpoch.code()),
        "{produce_codes:?}"
    );
}

#[tokio::test]
async fn a_coordinator_that_moves_is_found_again() {
    let fake = FakeBroker::start_cluster(&[(OUT, 1), (IN, 1)], 2).await;
    let p = producer(&fake, "tx-e").await;
    send(&p, &[(0, "a1")]).await;
    p.commit_transaction(Some(&offsets(0, MEMBER, &[(0, 1)])), BOUND)
        .await
        .unwrap();
    fake.move_txn_coordinator(1);
    send(&p, &[(0, "a2")]).await;
    p.commit_transaction(Some(&offsets(0, MEMBER, &[(0, 2)])), BOUND)
        .await
        .expect("committed on the new coordinator");
    assert_eq!(fake.committed_values(OUT, 0), ["a1", "a2"]);
    assert_eq!(fake.committed(IN, 0), Some(2));
    let adds = fake.of(ApiKey::AddPartitionsToTxn);
    assert_eq!(
        adds.iter().map(|s| (s.node, s.code)).collect::<Vec<_>>(),
        [(0, 0), (0, ResponseError::NotCoordinator.code()), (1, 0)]
    );
    assert_eq!(
        fake.of(ApiKey::EndTxn)
            .iter()
            .map(|s| s.node)
            .collect::<Vec<_>>(),
        [0, 1]
    );
    // The transaction coordinator was asked for twice (key type 1).
    let finds = fake
        .of(ApiKey::FindCoordinator)
        .iter()
        .filter(|s| s.generation == Some(1))
        .count();
    assert_eq!(finds, 2);
}

#[tokio::test]
async fn concurrent_transactions_after_an_end_is_retried() {
    let fake = FakeBroker::start(&[(OUT, 1), (IN, 1)]).await;
    fake.concurrent_transactions(2);
    let p = producer(&fake, "tx-f").await;
    for (i, v) in ["a1", "a2", "a3"].iter().enumerate() {
        let r = send(&p, &[(0, v)]).await;
        assert!(r[0].is_ok(), "{r:?}");
        p.commit_transaction(Some(&offsets(0, MEMBER, &[(0, i as i64 + 1)])), BOUND)
            .await
            .expect("committed after retries");
    }
    assert_eq!(fake.committed_values(OUT, 0), ["a1", "a2", "a3"]);
    assert_eq!(fake.committed(IN, 0), Some(3));
    // Twice after each of the first two EndTxns.
    let concurrent = fake
        .requests()
        .iter()
        .filter(|s| s.code == ResponseError::ConcurrentTransactions.code())
        .count();
    assert_eq!(concurrent, 4);
    assert_eq!(fake.ended_transactions().len(), 3);
}

#[tokio::test]
async fn a_new_owner_waits_for_the_offsets_of_a_transaction_still_open() {
    let fake = FakeBroker::start(&[(OUT, 1), (IN, 1)]).await;
    fake.log_end(IN, 0, 10);
    fake.assign(&[(IN.to_owned(), 0)]);
    let cluster = fake.cluster().await;
    // The previous owner's transaction holds offset 7 of in/0 and has not ended yet.
    let mut prev = kafka_io::txn::TxnCoordinator::new(
        cluster.connector.clone(),
        TxnConfig::new("previous-owner"),
    );
    prev.init().await.unwrap();
    prev.add_offsets(GROUP).await.unwrap();
    prev.commit_offsets(&offsets(0, MEMBER, &[(0, 7)]))
        .await
        .unwrap();
    let mut g = kafka_io::GroupConfig::new(GROUP, vec![IN.to_owned()]);
    g.session_timeout = Duration::from_millis(1500);
    g.heartbeat_interval = Duration::from_millis(300);
    g.rebalance_timeout = Duration::from_millis(1000);
    g.require_stable = true;
    let mut cfg = kafka_io::ConsumerConfig::new(g);
    cfg.fetch_max_wait = Duration::from_millis(50);
    cfg.transactional_commits = true;
    let mut c = kafka_io::Consumer::start(cluster, cfg, None);
    // UNSTABLE_OFFSET_COMMIT: the partition does not start while the transaction is open.
    assert!(
        tokio::time::timeout(Duration::from_millis(800), c.next_stream())
            .await
            .is_err(),
        "started before the offsets were stable"
    );
    let asked = fake.of(ApiKey::OffsetFetch);
    assert!(asked.len() >= 3, "OffsetFetch asked again: {}", asked.len());
    assert!(
        asked.iter().all(|s| s.generation == Some(1)),
        "require_stable sent"
    );
    prev.end(true).await.unwrap();
    let mut s = tokio::time::timeout(BOUND, c.next_stream())
        .await
        .expect("started once stable")
        .expect("a stream");
    let b = tokio::time::timeout(BOUND, s.recv())
        .await
        .expect("records")
        .expect("a batch");
    assert_eq!(b.records[0].offset, 7, "starts at the transaction's offset");
    c.close().await;
}

#[tokio::test]
async fn records_queued_and_not_yet_sent_at_an_abort_are_never_written() {
    let fake = FakeBroker::start(&[(OUT, 1), (IN, 1)]).await;
    let p = producer(&fake, "tx-g").await;
    // Every Produce answer asks us to wait 1 s: the next batch stays queued meanwhile.
    fake.produce_throttle(1000);
    let r = send(&p, &[(0, "sent")]).await;
    assert!(r[0].is_ok(), "{r:?}");
    let queued = p.send(OUT, Some(0), rec("queued")).await.expect("queued");
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.abort_transaction(BOUND).await.expect("aborted");
    let r = tokio::time::timeout(BOUND, queued.wait())
        .await
        .expect("resolved");
    assert!(matches!(r, Err(ProduceError::Transaction(_))), "{r:?}");
    fake.produce_throttle(0);
    // The next transaction holds only what is sent after the abort.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(&p, &[(0, "next")]).await;
    p.commit_transaction(None, BOUND).await.unwrap();
    let values: Vec<String> = fake
        .produced(OUT, 0)
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(
        values,
        ["sent", "next"],
        "the queued record was never produced"
    );
    assert_eq!(fake.committed_values(OUT, 0), ["next"]);
}
