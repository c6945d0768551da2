//! Faults where the field's real failures happen, end to end with the kafka-infer binary: an
//! answer the output topic refuses, a missing output topic, a payload that hangs the model, a
//! silent network (blackhole proxy), a drain longer than the session timeout, SIGKILL under load.
//! Every input still ends as exactly one output or error record.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use bytes::Bytes;
use kafka_infer_tests::{
    Answer, Broker, committed_sum,
    models::{self, KafkaInfer, kafka_infer_bin},
    proxy::{Mode, ProxiedBroker, run_bounded},
    py, unique, wait_for,
};
use kafka_io::{ConnectionSettings, OutRecord};
use serde_json::{Value, json};

fn request(id: &str, n: usize) -> Bytes {
    Bytes::from(
        json!({"id": id, "inputs": [{"name": "x", "shape": [n], "datatype": "INT64", "data": vec![7; n]}]})
            .to_string(),
    )
}

async fn produce(
    settings: ConnectionSettings,
    topic: &str,
    recs: Vec<(String, Bytes)>,
) -> Result<()> {
    let records = recs
        .into_iter()
        .map(|(key, value)| OutRecord {
            key: Some(Bytes::from(key)),
            value: Some(value),
            headers: vec![],
        })
        .collect();
    kafka_infer_tests::produce_all(settings, topic, records).await
}

fn id_of(a: &Answer) -> Option<String> {
    let v: Value = serde_json::from_slice(&a.value).ok()?;
    v["id"].as_str().map(str::to_owned)
}

fn tally(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        if let Some(id) = id_of(a) {
            *t.entry(id).or_default() += 1;
        }
    }
    t
}

fn env(bootstrap: &str, input: &str, output: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKER", bootstrap.to_owned()),
        ("KAFKA_INPUT_TOPIC", input.to_owned()),
        ("KAFKA_OUTPUT_TOPIC", output.to_owned()),
    ]
}

fn args<'a>(url: &'a str, group: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--protocol",
        "v2",
        "--model",
        url,
        "--model-name",
        "m",
        "--group-id",
        group,
    ];
    if !extra.contains(&"--session-timeout") {
        v.extend_from_slice(&["--session-timeout", "3s"]);
    }
    v.extend_from_slice(extra);
    v
}

fn ok_count(ki: &KafkaInfer) -> f64 {
    ki.metric("kafka_infer_records_total{result=\"ok\"}")
        .unwrap_or(0.0)
}

fn error_count(ki: &KafkaInfer) -> f64 {
    ki.metric("kafka_infer_records_total{result=\"error\"}")
        .unwrap_or(0.0)
}

