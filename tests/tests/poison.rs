//! A record that hangs the model must not stall everything (issue 19, point 7), end to end with
//! the kafka-infer binary, a real broker and our test model (`--hang-on HANG`: a request whose
//! body holds HANG never gets an answer; its health check answers at once).
//!
//! - `--max-concurrency 1` (KAFKA_WORKERS=1): the poison record gives its place up while it
//!   waits out a backoff, so the healthy records run, and it is given up after --max-attempts.
//! - Batching on a quiet topic: a batch that times out is split at once; its healthy records are
//!   answered within about one --model-timeout, the poison record is given up alone.
//! - Two partitions with batching: partition A's answers do not wait for partition B's poison.
//! - A lone poison record with nothing else running is given up because the model answers its
//!   health check; while the health check fails too (the model is down for everyone) it waits,
//!   and nothing is committed past it. The same over gRPC (v2 `ServerReady`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use bytes::Bytes;
use kafka_infer_tests::{
    Answer, Broker, committed_sum,
    models::{self, KafkaInfer},
    unique, wait_for,
};
use kafka_io::OutRecord;
use serde_json::{Value, json};

/// A v2 request with its id also as its one BYTES value (the id is not part of a merged
/// batch's request, the values are: a batch holding HANG hangs the model too).
fn request(id: &str) -> Bytes {
    Bytes::from(
        json!({"id": id, "inputs": [{"name": "x", "shape": [1, 1], "datatype": "BYTES", "data": [id]}]})
            .to_string(),
    )
}

async fn produce(broker: &Broker, topic: &str, recs: &[(String, String)]) -> Result<()> {
    let records = recs
        .iter()
        .map(|(key, id)| OutRecord {
            key: Some(Bytes::from(key.clone())),
            value: Some(request(id)),
            headers: vec![],
        })
        .collect();
    kafka_infer_tests::produce_all(broker.settings(), topic, records).await
}

/// kafka-infer on `input` -> `output` with a 1 s model timeout and short backoffs; its group.
fn start(
    broker: &Broker,
    url: &str,
    input: &str,
    output: &str,
    extra: &[&str],
) -> Result<(KafkaInfer, String)> {
    let group = unique("g");
    let mut args = vec![
        "--protocol",
        "v2",
        "--model",
        url,
        "--model-name",
        "m",
        "--group-id",
        &group,
        "--session-timeout",
        "3s",
        "--model-timeout",
        "1s",
        "--retry-max-backoff",
        "200ms",
    ];
    args.extend_from_slice(extra);
    let env = vec![
        ("KAFKA_BROKER", broker.bootstrap()),
        ("KAFKA_INPUT_TOPIC", input.to_owned()),
        ("KAFKA_OUTPUT_TOPIC", output.to_owned()),
    ];
    let ki = KafkaInfer::start(&args, &env)?;
    ki.wait_ready(Duration::from_secs(30))?;
    Ok((ki, group))
}

