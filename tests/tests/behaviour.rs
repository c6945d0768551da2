//! kafka-infer's promises, checked end to end: exactly-once answers across replicas in normal
//! operation, nothing lost through a model outage, one error record per poison record, a clean
//! SIGTERM, lag that reaches 0.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::Result;
use bytes::Bytes;
use kafka_infer_tests::{
    Answer, Broker, free_port,
    models::{self, KafkaInfer},
    unique, wait_for,
};
use kafka_io::{Cluster, OutRecord};
use serde_json::{Value, json};

/// A record to produce: key, headers, value.
type Rec = (String, Vec<(String, Bytes)>, Bytes);

fn request(i: usize) -> Bytes {
    Bytes::from(json!({"id": format!("r{i}"), "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [i]}]}).to_string())
}

async fn produce(broker: &Broker, topic: &str, records: Vec<Rec>) -> Result<()> {
    let records = records
        .into_iter()
        .map(|(key, headers, value)| OutRecord {
            key: Some(Bytes::from(key)),
            value: Some(value),
            headers,
        })
        .collect();
    kafka_infer_tests::produce_all(broker.settings(), topic, records).await
}

fn requests(range: std::ops::Range<usize>) -> Vec<Rec> {
    range
        .map(|i| (format!("k{}", i % 50), vec![], request(i)))
        .collect()
}

fn id_of(a: &Answer) -> usize {
    let v: Value = serde_json::from_slice(&a.value)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&a.value)));
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {v}"))
        .trim_start_matches('r')
        .parse()
        .unwrap()
}

/// Counts answers per request id.
fn tally(answers: &[Answer]) -> BTreeMap<usize, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        *t.entry(id_of(a)).or_default() += 1;
    }
    t
}

fn committed_sum(broker: &Broker, group: &str, topic: &str) -> i64 {
    kafka_infer_tests::committed_sum(&broker.bootstrap(), group, topic)
}

fn v2_args<'a>(url: &'a str, group: &'a str) -> Vec<&'a str> {
    vec![
        "--protocol",
        "v2",
        "--model",
        url,
        "--model-name",
        "m",
        "--session-timeout",
        "4s",
        "--group-id",
        group,
    ]
}

fn topics_env(broker: &Broker, input: &str, output: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKER", broker.bootstrap()),
        ("KAFKA_INPUT_TOPIC", input.to_owned()),
        ("KAFKA_OUTPUT_TOPIC", output.to_owned()),
    ]
}

/// Partitions a replica reports lag for (= its assignment).
fn lag_partitions(ki: &KafkaInfer) -> usize {
    ki.owned_partitions().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_answer_5000_requests_exactly_once_and_commit_to_the_end() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 4)?;
    broker.create_topic(&output, 4)?;
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let env = topics_env(&broker, &input, &output);
    let a = KafkaInfer::start(&v2_args(&url, &group), &env)?;
    let b = KafkaInfer::start(&v2_args(&url, &group), &env)?;
    // Both replicas own partitions before the stream starts.
    wait_for(
        Duration::from_secs(40),
        "4 partitions split over 2 replicas",
        || {
            let (x, y) = (lag_partitions(&a), lag_partitions(&b));
            (x + y == 4 && x > 0 && y > 0).then_some(())
        },
    )?;
    produce(&broker, &input, requests(0..5000)).await?;
    let answers = read(&broker, &output, 5000, 120)?;
    let t = tally(&answers);
    assert_eq!(answers.len(), 5000, "answers");
    assert_eq!(t.len(), 5000, "every request answered");
    assert!(t.values().all(|n| *n == 1), "no request answered twice");
    for ans in &answers {
        assert_eq!(ans.key, format!("k{}", id_of(ans) % 50), "key kept");
    }
    // The group's committed offsets reach the end offsets (5000 records in all).
    wait_for(Duration::from_secs(15), "commits reach the end", || {
        (committed_sum(&broker, &group, &input) == 5000).then_some(())
    })?;
    // And /metrics shows per-partition lag falling to 0.
    wait_for(Duration::from_secs(10), "lag 0 in /metrics", || {
        let zero = |ki: &KafkaInfer| {
            let m = ki.metrics();
            let lags: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with("kafka_infer_consumer_lag{"))
                .collect();
            !lags.is_empty() && lags.iter().all(|l| l.ends_with(" 0"))
        };
        (zero(&a) && zero(&b)).then_some(())
    })?;
    let ok = a
        .metric("kafka_infer_records_total{result=\"ok\"}")
        .unwrap_or(0.0)
        + b.metric("kafka_infer_records_total{result=\"ok\"}")
            .unwrap_or(0.0);
    assert_eq!(ok, 5000.0, "records_total ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_down_for_10s_loses_nothing_and_answers_nothing_twice() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    let ports = (free_port(), free_port());
    let mut model = models::test_model_on("v2", "m", "echo", 0, ports)?;
    let url = model.rest_url();
    let ki = KafkaInfer::start(
        &v2_args(&url, &group),
        &topics_env(&broker, &input, &output),
    )?;
    ki.wait_ready(Duration::from_secs(30))?;
    produce(&broker, &input, requests(0..100)).await?;
    wait_for(Duration::from_secs(20), "first 100 answered", || {
        (ki.metric("kafka_infer_records_total{result=\"ok\"}")
            .unwrap_or(0.0)
            >= 100.0)
            .then_some(())
    })?;
    // The model goes away; requests keep coming.
    model.proc.stop();
    produce(&broker, &input, requests(100..300)).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        ki.metric("kafka_infer_records_total{result=\"ok\"}"),
        Some(100.0),
        "nothing answered while the model is down"
    );
    assert!(
        ki.metric("kafka_infer_records_total{result=\"retry\"}")
            .unwrap_or(0.0)
            > 0.0,
        "retries counted"
    );
    assert!(
        committed_sum(&broker, &group, &input) <= 100,
        "nothing committed past the waiting records"
    );
    let _model = models::test_model_on("v2", "m", "echo", 0, ports)?;
    let answers = read(&broker, &output, 300, 60)?;
    let t = tally(&answers);
    assert_eq!(t.len(), 300, "every request answered after the outage");
    assert!(
        t.values().all(|n| *n == 1),
        "none twice: {:?}",
        t.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    assert!(
        answers
            .iter()
            .all(|a| !a.headers.contains_key("kafka-infer-error")),
        "no error records"
    );
    wait_for(Duration::from_secs(15), "commits reach the end", || {
        (committed_sum(&broker, &group, &input) == 300).then_some(())
    })?;
    Ok(())
}

