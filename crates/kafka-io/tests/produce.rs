//! The producer against the fake broker (tests/fake_broker): throttled answers are never a
//! reason to resend and delay the next request; a batch the broker refuses as too large is
//! split and every record still arrives, in order; only a record refused alone is TooLarge;
//! idempotence: a batch whose response was lost is resent with its sequence and not written
//! twice (and is written twice with idempotence off), a forgotten producer id gets a new one,
//! and a broker refusing InitProducerId fails the records with an error naming the flag;
//! records keep flowing through KIP-368 re-authentications (OAUTHBEARER), none lost or resent;
//! another partition's new producer id does not rewrite a partition's outstanding batches; a
//! batch failed with its write unknown does not lend its sequence (a new producer id); answers
//! are read while the next batch lingers.
//!
//! Real time, short durations; every wait is bounded.

mod fake_broker;

use std::time::Duration;

use bytes::Bytes;
use fake_broker::FakeBroker;
use kafka_io::{OutRecord, ProduceError, Producer, ProducerConfig};
use kafka_protocol::error::ResponseError;
use tokio::time::Instant;

const TOPIC: &str = "out";
/// The longest any delivery is waited for.
const BOUND: Duration = Duration::from_secs(20);

fn rec(v: String) -> OutRecord {
    OutRecord {
        key: None,
        value: Some(Bytes::from(v)),
        headers: vec![("h".into(), Bytes::from_static(b"x"))],
    }
}

fn values(n: usize, pad: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{i:05}{}", "x".repeat(pad)))
        .collect()
}

async fn producer(fake: &FakeBroker, idempotent: bool, linger_ms: u64) -> Producer {
    let mut cluster = fake.cluster().await;
    // Short timeouts: a dropped response is noticed within a second.
    std::sync::Arc::get_mut(&mut cluster)
        .expect("sole owner")
        .request_timeout = Duration::from_secs(1);
    Producer::new(
        cluster,
        ProducerConfig {
            linger: Duration::from_millis(linger_ms),
            linger_max: Duration::from_millis(linger_ms),
            idempotent,
            max_backoff: Duration::from_millis(200),
            ..Default::default()
        },
    )
}

/// Sends every value to partition 0 and waits for every delivery.
async fn send_all(p: &Producer, vals: &[String]) -> Vec<Result<i64, ProduceError>> {
    let mut ds = Vec::new();
    for v in vals {
        ds.push(
            p.send(TOPIC, Some(0), rec(v.clone()))
                .await
                .expect("queued"),
        );
    }
    let mut out = Vec::new();
    for d in ds {
        out.push(
            tokio::time::timeout(BOUND, d.wait())
                .await
                .expect("delivered in time"),
        );
    }
    out
}

fn strings(b: Vec<Bytes>) -> Vec<String> {
    b.into_iter()
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
        .collect()
}

#[tokio::test]
async fn a_throttled_produce_is_not_resent_and_the_next_request_waits() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    fake.produce_throttle(400);
    let p = producer(&fake, true, 0).await;
    let first = send_all(&p, &values(1, 0)).await;
    assert!(first[0].is_ok(), "{first:?}");
    let answered = Instant::now();
    let second = send_all(&p, &["second".to_owned()]).await;
    assert!(second[0].is_ok(), "{second:?}");
    let batches = fake.of(kafka_protocol::messages::ApiKey::Produce);
    assert_eq!(
        batches.len(),
        2,
        "one request per record, no resend: {batches:?}"
    );
    let waited = batches[1].at.duration_since(answered);
    assert!(
        waited >= Duration::from_millis(300),
        "the second request waited the throttle out: {waited:?}"
    );
    assert_eq!(strings(fake.produced(TOPIC, 0)), ["00000", "second"]);
    assert!(p.throttled_ms() >= 800, "{}", p.throttled_ms());
    p.close(BOUND).await.unwrap();
}