fn wait_assigned(ki: &KafkaInfer, partitions: usize) -> Result<()> {
    wait_for(Duration::from_secs(30), "partitions assigned", || {
        ki.metrics()
            .lines()
            .filter(|l| l.starts_with("kafka_infer_consumer_lag{"))
            .count()
            .eq(&partitions)
            .then_some(())
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

fn id_of(a: &Answer) -> Option<String> {
    let v: Value = serde_json::from_slice(&a.value).ok()?;
    v["id"].as_str().map(str::to_owned)
}

fn is_error(a: &Answer) -> bool {
    a.headers.contains_key("kafka-infer-error")
}

/// A key of `topic`'s partition `p` (of `n`), the `i`-th such.
fn key_on(p: i32, n: i32, i: usize) -> String {
    (0..)
        .map(|j| format!("k{p}-{j}"))
        .filter(|k| kafka_io::producer::partition_for_key(k.as_bytes(), n) == p)
        .nth(i)
        .expect("some key lands on every partition")
}

/// The one error record: the poison record's, a model timeout given up (after `attempts`, if
/// given).
fn the_poison_error<'a>(answers: &'a [Answer], key: &str, attempts: Option<u32>) -> &'a Answer {
    let errors: Vec<&Answer> = answers.iter().filter(|a| is_error(a)).collect();
    assert_eq!(errors.len(), 1, "one error record: {errors:?}");
    let e = errors[0];
    assert_eq!(e.key, key, "the poison record's");
    assert_eq!(
        e.headers.get("kafka-infer-error-kind").map(String::as_str),
        Some("model-timeout")
    );
    assert!(
        e.headers["kafka-infer-error"].contains(&match attempts {
            Some(n) => format!("gave up after {n} attempts"),
            None => "gave up after".to_owned(),
        }),
        "{:?}",
        e.headers
    );
    e
}

/// Every healthy id answered exactly once.
fn assert_all_answered(answers: &[Answer], ids: &[String]) {
    let mut got: Vec<String> = answers
        .iter()
        .filter(|a| !is_error(a))
        .filter_map(id_of)
        .collect();
    got.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(got, want, "every healthy record answered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_worker_a_hanging_record_is_given_up_and_every_healthy_record_is_answered()
-> Result<()> {
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    let model = models::test_model_hanging_on("v2", "m", "HANG")?;
    let (ki, group) = start(
        &broker,
        &model.rest_url(),
        &input,
        &output,
        &["--max-concurrency", "1", "--max-attempts", "3"],
    )?;
    wait_assigned(&ki, 2)?;
    // The poison record first on partition 0, healthy ones on both partitions.
    let mut recs = vec![(key_on(0, 2, 0), "HANG".to_owned())];
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = format!("r{i}");
        recs.push((key_on((i % 2) as i32, 2, 1 + i / 2), id.clone()));
        ids.push(id);
    }
    let start = Instant::now();
    produce(&broker, &input, &recs).await?;
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 21, 40)?;
    let took = start.elapsed();
    assert_eq!(answers.len(), 21, "one record per input");
    the_poison_error(&answers, &recs[0].0, Some(3));
    assert_all_answered(&answers, &ids);
    assert!(
        took >= Duration::from_secs(3),
        "three attempts of 1 s each: {took:?}"
    );
    wait_for(Duration::from_secs(15), "commits reach the end", || {
        (committed_sum(&broker.bootstrap(), &group, &input) == 21).then_some(())
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_quiet_topic_a_batch_with_a_hanging_record_is_split_and_its_batch_mates_answered_promptly()
-> Result<()> {
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let model = models::test_model_hanging_on("v2", "m", "HANG")?;
    let (ki, group) = start(
        &broker,
        &model.rest_url(),
        &input,
        &output,
        &[
            "--batch-size",
            "8",
            "--batch-linger",
            "1s",
            "--max-attempts",
            "5",
        ],
    )?;
    wait_assigned(&ki, 1)?;
    // One burst, nothing after it: the poison record in the middle.
    let mut recs = Vec::new();
    let mut ids = Vec::new();
    for i in 0..8 {
        let id = if i == 3 {
            "HANG".to_owned()
        } else {
            format!("r{i}")
        };
        if i != 3 {
            ids.push(id.clone());
        }
        recs.push((format!("k{i}"), id));
    }
    let produced = now_ms();
    produce(&broker, &input, &recs).await?;
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 8, 40)?;
    assert_eq!(answers.len(), 8, "one record per input");
    let poison = the_poison_error(&answers, "k3", Some(5));
    assert_all_answered(&answers, &ids);
    // Order within the partition: the batch-mates before the poison record are written
    // first; those after it wait for it (input order). Those before it came within about one
    // model timeout, not after five attempts.
    let before: Vec<&Answer> = answers
        .iter()
        .filter(|a| !is_error(a) && a.offset < poison.offset)
        .collect();
    assert_eq!(before.len(), 3);
    eprintln!(
        "batch-mates answered after {:?} ms, the poison record's error after {} ms",
        before.iter().map(|a| a.ts - produced).collect::<Vec<_>>(),
        poison.ts - produced
    );
    for a in &before {
        assert!(
            a.ts - produced < 3000,
            "a batch-mate answered {} ms after it was produced (the poison record took {} ms)",
            a.ts - produced,
            poison.ts - produced
        );
    }
    assert!(
        poison.ts - produced >= 5000,
        "five attempts of 1 s: {} ms",
        poison.ts - produced
    );
    wait_for(Duration::from_secs(15), "commits reach the end", || {
        (committed_sum(&broker.bootstrap(), &group, &input) == 8).then_some(())
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_batching_one_partitions_answers_do_not_wait_for_anothers_hanging_record() -> Result<()>
{
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    let model = models::test_model_hanging_on("v2", "m", "HANG")?;
    let (ki, group) = start(
        &broker,
        &model.rest_url(),
        &input,
        &output,
        &[
            "--batch-size",
            "4",
            "--batch-linger",
            "1s",
            "--max-attempts",
            "6",
        ],
    )?;
    wait_assigned(&ki, 2)?;
    let (a, b) = (0, 1);
    // Partition B's first poison record keeps the model busy (run alone); then a burst whose
    // batch mixes partition A's records with B's second poison record.
    let produced = now_ms();
    produce(&broker, &input, &[(key_on(b, 2, 0), "HANG-1".to_owned())]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let burst = vec![
        (key_on(a, 2, 0), "a0".to_owned()),
        (key_on(b, 2, 1), "HANG-2".to_owned()),
        (key_on(a, 2, 1), "a1".to_owned()),
        (key_on(a, 2, 2), "a2".to_owned()),
    ];
    produce(&broker, &input, &burst).await?;
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 5, 40)?;
    assert_eq!(answers.len(), 5, "one record per input");
    let errors: Vec<&Answer> = answers.iter().filter(|x| is_error(x)).collect();
    assert_eq!(errors.len(), 2, "the two poison records: {errors:?}");
    assert!(errors.iter().all(|e| {
        e.headers["kafka-infer-error"].contains("gave up after 6 attempts")
            && e.partition == i64::from(b)
    }));
    let first_error = errors.iter().map(|e| e.ts).min().expect("two");
    let from_a: Vec<&Answer> = answers
        .iter()
        .filter(|x| !is_error(x) && x.partition == i64::from(a))
        .collect();
    assert_eq!(from_a.len(), 3, "partition A's three answers");
    eprintln!(
        "partition A answered after {:?} ms, B's first poison record given up after {} ms",
        from_a.iter().map(|x| x.ts - produced).collect::<Vec<_>>(),
        first_error - produced
    );
    for x in &from_a {
        assert!(
            x.ts - produced < 3500,
            "partition A's {:?} answered {} ms after the start (B's first poison record was given up after {} ms)",
            id_of(x),
            x.ts - produced,
            first_error - produced
        );
        assert!(x.ts < first_error, "answered while B's poison was retried");
    }
    wait_for(Duration::from_secs(15), "commits reach the end", || {
        (committed_sum(&broker.bootstrap(), &group, &input) == 5).then_some(())
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_hanging_record_is_given_up_when_the_model_answers_its_health_check_and_waits_when_it_does_not()
-> Result<()> {
    let broker = Broker::start()?;
    // The model answers its health check: given up after two attempts although nothing else runs.
    {
        let (input, output) = (unique("in"), unique("out"));
        broker.create_topic(&input, 1)?;
        broker.create_topic(&output, 1)?;
        let model = models::test_model_hanging_on("v2", "m", "HANG")?;
        let (ki, group) = start(
            &broker,
            &model.rest_url(),
            &input,
            &output,
            &["--max-attempts", "2"],
        )?;
        wait_assigned(&ki, 1)?;
        produce(&broker, &input, &[("k".to_owned(), "HANG".to_owned())]).await?;
        let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 1, 30)?;
        let e = the_poison_error(&answers, "k", Some(2));
        assert!(
            e.headers["kafka-infer-error"].contains("answered its health check"),
            "{:?}",
            e.headers
        );
        wait_for(Duration::from_secs(15), "committed past it", || {
            (committed_sum(&broker.bootstrap(), &group, &input) == 1).then_some(())
        })?;
    }
    // Its health check fails too (down for everyone, as far as kafka-infer can tell): the record
    // waits, nothing is committed; once another record is answered, it is given up.
    {
        let (input, output) = (unique("in"), unique("out"));
        broker.create_topic(&input, 2)?;
        broker.create_topic(&output, 2)?;
        let model = models::test_model_hanging_on_with("v2", "m", "HANG", &["--unready"])?;
        let (ki, group) = start(
            &broker,
            &model.rest_url(),
            &input,
            &output,
            &["--max-attempts", "2"],
        )?;
        wait_assigned(&ki, 2)?;
        produce(&broker, &input, &[(key_on(0, 2, 0), "HANG".to_owned())]).await?;
        // Four attempts' time (twice --max-attempts): still waiting.
        let waited = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 1, 5)?;
        assert!(waited.is_empty(), "no error record yet: {waited:?}");
        assert!(
            committed_sum(&broker.bootstrap(), &group, &input) <= 0,
            "nothing committed past it"
        );
        produce(&broker, &input, &[(key_on(1, 2, 0), "r0".to_owned())]).await?;
        let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 2, 30)?;
        let e = the_poison_error(&answers, &key_on(0, 2, 0), None);
        assert!(
            e.headers["kafka-infer-error"].contains("answered other records"),
            "{:?}",
            e.headers
        );
        assert_all_answered(&answers, &["r0".to_owned()]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_a_lone_hanging_record_is_given_up_when_the_model_server_says_it_is_ready()
-> Result<()> {
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let model = models::test_model_hanging_on("v2", "m", "HANG")?;
    let (ki, group) = start(
        &broker,
        &model.grpc_url(),
        &input,
        &output,
        &["--transport", "grpc", "--max-attempts", "2"],
    )?;
    wait_assigned(&ki, 1)?;
    produce(&broker, &input, &[("k".to_owned(), "HANG".to_owned())]).await?;
    let answers = kafka_infer_tests::read_topic(&broker.bootstrap(), &output, 1, 30)?;
    let e = the_poison_error(&answers, "k", Some(2));
    assert!(
        e.headers["kafka-infer-error"].contains("answered its health check"),
        "{:?}",
        e.headers
    );
    wait_for(Duration::from_secs(15), "committed past it", || {
        (committed_sum(&broker.bootstrap(), &group, &input) == 1).then_some(())
    })?;
    Ok(())
}