fn poison_stream() -> Vec<Rec> {
    let pn = |n: &str| vec![("proto-name".to_string(), Bytes::from(n.to_owned()))];
    vec![
        ("p".into(), vec![], request(0)),
        (
            "p".into(),
            pn("inference.ModelInferRequest"),
            Bytes::from_static(b"\x0a\xff\xff garbage"),
        ),
        ("p".into(), vec![], request(1)),
        ("p".into(), vec![], Bytes::from_static(b"{\"inputs\": [")),
        ("p".into(), vec![], request(2)),
        (
            "p".into(),
            pn("no.such.Message"),
            Bytes::from_static(b"\x08\x01"),
        ),
        ("p".into(), vec![], request(3)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_get_one_error_record_each_and_the_stream_goes_on() -> Result<()> {
    let broker = Broker::start()?;
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let kinds = |answers: &[Answer]| -> BTreeSet<String> {
        answers
            .iter()
            .filter_map(|a| a.headers.get("kafka-infer-error-kind").cloned())
            .collect()
    };
    let want: BTreeSet<String> = ["bad-protobuf", "malformed-json", "unknown-proto-name"]
        .map(String::from)
        .into();

    // With an error topic: the input goes there as it was, with the reason in headers.
    let (input, output, errors, group) = (unique("in"), unique("out"), unique("err"), unique("g"));
    for t in [&input, &output, &errors] {
        broker.create_topic(t, 1)?;
    }
    let mut env = topics_env(&broker, &input, &output);
    env.push(("KAFKA_ERROR_TOPIC", errors.clone()));
    let ki = KafkaInfer::start(&v2_args(&url, &group), &env)?;
    produce(&broker, &input, poison_stream()).await?;
    let ok = read(&broker, &output, 4, 30)?;
    assert_eq!(
        ok.iter().map(id_of).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "good records answered, in order"
    );
    let bad = read(&broker, &errors, 3, 30)?;
    assert_eq!(bad.len(), 3);
    assert_eq!(kinds(&bad), want);
    assert!(
        bad.iter()
            .all(|a| a.key == "p" && !a.headers["kafka-infer-error"].is_empty())
    );
    let garbage = bad
        .iter()
        .find(|a| a.headers["kafka-infer-error-kind"] == "bad-protobuf")
        .unwrap();
    assert_eq!(
        garbage.value, b"\x0a\xff\xff garbage",
        "the input kept for replay"
    );
    assert_eq!(
        garbage.headers.get("proto-name").map(String::as_str),
        Some("inference.ModelInferRequest")
    );
    drop(ki);

    // Without one: a protocol-shaped error answer on the output topic, in order.
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let _ki = KafkaInfer::start(
        &v2_args(&url, &group),
        &topics_env(&broker, &input, &output),
    )?;
    produce(&broker, &input, poison_stream()).await?;
    let all = read(&broker, &output, 7, 30)?;
    assert_eq!(all.len(), 7, "one record out per record in");
    assert_eq!(kinds(&all), want);
    for (i, a) in all.iter().enumerate() {
        let v: Value = serde_json::from_slice(&a.value)?;
        if i % 2 == 1 {
            assert!(
                v["error"].as_str().is_some_and(|e| !e.is_empty()),
                "error answer {i}: {v}"
            );
        } else {
            assert_eq!(v["id"], json!(format!("r{}", i / 2)));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_then_restart_answers_everything() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    // A slow model keeps requests in flight when SIGTERM arrives.
    let model = models::test_model_on("v2", "m", "echo", 50, (free_port(), free_port()))?;
    let url = model.rest_url();
    let env = topics_env(&broker, &input, &output);
    let mut args = v2_args(&url, &group);
    args.extend(["--max-in-flight", "8"]);
    produce(&broker, &input, requests(0..600)).await?;
    let mut ki = KafkaInfer::start(&args, &env)?;
    wait_for(Duration::from_secs(30), "some answers", || {
        (ki.metric("kafka_infer_records_total{result=\"ok\"}")
            .unwrap_or(0.0)
            >= 50.0)
            .then_some(())
    })?;
    let inflight = ki.metric("kafka_infer_in_flight").unwrap_or(0.0);
    let t0 = Instant::now();
    ki.proc.signal("TERM")?;
    let code = ki.proc.wait_exit(Duration::from_secs(30))?;
    assert_eq!(code, Some(0), "clean exit on SIGTERM");
    eprintln!(
        "in flight at SIGTERM: {inflight}; stopped in {:?}",
        t0.elapsed()
    );
    // In-flight requests finish; queued ones are left for the restart, not waited for (the
    // drain timeout is 20 s).
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "stop waited {:?}",
        t0.elapsed()
    );

    let _ki2 = KafkaInfer::start(&args, &env)?;
    let answers = read(&broker, &output, 600, 120)?;
    let t = tally(&answers);
    assert_eq!(t.len(), 600, "every input answered at least once");
    let dups: usize = t.values().map(|n| n - 1).sum();
    assert!(dups <= 8, "duplicates {dups} > --max-in-flight");
    Ok(())
}

fn read(broker: &Broker, topic: &str, n: usize, timeout_s: u32) -> Result<Vec<Answer>> {
    kafka_infer_tests::read_topic(&broker.bootstrap(), topic, n, timeout_s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_turns_readiness_off_and_the_bridge_goes_on_after() -> Result<()> {
    let mut broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let ki = KafkaInfer::start(
        &v2_args(&url, &group),
        &topics_env(&broker, &input, &output),
    )?;
    ki.wait_ready(Duration::from_secs(30))?;
    let ready = || {
        kafka_infer_tests::http_get(ki.metrics_port, "/ready")
            .map(|(s, _)| s)
            .unwrap_or(0)
    };

    broker.stop();
    wait_for(
        Duration::from_secs(30),
        "/ready false while Kafka is down",
        || (ready() == 503).then_some(()),
    )?;
    assert!(
        ki.proc.is_running_shared(),
        "the process stays up through the outage"
    );

    // Same port; memory storage, so the topics come back empty (kafka-infer's metadata
    // requests may have the broker auto-create them first: an existing topic is fine).
    broker.restart()?;
    let cluster = Cluster::connect(broker.settings()).await?;
    cluster.create_topic(&input, 2).await?;
    cluster.create_topic(&output, 2).await?;
    wait_for(Duration::from_secs(60), "/ready again", || {
        (ready() == 200).then_some(())
    })?;
    produce(&broker, &input, requests(0..50)).await?;
    // Across a broker restart a produce retried after a lost acknowledgement may write an answer
    // twice (at-least-once; idempotent producing is a later issue): count distinct answers.
    let answers = kafka_infer_tests::read_topic_settled(&broker.bootstrap(), &output, 50, 60)?;
    let errors: Vec<_> = answers
        .iter()
        .filter_map(|a| a.headers.get("kafka-infer-error"))
        .collect();
    assert!(errors.is_empty(), "error records: {errors:?}");
    assert_eq!(tally(&answers).len(), 50, "answers after the outage");
    Ok(())
}

/// Records queued behind a slow model count their partition as model-bound (answers linger up
/// to --linger-max meanwhile), and the count goes back to 0 once all are answered: no partition
/// stays pressed (which would delay every later answer by --linger-max).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_count_as_model_bound_only_while_records_wait_for_the_model() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    let model = models::test_model_on("v2", "m", "echo", 50, (free_port(), free_port()))?;
    let url = model.rest_url();
    let env = topics_env(&broker, &input, &output);
    let mut args = v2_args(&url, &group);
    args.extend(["--max-in-flight", "2"]);
    let n = 120;
    produce(&broker, &input, requests(0..n)).await?;
    let ki = KafkaInfer::start(&args, &env)?;
    wait_for(Duration::from_secs(30), "a model-bound partition", || {
        (ki.metric("kafka_infer_model_bound_partitions")
            .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    })?;
    wait_for(Duration::from_secs(60), "every answer", || {
        (ki.metric("kafka_infer_records_total{result=\"ok\"}")
            .unwrap_or(0.0)
            >= n as f64)
            .then_some(())
    })?;
    wait_for(Duration::from_secs(5), "no model-bound partition", || {
        (ki.metric("kafka_infer_model_bound_partitions") == Some(0.0)).then_some(())
    })?;
    Ok(())
}