#[tokio::test]
async fn a_batch_refused_as_too_large_is_split_and_every_record_arrives_in_order() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    fake.produce_max_bytes(Some(2_000));
    let p = producer(&fake, true, 100).await;
    // 40 records of ~220 bytes: one ~9 KB batch, refused until the halves fit.
    let vals = values(40, 200);
    let got = send_all(&p, &vals).await;
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    assert_eq!(
        strings(fake.produced(TOPIC, 0)),
        vals,
        "every record, in order"
    );
    let batches = fake.produce_batches();
    assert!(batches.iter().any(|b| b.records == 40), "{batches:?}");
    assert!(
        batches
            .iter()
            .filter(|b| b.bytes <= 2_000)
            .all(|b| b.records < 40),
        "{batches:?}"
    );
    // Offsets as the broker gave them, in order.
    let offsets: Vec<i64> = got.into_iter().map(Result::unwrap).collect();
    assert_eq!(offsets, (0..40).collect::<Vec<i64>>());

    // A record refused alone is TooLarge; the records after it still arrive.
    let big = "b".repeat(3_000);
    let mut ds = Vec::new();
    for v in [big.clone(), "after-1".into(), "after-2".into()] {
        ds.push(p.send(TOPIC, Some(0), rec(v)).await.expect("queued"));
    }
    let mut res = Vec::new();
    for d in ds {
        res.push(
            tokio::time::timeout(BOUND, d.wait())
                .await
                .expect("in time"),
        );
    }
    assert!(
        matches!(&res[0], Err(ProduceError::TooLarge { topic, .. }) if topic == TOPIC),
        "{res:?}"
    );
    assert!(res[1].is_ok() && res[2].is_ok(), "{res:?}");
    let log = strings(fake.produced(TOPIC, 0));
    assert_eq!(&log[40..], ["after-1", "after-2"]);
    p.close(BOUND).await.unwrap();
}

/// The broker appends a batch, then the connection closes before its response.
async fn lost_response(idempotent: bool) -> (Vec<String>, Vec<Result<i64, ProduceError>>) {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    let p = producer(&fake, idempotent, 0).await;
    assert!(send_all(&p, &["warm-up".to_owned()]).await[0].is_ok());
    fake.drop_produce_responses(1);
    let got = send_all(&p, &values(3, 0)).await;
    let log = strings(fake.produced(TOPIC, 0));
    p.close(BOUND).await.unwrap();
    (log, got)
}

#[tokio::test]
async fn idempotent_a_resent_batch_after_a_lost_response_is_written_once() {
    let (log, got) = lost_response(true).await;
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    assert_eq!(log, ["warm-up", "00000", "00001", "00002"]);
    // Already written: the broker said DUPLICATE_SEQUENCE_NUMBER, the offset is unknown.
    assert!(got.iter().all(|r| *r.as_ref().unwrap() == -1), "{got:?}");
}

#[tokio::test]
async fn not_idempotent_a_resent_batch_after_a_lost_response_is_written_twice() {
    let (log, got) = lost_response(false).await;
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    assert_eq!(
        log,
        [
            "warm-up", "00000", "00001", "00002", "00000", "00001", "00002"
        ]
    );
}

#[tokio::test]
async fn a_forgotten_producer_id_is_replaced_and_sequences_start_again() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    let p = producer(&fake, true, 0).await;
    assert!(send_all(&p, &values(2, 0)).await.iter().all(Result::is_ok));
    fake.forget_producers();
    let got = send_all(&p, &["later".to_owned()]).await;
    assert!(got[0].is_ok(), "{got:?}");
    assert_eq!(
        strings(fake.produced(TOPIC, 0)),
        ["00000", "00001", "later"]
    );
    let inits = fake.of(kafka_protocol::messages::ApiKey::InitProducerId);
    assert_eq!(inits.len(), 2, "{inits:?}");
    let batches = fake.produce_batches();
    let last = batches.last().unwrap();
    assert_eq!(last.base_sequence, 0, "{batches:?}");
    assert_ne!(last.producer_id, batches[0].producer_id, "{batches:?}");
    p.close(BOUND).await.unwrap();
}