fn ready(ki: &KafkaInfer) -> u16 {
    kafka_infer_tests::http_get(ki.metrics_port, "/ready").map_or(0, |(s, _)| s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_for_the_output_topic_gets_one_error_record_and_the_stream_goes_on()
-> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 2)?;
    // The output topic accepts 4000-byte batches (the broker reports it; kafka-infer enforces it).
    py(
        "create_topic.py",
        &[&broker.bootstrap(), &output, "2", "max.message.bytes=4000"],
    )?;
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let ki = KafkaInfer::start(
        &args(&url, &group, &[]),
        &env(&broker.bootstrap(), &input, &output),
    )?;
    let mut recs: Vec<(String, Bytes)> = (0..20)
        .map(|i| (format!("k{i}"), request(&format!("r{i}"), 3)))
        .collect();
    // Its echo answer is ~6 KB: too large for the output topic.
    recs.insert(10, ("big".into(), request("big", 3000)));
    produce(broker.settings(), &input, recs).await?;
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 21, 60)?;
    assert_eq!(answers.len(), 21, "one record per input");
    let errors: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.headers.contains_key("kafka-infer-error"))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error record");
    assert_eq!(
        errors[0]
            .headers
            .get("kafka-infer-error-kind")
            .map(String::as_str),
        Some("answer-too-large")
    );
    assert_eq!(errors[0].key, "big", "the error record is the big input's");
    assert!(errors[0].value.len() < 4000, "the error record fits");
    let t = tally(&answers);
    assert_eq!(t.len(), 20, "the other 20 answered: {t:?}");
    assert!(t.values().all(|n| *n == 1));
    wait_for(Duration::from_secs(15), "commits reach the end", || {
        (committed_sum(&broker.bootstrap(), &group, &input) == 21).then_some(())
    })?;
    assert!(ki.proc.is_running_shared(), "still running");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_output_topic_stops_with_a_clear_error_and_a_restart_answers_all() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 2)?;
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let recs: Vec<(String, Bytes)> = (0..10)
        .map(|i| (format!("k{i}"), request(&format!("r{i}"), 2)))
        .collect();
    produce(broker.settings(), &input, recs).await?;
    let mut cmd = Command::new(kafka_infer_bin());
    cmd.arg("run")
        .args(args(&url, &group, &["--metrics-addr", "127.0.0.1:0"]))
        .envs(env(&broker.bootstrap(), &input, &output));
    let out = run_bounded(&mut cmd, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "non-zero exit: {stderr}");
    assert!(
        stderr.contains(&output) && stderr.contains("does not exist"),
        "says which topic is missing: {stderr}"
    );
    assert!(
        committed_sum(&broker.bootstrap(), &group, &input) <= 0,
        "nothing committed"
    );
    broker.create_topic(&output, 2)?;
    let _ki = KafkaInfer::start(
        &args(&url, &group, &[]),
        &env(&broker.bootstrap(), &input, &output),
    )?;
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 10, 60)?;
    let t = tally(&answers);
    assert_eq!(t.len(), 10, "all answered after the restart: {t:?}");
    assert!(t.values().all(|n| *n == 1));
    wait_for(Duration::from_secs(15), "commits reach the end", || {
        (committed_sum(&broker.bootstrap(), &group, &input) == 10).then_some(())
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_hangs_the_model_gets_an_error_record_after_max_attempts_while_other_partitions_flow()
-> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    let model = models::test_model_hanging_on("v2", "m", "HANG")?;
    let url = model.rest_url();
    let ki = KafkaInfer::start(
        &args(
            &url,
            &group,
            &[
                "--model-timeout",
                "1500ms",
                "--max-attempts",
                "2",
                "--retry-max-backoff",
                "200ms",
            ],
        ),
        &env(&broker.bootstrap(), &input, &output),
    )?;
    ki.wait_ready(Duration::from_secs(30))?;
    wait_for(Duration::from_secs(30), "partitions assigned", || {
        ki.metrics()
            .lines()
            .filter(|l| l.starts_with("kafka_infer_consumer_lag{"))
            .count()
            .eq(&2)
            .then_some(())
    })?;
    let hang_key = "hang";
    let hang_partition = kafka_io::producer::partition_for_key(hang_key.as_bytes(), 2);
    let mut recs = vec![(hang_key.to_owned(), request("HANG", 1))];
    let mut other = 0;
    for i in 0..60 {
        let k = format!("k{i}");
        if kafka_io::producer::partition_for_key(k.as_bytes(), 2) != hang_partition {
            other += 1;
        }
        recs.push((k, request(&format!("r{i}"), 1)));
    }
    let start = Instant::now();
    produce(broker.settings(), &input, recs).await?;
    // The other partition is answered while the poison record still hangs.
    wait_for(
        Duration::from_secs(10),
        "the other partition answered",
        || (ok_count(&ki) >= other as f64).then_some(()),
    )?;
    assert_eq!(
        error_count(&ki),
        0.0,
        "the other partition flowed before the poison record was given up"
    );
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 61, 60)?;
    let took = start.elapsed();
    let errors: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.headers.contains_key("kafka-infer-error"))
        .collect();
    assert_eq!(errors.len(), 1, "one error record");
    assert_eq!(errors[0].key, hang_key);
    assert_eq!(
        errors[0]
            .headers
            .get("kafka-infer-error-kind")
            .map(String::as_str),
        Some("model-timeout")
    );
    assert!(
        errors[0].headers["kafka-infer-error"].contains("gave up after 2 attempts"),
        "{:?}",
        errors[0].headers
    );
    let t = tally(&answers);
    assert_eq!(t.len(), 60, "the 60 others answered");
    assert!(t.values().all(|n| *n == 1));
    assert!(
        took >= Duration::from_secs(3),
        "two attempts of 1.5 s each: {took:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_replica_turns_not_ready_within_the_session_timeout_and_recovers() -> Result<()>
{
    let pb = ProxiedBroker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    pb.create_topic(&input, 2)?;
    pb.create_topic(&output, 2)?;
    let settings = pb.settings();
    let (broker, proxy) = pb.into_parts();
    let bootstrap = proxy.bootstrap();
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let ki = KafkaInfer::start(&args(&url, &group, &[]), &env(&bootstrap, &input, &output))?;
    ki.wait_ready(Duration::from_secs(30))?;
    let recs = |r: std::ops::Range<usize>| -> Vec<(String, Bytes)> {
        r.map(|i| (format!("k{i}"), request(&format!("r{i}"), 1)))
            .collect()
    };
    produce(settings.clone(), &input, recs(0..100)).await?;
    wait_for(Duration::from_secs(20), "first 100 answered", || {
        (ok_count(&ki) >= 100.0).then_some(())
    })?;
    // And committed (within --commit-interval): what is lost below is what was not.
    wait_for(Duration::from_secs(15), "first 100 committed", || {
        (committed_sum(&broker.bootstrap(), &group, &input) == 100).then_some(())
    })?;
    // The network goes silent: nothing forwarded, nothing closed.
    proxy.set_mode(Mode::Blackhole);
    let silent = Instant::now();
    wait_for(Duration::from_secs(6), "/ready 503", || {
        (ready(&ki) == 503).then_some(())
    })?;
    let noticed = silent.elapsed();
    assert!(
        noticed <= Duration::from_secs(3) + Duration::from_millis(1500),
        "not ready within the session timeout (3 s): took {noticed:?}"
    );
    // Past the session timeout the member gives its partitions up (the log says so).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(ready(&ki), 503, "still not ready while silent");
    proxy.set_mode(Mode::Pass);
    wait_for(Duration::from_secs(40), "ready again", || {
        (ready(&ki) == 200).then_some(())
    })?;
    produce(settings, &input, recs(100..200)).await?;
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 200, 60)?;
    let t = tally(&answers);
    let missing: Vec<usize> = (0..200)
        .filter(|i| !t.contains_key(&format!("r{i}")))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    wait_for(Duration::from_secs(15), "commits reach the end", || {
        (committed_sum(&broker.bootstrap(), &group, &input) == 200).then_some(())
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_drain_longer_than_the_session_timeout_commits_what_it_finished_and_nothing_is_answered_twice()
-> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    // Each answer takes 4 s: longer than the 2 s session timeout.
    let model = models::test_model_on(
        "v2",
        "m",
        "echo",
        4000,
        (
            kafka_infer_tests::free_port(),
            kafka_infer_tests::free_port(),
        ),
    )?;
    let url = model.rest_url();
    let extra = [
        "--session-timeout",
        "2s",
        "--drain-timeout",
        "20s",
        "--max-in-flight",
        "8",
    ];
    let mut ki = KafkaInfer::start(
        &args(&url, &group, &extra),
        &env(&broker.bootstrap(), &input, &output),
    )?;
    ki.wait_ready(Duration::from_secs(30))?;
    let recs: Vec<(String, Bytes)> = (0..48)
        .map(|i| (format!("k{i}"), request(&format!("r{i}"), 1)))
        .collect();
    produce(broker.settings(), &input, recs).await?;
    // Let the first round finish and the second start, then SIGTERM mid-call.
    wait_for(Duration::from_secs(20), "first answers", || {
        (ok_count(&ki) >= 8.0).then_some(())
    })?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ki.proc.signal("TERM")?;
    let code = ki.proc.wait_exit(Duration::from_secs(30))?;
    assert_eq!(code, Some(0), "clean exit after the drain");
    let committed = committed_sum(&broker.bootstrap(), &group, &input);
    let written = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 48, 5)?;
    assert!(
        committed > 8,
        "the drained records were committed: {committed}"
    );
    assert_eq!(
        committed as usize,
        written.len(),
        "everything answered was committed (the member stayed in the group through the drain)"
    );
    // A new replica finishes the rest: nothing twice.
    let _ki2 = KafkaInfer::start(
        &args(&url, &group, &extra),
        &env(&broker.bootstrap(), &input, &output),
    )?;
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 48, 60)?;
    let t = tally(&answers);
    assert_eq!(t.len(), 48, "all answered");
    let twice: Vec<_> = t.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "answered twice: {twice:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_redoes_at_most_max_uncommitted_records_per_partition() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 4)?;
    broker.create_topic(&output, 4)?;
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let max_in_flight = 16usize;
    let mif = max_in_flight.to_string();
    // The tight bound: nothing more between a model call's start and its offset's commit.
    let extra = [
        "--max-in-flight",
        mif.as_str(),
        "--max-uncommitted",
        mif.as_str(),
    ];
    let n = 30000usize;
    let key = |i: usize| format!("k{}", i % 64);
    let recs: Vec<(String, Bytes)> = (0..n)
        .map(|i| (key(i), request(&format!("r{i}"), 1)))
        .collect();
    produce(broker.settings(), &input, recs).await?;
    let mut ki = KafkaInfer::start(
        &args(&url, &group, &extra),
        &env(&broker.bootstrap(), &input, &output),
    )?;
    // Measure the rate on the way, then kill -9 mid-stream.
    wait_for(Duration::from_secs(60), "first answers", || {
        (ok_count(&ki) >= 500.0).then_some(())
    })?;
    let (t0, c0) = (Instant::now(), ok_count(&ki));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (t1, c1) = (Instant::now(), ok_count(&ki));
    let rate = (c1 - c0) / (t1 - t0).as_secs_f64();
    ki.proc.signal("KILL")?;
    let _ = ki.proc.wait_exit(Duration::from_secs(10));
    eprintln!("rate before the kill: {rate:.0} records/s; answered {c1}");
    assert!(rate >= 800.0, "load of at least 800 records/s: {rate:.0}");
    assert!(c1 < n as f64, "killed mid-stream");
    let _ki2 = KafkaInfer::start(
        &args(&url, &group, &extra),
        &env(&broker.bootstrap(), &input, &output),
    )?;
    let answers = kafka_infer_tests::read_topic_settled(&broker.bootstrap(), &output, n, 90)?;
    let t = tally(&answers);
    assert_eq!(t.len(), n, "every request answered");
    let mut dup_per_partition: BTreeMap<i32, usize> = BTreeMap::new();
    for (id, count) in &t {
        let i: usize = id.trim_start_matches('r').parse()?;
        let p = kafka_io::producer::partition_for_key(key(i).as_bytes(), 4);
        *dup_per_partition.entry(p).or_default() += count - 1;
    }
    eprintln!("duplicates per input partition: {dup_per_partition:?}");
    let over: BTreeSet<i32> = dup_per_partition
        .iter()
        .filter(|(_, d)| **d > max_in_flight)
        .map(|(p, _)| *p)
        .collect();
    assert!(
        over.is_empty(),
        "duplicates per partition above --max-uncommitted ({max_in_flight}): {dup_per_partition:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_during_a_rejoin_the_group_finds_its_coordinator_again_and_loses_nothing()
-> Result<()> {
    let pb = ProxiedBroker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    pb.create_topic(&input, 4)?;
    pb.create_topic(&output, 4)?;
    let settings = pb.settings();
    let (broker, proxy) = pb.into_parts();
    let bootstrap = proxy.bootstrap();
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let owned = |ki: &KafkaInfer| ki.owned_partitions().len();
    let a = KafkaInfer::start(&args(&url, &group, &[]), &env(&bootstrap, &input, &output))?;
    wait_for(Duration::from_secs(30), "A owns 4", || {
        (owned(&a) == 4).then_some(())
    })?;
    let recs = |r: std::ops::Range<usize>| -> Vec<(String, Bytes)> {
        r.map(|i| (format!("k{i}"), request(&format!("r{i}"), 1)))
            .collect()
    };
    produce(settings.clone(), &input, recs(0..200)).await?;
    // B joins: a rebalance starts; while it runs, every connection is reset (the coordinator's
    // included), twice.
    let b = KafkaInfer::start(&args(&url, &group, &[]), &env(&bootstrap, &input, &output))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..2 {
        proxy.set_mode(Mode::Reset);
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.set_mode(Mode::Pass);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    wait_for(Duration::from_secs(40), "2 and 2", || {
        (owned(&a) == 2 && owned(&b) == 2).then_some(())
    })?;
    produce(settings, &input, recs(200..400)).await?;
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 400, 60)?;
    let t = tally(&answers);
    let missing: Vec<usize> = (0..400)
        .filter(|i| !t.contains_key(&format!("r{i}")))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    wait_for(Duration::from_secs(20), "commits reach the end", || {
        (committed_sum(&broker.bootstrap(), &group, &input) == 400).then_some(())
    })?;
    assert!(a.proc.is_running_shared() && b.proc.is_running_shared());
    Ok(())
}
