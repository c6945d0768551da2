//! `--exactly-once` end to end on the test broker (tansu): kafka-infer is killed with SIGKILL
//! (or stopped with SIGTERM, which aborts the open window) in the middle of the stream, again
//! and again (with the same transactional id, as a replica that restarts), then runs to the end. The output is read with kafka-io's read_committed
//! reader ([`kafka_io::fetch::PartitionFetcher`]), which drops the records of aborted
//! transactions by their ABORT markers (tansu lists no aborted transactions in Fetch, so a
//! reader that trusts the broker's list, librdkafka included, sees them). Each input must be
//! answered exactly once, and transactions must have been aborted on the way (the test would
//! pass trivially otherwise).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use bytes::Bytes;
use kafka_infer_tests::{
    Broker, free_port, kafka_env,
    models::{self, KafkaInfer},
    unique, wait_for,
};
use kafka_io::{OutRecord, conn::Connector, fetch::PartitionFetcher};
use serde_json::{Value, json};

const PARTITIONS: i32 = 2;
/// The rebalance test's partition count.
const PARTITIONS_4: i32 = 4;

fn request(id: &str) -> Bytes {
    Bytes::from(
        json!({"id": id, "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [7]}]})
            .to_string(),
    )
}

/// Inputs `r{i}` for `range`, keyed over 16 keys.
fn keyed_inputs(range: std::ops::Range<usize>) -> Vec<OutRecord> {
    range
        .map(|i| OutRecord {
            key: Some(Bytes::from(format!("k{}", i % 16))),
            value: Some(request(&format!("r{i}"))),
            headers: vec![],
        })
        .collect()
}

/// kafka-infer with `--exactly-once` (50 ms windows, transactional id `txn_id`) in front of
/// the model `m` at `url`, with `max_in_flight` calls per partition (low: slow enough to be
/// stopped or fenced mid-stream).
fn start_eos(
    url: &str,
    group: &str,
    txn_id: &str,
    max_in_flight: &str,
    env: &[(&str, String)],
) -> Result<KafkaInfer> {
    KafkaInfer::start(
        &[
            "--protocol",
            "v2",
            "--model",
            url,
            "--model-name",
            "m",
            "--group-id",
            group,
            "--session-timeout",
            "2s",
            "--exactly-once",
            "--transaction-window",
            "50ms",
            "--transactional-id",
            txn_id,
            "--max-in-flight",
            max_in_flight,
        ],
        env,
    )
}

fn ok_count(ki: &KafkaInfer) -> f64 {
    ki.metric("kafka_infer_records_total{result=\"ok\"}")
        .unwrap_or(0.0)
}

fn committed_txns(ki: &KafkaInfer) -> f64 {
    ki.metric("kafka_infer_transactions_total{result=\"committed\"}")
        .unwrap_or(0.0)
}

/// Every partition of `topic` read with read_committed from offset 0 until each position
/// reaches its high watermark (bounded in calls and time): the answers' ids, and how many
/// records the log holds in all (aborted ones and markers included: the high watermarks).
async fn read_committed(
    settings: kafka_io::ConnectionSettings,
    topic: &str,
) -> Result<(Vec<String>, i64)> {
    read_committed_n(settings, topic, PARTITIONS).await
}

async fn read_committed_n(
    settings: kafka_io::ConnectionSettings,
    topic: &str,
    partitions: i32,
) -> Result<(Vec<String>, i64)> {
    let connector = Connector::new(Arc::new(settings))?;
    let mut ids = Vec::new();
    let mut log_size = 0;
    for p in 0..partitions {
        let mut f = PartitionFetcher::new(
            connector.clone(),
            topic.to_owned(),
            p,
            Duration::from_secs(5),
        );
        let mut offset = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        for _ in 0..2000 {
            ensure!(
                Instant::now() < deadline,
                "partition {p} not read within 30 s"
            );
            // One response covers whole transactions (read_committed stops at the LSO), so
            // an ABORT marker comes with the records it aborts.
            let got = f.fetch(offset, Duration::from_millis(20), 64 << 20).await?;
            for r in &got.records {
                let v: Value = serde_json::from_slice(r.value.as_deref().unwrap_or_default())?;
                match v["id"].as_str() {
                    Some(id) => ids.push(id.to_owned()),
                    None => bail!("an output record without an id: {v}"),
                }
            }
            offset = got.next_offset;
            if offset >= got.high_watermark {
                log_size += got.high_watermark;
                break;
            }
        }
    }
    Ok((ids, log_size))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_under_kill_9_loops_answers_each_input_once_for_read_committed() -> Result<()>
{
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, PARTITIONS as u32)?;
    broker.create_topic(&output, PARTITIONS as u32)?;
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let txn_id = unique("eos");
    let n = 3000usize;
    kafka_infer_tests::produce_all(broker.settings(), &input, keyed_inputs(0..n)).await?;
    let env = kafka_env(&broker, &input, &output);
    // Kill -9 loops: each run answers some records, some windows commit, then SIGKILL (an
    // open window is left behind; the next run's InitProducerId aborts it) or SIGTERM.
    let mut stopped = 0;
    for round in 0..4 {
        // 2 calls per partition: slow enough to be killed mid-stream several times.
        let mut ki = start_eos(&url, &group, &txn_id, "2", &env)?;
        let (target_txns, target_ok) = (3.0, 150.0 * (round + 1) as f64);
        let reached = wait_for(Duration::from_secs(60), "answers and commits", || {
            (committed_txns(&ki) >= target_txns && ok_count(&ki) >= target_ok)
                .then(|| ok_count(&ki))
        });
        // Stop a little after a commit, in the middle of the next window: SIGKILL, or SIGTERM
        // (which aborts the open window and exits 0).
        tokio::time::sleep(Duration::from_millis(30 + 17 * round as u64)).await;
        let sig = if round % 2 == 0 { "KILL" } else { "TERM" };
        ki.proc.signal(sig)?;
        let exit = ki.proc.wait_exit(Duration::from_secs(20))?;
        let answered = reached?;
        eprintln!("round {round}: SIG{sig} after {answered} answers queued, exit {exit:?}");
        if sig == "TERM" {
            assert_eq!(exit, Some(0), "SIGTERM exits cleanly");
        }
        stopped += 1;
    }
    // The last run goes to the end.
    let ki = start_eos(&url, &group, &txn_id, "2", &env)?;
    let start = Instant::now();
    let mut ids = Vec::new();
    let mut log_size = 0;
    while start.elapsed() < Duration::from_secs(120) {
        let (got, size) = read_committed(broker.settings(), &output).await?;
        ids = got;
        log_size = size;
        if ids.len() >= n {
            // Settle: a second read after more windows must not grow.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (again, size) = read_committed(broker.settings(), &output).await?;
            ids = again;
            log_size = size;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let missing = (0..n)
        .filter(|i| !counts.contains_key(format!("r{i}").as_str()))
        .count();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let committed = committed_txns(&ki);
    eprintln!(
        "{stopped} stops; read_committed: {} answers, {duplicates} duplicates, {missing} missing; \
         the log holds {log_size} offsets (aborted answers and markers included); last run \
         committed {committed} transactions",
        ids.len()
    );
    assert_eq!(missing, 0, "inputs not answered");
    assert_eq!(duplicates, 0, "inputs answered more than once");
    // librdkafka on tansu gets the aborted answers too (tansu lists no aborted transactions):
    // the killed runs' open windows left answers for the reader to drop.
    let raw = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, n + n / 2, 10)?;
    let raw_ids: std::collections::BTreeSet<String> = raw
        .iter()
        .filter_map(|a| serde_json::from_slice::<Value>(&a.value).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    eprintln!(
        "librdkafka (the broker's empty aborted list): {} answers, {} distinct",
        raw.len(),
        raw_ids.len()
    );
    assert_eq!(raw_ids.len(), n, "librdkafka reads every input's answer");
    assert!(
        raw.len() > n,
        "no aborted answer in the log ({} records): the kills did not test anything",
        raw.len()
    );
    Ok(())
}

/// Reads the output with kafka-io's read_committed reader until `n` answers came (then once
/// more after 2 s), within 120 s: (answers per id, missing, duplicates).
async fn settle(
    settings: kafka_io::ConnectionSettings,
    topic: &str,
    partitions: i32,
    n: usize,
) -> Result<(BTreeMap<String, usize>, usize, usize)> {
    let start = Instant::now();
    let mut ids = Vec::new();
    while start.elapsed() < Duration::from_secs(120) {
        ids = read_committed_n(settings.clone(), topic, partitions)
            .await?
            .0;
        if ids.len() >= n {
            tokio::time::sleep(Duration::from_secs(2)).await;
            ids = read_committed_n(settings.clone(), topic, partitions)
                .await?
                .0;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for id in ids {
        *counts.entry(id).or_default() += 1;
    }
    let missing = (0..n)
        .filter(|i| !counts.contains_key(&format!("r{i}")))
        .count();
    let duplicates = counts.values().map(|c| c - 1).sum();
    Ok((counts, missing, duplicates))
}

/// Two replicas (each its own transactional id) through rebalances: B joins, A is killed
/// and restarts with its id (its dangling transaction aborted), B stops with SIGTERM. Keyless
/// inputs: each output partition has one writer at a time (tansu defers a commit while another
/// producer's transaction is open on the same partition: docs/notes-transactions.md (3)).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_two_replicas_through_rebalances_answer_each_input_once() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, PARTITIONS_4 as u32)?;
    broker.create_topic(&output, PARTITIONS_4 as u32)?;
    // 10 ms an answer, one call at a time per partition: the stream lasts through the events.
    let model = models::test_model_on(
        "v2",
        "m",
        "echo",
        10,
        (
            kafka_infer_tests::free_port(),
            kafka_infer_tests::free_port(),
        ),
    )?;
    let url = model.rest_url();
    let n = 3000usize;
    let recs: Vec<OutRecord> = (0..n)
        .map(|i| OutRecord {
            key: None,
            value: Some(request(&format!("r{i}"))),
            headers: vec![],
        })
        .collect();
    // Keyless: spread over the input partitions by the test (round robin), answers go to the
    // same-numbered output partition.
    let mut by_partition: Vec<Vec<OutRecord>> = vec![Vec::new(); PARTITIONS_4 as usize];
    for (i, r) in recs.into_iter().enumerate() {
        by_partition[i % PARTITIONS_4 as usize].push(r);
    }
    let settings = broker.settings();
    let cluster = kafka_io::Cluster::connect(settings.clone()).await?;
    let producer = kafka_io::Producer::new(cluster, kafka_io::ProducerConfig::default());
    let mut ds = Vec::new();
    for (p, rs) in by_partition.into_iter().enumerate() {
        for r in rs {
            ds.push(producer.send(&input, Some(p as i32), r).await?);
        }
    }
    for d in ds {
        ensure!(d.wait().await.is_ok(), "input written");
    }
    producer.close(Duration::from_secs(10)).await?;
    let env = kafka_env(&broker, &input, &output);
    let (id_a, id_b) = (unique("eos-a"), unique("eos-b"));
    let start = |id: &str| start_eos(&url, &group, id, "1", &env);
    let progress = |ki: &KafkaInfer, at_least: f64, what: &str| -> Result<f64> {
        wait_for(Duration::from_secs(60), what, || {
            let c = ok_count(ki);
            (c >= at_least && committed_txns(ki) >= 2.0).then_some(c)
        })
    };
    let mut a = start(&id_a)?;
    progress(&a, 300.0, "A answers")?;
    let mut b = start(&id_b)?;
    // B gets partitions (a rebalance: A aborts its window, both rejoin).
    progress(&b, 200.0, "B answers after the rebalance")?;
    a.proc.signal("KILL")?;
    let _ = a.proc.wait_exit(Duration::from_secs(10));
    // A restarts with its transactional id (its open window is aborted at its first
    // transaction) and joins again: another rebalance.
    let a2 = start(&id_a)?;
    progress(&a2, 200.0, "A (restarted) answers")?;
    let b_answered = ok_count(&b);
    b.proc.signal("TERM")?;
    let exit = b.proc.wait_exit(Duration::from_secs(30))?;
    assert_eq!(exit, Some(0), "B stops cleanly on SIGTERM");
    let a2_before = ok_count(&a2);
    let (counts, missing, duplicates) = settle(broker.settings(), &output, PARTITIONS_4, n).await?;
    let aborted = a2
        .metric("kafka_infer_transactions_total{result=\"aborted\"}")
        .unwrap_or(0.0);
    let a2_after = ok_count(&a2);
    eprintln!(
        "two replicas: read_committed {} distinct answers, {duplicates} duplicates, {missing} missing; \
         B answered {b_answered} before its SIGTERM; the restarted A answered {a2_before} before it \
         and {a2_after} in all, aborted {aborted} windows",
        counts.len()
    );
    assert!(
        a2_after > a2_before,
        "the restarted A took B's partitions over after B left"
    );
    assert_eq!(missing, 0, "inputs not answered");
    assert_eq!(duplicates, 0, "inputs answered more than once");
    Ok(())
}

fn aborted_txns(ki: &KafkaInfer) -> f64 {
    ki.metric("kafka_infer_transactions_total{result=\"aborted\"}")
        .unwrap_or(0.0)
}

/// A zombie's fate, seen from the zombie: another producer (librdkafka) takes kafka-infer's
/// transactional id (InitProducerId bumps the epoch and aborts the open transaction), so
/// kafka-infer's next AddPartitionsToTxn, Produce or EndTxn is refused as fenced. kafka-infer
/// must abort that window, give its partitions up, rejoin with a new producer epoch and go on:
/// fenced mid-stream, then again while idle (noticed at the next input), it stays up and every
/// input is answered exactly once for read_committed readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_aborts_rejoins_and_answers_each_input_once() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, PARTITIONS as u32)?;
    broker.create_topic(&output, PARTITIONS as u32)?;
    // 20 ms per answer, one at a time per partition: ~100 answers/s, so the stream is still
    // running seconds after the fence (a busy machine can take a second or two to run it).
    let model = models::test_model_on("v2", "m", "echo", 20, (free_port(), free_port()))?;
    let url = model.rest_url();
    let txn_id = unique("eos-fenced");
    let half = 800usize;
    kafka_infer_tests::produce_all(broker.settings(), &input, keyed_inputs(0..half)).await?;
    let env = kafka_env(&broker, &input, &output);
    // One call at a time per partition: slow enough to be fenced mid-stream.
    let mut ki = start_eos(&url, &group, &txn_id, "1", &env)?;
    let fence = |ki: &KafkaInfer, what: &str| -> Result<()> {
        let aborted = aborted_txns(ki);
        let out = kafka_infer_tests::py("fence.py", &[&broker.bootstrap(), &txn_id])?;
        ensure!(out.trim() == "fenced", "fence.py: {out}");
        eprintln!(
            "fenced {what}: {} answers, {} committed, {aborted} aborted transactions so far",
            ok_count(ki),
            committed_txns(ki)
        );
        Ok(())
    };
    let aborted_after = |ki: &KafkaInfer, before: f64| -> Result<()> {
        wait_for(Duration::from_secs(30), "the fenced window aborted", || {
            (aborted_txns(ki) > before).then_some(())
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", ki.output()))
    };
    // Mid-stream.
    wait_for(Duration::from_secs(60), "answers and commits", || {
        (committed_txns(&ki) >= 3.0 && ok_count(&ki) >= 150.0).then_some(())
    })?;
    let before = aborted_txns(&ki);
    fence(&ki, "mid-stream")?;
    ensure!(
        ok_count(&ki) < half as f64,
        "the stream ended before the fence: not a mid-stream case"
    );
    aborted_after(&ki, before)?;
    // While idle: noticed with the next inputs.
    let (_, missing, _) = settle(broker.settings(), &output, PARTITIONS, half).await?;
    ensure!(
        missing == 0,
        "{missing} of the first {half} inputs not answered"
    );
    let before = aborted_txns(&ki);
    fence(&ki, "while idle")?;
    kafka_infer_tests::produce_all(broker.settings(), &input, keyed_inputs(half..2 * half)).await?;
    aborted_after(&ki, before)?;

    let n = 2 * half;
    let (counts, missing, duplicates) = settle(broker.settings(), &output, PARTITIONS, n).await?;
    eprintln!(
        "read_committed: {} distinct answers, {duplicates} duplicates, {missing} missing; \
         {} committed and {} aborted transactions",
        counts.len(),
        committed_txns(&ki),
        aborted_txns(&ki)
    );
    ensure!(
        ki.proc.is_running_shared(),
        "kafka-infer stopped after being fenced:\n{}",
        ki.output()
    );
    assert_eq!(missing, 0, "inputs not answered");
    assert_eq!(duplicates, 0, "inputs answered more than once");
    let log = ki.output();
    assert!(
        log.contains("taken by a newer producer"),
        "the log says the producer was fenced:\n{log}"
    );
    ki.proc.signal("TERM")?;
    assert_eq!(ki.proc.wait_exit(Duration::from_secs(20))?, Some(0));
    Ok(())
}