#[tokio::test]
async fn sequences_follow_the_record_count_per_partition() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    let p = producer(&fake, true, 0).await;
    for n in [1usize, 3, 2] {
        assert!(send_all(&p, &values(n, 0)).await.iter().all(Result::is_ok));
    }
    let seqs: Vec<i32> = fake
        .produce_batches()
        .iter()
        .map(|b| b.base_sequence)
        .collect();
    assert_eq!(seqs, [0, 1, 4], "sequence += records of each batch");
    p.close(BOUND).await.unwrap();
}

#[tokio::test]
async fn a_broker_refusing_idempotence_names_the_flag_to_turn_it_off() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    fake.init_pid_error(Some(ResponseError::ClusterAuthorizationFailed));
    let p = producer(&fake, true, 0).await;
    let got = send_all(&p, &values(1, 0)).await;
    match &got[0] {
        Err(ProduceError::Rejected { why, .. }) => {
            assert!(why.contains("--idempotence false"), "{why}");
            assert!(why.contains("ClusterAuthorizationFailed"), "{why}");
        }
        o => panic!("{o:?}"),
    }
    assert!(fake.produced(TOPIC, 0).is_empty());
    // Without idempotence the same broker takes the record.
    let plain = producer(&fake, false, 0).await;
    assert!(send_all(&plain, &values(1, 0)).await[0].is_ok());
    assert_eq!(strings(fake.produced(TOPIC, 0)), ["00000"]);
    p.close(BOUND).await.unwrap();
    plain.close(BOUND).await.unwrap();
}

#[tokio::test]
async fn the_topic_limit_is_asked_again_and_a_failed_describe_configs_is_not_kept() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    fake.describe_configs_fails(true);
    let cluster = fake.cluster().await;
    let p = Producer::new(
        cluster,
        ProducerConfig {
            limit_refresh: Duration::from_millis(400),
            limit_retry: Duration::from_millis(200),
            ..Default::default()
        },
    );
    // Unknown: max_request_size holds meanwhile.
    assert_eq!(p.max_batch_bytes(TOPIC).await, 1024 * 1024);
    fake.describe_configs_fails(false);
    fake.max_message_bytes(Some(5_000));
    // Within the retry time the failure is not asked again...
    assert_eq!(p.max_batch_bytes(TOPIC).await, 1024 * 1024);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...after it, the broker's limit is learnt.
    assert_eq!(p.max_batch_bytes(TOPIC).await, 5_000);
    let big = rec("x".repeat(6_000));
    assert!(matches!(
        p.check_size(TOPIC, &big).await,
        Err(ProduceError::TooLarge { max: 5_000, .. })
    ));
    // A lowered limit is seen at the next refresh; a failed refresh keeps the last one.
    fake.max_message_bytes(Some(3_000));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(p.max_batch_bytes(TOPIC).await, 3_000);
    fake.describe_configs_fails(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(p.max_batch_bytes(TOPIC).await, 3_000);
    let asked = fake
        .of(kafka_protocol::messages::ApiKey::DescribeConfigs)
        .len();
    assert!(asked >= 4, "DescribeConfigs asked {asked} times");
}

