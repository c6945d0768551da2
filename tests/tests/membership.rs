//! Group membership end to end with the kafka-infer binary: a KEDA-style scale-out under a
//! steady stream with the cooperative-sticky protocol (partitions that stay put never pause),
//! and a librdkafka member using cooperative-sticky in the same group.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::BufRead,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use bytes::Bytes;
use kafka_infer_tests::{
    Broker, Proc,
    models::{self, KafkaInfer},
    unique, wait_for,
};
use kafka_io::{Cluster, OutRecord, Producer, ProducerConfig};
use serde_json::{Value, json};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

fn args<'a>(url: &'a str, group: &'a str) -> Vec<&'a str> {
    vec![
        "--protocol",
        "v2",
        "--model",
        url,
        "--model-name",
        "m",
        "--session-timeout",
        "3s",
        "--group-id",
        group,
        "--fetch-max-wait",
        "10ms",
    ]
}

fn env(broker: &Broker, input: &str, output: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKER", broker.bootstrap()),
        ("KAFKA_INPUT_TOPIC", input.to_owned()),
        ("KAFKA_OUTPUT_TOPIC", output.to_owned()),
    ]
}

fn owned(ki: &KafkaInfer) -> BTreeSet<i32> {
    ki.owned_partitions()
}

fn request(i: usize) -> Bytes {
    Bytes::from(
        json!({"id": format!("r{i}"), "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [i]}]})
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_1_to_3_under_a_steady_stream_never_pauses_partitions_that_stay_put() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 6)?;
    broker.create_topic(&output, 6)?;
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let a = KafkaInfer::start(&args(&url, &group), &env(&broker, &input, &output))?;
    wait_for(Duration::from_secs(30), "A owns all 6", || {
        (owned(&a).len() == 6).then_some(())
    })?;

    // A steady stream: 300 records/s for 20 s, keyed over the 6 partitions.
    let n = 6000usize;
    let sent: Arc<Mutex<HashMap<usize, i64>>> = Arc::default();
    let producer = {
        let sent = sent.clone();
        let (settings, input) = (broker.settings(), input.clone());
        tokio::spawn(async move {
            let cluster = Cluster::connect(settings).await?;
            let p = Producer::new(cluster, ProducerConfig::default());
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut ds = Vec::new();
            for chunk in (0..n).collect::<Vec<_>>().chunks(3) {
                tick.tick().await;
                for &i in chunk {
                    sent.lock().unwrap().insert(i, now_ms());
                    let r = OutRecord {
                        key: Some(Bytes::from(format!("k{}", i % 60))),
                        value: Some(request(i)),
                        headers: vec![],
                    };
                    ds.push(p.send(&input, None, r).await?);
                }
            }
            for d in ds {
                d.wait().await?;
            }
            p.close(Duration::from_secs(10)).await?;
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    let b = KafkaInfer::start(&args(&url, &group), &env(&broker, &input, &output))?;
    wait_for(Duration::from_secs(30), "B gets partitions", || {
        (!owned(&b).is_empty()).then_some(())
    })?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = KafkaInfer::start(&args(&url, &group), &env(&broker, &input, &output))?;
    wait_for(Duration::from_secs(30), "2 partitions each", || {
        let (x, y, z) = (owned(&a), owned(&b), owned(&c));
        (x.len() == 2 && y.len() == 2 && z.len() == 2).then_some(())
    })?;
    let kept = owned(&a);
    producer.await??;

    // Everything, then whatever came after it (duplicates) within a few seconds more.
    let answers = kafka_infer_tests::read_topic_settled(&broker.bootstrap(), &output, n, 90)?;
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    // Per output partition (= input partition: same key, same count): worst latency.
    let mut worst: BTreeMap<i64, i64> = BTreeMap::new();
    let sent = sent.lock().unwrap().clone();
    for ans in &answers {
        let v: Value = serde_json::from_slice(&ans.value)?;
        let i: usize = v["id"].as_str().unwrap_or("r?")[1..].parse()?;
        *seen.entry(i).or_default() += 1;
        let latency = ans.ts - sent[&i];
        let w = worst.entry(ans.partition).or_default();
        *w = (*w).max(latency);
    }
    eprintln!("worst answer latency per partition (ms): {worst:?}; A kept {kept:?}");
    assert_eq!(seen.len(), n, "0 lost");
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "0 duplicates: {twice:?}");
    for p in &kept {
        let w = worst[&i64::from(*p)];
        assert!(
            w < 1000,
            "partition {p} stayed with A through two rebalances but paused: worst latency {w} ms"
        );
    }
    Ok(())
}

/// A librdkafka member (tests/py/group_member.py) and what it owns, as it prints it.
fn librdkafka_member(
    bootstrap: &str,
    group: &str,
    topic: &str,
    strategy: &str,
) -> Result<(Proc, Arc<Mutex<BTreeSet<i32>>>)> {
    let mut cmd = std::process::Command::new(kafka_infer_tests::python());
    cmd.arg(kafka_infer_tests::repo_root().join("tests/py/group_member.py"))
        .args([bootstrap, group, topic, "3000", "120", strategy])
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null());
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().expect("piped");
    let owned: Arc<Mutex<BTreeSet<i32>>> = Arc::default();
    let o = owned.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let ps = v["partitions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_i64)
                    .map(|p| p as i32)
                    .collect();
                *o.lock().unwrap() = ps;
            }
        }
    });
    Ok((Proc::from_child("librdkafka member", child), owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_librdkafka_member_with_cooperative_sticky_shares_the_group() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 6)?;
    broker.create_topic(&output, 6)?;
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let a = KafkaInfer::start(&args(&url, &group), &env(&broker, &input, &output))?;
    wait_for(Duration::from_secs(30), "A owns all 6", || {
        (owned(&a).len() == 6).then_some(())
    })?;
    let (_rd, rd_owned) =
        librdkafka_member(&broker.bootstrap(), &group, &input, "cooperative-sticky")?;
    let start = Instant::now();
    let (x, y) = wait_for(Duration::from_secs(40), "3 and 3, disjoint", || {
        let (x, y) = (owned(&a), rd_owned.lock().unwrap().clone());
        (x.len() == 3 && y.len() == 3 && x.is_disjoint(&y)).then_some((x, y))
    })?;
    eprintln!(
        "kafka-infer {x:?}, librdkafka {y:?} after {:?}",
        start.elapsed()
    );
    // Stable: a few seconds later, still the same split (no rebalance storm).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(owned(&a), x, "kafka-infer's share is stable");
    assert_eq!(*rd_owned.lock().unwrap(), y, "librdkafka's share is stable");
    Ok(())
}
