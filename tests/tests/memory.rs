//! Memory bounded by bytes whatever the data, end to end with the kafka-infer binary and its
//! default fetch buffer (32 MiB): the peak RSS (VmHWM) stays within the manifest's limit
//! (deploy/kafka-infer.yaml, 128 Mi) while every input record ends as exactly one answer or
//! error record.
//!
//! - One zstd batch of 1,000,000 empty records made by librdkafka (~8 MB of records once
//!   decompressed, ~100 MB once decoded into records): handed out in slices of the partition's
//!   share.
//! - A backlog waiting before start, 8 partitions x ~16 MB of ~64 KB JSON requests, with
//!   batching off and on: each partition holds at most its share.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use kafka_infer_tests::{
    Broker, committed_sum,
    models::{self, KafkaInfer},
    py, unique, wait_for,
};
use kafka_io::{OutRecord, fetch::PartitionFetcher};
use serde_json::{Value, json};

/// deploy/kafka-infer.yaml: `limits: {memory: 128Mi}`.
const MANIFEST_LIMIT_KIB: u64 = 128 * 1024;

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?)
}

/// The manifest's memory limit of the kafka-infer container, read from
/// deploy/kafka-infer.yaml (so the test follows it).
fn manifest_limit_kib() -> Result<u64> {
    let y =
        std::fs::read_to_string(kafka_infer_tests::repo_root().join("deploy/kafka-infer.yaml"))?;
    for doc in y.split("\n---") {
        let v: serde_norway::Value = serde_norway::from_str(doc)?;
        if v["kind"].as_str() != Some("Deployment") {
            continue;
        }
        let containers = v["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .context("containers")?;
        let ki = containers
            .iter()
            .find(|c| c["name"].as_str() == Some("kafka-infer"))
            .context("no kafka-infer container")?;
        let m = ki["resources"]["limits"]["memory"]
            .as_str()
            .context("no memory limit for kafka-infer in deploy/kafka-infer.yaml")?;
        return Ok(if let Some(g) = m.strip_suffix("Gi") {
            g.parse::<u64>()? << 20
        } else {
            m.strip_suffix("Mi")
                .context("a limit in Mi or Gi")?
                .parse::<u64>()?
                << 10
        });
    }
    anyhow::bail!("no Deployment in deploy/kafka-infer.yaml")
}

/// Records in `topic`'s partitions (their high watermarks, from Fetch: tansu's ListOffsets is
/// wrong after multi-record batches).
async fn records_in(broker: &Broker, topic: &str, partitions: i32) -> Result<i64> {
    let connector = kafka_io::conn::Connector::new(std::sync::Arc::new(broker.settings()))?;
    let mut n = 0;
    for p in 0..partitions {
        let mut f = PartitionFetcher::new(
            connector.clone(),
            topic.to_owned(),
            p,
            Duration::from_secs(10),
        );
        n += f
            .fetch(0, Duration::from_millis(10), 1024)
            .await?
            .high_watermark;
    }
    Ok(n)
}

fn env(broker: &Broker, input: &str, output: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKER", broker.bootstrap()),
        ("KAFKA_INPUT_TOPIC", input.to_owned()),
        ("KAFKA_OUTPUT_TOPIC", output.to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_empty_records_in_one_zstd_batch_stay_within_the_manifest() -> Result<()> {
    let limit = manifest_limit_kib()?;
    assert_eq!(limit, MANIFEST_LIMIT_KIB);
    let broker = Broker::start()?;
    let (input, output, group) = (unique("tiny"), unique("tiny-out"), unique("g"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let n = 1_000_000i64;
    let made: Value = serde_json::from_str(&py(
        "produce_tiny_batch.py",
        &[&broker.bootstrap(), &input, "0", &n.to_string()],
    )?)?;
    eprintln!("librdkafka: {made}");
    // librdkafka's statistics: one batch of all of them.
    assert_eq!(made["largest"].as_i64(), Some(n), "one batch: {made}");
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let mut ki = KafkaInfer::start(
        &[
            "--protocol",
            "v2",
            "--model",
            &url,
            "--model-name",
            "m",
            "--group-id",
            &group,
            "--session-timeout",
            "6s",
        ],
        &env(&broker, &input, &output),
    )?;
    let pid = ki.proc.pid();
    let settled = wait_for(Duration::from_secs(300), "every record committed", || {
        (committed_sum(&broker.bootstrap(), &group, &input) >= n).then_some(())
    });
    let peak = peak_rss_kib(pid)?;
    let stalled = ki.metric("kafka_infer_stalled_partitions").unwrap_or(-1.0);
    ki.proc.signal("TERM")?;
    let _ = ki.proc.wait_exit(Duration::from_secs(30));
    settled?;
    eprintln!("peak RSS {} MiB for {n} records", peak / 1024);
    let written = records_in(&broker, &output, 1).await?;
    assert_eq!(
        written, n,
        "one error record (empty value) per input record"
    );
    assert_eq!(stalled, 0.0, "no partition stalled");
    // A million failed records log a few lines and a summary per 10 s, not a line each (a
    // line each was 190 MB).
    let log_bytes = std::fs::metadata(&ki.stdout_path)?.len();
    eprintln!("log: {log_bytes} bytes for {n} error records");
    assert!(log_bytes < 1 << 20, "log of {log_bytes} bytes");
    if peak > limit {
        bail!("peak RSS {peak} KiB above the manifest's {limit} KiB");
    }
    Ok(())
}

/// A v2 request of about `bytes` bytes of JSON (FP32 values), id `r<i>`.
fn big_request(i: usize, bytes: usize) -> Bytes {
    let n = bytes / 9;
    let data: Vec<f64> = (0..n).map(|k| ((i + k) % 1000) as f64 + 0.125).collect();
    Bytes::from(
        json!({"id": format!("r{i}"), "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, n], "data": data}]})
            .to_string(),
    )
}

async fn backlog(batching: bool) -> Result<()> {
    let limit = manifest_limit_kib()?;
    let broker = Broker::start()?;
    let (input, output, group) = (unique("big"), unique("big-out"), unique("g"));
    let partitions = 8;
    broker.create_topic(&input, partitions as u32)?;
    broker.create_topic(&output, partitions as u32)?;
    // 8 x 256 records of ~64 KB: ~16 MB a partition, ~128 MB waiting before start.
    let per = 256usize;
    let total = per * partitions as usize;
    let mut records = Vec::with_capacity(total);
    for i in 0..total {
        records.push(OutRecord {
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(big_request(i, 64 << 10)),
            headers: vec![],
        });
    }
    kafka_infer_tests::produce_all(broker.settings(), &input, records).await?;
    let in_log = records_in(&broker, &input, partitions).await?;
    assert_eq!(in_log, total as i64);
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let mut args = vec![
        "--protocol",
        "v2",
        "--model",
        &url,
        "--model-name",
        "m",
        "--group-id",
        &group,
        "--session-timeout",
        "6s",
        "--max-request-size",
        "4194304",
    ];
    if batching {
        args.extend(["--batch-size", "8"]);
    }
    let mut ki = KafkaInfer::start(&args, &env(&broker, &input, &output))?;
    let pid = ki.proc.pid();
    let mut held_peak = 0f64;
    let settled = wait_for(Duration::from_secs(300), "every record committed", || {
        let held = ki.metric("kafka_infer_fetch_buffer_bytes").unwrap_or(0.0);
        held_peak = held_peak.max(held);
        (committed_sum(&broker.bootstrap(), &group, &input) >= total as i64).then_some(())
    });
    let peak = peak_rss_kib(pid)?;
    eprintln!(
        "fetch buffer held at most {:.1} MiB (sampled)",
        held_peak / 1048576.0
    );
    let errors = ki.metric("kafka_infer_records_total{result=\"error\"}");
    let ok = ki.metric("kafka_infer_records_total{result=\"ok\"}");
    let batches = ki.metric("kafka_infer_batch_size_count");
    ki.proc.signal("TERM")?;
    let _ = ki.proc.wait_exit(Duration::from_secs(30));
    settled?;
    eprintln!(
        "batching {batching}: peak RSS {} MiB for {total} records of 64 KB; ok {ok:?}, errors {errors:?}, batches {batches:?}",
        peak / 1024
    );
    assert_eq!(ok, Some(total as f64), "every record answered");
    let written = records_in(&broker, &output, partitions).await?;
    assert_eq!(written, total as i64, "exactly one answer each");
    if batching {
        assert!(
            batches.is_some_and(|b| b < total as f64),
            "records were batched: {batches:?} model requests"
        );
    }
    if peak > limit {
        bail!("peak RSS {peak} KiB above the manifest's {limit} KiB");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_64kb_requests_stays_within_the_manifest() -> Result<()> {
    backlog(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_64kb_requests_batched_stays_within_the_manifest() -> Result<()> {
    backlog(true).await
}