/// KIP-368 with records flowing: the broker gives 1 s SASL sessions (OAUTHBEARER) and closes
/// a connection used after its session ended. For 3 s of records, pipelined (one record a
/// batch, answers 100 ms late: requests are outstanding nearly all the time), the producer's
/// connection re-authenticates in time and only with nothing outstanding: every record is
/// written once, in order, no Produce request met an expired session, and no batch was sent
/// twice.
#[tokio::test]
async fn records_flow_through_re_authentication_none_lost_or_sent_twice() {
    use kafka_io::{
        OauthMethod, OauthSettings, SaslMechanism, SaslSettings, SecurityProtocol, TokenSource,
    };
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    fake.sasl_session_lifetime(Some(1000));
    fake.produce_answer_delay(Duration::from_millis(100));
    fake.max_message_bytes(Some(400));
    let mut settings = kafka_io::ConnectionSettings::plaintext(&fake.bootstrap()).unwrap();
    settings.security = SecurityProtocol::SaslPlaintext;
    settings.sasl = Some(SaslSettings {
        mechanism: SaslMechanism::OauthBearer,
        username: String::new(),
        password: Default::default(),
        oauth: Some(TokenSource::new(OauthSettings {
            method: OauthMethod::Unsecured {
                principal: "alice".into(),
                lifetime: Duration::from_secs(60),
            },
            extensions: vec![],
        })),
    });
    let mut cluster = kafka_io::Cluster::connect(settings).await.expect("connect");
    std::sync::Arc::get_mut(&mut cluster)
        .expect("sole owner")
        .request_timeout = Duration::from_secs(1);
    let p = Producer::new(
        cluster,
        ProducerConfig {
            linger: Duration::ZERO,
            linger_max: Duration::ZERO,
            idempotent: true,
            max_backoff: Duration::from_millis(200),
            ..Default::default()
        },
    );
    // A window of records always waiting: the writer always has requests outstanding.
    let mut sent = Vec::new();
    let mut waiting = std::collections::VecDeque::new();
    for k in 0..160 {
        let v = format!("r{k:03}{}", "x".repeat(200));
        waiting.push_back(
            p.send(TOPIC, Some(0), rec(v.clone()))
                .await
                .expect("queued"),
        );
        sent.push(v);
        while waiting.len() > 8 || (k == 159 && !waiting.is_empty()) {
            let d = waiting.pop_front().unwrap();
            let r = tokio::time::timeout(BOUND, d.wait())
                .await
                .expect("in time");
            assert!(r.is_ok(), "{r:?}");
        }
    }
    assert!(fake.max_produce_unanswered() >= 2, "pipelined");
    assert_eq!(strings(fake.produced(TOPIC, 0)), sent);
    let expired = fake.expired_requests();
    assert!(
        !expired.contains(&kafka_protocol::messages::ApiKey::Produce),
        "{expired:?}"
    );
    let batches = fake.produce_batches();
    let mut seqs: Vec<i32> = batches.iter().map(|b| b.base_sequence).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), batches.len(), "a batch sent twice: {batches:?}");
    assert!(
        fake.reauthentications() >= 2,
        "{}",
        fake.reauthentications()
    );
    p.close(BOUND).await.unwrap();
}

/// A producer whose batches hold one record each: the topic takes 400 bytes, a record of
/// `values(_, 200)` needs ~310 with its batch.
async fn one_record_batches(fake: &FakeBroker, idempotent: bool) -> Producer {
    fake.max_message_bytes(Some(400));
    let p = producer(fake, idempotent, 0).await;
    assert_eq!(p.max_batch_bytes(TOPIC).await, 400);
    p
}

