//! Idempotent producing against the test broker (tansu checks sequence numbers), through the
//! fault proxy losing Produce responses: the broker appends a batch, the connection closes
//! before the response arrives, and kafka-io's producer resends the batch. With idempotence on
//! (the default) the broker recognises the resent batch (DUPLICATE_SEQUENCE_NUMBER) and every
//! record is in the topic exactly once; with it off the resent batches are written again.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Result, ensure};
use bytes::Bytes;
use kafka_infer_tests::{proxy::ProxiedBroker, unique};
use kafka_io::{
    Cluster, Consumer, ConsumerConfig, GroupConfig, OutRecord, Producer, ProducerConfig,
};
use tokio::time::{Instant, timeout};

const RECORDS: usize = 3_000;
const WAVE: usize = 20;
const PARTITIONS: u32 = 2;
/// Every 7th Produce response is lost, 25 times (the measurement).
const CUT_EVERY: u64 = 7;
const CUTS: u64 = 25;

fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// Produces RECORDS records in waves (many Produce requests) while responses are lost, then
/// reads the topic back: (times each value was read, responses lost).
async fn produce_losing_responses(idempotent: bool) -> Result<(BTreeMap<String, usize>, u64)> {
    init_log();
    let pb = ProxiedBroker::start()?;
    let topic = unique("idem");
    pb.create_topic(&topic, PARTITIONS)?;
    let cluster = Cluster::connect(pb.settings()).await?;
    let producer = Producer::new(
        cluster.clone(),
        ProducerConfig {
            linger: Duration::ZERO,
            linger_max: Duration::ZERO,
            idempotent,
            max_backoff: Duration::from_millis(200),
            ..Default::default()
        },
    );
    pb.proxy.cut_responses(0, CUT_EVERY, CUTS);
    for wave in 0..RECORDS / WAVE {
        let mut ds = Vec::new();
        for i in wave * WAVE..(wave + 1) * WAVE {
            let r = OutRecord {
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(format!("v{i}"))),
                headers: vec![],
            };
            ds.push(producer.send(&topic, None, r).await?);
        }
        for d in ds {
            let r = timeout(Duration::from_secs(30), d.wait()).await?;
            ensure!(r.is_ok(), "delivery failed: {r:?}");
        }
    }
    producer.close(Duration::from_secs(10)).await?;
    let cuts = pb.proxy.cuts();

    let mut g = GroupConfig::new(unique("g"), vec![topic.clone()]);
    g.session_timeout = Duration::from_secs(4);
    g.heartbeat_interval = Duration::from_millis(500);
    g.rebalance_timeout = Duration::from_secs(4);
    let mut cfg = ConsumerConfig::new(g);
    cfg.fetch_max_wait = Duration::from_millis(20);
    let mut c = Consumer::start(cluster, cfg, None);
    let acker = c.acker();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0usize;
    // Read until every record came and nothing more arrives for a second (bounded: 60 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let wait = if total >= RECORDS {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        match timeout(wait, c.recv()).await {
            Ok(Some(batch)) => {
                for r in &batch.records {
                    let v = String::from_utf8(r.value.clone().unwrap_or_default().to_vec())?;
                    *seen.entry(v).or_default() += 1;
                    total += 1;
                    acker.complete(&batch.token(r.offset));
                }
            }
            Ok(None) => break,
            Err(_) if total >= RECORDS => break,
            Err(_) => {}
        }
    }
    c.close().await;
    Ok((seen, cuts))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producer_writes_every_record_once_when_produce_responses_are_lost() -> Result<()>
{
    let (seen, cuts) = produce_losing_responses(true).await?;
    ensure!(cuts >= 10, "the proxy lost only {cuts} responses");
    let missing = (0..RECORDS)
        .filter(|i| !seen.contains_key(&format!("v{i}")))
        .count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("idempotent: {cuts} responses lost, {duplicates} duplicates, {missing} missing");
    assert_eq!(missing, 0, "records missing");
    assert_eq!(
        duplicates, 0,
        "records written twice ({cuts} responses lost)"
    );
    assert_eq!(seen.len(), RECORDS);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_idempotence_lost_produce_responses_write_records_twice() -> Result<()> {
    let (seen, cuts) = produce_losing_responses(false).await?;
    ensure!(cuts >= 10, "the proxy lost only {cuts} responses");
    let missing = (0..RECORDS)
        .filter(|i| !seen.contains_key(&format!("v{i}")))
        .count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("not idempotent: {cuts} responses lost, {duplicates} duplicates, {missing} missing");
    assert_eq!(missing, 0, "records missing");
    assert!(
        duplicates > 0,
        "{cuts} lost responses and no duplicate: the test cannot tell idempotence apart"
    );
    Ok(())
}