/// Kafka's `max.in.flight.requests.per.connection=5` with idempotence: while the broker takes
/// its time to answer, five Produce requests of one partition are outstanding on one
/// connection (never more), and every record lands once, in order, with its offset.
#[tokio::test]
async fn idempotent_five_produce_requests_are_outstanding_and_records_land_in_order() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    fake.produce_answer_delay(Duration::from_millis(150));
    let p = one_record_batches(&fake, true).await;
    let vals = values(20, 200);
    let got = send_all(&p, &vals).await;
    assert_eq!(
        fake.max_produce_unanswered(),
        5,
        "Produce requests outstanding at once on one connection"
    );
    assert_eq!(
        strings(fake.produced(TOPIC, 0)),
        vals,
        "every record once, in order"
    );
    let offsets: Vec<i64> = got.into_iter().map(Result::unwrap).collect();
    assert_eq!(offsets, (0..20).collect::<Vec<i64>>());
    let batches = fake.produce_batches();
    assert_eq!(
        batches.len(),
        20,
        "one batch per record, none resent: {batches:?}"
    );
    let seqs: Vec<i32> = batches.iter().map(|b| b.base_sequence).collect();
    assert_eq!(seqs, (0..20).collect::<Vec<i32>>());
    let conns: std::collections::BTreeSet<usize> = fake
        .of(kafka_protocol::messages::ApiKey::Produce)
        .iter()
        .map(|s| s.conn)
        .collect();
    assert_eq!(conns.len(), 1, "one connection: {conns:?}");
    p.close(BOUND).await.unwrap();
}

/// Without idempotence a retried batch could land after a later one: one request at a time.
#[tokio::test]
async fn not_idempotent_one_produce_request_is_outstanding() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    fake.produce_answer_delay(Duration::from_millis(50));
    let p = one_record_batches(&fake, false).await;
    let vals = values(6, 200);
    assert!(send_all(&p, &vals).await.iter().all(Result::is_ok));
    assert_eq!(fake.max_produce_unanswered(), 1);
    assert_eq!(strings(fake.produced(TOPIC, 0)), vals);
    p.close(BOUND).await.unwrap();
}

/// Five batches pipelined; the broker appends the first three and closes the connection on
/// reading the third, before any answer is written. The producer resends all five in order
/// with their sequences: the broker has the first three (DUPLICATE_SEQUENCE_NUMBER, written)
/// and appends the last two, so the log holds every record once, in order, and the producer
/// id is kept.
#[tokio::test]
async fn idempotent_pipelined_batches_cut_off_are_resent_in_order_and_written_once() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    let p = one_record_batches(&fake, true).await;
    assert!(send_all(&p, &["warm-up".to_owned()]).await[0].is_ok());
    fake.produce_answer_delay(Duration::from_millis(300));
    fake.close_at_produce(3);
    let vals = values(5, 200);
    let got = send_all(&p, &vals).await;
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    let mut want = vec!["warm-up".to_owned()];
    want.extend(vals);
    assert_eq!(
        strings(fake.produced(TOPIC, 0)),
        want,
        "every record once, in order"
    );
    let produces = fake.of(kafka_protocol::messages::ApiKey::Produce);
    // The first three went out together on the connection that closed.
    let cut = &produces[1..4];
    assert!(cut.iter().all(|s| s.conn == cut[0].conn), "{produces:?}");
    assert!(fake.max_produce_unanswered() >= 2, "pipelined");
    // Resent from the first unanswered batch on, in order, with the same sequences and id.
    let batches = fake.produce_batches();
    let seqs: Vec<i32> = batches.iter().map(|b| b.base_sequence).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 1, 2, 3, 4, 5], "resent in order");
    assert!(
        batches
            .iter()
            .all(|b| b.producer_id == batches[0].producer_id),
        "{batches:?}"
    );
    // The three written before the cut are known only as duplicates (offset unknown).
    let offsets: Vec<i64> = got.into_iter().map(Result::unwrap).collect();
    assert_eq!(offsets, [-1, -1, -1, 4, 5]);
    p.close(BOUND).await.unwrap();
}

/// Five batches of two records pipelined; the broker refuses the second as too large. The
/// batches after it were refused as out of order (their sequences follow one it never got):
/// the producer reads those answers, splits the refused batch in halves that take its
/// sequences, and resends halves and later batches in order. Every record lands once, in
/// order, and the producer id is kept (no out-of-order answer reached the oldest batch).
#[tokio::test]
async fn a_pipelined_batch_refused_as_too_large_is_split_before_the_later_ones() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    // Two records per batch (~620 bytes), not three.
    fake.max_message_bytes(Some(700));
    let p = producer(&fake, true, 0).await;
    assert!(send_all(&p, &["warm-up".to_owned()]).await[0].is_ok());
    fake.produce_answer_delay(Duration::from_millis(100));
    fake.produce_error_at(2, ResponseError::MessageTooLarge);
    let vals = values(10, 200);
    let got = send_all(&p, &vals).await;
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    let mut want = vec!["warm-up".to_owned()];
    want.extend(vals);
    assert_eq!(
        strings(fake.produced(TOPIC, 0)),
        want,
        "every record once, in order"
    );
    let produces = fake.of(kafka_protocol::messages::ApiKey::Produce);
    let codes: Vec<i16> = produces.iter().map(|s| s.code).collect();
    let too_large = ResponseError::MessageTooLarge.code();
    let out_of_order = ResponseError::OutOfOrderSequenceNumber.code();
    let at = codes.iter().position(|c| *c == too_large).expect("refused");
    assert!(
        codes[at + 1..].contains(&out_of_order),
        "batches after it were outstanding: {codes:?}"
    );
    let inits = fake.of(kafka_protocol::messages::ApiKey::InitProducerId);
    assert_eq!(inits.len(), 1, "producer id kept: {codes:?}");
    // The refused batch's records went in two requests, one each.
    let refused = &produces[at].produced[0];
    assert_eq!(refused.records, 2, "{produces:?}");
    let halves: Vec<i32> = fake
        .produce_batches()
        .iter()
        .filter(|b| b.records == 1)
        .map(|b| b.base_sequence)
        .collect();
    assert!(
        halves
            .windows(2)
            .any(|w| w == [refused.base_sequence, refused.base_sequence + 1]),
        "{halves:?}"
    );
    p.close(BOUND).await.unwrap();
}

/// Five one-record batches pipelined (answers 100 ms late); the broker answers the second with
/// `error`. Checks what both cases share: that record fails naming `name`, every other one is
/// written once, in order.
async fn second_of_five_refused(error: ResponseError, name: &str) -> (FakeBroker, Producer) {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    let p = one_record_batches(&fake, true).await;
    fake.produce_answer_delay(Duration::from_millis(100));
    fake.produce_error_at(2, error);
    let vals = values(5, 200);
    let got = send_all(&p, &vals).await;
    assert!(
        matches!(&got[1], Err(ProduceError::Rejected { why, .. }) if why.contains(name)),
        "{got:?}"
    );
    assert!(
        got.iter().enumerate().all(|(i, r)| i == 1 || r.is_ok()),
        "{got:?}"
    );
    let want: Vec<String> = vals
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(strings(fake.produced(TOPIC, 0)), want);
    (fake, p)
}

/// Five batches pipelined; the broker rejects the second for good (INVALID_RECORD). Its record
/// fails; the later ones (refused as out of order) are resent with their sequences moved down
/// and land once, in order, under the same producer id.
#[tokio::test]
async fn a_pipelined_batch_rejected_for_good_fails_alone_and_the_later_ones_land() {
    let (fake, p) = second_of_five_refused(ResponseError::InvalidRecord, "InvalidRecord").await;
    let inits = fake.of(kafka_protocol::messages::ApiKey::InitProducerId);
    assert_eq!(inits.len(), 1, "producer id kept");
    let seqs: Vec<i32> = fake
        .produce_batches()
        .iter()
        .map(|b| b.base_sequence)
        .collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4, 1, 2, 3], "later batches moved down");
    p.close(BOUND).await.unwrap();
}

/// Sends `v` to `partition` and waits for its delivery.
async fn send_one(p: &Producer, partition: i32, v: &str) -> Result<i64, ProduceError> {
    let d = p
        .send(TOPIC, Some(partition), rec(v.to_owned()))
        .await
        .expect("queued");
    tokio::time::timeout(BOUND, d.wait())
        .await
        .expect("delivered in time")
}

/// The producer id is shared by the partitions. Partition 1 has two batches written under it
/// whose answers are still on their way when partition 0 is told the id is unknown and takes a
/// new one; then partition 1's answers are lost (the connection closes). Partition 1 resends
/// its batches with the producer id and sequences they were sent with, so the broker knows
/// them as duplicates: its log holds each record once. Only with nothing outstanding does
/// partition 1 move to the new id.
#[tokio::test]
async fn another_partitions_new_producer_id_does_not_rewrite_outstanding_batches() {
    let fake = FakeBroker::start(&[(TOPIC, 2)]).await;
    let p = one_record_batches(&fake, true).await;
    let pad = "x".repeat(200);
    assert!(send_one(&p, 0, &format!("warm-0{pad}")).await.is_ok());
    assert!(send_one(&p, 1, &format!("warm-1{pad}")).await.is_ok());
    // Partition 1: two batches appended, their answers held back.
    fake.produce_answer_delay(Duration::from_secs(30));
    let mut ds = Vec::new();
    for v in ["a", "b"] {
        ds.push(
            p.send(TOPIC, Some(1), rec(format!("{v}{pad}")))
                .await
                .expect("queued"),
        );
    }
    let produces = |seen: &[fake_broker::Seen]| {
        seen.iter()
            .filter(|s| s.api == kafka_protocol::messages::ApiKey::Produce)
            .count()
    };
    fake.wait_for(BOUND, |seen| produces(seen) == 4)
        .await
        .expect("both batches read");
    // Partition 0: its producer id is unknown to the broker; it takes a new one.
    fake.produce_answer_delay(Duration::ZERO);
    fake.produce_error_at(1, ResponseError::UnknownProducerId);
    assert!(send_one(&p, 0, &format!("x{pad}")).await.is_ok());
    let inits = fake.of(kafka_protocol::messages::ApiKey::InitProducerId);
    assert_eq!(inits.len(), 2, "partition 0 took a new producer id");
    // Partition 1's answers are lost.
    fake.close_connections();
    for d in ds {
        let r = tokio::time::timeout(BOUND, d.wait())
            .await
            .expect("in time");
        assert!(r.is_ok(), "{r:?}");
    }
    let log = |fake: &FakeBroker| -> Vec<String> {
        strings(fake.produced(TOPIC, 1))
            .iter()
            .map(|v| v.trim_end_matches('x').to_owned())
            .collect()
    };
    assert_eq!(log(&fake), ["warm-1", "a", "b"], "each record once");
    // With nothing outstanding partition 1 takes the new id, its sequences from 0.
    assert!(send_one(&p, 1, &format!("c{pad}")).await.is_ok());
    assert_eq!(log(&fake), ["warm-1", "a", "b", "c"]);
    let batches = fake.produce_batches();
    let last = batches.last().unwrap();
    assert_eq!((last.partition, last.base_sequence), (1, 0), "{batches:?}");
    assert_ne!(last.producer_id, batches[0].producer_id, "{batches:?}");
    p.close(BOUND).await.unwrap();
}

/// While the next batch lingers (the caller signals more records on their way: up to 2 s),
/// the answer to the batch already sent is read: its delivery resolves long before the linger
/// ends, while the next batch is still gathering.
#[tokio::test]
async fn an_answer_is_read_while_the_next_batch_lingers() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    fake.produce_answer_delay(Duration::from_millis(200));
    let mut cluster = fake.cluster().await;
    Arc::get_mut(&mut cluster)
        .expect("sole owner")
        .request_timeout = Duration::from_secs(1);
    let pressure = Arc::new(AtomicUsize::new(0));
    let p = Producer::new(
        cluster,
        ProducerConfig {
            linger: Duration::from_millis(20),
            linger_max: Duration::from_secs(2),
            pressure: Some(pressure.clone()),
            ..Default::default()
        },
    );
    let first = p
        .send(TOPIC, Some(0), rec("first".into()))
        .await
        .expect("queued");
    let produces = |seen: &[fake_broker::Seen]| {
        seen.iter()
            .filter(|s| s.api == kafka_protocol::messages::ApiKey::Produce)
            .count()
    };
    fake.wait_for(BOUND, |seen| produces(seen) == 1)
        .await
        .expect("the first batch sent");
    // More records are coming: the next batch lingers up to 2 s.
    pressure.store(1, Ordering::Relaxed);
    let start = Instant::now();
    let second = p
        .send(TOPIC, Some(0), rec("second".into()))
        .await
        .expect("queued");
    let r = tokio::time::timeout(BOUND, first.wait())
        .await
        .expect("in time");
    let took = start.elapsed();
    assert!(r.is_ok(), "{r:?}");
    assert!(
        took < Duration::from_secs(1),
        "the first delivery waited for the next batch's linger: {took:?}"
    );
    assert_eq!(
        produces(&fake.requests()),
        1,
        "the second batch is still lingering"
    );
    pressure.store(0, Ordering::Relaxed);
    let r = tokio::time::timeout(BOUND, second.wait())
        .await
        .expect("in time");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(strings(fake.produced(TOPIC, 0)), ["first", "second"]);
    p.close(BOUND).await.unwrap();
}

/// The broker appends a batch and yet answers UNKNOWN_SERVER_ERROR: the producer cannot know
/// whether it was written. Its record fails (Rejected); the next batch does not take its
/// sequence (the broker would take it for a duplicate and drop it) but goes out under a new
/// producer id, and lands.
#[tokio::test]
async fn a_batch_failed_with_its_write_unknown_does_not_lend_its_sequence() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    let p = producer(&fake, true, 0).await;
    assert!(send_all(&p, &["first".to_owned()]).await[0].is_ok());
    fake.produce_error_after_append_at(1, ResponseError::UnknownServerError);
    let got = send_all(&p, &["second".to_owned()]).await;
    assert!(
        matches!(&got[0], Err(ProduceError::Rejected { why, .. }) if why.contains("UnknownServerError")),
        "{got:?}"
    );
    let got = send_all(&p, &["third".to_owned()]).await;
    assert!(got[0].is_ok(), "{got:?}");
    assert_eq!(
        strings(fake.produced(TOPIC, 0)),
        ["first", "second", "third"]
    );
    let inits = fake.of(kafka_protocol::messages::ApiKey::InitProducerId);
    assert_eq!(inits.len(), 2, "a new producer id");
    let batches = fake.produce_batches();
    let last = batches.last().unwrap();
    assert_eq!(last.base_sequence, 0, "{batches:?}");
    assert_ne!(last.producer_id, batches[0].producer_id, "{batches:?}");
    p.close(BOUND).await.unwrap();
}

/// Five batches pipelined; the broker answers the second UNKNOWN_SERVER_ERROR (here without
/// writing it, which the producer cannot know). Its record fails; the later ones are not moved
/// down into its sequence: their answers are read (out of order: not written), and they go
/// out again under a new producer id, each landing once, in order.
#[tokio::test]
async fn a_pipelined_batch_failed_with_its_write_unknown_takes_a_new_producer_id() {
    let (fake, p) =
        second_of_five_refused(ResponseError::UnknownServerError, "UnknownServerError").await;
    let inits = fake.of(kafka_protocol::messages::ApiKey::InitProducerId);
    assert_eq!(inits.len(), 2, "a new producer id");
    let batches = fake.produce_batches();
    let first_id = batches[0].producer_id;
    let resent: Vec<i32> = batches
        .iter()
        .filter(|b| b.producer_id != first_id)
        .map(|b| b.base_sequence)
        .collect();
    assert_eq!(resent, [0, 1, 2], "{batches:?}");
    p.close(BOUND).await.unwrap();
}
